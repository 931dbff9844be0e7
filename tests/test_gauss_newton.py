"""The GaussNewton optimizer checked end to end against independent float64 references.

References (``_gn_reference``): dense Jacobians by batched reverse-mode autograd of a copy of the model
(LLaMA copies run explicit-softmax attention), closed-form output Hessians, autograd of the
``torch.nn.functional`` losses, ``torch.linalg`` solves / pseudo-inverses / least squares, and brute-force
evaluation of the true loss along the search direction.

The models are float64 while the default dtype stays float32: a float32 temporary inside gnopt would show
up as a ~1e-7 error.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from _gn_reference import (
    CASES,
    Dense,
    dense,
    flat,
    forward,
    jacobi_sgd,
    loss_at,
    mlp_ce_batch,
    names_of,
    params_of,
    prox_grad,
    prox_value,
    tiny_llama,
    tiny_mlp,
    unflat,
)
from _helpers import rel_err, theta_flat
from torch import Tensor, nn

from gnopt.errors import GnoptError
from gnopt.optim import (
    CG,
    GaussNewton,
    InnerSchedule,
    LineSearch,
    MSELoss,
    MuonAdamW,
    Partition,
    SoftmaxCrossEntropy,
    TorchOptimizer,
)
from gnopt.optim.line_search import select

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops on 2 shared cores: one thread


def theta_hat_flat(gn: GaussNewton, names: list[str]) -> Tensor:
    merged = {n: v for blk in gn._blocks for n, v in blk.theta_hat.items()}
    return flat(merged, names).clone()


def sgd(lr: float, momentum: float = 0.0) -> TorchOptimizer:
    return TorchOptimizer(lambda ps: torch.optim.SGD(ps, lr=lr, momentum=momentum))


# ======================================================================== 1. the inner gradient actually used
# Inner learning rates chosen so that the first line search takes α < 1: the second outer step then starts
# from a warm inner iterate θ̂ ≠ θ_1 (Δ ≠ 0), which the reference must reproduce.
ETA = {  # (case, config) -> η; the first α is then 0.35 … 0.71
    ("mlp_ce_masked", "gn"): 6.0, ("mlp_ce_masked", "gn-damped"): 5.0, ("mlp_ce_masked", "prox"): 9.0,
    ("mlp_mse", "gn"): 3.0, ("mlp_mse", "gn-damped"): 3.0, ("mlp_mse", "prox"): 3.5,
    ("llama_ce_masked", "gn"): 0.5, ("llama_ce_masked", "gn-damped"): 0.6, ("llama_ce_masked", "prox"): 0.7,
}


@pytest.mark.parametrize("case_name", ["mlp_ce_masked", "mlp_mse", "llama_ce_masked"])
@pytest.mark.parametrize(
    "config,mode,damping,prox,cosine",
    [("gn", "gn", 0.0, 0.0, False), ("gn-damped", "gn", 0.3, 0.1, True),
     ("prox", "prox_linear", 0.2, 0.0, True)],
    ids=["gn", "gn-damped-prox-cosine", "prox_linear-damped-cosine"],
)
def test_inner_sgd_iterates_equal_dense_reference(
    case_name: str, config: str, mode: str, damping: float, prox: float, cosine: bool
) -> None:
    """Two outer steps of GN with SGD inner steps on a repeated batch, warm start, line search on the inner
    batches: θ̂ after each inner loop equals hand-computed SGD on the dense model
    (gn: ∇ = Jᵀ(g_z + H_z JΔ) + (λ+μ)Δ; prox-linear: ∇ = Jᵀ∇L(z₀ + JΔ) + (λ+μ)Δ), with the schedule's
    learning-rate factors; the record's loss, model values and line search match the dense reference."""
    case = CASES[case_name]
    model = case.make_model(0)
    names = names_of(model)
    batch = case.make_batch(torch.Generator().manual_seed(11))
    eta, n_inner, n_outer = ETA[case_name, config], 2, 2
    schedule = (
        InnerSchedule("constant_with_inner_cosine", total_outer_steps=n_outer, inner_steps=n_inner,
                      min_ratio=0.5)
        if cosine else InnerSchedule("constant")
    )
    ls = LineSearch(kind="grid", ls_range=6, source="inner")
    gn = GaussNewton(model, case.loss, inner_steps=n_inner, mode=mode, inner=sgd(eta), inner_clip=None,
                     warm_scale=False,
                     line_search=ls, schedule=schedule, damping=damping, prox=prox)
    reg = damping + prox
    theta_hat_prev: Tensor | None = None
    for t in range(n_outer):
        theta_t = theta_flat(model)
        params_t = unflat(theta_t, params_of(model), names)
        D: Dense = dense(case, model, params_t, batch, names)
        delta = torch.zeros_like(theta_t) if theta_hat_prev is None else theta_hat_prev - theta_t
        if t > 0:
            assert float(delta.norm()) > 1e-3 * float(theta_t.norm())  # really a warm start

        def model_value(dv: Tensor, D: Dense = D) -> float:
            base = D.quad(dv) if mode == "gn" else prox_value(case, D, batch[1], dv) - D.loss
            return base + 0.5 * reg * float(dv @ dv)

        q_first = model_value(delta)
        grad_first = None
        for i in range(n_inner):
            q_last = model_value(delta)
            grad = (D.gn_grad(delta) if mode == "gn" else prox_grad(case, D, batch[1], delta)) + reg * delta
            grad_first = grad if grad_first is None else grad_first
            delta = delta - eta * schedule(t, i) * grad

        rec = gn.step(iter([batch] * n_inner))
        got_hat = theta_hat_flat(gn, names)
        ref_hat = theta_t + delta
        assert rel_err(got_hat - theta_t, delta) < 1e-10, f"step {t}"
        assert rec.lr_factor == pytest.approx(schedule(t, 0), abs=0)  # the loop's starting multiplier
        assert rec.loss == pytest.approx(D.loss, rel=1e-12)
        assert rec.q_start == pytest.approx(q_first, rel=1e-9, abs=1e-14)
        assert rec.q_end == pytest.approx(q_last, rel=1e-9, abs=1e-14)
        assert rec.inner_grad_norm_first == pytest.approx(float(grad_first.norm()), rel=1e-10)

        # Line search on θ_t + α d against brute force (the batch repeated: same mean).
        d = ref_hat - theta_t
        alphas = ls.alphas()
        brute = [loss_at(case, model, unflat(theta_t + a * d, params_t, names), [batch]) for a in alphas]
        assert rec.alphas == alphas
        assert max(abs(a - b) for a, b in zip(rec.ls_losses, brute, strict=True)) < 1e-12
        k = min(range(len(alphas)), key=lambda j: brute[j])
        assert rec.alpha == alphas[k]
        if t == 0:
            assert rec.alpha < 1.0, "tune ETA: the warm start of step 1 must be non-trivial"
        # The model decrease predicted along α d (GN quadratic or linearized loss, without the damping term).
        step = rec.alpha * d
        pred = -D.quad(step) if mode == "gn" else D.loss - prox_value(case, D, batch[1], step)
        assert rec.predicted_decrease == pytest.approx(pred, rel=1e-9)
        assert rec.actual_decrease == pytest.approx(D.loss - brute[k], rel=1e-9, abs=1e-14)
        assert rel_err(theta_flat(model), theta_t + rec.alpha * (got_hat - theta_t)) < 1e-14
        theta_hat_prev = got_hat


