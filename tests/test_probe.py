"""The directional probe (gnopt.optim.probe) against explicit float64 references.

References (``_gn_reference``): dense Jacobians J_i by batched reverse-mode autograd of a copy of the model
(LLaMA copies run explicit-softmax attention), closed-form output Hessians H_i, g = mean J_iᵀ g_z,i and
curvatures mean (J_i v)ᵀ H_i (J_i v) by matrix products, G = mean J_iᵀ H_i J_i and its solves by
``torch.linalg`` (the MLP; the tiny LLaMA's 21k² G is never formed), optimizer updates by their formulas.
"""

from __future__ import annotations

import math

import pytest
import torch
from _gn_reference import CASES, Dense, dense, flat, names_of, params_of, unflat
from _helpers import rel_err, theta_flat
from torch import Tensor, nn

from gnopt.optim import CG, GaussNewton, LineSearch, MSELoss, Partition, TorchOptimizer
from gnopt.optim.probe import (
    FULL,
    GRADIENT,
    LAYERWISE,
    gain,
    gn_direction,
    loss_gradient,
    measure,
    optimizer_update,
    probe,
    probe_partition,
)

F64 = torch.float64
MLP_LAYERS = [["0.weight", "0.bias"], ["2.weight", "2.bias"]]

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- reference
class DenseProbe:
    """The probe's quantities from dense J_i, H_i of every micro-batch (flat vectors over ``names``)."""

    def __init__(self, case, model: nn.Module, batches) -> None:
        self.names = names_of(model)
        self.params = params_of(model)
        self.Ds: list[Dense] = [dense(case, model, self.params, b, self.names) for b in batches]
        self.g = sum(D.g for D in self.Ds) / len(self.Ds)
        self.loss = sum(D.loss for D in self.Ds) / len(self.Ds)

    def G(self) -> Tensor:
        return sum(D.G() for D in self.Ds) / len(self.Ds)

    def curvature(self, v: Tensor) -> float:
        return float(sum((D.J @ v) @ (D.H @ (D.J @ v)) for D in self.Ds) / len(self.Ds))

    def mask(self, block: tuple[str, ...]) -> Tensor:
        return torch.cat([torch.full((self.params[n].numel(),), float(n in block), dtype=F64)
                          for n in self.names])

    def flat(self, d: dict[str, Tensor]) -> Tensor:
        return flat(d, self.names)

    def unflat(self, v: Tensor) -> dict[str, Tensor]:
        return {n: t.clone() for n, t in unflat(v, self.params, self.names).items()}

    def numbers(self, v: Tensor, full: Tensor, lw: Tensor, ref: Tensor, mask: Tensor | None) -> dict:
        """norm, slope, curvature, gain, share (vs ``ref``), cosines, restricted to ``mask``."""
        if mask is not None:
            v, full, lw, ref = v * mask, full * mask, lw * mask, ref * mask

        def gain_of(w: Tensor) -> float:
            s, c = float(self.g @ w), self.curvature(w)
            return s * s / c

        def cos(a: Tensor, b: Tensor) -> float:
            return float(a @ b / (a.norm() * b.norm()))

        s, c = float(self.g @ v), self.curvature(v)
        return {"norm": float(v.norm()), "slope": s, "curvature": c, "gain": s * s / c,
                "share": (s * s / c) / gain_of(ref), "cos_full": cos(v, full), "cos_layerwise": cos(v, lw),
                "alpha_star": -s / c}


def check_against_dense(result, ref: DenseProbe, flats: dict[str, Tensor], part: Partition,
                        tol: float = 1e-9) -> int:
    """Every number of ``result`` equals the dense reference; returns how many were compared."""
    full, lw = flats[result.full], flats[result.layerwise]
    compared = 0
    for row in result.rows():
        v = flats[row["direction"]]
        if row["block"] == "total":
            want = ref.numbers(v, full, lw, full, None)
        else:
            block = part.blocks[part.labels.index(row["block"])]
            want = ref.numbers(v, full, lw, lw, ref.mask(block))
        for key, value in want.items():
            assert row[key] == pytest.approx(value, rel=tol, abs=1e-13), (row["direction"], row["block"], key)
            compared += 1
    return compared


