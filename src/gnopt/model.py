"""LLaMA-style causal language model and its size presets.

The architecture follows the paper's protocol: pre-norm decoder blocks with RMSNorm, rotary position
embeddings (RoPE), multi-head causal self-attention, a SwiGLU MLP, untied input embedding and LM head,
no biases and no dropout.

The Gauss-Newton library differentiates *through* this model in forward mode (``torch.autograd.forward_ad``
dual tensors inside ``sdpa_kernel([SDPBackend.MATH])``) and calls it functionally
(``torch.func.functional_call(model, params, (idx,))``). The model is written so that both work:

- no in-place operation touches a parameter or a tensor derived from one;
- nothing derived from a parameter is cached on the Python side between calls;
- the RoPE tables are non-persistent *buffers* (not parameters): they carry no tangent, are not saved in
  checkpoints, and are rebuilt in float64 precision whenever the module changes dtype or device, so a
  ``model.double()`` gets exact float64 tables instead of up-cast float32 ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gnopt.attention import explicit_causal_attention as explicit_causal_attention  # (re-exported)
from gnopt.errors import GnoptError
from gnopt.model_tangent import llama_forward_with_tangent

AttnImpl = Literal["sdpa", "explicit"]
ATTN_IMPLS: tuple[str, ...] = ("sdpa", "explicit")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a LLaMA-style model. ``d_model`` must be divisible by ``n_heads`` with an even head size."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        """Raise :class:`GnoptError` when a field is out of range or the shapes do not fit together."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GnoptError(f"model {name} must be a positive integer, got {value!r}.")
        if self.d_model % self.n_heads != 0:
            raise GnoptError(
                f"model d_model={self.d_model} is not divisible by n_heads={self.n_heads}."
            )
        if self.head_dim % 2 != 0:
            raise GnoptError(
                f"model head size d_model/n_heads={self.head_dim} must be even for rotary embeddings."
            )
        if not self.rope_theta > 0:
            raise GnoptError(f"model rope_theta must be positive, got {self.rope_theta!r}.")
        if not self.norm_eps > 0:
            raise GnoptError(f"model norm_eps must be positive, got {self.norm_eps!r}.")

    def num_parameters(self) -> int:
        """Closed-form parameter count: 2·V·d + L·(4d² + 3·d·ff + 2d) + d."""
        d, ff, v, n = self.d_model, self.d_ff, self.vocab_size, self.n_layers
        return 2 * v * d + n * (4 * d * d + 3 * d * ff + 2 * d) + d


#: Size presets. ``tiny`` trains in seconds (tests); ``cpu-*`` fit a 2-core CPU; ``45m``/``150m`` are the
#: paper's shapes (vocab 32k, sequence length 1024).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, d_ff=64, seq_len=32),
    "cpu-small": ModelConfig(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, d_ff=384, seq_len=128),
    "cpu-medium": ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, d_ff=768, seq_len=256),
    "45m": ModelConfig(vocab_size=32000, d_model=512, n_layers=4, n_heads=8, d_ff=2048, seq_len=1024),
    "150m": ModelConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=16, d_ff=3072, seq_len=1024),
}


