"""Bit-for-bit check for behaviour-preserving refactors (not a benchmark: nothing here is timed).

Record short fixed-seed runs of every optimizer and GN variant with one checkout, record them again with
another (or the same after a change), and compare: every ``metrics.jsonl`` line must hold the same keys and
the same values (losses, α, line-search losses, pass counts, ...; only wall-clock keys are skipped), and
the run fingerprints of every experiment file's runs and of a few configs must be identical (a study in
progress resumes across the change instead of re-running finished runs)::

    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/bitwise.py record /tmp/before   # on the old code
    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/bitwise.py record /tmp/after    # on the new code
    python benchmarks/bitwise.py compare /tmp/before /tmp/after                    # exit 1 on a difference

``record`` runs the checkout this script lies in (``--src`` names another ``src`` folder); every run is a
``python -m gnopt train`` subprocess on the ``tiny`` preset and a generated corpus (1 thread, a few
seconds each), plus library-level runs of :class:`gnopt.optim.GaussNewton` on a small MLP with the options
the harness does not expose (adaptive damping, a custom partition, an in-process all-reduce, a state-dict
round trip). ``--only NAME,...`` records a subset. The recordings are scratch files: keep them out of git.

Defaults that changed on purpose since earlier recordings are pinned to their old values (:data:`PINNED`,
where the checkout has the field): every run and fingerprint here is what the same command computed before,
so "identical" means the change kept those runs bit for bit. A study folder recorded before such a change
resumes with the old value (the folder's recorded config wins over the machine default).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

COMMON = ["--preset", "tiny", "--tokenizer", "bytes", "--steps", "4", "--micro-batch-size", "4",
          "--batch-tokens", "512", "--eval-every", "2", "--eval-tokens", "1024", "--ckpt-every", "0",
          "--threads", "1", "--quiet", "--seed", "0"]

#: name -> extra ``gnopt train`` flags (each run: 4 steps of 4 micro-batches of 4 × 32 tokens).
RUNS: dict[str, list[str]] = {
    "adamw": ["--optimizer", "adamw"],
    "muon": ["--optimizer", "muon"],
    "soap": ["--optimizer", "soap"],
    "shampoo": ["--optimizer", "shampoo"],
    "adamw-bf16": ["--optimizer", "adamw", "--precision", "bf16-mixed"],
    "gn": ["--optimizer", "gn"],
    "gn-grid": ["--optimizer", "gn", "--ls-kind", "grid"],
    "gn-grid-zero-inner-reset": ["--optimizer", "gn", "--ls-kind", "grid", "--ls-zero", "--ls-source",
                                 "inner", "--reset-below", "0.9", "--ls-range", "3"],
    "gn-prox-linear": ["--optimizer", "gn-prox-linear"],
    "gn-prox-linear-grid": ["--optimizer", "gn-prox-linear", "--ls-kind", "grid"],
    "gn-layerwise": ["--optimizer", "gn-layerwise"],
    "gn-layerwise-grid": ["--optimizer", "gn-layerwise", "--ls-kind", "grid"],
    "gn-cg": ["--optimizer", "gn", "--inner-optimizer", "cg", "--cg-max-iters", "5"],
    "gn-cg-grid-damped": ["--optimizer", "gn", "--inner-optimizer", "cg", "--cg-max-iters", "5",
                          "--ls-kind", "grid", "--damping", "0.1", "--prox", "0.05"],
    "gn-layerwise-cg": ["--optimizer", "gn-layerwise", "--inner-optimizer", "cg", "--cg-max-iters", "3"],
    "gn-adamw-inner": ["--optimizer", "gn", "--inner-optimizer", "adamw"],
    "gn-soap-inner": ["--optimizer", "gn", "--inner-optimizer", "soap", "--ls-kind", "grid"],
    "gn-damped-prox-ema-warm-scale": ["--optimizer", "gn", "--damping", "0.1", "--prox", "0.05",
                                      "--ema-decay", "0.9", "--warm-scale"],
    "gn-prox-linear-damped-warm-scale": ["--optimizer", "gn-prox-linear", "--damping", "0.05",
                                         "--warm-scale", "--ls-kind", "grid"],
    "gn-cold-global-cosine": ["--optimizer", "gn", "--no-warm-start", "--gn-schedule", "global_cosine",
                              "--inner-clip", "0"],
    "gn-bf16": ["--optimizer", "gn", "--precision", "bf16-mixed"],
    "gn-layerwise-bf16-grid": ["--optimizer", "gn-layerwise", "--precision", "bf16-mixed",
                               "--ls-kind", "grid"],
    "gn-cg-bf16": ["--optimizer", "gn", "--inner-optimizer", "cg", "--cg-max-iters", "5",
                   "--precision", "bf16-mixed"],
}
#: Runs stopped after step 2 and resumed from the checkpoint (the optimizer state round trip).
RESUMED = {"gn-resumed": ["--optimizer", "gn", "--ckpt-every", "1"],
           "gn-layerwise-cg-resumed": ["--optimizer", "gn-layerwise", "--inner-optimizer", "cg",
                                       "--cg-max-iters", "3", "--ckpt-every", "1"],
           "muon-resumed": ["--optimizer", "muon", "--ckpt-every", "1"]}
#: 2-process data-parallel runs (torchrun, gloo on CPU).
TORCHRUN = {"gn-dp2": ["--optimizer", "gn"], "gn-layerwise-grid-dp2": ["--optimizer", "gn-layerwise",
                                                                        "--ls-kind", "grid"]}
LIBRARY = ("lib-mlp",)

#: metrics.jsonl keys that hold wall-clock readings (never compared).
TIMING_KEYS = {"wall", "step_seconds", "time_inner", "time_line_search", "block_seconds",
               "shared_forward_seconds", "eval_seconds", "seconds"}

#: Fields whose default changed, with the value every earlier recording ran (pinned where the checkout has
#: the field; on a resolved config only where the run uses it, i.e. the field is not None).
PINNED: dict[str, str] = {"muon_ns_precision": "bf16"}  # issue 29: fp32 is the default on a CPU now

#: Configs whose fingerprint must not change (besides every run of every experiment file).
FINGERPRINT_CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "gn-grid": {"optimizer": "gn", "ls_kind": "grid", "warm_scale": False},
    "gn-layerwise-cg": {"optimizer": "gn-layerwise", "inner_optimizer": "cg", "preset": "tiny"},
    "gn-prox-bf16": {"optimizer": "gn-prox-linear", "precision": "bf16-mixed", "damping": 0.1, "prox": 0.05,
                     "ema_decay": 0.9, "ls_zero": True, "reset_below": 0.5, "ls_batches": 3},
    "adamw-steps": {"optimizer": "adamw", "steps": 50, "batch_tokens": 65536, "micro_batch_size": 8},
}


def _corpus(path: Path) -> None:
    rng = random.Random(0)
    words = "the a quick brown fox jumps over lazy dog cat sat on mat while birds sing in green trees".split()
    lines = [" ".join(rng.choice(words) for _ in range(10)) + "." for _ in range(1200)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _env(src: Path, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(src), OMP_NUM_THREADS="1", GNOPT_CACHE=str(cache))
    return env


def _run(cmd: list[str], env: dict[str, str], what: str) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fingerprints(src: Path, env: dict[str, str]) -> dict[str, str]:
    """Fingerprints of every run planned by every experiment file of the checkout (beside ``src``) and of
    :data:`FINGERPRINT_CONFIGS`."""
    code = f"""
