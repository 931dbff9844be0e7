"""Cost of Gauss-Newton steps relative to baseline training steps, measured side by side.

For one preset and one micro-batch it times, interleaved in one process (so machine noise hits every
variant alike), the median over ``--repeats`` rounds of:

* one AdamW step on one micro-batch (forward + backward + update) — the unit of the inner-step table;
* one **baseline step** at GN's batch: N micro-batches accumulated, then one AdamW or Muon(+AdamW) update —
  the unit of the outer-step table;
* one **GN outer step** (inner loop + line search) with the library's defaults (model line search on
  ⌈N/8⌉ fresh micro-batches, model-scaled warm start) and with the paper's protocol (argmin over
  ``ls_range`` step sizes on N fresh micro-batches, plain warm start), and the line search's share of it;
* GN's products alone (z₀, JΔ, Jᵀ(g+HJΔ)): the one-pass path (LLaMA's tangent forward) and the generic
  two-pass path (forward-mode AD, then a forward with a graph);
* one inner step of full GN (inner Muon+AdamW, inner AdamW), GN-prox-linear and layerwise GN.

Peak memory is measured per variant in a fresh subprocess: the growth of the peak RSS over the RSS
reached after building the model and the first micro-batch ("working memory"), and the total peak RSS.

Timings use random token ids (cost does not depend on the text). Results go to
``benchmarks/results/gn_step_cost.{json,md}``.

    python benchmarks/gn_step_cost.py --preset cpu-small --micro-batch 16 --inner-steps 8 --repeats 5
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
from _common import cpu_name, publish, status_mb

from gnopt.model import build_model
from gnopt.optim import (
    GaussNewton,
    LineSearch,
    MuonAdamW,
    SoftmaxCrossEntropy,
    TorchOptimizer,
)
from gnopt.optim.linearize import forward_with_graph, forward_with_graph_and_tangent, jvp, pullback
from gnopt.steppers import forward, lm_loss


def batches(vocab: int, b: int, t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randint(0, vocab, (b, t + 1), generator=g)
        yield x[:, :-1], x[:, 1:]


INNER_VARIANTS = ["gn", "gn_adamw_inner", "prox_linear", "layerwise"]
OUTER_VARIANTS = {"gn_default": "the library's defaults", "gn_paper": "the paper's protocol"}


def make_gn(model: torch.nn.Module, variant: str, n: int, ls_range: int,
            autocast_dtype: torch.dtype | None = None) -> GaussNewton:
    mode = "prox_linear" if variant == "prox_linear" else "gn"
    partition = "transformer" if variant == "layerwise" else None
    inner = (TorchOptimizer(lambda ps: torch.optim.AdamW(ps, lr=1e-3)) if variant == "gn_adamw_inner"
             else MuonAdamW(lr=0.01, adam_lr=1e-3))
    paper = variant != "gn_default"  # the inner-step variants keep the paper's search (its cost is separate)
    line_search = LineSearch.paper(ls_range) if paper else LineSearch.fast(ls_range=ls_range)
    return GaussNewton(model, SoftmaxCrossEntropy(), inner_steps=n, mode=mode, partition=partition,
                       inner=inner, line_search=line_search, warm_scale=not paper,
                       autocast_dtype=autocast_dtype)


def products_step(model: torch.nn.Module, batch, loss: SoftmaxCrossEntropy, *, generic: bool = False) -> None:
    """GN's products alone for one micro-batch: z₀, u = JΔ, Jᵀ(g + H u) (no inner optimizer update)."""
    x, y = batch
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)
    delta = {n: 1e-3 * torch.ones_like(p) for n, p in params.items()}
    if generic:  # forward-mode AD (dual tensors), then a second primal forward with a graph
        u = jvp(model, params, x, delta, generic=True)[1]
        z, leaves = forward_with_graph(model, params, x, names)
    else:
        z, leaves, u = forward_with_graph_and_tangent(model, params, x, names, delta)
    r = loss.local(z.detach(), y).gn_cotangent(u, terms=False)[0]
    pullback(z, leaves, names, r)


