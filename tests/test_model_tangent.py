"""The LLaMA model's one-pass tangent forward (gnopt.model_tangent) equals forward-mode AD and dense J.

It is the fast path behind :func:`gnopt.optim.linearize.forward_with_graph_and_tangent` and :func:`jvp`: the
primal keeps its reverse graph (fused attention allowed) and ``J Δ`` is propagated beside it by hand.
"""

from __future__ import annotations

import pytest
import torch
from _gn_reference import dense_jacobian, flat, names_of
from torch import nn

from gnopt.model import build_model
from gnopt.optim import GaussNewton, LineSearch, SoftmaxCrossEntropy, TorchOptimizer
from gnopt.optim.linearize import forward_with_graph, forward_with_graph_and_tangent, jvp

F64 = torch.float64
SUBSETS = [None, "tok_emb.", "blocks.0.attn_norm.", "blocks.0.attn.wq.", "blocks.0.attn.wk.",
           "blocks.1.attn.wv.", "blocks.1.attn.wo.", "blocks.0.mlp.w1.", "blocks.1.mlp.w3.",
           "blocks.0.mlp.w2.", "blocks.1.mlp_norm.", "norm.", "lm_head.", "blocks.1."]


def _model(attn_impl: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model("tiny", vocab_size=40, seq_len=12, attn_impl=attn_impl, dtype=F64)


@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
def test_tangent_forward_equals_forward_mode_ad_and_keeps_the_graph(attn_impl: str) -> None:
    """Every parameter group alone, and all at once: z and u equal the generic forward-mode pass (dual
    tensors) to round-off; the graph gives the same Jᵀr as a plain forward with a graph."""
    model = _model(attn_impl)
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 40, (3, 12), generator=gen)
    r = torch.randn(3, 12, 40, generator=gen, dtype=F64)
    z_ref, leaves_ref = forward_with_graph(model, params, x, names)
    g_ref = torch.autograd.grad(z_ref, list(leaves_ref.values()), r)
    for sub in SUBSETS:
        tangent = {n: torch.randn(p.shape, generator=gen, dtype=F64) for n, p in params.items()
                   if sub is None or n.startswith(sub)}
        assert tangent, sub
        z0, u0 = jvp(model, params, x, tangent, generic=True)
        z, leaves, u = forward_with_graph_and_tangent(model, params, x, names, tangent)
        assert not u.requires_grad and z.requires_grad
        assert float((z.detach() - z0).abs().max()) < 1e-12
        assert float((u - u0).abs().max() / u0.abs().max()) < 1e-12, sub
        g = torch.autograd.grad(z, list(leaves.values()), r)
        assert max(float((a - b).abs().max()) for a, b in zip(g, g_ref, strict=True)) < 1e-12
        zf, uf = jvp(model, params, x, tangent)  # jvp takes the fast path by default
        assert float((uf - u).abs().max()) == 0.0 and float((zf - z.detach()).abs().max()) == 0.0


def test_tangent_forward_equals_dense_jacobian() -> None:
    model = _model("sdpa")
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = names_of(model)
    x = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(2))
    J = dense_jacobian(model, params, x, names)
    delta = {n: torch.randn_like(p) for n, p in params.items()}
    _, _, u = forward_with_graph_and_tangent(model, params, x, names, delta)
    ref = J @ flat(delta, names)
    assert float((u.reshape(-1) - ref).abs().max() / ref.abs().max()) < 1e-12


