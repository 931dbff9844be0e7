"""The Hessian-free inner solve: conjugate gradients on (G + (λ + μ) I) d = −g, per block.

Over the N micro-batches drawn up front, g is the mean loss gradient Jᵀ g_z and G v the mean GN-vector
product Jᵀ H_z J v (exact, one linearized pass per micro-batch), both restricted to the block and averaged
over data-parallel processes. Run by :meth:`gnopt.optim.inner.CG.solve`; θ̂_b = θ_t + d (θ_t when d is
not finite).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor

from gnopt.optim.linearize import linearized_pass
from gnopt.optim.problem import Batch, Dict, Problem, all_finite, dot
from gnopt.optim.record import GRADIENT_PASS, LINEARIZED_PASS, GNStepRecord


def solve_cg(p: Problem, tol: float, max_iters: int, rec: GNStepRecord) -> None:
    """Set every block's θ̂_b by CG on its GN system over ``p.kept``; fills the record."""
    assert p.kept is not None
    batches = p.kept
    rec.train_micro_batches = len(batches)
    rec.train_tokens = sum(p.loss.count(y) for _, y in batches)
    for k, blk in enumerate(p.blocks):
        tb = time.perf_counter()
        g, loss = _mean_grad(p, batches, blk.names, rec)
        if k == 0:
            rec.loss = loss
        sol, iters, rel = conjugate_gradient(
            lambda v, names=blk.names: _gv(p, batches, names, v, rec),
            {n: -v for n, v in g.items()}, tol, max_iters,
        )
        rec.cg_iters.append(iters)
        rec.cg_rel_residual.append(rel)
        finite = all_finite(sol) and math.isfinite(rel)
        if not finite:
            rec.inner_nonfinite += 1
        with torch.no_grad():
            for n in blk.names:
                blk.theta_hat[n].copy_(p.theta[n] + sol[n] if finite else p.theta[n])
        blk.at_origin = not finite
        rec.block_seconds.append(time.perf_counter() - tb)


def _mean_grad(p: Problem, batches: list[Batch], names: tuple[str, ...], rec: GNStepRecord
               ) -> tuple[Dict, float]:
    """Mean over ``batches`` of Jᵀ g_z (the loss gradient) for ``names``, and the mean loss."""
    g = {n: torch.zeros_like(p.theta[n]) for n in names}
    total = 0.0
    for x, y in batches:
        held: dict[str, Tensor] = {}

        def cot(z0: Tensor, u: Tensor | None, y: Tensor = y, held: dict[str, Tensor] = held) -> Tensor:
            loc = p.loss.local(z0, y)
            held["value"] = loc.value
            return loc.grad

        _, _, gb = linearized_pass(p.model, p.theta, x, tangent=None, wrt=names, cotangent=cot)
        rec.passes += GRADIENT_PASS
        total += float(held["value"])
        for n in names:
            g[n].add_(gb[n], alpha=1.0 / len(batches))
    (mean_loss,) = p.mean.scalars(total / len(batches))
    return p.mean.tensors(g), mean_loss


def _gv(p: Problem, batches: list[Batch], names: tuple[str, ...], v: Dict, rec: GNStepRecord) -> Dict:
    """(G + (λ + μ) I) v with G the mean GN matrix of ``batches`` restricted to ``names``."""
    acc = {n: torch.zeros_like(p.theta[n]) for n in names}
    for x, y in batches:
        def cot(z0: Tensor, u: Tensor | None, y: Tensor = y) -> Tensor:
            assert u is not None
            return p.loss.local(z0, y).hvp(u)

        _, _, pb = linearized_pass(p.model, p.theta, x, tangent=v, wrt=names, cotangent=cot)
        rec.passes += LINEARIZED_PASS  # JVP, a second primal forward, pullback
        for n in names:
            acc[n].add_(pb[n], alpha=1.0 / len(batches))
    acc = p.mean.tensors(acc)
    reg = p.reg
    if reg:
        for n in names:
            acc[n].add_(v[n], alpha=reg)
    return acc


def conjugate_gradient(
    matvec: Callable[[Dict], Dict], b: Dict, tol: float, max_iters: int
) -> tuple[Dict, int, float]:
    """Solve A x = b for symmetric PSD A by CG from x = 0; returns (x, iterations, ‖r‖/‖b‖)."""
    x = {n: torch.zeros_like(v) for n, v in b.items()}
    r = {n: v.clone() for n, v in b.items()}
    p = {n: v.clone() for n, v in b.items()}
    rs = float(dot(r, r))
    b_norm = math.sqrt(rs)
    if b_norm == 0.0 or not math.isfinite(b_norm):
        return x, 0, 0.0 if b_norm == 0.0 else float("nan")
    it = 0
    while it < max_iters and math.sqrt(rs) > tol * b_norm:
        ap = matvec(p)
        pap = float(dot(p, ap))
        if pap <= 0.0 or not math.isfinite(pap):
            break  # direction of zero (or numerically negative) curvature: stop in range(A)
        a = rs / pap
        for n in x:
            x[n].add_(p[n], alpha=a)
            r[n].add_(ap[n], alpha=-a)
        rs_new = float(dot(r, r))
        it += 1
        beta = rs_new / rs
        rs = rs_new
        for n in p:
            p[n].mul_(beta).add_(r[n])
    return x, it, math.sqrt(rs) / b_norm