@pytest.mark.parametrize("case_name", ["mlp_ce_masked", "llama_ce_masked"])
def test_layerwise_sgd_inner_is_jacobi_on_block_quadratics(case_name: str) -> None:
    """Layerwise GN with SGD inner steps: each block b steps on ∇ = J_bᵀ(g_z + H_z J_b Δ_b), every other block
    frozen at θ_t (Jacobi; cross-block curvature ignored). Reference: dense J sliced per block. Two outer
    steps, warm start; MLP: 2 blocks, LLaMA: the transformer partition (4 blocks)."""
    case = CASES[case_name]
    model = case.make_model(0)
    names = names_of(model)
    if case_name == "mlp_ce_masked":
        partition, eta = Partition.from_groups(model, MLP_BLOCKS), 6.0
    else:
        partition, eta = Partition.transformer(model), 0.5
    sizes = [sum(p.numel() for n, p in model.named_parameters() if n in blk) for blk in partition.blocks]
    assert [n for blk in partition.blocks for n in blk] == names  # contiguous slices of the flat vector
    batch = case.make_batch(torch.Generator().manual_seed(12))
    gn = GaussNewton(model, case.loss, inner_steps=2, inner=sgd(eta), inner_clip=None, partition=partition,
                     warm_scale=False,
                     line_search=LineSearch(kind="grid", ls_range=6, source="inner"))
    theta_hat_prev: Tensor | None = None
    for t in range(2):
        theta_t = theta_flat(model)
        D = dense(case, model, unflat(theta_t, params_of(model), names), batch, names)
        delta = torch.zeros_like(theta_t) if theta_hat_prev is None else theta_hat_prev - theta_t
        delta = jacobi_sgd(D, delta, sizes, eta, 2)
        rec = gn.step(iter([batch] * 2))
        got = theta_hat_flat(gn, names)
        assert rel_err(got - theta_t, delta) < 1e-10, f"step {t}"
        # Not the full-GN iterate: the blocks really are decoupled.
        full = -eta * D.g
        full = full - eta * D.gn_grad(full) if t == 0 else None
        if full is not None:
            assert rel_err(full, delta) > 1e-6
        assert rel_err(theta_flat(model), theta_t + rec.alpha * (got - theta_t)) < 1e-14
        theta_hat_prev = got
    assert rec.alpha is not None


# ======================================================================== 2. exact inner solve (CG)
def _cg_gn(model: nn.Module, loss, n_inner: int, damping: float, partition=None) -> GaussNewton:
    return GaussNewton(
        model, loss, inner_steps=n_inner, inner=CG(tol=1e-12, max_iters=200), damping=damping,
        line_search=LineSearch(kind="grid", ls_range=1, source="inner", model_decrease=False),
        partition=partition,
    )


MLP_BLOCKS = [["0.weight", "0.bias"], ["2.weight", "2.bias"]]


@pytest.mark.parametrize("layerwise", [False, True], ids=["full", "layerwise"])
@pytest.mark.parametrize("lam", [0.05, 0.0])
def test_cg_direction_is_damped_gn_solve(layerwise: bool, lam: float) -> None:
    """α = 1 and d = θ_{t+1} − θ_t equals −(G + λI)⁻¹ g (λ > 0) or −pinv(G) g (λ = 0, G singular), with
    G, g averaged over the inner micro-batches; layerwise: the block-diagonal of G, solved per block."""
    case = CASES["mlp_ce_masked"]
    model = case.make_model(0)
    names = names_of(model)
    gen = torch.Generator().manual_seed(21)
    if lam > 0:
        batches = [case.make_batch(gen), case.make_batch(gen)]
    else:  # one batch twice: 9 counted tokens × rank 4 < 65 parameters, so G is singular
        b = case.make_batch(gen)
        batches = [b, b]
    params = params_of(model)
    Ds = [dense(case, model, params, b, names) for b in batches]
    G = sum(D.G() for D in Ds) / len(Ds)
    g = sum(D.g for D in Ds) / len(Ds)
    P = G.shape[0]
    sizes = [sum(params[n].numel() for n in blk) for blk in MLP_BLOCKS] if layerwise else [P]
    ref = torch.zeros(P, dtype=F64)
    o, singular = 0, False
    for s in sizes:
        Gb, gb = G[o:o + s, o:o + s], g[o:o + s]
        if lam > 0:
            ref[o:o + s] = -torch.linalg.solve(Gb + lam * torch.eye(s, dtype=F64), gb)
        else:
            ref[o:o + s] = -torch.linalg.pinv(Gb, hermitian=True, rtol=1e-10) @ gb
            singular = singular or int(torch.linalg.matrix_rank(Gb)) < s
        o += s
    assert lam > 0 or singular  # the pseudo-inverse case is real
    partition = Partition.from_groups(model, MLP_BLOCKS) if layerwise else None
    gn = _cg_gn(model, case.loss, len(batches), lam, partition)
    theta0 = theta_flat(model)
    rec = gn.step(iter(batches))
    assert rec.alpha == 1.0 and not rec.rejected
    d = theta_flat(model) - theta0
    err = rel_err(d, ref)
    assert err < (1e-9 if lam > 0 else 1e-7), err
    assert max(rec.cg_rel_residual) < 1e-10
    assert rec.loss == pytest.approx(sum(D.loss for D in Ds) / len(Ds), rel=1e-12)
    if layerwise:  # the block-diagonal solve differs from the full one: the test can tell them apart
        full = -torch.linalg.solve(G + lam * torch.eye(P, dtype=F64), g) if lam > 0 else -torch.linalg.pinv(
            G, hermitian=True, rtol=1e-10) @ g
        assert rel_err(d, full) > 1e-3


