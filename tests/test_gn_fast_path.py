"""GN's fast path (issue 9): the model line search and the model-scaled warm start.

The selection rules are pure functions, tested on synthetic numbers (including non-finite values and models
that are wrong); the optimizer paths are tested end to end against the dense float64 references of
``_gn_reference`` (dense Jacobians, closed-form output Hessians, brute-force losses along the direction).
"""

from __future__ import annotations

import math

import pytest
import torch
from _gn_reference import CASES, dense, jacobi_sgd, loss_at, names_of, params_of, unflat
from test_gauss_newton import (
    F64,
    GuardedLinear,
    _linear_data,
    _lstsq,
    rel_err,
    sgd,
    theta_flat,
    theta_hat_flat,
)
from torch import Tensor

from gnopt.errors import GnoptError
from gnopt.optim import CG, GaussNewton, LineSearch, MSELoss, Partition
from gnopt.optim.line_search import first_decrease, interpolated_alpha, model_alpha

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops on 2 shared cores: one thread


# ======================================================================== pure selection rules
def test_model_alpha_is_the_clipped_minimizer_of_the_quadratic() -> None:
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        slope = -float(torch.rand((), generator=gen)) * 3.0 - 1e-3
        curvature = float(torch.rand((), generator=gen)) * 5.0 + 1e-3
        lo = float(torch.rand((), generator=gen)) * 0.3
        # Brute force on a fine grid of [lo, 1] of q(α) = α·slope + ½α²·curvature.
        grid = torch.linspace(lo, 1.0, 200001, dtype=F64)
        q = grid * slope + 0.5 * grid * grid * curvature
        want = float(grid[int(torch.argmin(q))])
        assert model_alpha(slope, curvature, lo) == pytest.approx(want, abs=1e-5)
    assert model_alpha(-1.0, 4.0, 0.1) == 0.25  # interior
    assert model_alpha(-1.0, 0.5, 0.1) == 1.0  # the minimizer 2 lies past 1: clipped, no α > 1
    assert model_alpha(-1.0, 100.0, 0.1) == 0.1  # below the floor: clipped up
    assert model_alpha(-1.0, 0.0, 0.1) == 1.0  # no curvature along d: the largest step
    assert model_alpha(-1.0, -1e-12, 0.1) == 1.0  # (round-off below zero likewise)
    for slope in (0.0, 2.0):  # not a descent direction under the model: the floor, the loss decides
        assert model_alpha(slope, 1.0, 0.1) == 0.1
    nan, inf = float("nan"), float("inf")
    for slope, curvature in ((nan, 1.0), (-1.0, nan), (-inf, 1.0), (-1.0, inf)):
        assert model_alpha(slope, curvature, 0.2) == 0.2
    assert model_alpha(-1.0, 4.0, 0.0, 1.0) == 0.25 and model_alpha(1.0, 4.0, 0.0) == 0.0  # warm scale


def test_interpolated_alpha_fits_the_true_loss_parabola() -> None:
    gen = torch.Generator().manual_seed(4)
    for _ in range(30):  # an exact parabola L(α) = L0 + s α + c α²/2 is recovered from L0, s and L(a)
        l0, slope = float(torch.rand(()) * 3), -float(torch.rand((), generator=gen)) - 0.01
        c = float(torch.rand((), generator=gen)) * 4 + 0.5
        a = float(torch.rand((), generator=gen)) * 0.9 + 0.1
        la = l0 + slope * a + 0.5 * c * a * a
        assert interpolated_alpha(l0, slope, a, la, 0.0) == pytest.approx(min(-slope / c, 1.0), rel=1e-9)
    assert interpolated_alpha(1.0, -1.0, 1.0, 0.8, 0.1) == pytest.approx(0.625)  # the model overshot
    assert interpolated_alpha(1.0, -1.0, 1.0, 0.5, 0.1) == 1.0  # the model was right
    assert interpolated_alpha(1.0, -1.0, 0.5, 0.4, 0.1) == 1.0  # concave along d: the largest step
    assert interpolated_alpha(1.0, -1.0, 1.0, 50.0, 0.1) == 0.1  # a blow-up: the floor (then halvings)
    nan = float("nan")
    for args in ((nan, -1.0, 1.0, 0.5), (1.0, nan, 1.0, 0.5), (1.0, -1.0, 1.0, nan), (1.0, 0.0, 1.0, 0.5),
                 (1.0, 1.0, 1.0, 0.5), (1.0, -1.0, 0.0, 0.5)):
        assert interpolated_alpha(*args, alpha_min=0.1) is None


