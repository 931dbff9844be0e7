"""Dense float64 references for the Gauss-Newton tests (not collected by pytest).

Everything here is computed without gnopt's products or losses: Jacobians by batched reverse-mode autograd
over the whole output, output-space gradients by autograd of ``torch.nn.functional`` losses, output
Hessians in closed form (block-diagonal softmax Hessians, 2I/numel for MSE), solves by ``torch.linalg``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from gnopt.model import build_model
from gnopt.optim import MSELoss, OutputLoss, SoftmaxCrossEntropy

IGNORE = -100


# ---------------------------------------------------------------------------------------------- params
def names_of(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def params_of(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def flat(d: dict[str, Tensor], names: list[str]) -> Tensor:
    return torch.cat([d[n].reshape(-1) for n in names])


def unflat(vec: Tensor, like: dict[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    out, o = {}, 0
    for n in names:
        k = like[n].numel()
        out[n] = vec[o:o + k].view_as(like[n])
        o += k
    assert o == vec.numel()
    return out


def random_like(params: dict[str, Tensor], names: list[str], scale: float, gen: torch.Generator) -> dict:
    return {n: scale * torch.randn(params[n].shape, dtype=params[n].dtype, generator=gen) for n in names}


# ---------------------------------------------------------------------------------------------- models
def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).double()


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("tiny", vocab_size=11, seq_len=6).double()


def reference_model(model: nn.Module) -> nn.Module:
    """A copy to differentiate densely: LLaMA copies use the explicit-softmax attention (another code path
    than the fused/math SDPA kernel that gnopt's products go through)."""
    ref = copy.deepcopy(model)
    if hasattr(ref, "set_attn_impl"):
        ref.set_attn_impl("explicit")
    return ref


def dense_jacobian(model: nn.Module, params: dict[str, Tensor], x: Tensor, names: list[str]) -> Tensor:
    """J = ∂ vec(f(θ; x)) / ∂ vec(θ[names]) as a dense [numel(out), numel(θ[names])] matrix."""
    ref = reference_model(model)
    leaves = {n: params[n].detach().clone().requires_grad_(True) for n in names}
    merged = {n: leaves.get(n, params[n].detach()) for n in params}
    out = functional_call(ref, merged, (x,)).reshape(-1)
    eye = torch.eye(out.numel(), dtype=out.dtype)
    grads = torch.autograd.grad(
        out, [leaves[n] for n in names], eye, is_grads_batched=True, allow_unused=True
    )
    cols = [
        (g if g is not None else torch.zeros(out.numel(), *leaves[n].shape, dtype=out.dtype)).reshape(
            out.numel(), -1
        )
        for n, g in zip(names, grads, strict=True)
    ]
    return torch.cat(cols, dim=1)


def forward(model: nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
    with torch.no_grad():
        return functional_call(reference_model(model), params, (x,))


# ---------------------------------------------------------------------------------------------- losses
def ce_value(z: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=IGNORE)


def mse_value(z: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(z, y)


def ce_hessian(z: Tensor, y: Tensor) -> Tensor:
    """Closed-form H_z of token-mean CE: blockdiag_t( mask_t (diag(p_t) − p_t p_tᵀ) / n )."""
    z2 = z.reshape(-1, z.shape[-1])
    mask = (y.reshape(-1) != IGNORE).to(z.dtype)
    n = mask.sum()
    p = torch.softmax(z2, dim=-1)
    blocks = [m * (torch.diag(pt) - torch.outer(pt, pt)) / n for pt, m in zip(p, mask, strict=True)]
    return torch.block_diag(*blocks)


def mse_hessian(z: Tensor, y: Tensor) -> Tensor:
    return 2.0 / z.numel() * torch.eye(z.numel(), dtype=z.dtype)


def torch_grad(value_fn: Callable[[Tensor, Tensor], Tensor], z: Tensor, y: Tensor) -> Tensor:
    zz = z.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(value_fn(zz, y), zz)
    return g.reshape(-1)


# ---------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    name: str
    make_model: Callable[[int], nn.Module]
    loss: OutputLoss
    value: Callable[[Tensor, Tensor], Tensor]
    hessian: Callable[[Tensor, Tensor], Tensor]
    make_batch: Callable[[torch.Generator], tuple[Tensor, Tensor]]


def _mlp_x(gen: torch.Generator) -> Tensor:
    return torch.randn(3, 4, 4, dtype=torch.float64, generator=gen)


def _ce_targets(shape: tuple[int, ...], classes: int, gen: torch.Generator, masked: bool) -> Tensor:
    y = torch.randint(0, classes, shape, generator=gen)
    if masked:
        y.view(-1)[torch.tensor([1, 4, 5])] = IGNORE
    return y


def mlp_ce_batch(gen: torch.Generator, masked: bool = False) -> tuple[Tensor, Tensor]:
    return _mlp_x(gen), _ce_targets((3, 4), 5, gen, masked)


def mlp_mse_batch(gen: torch.Generator) -> tuple[Tensor, Tensor]:
    return _mlp_x(gen), torch.randn(3, 4, 5, dtype=torch.float64, generator=gen)


def llama_batch(gen: torch.Generator, masked: bool = True) -> tuple[Tensor, Tensor]:
    return torch.randint(0, 11, (2, 6), generator=gen), _ce_targets((2, 6), 11, gen, masked)


CASES = {
    "mlp_ce": Case("mlp_ce", tiny_mlp, SoftmaxCrossEntropy(), ce_value, ce_hessian, mlp_ce_batch),
    "mlp_ce_masked": Case(
        "mlp_ce_masked", tiny_mlp, SoftmaxCrossEntropy(), ce_value, ce_hessian,
        lambda g: mlp_ce_batch(g, masked=True),
    ),
    "mlp_mse": Case("mlp_mse", tiny_mlp, MSELoss(), mse_value, mse_hessian, mlp_mse_batch),
    "llama_ce_masked": Case(
        "llama_ce_masked", tiny_llama, SoftmaxCrossEntropy(), ce_value, ce_hessian, llama_batch
    ),
}


@dataclass
class Dense:
    """Dense GN pieces of one micro-batch at θ: z₀, J, g_z, H_z, g = Jᵀ g_z and loss L(z₀)."""

    z0: Tensor
    J: Tensor
    gz: Tensor
    H: Tensor
    loss: float

    @property
    def g(self) -> Tensor:
        return self.J.T @ self.gz

    def G(self) -> Tensor:
        return self.J.T @ self.H @ self.J

    def gn_grad(self, delta: Tensor) -> Tensor:
        """∇ of the GN quadratic at Δ: Jᵀ(g_z + H_z J Δ)."""
        return self.J.T @ (self.gz + self.H @ (self.J @ delta))

    def quad(self, delta: Tensor) -> float:
        """q(Δ) − L(z₀) = g_zᵀ JΔ + ½ (JΔ)ᵀ H_z (JΔ)."""
        u = self.J @ delta
        return float(self.gz @ u + 0.5 * u @ (self.H @ u))


def dense(case: Case, model: nn.Module, params: dict[str, Tensor], batch, names: list[str]) -> Dense:
    x, y = batch
    z0 = forward(model, params, x)
    return Dense(
        z0=z0,
        J=dense_jacobian(model, params, x, names),
        gz=torch_grad(case.value, z0, y),
        H=case.hessian(z0, y),
        loss=float(case.value(z0, y)),
    )


def prox_grad(case: Case, d: Dense, y: Tensor, delta: Tensor) -> Tensor:
    """∇_Δ L(z₀ + JΔ) by autograd through the dense linearized model."""
    dd = delta.detach().clone().requires_grad_(True)
    z = d.z0 + (d.J @ dd).view_as(d.z0)
    (gr,) = torch.autograd.grad(case.value(z, y), dd)
    return gr


def prox_value(case: Case, d: Dense, y: Tensor, delta: Tensor) -> float:
    with torch.no_grad():
        return float(case.value(d.z0 + (d.J @ delta).view_as(d.z0), y))


def loss_at(case: Case, model: nn.Module, params: dict[str, Tensor], batches) -> float:
    """Mean over micro-batches of the true loss at ``params`` (reference forward)."""
    return sum(float(case.value(forward(model, params, x), y)) for x, y in batches) / len(batches)


def jacobi_sgd(d: Dense, delta: Tensor, sizes: list[int], eta: float, steps: int) -> Tensor:
    """``steps`` SGD steps from ``delta`` on the block-diagonal (Jacobi) GN model of ``d``: block b (the next
    ``sizes[b]`` entries of the flat vector) steps on J_bᵀ(g_z + H_z J_b Δ_b), the other blocks frozen."""
    for _ in range(steps):
        new, o = delta.clone(), 0
        for size in sizes:
            jb = d.J[:, o:o + size]
            new[o:o + size] -= eta * jb.T @ (d.gz + d.H @ (jb @ delta[o:o + size]))
            o += size
        delta = new
    return delta