def test_cg_direction_llama_damped_equals_output_space_solve() -> None:
    """Tiny LLaMA, λ > 0: d = −(JᵀHJ + λI)⁻¹ Jᵀg_z = −Jᵀ(HJJᵀ + λI)⁻¹ g_z (push-through identity; the
    132 × 132 output-space system is solved densely, G itself has 21k² entries)."""
    case = CASES["llama_ce_masked"]
    model = case.make_model(0)
    names = names_of(model)
    batch = case.make_batch(torch.Generator().manual_seed(22))
    lam = 1e-3
    D = dense(case, model, params_of(model), batch, names)
    K = D.H @ D.J @ D.J.T
    ref = -D.J.T @ torch.linalg.solve(K + lam * torch.eye(K.shape[0], dtype=F64), D.gz)
    gn = _cg_gn(model, case.loss, 1, lam)
    theta0 = theta_flat(model)
    rec = gn.step(iter([batch]))
    assert rec.alpha == 1.0
    assert rel_err(theta_flat(model) - theta0, ref) < 1e-9
    assert rec.cg_rel_residual[0] < 1e-10


@pytest.mark.parametrize("which", ["mlp", "llama"])
def test_one_block_partition_is_bitwise_full_gn(which: str) -> None:
    """Partition.from_groups(model, [all names]) and partition=None: identical θ, θ̂ and records."""
    case = CASES["mlp_ce_masked" if which == "mlp" else "llama_ce_masked"]
    runs = []
    for use_partition in (False, True):
        model = case.make_model(0)
        part = Partition.from_groups(model, [names_of(model)]) if use_partition else None
        gn = GaussNewton(model, case.loss, inner_steps=2, partition=part,
                         inner=MuonAdamW(lr=0.02, adam_lr=0.01), ema_decay=0.5)
        gen = torch.Generator().manual_seed(31)
        batches = iter([case.make_batch(gen) for _ in range(8)])
        recs = [gn.step(batches) for _ in range(2)]
        runs.append((theta_flat(model), theta_hat_flat(gn, names_of(model)), recs))
    (t0, h0, r0), (t1, h1, r1) = runs
    assert torch.equal(t0, t1) and torch.equal(h0, h1)
    skip = {"time_inner", "time_line_search", "block_seconds", "shared_forward_seconds"}
    for a, b in zip(r0, r1, strict=True):
        da = {k: v for k, v in a.to_dict().items() if k not in skip}
        db = {k: v for k, v in b.to_dict().items() if k not in skip}
        assert da == db
    assert r0[-1].direction_norm > 0


def test_adaptive_damping_follows_rho_and_feeds_the_solve() -> None:
    """CG with adapt_damping over 3 outer steps: λ_{t+1} = λ_t·2/3 if ρ > 3/4, ·3/2 if ρ < 1/4, else λ_t
    (ρ from the record), and every step solves with the λ in force: d_t = −(G_t + λ_t I)⁻¹ g_t (dense)."""
    case = CASES["mlp_ce_masked"]
    model = case.make_model(0)
    names = names_of(model)
    gen = torch.Generator().manual_seed(23)
    lam = 0.05
    gn = GaussNewton(model, case.loss, inner_steps=1, inner=CG(tol=1e-12, max_iters=200), damping=lam,
                     adapt_damping=True, line_search=LineSearch(kind="grid", ls_range=3, source="inner"))
    seen = set()
    for _ in range(3):
        b = case.make_batch(gen)
        theta_t = theta_flat(model)
        D = dense(case, model, unflat(theta_t, params_of(model), names), b, names)
        d_ref = -torch.linalg.solve(D.G() + lam * torch.eye(D.J.shape[1], dtype=F64), D.g)
        rec = gn.step(iter([b]))
        assert rec.damping == lam
        assert rel_err(theta_hat_flat(gn, names) - theta_t, d_ref) < 1e-9
        assert rec.rho is not None
        want = lam * (2 / 3 if rec.rho > 0.75 else 1.5 if rec.rho < 0.25 else 1.0)
        seen.add("down" if rec.rho > 0.75 else "up" if rec.rho < 0.25 else "same")
        assert gn.damping == pytest.approx(want, rel=1e-15)
        lam = gn.damping
    assert "down" in seen or "up" in seen  # λ did move


def test_adaptive_damping_rises_after_failed_steps() -> None:
    """A step that fails counts as the worst ρ (Levenberg-Marquardt): λ ×3/2. Here λ is far too small and
    the inner optimizer climbs the model (SGD with ``maximize=True``), so no step size of the model search
    lowers the loss: α = 0, θ stays, ρ is undefined (0/0), and λ must still rise every step; a step
    rejected outright (no finite loss at θ_t) raises it too."""
    case = CASES["mlp_ce_masked"]
    gen = torch.Generator().manual_seed(31)
    lam = 1e-6
    model = case.make_model(0)
    gn = GaussNewton(model, case.loss, inner_steps=1, damping=lam, adapt_damping=True, inner_clip=None,
                     inner=TorchOptimizer(lambda ps: torch.optim.SGD(ps, lr=0.5, maximize=True)),
                     line_search=LineSearch(kind="model", source="inner"))  # d = +0.5 ∇L: an ascent
    theta0 = theta_flat(model)
    for t in range(3):
        rec = gn.step(iter([case.make_batch(gen)]))
        assert rec.alpha == 0.0 and rec.rho is None and rec.damping == pytest.approx(lam * 1.5 ** t)
        assert gn.damping == pytest.approx(lam * 1.5 ** (t + 1), rel=1e-12)
    assert torch.equal(theta_flat(model), theta0)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    rec = gn.step(iter([case.make_batch(gen)]))
    assert rec.rejected and rec.alpha is None
    assert gn.damping == pytest.approx(lam * 1.5 ** 4, rel=1e-12)


