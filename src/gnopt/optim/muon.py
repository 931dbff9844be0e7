"""``torch.optim.Muon`` with the precision of its Newton–Schulz iteration as an option.

``torch.optim.Muon`` (torch 2.9–2.13) orthogonalizes every update with 5 Newton–Schulz iterations cast to
bfloat16, and exposes no hook for that cast. bf16 is what makes it fast on a GPU and on a CPU with native
bf16 (``avx512_bf16``/``amx_bf16``); on a CPU without it, a bf16 matrix product is emulated and runs several
times slower than float32 (a 128×384 Gram product: 1,397 µs against 148 µs on an AVX2 EPYC, issue 29), and
GN runs the iteration once per *inner* step. :class:`Muon` is torch's optimizer with one more per-group
option, ``ns_precision`` (:data:`gnopt.optim.ns_precision.NS_PRECISIONS`):

* ``"bf16"`` (default): :meth:`Muon.step` **is** ``torch.optim.Muon.step`` — bit for bit torch's
  optimizer, whatever it does in the installed version;
* ``"fp32"``: the same update (torch's momentum, Nesterov, coefficients, ``eps``, step count, weight decay
  and ``_adjust_lr``), with the Newton–Schulz iteration run in float32 (:func:`zeropower_via_newtonschulz`,
  torch's iteration with the dtype as an argument). Tests check that this loop run in bf16 equals
  ``torch.optim.Muon`` bitwise, and that the float32 iteration lands where the quintic is known to land
  (the SVD reference ``U f(S) Vᵀ`` in float64, f the quintic iterated; its singular values spread around 1,
  so the result is near the polar factor ``U Vᵀ``).

The option lives in the parameter group, so it is saved by ``state_dict`` and restored by
``load_state_dict`` (a state dict saved before the option existed loads as ``"bf16"``, what it ran).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import _muon

from gnopt.optim.ns_precision import NS_PRECISIONS, TORCH_NS_PRECISION


def ns_dtype(ns_precision: str) -> torch.dtype:
    """The dtype of a Newton–Schulz precision (:data:`~gnopt.optim.ns_precision.NS_PRECISIONS`); a
    ``ValueError`` listing them for any other value."""
    if ns_precision not in NS_PRECISIONS:
        raise ValueError(f"ns_precision must be one of {', '.join(NS_PRECISIONS)}; got {ns_precision!r}")
    dtype: torch.dtype = getattr(torch, NS_PRECISIONS[ns_precision])
    return dtype


def zeropower_via_newtonschulz(grad: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                               eps: float, dtype: torch.dtype) -> Tensor:
    """torch's Newton–Schulz orthogonalization (``torch.optim._muon._zeropower_via_newtonschulz``) run in
    ``dtype`` instead of bfloat16: the same normalization, transposition and quintic iterations.

    The result has ``dtype``; ``grad`` is not modified.
    """
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if grad.ndim != 2:
        raise ValueError("Input tensor gradient must be a 2D matrix")
    if len(ns_coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    a, b, c = ns_coefficients
    ortho_grad = grad.to(dtype, copy=True)  # torch: grad.bfloat16() (a copy: the division below is in place)
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    ortho_grad.div_(ortho_grad.norm().clamp(min=eps))  # spectral norm at most 1
    for _ in range(ns_steps):
        gram_matrix = ortho_grad @ ortho_grad.T
        gram_update = torch.addmm(gram_matrix, gram_matrix, gram_matrix, beta=b, alpha=c)
        ortho_grad = torch.addmm(ortho_grad, gram_update, ortho_grad, beta=a)
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    return ortho_grad


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` with ``ns_precision`` (``"bf16"``: torch's own step, ``"fp32"``: its update with
    the Newton–Schulz iteration in float32). Every other argument is torch's, with torch's defaults."""

    def __init__(self, params: Any, *, ns_precision: str = TORCH_NS_PRECISION, **kwargs: Any) -> None:
        ns_dtype(ns_precision)
        super().__init__(params, **kwargs)
        self.defaults["ns_precision"] = ns_precision
        for group in self.param_groups:
            group.setdefault("ns_precision", ns_precision)
            ns_dtype(group["ns_precision"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a state dict saved before the option existed ran torch's bf16
            group.setdefault("ns_precision", TORCH_NS_PRECISION)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if all(g["ns_precision"] == TORCH_NS_PRECISION for g in self.param_groups):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group, ns_dtype(group["ns_precision"]))
        return loss

    def _step_group(self, group: dict[str, Any], dtype: torch.dtype) -> None:
        """torch's ``_single_tensor_muon`` for one group, with the Newton–Schulz iteration in ``dtype``."""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        bufs: list[Tensor] = []
        if self._init_group(group, params, grads, bufs):
            raise ValueError("Complex parameters are not supported")
        lr = _muon._to_scalar(group["lr"])
        weight_decay, momentum = group["weight_decay"], group["momentum"]
        for param, grad, buf in zip(params, grads, bufs, strict=True):
            if grad.ndim != 2:
                raise ValueError("Param gradient must be a 2D matrix")
            buf.lerp_(grad, 1 - momentum)
            update = grad.lerp(buf, momentum) if group["nesterov"] else buf
            update = zeropower_via_newtonschulz(update, group["ns_coefficients"], group["ns_steps"],
                                                group["eps"], dtype)
            adjusted_lr = _muon._adjust_lr(lr, group["adjust_lr_fn"], param.shape)
            param.mul_(1 - lr * weight_decay)
            param.add_(update, alpha=-adjusted_lr)