def _cg(model: nn.Module, loss, n: int, damping: float = 0.0, partition=None) -> GaussNewton:
    return GaussNewton(model, loss, inner_steps=n, inner=CG(tol=1e-13, max_iters=300), damping=damping,
                       partition=partition)


def _sgd_inner(lr: float) -> TorchOptimizer:
    return TorchOptimizer(lambda ps: torch.optim.SGD(ps, lr=lr))


def _with_state(model: nn.Module, opt: torch.optim.Optimizer, case, seed: int) -> None:
    """One training step on another batch, so that the optimizer has momentum / moments (then the model is
    put back: the probe point stays θ, the optimizer keeps its state)."""
    theta = params_of(model)
    x, y = case.make_batch(torch.Generator().manual_seed(seed))
    case.loss.value(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(theta[n])


# ---------------------------------------------------------------------------------------------- directions
def test_the_directions_equal_their_dense_formulas() -> None:
    """Full GN by exact CG: −G⁻¹g; layerwise GN by CG: the block-diagonal solve; the gradient and the
    loss: the dense means; SGD from fresh state: −η g; Adam's first step: −lr g / (|g| + eps)."""
    case = CASES["mlp_mse"]  # (cross-entropy's G is singular: a shift of all logits changes nothing)
    model = case.make_model(0)
    gen = torch.Generator().manual_seed(5)
    batches = [case.make_batch(gen) for _ in range(2)]
    ref = DenseProbe(case, model, batches)
    G, g = ref.G(), ref.g
    assert int(torch.linalg.matrix_rank(G)) == G.shape[0]  # 120 outputs ≥ 65 parameters: a unique solve
    d_full = ref.flat(gn_direction(_cg(model, case.loss, 2), batches))
    # (G's condition number is ~1e6: CG's residual 1e-13 leaves an error ~1e-8 in d)
    assert float(torch.linalg.cond(G)) < 1e7
    assert rel_err(d_full, -torch.linalg.solve(G, g)) < 1e-7
    part = Partition.from_groups(model, MLP_LAYERS)
    d_lw = ref.flat(gn_direction(_cg(model, case.loss, 2, partition=part), batches))
    want = torch.zeros_like(g)
    for block in part.blocks:
        idx = ref.mask(block).bool()
        want[idx] = -torch.linalg.solve(G[idx][:, idx], g[idx])
    assert rel_err(d_lw, want) < 1e-7 and rel_err(d_lw, d_full) > 1e-2
    grad, loss = loss_gradient(model, case.loss, batches)
    assert rel_err(ref.flat(grad), g) < 1e-12 and loss == pytest.approx(ref.loss, rel=1e-13)
    sgd = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    assert rel_err(ref.flat(optimizer_update(model, sgd, grad)), -0.3 * g) < 1e-13
    adam = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-8)
    assert rel_err(ref.flat(optimizer_update(model, adam, grad)), -1e-2 * g / (g.abs() + 1e-8)) < 1e-10
    # a sequence of optimizers over disjoint parameters steps each of them
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    second = torch.optim.SGD(model[2].parameters(), lr=0.2)
    scale = 0.2 - 0.1 * ref.mask(("0.weight", "0.bias"))
    assert rel_err(ref.flat(optimizer_update(model, [first, second], grad)), -scale * g) < 1e-13
    # clipping: the gradient is scaled to the global norm first, as a training step does
    clipped = ref.flat(optimizer_update(model, torch.optim.SGD(model.parameters(), lr=1.0), grad,
                                        grad_clip=0.01))
    assert rel_err(clipped, -0.01 * g / (g.norm() + 1e-6)) < 1e-12  # (clip_grad_norm_'s 1e-6)


