"""The Gauss-Newton stepper of the training harness: ``TrainConfig`` → :class:`gnopt.optim.GaussNewton`.

This is recipe code: it maps flat config fields onto the library's pieces and flattens each
:class:`~gnopt.optim.GNStepRecord` into the scalars that ``metrics.jsonl`` logs. GN's batch is
N = batch_tokens / micro-batch tokens micro-batches for the inner loop, and ``ls_batches`` more for the
line search (counted separately as ``ls_tokens``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from gnopt import distributed
from gnopt.config import TrainConfig
from gnopt.errors import GnoptError
from gnopt.optim import (
    CG,
    GaussNewton,
    InnerOptimizer,
    InnerSchedule,
    LineSearch,
    MuonAdamW,
    SoftmaxCrossEntropy,
    TorchOptimizer,
)

MODE_OF: dict[str, tuple[str, str | None]] = {
    "gn": ("gn", None),
    "gn-prox-linear": ("prox_linear", None),
    "gn-layerwise": ("gn", "transformer"),
}


def build_inner(cfg: TrainConfig) -> InnerOptimizer | CG:
    """The inner solver named by ``cfg.inner_optimizer``; ``lr`` is its main learning rate."""
    assert cfg.lr is not None
    kind = cfg.inner_optimizer
    if kind == "muon":
        assert cfg.muon_ns_precision is not None
        return MuonAdamW(lr=cfg.lr, adam_lr=cfg.adam_lr or cfg.lr, adam_weight_decay=cfg.weight_decay,
                         ns_precision=cfg.muon_ns_precision)
    if kind == "adamw":
        lr, wd = cfg.lr, cfg.weight_decay
        return TorchOptimizer(lambda ps: torch.optim.AdamW(ps, lr=lr, betas=(0.9, 0.999), weight_decay=wd))
    if kind in ("soap", "shampoo"):
        import pytorch_optimizer

        lr, freq = cfg.lr, cfg.soap_precondition_frequency
        if kind == "soap":
            return TorchOptimizer(lambda ps: pytorch_optimizer.SOAP(ps, lr=lr, weight_decay=0.0,
                                                                    precondition_frequency=freq))
        return TorchOptimizer(lambda ps: pytorch_optimizer.Shampoo(ps, lr=lr))
    if kind == "cg":
        return CG(tol=cfg.cg_tol, max_iters=cfg.cg_max_iters)
    raise GnoptError(f"unknown inner optimizer {kind!r}")


def build_gauss_newton(cfg: TrainConfig, model: nn.Module,
                       autocast: torch.dtype | None = None) -> GaussNewton:
    """GaussNewton as ``cfg`` describes it; ``autocast``: the run's precision as a dtype."""
    mode, partition = MODE_OF[cfg.optimizer]
    n = cfg.n_micro
    schedule = InnerSchedule(
        kind=cfg.gn_schedule,
        total_outer_steps=cfg.steps,
        inner_steps=n,
        global_warmup=(cfg.warmup_steps or 0) if cfg.gn_schedule != "constant_with_inner_cosine" else 0,
        min_ratio=cfg.min_lr_ratio,
    )
    line_search = LineSearch(
        kind=cfg.ls_kind,
        ls_range=cfg.ls_range,
        include_zero=cfg.ls_zero,
        source=cfg.ls_source,
        num_batches=cfg.ls_batches,
        reset_below=cfg.reset_below,
        model_decrease=True,
    )
    return GaussNewton(
        model,
        SoftmaxCrossEntropy(),
        inner_steps=n,
        mode=mode,
        inner=build_inner(cfg),
        partition=partition,
        line_search=line_search,
        schedule=schedule,
        warm_start=cfg.warm_start,
        warm_scale=cfg.warm_scale,
        damping=cfg.damping,
        prox=cfg.prox,
        ema_decay=cfg.ema_decay,
        inner_clip=cfg.inner_clip,
        all_reduce_mean=distributed.all_reduce_mean if distributed.world_size() > 1 else None,
        autocast_dtype=autocast,
    )


class GNStepper:
    """One GN outer step per training step; logs the step record's scalars.

    Under data parallelism (:mod:`gnopt.distributed`) the :class:`~gnopt.optim.GaussNewton` averages inner
    gradients, GN-vector products, losses and line-search losses over the processes, so every process
    holds the same θ, inner iterate and inner optimizer state.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, autocast: torch.dtype | None = None) -> None:
        self.cfg = cfg
        self.autocast = autocast
        self.gn = build_gauss_newton(cfg, model, autocast)
        assert cfg.lr is not None
        self.peak_lr = cfg.lr

    def step(self, batches: Iterator[tuple[Tensor, Tensor]]) -> dict[str, Any]:
        rec = self.gn.step(batches)
        out = rec.to_dict()
        # Under data parallelism the record counts this process's shard: report global token counts.
        k = distributed.world_size()
        out["train_tokens"] = rec.train_tokens * k
        out["ls_tokens"] = rec.ls_tokens * k
        out["lr"] = self.peak_lr * (rec.lr_factor if rec.lr_factor is not None else 1.0)
        out["grad_norm"] = rec.inner_grad_norm_first
        out.pop("step", None)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"gn": self.gn.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gn.load_state_dict(state["gn"])

    def eval_context(self) -> AbstractContextManager[None]:
        return self.gn.ema_weights()


def build_gn_stepper(cfg: TrainConfig, model: nn.Module, autocast: torch.dtype | None = None) -> GNStepper:
    return GNStepper(cfg, model, autocast)
