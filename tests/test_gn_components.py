"""Components of gnopt.optim checked against independent float64 references.

* products (``linearized_pass``, ``jvp``) against dense Jacobians (batched reverse-mode autograd of a copy
  of the model; LLaMA copies run explicit-softmax attention) and closed-form output Hessians;
* G·v against curvlinops' ``GGNLinearOperator``;
* output losses against autograd / ``torch.func.hessian`` of ``torch.nn.functional`` losses;
* schedules against their closed forms; partitions against hand-written name lists.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _gn_reference import (
    CASES,
    IGNORE,
    dense,
    flat,
    forward,
    names_of,
    params_of,
    prox_grad,
    random_like,
    tiny_llama,
    tiny_mlp,
    unflat,
)
from _helpers import rel_err
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gnopt.errors import GnoptError
from gnopt.optim import (
    AutogradLoss,
    GaussNewton,
    InnerSchedule,
    MSELoss,
    Partition,
    SoftmaxCrossEntropy,
    conjugate_gradient,
    jvp,
    linearized_pass,
    lr_multiplier,
)


@pytest.fixture(autouse=True, scope="module")
def _float64_single_thread():
    """float64 everywhere; one thread (tiny ops on 2 shared cores: more threads only spin). Restored after."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


# Blocks used to exercise block-restricted tangents / reverse passes (layerwise GN).
BLOCKS = {
    "mlp": ["0.weight", "0.bias"],  # the first layer: the backward must go through the whole net
    "llama": None,  # filled lazily: blocks.1.* (a middle block)
}


def _block(model: nn.Module) -> list[str]:
    names = names_of(model)
    if "tok_emb.weight" in names:
        return [n for n in names if n.startswith("blocks.1.")]
    return BLOCKS["mlp"]


# ================================================================================================ products
@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("restricted", [False, True], ids=["all", "block"])
def test_linearized_pass_gn_cotangent_equals_dense(case_name: str, restricted: bool) -> None:
    """z₀ = f(θ), u = JΔ and the returned Jᵀ(g_z + H_z JΔ) equal the dense products (~1e-10)."""
    case = CASES[case_name]
    model = case.make_model(0)
    gen = torch.Generator().manual_seed(1)
    x, y = case.make_batch(gen)
    params = params_of(model)
    names = _block(model) if restricted else names_of(model)
    d = dense(case, model, params, (x, y), names)
    delta = random_like(params, names, 0.3, gen)
    dvec = flat(delta, names)

    def cot(z0: Tensor, u: Tensor | None) -> Tensor:
        assert u is not None
        loc = case.loss.local(z0, y)
        return loc.grad + loc.hvp(u)

    z0, u, grads = linearized_pass(model, params, x, tangent=delta, wrt=names, cotangent=cot)
    assert u is not None
    ref = d.gn_grad(dvec)
    assert rel_err(z0.reshape(-1), d.z0.reshape(-1)) < 1e-12
    assert rel_err(u.reshape(-1), d.J @ dvec) < 1e-10
    assert rel_err(flat(grads, names), ref) < 1e-10
    assert float(ref.abs().max()) > 1e-4  # the check is not vacuous
    # jvp() gives the same tangent outputs without a reverse graph.
    z1, u1 = jvp(model, params, x, delta)
    assert rel_err(z1.reshape(-1), d.z0.reshape(-1)) < 1e-12
    assert rel_err(u1.reshape(-1), d.J @ dvec) < 1e-10


@pytest.mark.parametrize("case_name", ["mlp_ce_masked", "mlp_mse", "llama_ce_masked"])
def test_linearized_pass_without_tangent_is_the_loss_gradient(case_name: str) -> None:
    """tangent=None: u is None and Jᵀ g_z equals autograd of the true loss w.r.t. the parameters."""
    case = CASES[case_name]
    model = case.make_model(0)
    x, y = case.make_batch(torch.Generator().manual_seed(2))
    params, names = params_of(model), names_of(model)
    _, u, grads = linearized_pass(
        model, params, x, tangent=None, wrt=names, cotangent=lambda z0, u: case.loss.local(z0, y).grad
    )
    assert u is None
    ref_model = model
    model.zero_grad()
    case.value(ref_model(x), y).backward()
    ref = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert rel_err(flat(grads, names), ref) < 1e-12


