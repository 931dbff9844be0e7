"""Data-parallel throughput: ``torchrun --nproc_per_node 2`` vs one process, tokens per second.

Runs the real command line (``gnopt train``; ``torchrun ... -m gnopt train`` for the 2-process runs) on the
embedded default corpus for each optimizer and each layout:

* ``1 proc x 1 thread``   — one process, ``--threads 1``;
* ``1 proc x 2 threads``  — one process, ``--threads 2`` (intra-op parallelism);
* ``2 procs x 1 thread``  — torchrun, gloo, each rank ``--threads 1`` and half of every micro-batch.

Throughput is training + line-search tokens over the summed ``step_seconds`` of ``metrics.jsonl``, the
first step left out (warm-up); evaluation and start-up are not counted. Layouts are interleaved over
``--repeats`` rounds (the machine may be shared: the load average is recorded) and the median is reported.
Results go to ``benchmarks/results/dp_throughput.{json,md}``.

    python benchmarks/dp_throughput.py --preset cpu-small --optimizers muon,gn --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import publish

LAYOUTS: dict[str, tuple[int, int]] = {  # name -> (processes, threads per process)
    "1 proc x 1 thread": (1, 1),
    "1 proc x 2 threads": (1, 2),
    "2 procs x 1 thread": (2, 1),
}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_one(optimizer: str, procs: int, threads: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    train = ["train", "--preset", args.preset, "--optimizer", optimizer, "--steps", str(args.steps),
             "--batch-tokens", str(args.batch_tokens), "--micro-batch-size", str(args.micro_batch_size),
             "--eval-every", "0", "--eval-tokens", str(args.eval_tokens), "--ckpt-every", "0", "--quiet",
             "--threads", str(threads), "--out", str(out), "--overwrite"]
    if procs == 1:
        cmd = [sys.executable, "-m", "gnopt", *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
               "--master_port", str(free_port()), "-m", "gnopt", *train]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "type" not in r][1:]  # drop evaluations and the warm-up step
    tokens = sum(r["train_tokens"] + r["ls_tokens"] for r in steps)
    seconds = sum(r["step_seconds"] for r in steps)
    return {"tokens_per_s": tokens / seconds, "step_seconds": seconds / len(steps), "wall_s": wall,
            "load_before": load0, "load_after": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--optimizers", default="muon,gn")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per run (the first is warm-up)")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args()
    # Tokenize the corpus once, outside the timed runs.
    subprocess.run([sys.executable, "-m", "gnopt", "prepare", "--preset", args.preset], check=True,
                   stdout=subprocess.DEVNULL)
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {o: {name: [] for name in LAYOUTS} for o in optimizers}
    tmp = Path(tempfile.mkdtemp(prefix="gnopt-dp-throughput-"))
    t0 = time.perf_counter()
    try:
        for rep in range(args.repeats):
            for opt in optimizers:
                for name, (procs, threads) in LAYOUTS.items():
                    rec = run_one(opt, procs, threads, args, tmp / f"{opt}-{procs}x{threads}")
                    runs[opt][name].append(rec)
                    print(f"round {rep + 1} {opt:>6} {name:>18}: {rec['tokens_per_s']:8.0f} tokens/s "
                          f"(load {rec['load_before']:.1f})", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {
        opt: {name: statistics.median(r["tokens_per_s"] for r in recs) for name, recs in layouts.items()}
        for opt, layouts in runs.items()
    }
    result = {
        "command": "python benchmarks/dp_throughput.py " + " ".join(sys.argv[1:]),
        "config": {k: v for k, v in vars(args).items() if k != "no_write"}
        | {"torch": torch.__version__, "cpus": os.cpu_count()},
        "median_tokens_per_s": summary,
        "runs": runs,
        "seconds": time.perf_counter() - t0,
    }
    publish("dp_throughput", result, render, write=not args.no_write)


def render(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [
        "# Data-parallel throughput: 2 processes vs 1 process",
        "",
        f"`{r['command']}` (preset {c['preset']}, batch {c['batch_tokens']} tokens in micro-batches of "
        f"{c['micro_batch_size']} sequences, {c['steps']} steps per run, first one dropped, median of "
        f"{c['repeats']} interleaved rounds; {c['cpus']} CPUs; torch {c['torch']}).",
        "",
        "| optimizer | layout | tokens/s (median) | × 1 proc x 1 thread | runs (tokens/s @ load average) |",
        "|---|---|---|---|---|",
    ]
    for opt, layouts in r["median_tokens_per_s"].items():
        unit = layouts["1 proc x 1 thread"]
        for name, tps in layouts.items():
            runs = ", ".join(f"{x['tokens_per_s']:.0f} @ {x['load_before']:.1f}"
                             for x in r["runs"][opt][name])
            lines.append(f"| {opt} | {name} | {tps:.0f} | {tps / unit:.2f} | {runs} |")
    lines += [
        "",
        "The load average before each run shows how busy the shared machine was (2 cores: a load above ~2 "
        "means the runs competed with other jobs).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
