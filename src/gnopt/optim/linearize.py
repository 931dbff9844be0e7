"""Jacobian products of a model at a fixed parameter point θ_t, on one micro-batch.

Gauss-Newton never forms J = ∂f/∂θ. One pass of :func:`linearized_pass` gives

* the primal outputs ``z₀ = f(θ_t; x)``,
* the tangent outputs ``u = J Δ`` for a tangent ``Δ`` on any subset of the parameters (forward-mode AD
  with dual tensors, computed in the same forward pass as ``z₀``), and
* ``Jᵀ r`` for a cotangent ``r`` that may depend on ``z₀`` and ``u`` (reverse-mode AD through the primal
  graph recorded in that same pass),

which is exactly one GN inner step: ``r = g_z + H_z u``. Its cost is one primal forward, one tangent
forward and one backward — the ≈5/3 training-step floor for a fresh micro-batch
(../shared/design/stack-notes.md). ``Δ`` and the reverse pass may be restricted to a block of parameters
(layerwise GN): parameters outside the tangent carry no tangent, and the backward stops at the earliest
parameter it needs.

Fused attention kernels have no forward-mode AD, so passes that carry a tangent run inside
``sdpa_kernel([SDPBackend.MATH])``; passes without a tangent keep the fused kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

Params = Mapping[str, Tensor]
Cotangent = Callable[[Tensor, Tensor | None], Tensor]


@contextlib.contextmanager
def forward_ad_friendly() -> Iterator[None]:
    """Run ``F.scaled_dot_product_attention`` in its math form, which supports forward-mode AD."""
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def call(model: nn.Module, params: Params, inputs: Any) -> Tensor:
    """``model(inputs)`` with its parameters replaced by ``params`` (buffers stay the module's own)."""
    if isinstance(inputs, tuple):
        return functional_call(model, dict(params), inputs)
    return functional_call(model, dict(params), (inputs,))


def linearized_pass(
    model: nn.Module,
    params: Params,
    inputs: Any,
    *,
    tangent: Params | None,
    wrt: Sequence[str],
    cotangent: Cotangent,
) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """One forward (primal + tangent) and one backward of ``model`` at ``params``.

    Args:
        model: the module; its own parameters are not touched.
        params: θ_t for every trainable parameter (detached tensors).
        inputs: the micro-batch inputs passed to ``model``.
        tangent: Δ for a subset of the parameters (``None`` or empty: no tangent, ``u`` is ``None``).
        wrt: names of the parameters to return ``Jᵀ r`` for (may be empty).
        cotangent: ``r = cotangent(z₀, u)``, called with detached tensors.

    Returns:
        ``(z₀, u, {name: (Jᵀ r)[name] for name in wrt})``; ``z₀`` and ``u`` are detached.
    """
    leaves = {n: params[n].detach().requires_grad_(True) for n in wrt}
    merged: dict[str, Tensor] = {n: leaves.get(n, p.detach()) for n, p in params.items()}
    with torch.enable_grad():
        if tangent:
            with fwAD.dual_level(), forward_ad_friendly():
                for n, t in tangent.items():
                    merged[n] = fwAD.make_dual(merged[n], t.to(merged[n].dtype))
                out = call(model, merged, inputs)
                z, u_dual = fwAD.unpack_dual(out)
                u = u_dual.detach() if u_dual is not None else torch.zeros_like(z.detach())
                del out, u_dual
        else:
            z = call(model, merged, inputs)
            u = None
        z0 = z.detach()
        r = cotangent(z0, u)
        if leaves:
            grads = torch.autograd.grad(z, list(leaves.values()), r, allow_unused=True)
            out_grads = {
                n: (g if g is not None else torch.zeros_like(params[n]))
                for n, g in zip(leaves, grads, strict=True)
            }
        else:
            out_grads = {}
    return z0, u, out_grads


def jvp(model: nn.Module, params: Params, inputs: Any, tangent: Params) -> tuple[Tensor, Tensor]:
    """``(f(θ; x), J Δ)`` without building any reverse-mode graph."""
    with torch.no_grad(), fwAD.dual_level(), forward_ad_friendly():
        merged: dict[str, Tensor] = {n: p.detach() for n, p in params.items()}
        for n, t in tangent.items():
            merged[n] = fwAD.make_dual(merged[n], t.to(merged[n].dtype))
        out = call(model, merged, inputs)
        z, u = fwAD.unpack_dual(out)
        u = u if u is not None else torch.zeros_like(z)
    # The primal and tangent stay valid after the dual level closes; no copies (they are logit-sized).
    return z.detach(), u.detach()
