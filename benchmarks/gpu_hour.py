"""The first minutes on a GPU: one command that turns them into evidence at the paper's 45M scale.

    python benchmarks/gpu_hour.py prepare        # here, once (dev box): the token cache + a pure-Python dep
    python benchmarks/gpu_hour.py run            # on one H100/H200, no network: parts 1-3 below, <= ~8 min
    python benchmarks/gpu_hour.py run --cpu --out DIR   # CPU mode: the same code, tiny preset, seconds

On the device tool: ``run`` with ``carry = [".cache/gpu-hour"]`` and the command
``python3 benchmarks/gpu_hour.py run --archive $OUT/gpu-results.tar.gz`` (only 8 files come back from
``$OUT``: the archive holds the whole results folder and is rewritten after every part).

``run`` does, in order, writing what it has to ``docs/results/gpu/`` (``--out``) after each part, with
``summary.json`` / ``README.md`` saying which part ran, its exit status and wall time:

0. ``device.json``: GPU name, capability and memory, driver, torch, CUDA, cuDNN, Python.
1. ``tests/test_cuda.py`` (``test_cuda.txt``): GN / prox-linear / layerwise steps against the CPU path,
   bf16-mixed GN and AdamW steps, the one-pass tangent against forward-mode AD, a Hugging Face LLaMA's GN
   step, every optimizer through ``gnopt train``. Everything skips without CUDA (so the CPU mode runs it
   and sees it skip).
2. ``benchmarks/gn_step_cost_cuda.py`` at the ``45m`` preset (vocab 32000, 8 x 1024-token micro-batches,
   N = 4): AdamW, Muon, GN (library defaults) and layerwise GN, fp32 and bf16-mixed, ms per step and
   training tokens/s (``gn_step_cost_cuda{,_bf16}.{json,md}``).
3. ``comparison/``: ``gnopt study`` of the experiment :func:`experiment` writes: 45M at **1M tokens per
   step** (64 micro-batches of 16 x 1024; GN: N = 64 inner steps), a short shared AdamW warm start, Muon at
   two learning rates (0.02 and 0.04, adam_lr 1e-3: the ``cpu-lm-batch`` study's best at 1M and its
   neighbour) and GN at the library defaults (lr 0.01 / adam_lr 1e-3, model line search), 8 steps per run,
   evaluated every step, target "auto" = the lowest validation loss a Muon run has at 3/4 of its budget
   (step 6; the rule of the CPU studies), GN stopped at the target. Steps, passes and wall time to the
   target in whole steps (the first evaluation at or below it): ``comparison/comparison.md`` and the
   study's own ``report.md``, ``runs.csv``, ``study.json``, plots.

Data (part 3). The GPU machine has no network and ``../shared`` does not travel, so ``prepare`` tokenizes
gutenberg-fiction (``../shared/data/gutenberg-fiction``: 115 public-domain novels, 38.5 MB train text, 6
held-out books for validation) once, here, with a 32,000-token byte-level BPE trained on its training text
(the ``45m`` preset's vocabulary; 15 s on the 2-core dev box), and moves the cache entry to
``.cache/gpu-hour/gutenberg-fiction-bpe32000/`` (9,448,517 training + 756,559 validation tokens, 21 MB:
uint16 shards, the tokenizer, meta.json). ``.cache/`` is git-ignored: the entry is data and is never
committed; the device tool carries it. A cache entry is itself a data spec (``gnopt.data.prepare``), so
the runs load it without the corpus. ``prepare`` also copies the installed ``pytorch_optimizer`` (pure
Python; the image on the GPU machine lacks it, and part 1 trains SOAP and Shampoo) to
``.cache/gpu-hour/site/``, which ``run`` puts on ``PYTHONPATH``.

Sizing, from the one GPU figure the project has (``benchmarks/results/gn_step_cost_cuda.md``, an H100,
torch 2.11, float32: an AdamW step of 8 x 1024 tokens at 45M in 48.0 ms = **170K tokens/s**; GN products
2.35x an AdamW micro-batch step); bf16-mixed is not measured yet and is assumed no slower:

* part 1: ~35 small tests on the tiny model plus ``gnopt train`` of every optimizer: ~1-2 min (cap 150 s);
* part 2: per precision ~8 timed AdamW/Muon steps (0.05 s each) and ~8 GN outer steps (~0.6 s, layerwise
  ~2.5 s) plus model builds: ~30 s, ~1 min for both (cap 150 s);
* part 3: warm start 48 steps x 64K = 3.1M tokens = 18 s; Muon 2 runs x 8 steps x 1M = 16.8M tokens =
  99 s; GN at 1M: 64 inner steps x 2.5 AdamW micro-batch steps of 16 sequences (0.096 s) + 8 line-search
  micro-batches ~= 16.5 s per outer step, 2-4 steps to the target expected (the CPU studies: 1.2-2.8 at
  4.8-19x Muon's critical batch), at most 8 (132 s); 9 evaluations x 128K tokens per run (~1 s per run)
  and ~5 s start-up per run (4 runs): **~3.5 min expected, ~5 min at most** (cap 330 s).
* in all ~6 min expected, 10.5 min if every part ran to its cap (then rerun: part 3 skips finished runs).
  Training data: 8.4M of the 9.45M training tokens per 1M-token run, so no run to the target repeats a
  training window; the warm start's 3.1M tokens are drawn with another seed (as in the CPU studies).

The CPU mode (``--cpu``): the same three parts with the ``tiny`` preset on the embedded default corpus's
bytes (a cache entry built in ``--out``), part 2 on the CPU (``--device cpu``), part 3 at 2K tokens per
step: seconds. ``tests/test_gpu_hour.py`` runs it, so the script cannot rot. Its numbers say nothing about a
GPU.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "gpu-hour"
ENTRY = CACHE / "gutenberg-fiction-bpe32000"
SITE = CACHE / "site"
CORPUS = ROOT.parent / "shared" / "data" / "gutenberg-fiction"
RESULTS = ROOT / "docs" / "results" / "gpu"
#: Wall-clock caps of the parts in seconds (GPU mode; the header gives the sizing).
CAPS = {"tests": 150, "step_cost_fp32": 75, "step_cost_bf16": 75, "comparison": 330}
CPU_CAPS = {"tests": 120, "step_cost_fp32": 60, "step_cost_bf16": 60, "comparison": 240}
#: What ``--skip`` takes.
PARTS = ("tests", "step_cost", "comparison")


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = [str(ROOT / "src")] + ([str(SITE)] if SITE.is_dir() else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def prepare(args: argparse.Namespace) -> int:
    """Tokenize gutenberg-fiction into ``.cache/gpu-hour`` and copy ``pytorch_optimizer`` beside it."""
    corpus = Path(args.corpus)
    if not (corpus / "train.txt").is_file():
        print(f"gpu_hour: error: no train.txt in {corpus} (the shared gutenberg-fiction corpus)",
              file=sys.stderr)
        return 2
    build = CACHE / "build"
    rc = subprocess.call([sys.executable, "-m", "gnopt", "prepare", "--data", str(corpus), "--preset", "45m",
                          "--cache-dir", str(build)], env=_env())
    if rc:
        return rc
    (entry,) = [p for p in (build / "data").iterdir() if p.is_dir() and not p.name.startswith(".")]
    if ENTRY.exists():
        shutil.rmtree(ENTRY)
    shutil.move(str(entry), ENTRY)
    shutil.rmtree(build)
    spec = importlib.util.find_spec("pytorch_optimizer")
    if spec is None or spec.origin is None:
        print("gpu_hour: error: pytorch_optimizer is not installed here", file=sys.stderr)
        return 2
    src = Path(spec.origin).parent
    if SITE.exists():
        shutil.rmtree(SITE)
    shutil.copytree(src, SITE / src.name, ignore=shutil.ignore_patterns("__pycache__"))
    size = sum(f.stat().st_size for f in CACHE.rglob("*") if f.is_file())
    print(f"gpu_hour: prepared {ENTRY.relative_to(ROOT)} and {SITE.relative_to(ROOT)} "
          f"({size / 2**20:.1f} MiB in .cache/gpu-hour: carry it)")
    return 0


# ------------------------------------------------------------------------------------------------------
# the experiment of part 3
# ------------------------------------------------------------------------------------------------------


def experiment(data: Path, cpu: bool) -> str:
    """The study of part 3 as TOML (GPU: 45M at 1M tokens per step; CPU: tiny at 2K)."""
    if cpu:
        size = dict(batch=2048, preset="tiny", tokenizer="bytes", vocab="", micro=8, eval_tokens=2048,
                    steps=4, warm_batch=512, warm_steps=4, warm_warmup=1, device="cpu", precision="fp32")
    else:
        size = dict(batch=1048576, preset="45m", tokenizer="bpe", vocab="vocab_size = 32000\n", micro=16,
                    eval_tokens=131072, steps=8, warm_batch=65536, warm_steps=48, warm_warmup=5,
                    device="cuda", precision="bf16-mixed")
    return f'''# written by benchmarks/gpu_hour.py (part 3); see its header for the sizing
[experiment]
name = "gpu-hour-{size["preset"]}"
description = """{size["preset"]} at {size["batch"]} tokens per step: a short shared AdamW warm start, \
Muon at two learning rates, GN at the library defaults, target from Muon at 3/4 of its budget, GN stopped at \
the target."""
batch_tokens = [{size["batch"]}]
steps = {{ {size["batch"]} = {size["steps"]} }}
target_loss = "auto"
target_fraction = 0.75
evals_per_run = {size["steps"]}
stop_at_target = true

[base]
data = {json.dumps(str(data))}
preset = "{size["preset"]}"
tokenizer = "{size["tokenizer"]}"
{size["vocab"]}micro_batch_size = {size["micro"]}
eval_tokens = {size["eval_tokens"]}
seed = 0
warmup_steps = 1
ckpt_every = 0
device = "{size["device"]}"
precision = "{size["precision"]}"
gn_schedule = "cosine_with_global_schedule"

[warmup]
optimizer = "adamw"
lr = 3e-3
batch_tokens = {size["warm_batch"]}
steps = {size["warm_steps"]}
warmup_steps = {size["warm_warmup"]}
schedule = "constant"
seed = 100

[methods.muon]
lr = [0.02, 0.04]
adam_lr = 1e-3

[methods.gn]
lr = [0.01]
adam_lr = 1e-3
'''


def _num(x: str) -> float | None:
    return float(x) if x not in ("", "None") else None


def comparison_table(runs_csv: Path) -> str:
    """Steps (whole), passes, tokens and wall time to the target of every run, and GN over the best Muon."""
    rows = list(csv.DictReader(runs_csv.open()))
    rows = [r for r in rows if r["method"] != "warmup"]
    target = next((r["target_loss"] for r in rows if r["target_loss"]), "–")
    lines = [f"Target validation loss {target} (the lowest a Muon run has at 3/4 of its budget). Steps to "
             "target: the first evaluated step at or below it (every step is evaluated: whole steps).", "",
             "| method | lr | steps run | steps to target | passes to target | tokens to target | "
             "wall to target (s) | final val loss |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lr = r["lr"] + (f" / {r['adam_lr']}" if r["adam_lr"] else "")
        s = r["steps_to_target"] or "–"
        passes = _num(r["passes_to_target"])
        wall = _num(r["wall_to_target"])
        tokens = _num(r["tokens_to_target"])
        lines.append(f"| {r['method']} | {lr} | {r['steps_done']} | {s} | "
                     f"{f'{passes:,.0f}' if passes is not None else '–'} | "
                     f"{f'{tokens:,.0f}' if tokens is not None else '–'} | "
                     f"{f'{wall:.1f}' if wall is not None else '–'} | {float(r['final_val_loss']):.4f} |")
    reached = [r for r in rows if r["steps_to_target"]]
    muon = [r for r in reached if r["method"] == "muon"]
    gn = [r for r in reached if r["method"] == "gn"]
    if muon and gn:
        m = min(muon, key=lambda r: (int(r["steps_to_target"]), float(r["wall_to_target"])))
        g = gn[0]
        keys = ("steps_to_target", "passes_to_target", "wall_to_target")
        ratio = {k: float(m[k]) / float(g[k]) for k in keys}
        lines += ["", f"GN over the best Muon (lr {m['lr']}): {ratio['steps_to_target']:.2f}x fewer steps, "
                  f"{ratio['passes_to_target']:.2f}x fewer passes, {ratio['wall_to_target']:.2f}x less wall "
                  "time to the target (above 1: GN needs less)."]
    elif not gn:
        lines += ["", "GN did not reach the target."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------
# run
# ------------------------------------------------------------------------------------------------------


def device_info(cpu: bool) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "cudnn": None, "device": "cpu", "mode": "cpu" if cpu
                            else "gpu", "platform": platform.platform()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"device": torch.cuda.get_device_name(0), "capability": f"{props.major}.{props.minor}",
                 "memory_gib": round(props.total_memory / 2**30, 1),
                 "multiprocessors": props.multi_processor_count,
                 "cudnn": torch.backends.cudnn.version(), "bf16": torch.cuda.is_bf16_supported()}
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from _common import cpu_name

        info["device"] = f"CPU ({cpu_name()})"
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


class Runner:
    """Runs the parts one after another, each as a subprocess under its cap, and records each at once."""

    def __init__(self, out: Path, archive: Path | None, cpu: bool) -> None:
        self.out, self.archive, self.cpu = out, archive, cpu
        self.caps = CPU_CAPS if cpu else CAPS
        self.summary: dict[str, Any] = {"mode": "cpu" if cpu else "gpu", "parts": {}}

    def part(self, name: str, cmd: list[str], log: str) -> int:
        t0 = time.perf_counter()
        print(f"gpu_hour: part {name}: {' '.join(cmd)}", flush=True)
        with (self.out / log).open("w") as f:
            try:
                rc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                                    timeout=self.caps[name]).returncode
            except subprocess.TimeoutExpired:
                rc = 124
                f.write(f"\ngpu_hour: stopped at the part's cap of {self.caps[name]} s\n")
        wall = time.perf_counter() - t0
        self.summary["parts"][name] = {"rc": rc, "wall_seconds": round(wall, 1), "log": log,
                                       "cap_seconds": self.caps[name]}
        print(f"gpu_hour: part {name}: exit {rc} after {wall:.0f} s (log: {self.out / log})", flush=True)
        return rc

    def record(self) -> None:
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        dev = self.summary.get("device", {})
        lines = ["# First GPU session: results", "",
                 f"Written by `python benchmarks/gpu_hour.py run{' --cpu' if self.cpu else ''}` "
                 f"({'CPU mode: says nothing about a GPU' if self.cpu else 'GPU mode'}). Device: "
                 f"{dev.get('device')}, torch {dev.get('torch')}, CUDA {dev.get('cuda')}, driver "
                 f"{dev.get('driver', '–')}, git {dev.get('git_commit')}.", "",
                 "| part | exit | wall (s) | cap (s) | output |", "|---|---|---|---|---|"]
        for name, p in self.summary["parts"].items():
            lines.append(f"| {name} | {p['rc']} | {p['wall_seconds']} | {p['cap_seconds']} | `{p['log']}` |")
        (self.out / "README.md").write_text("\n".join(lines) + "\n")
        if self.archive is not None:
            tmp = self.archive.with_name(self.archive.name + ".partial")
            with tarfile.open(tmp, "w:gz") as tar:
                tar.add(self.out, arcname=self.out.name)
            tmp.replace(self.archive)


def run(args: argparse.Namespace) -> int:
    cpu = args.cpu
    out = Path(args.out) if args.out else (None if cpu else RESULTS)
    if out is None:
        print("gpu_hour: error: --cpu needs --out DIR (its results are no GPU results)", file=sys.stderr)
        return 2
    out = out.resolve()
    if not cpu:
        import torch

        if not torch.cuda.is_available():
            print("gpu_hour: error: no CUDA device (use --cpu for the CPU mode)", file=sys.stderr)
            return 2
        if not Path(args.data).is_dir():
            print(f"gpu_hour: error: no prepared token cache at {args.data}: run `python "
                  "benchmarks/gpu_hour.py prepare` on a machine with the corpus and carry .cache/gpu-hour",
                  file=sys.stderr)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    r = Runner(out, Path(args.archive).resolve() if args.archive else None, cpu)
    r.summary["device"] = device_info(cpu)
    (out / "device.json").write_text(json.dumps(r.summary["device"], indent=2) + "\n")
    r.record()
    py = sys.executable
    skip = set(args.skip or [])

    if "tests" not in skip:
        r.part("tests", [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_cuda.py"],
               "test_cuda.txt")
        r.record()

    if "step_cost" not in skip:
        import torch

        from gnopt.precision import bf16_supported

        dev = torch.device("cpu" if cpu else "cuda")
        size = ("--preset tiny --vocab 256 --micro-batch 4 --inner-steps 2 --repeats 1 --device cpu" if cpu
                else "--preset 45m --vocab 32000 --micro-batch 8 --inner-steps 4 --repeats 5").split()
        base = [py, "benchmarks/gn_step_cost_cuda.py", *size, "--variants", "adamw,muon,gn_default,layerwise",
                "--out", str(out)]
        r.part("step_cost_fp32", base, "step_cost_fp32.txt")
        r.record()
        if bf16_supported(dev):
            r.part("step_cost_bf16", base + ["--precision", "bf16-mixed"], "step_cost_bf16.txt")
            r.record()

    if "comparison" not in skip:
        comp = out / "comparison"
        comp.mkdir(exist_ok=True)
        data = Path(args.data).resolve()
        if cpu:  # a cache entry of the embedded corpus's bytes, loaded as a data spec like the GPU's
            sys.path.insert(0, str(ROOT / "src"))
            from gnopt.data import prepare as prepare_data

            data = prepare_data(None, "bytes", cache_dir=out / "cache").path
        toml = comp / "experiment.toml"
        toml.write_text(experiment(Path(os.path.relpath(data, comp)), cpu))  # relative: no machine path
        study = ROOT / "runs" / ("gpu-hour-study-cpu" if cpu else "gpu-hour-study") if not args.study_dir \
            else Path(args.study_dir).resolve()
        r.part("comparison", [py, "-m", "gnopt", "study", str(toml), "--out", str(study), "--jobs", "1",
                                   "--quiet"], "comparison/study.txt")
        for name in ("report.md", "runs.csv", "study.json", "val_loss_largest_batch.png"):
            if (study / name).is_file():
                shutil.copy2(study / name, comp / name)
        if (comp / "runs.csv").is_file():
            (comp / "comparison.md").write_text(
                "# 45M at 1M tokens per step: Muon against GN\n\n" if not cpu else
                "# CPU mode (tiny, 2K tokens per step): Muon against GN (no GPU figure)\n\n")
            with (comp / "comparison.md").open("a") as f:
                f.write(comparison_table(comp / "runs.csv"))
        r.record()
    return max((p["rc"] for p in r.summary["parts"].values()), default=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="tokenize gutenberg-fiction into .cache/gpu-hour (here, once)")
    pp.add_argument("--corpus", default=str(CORPUS), help="the gutenberg-fiction folder")
    pr = sub.add_parser("run", help="parts 1-3 (GPU), or the CPU mode with --cpu")
    pr.add_argument("--cpu", action="store_true", help="CPU mode: tiny preset, seconds; needs --out")
    pr.add_argument("--out", help=f"results folder (default: {RESULTS.relative_to(ROOT)})")
    pr.add_argument("--archive", help="rewrite this .tar.gz of the results folder after every part")
    pr.add_argument("--data", default=str(ENTRY), help="the prepared cache entry of part 3 (GPU mode)")
    pr.add_argument("--study-dir", help="the study folder of part 3 (default: runs/gpu-hour-study[-cpu])")
    pr.add_argument("--skip", action="append", choices=PARTS, help="skip a part (repeatable)")
    args = p.parse_args(argv)
    return prepare(args) if args.cmd == "prepare" else run(args)


if __name__ == "__main__":
    sys.exit(main())