def test_first_decrease_takes_the_first_finite_decrease() -> None:
    nan, inf = float("nan"), float("inf")
    assert first_decrease(1.0, [0.9, 0.5]) == 0
    assert first_decrease(1.0, [1.2, 0.99, 0.5]) == 1  # the first that decreases, not the smallest
    assert first_decrease(1.0, [nan, inf, -inf, 0.7]) == 3  # -inf is not finite either
    assert first_decrease(1.0, [1.0, 1.5]) is None  # equal is not a decrease
    assert first_decrease(1.0, [nan, nan]) is None
    assert first_decrease(1.0, []) is None
    assert first_decrease(nan, [0.5]) is None  # nothing is below a non-finite loss at θ_t


def test_line_search_settings() -> None:
    paper = LineSearch.paper()
    assert (paper.kind, paper.ls_range, paper.source, paper.num_batches, paper.fraction) == (
        "grid", 5, "fresh", None, None)
    assert LineSearch.paper(10).alphas() == [(1 / math.sqrt(2)) ** k for k in range(10)]
    assert [paper.batches_for(n) for n in (1, 8, 64)] == [1, 8, 64]  # N fresh micro-batches
    fast = LineSearch.fast()
    assert fast.kind == "model" and [fast.batches_for(n) for n in (1, 2, 8, 9, 64)] == [1, 1, 1, 2, 8]
    assert LineSearch(kind="model", fraction=0.25, num_batches=3).batches_for(64) == 3  # explicit wins
    assert fast.smallest_alpha() == pytest.approx(0.25)
    assert LineSearch(kind="model", alpha_min=0.05).smallest_alpha() == 0.05
    for kw, msg in [(dict(kind="armijo"), "kind"), (dict(fraction=0.0), "fraction"),
                    (dict(fraction=1.5), "fraction"), (dict(alpha_min=0.0), "alpha_min"),
                    (dict(max_backtracks=-1), "max_backtracks"),
                    (dict(kind="model", model_decrease=False), "model_decrease")]:
        with pytest.raises(GnoptError, match=msg):
            LineSearch(**kw)


# ======================================================================== the model line search
@pytest.mark.parametrize("case_name", ["mlp_ce_masked", "llama_ce_masked"])
def test_model_line_search_equals_dense_reference(case_name: str) -> None:
    """α_q = −gᵀJd / dᵀGd from dense J and H on the fresh line-search batches, clipped to [α_min, 1]; the
    true loss there by brute force; α_i = the minimizer of the parabola through L(0), the exact slope gᵀJd
    and L(α_q); the better of the two is taken (both lower the loss here)."""
    case = CASES[case_name]
    model = case.make_model(0)
    names = names_of(model)
    gen = torch.Generator().manual_seed(61)
    inner_b = [case.make_batch(gen) for _ in range(2)]
    # Random labels do not generalize: the "fresh" line-search draws reuse the inner data, weighted
    # differently (b0 twice), so the reference must use exactly the three batches after the inner ones.
    ls_b = [inner_b[0], inner_b[1], inner_b[0]]
    eta = 6.0 if case_name == "mlp_ce_masked" else 0.5
    ls = LineSearch(kind="model", num_batches=3, alpha_min=0.01)
    gn = GaussNewton(model, case.loss, inner_steps=2, inner=sgd(eta), inner_clip=None, line_search=ls)
    theta0 = theta_flat(model)
    params0 = unflat(theta0, params_of(model), names)
    rec = gn.step(iter(inner_b + ls_b))
    d = theta_hat_flat(gn, names) - theta0
    Ds = [dense(case, model, params0, b, names) for b in ls_b]
    slope = sum(float(D.gz @ (D.J @ d)) for D in Ds) / 3
    curvature = sum(float((D.J @ d) @ (D.H @ (D.J @ d))) for D in Ds) / 3
    alpha_q = min(max(-slope / curvature, 0.01), 1.0)
    l0 = sum(D.loss for D in Ds) / 3

    def brute(a: float) -> float:
        return loss_at(case, model, unflat(theta0 + a * d, params0, names), ls_b)

    assert rec.ls_kind == "model" and rec.ls_micro_batches == 3
    assert rec.ls_loss_at_theta == pytest.approx(l0, rel=1e-12)
    assert rec.alphas[0] == pytest.approx(alpha_q, rel=1e-9)
    assert 0.01 < rec.alphas[0] < 1.0, "tune eta: the model's α should be interior"
    lq = brute(alpha_q)
    c = 2 * (lq - l0 - alpha_q * slope) / alpha_q**2  # the true loss's parabola along d
    alpha_i = min(max(-slope / c, 0.01), 1.0)
    if abs(alpha_i - alpha_q) > 0.1 * alpha_q:  # the correction is evaluated too
        assert len(rec.alphas) == 2 and rec.alphas[1] == pytest.approx(alpha_i, rel=1e-8)
        assert rec.ls_losses == [pytest.approx(lq, rel=1e-12), pytest.approx(brute(rec.alphas[1]), rel=1e-12)]
    else:  # α_q was close enough: one forward per batch
        assert len(rec.alphas) == 1 and rec.ls_losses == [pytest.approx(lq, rel=1e-12)]
    assert len(rec.alphas) == (2 if case_name == "llama_ce_masked" else 1)  # both paths are exercised
    assert rec.ls_corrected == (len(rec.alphas) == 2) and rec.ls_backtracks == 0
    k = min(range(len(rec.alphas)), key=lambda j: rec.ls_losses[j])
    assert rec.ls_losses[k] < l0 and rec.alpha == rec.alphas[k]
    assert rel_err(theta_flat(model), theta0 + rec.alpha * d) < 1e-13
    pred = -(rec.alpha * slope + 0.5 * rec.alpha**2 * curvature)
    assert rec.predicted_decrease == pytest.approx(pred, rel=1e-9)
    assert rec.rho == pytest.approx((l0 - rec.ls_losses[k]) / pred, rel=1e-8)


