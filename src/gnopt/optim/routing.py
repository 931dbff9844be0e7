"""Parameter routing by name and shape, in one place.

Muon-style optimizers (torch.optim.Muon as a baseline, and the Gauss-Newton inner optimizer of the paper)
orthogonalize the updates of *hidden* 2-D weight matrices only. Embeddings, the LM head and every
1-D parameter (norm scales, biases) go to AdamW instead. Both the baselines and the GN inner solver route
parameters through :func:`split_hidden_matrices`, so the two can never disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

#: Name fragments that mark a 2-D parameter as an input embedding or an output head.
EMBEDDING_OR_HEAD_HINTS: tuple[str, ...] = ("emb", "wte", "wpe", "lm_head", "head.", "output.", "unembed")

HiddenPredicate = Callable[[str, torch.Tensor], bool]


def embedding_param_names(model: nn.Module) -> set[str]:
    """Names of the weights of every ``nn.Embedding`` inside ``model``."""
    names: set[str] = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            names.add(f"{mod_name}.weight" if mod_name else "weight")
    return names


def default_is_hidden_matrix(model: nn.Module) -> HiddenPredicate:
    """Predicate: 2-D, not an ``nn.Embedding`` weight, and not named like an embedding or a head."""
    emb = embedding_param_names(model)

    def is_hidden(name: str, p: torch.Tensor) -> bool:
        if p.ndim != 2 or name in emb:
            return False
        lowered = name.lower()
        return not any(h in lowered for h in EMBEDDING_OR_HEAD_HINTS)

    return is_hidden


def split_hidden_matrices(
    named_params: Iterable[tuple[str, torch.Tensor]],
    is_hidden: HiddenPredicate,
) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """Split ``(name, tensor)`` pairs into (hidden 2-D matrices, everything else), keeping order."""
    hidden: list[tuple[str, torch.Tensor]] = []
    rest: list[tuple[str, torch.Tensor]] = []
    for name, p in named_params:
        (hidden if is_hidden(name, p) else rest).append((name, p))
    return hidden, rest
