"""One optimizer step, as the training loop sees it.

The loop (:mod:`gnopt.train`) knows nothing about optimizers: once per step it hands a :class:`Stepper` an
iterator of micro-batches and logs the dict it returns. A baseline step (:class:`BaselineStepper`) is
gradient accumulation + clipping + ``optimizer.step()``; a Gauss-Newton step (:mod:`gnopt.gn_stepper`) is
an inner loop plus a line search that pulls more micro-batches from the same iterator. Both are built by
:func:`build_stepper`.

Contract (see docs/architecture.md):

* ``step(batches)`` pulls the micro-batches it needs from ``batches`` and returns at least ``loss`` (mean
  training loss over the step's training micro-batches), ``lr``, ``train_tokens`` and ``ls_tokens``
  (tokens consumed by this step for training / for the line search), ``passes`` (forward+backward
  equivalents); extra keys are logged as they are. Values must be plain floats (ints are fine).
* ``state_dict()`` / ``load_state_dict()`` hold everything needed to continue bitwise: only tensors and
  plain Python containers/scalars (checkpoints are loaded with ``weights_only=True``).
* optional ``eval_context()`` -> context manager: evaluation runs inside it (GN swaps in EMA weights).
* ``autocast``: the dtype the model's passes run under (``None``: none), from ``--precision``:
  :func:`build_stepper` converts the precision once and hands it over; evaluation reads it here.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gnopt import distributed
from gnopt.baselines import build_baseline_optimizers, build_schedulers
from gnopt.config import BASELINE_OPTIMIZERS, GN_OPTIMIZERS, TrainConfig
from gnopt.errors import GnoptError
from gnopt.precision import autocast_dtype

Batch = tuple[Tensor, Tensor]


@runtime_checkable
class Stepper(Protocol):
    """What the training loop calls once per optimizer step."""

    autocast: torch.dtype | None

    def step(self, batches: Iterator[Batch]) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy (nats/token) of ``logits[B, T, V]`` against ``targets[B, T]``.

    Computed in float32 at least, so a low-precision model does not round the loss it is trained on.
    """
    logits = logits.reshape(-1, logits.shape[-1])
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, targets.reshape(-1))


