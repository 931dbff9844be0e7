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
* one inner step of full GN (inner Muon+AdamW, inner AdamW), GN-prox-linear and layerwise GN;
* Muon's Newton–Schulz precision side by side (``bf16``, torch.optim.Muon's, and ``fp32``): the inner
  update alone (one Muon+AdamW step on the model's parameters, what GN's inner step runs once) and its share
  of GN's inner step, GN's inner step with inner Muon, the Muon baseline step and GN's outer step (library
  defaults), each at both precisions; the other Muon variants run at ``--ns-precision`` (default: what
  ``gnopt train`` uses on a CPU). The report starts with the CPU's bf16 support (``/proc/cpuinfo`` flags,
  torch's CPU capability and oneDNN's bf16 support, which ``ONEDNN_MAX_CPU_ISA`` / ``ATEN_CPU_CAPABILITY``
  restrict) and a 128×384 Gram product in both precisions.

Peak memory is measured per variant in a fresh subprocess: the growth of the peak RSS over the RSS
reached after building the model and the first micro-batch ("working memory"), and the total peak RSS.

Timings use random token ids (cost does not depend on the text). Results go to
``benchmarks/results/gn_step_cost.{json,md}``.

    python benchmarks/gn_step_cost.py --preset cpu-small --micro-batch 16 --inner-steps 8 --repeats 5

To see a CPU without native bf16 on one that has it, restrict torch's kernels (a labelled emulation: the
bf16 products fall back to slower code paths, though not necessarily to those of an AVX2-only CPU)::

    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/gn_step_cost.py ...
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
from _common import bf16_support, cpu_name, publish, status_mb

from gnopt.model import build_model
from gnopt.optim import (
    GaussNewton,
    LineSearch,
    MuonAdamW,
    SoftmaxCrossEntropy,
    TorchOptimizer,
)
from gnopt.optim.linearize import forward_with_graph, forward_with_graph_and_tangent, jvp, pullback
from gnopt.optim.ns_precision import NS_PRECISIONS
from gnopt.precision import default_muon_ns_precision
from gnopt.steppers import forward, lm_loss


