"""The training loop: data, model, one :class:`~gnopt.steppers.Stepper`, evaluation, logs, checkpoints.

What a run leaves in its output directory:

* ``config.json`` — the resolved config and its fingerprint (written when the run starts);
* ``metrics.jsonl`` — one line per optimizer step (``step``, cumulative ``tokens``, ``loss``, ``lr``,
  ``grad_norm``, cumulative ``wall`` seconds, ``step_seconds``, then every key the stepper returned, e.g.
  the per-step ``train_tokens``/``ls_tokens``/``passes``) and one ``{"type": "eval", "step", "tokens",
  "val_loss"}`` line per evaluation (step 0, every ``eval_every`` steps and the last step);
* ``checkpoint.pt`` — every ``ckpt_every`` steps and at the end (see :func:`_checkpoint_state`);
* ``summary.json`` — written at the end (or at ``stop_after``, at the first evaluation <= ``stop_at_loss``
  or at a stop signal, with ``"completed": false`` and the ``stop_reason``). A run stopped at
  ``stop_at_loss`` resumes like any other: with a lower ``stop_at_loss`` (or none) it trains on, exactly as
  if it had never stopped (``gnopt study`` uses this to stop runs at the target and continue them if the
  target moves).

Resuming is exact: the checkpoint carries the model, the stepper (optimizer + schedule) state, the batcher
position, the step/token counters, every RNG state and the target-hit record, so on CPU a resumed run logs
bitwise the same losses as an uninterrupted one. ``metrics.jsonl`` is cut back to the checkpoint's step on
resume so no step is logged twice.

The loop only knows the Stepper contract (see :mod:`gnopt.steppers`); evaluation runs under the stepper's
``eval_context()`` when it has one (GN evaluates its EMA weights there).

Data parallelism (``torchrun --nproc_per_node K -m gnopt train ...``, see :mod:`gnopt.distributed`): every
process draws the same global micro-batches and keeps its shard of each; the steppers average gradients and
losses over the processes, evaluation is split over them, and only rank 0 writes files or prints. At each
checkpoint the ranks check that they hold the same model and optimizer state.

The file names and the ``metrics.jsonl`` reader live in :mod:`gnopt.run_folder`. One run, in order
(:func:`_train`): claim the folder (:func:`inspect_out_dir`, the lock), build (:func:`_build`), resume
(:func:`_restore`) or start (:func:`_start_folder`), the step loop (:class:`_Loop`), the summary
(:func:`_summary`).

Faults: SIGTERM / SIGINT / SIGHUP ask the loop to stop after the current step, write a checkpoint and
return (exit 0; a second signal interrupts at once; :mod:`gnopt.stopping`). One process writes a run
folder at a time: it holds the folder's lock (:mod:`gnopt.lock`) while it runs, and a second one is
refused with an error naming it. A step that a non-finite value spoils is skipped (baselines) or rejected
(GN line search), logged, and training goes on. A ``kill -9`` at any moment leaves the last complete
checkpoint (writes are atomic), from which ``--resume`` continues bitwise.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gnopt import distributed
from gnopt.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    read_json,
    remove_stale_temp_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gnopt.config import (
    TrainConfig,
    fingerprint,
    fingerprint_diff,
    fingerprint_fields,
    resolve_in_folder,
)
from gnopt.errors import GnoptError
from gnopt.lock import FolderLock
from gnopt.precision import check_supported, matmul_precision
from gnopt.run_folder import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    METRICS_NAME,
    RUN_FILES,
    STOP_AT_LOSS_REASON,
    SUMMARY_NAME,
    iter_metrics,
)
from gnopt.steppers import Stepper, build_stepper, forward, lm_loss
from gnopt.stopping import STOP_SIGNALS as STOP_SIGNALS  # re-exported: the stop lives in gnopt.stopping
from gnopt.stopping import GracefulStop

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------------
# data, device, seeds
# ------------------------------------------------------------------------------------------------------


def load_data(cfg: TrainConfig) -> Any:
    """Tokenize (or load from the cache) the corpus of a resolved config; returns ``PreparedData``."""
    from gnopt.data import prepare

    assert cfg.tokenizer is not None
    return prepare(
        cfg.data, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size or 0, cache_dir=cfg.cache_dir,
        valid_data=cfg.valid_data, max_tokens=cfg.max_tokens,
    )


def check_data_size(cfg: TrainConfig, n_train: int, n_valid: int, description: str) -> None:
    """Refuse a corpus that cannot fill one optimizer step (without repeating a window) or one
    validation window."""
    assert cfg.seq_len is not None
    window = cfg.seq_len + 1
    need = cfg.n_micro * cfg.micro_batch_size * window
    if n_train < need:
        raise GnoptError(
            f"the corpus is too small for one batch: {description} has {n_train} training tokens, one step "
            f"of batch_tokens={cfg.batch_tokens} needs {cfg.n_micro} × {cfg.micro_batch_size} windows of "
            f"{window} tokens = {need}; use more data or a smaller --batch-tokens / --seq-len."
        )
    if n_valid < window:
        raise GnoptError(
            f"the validation text is too small: {description} has {n_valid} validation tokens, one "
            f"evaluation window needs {window}; use more validation data or a smaller --seq-len."
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GnoptError("--device cuda was requested but no CUDA device is available.")
    return torch.device(name)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: list[tuple[Tensor, Tensor]], *, autocast: torch.dtype | None = None
) -> float:
    """Token-mean cross-entropy over the fixed validation batches (all of equal size).

    ``autocast``: run the model under ``torch.autocast`` with that dtype (the loss stays float32).

    Under data parallelism each process evaluates its shard of every batch (or, for a batch whose rows do
    not split evenly, every K-th whole batch) and the sums are added over the processes, so every process
    returns the same value.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    k, r = distributed.world_size(), distributed.rank()
    for i, (x, y) in enumerate(batches):
        if k > 1:
            if x.shape[0] % k == 0:
                x, y = distributed.shard((x, y))
            elif i % k != r:
                continue
        loss = lm_loss(forward(model, x, autocast), y)
        total += loss.double().cpu() * y.numel()
        count += y.numel()
    model.train(was_training)
    if k > 1:
        sums = torch.stack([total, torch.tensor(float(count), dtype=torch.float64)])
        sums = distributed.all_reduce_sum(sums.to(distributed.collective_device())).cpu()
        total, count = sums[0], int(sums[1])
    return float(total / count)