def forward(model: nn.Module, x: Tensor, autocast: torch.dtype | None = None) -> Tensor:
    """``model(x)``, under ``torch.autocast(autocast)`` when given (mixed precision; weights unchanged)."""
    ctx = torch.autocast(x.device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with ctx:
        return model(x)


def accumulate_gradients(
    model: nn.Module, batches: Iterator[Batch], n_micro: int, *, autocast: torch.dtype | None = None
) -> Tensor:
    """Forward/backward ``n_micro`` micro-batches, accumulating the gradient of their *mean* loss.

    Each micro-batch loss is a token mean and all micro-batches have the same number of tokens, so scaling
    each by ``1/n_micro`` makes the accumulated gradient equal the gradient of the loss over the whole
    batch (one big batch, up to float summation order). Returns the mean loss (a detached 0-d tensor, so
    the caller syncs with the device once, not per micro-batch). With ``autocast`` the forward runs under
    autocast (the backward follows its dtypes); the loss is computed in float32 (:func:`lm_loss`).
    """
    total: Tensor | None = None
    scale = 1.0 / n_micro
    for _ in range(n_micro):
        try:
            x, y = next(batches)
        except StopIteration:
            raise GnoptError("the batch iterator ran dry in the middle of a step.") from None
        loss = lm_loss(forward(model, x, autocast), y)
        (loss * scale).backward()
        value = loss.detach().to(torch.float64)
        total = value if total is None else total + value
    if total is None:
        raise GnoptError("internal: accumulate_gradients needs n_micro >= 1.")
    return total / n_micro


class BaselineStepper:
    """Gradient accumulation over ``n_micro`` micro-batches, global-norm clipping, then the optimizers.

    A step whose gradient norm is not finite is skipped when ``skip_nonfinite`` (the default): gradients
    are dropped, the weights and optimizer states are untouched, and the step is logged with
    ``skipped = 1``. The learning-rate schedule still advances, so the run keeps its length in steps.

    Under data parallelism (:mod:`gnopt.distributed`) the batches are this process's shards; gradients
    and loss are averaged over the processes before clipping, so the norm, the skip decision and the
    update are the same on every process.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, autocast: torch.dtype | None = None) -> None:
        self.model = model
        # --compile: the training forward goes through torch.compile; ``model`` itself (its parameters and
        # state dict, evaluation) stays the eager module, so checkpoints do not depend on the flag.
        self.forward_model: nn.Module = torch.compile(model) if cfg.compile else model  # type: ignore[assignment]
        self.n_micro = cfg.n_micro
        self.micro_tokens = cfg.micro_batch_tokens
        self.grad_clip = cfg.grad_clip
        self.skip_nonfinite = cfg.skip_nonfinite
        self.autocast = autocast  # the config's precision as a dtype (build_stepper converts it)
        labelled = build_baseline_optimizers(cfg, model)
        self.labels = [label for label, _ in labelled]
        self.optimizers = [opt for _, opt in labelled]
        self.schedulers = build_schedulers(self.optimizers, cfg)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def _current_lrs(self) -> dict[str, float]:
        """The lr of each optimizer's first group: ``lr`` for the main one, ``<label>_lr`` for the others."""
        lrs: dict[str, float] = {}
        for i, (label, opt) in enumerate(zip(self.labels, self.optimizers, strict=True)):
            key = "lr" if i == 0 else f"{'adam' if label == 'adamw' else label}_lr"
            lrs[key] = float(opt.param_groups[0]["lr"])
        return lrs

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def _mean_over_processes(self, loss: Tensor) -> Tensor:
        """Data parallelism: average the accumulated gradients (one collective per dtype) and the loss.

        Each process accumulated the gradient of its shard's token-mean loss; shards are equal-size, so
        the mean over processes is the gradient of the global batch. A parameter without a gradient on
        this process gets a zero one, so every process contributes the same buffer layout.
        """
        if distributed.world_size() == 1:
            return loss
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        with torch.no_grad():
            for params in by_dtype.values():
                flat = distributed.all_reduce_mean(torch.cat([p.grad.reshape(-1) for p in params]))
                offset = 0
                for p in params:
                    n = p.grad.numel()
                    p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                    offset += n
        return distributed.all_reduce_mean(loss.reshape(1)).reshape(())

    def step(self, batches: Iterator[Batch]) -> dict[str, float]:
        self.model.train()
        self.zero_grad()
        loss_t = accumulate_gradients(self.forward_model, batches, self.n_micro, autocast=self.autocast)
        loss = float(self._mean_over_processes(loss_t))
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads)
        norm = float(grad_norm)
        lrs = self._current_lrs()  # the rates this step uses (the schedulers move them afterwards)
        skipped = not math.isfinite(norm) and self.skip_nonfinite
        if skipped:
            self.zero_grad()
        else:
            if self.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.grad_clip, grad_norm)
            for opt in self.optimizers:
                opt.step()
        with warnings.catch_warnings():
            # A skipped first step makes torch warn "lr_scheduler.step() before optimizer.step()"; advancing
            # the schedule anyway is intended (see the class docstring).
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            for sched in self.schedulers:
                sched.step()
        return {
            "loss": loss,
            **lrs,
            "grad_norm": norm,
            "train_tokens": self.n_micro * self.micro_tokens,
            "ls_tokens": 0,
            "passes": self.n_micro,
            "skipped": int(skipped),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "labels": list(self.labels),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "schedulers": [sched.state_dict() for sched in self.schedulers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("labels") != self.labels:
            raise GnoptError(
                f"checkpoint optimizer state is for {state.get('labels')}, this run builds {self.labels}."
            )
        for opt, sd in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(sd)
        for sched, sd in zip(self.schedulers, state["schedulers"], strict=True):
            sched.load_state_dict(sd)


def build_stepper(cfg: TrainConfig, model: nn.Module) -> Stepper:
    """The stepper for ``cfg.optimizer`` (a resolved config) on ``model`` (already on its device)."""
    autocast = autocast_dtype(cfg.precision)  # the one place a run's precision becomes a dtype
    if cfg.optimizer in BASELINE_OPTIMIZERS:
        return BaselineStepper(cfg, model, autocast)
    if cfg.optimizer in GN_OPTIMIZERS:
        try:
            from gnopt.gn_stepper import build_gn_stepper
        except ModuleNotFoundError as exc:
            if exc.name != "gnopt.gn_stepper":
                raise
            raise GnoptError(
                f"optimizer {cfg.optimizer!r} is not available in this build (gnopt.gn_stepper is missing); "
                f"available now: {', '.join(BASELINE_OPTIMIZERS)}."
            ) from None
        return build_gn_stepper(cfg, model, autocast)
    valid = ", ".join(BASELINE_OPTIMIZERS + GN_OPTIMIZERS)
    raise GnoptError(f"unknown optimizer {cfg.optimizer!r}; valid optimizers: {valid}.")