def batches(vocab: int, b: int, t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randint(0, vocab, (b, t + 1), generator=g)
        yield x[:, :-1], x[:, 1:]


INNER_VARIANTS = ["gn", "gn_adamw_inner", "prox_linear", "layerwise"]
OUTER_VARIANTS = {"gn_default": "the library's defaults", "gn_paper": "the paper's protocol"}


def make_gn(model: torch.nn.Module, variant: str, n: int, ls_range: int, ns_precision: str,
            autocast_dtype: torch.dtype | None = None) -> GaussNewton:
    mode = "prox_linear" if variant == "prox_linear" else "gn"
    partition = "transformer" if variant == "layerwise" else None
    inner = (TorchOptimizer(lambda ps: torch.optim.AdamW(ps, lr=1e-3)) if variant == "gn_adamw_inner"
             else MuonAdamW(lr=0.01, adam_lr=1e-3, ns_precision=ns_precision))
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


def muon_optimizers(model: torch.nn.Module, ns_precision: str) -> list[torch.optim.Optimizer]:
    """The Muon baseline's optimizers (torch Muon on hidden matrices, AdamW on the rest), as GN's inner."""
    chain = MuonAdamW(lr=0.05, adam_lr=1e-2, ns_precision=ns_precision).build(list(model.named_parameters()),
                                                                              model)
    return chain.optimizers


def update_step(opts: list[torch.optim.Optimizer]) -> None:
    """The inner update alone: one step of Muon + AdamW (gradients already in place)."""
    for opt in opts:
        opt.step()


def gram_product_us(threads: int) -> dict[str, float]:
    """Median µs of a 128×384 Gram product X Xᵀ (one Newton–Schulz product on cpu-small) per precision."""
    out = {}
    for name, dtype_name in NS_PRECISIONS.items():
        x = torch.randn(128, 384).to(getattr(torch, dtype_name))
        for _ in range(20):
            x @ x.T
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(50):
                x @ x.T
            times.append((time.perf_counter() - t0) / 50)
        out[name] = 1e6 * statistics.median(times)
    return out


def time_all(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    n = args.inner_steps
    main_ns = args.ns_precision
    (other_ns,) = [p for p in NS_PRECISIONS if p != main_ns]
    # "<variant>@<precision>": the Muon variants timed at the other precision too (side by side).
    extra = [f"gn@{other_ns}", f"gn_default@{other_ns}"]
    names = ["adamw", "adamw_batch", "muon_batch", f"muon_batch@{other_ns}", *INNER_VARIANTS, *OUTER_VARIANTS,
             *extra]
    models = {v: build_model(args.preset, vocab_size=args.vocab) for v in names}
    seq = models["adamw"].config.seq_len
    it = batches(args.vocab, args.micro_batch, seq, 0)
    opt = torch.optim.AdamW(models["adamw"].parameters(), lr=1e-3)
    batch_opts = {"adamw_batch": [torch.optim.AdamW(models["adamw_batch"].parameters(), lr=1e-3)],
                  "muon_batch": muon_optimizers(models["muon_batch"], main_ns),
                  f"muon_batch@{other_ns}": muon_optimizers(models[f"muon_batch@{other_ns}"], other_ns)}
    gns = {v: make_gn(models[v], v.split("@")[0], n, args.ls_range, v.split("@")[1] if "@" in v else main_ns)
           for v in [*INNER_VARIANTS, *OUTER_VARIANTS, *extra]}
    # The inner update alone, on a model's parameters with fixed gradients, at each precision.
    upd_opts: dict[str, list[torch.optim.Optimizer]] = {}
    for prec in NS_PRECISIONS:
        m = build_model(args.preset, vocab_size=args.vocab)
        for p in m.parameters():
            p.grad = 1e-3 * torch.randn_like(p)
        upd_opts[prec] = muon_optimizers(m, prec)
        update_step(upd_opts[prec])
    # Warm-up: one step of each (the first inner step of a run has Δ = 0: two outer steps for GN).
    adamw_step(models["adamw"], opt, next(it))
    for v, opts in batch_opts.items():
        baseline_step(models[v], opts, [next(it) for _ in range(n)])
    inner_names = [*INNER_VARIANTS, f"gn@{other_ns}"]
    outer_names = [*OUTER_VARIANTS, f"gn_default@{other_ns}"]
    for v in gns:
        gns[v].step(it)
        if v in outer_names:
            gns[v].step(it)
    ce = SoftmaxCrossEntropy()
    samples: dict[str, list[float]] = {k: [] for k in ["adamw", "products", "products_generic", *batch_opts,
                                                         *(f"update@{p}" for p in NS_PRECISIONS)]}
    inner_t: dict[str, list[float]] = {v: [] for v in inner_names}
    outer_t: dict[str, list[float]] = {v: [] for v in outer_names}
    ls_t: dict[str, list[float]] = {v: [] for v in outer_names}
    passes: dict[str, list[float]] = {v: [] for v in outer_names}
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
            for prec in NS_PRECISIONS:
                timed(f"update@{prec}", update_step, upd_opts[prec])
        for v, opts in batch_opts.items():
            timed(v, baseline_step, models[v], opts, [next(it) for _ in range(n)])
        for v in inner_names:
            rec = gns[v].step(it)
            inner_t[v].append(rec.time_inner / n)
            if v == "layerwise":
                blocks.append([s / n for s in rec.block_seconds])
        for v in outer_names:
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

    def at(prec: str, key: str) -> str:
        return key if prec == main_ns else f"{key}@{prec}"

    by_ns = {}
    for prec in NS_PRECISIONS:
        inner_s, update_s = inner[at(prec, "gn")], med[f"update@{prec}"]
        muon_s, outer_s = med[at(prec, "muon_batch")], outer[at(prec, "gn_default")]
        by_ns[prec] = {
            "update_s": update_s, "update_ratio": update_s / unit,
            "update_share_of_inner": update_s / inner_s,
            "inner_step_s": inner_s, "inner_step_ratio": inner_s / unit,
            "muon_step_s": muon_s, "muon_vs_adamw": muon_s / med["adamw_batch"],
            "outer_default_s": outer_s, "outer_vs_muon": outer_s / muon_s,
            "outer_vs_adamw": outer_s / med["adamw_batch"],
        }
    inner = {v: s for v, s in inner.items() if v in INNER_VARIANTS}
    outer = {v: s for v, s in outer.items() if v in OUTER_VARIANTS}
    return {
        "ns_precision": main_ns,
        "by_ns_precision": by_ns,
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
        "passes_per_outer_step": {v: statistics.median(x) for v, x in passes.items() if v in OUTER_VARIANTS},
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
        gn = make_gn(model, variant, args.inner_steps, args.ls_range, args.ns_precision)
        for _ in range(2):
            gn.step(it)
    peak = status_mb("VmHWM")
    return {"base_rss_mb": base, "peak_rss_mb": peak, "working_mb": peak - base}


def memory_all(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    out = {}
    for v in ["adamw", "gn_default", "gn_paper", "gn_adamw_inner", "prox_linear", "layerwise"]:
        cmd = [sys.executable, __file__, "--memory-child", v, "--preset", args.preset, "--vocab",
               str(args.vocab), "--micro-batch", str(args.micro_batch), "--inner-steps",
               str(args.inner_steps), "--ls-range", str(args.ls_range), "--threads", str(args.threads),
               "--ns-precision", args.ns_precision]
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
    p.add_argument("--ns-precision", choices=list(NS_PRECISIONS), default=default_muon_ns_precision("cpu"),
                   help="Newton-Schulz precision of the Muon variants not timed at both (default: gnopt "
                   "train's on a CPU)")
    p.add_argument("--skip-memory", action="store_true", help="leave out the peak-memory subprocesses")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--name", default="gn_step_cost",
                   help="results name in benchmarks/results (e.g. for a run under the no-bf16 emulation)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args)))
        return
    hardware = bf16_support() | {"gram_128x384_us": gram_product_us(args.threads)}
    timing = time_all(args)
    memory = {} if args.skip_memory else memory_all(args)
    base = memory.get("adamw")
    result = {
        "config": vars(args) | {"torch": torch.__version__, "cpus": os.cpu_count(), "cpu": cpu_name()},
        "hardware": hardware,
        "timing": timing,
        "memory": memory,
        "memory_ratio_working": {v: m["working_mb"] / base["working_mb"] for v, m in memory.items()} if base
        else {},
        "memory_ratio_total": {v: m["peak_rss_mb"] / base["peak_rss_mb"] for v, m in memory.items()} if base
        else {},
    }
    publish(args.name, result, render, write=not args.no_write)


def render(r: dict[str, Any]) -> str:
    c, t, hw = r["config"], r["timing"], r["hardware"]
    n = c["inner_steps"]
    ns = t["ns_precision"]
    env = ", ".join(f"{k}={v}" for k, v in hw["env"].items())
    gram = hw["gram_128x384_us"]
    lines = [
        "# Gauss-Newton step cost vs baseline steps",
        "",
        f"`{hw['env_prefix']}python benchmarks/gn_step_cost.py --preset {c['preset']} --vocab {c['vocab']} "
        f"--micro-batch {c['micro_batch']} --inner-steps {n} --repeats {c['repeats']} "
        f"--threads {c['threads']} --ns-precision {ns}{' --skip-memory' if c.get('skip_memory') else ''}` "
        f"(torch {c['torch']}, {c['threads']} threads, vocab {c['vocab']}, {c.get('cpu', 'CPU')}; medians).",
        "",
        f"CPU bf16 support: /proc/cpuinfo {', '.join(hw['cpuinfo_flags']) or 'no avx512_bf16/amx_bf16'}; "
        f"torch's CPU capability {hw['torch_cpu_capability']}, oneDNN bf16 "
        f"{'yes' if hw['onednn_bf16'] else 'no'}{f' (restricted: {env})' if env else ''}. "
        f"A 128×384 Gram product X Xᵀ: bf16 {gram['bf16']:.0f} µs, fp32 {gram['fp32']:.0f} µs "
        f"({gram['bf16'] / gram['fp32']:.2f}×).",
        "",
        "## Muon's Newton–Schulz precision, side by side",
        "",
        "The inner update is one Muon + AdamW step on the model's parameters (GN runs it once per inner "
        "step, the Muon baseline once per step); the GN outer step uses the library's defaults and is "
        "compared with the Muon baseline step at the same precision.",
        "",
        "| Newton–Schulz in | inner update ms | × AdamW step | share of GN inner step | GN inner step "
        "(inner Muon) × AdamW step | Muon step × AdamW step (batch) | GN outer step × Muon step |",
        "|---|---|---|---|---|---|---|",
    ]
    for prec, v in t["by_ns_precision"].items():
        lines.append(
            f"| {prec}{' (torch.optim.Muon)' if prec == 'bf16' else ''} | {v['update_s'] * 1e3:.1f} | "
            f"{v['update_ratio']:.2f} | {100 * v['update_share_of_inner']:.0f}% | "
            f"{v['inner_step_ratio']:.2f} | "
            f"{v['muon_vs_adamw']:.2f} | {v['outer_vs_muon']:.2f} |"
        )
    lines += [
        "",
        f"Below, every Muon (GN's inner one and the baseline's) runs its Newton–Schulz iteration in {ns}.",
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
    if not r["memory"]:
        lines[-2:] = ["(peak memory not measured: --skip-memory)"]
    for v, m in r["memory"].items():
        lines.append(
            f"| {v} | {m['working_mb']:.0f} | {r['memory_ratio_working'][v]:.2f} | {m['peak_rss_mb']:.0f} | "
            f"{r['memory_ratio_total'][v]:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