def _rope_tables(
    seq_len: int, head_dim: int, theta: float, device: torch.device | str | None
) -> tuple[Tensor, Tensor]:
    """cos/sin tables of shape [seq_len, head_dim], computed in float64 (cast by the caller)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    pos = torch.arange(seq_len, dtype=torch.float64, device=device)
    angles = torch.outer(pos, inv_freq)  # [T, hd/2]
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: [T, hd]
    return angles.cos(), angles.sin()


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class RotaryEmbedding(nn.Module):
    """Precomputed RoPE tables (non-persistent buffers) sized to the model's ``seq_len``.

    The tables are computed in float64 and stored in the module's dtype. ``_apply`` (used by ``.to``,
    ``.double()``, ``.float()``, ``.cuda()``...) rebuilds them from scratch after a dtype/device change so
    their precision always matches the new dtype.
    """

    cos: Tensor
    sin: Tensor

    def __init__(self, head_dim: int, seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.seq_len, self.theta = head_dim, seq_len, theta
        cos, sin = _rope_tables(seq_len, head_dim, theta, device=None)
        dtype = torch.get_default_dtype()
        self.register_buffer("cos", cos.to(dtype), persistent=False)
        self.register_buffer("sin", sin.to(dtype), persistent=False)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> RotaryEmbedding:
        super()._apply(fn, recurse)
        if self.cos.device.type != "meta" and self.cos.is_floating_point():
            cos, sin = _rope_tables(self.seq_len, self.head_dim, self.theta, device=self.cos.device)
            self.cos = cos.to(self.cos.dtype)
            self.sin = sin.to(self.sin.dtype)
        return self

    def forward(self, t: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos/sin tables for positions 0..t-1 in ``dtype``, shape [t, head_dim]."""
        return self.cos[:t].to(dtype), self.sin[:t].to(dtype)


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate ``q`` and ``k`` [B, H, T, hd] by the tables ``cos``/``sin`` [T, hd] (rotate-half layout)."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (initialised to 1), via ``F.rms_norm``."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    """Multi-head causal self-attention with RoPE; ``sdpa`` or explicit masked-softmax implementation."""

    def __init__(self, cfg: ModelConfig, attn_impl: AttnImpl) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.attn_impl = attn_impl
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, d = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        if self.attn_impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = explicit_causal_attention(q, k, v)
        return self.wo(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x)."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, attn_impl: AttnImpl) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, attn_impl)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class LLaMA(nn.Module):
    """LLaMA-style causal LM: ``forward(idx[B, T]) -> logits[B, T, V]``.

    Initialisation (:meth:`reset_parameters`): every linear weight is normal with std = 1/√fan_in (the
    paper's fan-in scaling), norm scales are 1. The embedding is a lookup, i.e. a linear map applied to a
    one-hot input whose effective fan-in is 1, so the same rule gives std = 1: token vectors have RMS 1,
    the scale that the pre-norm residual stream and RMSNorm expect (std 1/√d would make the embedding
    ~√d times smaller than the first block's update and drown the token identity).
    """

    def __init__(self, config: ModelConfig, *, attn_impl: AttnImpl = "sdpa") -> None:
        super().__init__()
        config.validate()
        if attn_impl not in ATTN_IMPLS:
            raise GnoptError(f"attn_impl must be one of {', '.join(ATTN_IMPLS)}, got {attn_impl!r}.")
        self.config = config
        self.attn_impl: AttnImpl = attn_impl
        self.rope = RotaryEmbedding(config.head_dim, config.seq_len, config.rope_theta)
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, attn_impl) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise every parameter (see the class docstring for the scheme)."""
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=1.0)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=1.0 / math.sqrt(module.in_features))
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def set_attn_impl(self, attn_impl: AttnImpl) -> None:
        """Switch every block between ``sdpa`` and ``explicit`` attention (same parameters)."""
        if attn_impl not in ATTN_IMPLS:
            raise GnoptError(f"attn_impl must be one of {', '.join(ATTN_IMPLS)}, got {attn_impl!r}.")
        self.attn_impl = attn_impl
        for block in self.blocks:
            block.attn.attn_impl = attn_impl

    def forward(self, idx: Tensor) -> Tensor:
        """Logits [B, T, V] for token ids ``idx`` [B, T] (T ≤ seq_len).

        Only the shape is checked (a vocabulary range check would cost a device sync on every call);
        out-of-range ids fail inside the embedding lookup.
        """
        self.check_input(idx)
        x = self.tok_emb(idx)
        cos, sin = self.rope(idx.shape[1], x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x))

    def check_input(self, idx: Tensor) -> None:
        """A :class:`GnoptError` unless ``idx`` is a [batch, time] tensor of integer ids, time ≤ seq_len."""
        if idx.ndim != 2:
            raise GnoptError(f"model input must have shape [batch, time], got shape {tuple(idx.shape)}.")
        if idx.shape[1] > self.config.seq_len:
            raise GnoptError(
                f"input length {idx.shape[1]} exceeds the model's seq_len={self.config.seq_len}."
            )
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise GnoptError(f"model input must hold integer token ids, got dtype {idx.dtype}.")

    def forward_with_tangent(
        self, params: Mapping[str, Tensor], idx: Tensor, tangent: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Logits for ``idx`` at the parameters ``params`` (a graph to those that require grad) and their
        tangent ``J Δ`` for ``tangent`` = Δ, in one primal pass: the fast path of
        :func:`gnopt.optim.linearize.forward_with_graph_and_tangent` (see :mod:`gnopt.model_tangent`)."""
        return llama_forward_with_tangent(self, params, idx, tangent)

    def forward_with_tangent_applies(self) -> bool:
        """Whether :meth:`forward_with_tangent` gives the tangent of the function this model computes:
        only for this exact class, built from its own submodule classes with their own ``forward``s (see
        :func:`mirrors`). Otherwise GN uses forward-mode AD of ``forward``."""
        return mirrors(self)

    def block_partition(self) -> list[list[str]]:
        """The paper's layerwise blocks as lists of parameter names.

        ``[[tok_emb.weight], [blocks.0.*], ..., [blocks.{L-1}.*, norm.weight], [lm_head.weight]]``: the
        final norm joins the last transformer block (45m: 6 blocks, 150m: 14).
        """
        names = [n for n, _ in self.named_parameters()]
        parts: list[list[str]] = [["tok_emb.weight"]]
        for i in range(len(self.blocks)):
            parts.append([n for n in names if n.startswith(f"blocks.{i}.")])
        parts[-1].append("norm.weight")
        parts.append(["lm_head.weight"])
        return parts

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


