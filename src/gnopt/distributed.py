"""Data parallelism over ``torch.distributed`` (``torchrun``), as the training loop uses it.

``torchrun --nproc_per_node K -m gnopt train ...`` starts K processes with ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK`` (and ``MASTER_ADDR`` / ``MASTER_PORT``) in their environment. :func:`session` then joins
them in one process group (gloo on CPU, nccl on CUDA) with a *finite* timeout, and the loop:

* gives every rank the same global micro-batches and lets rank r keep rows ``[r·B/K, (r+1)·B/K)`` of each
  (:func:`shard`, :func:`shard_batches`): the micro-batch size must be divisible by K;
* averages gradients, GN inner gradients / GN-vector products, losses and line-search losses with
  :func:`all_reduce_mean` (each rank's loss is a token mean over an equal-size shard, so the mean over
  ranks is the global token mean);
* lets only the main rank (:func:`is_main`) write logs and checkpoints.

Every function here is a no-op (or the identity) when ``torch.distributed`` is not initialized, so
single-process code calls them unconditionally.

A collective that fails — a peer died (its sockets close: the others notice at once) or hangs past the
timeout — raises :class:`DistributedError`, a :class:`~gnopt.errors.GnoptError` naming this rank, the
operation and the timeout, which the CLI prints as one ``gnopt: error:`` line before exiting with status 2.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gnopt.errors import GnoptError

T = TypeVar("T")
Batch = tuple[Tensor, Tensor]

#: Default seconds a collective may wait for the other ranks (``--dist-timeout``).
DEFAULT_TIMEOUT = 300.0
#: Rank 0 prepares (tokenizes) the corpus while the other ranks wait this long at least (seconds).
PREPARE_TIMEOUT = 3600.0

# The group used for rank-0-first work (data preparation): gloo, with a longer timeout than training's.
_control_group: Any = None
_timeout_s: float = DEFAULT_TIMEOUT


class DistributedError(GnoptError):
    """A collective failed: another rank died, hung past the timeout, or the group could not form."""


# ------------------------------------------------------------------------------------------------------
# environment and state
# ------------------------------------------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise GnoptError(f"environment variable {name}={value!r} is not an integer.") from None


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset): the size a torchrun launch asks for."""
    return _env_int("WORLD_SIZE", 1)


def env_rank() -> int:
    """``RANK`` from the environment (0 when unset); usable before the group is initialized."""
    return _env_int("RANK", 0)


def env_local_rank() -> int:
    """``LOCAL_RANK`` from the environment (0 when unset): the GPU index of this process."""
    return _env_int("LOCAL_RANK", 0)


def env_local_world_size() -> int:
    """``LOCAL_WORLD_SIZE`` (processes on this machine; torchrun sets it), else ``WORLD_SIZE``."""
    return _env_int("LOCAL_WORLD_SIZE", env_world_size())


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun's elastic agent."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def is_initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of data-parallel processes (1 when not initialized)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank (0 when not initialized)."""
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes logs and checkpoints (rank 0, or the only process)."""
    return rank() == 0


def timeout_seconds() -> float:
    """The collective timeout of the current session (seconds)."""
    return _timeout_s


def collective_device() -> torch.device:
    """Where small control tensors must live for the default group: CUDA for nccl, else CPU."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------------
# setup and teardown
# ------------------------------------------------------------------------------------------------------


def init(timeout: float = DEFAULT_TIMEOUT, device: torch.device | str = "cpu") -> bool:
    """Join the process group described by the torchrun environment; return whether this call created it.

    Nothing happens (returns ``False``) when ``WORLD_SIZE`` is absent or 1, or when a group already exists
    (then the caller does not own it). ``device`` picks the backend: nccl for CUDA (and selects GPU
    ``LOCAL_RANK``), gloo otherwise. ``timeout`` (seconds) bounds every collective.
    """
    global _control_group, _timeout_s
    if not timeout > 0:
        raise GnoptError(f"dist_timeout must be positive, got {timeout!r}.")
    if is_initialized():
        _timeout_s = float(timeout)
        return False
    size = env_world_size()
    if size <= 1:
        return False
    if not dist.is_available():  # pragma: no cover - torch builds without distributed
        raise GnoptError("WORLD_SIZE > 1 but this torch build has no torch.distributed.")
    rank_ = env_rank()
    if not 0 <= rank_ < size:
        raise GnoptError(f"RANK={rank_} is outside 0..{size - 1} (WORLD_SIZE={size}).")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise GnoptError(
            f"WORLD_SIZE={size} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; "
            "launch with torchrun (torchrun --nproc_per_node K -m gnopt train ...)."
        )
    dev = torch.device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env_local_rank())
    delta = datetime.timedelta(seconds=float(timeout))
    try:
        dist.init_process_group(backend=backend, timeout=delta, rank=rank_, world_size=size)
        # Rank 0 alone tokenizes the corpus while the others wait: that wait may be long, so it goes
        # through its own gloo group with a longer timeout (a rank that *dies* is still noticed at once).
        _control_group = dist.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=max(float(timeout), PREPARE_TIMEOUT)))
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(
            f"rank {rank_} of {size}: could not join the process group at "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within {timeout:g} s "
            f"({_first_line(exc)})."
        ) from None
    _timeout_s = float(timeout)
    return True


def cleanup() -> None:
    """Destroy the process group (no-op when there is none)."""
    global _control_group
    _control_group = None
    if is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


@contextlib.contextmanager
def session(timeout: float = DEFAULT_TIMEOUT, device: torch.device | str = "cpu") -> Iterator[bool]:
    """``init`` on entry, ``cleanup`` on exit if this session created the group; yields that flag."""
    owned = init(timeout, device)
    try:
        yield owned
    finally:
        if owned:
            cleanup()


