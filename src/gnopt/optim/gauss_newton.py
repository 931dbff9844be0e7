"""Gauss-Newton optimizers: full GN, GN-prox-linear and layerwise GN for any ``nn.Module``.

One outer step t (the paper's Algorithm, as its code runs it; docs/method.md):

    θ_t  ← the model's parameters (the linearization point)
    for each block b of the partition (one block = full GN):
        θ̂_b starts where block b's last inner loop ended (warm start) or at θ_t (reset)
    for i = 1 … N, on a fresh micro-batch B_i:
        for each block b (Jacobi: every block linearized at θ_t, the others frozen):
            Δ = θ̂_b − θ_t,b ;  z₀ = f(θ_t; B_i) ;  u = J_b Δ
            if i = 1 and warm_scale:   Δ ← s Δ with s = argmin over [0, 1] of the model along Δ
                                       (s = −gᵀu / uᵀHu clipped: the carried iterate is never worse than θ_t)
            gn:          grad = J_bᵀ (g_z + H_z u)        (gradient of the GN quadratic model)
            prox_linear: grad = J_bᵀ ∇L(z₀ + u)           (gradient of the loss of the linearized model)
            grad += (λ + μ) Δ ;  clip ;  θ̂_b ← inner_optimizer_b.step(grad)
    d = θ̂ − θ_t
    line search ("grid", the paper's): α* = argmin over α ∈ {(1/√2)^k} of L(θ_t + α d) on N fresh
        micro-batches (finite values only)
    line search ("model"): on K ≤ N fresh micro-batches, one JVP gives L(θ_t), gᵀJd and (Jd)ᵀH(Jd);
        α_q = −gᵀJd / (Jd)ᵀH(Jd) clipped to [α_min, 1]; α_i = the minimizer of the parabola through
        L(θ_t), the slope gᵀJd and L(θ_t + α_q d); α* = the better of α_q, α_i if it lowers the loss,
        else the first halving that does, else 0 (θ̂ restarts)
    θ_{t+1} = θ_t + α* d          (no finite loss at all: θ_{t+1} = θ_t, the step is rejected)

With the :class:`~gnopt.optim.inner.CG` solver the inner loop is replaced by conjugate gradients on
(G + λI) d = −g over N fixed micro-batches (per block for layerwise GN).

This module is that outer step; the pieces are separate modules: the subproblem and its blocks
(:mod:`.problem`), inner solvers behind one interface (:mod:`.inner`: the first-order loop in
:mod:`.inner_loop`, CG in :mod:`.cg`), the line search's pure rules (:mod:`.line_search`) and their
execution (:mod:`.line_search_run`), the step record and pass accounting (:mod:`.record`), damping and the
proximal term (:mod:`.damping`), the data-parallel mean (:mod:`.parallel`), products (:mod:`.linearize`),
losses (:mod:`.losses`), schedules (:mod:`.schedules`), partitions (:mod:`.partition`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from gnopt.errors import GnoptError
from gnopt.optim.cg import conjugate_gradient
from gnopt.optim.damping import Damping
from gnopt.optim.inner import InnerSolver, MuonAdamW
from gnopt.optim.line_search import LineSearch
from gnopt.optim.line_search_run import run_line_search
from gnopt.optim.linearize import check_autocast_dtype, check_not_compiled, model_autocast
from gnopt.optim.losses import OutputLoss
from gnopt.optim.parallel import ProcessMean
from gnopt.optim.partition import Partition
from gnopt.optim.problem import Batch, Block, Dict, Problem, next_batch, norm
from gnopt.optim.record import GNStepRecord
from gnopt.optim.schedules import InnerSchedule

__all__ = ["MODES", "GNStepRecord", "GaussNewton", "conjugate_gradient"]

MODES: tuple[str, ...] = ("gn", "prox_linear")


class GaussNewton(torch.optim.Optimizer):
    """Gauss-Newton optimizer bound to a model and an output-space loss.

    A ``torch.optim.Optimizer``: its ``param_groups`` are the inner optimizers' groups of every block
    (``"lr"``: the group's peak inner learning rate, ``"block"``: the block's label), so a
    ``torch.optim.lr_scheduler`` scheduler stepped once per outer step drives the inner learning rates
    (the inner schedule ``schedule`` multiplies them within the step). CG has no learning rate: its groups
    (one per block) carry none. :meth:`step` takes the micro-batch iterator instead of a closure.

    Args:
        model: any ``nn.Module``; ``model(inputs)`` gives the outputs the loss consumes. Its parameters are
            θ_t and are updated in place by :meth:`step`.
        loss: an :class:`~gnopt.optim.losses.OutputLoss` (``SoftmaxCrossEntropy``, ``MSELoss``, ...).
        inner_steps: N, micro-batches per inner loop (the GN batch is N micro-batches).
        mode: ``"gn"`` (quadratic model) or ``"prox_linear"`` (real loss of the linearized model).
        inner: an :class:`~gnopt.optim.inner.InnerSolver`: a first-order
            :class:`~gnopt.optim.inner.InnerOptimizer` (default: the paper's Muon+AdamW) or
            :class:`~gnopt.optim.inner.CG`.
        partition: ``None``/``"full"`` (full GN), ``"transformer"`` (the paper's layerwise blocks), or a
            :class:`~gnopt.optim.partition.Partition`.
        line_search: :class:`~gnopt.optim.line_search.LineSearch` settings (default: the model search on
            ⌈N/8⌉ fresh micro-batches; ``LineSearch.paper()`` is the paper's grid on N).
        schedule: inner learning-rate multiplier ``(t, i) -> float``, e.g. an
            :class:`~gnopt.optim.schedules.InnerSchedule`; default constant 1.
        warm_start: keep θ̂ and the inner optimizer state across outer steps (paper default).
        warm_scale: at the first inner step of an outer step, scale the carried iterate Δ by the model's
            minimizer along it, s = clip(−gᵀJΔ / (JΔ)ᵀHJΔ, 0, 1), on that micro-batch (free: the JVP is
            computed anyway), so the inner loop never starts worse than θ_t under the model. Off by default
            (the paper's warm start): measured, it neither stops the small-batch drift (which comes from the
            grid search's floor, see the model line search) nor keeps GN's steps to target at 64K
            (docs/results/cpu-cost.md).
        damping: Levenberg-Marquardt λ: minimizes the model + λ‖Δ‖²/2 (CG solves (G + λI) d = −g); or a
            :class:`~gnopt.optim.damping.Damping` holding λ, its adaptation and μ together (then leave
            ``adapt_damping`` and ``prox`` at their defaults).
        adapt_damping: adjust λ from ρ = actual/predicted decrease (×2/3 if ρ > 3/4, ×3/2 if ρ < 1/4); a
            failed step (rejected, or α = 0: no step size lowered the loss) counts as ρ < 1/4.
        prox: proximal weight μ: adds μ‖θ̂ − θ_t‖²/2 to the inner objective (fixed).
        ema_decay: keep an exponential moving average of the outer iterates (``None``: off).
        inner_clip: clip each block's inner gradient to this global norm (``None``/0: off).
        all_reduce_mean: data parallelism: a function returning the mean of a tensor over all processes
            (e.g. ``gnopt.distributed.all_reduce_mean``: all-reduce SUM, then divide by the world size; gloo
            has no AVG). It may work in place; its result is used. Each process feeds its shard of
            every micro-batch; inner gradients, GN-vector products, losses and line-search losses are
            averaged with it, so every process takes identical steps. ``None``: single process.
        autocast_dtype: mixed precision: ``torch.bfloat16`` runs every model pass of :meth:`step` (primal,
            tangent, pullback, line search) under ``torch.autocast`` and casts the outputs to float32;
            weights, inner iterates, inner optimizer states, losses, logit gradients and logit HVPs stay
            float32 (see :mod:`gnopt.optim.linearize`). ``None``: the model runs in its own dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: OutputLoss,
        *,
        inner_steps: int,
        mode: str = "gn",
        inner: InnerSolver | None = None,
        partition: Partition | str | None = None,
        line_search: LineSearch | None = None,
        schedule: Callable[[int, int], float] | None = None,
        warm_start: bool = True,
        warm_scale: bool = False,
        damping: float | Damping = 0.0,
        adapt_damping: bool = False,
        prox: float = 0.0,
        ema_decay: float | None = None,
        inner_clip: float | None = 1.0,
        all_reduce_mean: Callable[[Tensor], Tensor] | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.autocast_dtype = check_autocast_dtype(autocast_dtype)
        check_not_compiled(model)
        if mode not in MODES:
            raise GnoptError(f"unknown GN mode {mode!r}; choose one of {', '.join(MODES)}")
        if inner_steps < 1:
            raise GnoptError(f"inner_steps must be >= 1, got {inner_steps}")
        #: λ (its initial value), its adaptation and μ; the current λ is :attr:`damping`.
        self.regularization = damping if isinstance(damping, Damping) else Damping(
            float(damping), adapt_damping, float(prox))
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise GnoptError(f"ema_decay must lie in [0, 1), got {ema_decay}")
        self.inner: InnerSolver = inner if inner is not None else MuonAdamW()
        self.inner.check_mode(mode)
        self.model = model
        self.loss = loss
        self.inner_steps = inner_steps
        self.mode = mode
        self.line_search = line_search or LineSearch()
        if self.regularization.adapt and not self.line_search.model_decrease:
            raise GnoptError("adapt_damping needs the line search's model_decrease=True (it uses ρ)")
        self.schedule = schedule or InnerSchedule(kind="constant")
        self.warm_start = warm_start
        self.warm_scale = warm_scale
        self.damping = float(self.regularization.damping)  # the current λ (adapts with ρ)
        self.ema_decay = ema_decay
        self.inner_clip = inner_clip if inner_clip else None
        self.partition = _partition(model, partition)
        self._params: dict[str, nn.Parameter] = dict(model.named_parameters())
        self._mean = ProcessMean(all_reduce_mean, lambda: next(iter(self._params.values())).device)
        self._blocks = [Block(label, names) for label, names in zip(self.partition.labels,
                                                                      self.partition.blocks, strict=True)]
        for blk in self._blocks:
            self._reset_block(blk, fresh_optimizer=True)
        self._t = 0
        self._ema: Dict | None = None
        super().__init__(self._outer_groups(), defaults={})

    def _outer_groups(self) -> list[dict[str, Any]]:
        """One group per inner-optimizer group of every block (per block for a solver without one); each
        block's inner loop reads its groups' ``"lr"`` (``Block.groups``)."""
        groups: list[dict[str, Any]] = []
        for blk in self._blocks:
            if blk.optimizer is None:
                blk.groups = [{"params": [self._params[n] for n in blk.names], "block": blk.label}]
            else:
                name_of = {id(blk.theta_hat[n]): n for n in blk.names}
                blk.groups = [{"params": [self._params[name_of[id(t)]] for t in g["params"]],
                               "lr": g["peak_lr"], "block": blk.label} for g in blk.optimizer.param_groups]
            groups += blk.groups
        return groups

    @property
    def adapt_damping(self) -> bool:
        return self.regularization.adapt

    @property
    def prox(self) -> float:
        return self.regularization.prox

    # ------------------------------------------------------------------ the outer step
    def step(self, batches: Iterator[Batch]) -> GNStepRecord:  # type: ignore[override]
        """One outer step (under ``autocast_dtype``): N inner micro-batches, then the line search (N more
        by default, pulled from ``batches``)."""
        with model_autocast(self.autocast_dtype):
            return self._step(batches)

    def _step(self, batches: Iterator[Batch]) -> GNStepRecord:
        theta = self._theta()  # θ_t, the linearization point
        rec = self._record()
        ls = self.line_search
        # 1. the inner solver minimizes the model around θ_t: θ̂_b for every block
        problem = self._solve(theta, batches, rec)

        # 2. the direction d = θ̂ − θ_t and the line search's α* on its own micro-batches
        t1 = time.perf_counter()
        direction = self._direction(theta)
        rec.direction_norm = norm(direction)
        if ls.source == "inner":
            assert problem.kept is not None
            ls_batches = problem.kept
        else:
            n_ls = ls.batches_for(self.inner_steps)
            ls_batches = [next_batch(batches) for _ in range(n_ls)]
            rec.ls_micro_batches = n_ls
            rec.ls_tokens = sum(self.loss.count(y) for _, y in ls_batches)
        alpha: float | None = None
        restart = False
        if math.isfinite(rec.direction_norm):
            found = run_line_search(ls, problem, direction, ls_batches, rec)
            alpha = found.alphas[found.chosen] if found.chosen is not None else None
            restart = found.restart
        else:  # a non-finite inner iterate (e.g. an optimizer state gone bad): never let it reach θ
            rec.rejected = True
        rec.time_line_search = time.perf_counter() - t1

        # 3. θ_{t+1} = θ_t + α* d; the inner state carried to the next step; λ and the EMA updated
        self._finish(direction, alpha, restart, rec)
        self._t += 1
        return rec

    def inner_direction(self, batches: Iterator[Batch]) -> Dict:
        """The inner solve of one outer step alone: d = θ̂ − θ_t after the N inner steps on ``batches``
        (``inner_steps`` micro-batches), with no line search and no update.

        θ_t (the model) and the step count stay; θ̂ and the inner optimizers' state advance exactly as in
        :meth:`step`, so call it on a copy to keep them (:func:`gnopt.optim.probe.gn_direction` does).
        """
        with model_autocast(self.autocast_dtype):
            theta = self._theta()
            self._solve(theta, batches, self._record())
            return self._direction(theta)

    def _record(self) -> GNStepRecord:
        return GNStepRecord(step=self._t, loss=float("nan"), mode=self.mode, alpha=None, rejected=False,
                            alphas=[], ls_losses=[], damping=self.damping, ls_kind=self.line_search.kind)

    def _solve(self, theta: Dict, batches: Iterator[Batch], rec: GNStepRecord) -> Problem:
        """Step 1: the inner solver leaves θ̂_b, its minimizer of the model around θ_t, in every block."""
        t0 = time.perf_counter()
        kept = None  # the N inner micro-batches, when the solver or the line search needs them up front
        if self.inner.fixed_batches or self.line_search.source == "inner":
            kept = [next_batch(batches) for _ in range(self.inner_steps)]
        problem = Problem(
            model=self.model, loss=self.loss, mode=self.mode, theta=theta, blocks=self._blocks, t=self._t,
            inner_steps=self.inner_steps, schedule=self.schedule, reg=self.damping + self.prox,
            warm_scale=self.warm_scale, inner_clip=self.inner_clip, mean=self._mean, batches=batches,
            kept=kept,
        )
        self.inner.solve(problem, rec)
        rec.time_inner = time.perf_counter() - t0
        return problem

    def _direction(self, theta: Dict) -> Dict:
        """d = θ̂ − θ_t over every block."""
        return {n: blk.theta_hat[n].detach() - theta[n] for blk in self._blocks for n in blk.names}

    @torch.no_grad()
    def _finish(self, d: Dict, alpha: float | None, restart: bool, rec: GNStepRecord) -> None:
        if alpha is None:
            # Nothing finite: θ stays, and the inner solver restarts from θ_t with fresh state.
            self._reset_blocks(fresh_optimizer=True, rec=rec)
            self.damping = self.regularization.adapted(self.damping, None, failed=True)
            return
        if alpha != 0.0:
            for n, p in self._params.items():
                if n in d:
                    p.add_(d[n], alpha=alpha)
        if not self.warm_start or restart:
            # (the model search falls back to α = 0 when no candidate decreased the loss: the direction
            # and the inner state that produced it are dropped)
            self._reset_blocks(fresh_optimizer=True, rec=rec)
        elif self.line_search.reset_below is not None and alpha < self.line_search.reset_below:
            self._reset_blocks(fresh_optimizer=False, rec=rec)
        self.damping = self.regularization.adapted(self.damping, rec.rho, failed=alpha == 0.0)
        if self.ema_decay is not None:
            if self._ema is None:
                self._ema = {n: p.detach().clone() for n, p in self._params.items() if n in d}
            else:
                for n, e in self._ema.items():
                    e.lerp_(self._params[n].detach(), 1.0 - self.ema_decay)

    def _reset_blocks(self, *, fresh_optimizer: bool, rec: GNStepRecord) -> None:
        for blk in self._blocks:
            self._reset_block(blk, fresh_optimizer=fresh_optimizer)
        rec.reset_inner = True

    @torch.no_grad()
    def _reset_block(self, blk: Block, *, fresh_optimizer: bool) -> None:
        """Put θ̂_b back at θ_t; rebuild the inner optimizer (fresh state) if asked."""
        if not blk.theta_hat:
            blk.theta_hat = {n: self._params[n].detach().clone() for n in blk.names}
        else:
            for n in blk.names:
                blk.theta_hat[n].copy_(self._params[n].detach())
        blk.at_origin = True
        if fresh_optimizer:
            blk.optimizer = self.inner.build([(n, blk.theta_hat[n]) for n in blk.names], self.model)

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Temporarily load the EMA of the outer iterates into the model (no-op without EMA)."""
        if self._ema is None:
            yield
            return
        backup = {n: self._params[n].detach().clone() for n in self._ema}
        with torch.no_grad():
            for n, e in self._ema.items():
                self._params[n].copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, b in backup.items():
                    self._params[n].copy_(b)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Everything needed to continue exactly: θ_t, θ̂, inner optimizer states, t, λ, EMA, the groups'
        learning rates.

        The micro-batches (inner and line search) come from the caller's iterator: its position is the
        caller's to save (gnopt's harness saves the batcher state next to this).
        """
        return {
            "version": 1,
            "t": self._t,
            "damping": self.damping,
            "theta": {n: p.detach().clone() for n, p in self._theta().items()},
            "blocks": [
                {
                    "label": blk.label,
                    "theta_hat": {n: v.detach().clone() for n, v in blk.theta_hat.items()},
                    "at_origin": blk.at_origin,
                    # deep copy: torch's Optimizer.state_dict() returns live references to its state
                    "optimizer": None if blk.optimizer is None else copy.deepcopy(blk.optimizer.state_dict()),
                }
                for blk in self._blocks
            ],
            "ema": None if self._ema is None else {n: e.clone() for n, e in self._ema.items()},
            "lrs": [g["lr"] for g in self.param_groups if "lr" in g],  # (absent in older states)
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        if state.get("version") != 1:
            raise GnoptError(f"unsupported GaussNewton state version {state.get('version')!r}")
        labels = [b["label"] for b in state["blocks"]]
        if labels != [blk.label for blk in self._blocks]:
            raise GnoptError(f"GN state has blocks {labels}, this optimizer has "
                             f"{[blk.label for blk in self._blocks]}")
        for n, v in state["theta"].items():
            if n not in self._params or self._params[n].shape != v.shape:
                raise GnoptError(f"GN state parameter {n!r} does not match the model")
            self._params[n].copy_(v)
        for blk, sb in zip(self._blocks, state["blocks"], strict=True):
            for n in blk.names:
                blk.theta_hat[n].copy_(sb["theta_hat"][n])
            blk.at_origin = bool(sb["at_origin"])
            if blk.optimizer is not None and sb["optimizer"] is not None:
                blk.optimizer.load_state_dict(copy.deepcopy(sb["optimizer"]))
        self._t = int(state["t"])
        self.damping = float(state["damping"])
        self._ema = None if state["ema"] is None else {n: e.clone() for n, e in state["ema"].items()}
        for group, lr in zip(self.param_groups, state.get("lrs", ()), strict=False):
            group["lr"] = lr

    def _theta(self) -> Dict:
        return {n: self._params[n].detach() for blk in self._blocks for n in blk.names}


def _partition(model: nn.Module, partition: Partition | str | None) -> Partition:
    if partition is None or partition == "full":
        return Partition.full(model)
    if partition == "transformer":
        return Partition.transformer(model)
    if isinstance(partition, Partition):
        return partition.validate(model)
    raise GnoptError(f"partition must be None, 'full', 'transformer' or a Partition, got {partition!r}")
