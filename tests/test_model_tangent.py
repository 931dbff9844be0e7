"""The LLaMA model's one-pass tangent forward (gnopt.model_tangent) equals forward-mode AD and dense J.

It is the fast path behind :func:`gnopt.optim.linearize.forward_with_graph_and_tangent` and :func:`jvp`: the
primal keeps its reverse graph (fused attention allowed) and ``J Δ`` is propagated beside it by hand.
"""

from __future__ import annotations

import types
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from _gn_reference import dense_jacobian, flat, names_of
from torch import nn

from gnopt.model import PRESETS, Block, LLaMA, SwiGLU, build_model
from gnopt.optim import GaussNewton, LineSearch, SoftmaxCrossEntropy, TorchOptimizer
from gnopt.optim.linearize import (
    forward_with_graph,
    forward_with_graph_and_tangent,
    has_tangent_forward,
    jvp,
    pullback,
)

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


def _problem(model: nn.Module, seed: int) -> tuple[dict[str, torch.Tensor], list[str], torch.Tensor,
                                                  torch.Tensor, dict[str, torch.Tensor]]:
    """The trainable parameters, their names, tokens x, a float64 cotangent r and a float64 tangent."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 40, (3, 12), generator=gen)
    r = torch.randn(3, 12, 40, generator=gen, dtype=F64)
    tangent = {n: torch.randn(p.shape, generator=gen, dtype=F64) for n, p in params.items()}
    return params, list(params), x, r, tangent


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
    params, names, x, r, tangent = _problem(model, seed=4)
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


class _HalfLogits(LLaMA):
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return 0.5 * super().forward(idx)


class _NoMlpBlock(Block):
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.attn_norm(x), cos, sin)


class _GeluMlp(SwiGLU):  # the same parameter names, another function
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)) * self.w3(x))


def _subclassed(model: LLaMA) -> LLaMA:
    other = _HalfLogits(model.config)
    other.load_state_dict(model.state_dict())
    return other.double()


def _block_subclass(model: LLaMA) -> LLaMA:
    block = _NoMlpBlock(model.config, "sdpa").double()
    block.load_state_dict(model.blocks[1].state_dict())
    model.blocks[1] = block
    return model


def _block_forward_patched(model: LLaMA) -> LLaMA:
    blk = model.blocks[0]
    blk.forward = types.MethodType(_NoMlpBlock.forward, blk)  # type: ignore[method-assign]
    return model


def _mlp_swapped(model: LLaMA) -> LLaMA:
    mlp = _GeluMlp(model.config.d_model, model.config.d_ff).double()
    mlp.load_state_dict(model.blocks[0].mlp.state_dict())
    model.blocks[0].mlp = mlp
    return model


def _norm_eps(model: LLaMA) -> LLaMA:
    model.blocks[1].mlp_norm.eps = 0.5
    model.norm.eps = 2.0
    return model


def _head_bias(model: LLaMA) -> LLaMA:
    head = nn.Linear(model.config.d_model, 40, bias=True).double()
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.normal_()
    model.lm_head = head
    return model


CHANGES = {"subclass_forward": _subclassed, "block_subclass": _block_subclass,
           "block_forward_patched": _block_forward_patched, "mlp_swapped": _mlp_swapped,
           "norm_eps": _norm_eps, "head_bias": _head_bias}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_model_gets_the_tangent_of_the_function_it_computes(change: str) -> None:
    """A subclass whose forward halves the logits, a block with another forward (a subclass, or a forward
    set on the instance), an MLP swapped for another function with the same parameter names, norms with
    another eps than the config's, a head with a bias: GN's tangent (and its graph) are those of the
    function the model computes, i.e. equal to forward-mode AD of ``model(x)``; and GN's steps equal those
    of the generic path."""
    model = CHANGES[change](_model("sdpa"))
    params, names, x, r, tangent = _problem(model, seed=5)
    z0, u0 = jvp(model, params, x, tangent, generic=True)
    assert float((z0 - model(x).detach()).abs().max()) < 1e-12
    z, leaves, u = forward_with_graph_and_tangent(model, params, x, names, tangent)
    assert float((z.detach() - z0).abs().max()) < 1e-12
    assert float((u - u0).abs().max() / u0.abs().max()) < 1e-12
    assert float((jvp(model, params, x, tangent)[1] - u0).abs().max() / u0.abs().max()) < 1e-12
    z_ref, leaves_ref = forward_with_graph(model, params, x, names)
    g = pullback(z, leaves, names, r)
    g_ref = pullback(z_ref, leaves_ref, names, r)
    assert max(float((g[n] - g_ref[n]).abs().max()) for n in names) < 1e-12
    fast = _gn_theta(model, model, None)
    base = CHANGES[change](_model("sdpa"))
    assert float((fast - _gn_theta(_Hidden(base), base, None)).abs().max()) < 1e-12


def test_the_plain_model_takes_the_one_pass_tangent(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks above do not cost gnopt's own LLaMA its fast path (nor one with frozen or tied
    parameters, nor another attention kernel or eps through the config); a hook, or a class whose
    ``forward`` was replaced after import, turns it off."""
    assert has_tangent_forward(_model("sdpa")) and has_tangent_forward(_model("explicit"))
    for change in (_freeze_norm, _tie):
        model = _model("sdpa")
        change(model)
        assert has_tangent_forward(model)
    assert has_tangent_forward(LLaMA(replace(PRESETS["tiny"], norm_eps=1e-3)))
    model = _model("sdpa")
    handle = model.blocks[0].register_forward_hook(lambda *args: None)
    assert not has_tangent_forward(model)
    handle.remove()
    assert has_tangent_forward(model)
    handle = model.norm.register_full_backward_hook(lambda *args: None)
    assert not has_tangent_forward(model)
    handle.remove()
    monkeypatch.setattr(SwiGLU, "forward", _GeluMlp.forward)
    assert not has_tangent_forward(model)
    monkeypatch.undo()
    assert has_tangent_forward(model)
