"""Peak memory of Gauss-Newton vs the number of inner steps N and vs the micro-batch size.

Each configuration runs in a fresh subprocess (so no allocation of an earlier one is counted) that builds
the model, draws its first micro-batch, records its RSS (``VmRSS``), runs ``--outer-steps`` GN outer steps
(N inner steps + the library's default line search on ⌈N/8⌉ fresh micro-batches) and records its peak
RSS (``VmHWM`` from ``/proc/self/status``: unlike ``ru_maxrss`` it is per process, not inherited across
fork + exec). The *working* memory is the peak minus the RSS before the first step. An AdamW step on the
same micro-batch is measured the same way, as the unit.

What should hold: GN's memory does not grow with N (the inner loop keeps one micro-batch's activations at
a time, the line search keeps scalars per α), and grows at most linearly with the micro-batch (activations
and logits are linear in it). Timings use random token ids (memory does not depend on the text).
Results go to ``benchmarks/results/gn_memory.{json,md}``.

    python benchmarks/gn_memory.py --preset cpu-small --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
from _common import publish, status_mb

from gnopt.model import build_model
from gnopt.optim import GaussNewton, LineSearch, MuonAdamW, SoftmaxCrossEntropy
from gnopt.steppers import lm_loss

NS = (1, 2, 4, 8)
MICRO_BATCHES = (8, 16, 32)


def batches(vocab: int, b: int, t: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randint(0, vocab, (b, t + 1), generator=g)
        yield x[:, :-1], x[:, 1:]


def child(variant: str, n: int, micro: int, args: argparse.Namespace) -> dict[str, float]:
    """In a fresh process: RSS before the first step, peak RSS after the steps, seconds per outer step."""
    torch.manual_seed(0)
    model = build_model(args.preset, vocab_size=args.vocab)
    it = batches(args.vocab, micro, model.config.seq_len, 0)
    first = next(it)
    base = status_mb("VmRSS")
    t0 = time.perf_counter()
    if variant == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            lm_loss(model(first[0]), first[1]).backward()
            opt.step()
        steps = 2
    else:
        gn = GaussNewton(model, SoftmaxCrossEntropy(), inner_steps=n, mode="gn",
                         partition="transformer" if variant == "gn-layerwise" else None,
                         inner=MuonAdamW(lr=0.01, adam_lr=1e-3),
                         line_search=LineSearch(ls_range=args.ls_range))
        for _ in range(args.outer_steps):
            gn.step(it)
        steps = args.outer_steps
    seconds = (time.perf_counter() - t0) / steps
    peak = status_mb("VmHWM")
    return {"base_rss_mb": base, "peak_rss_mb": peak, "working_mb": peak - base, "seconds_per_step": seconds}


def measure(variant: str, n: int, micro: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", variant, "--n", str(n), "--micro", str(micro),
           "--preset", args.preset, "--vocab", str(args.vocab), "--ls-range", str(args.ls_range),
           "--outer-steps", str(args.outer_steps), "--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    rec.update(variant=variant, n=n, micro_batch=micro)
    print(f"  {variant:>12} N={n} micro={micro}: working {rec['working_mb']:.1f} MB, peak "
          f"{rec['peak_rss_mb']:.1f} MB, {rec['seconds_per_step']:.2f} s/step", flush=True)
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--ls-range", type=int, default=5)
    p.add_argument("--outer-steps", type=int, default=2, help="GN outer steps per configuration")
    p.add_argument("--n-micro", type=int, default=16, help="micro-batch size of the N sweep")
    p.add_argument("--micro-n", type=int, default=2, help="N of the micro-batch sweep")
    p.add_argument("--variants", default="gn", help="comma-separated: gn, gn-layerwise")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--micro", type=int, default=16, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.n, args.micro, args)))
        return

    t0 = time.perf_counter()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    print(f"N sweep (micro-batch {args.n_micro}):", flush=True)
    n_sweep = [measure(v, n, args.n_micro, args) for v in variants for n in NS]
    print(f"micro-batch sweep (N = {args.micro_n}):", flush=True)
    micro_sweep = [measure(v, args.micro_n, m, args) for v in variants for m in MICRO_BATCHES]
    adamw = [measure("adamw", 1, m, args) for m in MICRO_BATCHES]
    result = {
        "command": "python benchmarks/gn_memory.py " + " ".join(sys.argv[1:]),
        "config": {k: v for k, v in vars(args).items() if k not in ("child", "n", "micro", "no_write")}
        | {"torch": torch.__version__, "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "n_sweep": n_sweep,
        "micro_batch_sweep": micro_sweep,
        "adamw": adamw,
        "seconds": time.perf_counter() - t0,
    }
    publish("gn_memory", result, render, write=not args.no_write)


def render(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [
        "# Gauss-Newton peak memory vs N and vs micro-batch",
        "",
        f"`{r['command']}` (preset {c['preset']}, vocab {c['vocab']}, torch {c['torch']}, "
        f"{c['threads']} thread(s), {c['outer_steps']} outer steps per configuration, each in a fresh "
        f"process; ls_range {c['ls_range']}; total {r['seconds']:.0f} s).",
        "",
        "*working* = peak RSS (VmHWM) − RSS before the first step; *peak* = VmHWM of the whole process "
        "(Python + torch + model ≈ the RSS before the first step).",
        "",
        f"## vs N (inner steps; the default line search on ⌈N/8⌉ more), micro-batch {c['n_micro']}",
        "",
        "| variant | N | working MB | peak RSS MB | s / outer step |",
        "|---|---|---|---|---|",
    ]
    for m in r["n_sweep"]:
        lines.append(f"| {m['variant']} | {m['n']} | {m['working_mb']:.1f} | {m['peak_rss_mb']:.1f} | "
                     f"{m['seconds_per_step']:.2f} |")
    lines += [
        "",
        f"## vs micro-batch, N = {c['micro_n']}",
        "",
        "| variant | micro-batch | working MB | working MB / sequence | × working at the smallest | "
        "× AdamW working | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    adamw = {m["micro_batch"]: m for m in r["adamw"]}
    smallest: dict[str, float] = {}
    for m in r["micro_batch_sweep"]:
        base = smallest.setdefault(m["variant"], m["working_mb"])
        a = adamw[m["micro_batch"]]["working_mb"]
        lines.append(
            f"| {m['variant']} | {m['micro_batch']} | {m['working_mb']:.1f} | "
            f"{m['working_mb'] / m['micro_batch']:.2f} | {m['working_mb'] / base:.2f} | "
            f"{m['working_mb'] / a:.2f} | {m['peak_rss_mb']:.1f} |")
    for m in r["adamw"]:
        lines.append(f"| adamw | {m['micro_batch']} | {m['working_mb']:.1f} | "
                     f"{m['working_mb'] / m['micro_batch']:.2f} | | 1.00 | {m['peak_rss_mb']:.1f} |")
    lines += ["", summarize(r), ""]
    return "\n".join(lines)


def summarize(r: dict[str, Any]) -> str:
    """One line per variant: the spread over N and the growth over the micro-batch."""
    out = []
    for v in sorted({m["variant"] for m in r["n_sweep"]}):
        ws = [m["working_mb"] for m in r["n_sweep"] if m["variant"] == v]
        mb = [(m["micro_batch"], m["working_mb"]) for m in r["micro_batch_sweep"] if m["variant"] == v]
        (b0, w0), (b1, w1) = mb[0], mb[-1]
        out.append(f"- {v}: working memory over N ∈ {{{', '.join(str(n) for n in NS)}}} spans "
                   f"{min(ws):.1f}–{max(ws):.1f} MB (max/min {max(ws) / min(ws):.2f}); micro-batch "
                   f"{b0} → {b1} (×{b1 / b0:.0f}) multiplies it by {w1 / w0:.2f}.")
    return "\n".join(out)


if __name__ == "__main__":
    main()
