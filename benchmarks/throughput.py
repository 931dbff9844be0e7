"""Training throughput of the baselines and the cost of the forward-AD-friendly attention.

Measured side by side in one process, interleaved, medians over ``--repeats``:

* tokens/s of one full training step (forward, backward, clip, optimizer update) on ``--preset`` with
  AdamW and with Muon (torch.optim.Muon on hidden matrices + AdamW on the rest), one micro-batch per step;
* forward+backward time of the model with fused attention (``F.scaled_dot_product_attention``, default
  kernel) vs. the forms that support forward-mode AD: the SDPA math backend (what Gauss-Newton's
  linearized passes use) and explicit softmax attention.

Token ids are random (cost does not depend on the text). Results: ``benchmarks/results/throughput.{json,md}``.

    python benchmarks/throughput.py --preset cpu-small --micro-batch 16 --repeats 7 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from _common import publish
from torch.nn.attention import SDPBackend, sdpa_kernel

from gnopt.model import build_model
from gnopt.optim.routing import default_is_hidden_matrix, split_hidden_matrices
from gnopt.steppers import lm_loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    models = {k: build_model(args.preset, vocab_size=args.vocab) for k in ("adamw", "muon", "attn")}
    seq = models["adamw"].config.seq_len
    tokens = args.micro_batch * seq
    g = torch.Generator().manual_seed(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, args.vocab, (args.micro_batch, seq + 1), generator=g)
        return x[:, :-1], x[:, 1:]

    adamw = torch.optim.AdamW(models["adamw"].parameters(), lr=1e-3, betas=(0.9, 0.95))
    hidden, rest = split_hidden_matrices(models["muon"].named_parameters(),
                                         default_is_hidden_matrix(models["muon"]))
    muon = [torch.optim.Muon([q for _, q in hidden], lr=0.02, weight_decay=0.0),
            torch.optim.AdamW([q for _, q in rest], lr=3e-3, betas=(0.9, 0.95))]

    def train_step(model: torch.nn.Module, opts: list[torch.optim.Optimizer]) -> None:
        x, y = batch()
        for o in opts:
            o.zero_grad(set_to_none=True)
        lm_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for o in opts:
            o.step()

    attn_model = models["attn"]

    def fwd_bwd(impl: str) -> None:
        x, y = batch()
        attn_model.zero_grad(set_to_none=True)
        if impl == "math":
            with sdpa_kernel([SDPBackend.MATH]):
                lm_loss(attn_model(x), y).backward()
        else:
            attn_model.set_attn_impl("explicit" if impl == "explicit" else "sdpa")
            lm_loss(attn_model(x), y).backward()
            attn_model.set_attn_impl("sdpa")

    cases: dict[str, Any] = {
        "adamw_step": lambda: train_step(models["adamw"], [adamw]),
        "muon_step": lambda: train_step(models["muon"], muon),
        "fwd_bwd_fused": lambda: fwd_bwd("fused"),
        "fwd_bwd_math": lambda: fwd_bwd("math"),
        "fwd_bwd_explicit": lambda: fwd_bwd("explicit"),
    }
    for f in cases.values():  # warm-up
        f()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeats):
        for k, f in cases.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "config": vars(args) | {"torch": torch.__version__, "tokens_per_step": tokens},
        "median_seconds": med,
        "tokens_per_second": {"adamw": tokens / med["adamw_step"], "muon": tokens / med["muon_step"]},
        "attention_ratio_vs_fused": {
            "math": med["fwd_bwd_math"] / med["fwd_bwd_fused"],
            "explicit": med["fwd_bwd_explicit"] / med["fwd_bwd_fused"],
        },
    }
    publish("throughput", result, render, write=not args.no_write)


def render(r: dict[str, Any]) -> str:
    c, m = r["config"], r["median_seconds"]
    return "\n".join([
        "# Baseline throughput and attention cost",
        "",
        f"`python benchmarks/throughput.py --preset {c['preset']} --micro-batch {c['micro_batch']} "
        f"--repeats {c['repeats']} --threads {c['threads']}` (torch {c['torch']}, "
        f"{c['tokens_per_step']} tokens per step, medians).",
        "",
        "| training step | seconds | tokens/s |",
        "|---|---|---|",
        f"| AdamW | {m['adamw_step']:.3f} | {r['tokens_per_second']['adamw']:.0f} |",
        f"| Muon (torch.optim.Muon + AdamW) | {m['muon_step']:.3f} | {r['tokens_per_second']['muon']:.0f} |",
        "",
        "| forward+backward | seconds | × fused |",
        "|---|---|---|",
        f"| fused SDPA (default kernel) | {m['fwd_bwd_fused']:.3f} | 1.00 |",
        f"| SDPA math backend (forward-AD capable; GN's linearized passes) | {m['fwd_bwd_math']:.3f} | "
        f"{r['attention_ratio_vs_fused']['math']:.2f} |",
        f"| explicit softmax attention (forward-AD capable) | {m['fwd_bwd_explicit']:.3f} | "
        f"{r['attention_ratio_vs_fused']['explicit']:.2f} |",
        "",
    ])


if __name__ == "__main__":
    main()