def test_model_line_search_backtracks_then_stays_when_the_model_is_wrong() -> None:
    """Linear + MSE: the GN model is exact and CG lands on θ* (α_q = 1). The model (GuardedLinear) blows up
    beyond a norm, which the GN model cannot know: α = 1 is NaN, so the search halves to 1/2 (finite and a
    decrease). With no halvings left it stays at θ_t (α = 0, θ unchanged, the inner loop restarts); with
    no finite loss at θ_t either the step is rejected."""
    X, Y = _linear_data(torch.Generator().manual_seed(62))
    star = _lstsq(X, Y)
    cg = CG(tol=1e-12, max_iters=50)
    model = GuardedLinear(limit=0.6 * float(star.norm()), bad=float("nan"))
    gn = GaussNewton(model, MSELoss(), inner_steps=1, inner=cg,
                     line_search=LineSearch(kind="model", source="inner"))
    rec = gn.step(iter([(X, Y)]))
    assert rec.alphas == [pytest.approx(1.0, rel=1e-10), pytest.approx(0.5, rel=1e-10)]
    assert math.isnan(rec.ls_losses[0]) and rec.ls_losses[1] < rec.ls_loss_at_theta
    assert rec.alpha == rec.alphas[1] and not rec.rejected
    assert not rec.ls_corrected and rec.ls_backtracks == 1  # no parabola through a NaN
    assert rel_err(theta_flat(model), rec.alpha * star) < 1e-9

    model = GuardedLinear(limit=0.6 * float(star.norm()), bad=float("nan"))
    gn = GaussNewton(model, MSELoss(), inner_steps=1, inner=cg,
                     line_search=LineSearch(kind="model", source="inner", max_backtracks=0))
    theta0 = theta_flat(model)
    rec = gn.step(iter([(X, Y)]))
    assert rec.alphas == [pytest.approx(1.0), 0.0] and rec.alpha == 0.0 and not rec.rejected
    assert rec.ls_losses[1] == rec.ls_loss_at_theta
    assert torch.equal(theta_flat(model), theta0) and rec.reset_inner
    assert torch.equal(theta_hat_flat(gn, names_of(model)), theta0)

    model = GuardedLinear(limit=0.1, bad=float("nan"))
    with torch.no_grad():
        model.bias.fill_(1.0)  # θ_t itself is past the limit: no finite loss anywhere
    theta0 = theta_flat(model)
    gn = GaussNewton(model, MSELoss(), inner_steps=1, inner=sgd(0.1), inner_clip=None,
                     line_search=LineSearch(kind="model", source="inner"))
    rec = gn.step(iter([(X, Y)]))
    assert rec.rejected and rec.alpha is None and torch.equal(theta_flat(model), theta0)


# ======================================================================== the model-scaled warm start
def _carried(gn: GaussNewton, names: list[str], theta: Tensor, delta: Tensor) -> None:
    """Put the inner iterate at θ + Δ, as a previous outer step would have left it."""
    vec = theta + delta
    o = 0
    with torch.no_grad():
        for blk in gn._blocks:
            for n in blk.names:
                k = blk.theta_hat[n].numel()
                blk.theta_hat[n].copy_(vec[o:o + k].view_as(blk.theta_hat[n]))
                o += k
            blk.at_origin = False
    assert [n for blk in gn._blocks for n in blk.names] == names