def test_ema_and_warm_start_off() -> None:
    """EMA of the outer iterates: e_1 = θ_1, e_t = d·e_{t−1} + (1 − d)·θ_t; with warm_start=False every
    step restarts θ̂ at θ_{t+1} with a fresh inner optimizer (no momentum state)."""
    case = CASES["mlp_ce_masked"]
    model = case.make_model(0)
    names = names_of(model)
    gen = torch.Generator().manual_seed(24)
    decay = 0.7
    gn = GaussNewton(model, case.loss, inner_steps=2, inner=sgd(1.0, momentum=0.9), inner_clip=None,
                     warm_start=False, ema_decay=decay)
    ema = None
    for _ in range(3):
        rec = gn.step(iter([case.make_batch(gen) for _ in range(4)]))
        theta = theta_flat(model)
        ema = theta.clone() if ema is None else decay * ema + (1 - decay) * theta
        assert rec.reset_inner
        assert torch.equal(theta_hat_flat(gn, names), theta)
        assert not gn._blocks[0].optimizer.state  # fresh: no momentum buffers
    with gn.ema_weights():
        assert rel_err(theta_flat(model), ema) < 1e-14
    assert torch.equal(theta_flat(model), theta)  # restored after the context
    assert rel_err(ema, theta) > 1e-6


def test_configuration_errors_are_gnopt_errors() -> None:
    model = tiny_mlp()
    loss = SoftmaxCrossEntropy()
    bad = [
        (dict(mode="newton"), "unknown GN mode"),
        (dict(inner_steps=0), "inner_steps must be >= 1"),
        (dict(damping=-1.0), "damping and prox must be >= 0"),
        (dict(ema_decay=1.0), "ema_decay must lie in"),
        (dict(mode="prox_linear", inner=CG()), "CG inner solver solves the quadratic"),
        (dict(adapt_damping=True), "adapt_damping needs a positive initial damping"),
        (dict(adapt_damping=True, damping=0.1, line_search=LineSearch(kind="grid", model_decrease=False)),
         "model_decrease=True"),
        (dict(partition="rows"), "partition must be None"),
    ]
    for kw, msg in bad:
        kw = {"inner_steps": 1, **kw}
        with pytest.raises(GnoptError, match=msg):
            GaussNewton(model, loss, **kw)
    for kw, msg in [(dict(ls_range=0), "ls_range"), (dict(source="old"), "source"),
                    (dict(num_batches=0), "num_batches"), (dict(reset_below=1.5), "reset_below")]:
        with pytest.raises(GnoptError, match=msg):
            LineSearch(**kw)
    gn = GaussNewton(model, loss, inner_steps=3)
    with pytest.raises(GnoptError, match="batch iterator ran out"):
        gn.step(iter([mlp_ce_batch(torch.Generator().manual_seed(0))]))


def test_frozen_parameters_stay_and_the_solve_is_over_trainable_ones() -> None:
    """requires_grad=False parameters are not part of θ: they never move, and the CG step solves the
    damped GN system of the trainable columns of J only."""
    case = CASES["mlp_ce_masked"]
    model = case.make_model(0)
    model[0].bias.requires_grad_(False)
    frozen = model[0].bias.detach().clone()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    b = case.make_batch(torch.Generator().manual_seed(25))
    params = params_of(model)
    D = dense(case, model, params, b, names)
    lam = 0.05
    ref = -torch.linalg.solve(D.G() + lam * torch.eye(D.J.shape[1], dtype=F64), D.g)
    theta0 = flat(params, names)
    gn = _cg_gn(model, case.loss, 1, lam)
    gn.step(iter([b]))
    assert torch.equal(model[0].bias.detach(), frozen)
    assert rel_err(flat(params_of(model), names) - theta0, ref) < 1e-9


# ======================================================================== 3. linear least squares
def _linear_data(gen: torch.Generator, n: int = 20) -> tuple[Tensor, Tensor]:
    X = torch.randn(n, 3, dtype=F64, generator=gen)
    A = torch.randn(3, 2, dtype=F64, generator=gen)
    Y = X @ A + torch.tensor([0.5, -1.0], dtype=F64) + 0.3 * torch.randn(n, 2, dtype=F64, generator=gen)
    return X, Y


def _lstsq(X: Tensor, Y: Tensor) -> Tensor:
    """Least-squares [W; b] of Y ≈ X Wᵀ + b, flattened like nn.Linear's (weight, bias)."""
    Xa = torch.cat([X, torch.ones(X.shape[0], 1, dtype=F64)], dim=1)
    sol = torch.linalg.lstsq(Xa, Y).solution  # [4, 2]
    return torch.cat([sol[:3].T.reshape(-1), sol[3]])


