"""Hugging Face ``transformers`` causal LMs under :class:`~gnopt.optim.GaussNewton`.

A ``transformers`` causal LM returns a ``ModelOutput``; GaussNewton wants ``model(inputs) -> logits``.
:class:`CausalLMLogits` is that wrapper, and :func:`transformer_partition` finds the model's decoder layers
for layerwise GN (the paper's blocks: embedding, each layer with the final norm joining the last, head)::

    from transformers import AutoConfig, AutoModelForCausalLM
    from gnopt.optim import GaussNewton, SoftmaxCrossEntropy
    from gnopt.optim.hf import CausalLMLogits, transformer_partition

    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(...), attn_implementation="sdpa")
    model = CausalLMLogits(hf)
    gn = GaussNewton(model, SoftmaxCrossEntropy(), inner_steps=8, partition=transformer_partition(model))
    gn.step(iter(batches))   # (input_ids, next-token targets) micro-batches

Attention must run in a form that forward-mode AD supports: ``attn_implementation="eager"`` or ``"sdpa"``
(GaussNewton runs its tangent passes under the SDPA math backend, see :mod:`gnopt.optim.linearize`);
FlashAttention and flex attention have no forward-mode AD and are refused. Dropout makes the Jacobian
random: build the model without it (``*_dropout=0`` / ``*_pdrop=0`` in its config) or call ``.eval()``.

Nothing here imports ``transformers``: the wrapper works with any module returning ``.logits``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from gnopt.errors import GnoptError
from gnopt.optim.partition import Partition, trainable_names

#: Attention implementations whose ops all have forward-mode AD.
FORWARD_AD_ATTENTION: tuple[str, ...] = ("eager", "sdpa")


class CausalLMLogits(nn.Module):
    """``forward(input_ids) -> logits[B, T, V]`` for a ``transformers`` causal LM (no KV cache).

    The wrapped model is ``self.model``, so parameter names gain a ``model.`` prefix.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        check_attention(model)
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def check_attention(model: nn.Module) -> None:
    """A :class:`GnoptError` if the model's attention implementation has no forward-mode AD."""
    config: Any = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) if config is not None else None
    if impl is not None and impl not in FORWARD_AD_ATTENTION:
        raise GnoptError(
            f"attention implementation {impl!r} has no forward-mode AD, which Gauss-Newton needs; build the "
            f"model with attn_implementation= one of {', '.join(FORWARD_AD_ATTENTION)}"
        )


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` holding the decoder layers: the one with the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise GnoptError("cannot find the model's decoder layers (no nn.ModuleList); pass a Partition")
    return best[1], best[2]


def transformer_partition(model: nn.Module) -> Partition:
    """Layerwise blocks of a (wrapped) ``transformers`` causal LM: ``embedding``, ``layer0`` … ``layerL-1``
    (the final norm, and anything else between the last layer and the head, joins the last layer) and
    ``head`` (the output projection; absent when it is tied to the input embedding).
    """
    prefix, layers = _decoder_layers(model)
    owner: dict[int, int] = {}
    for k, layer in enumerate(layers):
        for p in layer.parameters():
            owner[id(p)] = k
    inner = getattr(model, "model", model)  # CausalLMLogits wraps the transformers model
    out_emb = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    head_ids = {id(p) for p in out_emb.parameters()} if isinstance(out_emb, nn.Module) else set()
    in_emb = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    if isinstance(in_emb, nn.Module):  # a head tied to the input embedding belongs to the embedding block
        head_ids -= {id(p) for p in in_emb.parameters()}
    params = dict(model.named_parameters())
    pre: list[str] = []
    per_layer: list[list[str]] = [[] for _ in layers]
    post: list[str] = []
    head: list[str] = []
    for n in trainable_names(model):
        pid = id(params[n])
        if pid in owner:
            per_layer[owner[pid]].append(n)
        elif pid in head_ids:
            head.append(n)
        elif not any(per_layer):
            pre.append(n)
        else:
            post.append(n)
    per_layer[-1].extend(post)
    groups = ([pre] if pre else []) + per_layer + ([head] if head else [])
    labels = (["embedding"] if pre else []) + [f"layer{k}" for k in range(len(layers))] + (
        ["head"] if head else []
    )
    if any(not g for g in groups):
        raise GnoptError(f"a block of {prefix or 'the model'} has no trainable parameter; pass a Partition")
    return Partition(tuple(tuple(g) for g in groups), tuple(labels)).validate(model)