def _eval_context(stepper: Stepper) -> contextlib.AbstractContextManager[Any]:
    ctx = getattr(stepper, "eval_context", None)
    return ctx() if callable(ctx) else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------------
# output directory
# ------------------------------------------------------------------------------------------------------


def inspect_out_dir(out: Path, cfg: TrainConfig, *, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Decide, *before any work*, whether this run may use ``out``; return the checkpoint to resume from.

    Refuses (GnoptError) a directory that holds another run, or this same run without ``--resume``
    (unless ``--overwrite``), and a resume from a missing or incompatible checkpoint (naming the fields
    that differ). Nothing is written here.
    """
    if resume and overwrite:
        raise GnoptError("--resume and --overwrite contradict each other; pass only one.")
    if out.exists() and not out.is_dir():
        raise GnoptError(f"output path {out} exists and is not a directory.")
    if resume:
        ckpt_path = out / CHECKPOINT_NAME
        if not ckpt_path.is_file():
            if (out / CONFIG_NAME).exists():
                raise GnoptError(
                    f"--resume: the run in {out} stopped before its first checkpoint, so there is nothing to "
                    "resume; start it over with --overwrite."
                )
            raise GnoptError(
                f"--resume: there is no checkpoint in {out} to resume from; run without --resume to start."
            )
        state = load_checkpoint(ckpt_path)
        diff = fingerprint_diff(state.get("config", {}), fingerprint_fields(cfg))
        if diff:
            raise GnoptError(
                f"cannot resume: the checkpoint in {out} belongs to a different configuration "
                f"({'; '.join(diff)}); rerun with the checkpoint's settings, or use another --out."
            )
        return state
    present = [name for name in RUN_FILES if (out / name).exists()]
    if present and not overwrite:
        old = read_json(out / CONFIG_NAME)
        old_cfg = old.get("config") if isinstance(old, dict) else None
        if isinstance(old_cfg, dict):
            diff = fingerprint_diff(old_cfg, fingerprint_fields(cfg))
            if not diff:
                if not (out / CHECKPOINT_NAME).exists():
                    raise GnoptError(
                        f"{out} holds the start of this run but no checkpoint to resume from; start it over "
                        "with --overwrite."
                    )
                raise GnoptError(
                    f"{out} already holds this run; continue it with --resume, or start it over with "
                    "--overwrite."
                )
            raise GnoptError(
                f"{out} holds a different run ({'; '.join(diff)}); choose another --out, or pass "
                "--overwrite to replace it."
            )
        raise GnoptError(
            f"{out} already holds run files ({', '.join(present)}); choose another --out, or pass "
            "--overwrite to replace them."
        )
    return None


def load_init_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load the model weights of a gnopt checkpoint (``init_from``) into ``model``, in place.

    ``path`` is a ``checkpoint.pt`` or a run folder holding one. Only the weights are taken: optimizer and
    schedule state, counters and RNG states of that checkpoint are ignored. Raises :class:`GnoptError`
    when the file is missing or its weights do not fit the model (naming the first mismatch).
    """
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise GnoptError(f"init_from: there is no checkpoint at {p}.")
    state = load_checkpoint(p).get("model")
    if not isinstance(state, dict):
        raise GnoptError(f"init_from: {p} holds no model weights.")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise GnoptError(f"init_from: the weights in {p} do not fit this model ({what}); same preset?")
    for name, value in own.items():
        if tuple(state[name].shape) != tuple(value.shape):
            raise GnoptError(
                f"init_from: the weights in {p} do not fit this model ({name} has shape "
                f"{tuple(state[name].shape)}, the model {tuple(value.shape)}); same preset, vocabulary "
                "and tokenizer?"
            )
    model.load_state_dict(state)


def _truncate_metrics(out: Path, step: int) -> None:
    """Keep only the metrics lines of steps <= ``step`` (drops a torn last line too)."""
    if not (out / METRICS_NAME).exists():
        return
    kept = [line for line, rec in iter_metrics(out) if rec["step"] <= step]
    atomic_write_text(out / METRICS_NAME, "".join(k + "\n" for k in kept))


def _jsonable(value: Any) -> Any:
    """Plain JSON values for metrics: tensors -> numbers, non-finite floats -> null."""
    if isinstance(value, Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


# ------------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------------


class _Run:
    """Mutable counters of a run (what goes into checkpoints and the summary)."""

    def __init__(self) -> None:
        self.step = 0
        self.train_tokens = 0
        self.ls_tokens = 0
        self.passes: int | float = 0
        self.skipped_steps = 0
        self.rejected_steps = 0  # GN outer steps whose line search found no finite loss
        self.nonfinite_inner_steps = 0  # GN inner steps skipped for a non-finite gradient
        self.wall_before = 0.0  # seconds spent in earlier invocations of a resumed run
        self.steps_to_target: int | None = None
        self.tokens_to_target: int | None = None
        self.initial_val_loss: float | None = None
        self.last_val_loss: float | None = None
        self.last_val_step: int | None = None
        self.best_val_loss: float | None = None

    @property
    def tokens(self) -> int:
        return self.train_tokens + self.ls_tokens

    def counters(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items()}

    def load(self, counters: dict[str, Any]) -> None:
        for key, value in counters.items():
            if hasattr(self, key):
                setattr(self, key, value)


def _checkpoint_state(cfg: TrainConfig, model: nn.Module, stepper: Stepper, batcher: Any, run: _Run,
                      wall: float, vocab_size: int) -> dict[str, Any]:
    counters = run.counters()
    counters["wall_before"] = wall
    return {
        "config": fingerprint_fields(cfg),
        "fingerprint": fingerprint(cfg),
        "vocab_size": int(vocab_size),
        "model": model.state_dict(),
        "stepper": stepper.state_dict(),
        "batcher": batcher.state_dict(),
        "counters": counters,
        "rng": rng_state(),
    }


def _state_tensors(obj: Any) -> list[Tensor]:
    """Every tensor inside nested dicts / lists / tuples (for the cross-rank consistency check)."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _state_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _state_tensors(v)]
    return []


def resume_command(out: Path) -> str:
    """The command that continues this run: this process's ``gnopt train`` arguments plus ``--resume``.

    ``--overwrite`` and ``--stop-after`` are dropped; under torchrun the command is prefixed with it.
    When the process was not started from the command line (e.g. ``train()`` called from Python), a
    generic hint naming the output directory is returned.
    """
    argv = sys.argv[1:]
    if argv[:1] != ["train"]:
        return f"the same `gnopt train` command with --resume (--out {shlex.quote(str(out))})"
    args: list[str] = []
    skip = False
    for a in argv[1:]:
        if skip:
            skip = False
            continue
        if a in ("--resume", "--overwrite") or a.startswith("--stop-after="):
            continue
        if a == "--stop-after":
            skip = True
            continue
        args.append(a)
    cmd = shlex.join(["gnopt", "train", *args, "--resume"])
    k = distributed.world_size()
    if k > 1:
        local = distributed.env_local_world_size()
        launch = f"torchrun --nproc_per_node {k}" if local == k else "torchrun <the same options>"
        cmd = f"{launch} -m {cmd}"
    return cmd


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
          stop: GracefulStop | None = None) -> dict[str, Any]:
    """Run (or resume) training as configured; returns the summary dict (also in ``summary.json``).

    Every check that can fail on user input (config values, output directory, checkpoint compatibility,
    corpus) runs before anything in the output directory is created, deleted or changed. The writing
    process holds the run folder's :class:`~gnopt.lock.FolderLock` from before it inspects the folder until
    it returns, so a second process that wants to write the same folder is refused.

    ``stop``: a :class:`GracefulStop` owned by the caller (``gnopt study``), which then also reports the
    stop and says how to continue; by default the run handles the signals itself and prints the
    ``stopped at step N ...; resume with: ...`` line.

    Started by torchrun (``WORLD_SIZE`` > 1 in the environment), the process joins the data-parallel group
    for the duration of the run (see :mod:`gnopt.distributed`); if a group already exists it is used as is.
    """
    cfg = resolve_in_folder(cfg, overwrite=overwrite)
    device = distributed.device_for(resolve_device(cfg.device))
    check_supported(cfg.precision, device)
    with (distributed.session(cfg.dist_timeout, device), matmul_precision(cfg.precision, device),
          contextlib.ExitStack() as held):
        return _train(cfg, device, resume=resume, overwrite=overwrite, stop=stop, held=held)


def _train(cfg: TrainConfig, device: torch.device, *, resume: bool, overwrite: bool,
           stop: GracefulStop | None, held: contextlib.ExitStack) -> dict[str, Any]:
    """The run, in order: claim the folder, build, resume or start, the step loop, the summary."""
    assert cfg.out is not None and cfg.seq_len is not None
    out = Path(cfg.out)
    main = distributed.is_main()
    distributed.check_divisible(cfg.micro_batch_size)
    if not main:
        logging.getLogger("gnopt").setLevel(logging.WARNING)  # rank 0 reports progress
    # One writer per run folder: rank 0 (the only writer) locks it before looking inside, so what it reads
    # cannot change under it. A folder that does not exist yet is locked once created (_start_folder).
    lock = FolderLock(out, "the run folder") if main else None
    if lock is not None and out.is_dir():
        held.enter_context(lock)
    ckpt = inspect_out_dir(out, cfg, resume=resume, overwrite=overwrite)
    if ckpt is not None and int(ckpt["counters"]["step"]) >= cfg.steps:
        summary = read_json(out / SUMMARY_NAME)
        if isinstance(summary, dict):
            if main:
                log.warning("the run in %s is already complete (%d steps); nothing to do.", out, cfg.steps)
            return summary
        # Killed between its last checkpoint and its summary: load it below and write the summary.

    parts = _build(cfg, device, resumed=ckpt is not None)
    run = _Run()
    if ckpt is not None:
        _restore(cfg, parts, ckpt, run, out, main)
    elif main:
        _start_folder(cfg, out, lock, held, overwrite=overwrite)
    del ckpt
    loop = _Loop(cfg, parts, run, out, main)
    stopped_early, stop_reason = loop.run_steps(stop)
    summary = _summary(cfg, parts, run, out, completed=not stopped_early, stop_reason=stop_reason,
                       wall_seconds=loop.wall())
    if main:
        atomic_write_text(out / SUMMARY_NAME, json.dumps(_jsonable(summary), indent=2) + "\n")
    return summary


@dataclass
class _Parts:
    """What a run is built from: threads, data, model, stepper, batcher and validation batches."""

    device: torch.device
    threads: int
    prepared: Any
    vocab_size: int
    model: nn.Module
    n_params: int
    stepper: Stepper
    batcher: Any
    val_batches: list[tuple[Tensor, Tensor]]


def _build(cfg: TrainConfig, device: torch.device, *, resumed: bool) -> _Parts:
    """Threads, seeds, the corpus (rank 0 first), the model (``init_from`` weights), the stepper and the
    batches: every rank builds the same."""
    from gnopt.data import TokenBatcher, eval_batches
    from gnopt.model import build_model

    assert cfg.seq_len is not None
    threads = cfg.threads or max(1, available_cores() // max(1, distributed.env_local_world_size()))
    torch.set_num_threads(threads)
    seed_everything(cfg.seed)

    # Rank 0 tokenizes (or loads) the corpus first; the other ranks then find it in the cache.
    prepared = distributed.main_first(lambda: load_data(cfg), "data preparation")
    check_data_size(cfg, len(prepared.train), len(prepared.valid), prepared.description)
    vocab_size = int(prepared.vocab_size)

    model = build_model(cfg.preset, vocab_size=vocab_size, seq_len=cfg.seq_len).to(device)
    if cfg.init_from is not None and not resumed:  # a resumed run takes its weights from its checkpoint
        load_init_weights(model, cfg.init_from)
    distributed.broadcast_module(model)  # identical initial θ everywhere, before any optimizer copies it
    n_params = sum(p.numel() for p in model.parameters())
    stepper = build_stepper(cfg, model)
    batcher = TokenBatcher(prepared.train, cfg.seq_len, cfg.micro_batch_size, seed=cfg.seed, device=device)
    val_batches = eval_batches(prepared.valid, cfg.seq_len, cfg.micro_batch_size, max_tokens=cfg.eval_tokens,
                               device=device)
    return _Parts(device, threads, prepared, vocab_size, model, n_params, stepper, batcher, val_batches)


def _restore(cfg: TrainConfig, parts: _Parts, ckpt: dict[str, Any], run: _Run, out: Path, main: bool) -> None:
    """Continue from the checkpoint: model, stepper, batcher, counters, RNG states; cut metrics.jsonl back."""
    if int(ckpt.get("vocab_size", -1)) != parts.vocab_size:
        raise GnoptError(
            f"cannot resume: the checkpoint's vocabulary has {ckpt.get('vocab_size')} tokens, the "
            f"prepared data {parts.vocab_size}; the corpus or tokenizer changed."
        )
    try:
        parts.model.load_state_dict(ckpt["model"])
        parts.stepper.load_state_dict(ckpt["stepper"])
        parts.batcher.load_state_dict(ckpt["batcher"])
    except (KeyError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GnoptError(
            f"cannot resume from {out / CHECKPOINT_NAME}: its state does not fit ({first})."
        ) from None
    run.load(ckpt["counters"])
    set_rng_state(ckpt["rng"])
    if main:
        _truncate_metrics(out, run.step)
        remove_stale_temp_files(out / CHECKPOINT_NAME)  # left by a process killed mid-write


def _start_folder(cfg: TrainConfig, out: Path, lock: FolderLock | None, held: contextlib.ExitStack, *,
                  overwrite: bool) -> None:
    """A new run (rank 0): create and lock the folder, clear an overwritten run's files, write config.json."""
    # Past every check (and every rank has inspected --out): the output directory is ours to (re)write.
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GnoptError(f"cannot create the output directory {out}: {exc.strerror}.") from None
    if lock is not None and not lock.held:
        held.enter_context(lock)
        inspect_out_dir(out, cfg, resume=False, overwrite=overwrite)  # did another run start here since?
    if overwrite:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        remove_stale_temp_files(out / CHECKPOINT_NAME)
    atomic_write_text(
        out / CONFIG_NAME,
        json.dumps({"fingerprint": fingerprint(cfg), "config": cfg.to_dict()}, indent=2) + "\n",
    )


class _Loop:
    """The step loop of one invocation: steps, metrics lines, evaluations, checkpoints, stops."""

    def __init__(self, cfg: TrainConfig, parts: _Parts, run: _Run, out: Path, main: bool) -> None:
        from tqdm.auto import tqdm

        self.cfg, self.parts, self.run, self.out, self.main = cfg, parts, run, out, main
        self.world = distributed.world_size()
        self.quiet = cfg.quiet or not main
        self.bar = tqdm(total=cfg.steps, initial=run.step, unit="step", file=sys.stderr, dynamic_ncols=True,
                        disable=self.quiet or not sys.stderr.isatty())
        self.t_start = time.perf_counter()
        self.metrics = (out / METRICS_NAME).open("a", encoding="utf-8") if main else None

    def say(self, msg: str) -> None:
        if not self.quiet:
            with contextlib.suppress(OSError):  # the terminal hung up (SIGHUP): the run goes on
                self.bar.write(msg, file=sys.stdout)

    def wall(self) -> float:
        return self.run.wall_before + (time.perf_counter() - self.t_start)

    def write_line(self, rec: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(_jsonable(rec)) + "\n")
            self.metrics.flush()

    def evaluate(self) -> float:
        cfg, run = self.cfg, self.run
        with _eval_context(self.parts.stepper):
            val = evaluate(self.parts.model, self.parts.val_batches, autocast=self.parts.stepper.autocast)
        self.write_line({"type": "eval", "step": run.step, "tokens": run.tokens, "val_loss": val})
        if run.initial_val_loss is None:
            run.initial_val_loss = val
        run.last_val_loss, run.last_val_step = val, run.step
        if math.isfinite(val) and (run.best_val_loss is None or val < run.best_val_loss):
            run.best_val_loss = val
        hit = ""
        if cfg.target_loss is not None and run.steps_to_target is None and val <= cfg.target_loss:
            run.steps_to_target, run.tokens_to_target = run.step, run.tokens
            hit = f" (target {cfg.target_loss} reached)"
        self.say(f"step {run.step:>6}/{cfg.steps} | tokens {run.tokens:>12,} | val_loss {val:.4f}{hit}")
        return val

    def save(self) -> None:
        p = self.parts
        state = _checkpoint_state(self.cfg, p.model, p.stepper, p.batcher, self.run, self.wall(),
                                  p.vocab_size)
        if self.world > 1:
            distributed.check_identical(_state_tensors([state["model"], state["stepper"]]),
                                        "model and optimizer states")
        if self.metrics is not None:
            self.metrics.flush()
            os.fsync(self.metrics.fileno())  # every logged step of the checkpoint is on disk before it
            save_checkpoint(self.out / CHECKPOINT_NAME, state)

    def run_steps(self, stop: GracefulStop | None) -> tuple[bool, str | None]:
        """Train to ``steps`` or to a stop; returns (stopped early, the stop reason)."""
        cfg, p = self.cfg, self.parts
        dp = f" | {self.world} data-parallel processes" if self.world > 1 else ""
        self.say(f"model {cfg.preset}: {p.n_params:,} parameters | data: {p.prepared.description} | device "
                 f"{p.device}, {p.threads} thread{'s' if p.threads != 1 else ''}{dp} | {cfg.n_micro} "
                 f"micro-batches of {cfg.micro_batch_size}x{cfg.seq_len} per step")
        batches: Iterator[tuple[Tensor, Tensor]] = distributed.shard_batches(iter(p.batcher))
        own_stop = stop is None
        if stop is None:
            stop = GracefulStop(announce=self.main)
        try:
            with stop.installed():
                if self.run.step == 0:
                    self.evaluate()
                while self.run.step < cfg.steps:
                    self._step(batches)
                    reason = self._after_step(stop, own_stop)
                    if reason is not None:
                        return True, reason
        finally:
            self.bar.close()
            if self.metrics is not None:
                self.metrics.close()
        return False, None

    def _step(self, batches: Iterator[tuple[Tensor, Tensor]]) -> None:
        """One optimizer step, its counters and its metrics line."""
        run = self.run
        t0 = time.perf_counter()
        rec = self.parts.stepper.step(batches)
        run.step += 1
        run.train_tokens += int(rec.get("train_tokens", 0))
        run.ls_tokens += int(rec.get("ls_tokens", 0))
        run.passes += rec.get("passes", 0)  # GN counts fractional passes: keep floats as floats
        if rec.get("skipped"):
            run.skipped_steps += 1
            self.say(f"step {run.step}: non-finite gradient norm ({rec.get('grad_norm')}); step skipped.")
        if rec.get("inner_nonfinite"):
            run.nonfinite_inner_steps += int(rec["inner_nonfinite"])
            self.say(f"step {run.step}: {rec['inner_nonfinite']} inner step(s) met non-finite values and "
                     "were skipped.")
        if rec.get("rejected"):
            run.rejected_steps += 1
            self.say(f"step {run.step}: no finite line-search loss; outer step rejected (weights unchanged).")
        line: dict[str, Any] = {
            "step": run.step,
            "tokens": run.tokens,
            "loss": rec.get("loss"),
            "lr": rec.get("lr"),
            "grad_norm": rec.get("grad_norm"),
            "wall": self.wall(),
            "step_seconds": time.perf_counter() - t0,
        }
        line.update({k: v for k, v in rec.items() if k not in line})
        self.write_line(line)
        loss = rec.get("loss")
        self.bar.set_postfix(loss=f"{loss:.4f}" if isinstance(loss, float) else loss,
                             val=f"{run.last_val_loss:.4f}" if run.last_val_loss is not None else "-",
                             refresh=False)
        self.bar.update(1)

    def _after_step(self, stop: GracefulStop, own_stop: bool) -> str | None:
        """Evaluate and checkpoint when due; the reason to stop now, if any (checkpoint written)."""
        cfg, run = self.cfg, self.run
        last = run.step == cfg.steps
        if last or (cfg.eval_every and run.step % cfg.eval_every == 0):
            self.evaluate()
        signalled = distributed.any_rank(stop.requested) and not last  # every rank agrees
        stop_after = cfg.stop_after is not None and run.step >= cfg.stop_after and not last
        # every rank evaluates the same weights on the same set: they agree without a collective
        at_loss = (cfg.stop_at_loss is not None and not last and run.last_val_step == run.step
                   and run.last_val_loss is not None and run.last_val_loss <= cfg.stop_at_loss)
        stop_now = signalled or stop_after or at_loss
        if last or stop_now or (cfg.ckpt_every and run.step % cfg.ckpt_every == 0):
            self.save()
        if not stop_now:
            return None
        if signalled:
            reason = stop.reason or "a signal to another rank"
            if self.main and own_stop:
                self.bar.clear()
                with contextlib.suppress(OSError):
                    print(f"stopped at step {run.step} ({reason}); checkpoint written; "
                          f"resume with: {resume_command(self.out)}", flush=True)
            return reason
        if stop_after:
            self.say(f"stopping after step {run.step} (--stop-after); continue with --resume.")
            return "--stop-after"
        self.say(f"stopping after step {run.step}: validation loss {run.last_val_loss:.4f} <= "
                 f"{cfg.stop_at_loss} (--stop-at-loss); continue with --resume and a lower "
                 "--stop-at-loss, or none.")
        return STOP_AT_LOSS_REASON


def _summary(cfg: TrainConfig, parts: _Parts, run: _Run, out: Path, *, completed: bool,
             stop_reason: str | None, wall_seconds: float) -> dict[str, Any]:
    """``summary.json``: what the run did, its losses and target crossing, and where it ran."""
    import gnopt
    from gnopt.data import data_statistics

    data_info = {k: _jsonable(v) for k, v in data_statistics(parts.prepared).items()}
    data_info["cache_hit"] = bool(parts.prepared.cache_hit)
    return {
        "optimizer": cfg.optimizer,
        "preset": cfg.preset,
        "batch_tokens": cfg.batch_tokens,
        "micro_batch_size": cfg.micro_batch_size,
        "n_micro": cfg.n_micro,
        "seq_len": cfg.seq_len,
        "completed": completed,
        "stop_reason": stop_reason,
        "stop_at_loss": cfg.stop_at_loss,
        "steps": run.step,
        "steps_planned": cfg.steps,
        "tokens": run.tokens,
        "train_tokens": run.train_tokens,
        "ls_tokens": run.ls_tokens,
        "passes": run.passes,
        "skipped_steps": run.skipped_steps,
        "rejected_steps": run.rejected_steps,
        "nonfinite_inner_steps": run.nonfinite_inner_steps,
        "initial_val_loss": run.initial_val_loss,
        "final_val_loss": run.last_val_loss,
        "final_val_step": run.last_val_step,
        "best_val_loss": run.best_val_loss,
        "target_loss": cfg.target_loss,
        "steps_to_target": run.steps_to_target,
        "tokens_to_target": run.tokens_to_target,
        "eval_every": cfg.eval_every,
        "eval_tokens": sum(int(y.numel()) for _, y in parts.val_batches),
        "wall_seconds": wall_seconds,
        "n_params": parts.n_params,
        "vocab_size": parts.vocab_size,
        "device": str(parts.device),
        "threads": parts.threads,
        "world_size": distributed.world_size(),
        "torch_version": torch.__version__,
        "gnopt_version": gnopt.__version__,
        "out": str(out),
        "fingerprint": fingerprint(cfg),
        "config": cfg.to_dict(),
        "data": data_info,
    }
