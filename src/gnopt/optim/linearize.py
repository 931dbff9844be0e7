"""Jacobian products of a model at a fixed parameter point θ_t, on one micro-batch.

Gauss-Newton never forms J = ∂f/∂θ. It needs, per micro-batch,

* the primal outputs ``z₀ = f(θ_t; x)`` and the tangent outputs ``u = J Δ`` for a tangent ``Δ`` on any
  subset of the parameters — :func:`jvp`, forward-mode AD with dual tensors and no reverse graph;
* ``Jᵀ r`` for a cotangent ``r`` that depends on ``z₀`` and ``u`` (``r = g_z + H_z u`` for a GN inner
  step) — :func:`forward_with_graph` then :func:`pullback`. One graph serves several pullbacks (layerwise
  GN: every block is linearized at the same θ_t, so the blocks share one primal forward).

A model may compute ``J Δ`` beside its own primal pass (``forward_with_tangent``; gnopt's LLaMA does, see
:mod:`gnopt.model_tangent`): :func:`forward_with_graph_and_tangent` then needs one primal forward instead of
two, and :func:`jvp` uses it too (``generic=True`` forces forward-mode AD).

:func:`linearized_pass` composes them for one block. Parameters outside the tangent carry no tangent, and
a pullback stops at the earliest parameter it needs.

Fused attention kernels have no forward-mode AD, so :func:`jvp` runs inside
``sdpa_kernel([SDPBackend.MATH])``; the reverse-mode forward keeps the fused kernel.

Mixed precision: inside :func:`model_autocast` every model call made here (:func:`call`, and with it
:func:`jvp`, :func:`forward_with_graph` and :func:`linearized_pass`) runs under ``torch.autocast`` with that
dtype, and low-precision outputs are cast to float32 on the way out, so losses, logit gradients, logit
Hessian-vector products and everything downstream stay float32 while the model's matmuls run in bf16. The
parameters, tangents and pullbacks keep the parameters' dtype: autocast casts the float32 weights (and,
in :func:`jvp`, their dual tangents) to bf16 inside each op, and the backward of that cast returns float32
gradients. Autocast and forward-mode AD agree here: the cast op carries the tangent along, so the tangent
of a bf16 activation is bf16 and the output tangent ``u`` comes out in float32 with the primal.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from gnopt.errors import GnoptError

Params = Mapping[str, Tensor]
Cotangent = Callable[[Tensor, Tensor | None], Tensor]

#: Low-precision dtypes accepted by :func:`model_autocast` (float16 would need loss scaling: not offered).
AUTOCAST_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16,)
_AUTOCAST: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar("gnopt_autocast", default=None)


def check_autocast_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """``dtype`` if it is ``None`` or one of :data:`AUTOCAST_DTYPES`, else a :class:`GnoptError`."""
    if dtype is not None and dtype not in AUTOCAST_DTYPES:
        allowed = ", ".join(str(d) for d in AUTOCAST_DTYPES)
        raise GnoptError(f"autocast_dtype must be None or one of {allowed}, got {dtype!r}")
    return dtype


@contextlib.contextmanager
def model_autocast(dtype: torch.dtype | None) -> Iterator[None]:
    """Run the model calls of this module under ``torch.autocast(dtype)`` (``None``: as they are)."""
    token = _AUTOCAST.set(check_autocast_dtype(dtype))
    try:
        yield
    finally:
        _AUTOCAST.reset(token)


def check_not_compiled(model: nn.Module) -> None:
    """A :class:`GnoptError` if ``model`` is or holds a ``torch.compile``-d module.

    A compiled module silently drops forward-mode tangents: measured on the tiny preset (torch 2.13, CPU),
    :func:`jvp` through ``torch.compile(model)`` returned the right primal and a tangent of exactly zero.
    """
    for name, module in model.named_modules():
        if getattr(module, "_orig_mod", None) is not None:  # torch._dynamo's OptimizedModule
            where = f" (submodule {name!r})" if name else ""
            raise GnoptError(
                f"the model{where} is compiled with torch.compile, which drops forward-mode AD tangents: "
                "Gauss-Newton's Jacobian-vector products would be zero; pass the uncompiled module"
            )


def _to_float32(out: Tensor) -> Tensor:
    """Low-precision model outputs in float32 (a dual tensor keeps its tangent, cast alike)."""
    return out.float() if out.dtype in (torch.bfloat16, torch.float16) else out


@contextlib.contextmanager
def forward_ad_friendly() -> Iterator[None]:
    """Run ``F.scaled_dot_product_attention`` in its math form, which supports forward-mode AD."""
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def call(model: nn.Module, params: Params, inputs: Any) -> Tensor:
    """``model(inputs)`` with its parameters replaced by ``params`` (buffers stay the module's own).

    Inside :func:`model_autocast` the call runs under autocast and a bf16 output comes back as float32.
    """
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    with _autocast(params):
        out = functional_call(model, dict(params), args)
    return _to_float32(out) if _AUTOCAST.get() is not None else out


def _autocast(params: Params) -> contextlib.AbstractContextManager[object]:
    """``torch.autocast`` on the parameters' device inside :func:`model_autocast`, else nothing."""
    dtype = _AUTOCAST.get()
    if dtype is None:
        return contextlib.nullcontext()
    first = next(iter(params.values()), None)
    return torch.autocast(first.device.type if first is not None else "cpu", dtype=dtype)


def forward_with_graph(
    model: nn.Module, params: Params, inputs: Any, wrt: Sequence[str]
) -> tuple[Tensor, dict[str, Tensor]]:
    """``z = f(θ; x)`` with a reverse-mode graph to the parameters ``wrt`` (fused attention kernels allowed).

    Returns ``z`` (attached to the graph) and the leaf tensors of ``wrt``, for :func:`pullback`.
    """
    leaves = {n: params[n].detach().requires_grad_(True) for n in wrt}
    merged: dict[str, Tensor] = {n: leaves.get(n, p.detach()) for n, p in params.items()}
    with torch.enable_grad():
        z = call(model, merged, inputs)
    return z, leaves


def pullback(
    z: Tensor, leaves: Mapping[str, Tensor], names: Sequence[str], r: Tensor, *, retain_graph: bool = False
) -> dict[str, Tensor]:
    """``Jᵀ r`` for the parameters ``names`` (a subset of ``leaves``) through the graph of ``z``.

    Autograd only walks the part of the graph between ``z`` and those parameters, so a block near the
    output costs a partial backward.
    """
    if not names:
        return {}
    grads = torch.autograd.grad(
        z, [leaves[n] for n in names], r, retain_graph=retain_graph, allow_unused=True
    )
    return {
        n: (g if g is not None else torch.zeros_like(leaves[n])) for n, g in zip(names, grads, strict=True)
    }


def linearized_pass(
    model: nn.Module,
    params: Params,
    inputs: Any,
    *,
    tangent: Params | None,
    wrt: Sequence[str],
    cotangent: Cotangent,
) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """``z₀``, ``u = J Δ`` and ``Jᵀ r`` for ``r = cotangent(z₀, u)`` on one micro-batch.

    Implementation: a forward-mode pass without any reverse graph gives ``J Δ`` (:func:`jvp`), then a plain
    forward with a graph and one backward give ``Jᵀ r``. Measured on cpu-small (2 threads) this is ≈25%
    faster than a single dual-number pass whose primals require grad: that pass records the tangent
    computation in the autograd graph as well, which costs more than the extra primal forward.

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
    u = jvp(model, params, inputs, tangent)[1] if tangent else None
    z, leaves = forward_with_graph(model, params, inputs, wrt)
    z0 = z.detach()
    r = cotangent(z0, u)
    return z0, u, pullback(z, leaves, list(wrt), r)


def has_tangent_forward(model: nn.Module) -> bool:
    """Whether ``model`` has a one-pass ``forward_with_tangent(params, inputs, tangent) -> (z, J Δ)`` that
    may be used. It bypasses the modules' ``forward``, so it is used only when the model says it computes
    the tangent of its own ``forward`` (``forward_with_tangent_applies()``, when the model defines it: gnopt's
    LLaMA checks its classes and submodules) and no hook (forward or backward, on any submodule, or
    global) would run on the generic path and not on it."""
    if not callable(getattr(model, "forward_with_tangent", None)):
        return False
    applies = getattr(model, "forward_with_tangent_applies", None)
    if callable(applies) and not applies():
        return False
    from torch.nn.modules import module as _module

    if (_module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
            or _module._global_backward_pre_hooks):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                   for m in model.modules())


def forward_with_graph_and_tangent(
    model: nn.Module, params: Params, inputs: Any, wrt: Sequence[str], tangent: Params
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """``z = f(θ; x)`` with a reverse-mode graph to ``wrt`` (as :func:`forward_with_graph`) and ``u = J Δ``.

    A model that defines ``forward_with_tangent(params, inputs, tangent)`` (gnopt's LLaMA does: see
    :mod:`gnopt.model_tangent`) gets both from one primal pass; any other model gets :func:`jvp` followed by
    :func:`forward_with_graph` (two primal passes). ``u`` carries no graph either way.
    """
    if not has_tangent_forward(model):
        u = jvp(model, params, inputs, tangent, generic=True)[1]
        z, leaves = forward_with_graph(model, params, inputs, wrt)
        return z, leaves, u
    leaves = {n: params[n].detach().requires_grad_(True) for n in wrt}
    merged: dict[str, Tensor] = {n: leaves.get(n, p.detach()) for n, p in params.items()}
    tan = {n: t.detach().to(merged[n].dtype) for n, t in tangent.items()}
    with torch.enable_grad(), _autocast(merged):  # as in :func:`call`: bf16 matmuls inside, float32 out
        z, u = model.forward_with_tangent(merged, inputs, tan)  # type: ignore[operator]
    if _AUTOCAST.get() is not None:
        z, u = _to_float32(z), _to_float32(u)
    return z, leaves, u.detach()


def jvp(
    model: nn.Module, params: Params, inputs: Any, tangent: Params, *, generic: bool = False
) -> tuple[Tensor, Tensor]:
    """``(f(θ; x), J Δ)`` without building any reverse-mode graph.

    Forward-mode AD (dual tensors) for any module; a model with a one-pass ``forward_with_tangent`` (see
    :func:`forward_with_graph_and_tangent`) uses it instead, unless ``generic=True``.
    """
    if not generic and has_tangent_forward(model):
        with torch.no_grad():
            z, _, u = forward_with_graph_and_tangent(model, params, inputs, (), tangent)
        return z.detach(), u
    with torch.no_grad(), fwAD.dual_level(), forward_ad_friendly():
        merged: dict[str, Tensor] = {n: p.detach() for n, p in params.items()}
        for n, t in tangent.items():
            merged[n] = fwAD.make_dual(merged[n], t.to(merged[n].dtype))
        out = call(model, merged, inputs)
        z, u = fwAD.unpack_dual(out)
        u = u if u is not None else torch.zeros_like(z)
    # The primal and tangent stay valid after the dual level closes; no copies (they are logit-sized).
    return z.detach(), u.detach()