def test_gn_direction_is_the_direction_the_step_searches_along() -> None:
    """A warm-started GN (SGD inner) after one real step: gn_direction on the next batch equals d of the
    next real step (θ_{t+1} − θ_t = α d, ‖d‖ = the record's), and gn_direction left gn, its model and its
    learning-rate scheduler untouched."""
    case = CASES["mlp_ce_masked"]
    model = case.make_model(0)
    gn = GaussNewton(model, case.loss, inner_steps=2, inner=_sgd_inner(4.0), inner_clip=None,
                     line_search=LineSearch(kind="grid", ls_range=6, source="inner"))
    sched = torch.optim.lr_scheduler.LambdaLR(gn, lambda t: 1.0 / (1 + t))  # wraps gn.step on the instance
    gen = torch.Generator().manual_seed(7)
    gn.step(iter([case.make_batch(gen) for _ in range(2)]))
    sched.step()
    assert not gn._blocks[0].at_origin  # the next inner loop starts from a carried θ̂
    batches = [case.make_batch(gen) for _ in range(2)]
    before_state = gn.state_dict()
    theta = theta_flat(model)
    d = flat(gn_direction(gn, batches), names_of(model))
    after_state = gn.state_dict()
    assert torch.equal(theta_flat(model), theta) and after_state["t"] == before_state["t"] == 1
    for a, b in zip(before_state["blocks"], after_state["blocks"], strict=True):
        assert all(torch.equal(a["theta_hat"][n], b["theta_hat"][n]) for n in a["theta_hat"])
    rec = gn.step(iter(batches))
    assert rec.alpha is not None and rec.alpha > 0
    assert rel_err(theta_flat(model) - theta, rec.alpha * d) < 1e-12
    assert rec.direction_norm == pytest.approx(float(d.norm()), rel=1e-12)


def test_optimizer_update_leaves_the_callers_objects_untouched() -> None:
    """Model parameters and grads, optimizer state and a scheduler-wrapped step stay as they were; an
    optimizer subclass keeps its own attributes on the copy."""

    class Scaled(torch.optim.SGD):
        def __init__(self, params, lr: float, factor: float) -> None:
            super().__init__(params, lr=lr)
            self.factor = factor  # an attribute torch's Optimizer.__getstate__ does not keep

        def step(self, closure=None):  # type: ignore[override]
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad.mul_(self.factor)
            return super().step(closure)

    case = CASES["mlp_ce"]
    model = case.make_model(0)
    batches = [case.make_batch(torch.Generator().manual_seed(9))]
    grad, _ = loss_gradient(model, case.loss, batches)
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    _with_state(model, adam, case, 10)
    sched = torch.optim.lr_scheduler.LambdaLR(adam, lambda t: 0.5)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    theta = theta_flat(model)
    state = [(k, v.clone()) for s in adam.state.values() for k, v in s.items()]
    d = optimizer_update(model, adam, grad)
    assert torch.equal(theta_flat(model), theta)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    after = [(k, v) for s in adam.state.values() for k, v in s.items()]
    assert [k for k, _ in after] == [k for k, _ in state] and len(state) == 4 * 3
    assert all(torch.equal(v, w) for (_, v), (_, w) in zip(after, state, strict=True))
    assert int(adam.state[next(iter(model.parameters()))]["step"]) == 1 and sched.last_epoch == 0
    assert any(bool(v.any()) for v in d.values())
    g = flat(grad, names_of(model))
    got = flat(optimizer_update(model, Scaled(model.parameters(), lr=0.1, factor=3.0), grad), names_of(model))
    assert rel_err(got, -0.3 * g) < 1e-13


