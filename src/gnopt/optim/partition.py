"""Layer partitions: which parameters form one block of layerwise Gauss-Newton.

A :class:`Partition` is an ordered list of named blocks of parameter names covering every trainable
parameter exactly once. Full GN is the partition with one block. Build one with

* :meth:`Partition.full` — one block (full GN);
* :meth:`Partition.from_groups` — explicit lists of names, or regular expressions;
* :meth:`Partition.from_callable` — ``key(name) -> hashable``, blocks in first-seen order;
* :meth:`Partition.transformer` — the paper's layerwise blocks: the model's own ``block_partition()`` when
  it has one, else the embedding, each ``<prefix>.<index>.`` layer (the final norm joining the last
  layer), and the head.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from torch import nn

from gnopt.errors import GnoptError


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


@dataclass(frozen=True)
class Partition:
    """Ordered blocks of parameter names; ``labels[k]`` names ``blocks[k]``."""

    blocks: tuple[tuple[str, ...], ...]
    labels: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.blocks)

    def validate(self, model: nn.Module) -> Partition:
        """Check that the blocks cover every trainable parameter of ``model`` exactly once."""
        names = trainable_names(model)
        known = set(names)
        seen: dict[str, str] = {}
        for label, block in zip(self.labels, self.blocks, strict=True):
            if not block:
                raise GnoptError(f"partition block {label!r} is empty")
            for n in block:
                if n not in known:
                    raise GnoptError(f"partition block {label!r} names {n!r}, not a trainable parameter")
                if n in seen:
                    raise GnoptError(f"parameter {n!r} is in two partition blocks: {seen[n]!r} and {label!r}")
                seen[n] = label
        missing = [n for n in names if n not in seen]
        if missing:
            raise GnoptError(f"partition leaves {len(missing)} parameter(s) out, e.g. {missing[0]!r}")
        return self

    @classmethod
    def full(cls, model: nn.Module) -> Partition:
        return cls((tuple(trainable_names(model)),), ("all",))

    @classmethod
    def from_groups(
        cls, model: nn.Module, groups: Sequence[Sequence[str] | str], labels: Sequence[str] | None = None
    ) -> Partition:
        """Blocks from lists of names, or from regular expressions (a string; first match wins)."""
        names = trainable_names(model)
        taken: set[str] = set()
        blocks: list[tuple[str, ...]] = []
        for g in groups:
            if isinstance(g, str):
                pat = re.compile(g)
                members = tuple(n for n in names if n not in taken and pat.search(n))
            else:
                members = tuple(g)
            taken.update(members)
            blocks.append(members)
        labs = tuple(labels) if labels is not None else tuple(f"block{k}" for k in range(len(blocks)))
        return cls(tuple(blocks), labs).validate(model)

    @classmethod
    def from_callable(cls, model: nn.Module, key: Callable[[str], Hashable]) -> Partition:
        order: dict[Hashable, list[str]] = {}
        for n in trainable_names(model):
            order.setdefault(key(n), []).append(n)
        return cls(tuple(tuple(v) for v in order.values()), tuple(str(k) for k in order)).validate(model)

    @classmethod
    def transformer(cls, model: nn.Module) -> Partition:
        """The paper's blocks: embedding; each layer (final norm with the last); head (trainable parameters
        only: a block whose parameters are all frozen or tied to another block's is left out)."""
        own = getattr(model, "block_partition", None)
        if callable(own):
            # Frozen parameters (and the second name of a tied one) are not trainable: they leave their
            # block, and a block left empty is dropped (the others keep their labels).
            trainable = set(trainable_names(model))
            blocks = [tuple(b) for b in own()]
            named = [(label, tuple(n for n in b if n in trainable))
                     for label, b in zip(_transformer_labels(len(blocks)), blocks, strict=True)]
            kept = [(label, b) for label, b in named if b]
            return cls(tuple(b for _, b in kept), tuple(label for label, _ in kept)).validate(model)
        layer_re = re.compile(r"(^|\.)(blocks|layers|h|layer)\.(\d+)\.")
        pre: list[str] = []
        layers: dict[int, list[str]] = {}
        post: list[str] = []
        for n in trainable_names(model):
            m = layer_re.search(n)
            if m:
                layers.setdefault(int(m.group(3)), []).append(n)
            elif not layers:
                pre.append(n)
            else:
                post.append(n)
        if not layers:
            raise GnoptError(
                "cannot find transformer layers (parameter names like 'blocks.0.…'); pass a Partition"
            )
        head = [n for n in post if "norm" not in n.lower()]
        norms = [n for n in post if "norm" in n.lower()]
        ordered = [layers[k] for k in sorted(layers)]
        ordered[-1] = ordered[-1] + norms
        blocks = ([tuple(pre)] if pre else []) + [tuple(b) for b in ordered] + ([tuple(head)] if head else [])
        labels = (["embedding"] if pre else []) + [f"layer{k}" for k in sorted(layers)] + (
            ["head"] if head else []
        )
        return cls(tuple(blocks), tuple(labels)).validate(model)


def _transformer_labels(n_blocks: int) -> tuple[str, ...]:
    if n_blocks < 3:
        return tuple(f"block{k}" for k in range(n_blocks))
    return ("embedding",) + tuple(f"layer{k}" for k in range(n_blocks - 2)) + ("head",)
