"""Causal self-attention written out, ``softmax(q kᵀ/√d + causal mask) v``: the model's
``attn_impl="explicit"`` path and the one-pass tangent forward's (:mod:`gnopt.model_tangent`) use it
(a reference for tests, and forward-mode-AD safe)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def explicit_causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ/√hd + causal mask) v, written out (reference for tests; forward-AD safe)."""
    t = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