def test_linear_mse_one_gn_step_is_least_squares() -> None:
    """nn.Linear(3, 2) + MSE over two equal micro-batches: one CG step (α = 1) lands on lstsq([X, 1], Y)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    X, Y = _linear_data(torch.Generator().manual_seed(41))
    ref = _lstsq(X, Y)
    assert rel_err(theta_flat(model), ref) > 0.1
    gn = _cg_gn(model, MSELoss(), 2, 0.0)
    rec = gn.step(iter([(X[:10], Y[:10]), (X[10:], Y[10:])]))
    assert rec.alpha == 1.0
    assert rel_err(theta_flat(model), ref) < 1e-10


# ======================================================================== 5. line search
def test_select_is_the_smallest_finite_loss() -> None:
    nan, inf = float("nan"), float("inf")
    cases = [
        ([3.0, 1.0, 2.0], 1),
        ([nan, 5.0, 4.0, inf], 2),
        ([-inf, 2.0, 1.0], 2),  # -inf is not finite either
        ([1.0, 1.0, 0.5, 0.5], 2),  # ties: the earlier (larger α)
        ([nan, nan], None),
        ([inf, -inf, nan], None),
    ]
    for losses, want in cases:
        finite = [(v, k) for k, v in enumerate(losses) if math.isfinite(v)]
        brute = min(finite)[1] if finite else None
        assert brute == want
        assert select([0.0] * len(losses), losses) == want
    gen = torch.Generator().manual_seed(51)
    for _ in range(20):
        vals = torch.randn(7, generator=gen, dtype=F64)
        vals[torch.rand(7, generator=gen) < 0.3] = float("nan")
        losses = [float(v) for v in vals]
        finite = [(v, k) for k, v in enumerate(losses) if math.isfinite(v)]
        assert select([0.0] * 7, losses) == (min(finite)[1] if finite else None)


def test_line_search_takes_interior_argmin_on_fresh_batches() -> None:
    """An overshooting inner step: the true loss along d is minimized at an interior grid point; GN takes
    it (brute force over the fresh line-search batches only), reports the dense predicted decrease and ρ."""
    case = CASES["mlp_ce_masked"]
    model = case.make_model(0)
    names = names_of(model)
    gen = torch.Generator().manual_seed(52)
    inner_b = [case.make_batch(gen) for _ in range(2)]
    # Random labels do not generalize: the "fresh" line-search draws reuse the inner data, weighted
    # differently (b0 twice), so the brute force must use exactly the three batches after the inner ones.
    ls_b = [inner_b[0], inner_b[1], inner_b[0]]
    ls = LineSearch(kind="grid", ls_range=8, source="fresh", num_batches=3)
    gn = GaussNewton(model, case.loss, inner_steps=2, inner=sgd(3.0), inner_clip=None, line_search=ls)
    theta0 = theta_flat(model)
    params0 = unflat(theta0, params_of(model), names)
    rec = gn.step(iter(inner_b + ls_b))
    d = theta_hat_flat(gn, names) - theta0
    alphas = ls.alphas()
    brute = [loss_at(case, model, unflat(theta0 + a * d, params0, names), ls_b) for a in alphas]
    k = min(range(len(alphas)), key=lambda j: brute[j])
    assert 0 < k < len(alphas) - 1, f"not an interior argmin: {brute}"
    assert max(abs(a - b) for a, b in zip(rec.ls_losses, brute, strict=True)) < 1e-12
    assert rec.alpha == alphas[k]
    assert rel_err(theta_flat(model), theta0 + alphas[k] * d) < 1e-14
    # Dense GN model on the line-search batches: predicted = −(α gᵀd + ½α² dᵀGd), ρ = actual / predicted.
    Ds = [dense(case, model, params0, b, names) for b in ls_b]
    pred = -sum(D.quad(alphas[k] * d) for D in Ds) / len(Ds)
    l0 = sum(D.loss for D in Ds) / len(Ds)
    assert rec.ls_loss_at_theta == pytest.approx(l0, rel=1e-12)
    assert rec.predicted_decrease == pytest.approx(pred, rel=1e-9)
    assert rec.rho == pytest.approx((l0 - brute[k]) / pred, rel=1e-8)
    assert rec.ls_micro_batches == 3 and rec.train_micro_batches == 2


class GuardedLinear(nn.Linear):
    """nn.Linear whose output turns non-finite once ‖(W, b)‖ exceeds ``limit`` (a model that blows up)."""

    def __init__(self, limit: float, bad: float) -> None:
        super().__init__(3, 2, dtype=F64)
        self.limit, self.bad = limit, bad
        with torch.no_grad():
            self.weight.zero_()
            self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        norm = torch.sqrt(self.weight.pow(2).sum() + self.bias.pow(2).sum())
        return out * self.bad if float(norm.detach()) > self.limit else out


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_line_search_never_takes_a_nonfinite_candidate(bad: float) -> None:
    """θ_0 = 0 and the CG step lands on θ* (lstsq), so candidate α has ‖θ‖ = α‖θ*‖. The model blows up for
    α ∈ {1, 1/√2}: the loss decreases towards α = 1, yet α = 1/2 (the best finite) is taken."""
    X, Y = _linear_data(torch.Generator().manual_seed(53))
    star = _lstsq(X, Y)
    model = GuardedLinear(limit=0.6 * float(star.norm()), bad=bad)
    ls = LineSearch(kind="grid", ls_range=3, source="inner")
    gn = GaussNewton(model, MSELoss(), inner_steps=1, inner=CG(tol=1e-12, max_iters=50), line_search=ls)
    rec = gn.step(iter([(X, Y)]))
    alphas = ls.alphas()
    assert not any(math.isfinite(v) for v in rec.ls_losses[:2])
    assert math.isfinite(rec.ls_losses[2])
    assert rec.alpha == alphas[2] and not rec.rejected
    assert rel_err(theta_flat(model), alphas[2] * star) < 1e-10
    assert math.isfinite(rec.rho)


def test_line_search_rejects_when_no_candidate_is_finite() -> None:
    """Every candidate blows up: θ unchanged (bitwise), record.rejected, record.alpha None, θ̂ back at θ_t;
    with include_zero=True the same step takes α = 0 instead (the loss at θ_t, checked by brute force)."""
    X, Y = _linear_data(torch.Generator().manual_seed(54))
    star = _lstsq(X, Y)
    for include_zero in (False, True):
        model = GuardedLinear(limit=0.1 * float(star.norm()), bad=float("nan"))
        with torch.no_grad():  # start away from 0 (inside the safe ball) so "unchanged" is not trivial
            model.bias.fill_(0.01)
        theta0 = theta_flat(model)
        ls = LineSearch(kind="grid", ls_range=3, source="inner", include_zero=include_zero)
        gn = GaussNewton(model, MSELoss(), inner_steps=1, inner=sgd(0.5, momentum=0.9), inner_clip=None,
                         line_search=ls)
        rec = gn.step(iter([(X, Y)]))
        assert torch.equal(theta_flat(model), theta0)
        if include_zero:
            assert not rec.rejected and rec.alpha == 0.0
            assert not any(math.isfinite(v) for v in rec.ls_losses[:-1])
            l0 = float(nn.functional.mse_loss(forward(model, params_of(model), X), Y))
            assert rec.ls_losses[-1] == pytest.approx(l0, rel=1e-13)
        else:
            assert rec.rejected and rec.alpha is None
            assert not any(math.isfinite(v) for v in rec.ls_losses)
            assert rec.reset_inner
            assert torch.equal(theta_hat_flat(gn, names_of(model)), theta0)
            assert not gn._blocks[0].optimizer.state  # the inner optimizer restarts fresh


def test_include_zero_and_reset_below() -> None:
    """Linear + MSE, one SGD inner step with a huge rate: d = −η g overshoots so far that every α > 0 is
    worse than θ_t (brute force). include_zero=True stays at θ_t (α = 0); without it the smallest grid α is
    taken, and reset_below then restarts θ̂ from θ_{t+1} keeping the inner optimizer's state."""
    gen = torch.Generator().manual_seed(55)
    X, Y = _linear_data(gen)
    eta = 50.0
    for include_zero, reset_below in ((True, None), (False, 0.75), (False, 0.4)):
        torch.manual_seed(1)
        model = nn.Linear(3, 2).double()
        names = names_of(model)
        theta0 = theta_flat(model)
        params0 = params_of(model)
        ls = LineSearch(kind="grid", ls_range=3, source="inner", include_zero=include_zero,
                        reset_below=reset_below)
        gn = GaussNewton(model, MSELoss(), inner_steps=1, inner=sgd(eta, momentum=0.9), inner_clip=None,
                         line_search=ls)
        rec = gn.step(iter([(X, Y)]))
        d = theta_hat_flat(gn, names) - theta0 if not rec.reset_inner else None
        # Brute force along the reference direction −η g (g by autograd of the true loss).
        model_ref = nn.Linear(3, 2).double()
        with torch.no_grad():
            model_ref.weight.copy_(params0["weight"])
            model_ref.bias.copy_(params0["bias"])
        nn.functional.mse_loss(model_ref(X), Y).backward()
        d_ref = -eta * torch.cat([model_ref.weight.grad.reshape(-1), model_ref.bias.grad])
        brute = [loss_at(CASES["mlp_mse"], model, unflat(theta0 + a * d_ref, params0, names), [(X, Y)])
                 for a in ls.alphas()]
        assert max(abs(a - b) for a, b in zip(rec.ls_losses, brute, strict=True)) < 1e-9 * max(brute)
        l0 = loss_at(CASES["mlp_mse"], model, params0, [(X, Y)])
        positive = [v for a, v in zip(ls.alphas(), brute, strict=True) if a > 0]
        assert min(positive) > l0  # every α > 0 overshoots
        if include_zero:
            assert rec.ls_losses[-1] == pytest.approx(l0, rel=1e-13)
            assert rec.alpha == 0.0 and not rec.rejected
            assert torch.equal(theta_flat(model), theta0)
            assert d is not None and rel_err(d, d_ref) < 1e-12  # θ̂ kept (warm start)
            continue
        assert rec.alpha == ls.alphas()[-1]
        theta1 = theta_flat(model)
        assert rel_err(theta1, theta0 + rec.alpha * d_ref) < 1e-12
        opt = gn._blocks[0].optimizer
        assert all("momentum_buffer" in opt.state[p] for p in gn._blocks[0].theta_hat.values())
        if reset_below is not None and rec.alpha < reset_below:
            assert rec.reset_inner
            assert torch.equal(theta_hat_flat(gn, names), theta1)
        else:
            assert not rec.reset_inner
            assert rel_err(theta_hat_flat(gn, names), theta0 + d_ref) < 1e-12