def adamw_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch,
               autocast: torch.dtype | None = None) -> None:
    x, y = batch
    opt.zero_grad(set_to_none=True)
    lm_loss(forward(model, x, autocast), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def baseline_step(model: torch.nn.Module, opts: list[torch.optim.Optimizer], micro: list) -> None:
    """One optimizer step at GN's batch: the mean gradient of N micro-batches, clip, every optimizer steps."""
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    for x, y in micro:
        (lm_loss(model(x), y) / len(micro)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for opt in opts:
        opt.step()


def muon_optimizers(model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    """The Muon baseline's optimizers (torch Muon on hidden matrices, AdamW on the rest), as GN's inner."""
    chain = MuonAdamW(lr=0.05, adam_lr=1e-2).build(list(model.named_parameters()), model)
    return chain.optimizers


def time_all(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    n = args.inner_steps
    names = ["adamw", "adamw_batch", "muon_batch", *INNER_VARIANTS, *OUTER_VARIANTS]
    models = {v: build_model(args.preset, vocab_size=args.vocab) for v in names}
    seq = models["adamw"].config.seq_len
    it = batches(args.vocab, args.micro_batch, seq, 0)
    opt = torch.optim.AdamW(models["adamw"].parameters(), lr=1e-3)
    batch_opts = {"adamw_batch": [torch.optim.AdamW(models["adamw_batch"].parameters(), lr=1e-3)],
                  "muon_batch": muon_optimizers(models["muon_batch"])}
    gns = {v: make_gn(models[v], v, n, args.ls_range) for v in [*INNER_VARIANTS, *OUTER_VARIANTS]}
    # Warm-up: one step of each (the first inner step of a run has Δ = 0: two outer steps for GN).
    adamw_step(models["adamw"], opt, next(it))
    for v, opts in batch_opts.items():
        baseline_step(models[v], opts, [next(it) for _ in range(n)])
    for v in gns:
        gns[v].step(it)
        if v in OUTER_VARIANTS:
            gns[v].step(it)
    ce = SoftmaxCrossEntropy()
    samples: dict[str, list[float]] = {k: [] for k in ["adamw", "products", "products_generic",
                                                         "adamw_batch", "muon_batch"]}
    inner_t: dict[str, list[float]] = {v: [] for v in INNER_VARIANTS}
    outer_t: dict[str, list[float]] = {v: [] for v in OUTER_VARIANTS}
    ls_t: dict[str, list[float]] = {v: [] for v in OUTER_VARIANTS}
    passes: dict[str, list[float]] = {v: [] for v in OUTER_VARIANTS}
    blocks: list[list[float]] = []
    labels = list(gns["layerwise"].partition.labels)

    def timed(key: str, fn, *a, **kw) -> None:
        t0 = time.perf_counter()
        fn(*a, **kw)
        samples[key].append(time.perf_counter() - t0)

    for _ in range(args.repeats):
        for _ in range(n):
            b = next(it)
            timed("adamw", adamw_step, models["adamw"], opt, b)
            timed("products", products_step, models["gn"], b, ce, generic=False)
            timed("products_generic", products_step, models["gn"], b, ce, generic=True)
        for v, opts in batch_opts.items():
            timed(v, baseline_step, models[v], opts, [next(it) for _ in range(n)])
        for v in INNER_VARIANTS:
            rec = gns[v].step(it)
            inner_t[v].append(rec.time_inner / n)
            if v == "layerwise":
                blocks.append([s / n for s in rec.block_seconds])
        for v in OUTER_VARIANTS:
            t0 = time.perf_counter()
            rec = gns[v].step(it)
            outer_t[v].append(time.perf_counter() - t0)
            ls_t[v].append(rec.time_line_search)
            passes[v].append(rec.passes)
    med = {k: statistics.median(x) for k, x in samples.items()}
    unit = med["adamw"]
    inner = {v: statistics.median(x) for v, x in inner_t.items()}
    per_block = [statistics.median(col) for col in zip(*blocks, strict=True)]
    outer = {v: statistics.median(x) for v, x in outer_t.items()}
    return {
        "adamw_step_s": unit,
        "inner_step_s": inner,
        "inner_step_ratio": {v: m / unit for v, m in inner.items()},
        "products_s": med["products"],
        "products_ratio": med["products"] / unit,
        "products_generic_s": med["products_generic"],
        "products_generic_ratio": med["products_generic"] / unit,
        "layerwise_blocks": dict(zip(labels, [s / unit for s in per_block], strict=True)),
        "n_blocks": len(labels),
        "baseline_step_s": {"adamw": med["adamw_batch"], "muon": med["muon_batch"]},
        "outer_step_s": outer,
        "outer_vs_adamw": {v: o / med["adamw_batch"] for v, o in outer.items()},
        "outer_vs_muon": {v: o / med["muon_batch"] for v, o in outer.items()},
        "line_search_s": {v: statistics.median(x) for v, x in ls_t.items()},
        "line_search_share": {v: statistics.median(ls / o for ls, o in zip(ls_t[v], outer_t[v], strict=True))
                              for v in OUTER_VARIANTS},
        "passes_per_outer_step": {v: statistics.median(x) for v, x in passes.items()},
        "adamw_samples": len(samples["adamw"]),
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
    for v in ["adamw", "gn_default", "gn_paper", "gn_adamw_inner", "prox_linear", "layerwise"]:
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
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per micro-batch")
    p.add_argument("--inner-steps", type=int, default=8)
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
        "config": vars(args) | {"torch": torch.__version__, "cpus": os.cpu_count(), "cpu": cpu_name()},
        "timing": timing,
        "memory": memory,
        "memory_ratio_working": {v: m["working_mb"] / base["working_mb"] for v, m in memory.items()},
        "memory_ratio_total": {v: m["peak_rss_mb"] / base["peak_rss_mb"] for v, m in memory.items()},
    }
    publish("gn_step_cost", result, render, write=not args.no_write)


def render(r: dict[str, Any]) -> str:
    c, t = r["config"], r["timing"]
    n = c["inner_steps"]
    lines = [
        "# Gauss-Newton step cost vs baseline steps",
        "",
        f"`python benchmarks/gn_step_cost.py --preset {c['preset']} --micro-batch {c['micro_batch']} "
        f"--inner-steps {n} --repeats {c['repeats']} --threads {c['threads']}` "
        f"(torch {c['torch']}, {c['threads']} threads, vocab {c['vocab']}, {c.get('cpu', 'CPU')}; medians).",
        "",
        f"## Outer step: N = {n} micro-batches of {c['micro_batch']} sequences",
        "",
        f"Baseline step at the same batch (N micro-batches accumulated, one update): AdamW "
        f"{t['baseline_step_s']['adamw']:.3f} s, Muon {t['baseline_step_s']['muon']:.3f} s.",
        "",
        "| GN outer step | seconds | × AdamW step | × Muon step | line search share | passes | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, label in OUTER_VARIANTS.items():
        target = "≤ 2.5× Muon, line search ≤ 15%" if v == "gn_default" else ""
        lines.append(
            f"| {label} (`{v}`) | {t['outer_step_s'][v]:.3f} | {t['outer_vs_adamw'][v]:.2f} | "
            f"{t['outer_vs_muon'][v]:.2f} | {100 * t['line_search_share'][v]:.1f}% | "
            f"{t['passes_per_outer_step'][v]:.1f} | {target} |"
        )
    lines += [
        "",
        f"Baseline steps take {n} forward+backward passes. `passes` counts GN's forward+backward equivalents "
        "(a forward = 1/3, a tangent or a backward = 2/3).",
        "",
        f"## Inner step: one micro-batch of {c['micro_batch']} sequences",
        "",
        f"One AdamW step (fwd+bwd+update): {t['adamw_step_s'] * 1e3:.1f} ms.",
        "",
        "| measured | seconds | × AdamW step | target |",
        "|---|---|---|---|",
        f"| GN products, one-pass (z₀ and JΔ in one primal pass, Jᵀ(g+HJΔ)) | {t['products_s']:.4f} | "
        f"{t['products_ratio']:.2f} | FLOP floor 5/3 |",
        f"| GN products, generic (forward-mode AD, then a forward with a graph) | "
        f"{t['products_generic_s']:.4f} | {t['products_generic_ratio']:.2f} | |",
        f"| GN inner step (inner Muon + AdamW, the paper's) | {t['inner_step_s']['gn']:.4f} | "
        f"{t['inner_step_ratio']['gn']:.2f} | ≤ 1.8 |",
        f"| GN inner step (inner AdamW) | {t['inner_step_s']['gn_adamw_inner']:.4f} | "
        f"{t['inner_step_ratio']['gn_adamw_inner']:.2f} | ≤ 1.8 |",
        f"| prox-linear inner step | {t['inner_step_s']['prox_linear']:.4f} | "
        f"{t['inner_step_ratio']['prox_linear']:.2f} | |",
        f"| layerwise inner step ({t['n_blocks']} blocks) | {t['inner_step_s']['layerwise']:.4f} | "
        f"{t['inner_step_ratio']['layerwise']:.2f} | ≤ {t['n_blocks']} × GN = "
        f"{t['n_blocks'] * t['inner_step_ratio']['gn']:.2f} |",
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
