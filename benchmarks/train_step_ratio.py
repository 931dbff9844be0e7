"""GN's step cost where a user sees it: ``gnopt train``'s median ``step_seconds``, GN over Muon.

Runs, one after the other (never at once), the same ``gnopt train`` command with ``--optimizer gn``, with the
paper's line search (``--ls-kind grid``) and with ``--optimizer muon``, defaults otherwise (the embedded
default corpus, its BPE tokenizer), and reports the median ``step_seconds`` of each (the first step, which
builds optimizer state and warms caches, is left out) and the ratios. Results go to
``benchmarks/results/train_step_ratio.{json,md}``.

    python benchmarks/train_step_ratio.py --preset cpu-small --batch-tokens 16384 --micro-batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import cpu_name, publish

SETTINGS = {"gn": ["--optimizer", "gn"], "gn_paper_ls": ["--optimizer", "gn", "--ls-kind", "grid"],
            "muon": ["--optimizer", "muon"]}


def run(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    out = tmp / name
    cmd = [sys.executable, "-m", "gnopt", "train", "--preset", args.preset, "--batch-tokens",
           str(args.batch_tokens), "--micro-batch-size", str(args.micro_batch_size),
           "--steps", str(args.steps),
           "--eval-every", "0", "--eval-tokens", "2048", "--threads", str(args.threads), "--quiet",
           "--ckpt-every", "0", "--out", str(out), *SETTINGS[name]]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    secs = [r["step_seconds"] for r in rows if "type" not in r][1:]
    return {"median_step_seconds": statistics.median(secs), "steps_timed": len(secs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--batch-tokens", type=int, default=16384)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = {name: run(name, args, Path(tmp)) for name in SETTINGS}
    muon = res["muon"]["median_step_seconds"]
    result = {
        "config": vars(args) | {"torch": torch.__version__, "cpus": os.cpu_count(), "cpu": cpu_name()},
        "results": res,
        "ratio_vs_muon": {k: v["median_step_seconds"] / muon for k, v in res.items()},
    }
    publish("train_step_ratio", result, render, write=not args.no_write)


def render(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [
        "# `gnopt train` step time: GN over Muon",
        "",
        f"`python benchmarks/train_step_ratio.py --preset {c['preset']} --batch-tokens {c['batch_tokens']} "
        f"--micro-batch-size {c['micro_batch_size']} --steps {c['steps']} --threads {c['threads']}` "
        f"(torch {c['torch']}, {c['cpu']}). Each is `gnopt train --preset {c['preset']} --batch-tokens "
        f"{c['batch_tokens']} --micro-batch-size {c['micro_batch_size']}` on the embedded default corpus, "
        "defaults otherwise, run one after the other; median `step_seconds` over the steps after the first.",
        "",
        "| run | extra flags | median step seconds | × Muon | target |",
        "|---|---|---|---|---|",
    ]
    for name, flags in SETTINGS.items():
        v = r["results"][name]
        target = "≤ 2.5" if name == "gn" else ""
        lines.append(f"| {name} | `{' '.join(flags)}` | {v['median_step_seconds']:.3f} | "
                     f"{r['ratio_vs_muon'][name]:.2f} | {target} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
