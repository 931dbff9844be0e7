"""Cost of Gauss-Newton steps relative to one AdamW training step, measured side by side.

For one preset and one micro-batch it times, interleaved in one process (so machine noise hits every
variant alike), the median over ``--repeats`` outer steps of:

* one AdamW step (forward + backward + AdamW update on one micro-batch) — the unit;
* one full-GN inner step (primal + tangent forward, backward, inner Muon/AdamW update);
* one GN-prox-linear inner step;
* one layerwise-GN inner step (all blocks) and its per-block split;
* the line search of one outer step (N micro-batches × (ls_range forwards + one JVP for ρ)).

Peak memory is measured per variant in a fresh subprocess: the growth of the peak RSS over the RSS
reached after building the model and the first micro-batch ("working memory"), and the total peak RSS.

Timings use random token ids (cost does not depend on the text). Results go to
``benchmarks/results/gn_step_cost.{json,md}``.

    python benchmarks/gn_step_cost.py --preset cpu-small --micro-batch 32 --inner-steps 4 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from _common import publish, status_mb

from gnopt.model import build_model
from gnopt.optim import (
    GaussNewton,
    LineSearch,
    MuonAdamW,
    SoftmaxCrossEntropy,
    TorchOptimizer,
    linearized_pass,
)
from gnopt.steppers import forward, lm_loss


def batches(vocab: int, b: int, t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randint(0, vocab, (b, t + 1), generator=g)
        yield x[:, :-1], x[:, 1:]


def make_gn(model: torch.nn.Module, variant: str, n: int, ls_range: int,
            autocast_dtype: torch.dtype | None = None) -> GaussNewton:
    mode = "prox_linear" if variant == "prox_linear" else "gn"
    partition = "transformer" if variant == "layerwise" else None
    inner = (TorchOptimizer(lambda ps: torch.optim.AdamW(ps, lr=1e-3)) if variant == "gn_adamw_inner"
             else MuonAdamW(lr=0.01, adam_lr=1e-3))
    return GaussNewton(model, SoftmaxCrossEntropy(), inner_steps=n, mode=mode, partition=partition,
                       inner=inner, line_search=LineSearch(ls_range=ls_range), autocast_dtype=autocast_dtype)


def products_step(model: torch.nn.Module, batch, loss: SoftmaxCrossEntropy) -> None:
    """GN's products alone for one micro-batch: z₀, u = JΔ, Jᵀ(g + H u) (no inner optimizer update)."""
    x, y = batch
    params = {n: p.detach() for n, p in model.named_parameters()}
    delta = {n: 1e-3 * torch.ones_like(p) for n, p in params.items()}
    linearized_pass(model, params, x, tangent=delta, wrt=list(params),
                    cotangent=lambda z0, u: loss.local(z0, y).gn_cotangent(u, terms=False)[0])