def test_special_cases_are_exact() -> None:
    """On a nonsingular G with exact (CG) GN directions: full GN has share 1 and cosine 1 and gain gᵀG⁻¹g,
    the maximum over directions (every other share ≤ 1); −g/‖g‖ has gain ‖g‖⁴/gᵀGg; with the probe blocks
    equal to layerwise GN's, every block share is ≤ 1 and layerwise GN's block gain is g_bᵀG_bb⁻¹g_b; the
    gain ignores the length and sign of d (α* changes sign with d)."""
    case = CASES["mlp_mse"]
    model = case.make_model(0)
    gen = torch.Generator().manual_seed(5)
    batches = [case.make_batch(gen) for _ in range(2)]
    ref = DenseProbe(case, model, batches)
    G, g = ref.G(), ref.g
    assert int(torch.linalg.matrix_rank(G)) == G.shape[0]
    part = Partition.from_groups(model, MLP_LAYERS, labels=["layer0", "layer1"])
    full = gn_direction(_cg(model, case.loss, 2), batches)
    lw = gn_direction(_cg(model, case.loss, 2, partition=part), batches)
    rnd = ref.unflat(torch.randn(g.shape, dtype=F64, generator=gen))
    sd = ref.unflat(-g / g.norm())
    dirs = {FULL: full, LAYERWISE: lw, "random": rnd, "steepest": sd,
            "-2 random": {n: -2 * v for n, v in rnd.items()}}
    res = measure(model, case.loss, batches, dirs, partition=part)
    t = res.total
    assert t[FULL].share == pytest.approx(1.0, abs=1e-12)
    assert t[FULL].cos_full == pytest.approx(1.0, abs=1e-12)
    assert t[FULL].gain == pytest.approx(float(g @ torch.linalg.solve(G, g)), rel=1e-9)
    assert t[FULL].alpha_star == pytest.approx(1.0, rel=1e-7)  # the exact minimizer: the best step is 1
    assert t["steepest"].gain == pytest.approx(float(g.norm() ** 4 / (g @ G @ g)), rel=1e-12)
    assert all(m.share <= 1 + 1e-9 for m in t.values())
    assert t["-2 random"].gain == pytest.approx(t["random"].gain, rel=1e-12)
    assert t["-2 random"].alpha_star == pytest.approx(-t["random"].alpha_star / 2, rel=1e-12)
    assert t["-2 random"].cos_full == pytest.approx(-t["random"].cos_full, rel=1e-12)
    for label, block in zip(part.labels, part.blocks, strict=True):
        idx = ref.mask(block).bool()
        assert res.blocks[LAYERWISE][label].gain == pytest.approx(
            float(g[idx] @ torch.linalg.solve(G[idx][:, idx], g[idx])), rel=1e-9)
        assert res.blocks[LAYERWISE][label].share == pytest.approx(1.0, abs=1e-12)
        assert all(res.blocks[k][label].share <= 1 + 1e-9 for k in dirs)
    assert res.blocks[LAYERWISE]["layer0"].cos_layerwise == pytest.approx(1.0, abs=1e-12)


