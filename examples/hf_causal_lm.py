"""Gauss-Newton training of a Hugging Face ``transformers`` causal LM (needs ``pip install gnopt[hf]``).

Builds a small ``LlamaForCausalLM`` (or ``GPT2LMHeadModel``) from a config, so nothing is downloaded, and
trains it with full or layerwise GN on the bytes of a text file (default: this script)::

    python examples/hf_causal_lm.py --steps 20
    python examples/hf_causal_lm.py --arch gpt2 --layerwise --precision bf16-mixed

For a pretrained model, build it with ``AutoModelForCausalLM.from_pretrained(name,
attn_implementation="sdpa")`` instead and feed it its own tokenizer's ids; the rest stays the same.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from gnopt.optim import GaussNewton, InnerSchedule, LineSearch, MuonAdamW, SoftmaxCrossEntropy
from gnopt.optim.hf import CausalLMLogits, transformer_partition


def build(arch: str, seq_len: int) -> torch.nn.Module:
    import transformers

    if arch == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=seq_len, attn_implementation="sdpa",
        )
        return transformers.LlamaForCausalLM(cfg)
    cfg = transformers.GPT2Config(
        vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=seq_len, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation="sdpa",
    )
    return transformers.GPT2LMHeadModel(cfg)


def batches(data: Tensor, seq_len: int, batch: int, gen: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """Random windows of the byte stream: (input_ids, next-token targets)."""
    while True:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
        windows = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()])
        yield windows[:, :-1], windows[:, 1:]


def main(argv: list[str] | None = None) -> list[float]:
    """Train and print one line per outer step; returns the training losses."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=("llama", "gpt2"), default="llama")
    p.add_argument("--text", type=Path, default=Path(__file__), help="training text (bytes)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--inner-steps", type=int, default=4)
    p.add_argument("--layerwise", action="store_true", help="layerwise GN (one block per decoder layer)")
    p.add_argument("--precision", choices=("fp32", "bf16-mixed"), default="fp32")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    data = torch.tensor(list(args.text.read_bytes()), dtype=torch.long)
    model = CausalLMLogits(build(args.arch, args.seq_len))  # forward(input_ids) -> logits
    gn = GaussNewton(
        model,
        SoftmaxCrossEntropy(),
        inner_steps=args.inner_steps,
        inner=MuonAdamW(lr=0.02, adam_lr=3e-3),
        partition=transformer_partition(model) if args.layerwise else None,
        line_search=LineSearch(),  # the model search; LineSearch.paper() is the paper's grid
        schedule=InnerSchedule("constant_with_inner_cosine", total_outer_steps=args.steps,
                               inner_steps=args.inner_steps),
        autocast_dtype=torch.bfloat16 if args.precision == "bf16-mixed" else None,
    )
    stream = batches(data, args.seq_len, args.batch, torch.Generator().manual_seed(1))
    losses = []
    for t in range(args.steps):
        rec = gn.step(stream)
        losses.append(rec.loss)
        print(f"step {t:3d}  loss {rec.loss:.4f}  alpha {rec.alpha}  rho {rec.rho}", flush=True)
    return losses


if __name__ == "__main__":
    main(sys.argv[1:])