@pytest.mark.parametrize("case_name", ["mlp_ce_masked", "mlp_mse", "llama_ce_masked"])
def test_linearized_pass_prox_linear_gradient_equals_autograd_of_linearized_loss(case_name: str) -> None:
    """Cotangent ∇L(z₀ + u) gives ∇_Δ L(z₀ + JΔ) (autograd through the dense linearized model)."""
    case = CASES[case_name]
    model = case.make_model(0)
    gen = torch.Generator().manual_seed(3)
    x, y = case.make_batch(gen)
    params, names = params_of(model), names_of(model)
    d = dense(case, model, params, (x, y), names)
    delta = random_like(params, names, 0.5, gen)
    dvec = flat(delta, names)
    _, u, grads = linearized_pass(
        model, params, x, tangent=delta, wrt=names,
        cotangent=lambda z0, u: case.loss.value_and_grad(z0 + u, y)[1],
    )
    ref = prox_grad(case, d, y, dvec)
    assert rel_err(flat(grads, names), ref) < 1e-10
    # It is not the GN-quadratic gradient (the loss is not quadratic): the test can tell them apart.
    if case_name != "mlp_mse":
        assert rel_err(d.gn_grad(dvec), ref) > 1e-6


# ================================================================================================ curvlinops
def _curvlinops():
    return pytest.importorskip(
        "curvlinops",
        reason="curvlinops-for-pytorch is not installed (pip install -c constraints.txt --no-deps "
        "curvlinops-for-pytorch scipy tqdm einops einconv linear_operator opt-einsum)",
    )