# ======================================================================== 6. non-finite micro-batches
def _nan_batch(gen: torch.Generator) -> tuple[Tensor, Tensor]:
    x, y = mlp_ce_batch(gen, masked=True)
    x[1, 2, 0] = float("nan")
    return x, y


def test_nonfinite_micro_batch_is_skipped_by_sgd_inner() -> None:
    """Inner batches [b, NaN-b, b]: the NaN step is skipped (inner_nonfinite = 1) and θ̂ equals two dense
    SGD steps on b; θ stays finite and equals θ_0 + α d."""
    case = CASES["mlp_ce_masked"]
    model = case.make_model(0)
    names = names_of(model)
    gen = torch.Generator().manual_seed(61)
    b = case.make_batch(gen)
    bad = _nan_batch(gen)
    ls_b = [case.make_batch(gen) for _ in range(3)]
    eta = 5.0
    theta0 = theta_flat(model)
    D = dense(case, model, unflat(theta0, params_of(model), names), b, names)
    delta = -eta * D.gn_grad(torch.zeros_like(theta0))
    delta = delta - eta * D.gn_grad(delta)
    gn = GaussNewton(model, case.loss, inner_steps=3, inner=sgd(eta), inner_clip=None,
                     line_search=LineSearch.paper())  # N = 3 fresh line-search batches: ls_b
    rec = gn.step(iter([b, bad, b] + ls_b))
    assert rec.inner_nonfinite == 1
    assert rel_err(theta_hat_flat(gn, names) - theta0, delta) < 1e-10
    theta1 = theta_flat(model)
    assert torch.isfinite(theta1).all() and rec.alpha is not None
    assert rel_err(theta1, theta0 + rec.alpha * delta) < 1e-12


def test_nonfinite_micro_batch_leaves_muon_adamw_state_untouched() -> None:
    """With Muon+AdamW (and clipping) a NaN micro-batch is a no-op: [b1, NaN, b2] gives bitwise the θ̂ and θ
    of [b1, b2] (constant schedule), over two outer steps."""
    case = CASES["mlp_ce_masked"]
    results = []
    for with_nan in (False, True):
        model = case.make_model(0)
        gen = torch.Generator().manual_seed(62)
        seq = []
        for _ in range(2):
            b1, b2, l1, l2 = (case.make_batch(gen) for _ in range(4))
            bad = _nan_batch(gen)
            seq += [b1, bad, b2, l1, l2] if with_nan else [b1, b2, l1, l2]
        gn = GaussNewton(model, case.loss, inner_steps=3 if with_nan else 2,
                         inner=MuonAdamW(lr=0.02, adam_lr=0.01), schedule=InnerSchedule("constant"),
                         line_search=LineSearch(kind="grid", ls_range=4, num_batches=2))
        it = iter(seq)
        recs = [gn.step(it) for _ in range(2)]
        assert [r.inner_nonfinite for r in recs] == ([1, 1] if with_nan else [0, 0])
        results.append((theta_flat(model), theta_hat_flat(gn, names_of(model))))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert torch.isfinite(results[1][0]).all()
    assert not torch.equal(results[0][0], theta_flat(case.make_model(0)))  # the steps did move θ


def test_nonfinite_batch_in_cg_does_not_corrupt_theta() -> None:
    """CG over [b, NaN-b]: the averaged gradient is NaN; θ must stay finite (no step on garbage)."""
    case = CASES["mlp_ce_masked"]
    model = case.make_model(0)
    gen = torch.Generator().manual_seed(63)
    b, bad = case.make_batch(gen), _nan_batch(gen)
    ls_b = [case.make_batch(gen) for _ in range(2)]
    theta0 = theta_flat(model)
    gn = GaussNewton(model, case.loss, inner_steps=2, inner=CG(tol=1e-10, max_iters=50))
    rec = gn.step(iter([b, bad] + ls_b))
    assert torch.equal(theta_flat(model), theta0)
    assert torch.isfinite(theta_hat_flat(gn, names_of(model))).all()
    assert math.isnan(rec.cg_rel_residual[0])