def adamw_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch,
               autocast: torch.dtype | None = None) -> None:
    x, y = batch
    opt.zero_grad(set_to_none=True)
    lm_loss(forward(model, x, autocast), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def time_all(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    variants = ["gn", "gn_adamw_inner", "prox_linear", "layerwise"]
    models = {v: build_model(args.preset, vocab_size=args.vocab) for v in ["adamw", *variants]}
    seq = models["adamw"].config.seq_len
    it = batches(args.vocab, args.micro_batch, seq, 0)
    opt = torch.optim.AdamW(models["adamw"].parameters(), lr=1e-3)
    gns = {v: make_gn(models[v], v, args.inner_steps, args.ls_range) for v in variants}
    # Warm-up: one AdamW step and one outer step each (the first inner step of a run has Δ = 0).
    adamw_step(models["adamw"], opt, next(it))
    for v in variants:
        gns[v].step(it)
    adam_t: list[float] = []
    prod_t: list[float] = []
    ce = SoftmaxCrossEntropy()
    inner_t: dict[str, list[float]] = {v: [] for v in variants}
    ls_t: list[float] = []
    blocks: list[list[float]] = []
    labels = list(gns["layerwise"].partition.labels)
    for _ in range(args.repeats):
        for _ in range(args.inner_steps):
            b = next(it)
            t0 = time.perf_counter()
            adamw_step(models["adamw"], opt, b)
            adam_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            products_step(models["gn"], b, ce)
            prod_t.append(time.perf_counter() - t0)
        for v in variants:
            rec = gns[v].step(it)
            inner_t[v].append(rec.time_inner / args.inner_steps)
            if v == "gn":
                ls_t.append(rec.time_line_search)
            if v == "layerwise":
                blocks.append([s / args.inner_steps for s in rec.block_seconds])
    unit = statistics.median(adam_t)
    med = {v: statistics.median(x) for v, x in inner_t.items()}
    per_block = [statistics.median(col) for col in zip(*blocks, strict=True)]
    return {
        "adamw_step_s": unit,
        "inner_step_s": med,
        "inner_step_ratio": {v: m / unit for v, m in med.items()},
        "products_s": statistics.median(prod_t),
        "products_ratio": statistics.median(prod_t) / unit,
        "layerwise_blocks": dict(zip(labels, [s / unit for s in per_block], strict=True)),
        "n_blocks": len(labels),
        "line_search_s": statistics.median(ls_t),
        "line_search_ratio": statistics.median(ls_t) / unit,
        "adamw_samples": len(adam_t),
        "gn_samples": args.repeats,
    }


def memory_child(variant: str, args: argparse.Namespace) -> dict[str, float]:
    """Run in a subprocess: RSS before the first step and the peak after a few steps."""
    torch.manual_seed(0)
    model = build_model(args.preset, vocab_size=args.vocab)
    it = batches(args.vocab, args.micro_batch, model.config.seq_len, 0)
    b = next(it)
    base = status_mb("VmRSS")
    if variant == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(3):
            adamw_step(model, opt, b)
    else:
        gn = make_gn(model, variant, args.inner_steps, args.ls_range)
        for _ in range(2):
            gn.step(it)
    peak = status_mb("VmHWM")
    return {"base_rss_mb": base, "peak_rss_mb": peak, "working_mb": peak - base}


def memory_all(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    out = {}
    for v in ["adamw", "gn", "gn_adamw_inner", "prox_linear", "layerwise"]:
        cmd = [sys.executable, __file__, "--memory-child", v, "--preset", args.preset, "--vocab",
               str(args.vocab), "--micro-batch", str(args.micro_batch), "--inner-steps",
               str(args.inner_steps), "--ls-range", str(args.ls_range), "--threads", str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[v] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=32, help="sequences per micro-batch")
    p.add_argument("--inner-steps", type=int, default=4)
    p.add_argument("--ls-range", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5, help="outer steps timed per variant")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args)))
        return
    timing = time_all(args)
    memory = memory_all(args)
    base = memory["adamw"]
    result = {
        "config": vars(args) | {"torch": torch.__version__, "cpus": os.cpu_count()},
        "timing": timing,
        "memory": memory,
        "memory_ratio_working": {v: m["working_mb"] / base["working_mb"] for v, m in memory.items()},
        "memory_ratio_total": {v: m["peak_rss_mb"] / base["peak_rss_mb"] for v, m in memory.items()},
    }
    publish("gn_step_cost", result, render, write=not args.no_write)


def render(r: dict[str, Any]) -> str:
    c, t = r["config"], r["timing"]
    lines = [
        "# Gauss-Newton step cost vs one AdamW step",
        "",
        f"`python benchmarks/gn_step_cost.py --preset {c['preset']} --micro-batch {c['micro_batch']} "
        f"--inner-steps {c['inner_steps']} --repeats {c['repeats']} --threads {c['threads']}` "
        f"(torch {c['torch']}, {c['threads']} threads, vocab {c['vocab']}; medians).",
        "",
        f"One AdamW step (fwd+bwd+update, {c['micro_batch']} sequences): {t['adamw_step_s'] * 1e3:.1f} ms.",
        "",
        "| measured | seconds | × AdamW step | target |",
        "|---|---|---|---|",
        f"| GN products alone (z₀, JΔ, Jᵀ(g+HJΔ); no update) | {t['products_s']:.4f} | "
        f"{t['products_ratio']:.2f} | FLOP floor 5/3 |",
        f"| GN inner step (inner Muon + AdamW, the paper's) | {t['inner_step_s']['gn']:.4f} | "
        f"{t['inner_step_ratio']['gn']:.2f} | ≤ 1.8 |",
        f"| GN inner step (inner AdamW) | {t['inner_step_s']['gn_adamw_inner']:.4f} | "
        f"{t['inner_step_ratio']['gn_adamw_inner']:.2f} | ≤ 1.8 |",
        f"| prox-linear inner step | {t['inner_step_s']['prox_linear']:.4f} | "
        f"{t['inner_step_ratio']['prox_linear']:.2f} | |",
        f"| layerwise inner step ({t['n_blocks']} blocks) | {t['inner_step_s']['layerwise']:.4f} | "
        f"{t['inner_step_ratio']['layerwise']:.2f} | ≤ {t['n_blocks']} × GN = "
        f"{t['n_blocks'] * t['inner_step_ratio']['gn']:.2f} |",
        f"| line search per outer step (N={c['inner_steps']}, ls_range {c['ls_range']}, + ρ JVP) | "
        f"{t['line_search_s']:.4f} | {t['line_search_ratio']:.2f} | |",
        "",
        "Layerwise per block (× AdamW step): "
        + ", ".join(f"{k} {v:.2f}" for k, v in t["layerwise_blocks"].items()),
        "",
        "| peak memory | working MB (peak RSS − RSS before step 1) | × AdamW | total peak RSS MB | × AdamW |",
        "|---|---|---|---|---|",
    ]
    for v, m in r["memory"].items():
        lines.append(
            f"| {v} | {m['working_mb']:.0f} | {r['memory_ratio_working'][v]:.2f} | {m['peak_rss_mb']:.0f} | "
            f"{r['memory_ratio_total'][v]:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