def device_for(device: torch.device) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` for a CUDA run under torchrun, else ``device`` as is."""
    if device.type == "cuda" and device.index is None and env_world_size() > 1:
        return torch.device("cuda", env_local_rank())
    return device


# ------------------------------------------------------------------------------------------------------
# collectives (each a no-op without a group)
# ------------------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _run(op: str, fn: Callable[[], T]) -> T:
    """Run a collective, turning a backend failure into a :class:`DistributedError`."""
    t0 = time.perf_counter()
    try:
        return fn()
    except RuntimeError as exc:  # gloo/nccl errors (DistBackendError is a RuntimeError)
        waited = time.perf_counter() - t0
        raise DistributedError(
            f"rank {rank()} of {world_size()}: {op} with the other ranks failed after {waited:.1f} s "
            f"(timeout {_timeout_s:g} s, --dist-timeout): another rank died, hung or was stopped; check "
            f"its output ({_first_line(exc)})."
        ) from None


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over all ranks, in place; returns ``t``."""
    if is_initialized():
        _run("all_reduce", lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM))
    return t


def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean of a floating tensor over all ranks, in place; returns ``t`` (identity without a group).

    gloo has no ``ReduceOp.AVG``: this sums, then divides by the world size. Every rank gets bitwise the
    same result, so decisions taken on it (skip a step, pick a step size) agree across ranks.
    """
    if not is_initialized():
        return t
    if not t.is_floating_point():
        raise GnoptError(f"internal: all_reduce_mean needs a floating tensor, got {t.dtype}.")
    all_reduce_sum(t)
    return t.div_(world_size())


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on at least one rank (every rank gets the same answer)."""
    if not is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=collective_device())
    _run("all_reduce(max)", lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX))
    return bool(t.item())


def barrier() -> None:
    """Wait for every rank (no-op without a group)."""
    if is_initialized():
        t = torch.zeros(1, device=collective_device())
        _run("barrier", lambda: dist.all_reduce(t))


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (one collective per tensor)."""
    if not is_initialized():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            _run("broadcast of the initial weights", lambda t=t: dist.broadcast(t.data, src=0))


def check_identical(tensors: list[Tensor], what: str) -> None:
    """Raise :class:`DistributedError` unless ``tensors`` hold the same values on every rank.

    Compares float64 checksums (sum and sum of absolute values of each tensor, summed; min and max over
    ranks must agree bitwise). Cheap next to a checkpoint write; meant to catch ranks that drifted apart.
    """
    if not is_initialized():
        return
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for t in tensors:
            v = t.detach().to(torch.float64)
            total[0] += v.sum().cpu()
            total[1] += v.abs().sum().cpu()
    both = torch.cat([total, -total]).to(collective_device())
    _run("consistency check", lambda: dist.all_reduce(both, op=dist.ReduceOp.MAX))
    hi, neg_lo = both[:2].cpu(), both[2:].cpu()
    if not torch.equal(hi, -neg_lo):
        raise DistributedError(
            f"rank {rank()}: the ranks hold different {what} (checksums range over "
            f"[{(-neg_lo).tolist()}, {hi.tolist()}]); data-parallel replicas diverged."
        )


def main_first(fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on rank 0 first, then (if it succeeded) on the other ranks; return its result.

    For work with a shared side effect that only one process should do, such as tokenizing the corpus
    into the cache: the other ranks then find the cache filled. If rank 0 fails with a
    :class:`GnoptError`, every rank raises it (with the same message) instead of waiting.
    """
    if not is_initialized():
        return fn()
    group = _control_group
    status: list[Any] = [None]
    result: Any = None
    if is_main():
        try:
            result = fn()
        except GnoptError as exc:
            status[0] = str(exc)
            _run(f"sharing the outcome of {what}",
                 lambda: dist.broadcast_object_list(status, src=0, group=group))
            raise
        except BaseException:
            status[0] = f"rank 0 failed during {what} (see its traceback)."
            with contextlib.suppress(DistributedError):
                _run(f"sharing the outcome of {what}",
                     lambda: dist.broadcast_object_list(status, src=0, group=group))
            raise
        _run(f"sharing the outcome of {what}", lambda: dist.broadcast_object_list(status, src=0, group=group))
    else:
        _run(f"waiting for rank 0's {what}", lambda: dist.broadcast_object_list(status, src=0, group=group))
        if status[0] is not None:
            raise GnoptError(str(status[0]))
        result = fn()
    barrier()
    return result


# ------------------------------------------------------------------------------------------------------
# sharding
# ------------------------------------------------------------------------------------------------------


def check_divisible(micro_batch_size: int) -> None:
    """Raise a clear :class:`GnoptError` unless ``micro_batch_size`` splits evenly over the ranks."""
    k = world_size()
    if micro_batch_size % k != 0:
        raise GnoptError(
            f"micro_batch_size={micro_batch_size} is not divisible by the number of data-parallel "
            f"processes ({k}): each process takes an equal share of every micro-batch; use a "
            f"--micro-batch-size that is a multiple of {k}."
        )


def shard(batch: Batch) -> Batch:
    """This rank's rows of a micro-batch: contiguous slice ``[r·B/K, (r+1)·B/K)`` of ``(x, y)``."""
    k = world_size()
    if k == 1:
        return batch
    x, y = batch
    b = x.shape[0]
    check_divisible(b)
    per = b // k
    lo = rank() * per
    return x[lo:lo + per], y[lo:lo + per]


def shard_batches(batches: Iterator[Batch]) -> Iterator[Batch]:
    """``batches`` with each micro-batch replaced by this rank's shard (the identity for one process)."""
    if world_size() == 1:
        return batches
    return (shard(b) for b in batches)
