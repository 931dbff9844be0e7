"""One pass that gives the LLaMA model's logits with a reverse-mode graph *and* their tangent ``J Δ``.

Gauss-Newton's inner step needs, on a fresh micro-batch, ``z₀ = f(θ_t; x)`` with a graph (for ``Jᵀ r``) and
``u = J Δ``. The generic path (:func:`gnopt.optim.linearize.jvp` then
:func:`~gnopt.optim.linearize.forward_with_graph`) runs the primal forward twice: forward-mode AD with
dual tensors cannot leave the tangent computation out of the reverse graph, so the two are kept apart.
This module is the model-specific fast path behind the same interface
(:func:`gnopt.optim.linearize.forward_with_graph_and_tangent`): the primal runs once, with its graph
(fused attention allowed), and the tangent is propagated beside it by hand under ``torch.no_grad`` from
the detached primal activations — each layer's tangent rule written out:

* linear ``y = x Wᵀ``: ``u_y = u_x Wᵀ + x ΔWᵀ``; embedding ``e = E[idx]``: ``u_e = ΔE[idx]``;
* RMSNorm ``y = n ⊙ w`` with ``n = x r``, ``r = (mean x² + ε)^(-1/2)``:
  ``u_y = r (u_x − n · mean(n ⊙ u_x)) ⊙ w + n ⊙ Δw``;
* RoPE is linear in q and k (the same rotation of the tangents);
* attention ``O = P v``, ``P = softmax(q kᵀ/√d + mask)``: ``u_S = (u_q kᵀ + q u_kᵀ)/√d``,
  ``u_P = P ⊙ (u_S − rowsum(P ⊙ u_S))``, ``u_O = u_P v + P u_v``;
* SwiGLU ``h = silu(a) ⊙ b``: ``u_h = silu'(a) u_a ⊙ b + silu(a) ⊙ u_b``.

Parameters without a tangent cost nothing (layerwise blocks pass a tangent for one block only). As with
``functional_call``, a parameter missing from ``params`` (a frozen one: GN passes the trainable ones only)
is the module's own tensor, with no tangent, and a tied parameter (e.g. ``lm_head.weight is
tok_emb.weight``) takes its value and tangent under any of its names, so both of its uses carry them.

The rules mirror the classes of :mod:`gnopt.model` as written: :func:`gnopt.model.mirrors` tells whether a
model is built from exactly those (no subclass, no swapped submodule, no ``forward`` replaced on a class or
an instance, no bias added); for any other model GN takes forward-mode AD of its ``forward``. This module
imports nothing from :mod:`gnopt.model` (which imports it): no import cycle. Each RMSNorm's
``eps`` is read from the module (as its ``forward`` does), not from the config.

``tests/test_model_tangent.py`` checks it against forward-mode AD and dense float64 Jacobians.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gnopt.attention import explicit_causal_attention

Tan = Tensor | None


def _add(a: Tan, b: Tan) -> Tan:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _linear(x: Tensor, w: Tensor, ux: Tan, dw: Tan) -> tuple[Tensor, Tan]:
    y = F.linear(x, w)
    with torch.no_grad():
        uy = F.linear(ux, w.detach()) if ux is not None else None
        if dw is not None:
            uy = _add(uy, F.linear(x.detach(), dw))
    return y, uy


def _rms_norm(x: Tensor, w: Tensor, eps: float, ux: Tan, dw: Tan) -> tuple[Tensor, Tan]:
    y = F.rms_norm(x, (x.shape[-1],), w, eps)
    if ux is None and dw is None:
        return y, None
    with torch.no_grad():
        xd = x.detach()
        r = torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
        n = xd * r
        uy = None
        if ux is not None:
            uy = (ux - n * (n * ux).mean(-1, keepdim=True)).mul_(r).mul_(w.detach())
        if dw is not None:
            uy = _add(uy, n * dw)
    return y, uy


def _heads(t: Tensor, b: int, s: int, h: int, hd: int) -> Tensor:
    return t.view(b, s, h, hd).transpose(1, 2)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + _rotate_half(x) * sin


def _attention(model: nn.Module, i: int, params: Mapping[str, Tensor], tangent: Mapping[str, Tensor],
               x: Tensor, ux: Tan, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tan]:
    p = f"blocks.{i}.attn."
    attn = model.blocks[i].attn
    b, s, d = x.shape
    h, hd = attn.n_heads, attn.head_dim
    q, uq = _linear(x, params[p + "wq.weight"], ux, tangent.get(p + "wq.weight"))
    k, uk = _linear(x, params[p + "wk.weight"], ux, tangent.get(p + "wk.weight"))
    v, uv = _linear(x, params[p + "wv.weight"], ux, tangent.get(p + "wv.weight"))
    q, k, v = (_rope(_heads(q, b, s, h, hd), cos, sin), _rope(_heads(k, b, s, h, hd), cos, sin),
               _heads(v, b, s, h, hd))
    if attn.attn_impl == "sdpa":
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        y = explicit_causal_attention(q, k, v)
    uy = None
    if uq is not None or uk is not None or uv is not None:
        with torch.no_grad():
            qd, kd, vd = q.detach(), k.detach(), v.detach()
            scale = 1.0 / math.sqrt(hd)
            future = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
            probs = torch.softmax((qd @ kd.transpose(-2, -1)).mul_(scale).masked_fill_(future, float("-inf")),
                                  dim=-1)
            if uq is not None or uk is not None:
                us = None
                if uq is not None:
                    us = _rope(_heads(uq, b, s, h, hd), cos, sin) @ kd.transpose(-2, -1)
                if uk is not None:
                    us = _add(us, qd @ _rope(_heads(uk, b, s, h, hd), cos, sin).transpose(-2, -1))
                assert us is not None
                us = us.mul_(scale).masked_fill_(future, 0.0)
                up = probs * us
                up = up.sub_(probs * up.sum(-1, keepdim=True))
                uy = up @ vd
            if uv is not None:
                uy = _add(uy, probs @ _heads(uv, b, s, h, hd))
    y = y.transpose(1, 2).reshape(b, s, d)
    uy = uy.transpose(1, 2).reshape(b, s, d) if uy is not None else None
    return _linear(y, params[p + "wo.weight"], uy, tangent.get(p + "wo.weight"))


def _swiglu(i: int, params: Mapping[str, Tensor], tangent: Mapping[str, Tensor], x: Tensor,
            ux: Tan) -> tuple[Tensor, Tan]:
    p = f"blocks.{i}.mlp."
    a, ua = _linear(x, params[p + "w1.weight"], ux, tangent.get(p + "w1.weight"))
    g, ug = _linear(x, params[p + "w3.weight"], ux, tangent.get(p + "w3.weight"))
    hidden = F.silu(a) * g
    uh = None
    if ua is not None or ug is not None:
        with torch.no_grad():
            ad, gd = a.detach(), g.detach()
            if ua is not None:
                sig = torch.sigmoid(ad)
                uh = ua * sig * (1.0 + ad * (1.0 - sig)) * gd  # silu'(a) u_a ⊙ b
            if ug is not None:
                uh = _add(uh, F.silu(ad) * ug)
    return _linear(hidden, params[p + "w2.weight"], uh, tangent.get(p + "w2.weight"))


def _by_module_name(
    model: nn.Module, params: Mapping[str, Tensor], tangent: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """θ and Δ under every name a module of ``model`` holds a parameter by (as ``functional_call`` with
    ``tie_weights=True`` resolves them): a tied parameter gets the entry given under any of its names, a
    parameter with no entry keeps the module's own tensor (and has no tangent)."""
    aliases: dict[int, list[str]] = {}
    own: dict[str, Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
        own[name] = p
    values: dict[str, Tensor] = {}
    tangents: dict[str, Tensor] = {}
    for names in aliases.values():
        value = next((params[n] for n in names if n in params), None)
        tan = next((tangent[n] for n in names if n in tangent), None)
        for n in names:
            values[n] = params[n] if n in params else value if value is not None else own[n]
            t = tangent[n] if n in tangent else tan
            if t is not None:
                tangents[n] = t
    return values, tangents


def llama_forward_with_tangent(
    model: nn.Module, params: Mapping[str, Tensor], idx: Tensor, tangent: Mapping[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """``(f(θ; idx), J Δ)``: logits with a graph to the ``params`` that require grad, and their tangent.

    ``params`` holds θ by name (a parameter it leaves out is the module's own); ``tangent`` holds Δ for
    any subset. The tangent carries no graph.
    """
    model.check_input(idx)
    params, tangent = _by_module_name(model, params, tangent)
    emb = params["tok_emb.weight"]
    x = F.embedding(idx, emb)
    dE = tangent.get("tok_emb.weight")
    ux: Tan = F.embedding(idx, dE) if dE is not None else None
    cos, sin = model.rope(idx.shape[1], x.dtype)
    for i in range(len(model.blocks)):
        p = f"blocks.{i}."
        block = model.blocks[i]
        hn, uhn = _rms_norm(x, params[p + "attn_norm.weight"], block.attn_norm.eps, ux,
                            tangent.get(p + "attn_norm.weight"))
        y, uy = _attention(model, i, params, tangent, hn, uhn, cos, sin)
        x, ux = x + y, _add(ux, uy)
        hn, uhn = _rms_norm(x, params[p + "mlp_norm.weight"], block.mlp_norm.eps, ux,
                            tangent.get(p + "mlp_norm.weight"))
        y, uy = _swiglu(i, params, tangent, hn, uhn)
        x, ux = x + y, _add(ux, uy)
    hn, uhn = _rms_norm(x, params["norm.weight"], model.norm.eps, ux, tangent.get("norm.weight"))
    z, uz = _linear(hn, params["lm_head.weight"], uhn, tangent.get("lm_head.weight"))
    return z, uz if uz is not None else torch.zeros_like(z, requires_grad=False)