def test_on_a_linear_least_squares_problem_the_gain_is_twice_the_true_decrease() -> None:
    """nn.Linear + MSE: the GN model is the loss itself, so for any d the true loss at θ + α*d is
    L(θ) − gain/2, and the exact GN direction reaches the least-squares minimum."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    gen = torch.Generator().manual_seed(41)
    X = torch.randn(20, 3, dtype=F64, generator=gen)
    Y = X @ torch.randn(3, 2, dtype=F64, generator=gen) + 0.3 * torch.randn(20, 2, dtype=F64, generator=gen)
    batches = [(X[:10], Y[:10]), (X[10:], Y[10:])]
    loss = MSELoss()
    full = gn_direction(_cg(model, loss, 2), batches)
    grad, l0 = loss_gradient(model, loss, batches)
    dirs = {FULL: full, LAYERWISE: full, GRADIENT: {n: -v for n, v in grad.items()},
            "other": {n: torch.randn(v.shape, dtype=F64, generator=gen) for n, v in grad.items()}}
    res = measure(model, loss, batches, dirs, partition="tensor")
    assert res.loss == pytest.approx(l0, rel=1e-14)
    params = dict(model.named_parameters())
    for key, d in dirs.items():
        m = res.total[key]
        moved = {n: params[n].detach() + m.alpha_star * d[n] for n in d}
        true = sum(float(torch.nn.functional.mse_loss(torch.func.functional_call(model, moved, (x,)), y))
                   for x, y in batches) / 2
        assert true == pytest.approx(l0 - m.gain / 2, rel=1e-10), key
    Xa = torch.cat([X, torch.ones(20, 1, dtype=F64)], 1)
    best = float(((Xa @ torch.linalg.lstsq(Xa, Y).solution - Y) ** 2).mean())
    assert l0 - res.total[FULL].gain / 2 == pytest.approx(best, rel=1e-10)


# ---------------------------------------------------------------------------------------------- every number
@pytest.mark.parametrize("case_name", ["mlp_ce_masked", "llama_ce_masked"])
def test_every_number_of_probe_equals_the_dense_reference(case_name: str) -> None:
    """probe() with damped CG full and layerwise GN, SGD-momentum and Adam with state, and −g: every
    cosine, slope, curvature, gain and share, per probe block and in total, equals the dense reference
    (the probe's G is undamped: the references are the directions actually computed)."""
    case = CASES[case_name]
    model = case.make_model(0)
    gen = torch.Generator().manual_seed(13)
    n = 2 if case_name.startswith("mlp") else 1
    batches = [case.make_batch(gen) for _ in range(n)]
    lam = 0.05 if case_name.startswith("mlp") else 1e-3
    full_gn = _cg(model, case.loss, n, lam)
    layer_part = Partition.from_groups(model, MLP_LAYERS) if case_name.startswith("mlp") else "transformer"
    lw_gn = _cg(model, case.loss, n, lam, partition=layer_part)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    _with_state(model, sgd, case, 1)
    _with_state(model, adam, case, 2)
    res = probe(model, case.loss, batches, full_gn=full_gn, layerwise_gn=lw_gn,
                optimizers={"sgd": sgd, "adam": adam})
    assert res.directions == (FULL, LAYERWISE, "sgd", "adam", GRADIENT)
    part = probe_partition(model)
    assert res.labels == part.labels
    ref = DenseProbe(case, model, batches)
    assert res.loss == pytest.approx(ref.loss, rel=1e-12) and res.micro_batches == n
    flats = {FULL: ref.flat(gn_direction(full_gn, batches)),
             LAYERWISE: ref.flat(gn_direction(lw_gn, batches)), GRADIENT: -ref.g}
    grad = ref.unflat(ref.g)
    flats["sgd"] = ref.flat(optimizer_update(model, sgd, grad))
    flats["adam"] = ref.flat(optimizer_update(model, adam, grad))
    compared = check_against_dense(res, ref, flats, part)
    assert compared == len(res.directions) * (len(part) + 1) * 8
    # the test can tell the directions apart
    assert abs(res.total["adam"].cos_full) < 0.99 and abs(res.total[LAYERWISE].cos_full) < 0.999


def test_a_direction_zero_on_a_block_and_degenerate_curvature() -> None:
    """A direction that leaves blocks out has slope, curvature and gain 0 there (share 0, cosines NaN);
    the gain is ∞ where the model is flat but sloped, 0 where both vanish."""
    case = CASES["mlp_ce"]
    model = case.make_model(0)
    batches = [case.make_batch(torch.Generator().manual_seed(3))]
    ref = DenseProbe(case, model, batches)
    full = gn_direction(_cg(model, case.loss, 1, 0.1), batches)
    only_head = {n: (v if n.startswith("2.") else torch.zeros_like(v)) for n, v in full.items()}
    res = measure(model, case.loss, batches, {FULL: full, LAYERWISE: full, "head only": only_head},
                  partition=Partition.from_groups(model, MLP_LAYERS, labels=["first", "second"]))
    first = res.blocks["head only"]["first"]
    assert (first.slope, first.curvature, first.gain, first.share, first.norm) == (0.0, 0.0, 0.0, 0.0, 0.0)
    assert math.isnan(first.cos_full) and math.isnan(first.alpha_star)
    second = res.blocks["head only"]["second"]
    assert second.share == pytest.approx(1.0, abs=1e-12)
    assert res.total["head only"].gain == pytest.approx(second.gain, rel=1e-12)  # the same vector
    mask = ref.mask(("2.weight", "2.bias"))
    v = ref.flat(full) * mask
    assert second.curvature == pytest.approx(ref.curvature(v), rel=1e-10)
    assert gain(0.5, 0.0) == math.inf and gain(0.0, 0.0) == 0.0 and gain(-2.0, 4.0) == 1.0


# ---------------------------------------------------------------------------------------------- partition
def test_probe_partition_of_gnopts_llama_and_other_names() -> None:
    """LLaMA: embedding, per layer attention and MLP, the norms, the head. Hugging Face-style names get the
    same blocks; a model without layers gets one block per tensor."""
    model = CASES["llama_ce_masked"].make_model(0)
    part = probe_partition(model)
    assert part.labels == ("embedding", "layer0.attn", "layer0.mlp", "layer1.attn", "layer1.mlp", "norms",
                           "head")
    blocks = dict(zip(part.labels, part.blocks, strict=True))
    assert blocks["embedding"] == ("tok_emb.weight",) and blocks["head"] == ("lm_head.weight",)
    assert blocks["layer1.mlp"] == tuple(f"blocks.1.mlp.w{k}.weight" for k in (1, 2, 3))
    assert set(blocks["norms"]) == {"blocks.0.attn_norm.weight", "blocks.0.mlp_norm.weight",
                                    "blocks.1.attn_norm.weight", "blocks.1.mlp_norm.weight", "norm.weight"}

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = nn.Linear(2, 2)
            self.mlp = nn.Linear(2, 2)
            self.input_layernorm = nn.LayerNorm(2)
            self.post_attention_layernorm = nn.LayerNorm(2)

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(3, 2)
            self.layers = nn.ModuleList([Layer(), Layer()])
            self.norm = nn.LayerNorm(2)
            self.lm_head = nn.Linear(2, 3)

    hf = nn.Module()
    hf.model = Decoder()
    hf_part = probe_partition(hf)
    assert hf_part.labels == ("embedding", "layer0.attn", "layer0.mlp", "layer1.attn", "layer1.mlp", "norms",
                              "head")
    assert dict(zip(hf_part.labels, hf_part.blocks, strict=True))["layer0.attn"] == (
        "model.layers.0.self_attn.weight", "model.layers.0.self_attn.bias")
    mlp = CASES["mlp_ce"].make_model(0)
    assert probe_partition(mlp).labels == ("0.weight", "0.bias", "2.weight", "2.bias")


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_a_clear_value_error() -> None:
    case = CASES["mlp_ce"]
    model = case.make_model(0)
    batches = [case.make_batch(torch.Generator().manual_seed(3))]
    gn = _cg(model, case.loss, 1)
    with pytest.raises(ValueError, match="inner_steps = 1 micro-batches, got 2"):
        gn_direction(gn, batches * 2)
    with pytest.raises(ValueError, match="at least one micro-batch"):
        loss_gradient(model, case.loss, [])
    d = gn_direction(gn, batches)
    with pytest.raises(ValueError, match="no 'layerwise GN' direction"):
        measure(model, case.loss, batches, {FULL: d})
    with pytest.raises(ValueError, match="no entry for parameter '2.bias'"):
        measure(model, case.loss, batches,
                {FULL: d, LAYERWISE: {n: v for n, v in d.items() if n != "2.bias"}})
    with pytest.raises(ValueError, match="partition must be"):
        measure(model, case.loss, batches, {FULL: d, LAYERWISE: d}, partition="layers")
    other = case.make_model(1)
    with pytest.raises(ValueError, match="not the model's parameters"):
        optimizer_update(model, torch.optim.SGD(other.parameters(), lr=0.1), d)
    with pytest.raises(TypeError, match="torch.optim-style optimizer"):
        optimizer_update(model, object(), d)
    with pytest.raises(ValueError, match="full_gn's model is not at the probe model's parameters"):
        probe(model, case.loss, batches, full_gn=_cg(other, case.loss, 1), layerwise_gn=gn)
    with pytest.raises(ValueError, match="taken by a reference direction"):
        probe(model, case.loss, batches, full_gn=gn, layerwise_gn=gn,
              optimizers={GRADIENT: torch.optim.SGD(model.parameters(), lr=0.1)})