class _Flat(nn.Module):
    """Outputs flattened to [N, C] (curvlinops' convention), attention in its forward-AD-safe form."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        with sdpa_kernel([SDPBackend.MATH]):
            z = self.inner(x)
        return z.reshape(-1, z.shape[-1])


@pytest.mark.parametrize("case_name", ["mlp_ce_masked", "mlp_mse", "llama_ce_masked"])
@pytest.mark.parametrize("restricted", [False, True], ids=["all", "block"])
def test_gv_matches_curvlinops_ggn(case_name: str, restricted: bool) -> None:
    """G·v (and the block G_bb·v_b) from gnopt's products equals curvlinops' GGNLinearOperator."""
    curvlinops = _curvlinops()
    case = CASES[case_name]
    model = case.make_model(0)
    gen = torch.Generator().manual_seed(4)
    x, y = case.make_batch(gen)
    params = params_of(model)
    names = _block(model) if restricted else names_of(model)
    wrapped = _Flat(model)
    loss_func = (
        nn.CrossEntropyLoss(ignore_index=IGNORE, reduction="mean")
        if isinstance(case.loss, SoftmaxCrossEntropy)
        else nn.MSELoss(reduction="mean")
    )
    y_flat = y.reshape(-1) if isinstance(case.loss, SoftmaxCrossEntropy) else y.reshape(-1, y.shape[-1])
    pdict = dict(model.named_parameters())
    op = curvlinops.GGNLinearOperator(
        wrapped, loss_func, [pdict[n] for n in names], [(x, y_flat)], check_deterministic=False
    )
    k = 3
    V = torch.randn(sum(params[n].numel() for n in names), k, generator=gen)
    ref = op @ V
    for j in range(k):
        v = unflat(V[:, j], params, names)
        _, _, gv = linearized_pass(
            model, params, x, tangent=v, wrt=names, cotangent=lambda z0, u: case.loss.local(z0, y).hvp(u)
        )
        assert rel_err(flat(gv, names), ref[:, j]) < 1e-10


# ================================================================================================ losses
def _ce_inputs(masked: bool, ignore_index: int = IGNORE) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(5)
    z = 2.0 * torch.randn(2, 3, 7, generator=gen)
    y = torch.randint(0, 7, (2, 3), generator=gen)
    if masked:
        y[0, 1] = ignore_index
        y[1, 2] = ignore_index
    return z, y


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("ignore_index", [IGNORE, 3])
def test_softmax_cross_entropy_local_matches_autograd(masked: bool, ignore_index: int) -> None:
    z, y = _ce_inputs(masked, ignore_index)
    loss = SoftmaxCrossEntropy(ignore_index=ignore_index)

    def ref_fn(zz: Tensor) -> Tensor:
        return F.cross_entropy(zz.reshape(-1, 7), y.reshape(-1), ignore_index=ignore_index)

    loc = loss.local(z, y)
    ref_val = ref_fn(z)
    ref_grad = torch.func.grad(ref_fn)(z)
    hess = torch.func.hessian(ref_fn)(z).reshape(z.numel(), z.numel())
    assert abs(float(loc.value) - float(ref_val)) < 1e-14
    assert abs(float(loss.value(z, y)) - float(ref_val)) < 1e-14
    assert rel_err(loc.grad, ref_grad) < 1e-13
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        v = torch.randn(z.shape, generator=gen)
        assert rel_err(loc.hvp(v).reshape(-1), hess @ v.reshape(-1)) < 1e-13
    _check_fused_terms(loc, ref_grad, hess, gen)
    # value_and_grad and count
    val, gr = loss.value_and_grad(z, y)
    assert torch.equal(val, loc.value) and torch.equal(gr, loc.grad)
    assert loss.count(y) == int((y != ignore_index).sum())
    # Ignored tokens contribute neither gradient nor curvature.
    ignored = (y == ignore_index).reshape(-1)
    if ignored.any():
        assert float(loc.grad.reshape(-1, 7)[ignored].abs().max()) == 0.0
        v = torch.randn(z.shape, generator=gen)
        assert float(loc.hvp(v).reshape(-1, 7)[ignored].abs().max()) == 0.0


def _check_fused_terms(loc, ref_grad: Tensor, hess: Tensor, gen: torch.Generator) -> None:
    """gn_cotangent(u) = (g + H u, gᵀu, uᵀHu) and directional(u) = (gᵀu, uᵀHu) against the autograd
    gradient / torch.func Hessian; they leave the local state intact (grad and hvp unchanged after)."""
    g = ref_grad.reshape(-1)
    for _ in range(2):
        u = torch.randn(ref_grad.shape, generator=gen)
        uf = u.reshape(-1)
        r, g_u, u_h_u = loc.gn_cotangent(u)
        assert r.shape == ref_grad.shape
        assert rel_err(r.reshape(-1), g + hess @ uf) < 1e-13
        assert float(g_u) == pytest.approx(float(g @ uf), rel=1e-12, abs=1e-15)
        assert float(u_h_u) == pytest.approx(float(uf @ hess @ uf), rel=1e-12, abs=1e-15)
        d1, d2 = loc.directional(u)
        assert float(d1) == pytest.approx(float(g @ uf), rel=1e-12, abs=1e-15)
        assert float(d2) == pytest.approx(float(uf @ hess @ uf), rel=1e-12, abs=1e-15)
    assert rel_err(loc.grad, ref_grad) < 1e-13
    assert rel_err(loc.hvp(u).reshape(-1), hess @ uf) < 1e-13


def test_softmax_cross_entropy_local_all_ignored_is_zero_not_nan() -> None:
    z, y = _ce_inputs(False)
    y.fill_(IGNORE)
    loc = SoftmaxCrossEntropy().local(z, y)
    assert float(loc.value) == 0.0
    assert float(loc.grad.abs().max()) == 0.0
    assert float(loc.hvp(torch.ones_like(z)).abs().max()) == 0.0
    assert SoftmaxCrossEntropy().count(y) == 0


def test_softmax_cross_entropy_value_agrees_with_local_when_all_ignored() -> None:
    """OutputLoss.value (line search) and LocalLoss.value (inner loop, model decrease) must be the same
    function: for a micro-batch with no counted token local gives 0, value gives NaN (F.cross_entropy 0/0)."""
    z, y = _ce_inputs(False)
    y.fill_(IGNORE)
    loss = SoftmaxCrossEntropy()
    assert float(loss.value(z, y)) == float(loss.local(z, y).value) == 0.0


def test_mse_loss_local_matches_autograd() -> None:
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(3, 4, 2, generator=gen)
    y = torch.randn(3, 4, 2, generator=gen)

    def ref_fn(zz: Tensor) -> Tensor:
        return F.mse_loss(zz, y)

    loss = MSELoss()
    loc = loss.local(z, y)
    hess = torch.func.hessian(ref_fn)(z).reshape(z.numel(), z.numel())
    assert abs(float(loc.value) - float(ref_fn(z))) < 1e-14
    assert abs(float(loss.value(z, y)) - float(ref_fn(z))) < 1e-14
    assert rel_err(loc.grad, torch.func.grad(ref_fn)(z)) < 1e-13
    v = torch.randn(z.shape, generator=gen)
    assert rel_err(loc.hvp(v).reshape(-1), hess @ v.reshape(-1)) < 1e-13
    _check_fused_terms(loc, torch.func.grad(ref_fn)(z), hess, gen)
    assert loss.count(y) == y.numel()


@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_autograd_loss_equals_closed_forms(kind: str) -> None:
    gen = torch.Generator().manual_seed(8)
    if kind == "ce":
        z, y = _ce_inputs(True)
        closed = SoftmaxCrossEntropy()

        def fn(zz: Tensor, yy: Tensor) -> Tensor:
            return F.cross_entropy(zz.reshape(-1, zz.shape[-1]), yy.reshape(-1), ignore_index=IGNORE)
    else:
        z, y = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
        closed = MSELoss()
        fn = F.mse_loss
    auto = AutogradLoss(fn)
    a, c = auto.local(z, y), closed.local(z, y)
    assert abs(float(a.value) - float(c.value)) < 1e-14
    assert abs(float(auto.value(z, y)) - float(closed.value(z, y))) < 1e-14
    assert rel_err(a.grad, c.grad) < 1e-13
    for _ in range(2):
        v = torch.randn(z.shape, generator=gen)
        assert rel_err(a.hvp(v), c.hvp(v)) < 1e-13
        ra, ga, ha = a.gn_cotangent(v)
        rc, gc, hc = c.gn_cotangent(v)
        assert rel_err(ra, rc) < 1e-13
        assert float(ga) == pytest.approx(float(gc), rel=1e-12)
        assert float(ha) == pytest.approx(float(hc), rel=1e-12)


# ================================================================================================ schedules
def _cos(p: float, lo: float) -> float:
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * p))


def test_lr_multiplier_key_points() -> None:
    # warmup 4 of 14 steps, cosine to 0.1 over the remaining 10 (steps 4 … 13).
    f = lambda s: lr_multiplier(s, total_steps=14, warmup_steps=4, kind="cosine", min_ratio=0.1)  # noqa: E731
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0], abs=1e-15)
    assert f(4) == pytest.approx(1.0, abs=1e-15)
    assert f(13) == pytest.approx(0.1, abs=1e-15)
    assert f(100) == pytest.approx(0.1, abs=1e-15)  # clamped after the end
    assert f(8) == pytest.approx(_cos(4 / 9, 0.1), abs=1e-15)
    lin = lambda s: lr_multiplier(s, total_steps=11, kind="linear", min_ratio=0.0)  # noqa: E731
    assert [lin(s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-15)
    assert lr_multiplier(7, total_steps=10, warmup_steps=2, kind="constant") == 1.0
    assert lr_multiplier(0, total_steps=10, warmup_steps=2, kind="constant") == 0.5
    with pytest.raises(GnoptError, match="unknown schedule"):
        lr_multiplier(5, total_steps=10, kind="exp")


def test_inner_schedule_kinds_key_points() -> None:
    T, N, lo = 5, 9, 0.2
    inner = InnerSchedule("constant_with_inner_cosine", total_outer_steps=T, inner_steps=N, min_ratio=lo)
    for t in (0, 3):
        assert inner(t, 0) == pytest.approx(1.0, abs=1e-15)
        assert inner(t, N - 1) == pytest.approx(lo, abs=1e-15)
        assert inner(t, 4) == pytest.approx(_cos(0.5, lo), abs=1e-15)
    # inner warmup 3: (i+1)/3, then cosine over the remaining N-3 steps
    iw = InnerSchedule("constant_with_inner_cosine", total_outer_steps=T, inner_steps=N, inner_warmup=3)
    assert [iw(0, i) for i in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0], abs=1e-15)
    assert iw(0, N - 1) == pytest.approx(0.0, abs=1e-15)

    glob = InnerSchedule("global_cosine", total_outer_steps=T, inner_steps=N, min_ratio=lo)
    assert glob(0, 0) == pytest.approx(1.0, abs=1e-15)
    assert glob(T - 1, N - 1) == pytest.approx(lo, abs=1e-15)
    k = 2 * N + 3  # flattened inner-step index
    assert glob(2, 3) == pytest.approx(_cos(k / (T * N - 1), lo), abs=1e-15)
    assert glob(1, 0) < glob(0, N - 1)  # decays across outer steps, no restart
    gw = InnerSchedule("global_cosine", total_outer_steps=T, inner_steps=N, global_warmup=1)
    assert [gw(0, i) for i in range(N)] == pytest.approx([(i + 1) / N for i in range(N)], abs=1e-15)
    assert gw(1, 0) == pytest.approx(1.0, abs=1e-15)

    cg = InnerSchedule("cosine_with_global_schedule", total_outer_steps=T, inner_steps=N, min_ratio=lo)
    for t in range(T):
        peak = _cos(t / (T - 1), lo)
        assert cg(t, 0) == pytest.approx(peak, abs=1e-15)
        assert cg(t, N - 1) == pytest.approx(peak * lo, abs=1e-15)

    const = InnerSchedule("constant", total_outer_steps=T, inner_steps=N, global_warmup=2)
    assert [const(t, 5) for t in range(T)] == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0], abs=1e-15)
    with pytest.raises(GnoptError, match="unknown GN schedule"):
        InnerSchedule("cosine")


# ================================================================================================ partitions
def test_transformer_partition_of_tiny_llama() -> None:
    model = tiny_llama()
    names = names_of(model)
    b0 = [n for n in names if n.startswith("blocks.0.")]
    b1 = [n for n in names if n.startswith("blocks.1.")]
    assert len(b0) == len(b1) == 9  # 2 norms, 4 attention, 3 MLP matrices
    expected = (("tok_emb.weight",), tuple(b0), (*b1, "norm.weight"), ("lm_head.weight",))
    part = Partition.transformer(model)
    assert part.blocks == expected
    assert part.labels == ("embedding", "layer0", "layer1", "head")
    gn = GaussNewton(model, SoftmaxCrossEntropy(), inner_steps=1, partition="transformer")
    assert [blk.names for blk in gn._blocks] == list(expected)

    # The name-based fallback (no block_partition()) gives the same blocks.
    class Plain(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.tok_emb, self.blocks, self.norm, self.lm_head = (
                inner.tok_emb, inner.blocks, inner.norm, inner.lm_head,
            )

    assert Partition.transformer(Plain(model)).blocks == expected


def test_partition_errors_are_clear() -> None:
    model = tiny_mlp()
    with pytest.raises(GnoptError, match=r"leaves 1 parameter\(s\) out, e\.g\. '2\.bias'"):
        Partition.from_groups(model, [["0.weight", "0.bias"], ["2.weight"]])
    with pytest.raises(GnoptError, match=r"parameter '0\.bias' is in two partition blocks"):
        Partition.from_groups(model, [["0.weight", "0.bias"], ["0.bias", "2.weight", "2.bias"]])
    with pytest.raises(GnoptError, match=r"names '3\.weight', not a trainable parameter"):
        Partition.from_groups(model, [["0.weight", "0.bias", "2.weight", "2.bias", "3.weight"]])
    with pytest.raises(GnoptError, match="is empty"):
        Partition.from_groups(model, [["0.weight", "0.bias", "2.weight", "2.bias"], []])
    bad = Partition(blocks=(("0.weight",),), labels=("only",))
    with pytest.raises(GnoptError, match="leaves 3 parameter"):
        GaussNewton(model, SoftmaxCrossEntropy(), inner_steps=1, partition=bad)
    with pytest.raises(GnoptError, match="cannot find transformer layers"):
        Partition.transformer(model)
    # Regular expressions: first match wins.
    part = Partition.from_groups(model, [r"^0\.", r"."])
    assert part.blocks == (("0.weight", "0.bias"), ("2.weight", "2.bias"))


def test_conjugate_gradient_matches_dense_solves() -> None:
    """conjugate_gradient on dict-of-tensor vectors: SPD → torch.linalg.solve; singular PSD with b in the
    range → the minimum-norm solution pinv(A) b; b = 0 → 0 in 0 iterations; max_iters is respected."""
    gen = torch.Generator().manual_seed(10)
    shapes = {"a": (3, 4), "b": (5,)}

    def as_dict(vec: Tensor) -> dict[str, Tensor]:
        return {"a": vec[:12].reshape(3, 4).clone(), "b": vec[12:].clone()}

    def as_vec(d: dict[str, Tensor]) -> Tensor:
        return torch.cat([d["a"].reshape(-1), d["b"]])

    m = torch.randn(17, 17, generator=gen)
    spd = m @ m.T + 0.5 * torch.eye(17)
    low = torch.randn(17, 6, generator=gen)
    psd = low @ low.T  # rank 6
    rhs = torch.randn(17, generator=gen)
    for A, b, ref in ((spd, rhs, torch.linalg.solve(spd, rhs)),
                      (psd, psd @ rhs, torch.linalg.pinv(psd, hermitian=True) @ (psd @ rhs))):
        x, iters, rel = conjugate_gradient(lambda v, A=A: as_dict(A @ as_vec(v)), as_dict(b), 1e-12, 100)
        assert rel_err(as_vec(x), ref) < 1e-9
        assert rel < 1e-12 and iters <= 40
        assert set(x) == set(shapes) and x["a"].shape == shapes["a"]
    x, iters, rel = conjugate_gradient(lambda v: as_dict(spd @ as_vec(v)), as_dict(torch.zeros(17)), 1e-12, 9)
    assert iters == 0 and float(as_vec(x).abs().max()) == 0.0
    _, iters, rel = conjugate_gradient(lambda v: as_dict(spd @ as_vec(v)), as_dict(rhs), 1e-14, 3)
    assert iters == 3 and rel > 1e-14


def test_dense_reference_sanity() -> None:
    """The dense Jacobian helper itself agrees with central finite differences (guards the references)."""
    case = CASES["mlp_ce_masked"]
    model = case.make_model(0)
    gen = torch.Generator().manual_seed(9)
    x, y = case.make_batch(gen)
    params, names = params_of(model), names_of(model)
    d = dense(case, model, params, (x, y), names)
    v = torch.randn(d.J.shape[1], generator=gen)
    h = 1e-5
    plus = forward(model, unflat(flat(params, names) + h * v, params, names), x).reshape(-1)
    minus = forward(model, unflat(flat(params, names) - h * v, params, names), x).reshape(-1)
    assert rel_err(d.J @ v, (plus - minus) / (2 * h)) < 1e-8