import json, sys
from pathlib import Path
import dataclasses
from gnopt.config import config_from_mapping, fingerprint, resolve
from gnopt.study.spec import load_spec, plan_runs, plan_seed_runs, warmup_run
PINNED = json.loads({json.dumps(json.dumps(PINNED))})

def pinned(cfg):
    pins = {{k: v for k, v in PINNED.items() if getattr(cfg, k, None) is not None}}
    return dataclasses.replace(cfg, **pins)

out = {{}}
for name, values in json.loads({json.dumps(json.dumps(FINGERPRINT_CONFIGS))}).items():
    out["config:" + name] = fingerprint(pinned(resolve(config_from_mapping(values))))
for path in sorted(Path({str(src.parent / "experiments")!r}).glob("*.toml")):
    spec = load_spec(path)
    folder = Path("/nonexistent/study") / path.stem
    settings = {{m.name: m.grid[0] for m in spec.methods}}
    runs = [warmup_run(spec, folder), *plan_runs(spec, folder), *plan_seed_runs(spec, folder, settings)]
    for run in runs:
        out[path.stem + ":" + run.rel] = fingerprint(pinned(run.config))
json.dump(out, sys.stdout, indent=1, sort_keys=True)
"""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"fingerprints failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


LIBRARY_CODE = r"""
import json, sys, torch
from torch import nn
from gnopt.optim import (GaussNewton, LineSearch, MSELoss, Partition, TorchOptimizer, MuonAdamW, CG,
                         InnerSchedule)

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))