def test_gn_step_is_the_same_with_and_without_the_fast_path() -> None:
    """Full GN (fused primal + tangent) and layerwise GN on a model whose fast path is hidden: equal steps."""

    class Hidden(nn.Module):  # the same LLaMA without forward_with_tangent: the generic two-pass path
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, 40, (2, 12), generator=gen), torch.randint(0, 40, (2, 12), generator=gen))
               for _ in range(6)]
    thetas = []
    for hide in (False, True):
        base = _model("sdpa")
        model = Hidden(base) if hide else base
        gn = GaussNewton(model, SoftmaxCrossEntropy(), inner_steps=2, warm_scale=True,
                         inner=TorchOptimizer(lambda ps: torch.optim.SGD(ps, lr=0.3)), inner_clip=None,
                         line_search=LineSearch(kind="model", num_batches=1))
        recs = [gn.step(iter(batches[3 * t:3 * t + 3])) for t in range(2)]
        thetas.append(torch.cat([p.detach().reshape(-1) for p in base.parameters()]))
        if not hide:
            assert recs[1].passes == pytest.approx(2 * (5 / 3) + (1 / 3 + 2 / 3) + len(recs[1].alphas) / 3)
    assert float((thetas[0] - thetas[1]).abs().max()) < 1e-12


class _Hidden(nn.Module):
    """The same LLaMA without ``forward_with_tangent``: GN takes the generic forward-mode path."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _freeze_norm(model: nn.Module) -> None:
    model.norm.weight.requires_grad_(False)  # type: ignore[union-attr]
    model.blocks[0].attn.wq.weight.requires_grad_(False)  # type: ignore[index,union-attr]


def _tie(model: nn.Module) -> None:
    model.lm_head.weight = model.tok_emb.weight  # type: ignore[union-attr]


def _gn_theta(model: nn.Module, base: nn.Module, partition: str | None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, 40, (2, 12), generator=gen), torch.randint(0, 40, (2, 12), generator=gen))
               for _ in range(6)]
    gn = GaussNewton(model, SoftmaxCrossEntropy(), inner_steps=2, partition=partition,
                     inner=TorchOptimizer(lambda ps: torch.optim.SGD(ps, lr=0.3)), inner_clip=None,
                     line_search=LineSearch(kind="model", num_batches=1))
    for t in range(2):
        gn.step(iter(batches[3 * t:3 * t + 3]))
    return torch.cat([p.detach().reshape(-1) for p in base.parameters()])


@pytest.mark.parametrize("change", [_freeze_norm, _tie], ids=["frozen", "tied"])
def test_frozen_and_tied_parameters_take_the_fast_path_and_match_forward_mode_ad(change) -> None:
    """A frozen final norm (and query weight) or a tied embedding/head: the one-pass tangent of the
    trainable parameters equals forward-mode AD, its graph gives the generic Jᵀr, and full and layerwise
    GN take the same steps as on the generic path (the frozen parameters stay put)."""
    model = _model("sdpa")
    change(model)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(0, 40, (3, 12), generator=gen)
    r = torch.randn(3, 12, 40, generator=gen, dtype=F64)
    tangent = {n: torch.randn(p.shape, generator=gen, dtype=F64) for n, p in params.items()}
    z0, u0 = jvp(model, params, x, tangent, generic=True)
    z, leaves, u = forward_with_graph_and_tangent(model, params, x, names, tangent)
    assert float((z.detach() - z0).abs().max()) < 1e-12
    assert float((u - u0).abs().max() / u0.abs().max()) < 1e-12
    z_ref, leaves_ref = forward_with_graph(model, params, x, names)
    g = torch.autograd.grad(z, list(leaves.values()), r)
    g_ref = torch.autograd.grad(z_ref, list(leaves_ref.values()), r)
    assert max(float((a - b).abs().max()) for a, b in zip(g, g_ref, strict=True)) < 1e-12
    for partition in (None, "transformer"):
        thetas = []
        for hide in (False, True):
            base = _model("sdpa")
            change(base)
            frozen = [p.detach().clone() for p in base.parameters() if not p.requires_grad]
            thetas.append(_gn_theta(_Hidden(base) if hide else base, base, partition))
            after = [p.detach() for p in base.parameters() if not p.requires_grad]
            assert all(torch.equal(a, b) for a, b in zip(frozen, after, strict=True))
        assert float((thetas[0] - thetas[1]).abs().max()) < 1e-12, partition