def test_nonfinite_batch_in_cg_is_counted() -> None:
    """The same NaN micro-batch that the first-order path counts in record.inner_nonfinite must be counted
    by the CG path too (monitoring relies on it): the mean gradient is NaN, CG cannot start."""
    case = CASES["mlp_ce_masked"]
    model = case.make_model(0)
    gen = torch.Generator().manual_seed(63)
    b, bad = case.make_batch(gen), _nan_batch(gen)
    ls_b = [case.make_batch(gen) for _ in range(2)]
    gn = GaussNewton(model, case.loss, inner_steps=2, inner=CG(tol=1e-10, max_iters=50))
    rec = gn.step(iter([b, bad] + ls_b))
    assert rec.inner_nonfinite == 1, rec.cg_rel_residual


def test_all_ignored_line_search_batch_does_not_reject_the_step() -> None:
    """A line-search micro-batch whose targets are all ignore_index carries no information about α. The
    inner loss (LocalLoss.value) counts it as 0, so must the line search (OutputLoss.value): the step must
    not be rejected, and α is the brute-force argmin over the other micro-batch."""
    case = CASES["mlp_ce_masked"]
    model = case.make_model(0)
    names = names_of(model)
    gen = torch.Generator().manual_seed(64)
    inner_b = [case.make_batch(gen) for _ in range(2)]
    x, y = case.make_batch(gen)
    empty = (x, torch.full_like(y, -100))
    ls = LineSearch(kind="grid", ls_range=5, source="fresh", num_batches=2)
    gn = GaussNewton(model, case.loss, inner_steps=2, inner=sgd(3.0), inner_clip=None, line_search=ls)
    theta0 = theta_flat(model)
    params0 = unflat(theta0, params_of(model), names)
    rec = gn.step(iter(inner_b + [inner_b[0], empty]))
    d = theta_hat_flat(gn, names) - theta0
    brute = [loss_at(case, model, unflat(theta0 + a * d, params0, names), [inner_b[0]]) for a in ls.alphas()]
    assert not rec.rejected, rec.ls_losses
    assert rec.alpha == ls.alphas()[min(range(len(brute)), key=lambda j: brute[j])]


# ======================================================================== 7. state_dict round trip
CONFIGS = {
    "full-muon-ema": dict(inner=MuonAdamW(lr=0.02, adam_lr=0.01), ema_decay=0.9),
    "layerwise-2-blocks": dict(inner=MuonAdamW(lr=0.02, adam_lr=0.01), ema_decay=0.9, partition="two"),
    "adapt-damping": dict(inner=MuonAdamW(lr=0.02, adam_lr=0.01), damping=0.5, adapt_damping=True),
}


def _make_gn(model: nn.Module, config: dict) -> GaussNewton:
    kw = dict(config)
    if kw.get("partition") == "two":
        kw["partition"] = Partition.from_groups(model, [r"^(tok_emb|blocks\.0)\.", r"."])
    return GaussNewton(model, SoftmaxCrossEntropy(), inner_steps=2, warm_start=True,
                       line_search=LineSearch(kind="grid", ls_range=4), **kw)


def _run_and_snapshot(config: str):
    """3 steps, snapshot, 2 more: (batches of the last 2 steps, state at step 3, its torch.save bytes,
    records / θ / θ̂ / EMA / λ after step 5)."""
    case = CASES["llama_ce_masked"]
    gen = torch.Generator().manual_seed(71)
    batches = [case.make_batch(gen) for _ in range(5 * 4)]
    model = tiny_llama(0)
    gn = _make_gn(model, CONFIGS[config])
    it = iter(batches)
    for _ in range(3):
        gn.step(it)
    state = gn.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    recs = [gn.step(it) for _ in range(2)]
    assert any(r.alpha is not None and r.alpha > 0 for r in recs)
    with gn.ema_weights():
        ema = theta_flat(model)
    want = dict(recs=recs, theta=theta_flat(model), hat=theta_hat_flat(gn, names_of(model)), ema=ema,
                damping=gn.damping)
    return batches[12:], state, buf.getvalue(), want


def _resume_and_compare(config: str, tail, state, want) -> None:
    fresh_model = tiny_llama(123)
    assert not torch.equal(theta_flat(fresh_model), want["theta"])
    fresh = _make_gn(fresh_model, CONFIGS[config])
    fresh.load_state_dict(state)
    it = iter(tail)
    recs = [fresh.step(it) for _ in range(2)]
    for a, b in zip(want["recs"], recs, strict=True):
        assert (a.step, a.loss, a.alpha, a.ls_losses, a.damping) == (b.step, b.loss, b.alpha, b.ls_losses,
                                                                     b.damping)
    assert torch.equal(theta_flat(fresh_model), want["theta"])
    assert torch.equal(theta_hat_flat(fresh, names_of(fresh_model)), want["hat"])
    with fresh.ema_weights():
        assert torch.equal(theta_flat(fresh_model), want["ema"])
    assert fresh.damping == want["damping"]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_state_dict_round_trip_through_torch_save_is_bitwise(config: str) -> None:
    """3 steps, torch.save(gn.state_dict()), 2 more steps; a fresh model + fresh GaussNewton loading
    torch.load(weights_only=True) of it, fed the same batches, reproduces the last 2 steps bitwise
    (records' losses, α, line-search losses, λ; θ, θ̂ and the EMA)."""
    tail, _, raw, want = _run_and_snapshot(config)
    _resume_and_compare(config, tail, torch.load(io.BytesIO(raw), weights_only=True), want)


@pytest.mark.parametrize("config", ["full-muon-ema"])
def test_state_dict_is_a_snapshot_not_a_view(config: str) -> None:
    """The dict returned by gn.state_dict() must not change when gn keeps stepping: θ and θ̂ are cloned, so
    must the inner optimizer's state be (Adam moments, Muon momentum). Loading the in-memory dict after
    2 more steps must reproduce those steps exactly as the torch.save copy does."""
    tail, state, _, want = _run_and_snapshot(config)
    _resume_and_compare(config, tail, state, want)