@pytest.mark.parametrize(
    "case_name,kind",
    [("mlp_ce_masked", "shrink"), ("mlp_ce_masked", "ascent"), ("mlp_ce_masked", "keep"),
     ("llama_ce_masked", "shrink")],  # (the dense LLaMA Jacobian is the slow part: one case)
)
@pytest.mark.parametrize("layerwise", [False, True], ids=["full", "layerwise"])
def test_warm_scale_equals_dense_reference(case_name: str, kind: str, layerwise: bool) -> None:
    """A carried iterate Δ_c is scaled per block by s_b = clip(−g_zᵀJ_bΔ_b / (J_bΔ_b)ᵀH(J_bΔ_b), 0, 1) on the
    first inner micro-batch, then the SGD inner steps run from s Δ_c (dense reference). Δ_c = −k·g with a
    large k (0 < s < 1), +g (an ascent: s = 0) and a short −g (s = 1)."""
    case = CASES[case_name]
    model = case.make_model(0)
    names = names_of(model)
    batch = case.make_batch(torch.Generator().manual_seed(63))
    partition = Partition.transformer(model) if layerwise and case_name == "llama_ce_masked" else None
    if layerwise and partition is None:
        partition = Partition.from_groups(model, [["0.weight", "0.bias"], ["2.weight", "2.bias"]])
    eta = 0.5
    gn = GaussNewton(model, case.loss, inner_steps=2, inner=sgd(eta), inner_clip=None, warm_scale=True,
                     partition=partition, line_search=LineSearch(kind="grid", ls_range=3, source="inner"))
    theta = theta_flat(model)
    D = dense(case, model, unflat(theta, params_of(model), names), batch, names)
    g = D.g
    G = D.G()
    k = {"shrink": 50.0 / float(g.norm()), "ascent": -1.0, "keep": 1e-4}[kind]
    delta_c = -k * g
    _carried(gn, names, theta, delta_c)
    sizes = [sum(p.numel() for n, p in model.named_parameters() if n in blk) for blk in gn.partition.blocks]
    scales, delta, o = [], delta_c.clone(), 0
    for size in sizes:
        sl = slice(o, o + size)
        db = torch.zeros_like(delta_c)
        db[sl] = delta_c[sl]
        slope, curv = float(g @ db), float(db @ G @ db)
        s = min(max(-slope / curv, 0.0), 1.0) if slope < 0 else 0.0
        scales.append(s)
        delta[sl] *= s
        o += size
    q_carried = sum(float(g[o2:o2 + sz] @ delta_c[o2:o2 + sz]) + 0.5 * float(
        delta_c[o2:o2 + sz] @ G[o2:o2 + sz, o2:o2 + sz] @ delta_c[o2:o2 + sz])
        for o2, sz in zip([sum(sizes[:i]) for i in range(len(sizes))], sizes, strict=True))
    q_start = 0.0
    for o2, sz in zip([sum(sizes[:i]) for i in range(len(sizes))], sizes, strict=True):
        db = torch.zeros_like(delta)
        db[o2:o2 + sz] = delta[o2:o2 + sz]
        q_start += D.quad(db)
    delta = jacobi_sgd(D, delta, sizes, eta, 2)  # SGD on the block-diagonal model from the scaled iterate
    rec = gn.step(iter([batch] * 2))
    assert rec.warm_scales == pytest.approx(scales, rel=1e-9, abs=1e-12)
    if kind == "shrink":
        assert all(0.0 < s < 1.0 for s in scales)
    elif kind == "ascent":
        assert scales == [0.0] * len(sizes)
    else:
        assert scales == [1.0] * len(sizes)
    assert rec.q_carried == pytest.approx(q_carried, rel=1e-9, abs=1e-14)
    assert rec.q_start == pytest.approx(q_start, rel=1e-9, abs=1e-14)
    assert rec.q_start <= 1e-12  # the inner loop never starts worse than θ_t under the model
    assert rel_err(theta_hat_flat(gn, names) - theta, delta) < 1e-10


def test_warm_scale_off_is_the_papers_warm_start() -> None:
    """warm_scale=False: the carried iterate, even an ascent under the model, is used as it is."""
    case = CASES["mlp_ce_masked"]
    model = case.make_model(0)
    names = names_of(model)
    batch = case.make_batch(torch.Generator().manual_seed(64))
    gn = GaussNewton(model, case.loss, inner_steps=1, inner=sgd(0.5), inner_clip=None,
                     line_search=LineSearch(kind="grid", ls_range=3, source="inner"))
    theta = theta_flat(model)
    D = dense(case, model, unflat(theta, params_of(model), names), batch, names)
    delta_c = D.g.clone()  # an ascent direction
    _carried(gn, names, theta, delta_c)
    rec = gn.step(iter([batch]))
    assert rec.warm_scales == [] and rec.q_carried == rec.q_start
    assert rec.q_start == pytest.approx(D.quad(delta_c), rel=1e-9) and rec.q_start > 0
    assert rel_err(theta_hat_flat(gn, names) - theta, delta_c - 0.5 * D.gn_grad(delta_c)) < 1e-10