#: Each class's ``forward`` as defined here (or by torch), for :func:`mirrors`: a class
#: whose ``forward`` was replaced after import computes something the one-pass tangent does not mirror.
ORIGINAL_FORWARDS: dict[type[nn.Module], Callable[..., object]] = {
    cls: cls.forward
    for cls in (LLaMA, Block, Attention, SwiGLU, RMSNorm, RotaryEmbedding, nn.Linear, nn.Embedding)
}


def mirrors(model: nn.Module) -> bool:
    """Whether ``model`` computes exactly the function the rules of :mod:`gnopt.model_tangent`
    differentiate: gnopt's ``LLaMA`` (not a subclass) made of ``RotaryEmbedding``, bias-free
    ``nn.Linear``, a plain ``nn.Embedding``, ``Block``, ``Attention``, ``SwiGLU`` and ``RMSNorm`` (numeric
    ``eps``) in their places, every class's ``forward`` the one it was defined with and no instance
    carrying a ``forward`` of its own. A cheap walk over the modules; hooks are checked by
    :func:`gnopt.optim.linearize.has_tangent_forward`."""

    def exact(m: object, cls: type[nn.Module]) -> bool:
        return type(m) is cls and isinstance(m, nn.Module) and "forward" not in vars(m)

    def linear(m: object) -> bool:
        return exact(m, nn.Linear) and isinstance(m.weight, nn.Parameter) and m.bias is None  # type: ignore[union-attr]

    def norm(m: object) -> bool:
        eps = getattr(m, "eps", None)
        return (exact(m, RMSNorm) and isinstance(m.weight, nn.Parameter)  # type: ignore[union-attr]
                and isinstance(eps, int | float) and not isinstance(eps, bool))

    if any(cls.forward is not fwd for cls, fwd in ORIGINAL_FORWARDS.items()):
        return False
    if not (exact(model, LLaMA) and isinstance(model, LLaMA)):
        return False
    emb = model.tok_emb
    if not (exact(emb, nn.Embedding) and isinstance(emb.weight, nn.Parameter) and emb.padding_idx is None
            and emb.max_norm is None and not emb.scale_grad_by_freq and not emb.sparse):
        return False
    if not (exact(model.rope, RotaryEmbedding) and type(model.blocks) is nn.ModuleList
            and norm(model.norm) and linear(model.lm_head)):
        return False
    for block in model.blocks:
        if not (exact(block, Block) and norm(block.attn_norm) and norm(block.mlp_norm)):
            return False
        attn, mlp = block.attn, block.mlp
        if not (exact(attn, Attention) and attn.attn_impl in ATTN_IMPLS
                and all(linear(m) for m in (attn.wq, attn.wk, attn.wv, attn.wo))):
            return False
        if not (exact(mlp, SwiGLU) and all(linear(m) for m in (mlp.w1, mlp.w2, mlp.w3))):
            return False
    return True


def count_parameters(model: LLaMA) -> dict[str, int]:
    """Parameter counts by block, in model order: ``embedding``, ``blocks.0`` ... ``blocks.{L-1}``,
    ``final_norm``, ``lm_head`` and ``total`` (for ``gnopt info``)."""
    counts: dict[str, int] = {"embedding": 0}
    for i in range(len(model.blocks)):
        counts[f"blocks.{i}"] = 0
    counts["final_norm"] = 0
    counts["lm_head"] = 0
    for name, p in model.named_parameters():
        if name.startswith("tok_emb."):
            key = "embedding"
        elif name.startswith("blocks."):
            key = "blocks." + name.split(".")[1]
        elif name.startswith("norm."):
            key = "final_norm"
        elif name.startswith("lm_head."):
            key = "lm_head"
        else:  # pragma: no cover - a parameter outside the contract
            key = name
        counts[key] = counts.get(key, 0) + p.numel()
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def build_model(
    preset: str,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    *,
    attn_impl: AttnImpl = "sdpa",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> LLaMA:
    """Build a preset model, optionally overriding its vocabulary size and sequence length.

    ``device="meta"`` builds a shape-only model at no cost (parameter counts of the large presets).
    """
    if preset not in PRESETS:
        raise GnoptError(f"unknown model preset {preset!r}; valid presets: {', '.join(PRESETS)}.")
    cfg = PRESETS[preset]
    if vocab_size is not None:
        cfg = replace(cfg, vocab_size=vocab_size)
    if seq_len is not None:
        cfg = replace(cfg, seq_len=seq_len)
    with torch.device(device) if device is not None else nullcontext():
        model = LLaMA(cfg, attn_impl=attn_impl)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model

