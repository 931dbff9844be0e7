"""The first-order inner loop of a Gauss-Newton outer step (the paper's scheme).

For i = 1 … N, on a fresh micro-batch B_i, one primal forward with a reverse graph is shared by every block
(all are linearized at θ_t); then for each block b (Jacobi: the others frozen at θ_t)::

    Δ = θ̂_b − θ_t ;  u = J_b Δ
    if i = 1 and warm_scale:   Δ ← s Δ with s = argmin over [0, 1] of the model along Δ
    gn:          grad = J_bᵀ (g_z + H_z u)        (gradient of the GN quadratic model)
    prox_linear: grad = J_bᵀ ∇L(z₀ + u)           (gradient of the loss of the linearized model)
    grad += (λ + μ) Δ ;  clip ;  θ̂_b ← inner_optimizer_b.step(grad)

Full GN on a model that computes JΔ beside its primal pass gets u from that same pass. Run by
:meth:`gnopt.optim.inner.InnerOptimizer.solve`; fills the step record's loss, model-value trace and inner
gradient norms.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

from gnopt.optim.line_search import model_alpha
from gnopt.optim.linearize import (
    forward_with_graph,
    forward_with_graph_and_tangent,
    has_tangent_forward,
    jvp,
    pullback,
)
from gnopt.optim.losses import LocalLoss
from gnopt.optim.problem import Block, Dict, Problem, dot, norm
from gnopt.optim.record import BWD, FWD, JVP, TANGENT, GNStepRecord


def run_inner_loop(p: Problem, rec: GNStepRecord) -> None:
    """N first-order inner steps of every block; each block's ``optimizer`` steps its θ̂_b."""
    n = p.inner_steps
    every = max(1, n // 4)  # the model value is traced at ≤ 5 inner steps (it costs two logit passes)
    traced = [i for i in range(n) if i % every == 0 or i == n - 1]
    q_sums = {i: 0.0 for i in traced}
    norms: list[float] = []
    losses: list[float] = []
    block_seconds = [0.0] * len(p.blocks)
    shared_seconds = 0.0
    names = p.names
    # Full GN on a model that computes JΔ beside its primal pass: one primal forward per inner step.
    fused_tangent = len(p.blocks) == 1 and has_tangent_forward(p.model)
    for i in range(n):
        x, y = p.batch(i)
        rec.train_micro_batches += 1
        rec.train_tokens += p.loss.count(y)
        factor = float(p.schedule(p.t, i))
        if i == 0:
            rec.lr_factor = factor  # the multiplier the inner loop starts from
        ts = time.perf_counter()
        # One primal forward with a reverse graph, shared by every block: all are linearized at θ_t.
        # Full GN on a model with a one-pass tangent forward gets u = JΔ from that same pass.
        fused: tuple[Dict, Tensor] | None = None  # (Δ, u = JΔ) of the one block, from the shared pass
        if fused_tangent and not p.blocks[0].at_origin:
            delta0 = p.delta(p.blocks[0])
            z, leaves, u0 = forward_with_graph_and_tangent(p.model, p.theta, x, names, delta0)
            fused = (delta0, u0)
            rec.passes += TANGENT
        else:
            z, leaves = forward_with_graph(p.model, p.theta, x, names)
        loc = p.loss.local(z.detach(), y)
        rec.passes += FWD
        (loss0,) = p.mean.scalars(loc.value)
        losses.append(loss0)
        shared_seconds += time.perf_counter() - ts
        for k, blk in enumerate(p.blocks):
            tb = time.perf_counter()
            last = k == len(p.blocks) - 1
            q_minus_loss0, gnorm = _inner_step(
                p, blk, x, y, z, leaves, loc, loss0, factor, rec, trace=i in q_sums, retain=not last,
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
    p: Problem,
    blk: Block,
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
        delta = None if blk.at_origin else p.delta(blk)
    model_value: Tensor | float | None = None
    if delta is None:  # Δ = 0: the model's gradient is the loss gradient
        r = loc.grad
        model_value = loss0
    else:
        if fused is None:
            _, u = jvp(p.model, p.theta, x, delta)
            rec.passes += JVP
        if first and p.warm_scale:
            u, delta = _scale_carried(p, blk, delta, u, loc, rec)
        if p.mode == "gn":
            r, g_u, u_h_u = loc.gn_cotangent(u, terms=trace)
            if g_u is not None and u_h_u is not None:
                model_value = loc.value + g_u + 0.5 * u_h_u
        else:
            model_value, r = p.loss.value_and_grad(z.detach() + u, y)
        del u
    grads = pullback(z, leaves, blk.names, r, retain_graph=retain)
    rec.passes += BWD
    del r
    grads = p.mean.tensors(grads)
    mv = p.mean.scalars(model_value)[0] if model_value is not None else None
    reg = p.reg
    if reg and delta is not None:
        for n in blk.names:
            grads[n].add_(delta[n], alpha=reg)
        if mv is not None:
            mv += 0.5 * reg * float(dot(delta, delta))
    q_minus_loss0 = mv - loss0 if mv is not None and (trace or p.mode != "gn") else None
    gnorm = norm(grads)
    if not math.isfinite(gnorm):
        rec.inner_nonfinite += 1  # skip this update: θ̂ is never corrupted by a bad micro-batch
        return q_minus_loss0, gnorm
    scale = p.inner_clip / gnorm if p.inner_clip and gnorm > p.inner_clip else 1.0
    for n in blk.names:
        blk.theta_hat[n].grad = grads[n].mul_(scale) if scale != 1.0 else grads[n]
    assert blk.optimizer is not None
    for g, outer in zip(blk.optimizer.param_groups, blk.groups, strict=True):
        g["lr"] = outer["lr"] * factor
    blk.optimizer.step()
    blk.optimizer.zero_grad(set_to_none=True)
    blk.at_origin = False
    return q_minus_loss0, gnorm


@torch.no_grad()
def _scale_carried(
    p: Problem, blk: Block, delta: Dict, u: Tensor, loc: LocalLoss, rec: GNStepRecord
) -> tuple[Tensor, Dict]:
    """Scale the carried iterate Δ (and u = JΔ) by the model's minimizer along it over [0, 1].

    The model along sΔ is L + s·gᵀu + ½s²·(uᵀHu + (λ+μ)‖Δ‖²), so s = clip(−slope / curvature, 0, 1)
    (:func:`~gnopt.optim.line_search.model_alpha`): s = 1 keeps a carried iterate the model rates as a
    descent, s = 0 puts θ̂ back at θ_t (the inner optimizer keeps its state).
    """
    g_u, u_h_u = loc.directional(u)
    slope, curvature = p.mean.scalars(g_u, u_h_u)
    reg = p.reg
    if reg:
        curvature += reg * float(dot(delta, delta))
    rec.q_carried = (rec.q_carried or 0.0) + slope + 0.5 * curvature
    s = model_alpha(slope, curvature, alpha_min=0.0, alpha_max=1.0)
    rec.warm_scales.append(s)
    if s == 1.0:
        return u, delta
    for n in blk.names:
        delta[n].mul_(s)
        blk.theta_hat[n].copy_(p.theta[n] + delta[n])
    return u.mul_(s), delta