@pytest.mark.parametrize("mode", ["gn", "prox_linear"])
def test_model_value_is_traced_at_five_inner_steps_of_many(mode: str) -> None:
    """N = 9 inner steps: q is traced at steps 0, 2, 4, 6, 8 (every ⌊N/4⌋ and the last), for both modes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    gen = torch.Generator().manual_seed(0)
    batches = iter([(torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen))
                    for _ in range(40)])
    gn = GaussNewton(model, SoftmaxCrossEntropy(), inner_steps=9, mode=mode)
    for t in range(2):
        rec = gn.step(batches)
        assert rec.q_trace_steps == [0, 2, 4, 6, 8]
        assert len(rec.q_trace) == 5 and all(math.isfinite(q) for q in rec.q_trace)
        assert rec.q_start == rec.q_trace[0] and rec.q_end == rec.q_trace[-1]
        if t == 0:
            assert rec.q_start == 0.0  # Δ = 0 at the very first inner step: the model equals the loss


def test_a_non_finite_direction_is_rejected_without_touching_theta() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    sgd = TorchOptimizer(lambda ps: torch.optim.SGD(ps, lr=0.1))
    gn = GaussNewton(model, MSELoss(), inner_steps=1, inner=sgd)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():  # corrupt the warm-started inner iterate the way a broken optimizer state would
        gn._blocks[0].theta_hat["weight"].fill_(float("inf"))
    gn._blocks[0].at_origin = False
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    rec = gn.step(iter([(x, y)] * 2))
    assert rec.rejected and rec.alpha is None and rec.ls_losses == []
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert torch.isfinite(gn._blocks[0].theta_hat["weight"]).all()  # the inner solver restarts from θ_t


def test_damping_settings_object_equals_the_keyword_form() -> None:
    """``damping=Damping(λ, adapt, μ)`` is the keyword form ``damping=λ, adapt_damping=..., prox=μ``."""
    from gnopt.optim import Damping

    runs = []
    forms = (dict(damping=0.5, adapt_damping=True, prox=0.1), dict(damping=Damping(0.5, True, 0.1)))
    for kw in forms:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        gn = GaussNewton(model, MSELoss(), inner_steps=2, inner=sgd(0.1), **kw)  # type: ignore[arg-type]
        gen = torch.Generator().manual_seed(1)
        batches = iter([(x, torch.sin(x[:, :2])) for x in torch.randn(8, 16, 4, generator=gen)])
        recs = [gn.step(batches) for _ in range(2)]
        runs.append(([(r.loss, r.alpha, r.damping) for r in recs], theta_flat(model), gn.damping))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1]) and runs[0][2] == runs[1][2]
    with pytest.raises(GnoptError, match="damping and prox must be >= 0"):
        Damping(-1.0)
    with pytest.raises(GnoptError, match="adapt_damping needs a positive initial damping"):
        Damping(0.0, adapt=True)


# ======================================================================== 8. torch.optim habits
def _mlp_gn(**kw) -> tuple[GaussNewton, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    return GaussNewton(model, MSELoss(), inner_steps=2, **kw), model


def _regression_batches(seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(16, 4, generator=gen)
        yield x, torch.sin(x[:, :2])


def test_gauss_newton_is_a_torch_optimizer_whose_groups_show_the_inner_lrs() -> None:
    gn, model = _mlp_gn(inner=MuonAdamW(lr=0.02, adam_lr=1e-3))
    assert isinstance(gn, torch.optim.Optimizer)
    assert [(g["block"], g["lr"]) for g in gn.param_groups] == [("all", 0.02), ("all", 1e-3)]
    assert {id(p) for g in gn.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    layerwise, _ = _mlp_gn(inner=sgd(0.1), partition=Partition.from_callable(model, lambda n: n[0]))
    assert [(g["block"], g["lr"]) for g in layerwise.param_groups] == [("0", 0.1), ("2", 0.1)]
    cg, _ = _mlp_gn(inner=CG())
    assert [set(g) for g in cg.param_groups] == [{"params", "block"}]  # CG has no learning rate


def test_lambda_lr_drives_the_inner_learning_rates_over_outer_steps() -> None:
    """LambdaLR halves the groups' lr every outer step: the inner optimizer steps with exactly that lr
    (times the inner schedule, constant here), and the run equals one whose inner lr is set by hand."""
    gn, model = _mlp_gn(inner=sgd(0.2))
    sched = torch.optim.lr_scheduler.LambdaLR(gn, lambda t: 0.5 ** t)
    batches = _regression_batches(3)
    for t in range(3):
        assert gn.param_groups[0]["lr"] == 0.2 * 0.5 ** t
        gn.step(batches)
        assert gn._blocks[0].optimizer.param_groups[0]["lr"] == 0.2 * 0.5 ** t
        sched.step()
    by_hand, model2 = _mlp_gn(inner=sgd(0.2))
    batches = _regression_batches(3)
    for t in range(3):
        by_hand.param_groups[0]["lr"] = 0.2 * 0.5 ** t
        by_hand.step(batches)
    assert torch.equal(theta_flat(model), theta_flat(model2))


def test_one_cycle_lr_runs_over_outer_steps() -> None:
    gn, _ = _mlp_gn(inner=MuonAdamW(lr=0.02, adam_lr=1e-3))
    sched = torch.optim.lr_scheduler.OneCycleLR(gn, max_lr=[0.02, 1e-3], total_steps=4, cycle_momentum=False)
    batches = _regression_batches(4)
    seen = []
    for _ in range(4):
        seen.append([g["lr"] for g in gn.param_groups])
        gn.step(batches)
        sched.step()
    assert seen[0][0] < seen[1][0] and seen[-1][0] < seen[1][0]  # warms up, then anneals


def test_state_dict_round_trips_the_groups_learning_rates() -> None:
    gn, _ = _mlp_gn(inner=MuonAdamW(lr=0.02, adam_lr=1e-3))
    torch.optim.lr_scheduler.LambdaLR(gn, lambda t: 0.25)  # sets lr = 0.25 × initial at construction
    gn.step(_regression_batches(5))
    raw = io.BytesIO()
    torch.save(gn.state_dict(), raw)
    fresh, _ = _mlp_gn(inner=MuonAdamW(lr=0.02, adam_lr=1e-3))
    fresh.load_state_dict(torch.load(io.BytesIO(raw.getvalue()), weights_only=True))
    assert [g["lr"] for g in fresh.param_groups] == [0.005, 0.00025]
    old = gn.state_dict()
    del old["lrs"]  # a state saved before the groups existed keeps the configured learning rates
    fresh, _ = _mlp_gn(inner=MuonAdamW(lr=0.02, adam_lr=1e-3))
    fresh.load_state_dict(old)
    assert [g["lr"] for g in fresh.param_groups] == [0.02, 1e-3]
