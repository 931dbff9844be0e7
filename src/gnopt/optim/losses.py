"""Output-space losses for Gauss-Newton.

Gauss-Newton needs three things from the loss ``L(z)`` on the model outputs ``z``: its value, its gradient
``g_z`` and products with its Hessian ``H_z`` (which must be positive semi-definite for G = Jᵀ H_z J to be
the Gauss-Newton matrix). :class:`OutputLoss` is that protocol; :meth:`OutputLoss.local` returns a
:class:`LocalLoss` that evaluates all three at one point ``z₀`` while sharing work (softmax probabilities
for cross-entropy).

Shipped: :class:`SoftmaxCrossEntropy` (token mean over non-ignored targets, closed-form gradient and HVP)
and :class:`MSELoss`. :class:`AutogradLoss` turns any differentiable ``fn(z, y) -> scalar`` with a PSD
output Hessian into an :class:`OutputLoss` through autograd, so users can add losses without deriving
anything.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


class LocalLoss(ABC):
    """A loss evaluated at one output point ``z₀`` with its targets: value, gradient, H_z·v."""

    value: Tensor  # scalar

    @property
    @abstractmethod
    def grad(self) -> Tensor:
        """``g_z`` at ``z₀`` (same shape as ``z₀``)."""

    @abstractmethod
    def hvp(self, v: Tensor) -> Tensor:
        """``H_z v`` at ``z₀`` (same shape as ``z₀``)."""

    def directional(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``(g_zᵀ u, uᵀ H_z u)``: the GN model along ``u`` is ``value + a + b/2``."""
        return (self.grad * u).sum(), (u * self.hvp(u)).sum()

    def gn_cotangent(self, u: Tensor, *, terms: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(g_z + H_z u, g_zᵀ u, uᵀ H_z u)``: the inner-step cotangent and the model terms at once.

        With ``terms=False`` the two scalars are skipped (returned as ``None``). Subclasses may fuse this
        (cross-entropy does: it is the memory-bound hot spot on the logits).
        """
        hu = self.hvp(u)
        if not terms:
            return self.grad + hu, None, None
        return self.grad + hu, (self.grad * u).sum(), (u * hu).sum()


class OutputLoss(ABC):
    """A loss on model outputs. Subclasses implement :meth:`value` and :meth:`local`."""

    @abstractmethod
    def value(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Scalar loss."""

    @abstractmethod
    def local(self, outputs: Tensor, targets: Tensor) -> LocalLoss:
        """Value, gradient and HVP at ``outputs`` (which must not require grad)."""

    def value_and_grad(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Scalar loss and its gradient with respect to ``outputs``."""
        loc = self.local(outputs, targets)
        return loc.value, loc.grad

    def count(self, targets: Tensor) -> int:
        """How many elements the loss averages over (tokens for CE); used to weight micro-batches."""
        return targets.numel()


class _CELocal(LocalLoss):
    """Cross-entropy at ``z₀``: keeps ``p = softmax(z₀)`` and per-token weights ``mask / n``."""

    def __init__(self, z: Tensor, y: Tensor, ignore_index: int) -> None:
        z2 = z.reshape(-1, z.shape[-1])
        y1 = y.reshape(-1)
        mask = y1 != ignore_index
        n = mask.sum().clamp_min(1).to(z.dtype)
        logp = torch.log_softmax(z2, dim=-1)
        self._y = torch.where(mask, y1, torch.zeros_like(y1))[:, None]
        picked = logp.gather(1, self._y).squeeze(1)
        self.value = -(picked * mask).sum() / n
        self._p = logp.exp_()  # reuse the buffer: log-probabilities are not needed any more
        # Ignored tokens get weight 0: their gradient and curvature vanish.
        self._w = (mask.to(z.dtype) / n)[:, None]
        self._shape = z.shape

    def _minus_onehot_weighted(self, r: Tensor) -> Tensor:
        """``(r − onehot(y)) · w`` in place."""
        r.scatter_add_(1, self._y, torch.full_like(self._y, -1, dtype=r.dtype))
        return r.mul_(self._w)

    @property
    def grad(self) -> Tensor:
        return self._minus_onehot_weighted(self._p.clone()).reshape(self._shape)

    def hvp(self, v: Tensor) -> Tensor:
        v2 = v.reshape(self._p.shape)
        pv = torch.linalg.vecdot(self._p, v2)[:, None]
        out = self._p * v2
        out.addcmul_(self._p, pv, value=-1.0)
        return out.mul_(self._w).reshape(self._shape)

    def _model_terms(self, pu_u: Tensor, pu: Tensor, u2: Tensor) -> tuple[Tensor, Tensor]:
        w = self._w.squeeze(1)
        puu = torch.linalg.vecdot(pu_u, u2)  # Σ_j p_j u_j² per token
        g_u = (w * (pu - u2.gather(1, self._y).squeeze(1))).sum()
        u_h_u = (w * (puu - pu * pu)).sum()
        return g_u, u_h_u

    def directional(self, u: Tensor) -> tuple[Tensor, Tensor]:
        u2 = u.reshape(self._p.shape)
        pu_u = self._p * u2
        return self._model_terms(pu_u, pu_u.sum(dim=-1), u2)

    def gn_cotangent(self, u: Tensor, *, terms: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
        # r = w ⊙ (p ⊙ (1 + u − pᵀu) − onehot(y)) = p ⊙ (c + w·u) − w·onehot with c = w (1 − pᵀu):
        # four passes over the logits (two more for the model terms).
        u2 = u.reshape(self._p.shape)
        pu_u = self._p * u2
        pu = pu_u.sum(dim=-1)
        g_u, u_h_u = self._model_terms(pu_u, pu, u2) if terms else (None, None)
        del pu_u
        r = torch.addcmul(self._w * (1.0 - pu[:, None]), u2, self._w).mul_(self._p)
        r.scatter_add_(1, self._y, -self._w.expand(-1, 1).to(r.dtype))
        return r.reshape(self._shape), g_u, u_h_u


class SoftmaxCrossEntropy(OutputLoss):
    """Token-mean softmax cross-entropy over the last axis; targets equal to ``ignore_index`` are masked.

    For ``n`` counted tokens and ``p = softmax(z)``: ``g_z = (p − onehot(y)) / n`` and
    ``H_z v = (p ⊙ v − p (pᵀ v)) / n`` token by token (PSD).
    """

    def __init__(self, ignore_index: int = -100) -> None:
        self.ignore_index = ignore_index

    def value(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if not bool((targets != self.ignore_index).any()):
            # No counted token: the loss is 0 (as in local()), not F.cross_entropy's 0/0 = NaN.
            return outputs.sum() * 0.0
        return F.cross_entropy(
            outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), ignore_index=self.ignore_index
        )

    def local(self, outputs: Tensor, targets: Tensor) -> LocalLoss:
        return _CELocal(outputs, targets, self.ignore_index)

    def count(self, targets: Tensor) -> int:
        return int((targets != self.ignore_index).sum())


class _MSELocal(LocalLoss):
    def __init__(self, z: Tensor, y: Tensor) -> None:
        self._scale = 2.0 / z.numel()
        diff = z - y
        self.value = (diff * diff).mean()
        self._grad = diff * self._scale

    @property
    def grad(self) -> Tensor:
        return self._grad

    def hvp(self, v: Tensor) -> Tensor:
        return v * self._scale


class MSELoss(OutputLoss):
    """Mean squared error ``mean((z − y)²)`` (as ``torch.nn.functional.mse_loss``); ``H_z = 2I / numel``."""

    def value(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.mse_loss(outputs, targets)

    def local(self, outputs: Tensor, targets: Tensor) -> LocalLoss:
        return _MSELocal(outputs, targets)


class _AutogradLocal(LocalLoss):
    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], z: Tensor, y: Tensor) -> None:
        self._fn = fn
        self._z = z.detach()
        self._y = y
        with torch.enable_grad():
            zz = self._z.clone().requires_grad_(True)
            val = fn(zz, y)
            (g,) = torch.autograd.grad(val, zz)
        self.value = val.detach()
        self._grad = g

    @property
    def grad(self) -> Tensor:
        return self._grad

    def hvp(self, v: Tensor) -> Tensor:
        # Reverse-over-reverse (H is symmetric, so vᵀH = (Hv)ᵀ): forward-over-reverse trips over some
        # losses' backward formulas (mse_loss: "ZeroTensors are immutable").
        _, vjp_fn = torch.func.vjp(torch.func.grad(lambda zz: self._fn(zz, self._y)), self._z)
        return vjp_fn(v)[0]


class AutogradLoss(OutputLoss):
    """Any scalar loss ``fn(outputs, targets)`` with a PSD output Hessian, differentiated by autograd.

    Gradient and Hessian-vector products come from ``torch.func`` (forward-over-reverse), so ``fn`` must be
    written with functional torch ops. Slower than a closed form; convenient for new losses.
    """

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.fn = fn

    def value(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.fn(outputs, targets)

    def local(self, outputs: Tensor, targets: Tensor) -> LocalLoss:
        return _AutogradLocal(self.fn, outputs, targets)
