"""Gauss-Newton optimizers: full GN, GN-prox-linear and layerwise GN for any ``nn.Module``.

One outer step t (the paper's Algorithm, as its code runs it; ../shared/design/gauss-newton.md):

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

The pieces are separate modules: products (:mod:`.linearize`), losses (:mod:`.losses`), inner solvers
(:mod:`.inner`), line search (:mod:`.line_search`), schedules (:mod:`.schedules`), partitions
(:mod:`.partition`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gnopt.errors import GnoptError
from gnopt.optim.inner import CG, InnerOptimizer, MuonAdamW, OptimizerChain
from gnopt.optim.line_search import (
    LineSearch,
    first_decrease,
    interpolated_alpha,
    model_alpha,
    select,
)
from gnopt.optim.linearize import (
    call,
    check_autocast_dtype,
    check_not_compiled,
    forward_with_graph,
    forward_with_graph_and_tangent,
    has_tangent_forward,
    jvp,
    linearized_pass,
    model_autocast,
    pullback,
)
from gnopt.optim.losses import LocalLoss, OutputLoss
from gnopt.optim.partition import Partition
from gnopt.optim.schedules import InnerSchedule

MODES: tuple[str, ...] = ("gn", "prox_linear")
Batch = tuple[Any, Tensor]
Dict = dict[str, Tensor]

# Forward+backward-equivalent cost of each kind of pass (a forward is 1/3 of a training step).
_FWD = 1.0 / 3.0
_TANGENT = 2.0 / 3.0
_BWD = 2.0 / 3.0


@dataclass
class GNStepRecord:
    """What one outer step did. ``loss`` is the mean loss at θ_t over the inner micro-batches.

    ``q_start`` / ``q_end`` are the model's value minus the loss at θ_t (the model decrease, summed over
    blocks) at the first and last inner step: a warm-started inner iterate that is already worse than θ_t
    under the model shows up as ``q_start > 0``. ``q_trace`` holds the same quantity at the inner steps
    ``q_trace_steps`` (at most five: first, last and every ⌊N/4⌋-th). With ``warm_scale`` the carried
    iterate is first scaled by ``warm_scales`` (one factor per block): ``q_carried`` is the model value of
    the carried iterate before that scaling, ``q_start`` the value the inner loop starts from.
    """

    step: int
    loss: float
    mode: str
    alpha: float | None
    rejected: bool
    alphas: list[float]
    ls_losses: list[float]
    ls_loss_at_theta: float | None = None
    predicted_decrease: float | None = None
    actual_decrease: float | None = None
    rho: float | None = None
    q_start: float | None = None
    q_end: float | None = None
    q_carried: float | None = None
    warm_scales: list[float] = field(default_factory=list)
    ls_kind: str = "grid"
    ls_corrected: bool = False  # model search: the true-loss parabola's α was evaluated besides α_q
    ls_backtracks: int = 0  # model search: halvings evaluated after α_q (and α_i) did not lower the loss
    q_trace: list[float] = field(default_factory=list)
    q_trace_steps: list[int] = field(default_factory=list)
    inner_grad_norm_first: float | None = None
    inner_grad_norm_last: float | None = None
    inner_grad_norm_mean: float | None = None
    inner_nonfinite: int = 0
    lr_factor: float | None = None
    direction_norm: float = 0.0
    reset_inner: bool = False
    damping: float = 0.0
    cg_iters: list[int] = field(default_factory=list)
    cg_rel_residual: list[float] = field(default_factory=list)
    block_seconds: list[float] = field(default_factory=list)
    shared_forward_seconds: float = 0.0
    time_inner: float = 0.0
    time_line_search: float = 0.0
    train_micro_batches: int = 0
    ls_micro_batches: int = 0
    train_tokens: int = 0
    ls_tokens: int = 0
    passes: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Block:
    """Inner state of one block: its names, the inner iterate θ̂ and the inner optimizer."""

    def __init__(self, label: str, names: tuple[str, ...]) -> None:
        self.label = label
        self.names = names
        self.theta_hat: Dict = {}
        self.optimizer: torch.optim.Optimizer | OptimizerChain | None = None
        self.at_origin = True  # θ̂ == θ_t exactly: the tangent is zero and can be skipped


def _dot(a: Dict, b: Dict) -> Tensor:
    return sum((torch.vdot(a[n].reshape(-1), b[n].reshape(-1)) for n in a), torch.zeros(()))


def _norm(a: Dict) -> float:
    return math.sqrt(sum(float(v.pow(2).sum()) for v in a.values()))


def _all_finite(a: Dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in a.values())


class GaussNewton:
    """Gauss-Newton optimizer bound to a model and an output-space loss.

    Args:
        model: any ``nn.Module``; ``model(inputs)`` gives the outputs the loss consumes. Its parameters are
            θ_t and are updated in place by :meth:`step`.
        loss: an :class:`~gnopt.optim.losses.OutputLoss` (``SoftmaxCrossEntropy``, ``MSELoss``, ...).
        inner_steps: N, micro-batches per inner loop (the GN batch is N micro-batches).
        mode: ``"gn"`` (quadratic model) or ``"prox_linear"`` (real loss of the linearized model).
        inner: a first-order :class:`~gnopt.optim.inner.InnerOptimizer` (default: the paper's Muon+AdamW)
            or :class:`~gnopt.optim.inner.CG`.
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
        damping: Levenberg-Marquardt λ: minimizes the model + λ‖Δ‖²/2 (CG solves (G + λI) d = −g).
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
        inner: InnerOptimizer | CG | None = None,
        partition: Partition | str | None = None,
        line_search: LineSearch | None = None,
        schedule: Callable[[int, int], float] | None = None,
        warm_start: bool = True,
        warm_scale: bool = False,
        damping: float = 0.0,
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
        if damping < 0 or prox < 0:
            raise GnoptError(f"damping and prox must be >= 0, got {damping}, {prox}")
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise GnoptError(f"ema_decay must lie in [0, 1), got {ema_decay}")
        inner = inner if inner is not None else MuonAdamW()
        if isinstance(inner, CG) and mode != "gn":
            raise GnoptError("the CG inner solver solves the quadratic GN model: use mode='gn'")
        if adapt_damping and damping <= 0:
            raise GnoptError("adapt_damping needs a positive initial damping")
        self.model = model
        self.loss = loss
        self.inner_steps = inner_steps
        self.mode = mode
        self.inner = inner
        self.line_search = line_search or LineSearch()
        if adapt_damping and not self.line_search.model_decrease:
            raise GnoptError("adapt_damping needs the line search's model_decrease=True (it uses ρ)")
        self.schedule = schedule or InnerSchedule(kind="constant")
        self.warm_start = warm_start
        self.warm_scale = warm_scale
        self.damping = float(damping)
        self.adapt_damping = adapt_damping
        self.prox = float(prox)
        self.ema_decay = ema_decay
        self.inner_clip = inner_clip if inner_clip else None
        self._all_reduce_mean = all_reduce_mean

        if partition is None or partition == "full":
            part = Partition.full(model)
        elif partition == "transformer":
            part = Partition.transformer(model)
        elif isinstance(partition, Partition):
            part = partition.validate(model)
        else:
            raise GnoptError(
                f"partition must be None, 'full', 'transformer' or a Partition, got {partition!r}"
            )
        self.partition = part
        self._params: dict[str, nn.Parameter] = dict(model.named_parameters())
        self._blocks = [_Block(label, names) for label, names in zip(part.labels, part.blocks, strict=True)]
        self._names = [n for blk in self._blocks for n in blk.names]
        for blk in self._blocks:
            self._reset_block(blk, fresh_optimizer=True)
        self._t = 0
        self._ema: Dict | None = None

    # ------------------------------------------------------------------ the outer step
    def step(self, batches: Iterator[Batch]) -> GNStepRecord:
        """One outer step (under ``autocast_dtype``); see :meth:`_step`."""
        with model_autocast(self.autocast_dtype):
            return self._step(batches)

    def _step(self, batches: Iterator[Batch]) -> GNStepRecord:
        """One outer step: N inner micro-batches, then the line search (N more by default)."""
        theta = self._theta()
        rec = GNStepRecord(step=self._t, loss=float("nan"), mode=self.mode, alpha=None, rejected=False,
                           alphas=[], ls_losses=[], damping=self.damping, ls_kind=self.line_search.kind)
        t0 = time.perf_counter()
        inner_batches = None
        if self._keep_batches():
            inner_batches = [self._next(batches) for _ in range(self.inner_steps)]
        if isinstance(self.inner, CG):
            assert inner_batches is not None
            self._solve_cg(theta, inner_batches, rec)
        else:
            self._inner_loop(theta, batches, inner_batches, rec)
        rec.time_inner = time.perf_counter() - t0

        t1 = time.perf_counter()
        direction = {n: blk.theta_hat[n].detach() - theta[n] for blk in self._blocks for n in blk.names}
        rec.direction_norm = _norm(direction)
        if self.line_search.source == "inner":
            assert inner_batches is not None
            ls_batches = inner_batches
        else:
            n_ls = self.line_search.batches_for(self.inner_steps)
            ls_batches = [self._next(batches) for _ in range(n_ls)]
            rec.ls_micro_batches = n_ls
            rec.ls_tokens = sum(self.loss.count(y) for _, y in ls_batches)
        if math.isfinite(rec.direction_norm):
            alpha = self._line_search(theta, direction, ls_batches, rec)
        else:  # a non-finite inner iterate (e.g. an optimizer state gone bad): never let it reach θ
            alpha, rec.rejected = None, True
        rec.time_line_search = time.perf_counter() - t1

        self._finish(theta, direction, alpha, rec)
        self._t += 1
        return rec

    # ------------------------------------------------------------------ inner loop (first-order)
    def _inner_loop(
        self, theta: Dict, batches: Iterator[Batch], kept: list[Batch] | None, rec: GNStepRecord
    ) -> None:
        n = self.inner_steps
        every = max(1, n // 4)  # the model value is traced at ≤ 5 inner steps (it costs two logit passes)
        traced = [i for i in range(n) if i % every == 0 or i == n - 1]
        q_sums = {i: 0.0 for i in traced}
        norms: list[float] = []
        losses: list[float] = []
        block_seconds = [0.0] * len(self._blocks)
        shared_seconds = 0.0
        # Full GN on a model that computes JΔ beside its primal pass: one primal forward per inner step.
        fused_tangent = len(self._blocks) == 1 and has_tangent_forward(self.model)
        for i in range(self.inner_steps):
            x, y = kept[i] if kept is not None else self._next(batches)
            rec.train_micro_batches += 1
            rec.train_tokens += self.loss.count(y)
            factor = float(self.schedule(self._t, i))
            if i == 0:
                rec.lr_factor = factor  # the multiplier the inner loop starts from
            ts = time.perf_counter()
            # One primal forward with a reverse graph, shared by every block: all are linearized at θ_t.
            # Full GN on a model with a one-pass tangent forward gets u = JΔ from that same pass.
            fused: tuple[Dict, Tensor] | None = None  # (Δ, u = JΔ) of the one block, from the shared pass
            if fused_tangent and not self._blocks[0].at_origin:
                delta0 = self._delta(self._blocks[0], theta)
                z, leaves, u0 = forward_with_graph_and_tangent(self.model, theta, x, self._names, delta0)
                fused = (delta0, u0)
                rec.passes += _TANGENT
            else:
                z, leaves = forward_with_graph(self.model, theta, x, self._names)
            loc = self.loss.local(z.detach(), y)
            rec.passes += _FWD
            (loss0,) = self._scalars(loc.value)
            losses.append(loss0)
            shared_seconds += time.perf_counter() - ts
            for k, blk in enumerate(self._blocks):
                tb = time.perf_counter()
                last = k == len(self._blocks) - 1
                q_minus_loss0, gnorm = self._inner_step(
                    blk, theta, x, y, z, leaves, loc, loss0, factor, rec, trace=i in q_sums, retain=not last,
                    first=i == 0, fused=fused,
                )
                block_seconds[k] += time.perf_counter() - tb
                if q_minus_loss0 is not None and i in q_sums:
                    q_sums[i] += q_minus_loss0
                norms.append(gnorm)
            del z, leaves, loc, fused
        rec.loss = sum(losses) / len(losses)
        rec.q_trace = [q_sums[i] for i in traced]
        rec.q_trace_steps = traced
        rec.q_start, rec.q_end = rec.q_trace[0], rec.q_trace[-1]
        if rec.q_carried is None:  # nothing was scaled: the loop starts where the iterate was carried to
            rec.q_carried = rec.q_start
        finite = [g for g in norms if math.isfinite(g)]
        rec.inner_grad_norm_first = norms[0]
        rec.inner_grad_norm_last = norms[-1]
        rec.inner_grad_norm_mean = sum(finite) / len(finite) if finite else float("nan")
        rec.block_seconds = block_seconds
        rec.shared_forward_seconds = shared_seconds

    def _inner_step(
        self,
        blk: _Block,
        theta: Dict,
        x: Any,
        y: Tensor,
        z: Tensor,
        leaves: Dict,
        loc: LocalLoss,
        loss0: float,
        factor: float,
        rec: GNStepRecord,
        *,
        trace: bool,
        retain: bool,
        first: bool = False,
        fused: tuple[Dict, Tensor] | None = None,
    ) -> tuple[float | None, float]:
        """One inner step of one block on the micro-batch whose forward graph is ``z`` (``loc`` = L at z₀).

        ``fused`` is (Δ, JΔ) when the shared forward already computed them (full GN, one-pass tangent
        forward). Returns (model value − L(θ_t) if ``trace`` or prox-linear, else None; the inner gradient
        norm).
        """
        if fused is not None:
            delta, u = fused
        else:
            delta = None if blk.at_origin else self._delta(blk, theta)
        model_value: Tensor | float | None = None
        if delta is None:  # Δ = 0: the model's gradient is the loss gradient
            r = loc.grad
            model_value = loss0
        else:
            if fused is None:
                _, u = jvp(self.model, theta, x, delta)
                rec.passes += _FWD + _TANGENT
            if first and self.warm_scale:
                u, delta = self._scale_carried(blk, theta, delta, u, loc, rec)
            if self.mode == "gn":
                r, g_u, u_h_u = loc.gn_cotangent(u, terms=trace)
                if g_u is not None and u_h_u is not None:
                    model_value = loc.value + g_u + 0.5 * u_h_u
            else:
                model_value, r = self.loss.value_and_grad(z.detach() + u, y)
            del u
        grads = pullback(z, leaves, blk.names, r, retain_graph=retain)
        rec.passes += _BWD
        del r
        grads = self._mean_over_processes(grads)
        mv = self._scalars(model_value)[0] if model_value is not None else None
        reg = self.damping + self.prox
        if reg and delta is not None:
            for n in blk.names:
                grads[n].add_(delta[n], alpha=reg)
            if mv is not None:
                mv += 0.5 * reg * float(_dot(delta, delta))
        q_minus_loss0 = mv - loss0 if mv is not None and (trace or self.mode != "gn") else None
        gnorm = _norm(grads)
        if not math.isfinite(gnorm):
            rec.inner_nonfinite += 1  # skip this update: θ̂ is never corrupted by a bad micro-batch
            return q_minus_loss0, gnorm
        scale = self.inner_clip / gnorm if self.inner_clip and gnorm > self.inner_clip else 1.0
        for n in blk.names:
            blk.theta_hat[n].grad = grads[n].mul_(scale) if scale != 1.0 else grads[n]
        assert blk.optimizer is not None
        for g in blk.optimizer.param_groups:
            g["lr"] = g["peak_lr"] * factor
        blk.optimizer.step()
        blk.optimizer.zero_grad(set_to_none=True)
        blk.at_origin = False
        return q_minus_loss0, gnorm

    @torch.no_grad()
    def _scale_carried(
        self, blk: _Block, theta: Dict, delta: Dict, u: Tensor, loc: LocalLoss, rec: GNStepRecord
    ) -> tuple[Tensor, Dict]:
        """Scale the carried iterate Δ (and u = JΔ) by the model's minimizer along it over [0, 1].

        The model along sΔ is L + s·gᵀu + ½s²·(uᵀHu + (λ+μ)‖Δ‖²), so s = clip(−slope / curvature, 0, 1)
        (:func:`~gnopt.optim.line_search.model_alpha`): s = 1 keeps a carried iterate the model rates as a
        descent, s = 0 puts θ̂ back at θ_t (the inner optimizer keeps its state).
        """
        g_u, u_h_u = loc.directional(u)
        slope, curvature = self._scalars(g_u, u_h_u)
        reg = self.damping + self.prox
        if reg:
            curvature += reg * float(_dot(delta, delta))
        rec.q_carried = (rec.q_carried or 0.0) + slope + 0.5 * curvature
        s = model_alpha(slope, curvature, alpha_min=0.0, alpha_max=1.0)
        rec.warm_scales.append(s)
        if s == 1.0:
            return u, delta
        for n in blk.names:
            delta[n].mul_(s)
            blk.theta_hat[n].copy_(theta[n] + delta[n])
        return u.mul_(s), delta

    # ------------------------------------------------------------------ inner solve (CG)
    def _solve_cg(self, theta: Dict, batches: list[Batch], rec: GNStepRecord) -> None:
        assert isinstance(self.inner, CG)
        rec.train_micro_batches = len(batches)
        rec.train_tokens = sum(self.loss.count(y) for _, y in batches)
        for k, blk in enumerate(self._blocks):
            tb = time.perf_counter()
            g, loss = self._mean_grad(theta, batches, blk.names, rec)
            if k == 0:
                rec.loss = loss
            sol, iters, rel = conjugate_gradient(
                lambda v, names=blk.names: self._gv(theta, batches, names, v, rec),
                {n: -v for n, v in g.items()}, self.inner.tol, self.inner.max_iters,
            )
            rec.cg_iters.append(iters)
            rec.cg_rel_residual.append(rel)
            finite = _all_finite(sol) and math.isfinite(rel)
            if not finite:
                rec.inner_nonfinite += 1
            with torch.no_grad():
                for n in blk.names:
                    blk.theta_hat[n].copy_(theta[n] + sol[n] if finite else theta[n])
            blk.at_origin = not finite
            rec.block_seconds.append(time.perf_counter() - tb)

    def _mean_grad(
        self, theta: Dict, batches: list[Batch], names: tuple[str, ...], rec: GNStepRecord
    ) -> tuple[Dict, float]:
        """Mean over ``batches`` of Jᵀ g_z (the loss gradient) for ``names``, and the mean loss."""
        g = {n: torch.zeros_like(theta[n]) for n in names}
        total = 0.0
        for x, y in batches:
            held: dict[str, Tensor] = {}

            def cot(z0: Tensor, u: Tensor | None, y: Tensor = y, held: dict[str, Tensor] = held) -> Tensor:
                loc = self.loss.local(z0, y)
                held["value"] = loc.value
                return loc.grad

            _, _, gb = linearized_pass(self.model, theta, x, tangent=None, wrt=names, cotangent=cot)
            rec.passes += _FWD + _BWD
            total += float(held["value"])
            for n in names:
                g[n].add_(gb[n], alpha=1.0 / len(batches))
        (mean_loss,) = self._scalars(total / len(batches))
        return self._mean_over_processes(g), mean_loss

    def _gv(
        self, theta: Dict, batches: list[Batch], names: tuple[str, ...], v: Dict, rec: GNStepRecord
    ) -> Dict:
        """(G + (λ + μ) I) v with G the mean GN matrix of ``batches`` restricted to ``names``."""
        acc = {n: torch.zeros_like(theta[n]) for n in names}
        for x, y in batches:
            def cot(z0: Tensor, u: Tensor | None, y: Tensor = y) -> Tensor:
                assert u is not None
                return self.loss.local(z0, y).hvp(u)

            _, _, pb = linearized_pass(self.model, theta, x, tangent=v, wrt=names, cotangent=cot)
            rec.passes += _FWD + _TANGENT + _BWD
            for n in names:
                acc[n].add_(pb[n], alpha=1.0 / len(batches))
        acc = self._mean_over_processes(acc)
        reg = self.damping + self.prox
        if reg:
            for n in names:
                acc[n].add_(v[n], alpha=reg)
        return acc

    # ------------------------------------------------------------------ line search
    @torch.no_grad()
    def _line_search(self, theta: Dict, d: Dict, batches: list[Batch], rec: GNStepRecord) -> float | None:
        """α* for the direction ``d`` on the line-search ``batches`` (None: rejected); fills the record."""
        ls = self.line_search
        prox_alphas = ls.alphas() if ls.kind == "grid" and self.mode == "prox_linear" else []
        model = self._model_along(theta, d, batches, prox_alphas, rec) if ls.model_decrease else None
        loss_at_theta = model[0] if model is not None else None
        if ls.kind == "grid":
            alphas = ls.alphas()
            losses = self._losses_along(theta, d, batches, alphas, rec, loss_at_theta)
            k = select(alphas, losses)
        else:
            assert model is not None and loss_at_theta is not None
            alphas, losses, k = self._model_search(theta, d, batches, loss_at_theta, model[1], model[2], rec)
        rec.alphas, rec.ls_losses, rec.ls_loss_at_theta = alphas, losses, loss_at_theta
        if k is None:
            rec.rejected = True
            return None
        alpha = alphas[k]
        rec.alpha = alpha
        if model is not None and loss_at_theta is not None:
            rec.actual_decrease = loss_at_theta - losses[k]
            if self.mode == "gn" or not prox_alphas:  # the GN quadratic along α d
                predicted = -(alpha * model[1] + 0.5 * alpha * alpha * model[2])
            else:  # prox-linear with the grid: the linearized model's own loss at α
                predicted = loss_at_theta - model[3 + k]
            rec.predicted_decrease = predicted
            rec.rho = rec.actual_decrease / predicted if predicted != 0 else None
        return alpha

    def _model_search(
        self, theta: Dict, d: Dict, batches: list[Batch], loss_at_theta: float, slope: float,
        curvature: float, rec: GNStepRecord,
    ) -> tuple[list[float], list[float], int | None]:
        """The model line search: candidates, their true losses and the chosen index (None: rejected).

        α_q from the GN model; α_i from the true loss's parabola when it differs by > 10%; the better one
        if it lowers the loss, else halvings, else α = 0 (the loss at θ_t). Nothing finite at θ_t: None.
        """
        alphas: list[float] = []
        losses: list[float] = []
        if not math.isfinite(loss_at_theta):
            return alphas, losses, None
        lo = self.line_search.smallest_alpha()
        alphas.append(model_alpha(slope, curvature, lo))
        losses += self._losses_along(theta, d, batches, alphas[-1:], rec, loss_at_theta)
        a_i = interpolated_alpha(loss_at_theta, slope, alphas[0], losses[0], lo)
        if a_i is not None and abs(a_i - alphas[0]) > 0.1 * alphas[0]:
            rec.ls_corrected = True
            alphas.append(a_i)
            losses += self._losses_along(theta, d, batches, [a_i], rec, loss_at_theta)
        k = select(alphas, losses)
        if k is not None and losses[k] < loss_at_theta:
            return alphas, losses, k
        a = min(alphas) / 2.0
        for _ in range(self.line_search.max_backtracks):
            rec.ls_backtracks += 1
            alphas.append(a)
            losses += self._losses_along(theta, d, batches, [a], rec, loss_at_theta)
            if first_decrease(loss_at_theta, losses[-1:]) is not None:
                return alphas, losses, len(alphas) - 1
            a /= 2.0
        # no confirmed decrease: stay at θ_t (the inner loop restarts, see _finish)
        return [*alphas, 0.0], [*losses, loss_at_theta], len(alphas)

    def _model_along(
        self, theta: Dict, d: Dict, batches: list[Batch], prox_alphas: list[float], rec: GNStepRecord
    ) -> list[float]:
        """Means over ``batches`` of [L(θ_t), gᵀJd, (Jd)ᵀH(Jd), L(z₀ + α Jd) for α in ``prox_alphas``].

        One JVP per batch (its primal is the loss at θ_t); one sync and one collective at the end.
        """
        sums = [torch.zeros((), dtype=torch.float64) for _ in range(3 + len(prox_alphas))]
        for x, y in batches:
            z0, u = jvp(self.model, theta, x, d)
            rec.passes += _FWD + _TANGENT
            loc = self.loss.local(z0, y)
            for k, v in enumerate((loc.value, *loc.directional(u))):
                sums[k] += v.detach().double().cpu()
            for k, a in enumerate(prox_alphas):
                sums[3 + k] += self.loss.value(z0 + a * u, y).double().cpu()
            del z0, u, loc
        return [v / len(batches) for v in self._scalars(*sums)]

    def _losses_along(
        self, theta: Dict, d: Dict, batches: list[Batch], alphas: list[float], rec: GNStepRecord,
        loss_at_theta: float | None,
    ) -> list[float]:
        """Mean true loss over ``batches`` at θ_t + α d for every α (α = 0 reuses ``loss_at_theta``)."""
        sums: list[Tensor] = []
        for a in alphas:
            if a == 0.0 and loss_at_theta is not None:
                sums.append(torch.tensor(loss_at_theta * len(batches), dtype=torch.float64))
                continue
            params = {n: theta[n] + a * d[n] for n in theta} if a != 0.0 else theta
            total = torch.zeros((), dtype=torch.float64)
            for x, y in batches:
                total += self.loss.value(call(self.model, params, x), y).double().cpu()
                rec.passes += _FWD
            sums.append(total)
        return [v / len(batches) for v in self._scalars(*sums)]

    # ------------------------------------------------------------------ after the line search
    @torch.no_grad()
    def _finish(self, theta: Dict, d: Dict, alpha: float | None, rec: GNStepRecord) -> None:
        if alpha is None:
            # Nothing finite: θ stays, and the inner solver restarts from θ_t with fresh state.
            for blk in self._blocks:
                self._reset_block(blk, fresh_optimizer=True)
            rec.reset_inner = True
            if self.adapt_damping:  # a failed step counts as the worst ρ (see below)
                self.damping *= 1.5
            return
        if alpha != 0.0:
            for n, p in self._params.items():
                if n in d:
                    p.add_(d[n], alpha=alpha)
        if not self.warm_start or (self.line_search.kind == "model" and alpha == 0.0):
            # (the model search falls back to α = 0 when no candidate decreased the loss: the direction
            # and the inner state that produced it are dropped)
            for blk in self._blocks:
                self._reset_block(blk, fresh_optimizer=True)
            rec.reset_inner = True
        elif self.line_search.reset_below is not None and alpha < self.line_search.reset_below:
            for blk in self._blocks:
                self._reset_block(blk, fresh_optimizer=False)
            rec.reset_inner = True
        if self.adapt_damping and alpha == 0.0:
            # No step size lowered the loss: ρ is 0/0, undefined. As in Levenberg-Marquardt a failed step
            # counts as the worst ρ: λ rises (else a λ too small would never move).
            self.damping *= 1.5
        elif self.adapt_damping and rec.rho is not None:
            if rec.rho > 0.75:
                self.damping *= 2.0 / 3.0
            elif rec.rho < 0.25:
                self.damping *= 1.5
        if self.ema_decay is not None:
            if self._ema is None:
                self._ema = {n: p.detach().clone() for n, p in self._params.items() if n in d}
            else:
                for n, e in self._ema.items():
                    e.lerp_(self._params[n].detach(), 1.0 - self.ema_decay)

    # ------------------------------------------------------------------ helpers
    def _mean_over_processes(self, d: Dict) -> Dict:
        """Average a dict of tensors over data-parallel processes (one collective call)."""
        if self._all_reduce_mean is None or not d:
            return d
        names = list(d)
        flat = self._all_reduce_mean(torch.cat([d[n].reshape(-1) for n in names]))
        out: Dict = {}
        offset = 0
        for n in names:
            k = d[n].numel()
            out[n] = flat[offset:offset + k].view_as(d[n])
            offset += k
        return out

    def _scalars(self, *values: Tensor | float) -> list[float]:
        """Python floats of ``values``, averaged over data-parallel processes (one collective call)."""
        vec = torch.stack([torch.as_tensor(v, dtype=torch.float64).reshape(()).cpu() for v in values])
        if self._all_reduce_mean is not None:
            device = next(iter(self._params.values())).device
            vec = self._all_reduce_mean(vec.to(device)).cpu()
        return vec.tolist()

    def _delta(self, blk: _Block, theta: Dict) -> Dict:
        """Δ = θ̂_b − θ_t for block ``blk``."""
        return {n: blk.theta_hat[n].detach() - theta[n] for n in blk.names}

    def _theta(self) -> Dict:
        return {n: self._params[n].detach() for blk in self._blocks for n in blk.names}

    def _keep_batches(self) -> bool:
        return isinstance(self.inner, CG) or self.line_search.source == "inner"

    def _next(self, batches: Iterator[Batch]) -> Batch:
        try:
            return next(batches)
        except StopIteration:
            raise GnoptError("the batch iterator ran out in the middle of a Gauss-Newton step") from None

    @torch.no_grad()
    def _reset_block(self, blk: _Block, *, fresh_optimizer: bool) -> None:
        """Put θ̂_b back at θ_t; rebuild the inner optimizer (fresh state) if asked."""
        if not blk.theta_hat:
            blk.theta_hat = {n: self._params[n].detach().clone() for n in blk.names}
        else:
            for n in blk.names:
                blk.theta_hat[n].copy_(self._params[n].detach())
        blk.at_origin = True
        if fresh_optimizer and isinstance(self.inner, InnerOptimizer):
            named = [(n, blk.theta_hat[n]) for n in blk.names]
            blk.optimizer = self.inner.build(named, self.model)

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
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: θ_t, θ̂, inner optimizer states, t, λ, EMA.

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
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
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


def conjugate_gradient(
    matvec: Callable[[Dict], Dict], b: Dict, tol: float, max_iters: int
) -> tuple[Dict, int, float]:
    """Solve A x = b for symmetric PSD A by CG from x = 0; returns (x, iterations, ‖r‖/‖b‖)."""
    x = {n: torch.zeros_like(v) for n, v in b.items()}
    r = {n: v.clone() for n, v in b.items()}
    p = {n: v.clone() for n, v in b.items()}
    rs = float(_dot(r, r))
    b_norm = math.sqrt(rs)
    if b_norm == 0.0 or not math.isfinite(b_norm):
        return x, 0, 0.0 if b_norm == 0.0 else float("nan")
    it = 0
    while it < max_iters and math.sqrt(rs) > tol * b_norm:
        ap = matvec(p)
        pap = float(_dot(p, ap))
        if pap <= 0.0 or not math.isfinite(pap):
            break  # direction of zero (or numerically negative) curvature: stop in range(A)
        a = rs / pap
        for n in x:
            x[n].add_(p[n], alpha=a)
            r[n].add_(ap[n], alpha=-a)
        rs_new = float(_dot(r, r))
        it += 1
        beta = rs_new / rs
        rs = rs_new
        for n in p:
            p[n].mul_(beta).add_(r[n])
    return x, it, math.sqrt(rs) / b_norm