def batches(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 3, generator=g)
    while True:
        x = torch.randn(32, 6, generator=g)
        yield x, torch.sin(x @ w) + 0.1 * torch.randn(32, 3, generator=g)

def record(rec):
    d = rec.to_dict()
    for k in ("time_inner", "time_line_search", "block_seconds", "shared_forward_seconds"):
        d.pop(k)
    return d

def params(m):
    return [float(p.double().sum()) for p in m.parameters()]

out = []
blocks = Partition(blocks=(("0.weight", "0.bias"), ("2.weight", "2.bias", "4.weight", "4.bias")),
                   labels=("first", "rest"))
variants = {
    "adapt-damping-sgd-partition": dict(
        inner=TorchOptimizer(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)), partition=blocks,
        damping=0.5, adapt_damping=True, prox=0.1, warm_scale=True, ema_decay=0.5,
        all_reduce_mean=lambda t: t * 1.0),
    "muon-model-search-allreduce": dict(inner=MuonAdamW(lr=0.02, adam_lr=3e-3),
                                        line_search=LineSearch(kind="model", num_batches=2),
                                        all_reduce_mean=lambda t: t * 1.0),
    "prox-linear-grid-zero": dict(mode="prox_linear", inner=MuonAdamW(lr=0.02, adam_lr=3e-3),
                                  line_search=LineSearch(kind="grid", ls_range=4, include_zero=True,
                                                         reset_below=0.8),
                                  schedule=InnerSchedule("cosine_with_global_schedule", total_outer_steps=6,
                                                         inner_steps=4)),
    "cg-partition-adapt": dict(inner=CG(tol=1e-3, max_iters=4), partition=blocks, damping=0.3,
                               adapt_damping=True, line_search=LineSearch(kind="grid", source="inner")),
}
for name, kw in variants.items():
    m = model()
    gn = GaussNewton(m, MSELoss(), inner_steps=4, **kw)
    it = batches(1)
    for t in range(3):
        out.append({"variant": name, **record(gn.step(it))})
    m2 = model()
    gn2 = GaussNewton(m2, MSELoss(), inner_steps=4, **kw)
    gn2.load_state_dict(gn.state_dict())  # the copy continues exactly as the original
    for opt, mod in ((gn, m), (gn2, m2)):
        it = batches(2)
        for t in range(3):
            out.append({"variant": name, **record(opt.step(it)), "params": params(mod)})
        with opt.ema_weights():
            out.append({"variant": name, "ema_params": params(mod)})
for line in out:
    print(json.dumps(line))
"""


def _pinned_flags(env: dict[str, str]) -> list[str]:
    """``gnopt train`` flags that pin :data:`PINNED` (the fields the checkout has)."""
    code = "import json; from gnopt.config import FIELD_TYPES; print(json.dumps(sorted(FIELD_TYPES)))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    fields = set(json.loads(proc.stdout))
    return [arg for k, v in PINNED.items() if k in fields for arg in ("--" + k.replace("_", "-"), v)]


def record(folder: Path, src: Path, only: set[str] | None, torchrun: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    _corpus(corpus)
    env = _env(src, folder / "cache")
    data = ["--data", str(corpus), *_pinned_flags(env)]

    def wanted(name: str) -> bool:
        return only is None or name in only

    (folder / "fingerprints.json").write_text(json.dumps(_fingerprints(src, env), indent=1, sort_keys=True))
    for name, extra in RUNS.items():
        if wanted(name):
            print(f"record {name}", flush=True)
            _run([sys.executable, "-m", "gnopt", "train", *data, *COMMON, *extra, "--out",
                  str(folder / name)], env, name)
    for name, extra in RESUMED.items():
        if wanted(name):
            print(f"record {name}", flush=True)
            args = [sys.executable, "-m", "gnopt", "train", *data, *COMMON, *extra, "--out",
                    str(folder / name)]
            _run([*args, "--stop-after", "2"], env, name + " (first half)")
            _run([*args, "--resume"], env, name + " (resumed)")
    for name, extra in TORCHRUN.items():
        if wanted(name) and torchrun:
            print(f"record {name}", flush=True)
            _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                  str(_free_port()), "-m", "gnopt", "train", *data, *COMMON, *extra, "--out",
                  str(folder / name)], env, name)
    for name in LIBRARY:
        if wanted(name):
            print(f"record {name}", flush=True)
            (folder / name).mkdir(exist_ok=True)
            proc = subprocess.run([sys.executable, "-c", LIBRARY_CODE], env=env, capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            (folder / name / "metrics.jsonl").write_text(proc.stdout)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare(a: Path, b: Path) -> int:
    problems: list[str] = []
    fa, fb = (json.loads((d / "fingerprints.json").read_text()) for d in (a, b))
    for key in sorted(set(fa) | set(fb)):
        if fa.get(key) != fb.get(key):
            problems.append(f"fingerprint {key}: {fa.get(key)} -> {fb.get(key)}")
    runs_a = {p.parent.name for p in a.glob("*/metrics.jsonl")}
    runs_b = {p.parent.name for p in b.glob("*/metrics.jsonl")}
    if runs_a != runs_b:
        problems.append(f"recorded runs differ: only in A {sorted(runs_a - runs_b)}, "
                        f"only in B {sorted(runs_b - runs_a)}")
    checked = 0
    for run in sorted(runs_a & runs_b):
        la, lb = _lines(a / run / "metrics.jsonl"), _lines(b / run / "metrics.jsonl")
        if len(la) != len(lb):
            problems.append(f"{run}: {len(la)} vs {len(lb)} metrics lines")
            continue
        for i, (x, y) in enumerate(zip(la, lb, strict=True)):
            if set(x) != set(y):
                problems.append(f"{run} line {i}: keys differ: {sorted(set(x) ^ set(y))}")
            for key in sorted(set(x) & set(y) - TIMING_KEYS):
                checked += 1
                if not _same(x[key], y[key]):
                    problems.append(f"{run} line {i}: {key}: {x[key]!r} -> {y[key]!r}")
    for p in problems[:60]:
        print(p)
    n_runs = len(runs_a & runs_b)
    if problems:
        print(f"DIFFERENT: {len(problems)} differences ({n_runs} runs, {len(fa)} fingerprints)")
        return 1
    print(f"IDENTICAL: {n_runs} runs ({checked} values: losses, alphas, ... bit for bit), "
          f"{len(fa)} fingerprints")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="record the runs into FOLDER")
    rec.add_argument("folder", type=Path)
    rec.add_argument("--src", type=Path, default=ROOT / "src", help="the src folder of the checkout to run")
    rec.add_argument("--only", help="comma-separated run names")
    rec.add_argument("--no-torchrun", action="store_true", help="skip the 2-process runs")
    cmp = sub.add_parser("compare", help="compare two recordings")
    cmp.add_argument("a", type=Path)
    cmp.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    if args.command == "record":
        only = set(args.only.split(",")) if args.only else None
        record(args.folder.resolve(), args.src.resolve(), only, not args.no_torchrun)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
