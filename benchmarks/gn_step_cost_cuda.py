"""Cost and memory of Gauss-Newton outer steps on a CUDA GPU, relative to AdamW, measured side by side.

The CPU benchmark (``gn_step_cost.py``) splits an outer step into its parts with the optimizer's own
timers; on a GPU those timers do not synchronize, so this script times whole outer steps between
``torch.cuda.synchronize()`` calls instead. For one preset and micro-batch, each variant in turn on a fresh
model (``--precision fp32``: float32, TF32 matmuls off unless ``--tf32``; ``--precision bf16-mixed``: every
model pass under bf16 autocast, weights, optimizer states and losses in float32, as ``gnopt train
--precision bf16-mixed`` runs them):

* ``adamw``: one AdamW step (forward + backward + clip + update on one micro-batch) — the unit;
* ``muon``: one step of the Muon baseline on one micro-batch (torch Muon on the hidden matrices, AdamW on
  the rest: ``gnopt train --optimizer muon``'s optimizers), forward + backward + clip + update;
* ``products``: GN's products alone for one micro-batch (z₀, JΔ, Jᵀ(g + H JΔ); no optimizer update);
* ``gn``, ``gn_adamw_inner``, ``prox_linear``, ``layerwise``: one outer step = N inner steps + the line
  search (N fresh micro-batches × (ls_range forwards + one JVP for ρ)), reported per outer step and
  per inner step (outer / N), and as a multiple of N AdamW steps (what a baseline does with the same
  training micro-batches);

plus the peak allocated GPU memory of each variant above the weights (``torch.cuda.max_memory_allocated``)
and the training tokens per second of each (a GN outer step's N training micro-batches; its line-search
micro-batches are extra). Results go to ``benchmarks/results/gn_step_cost_cuda.{json,md}``
(``gn_step_cost_cuda_bf16.{json,md}`` for ``--precision bf16-mixed``), or to ``--out DIR``.
``--variants`` measures a subset (``adamw`` always runs: it is the unit). ``--device cpu`` runs the same
code on the CPU as a smoke check of the script itself (``benchmarks/gpu_hour.py``'s CPU mode); its timings
say nothing about a GPU and it has no memory figures.

    python benchmarks/gn_step_cost_cuda.py --preset 45m --vocab 32000 --micro-batch 8 --inner-steps 4
    python benchmarks/gn_step_cost_cuda.py --preset 45m --vocab 32000 --micro-batch 8 --inner-steps 4 \
        --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import publish
from gn_step_cost import adamw_step, batches, make_gn, muon_optimizers, products_step

from gnopt.model import build_model
from gnopt.optim import SoftmaxCrossEntropy, model_autocast
from gnopt.optim.ns_precision import NS_PRECISIONS
from gnopt.precision import PRECISIONS, autocast_dtype, bf16_supported, default_muon_ns_precision
from gnopt.steppers import forward, lm_loss

#: ``gn_default``: the library's defaults (model line search on ⌈N/8⌉ micro-batches); the others keep the
#: paper's line search (``ls_range`` step sizes on N fresh micro-batches), as in results measured before.
VARIANTS = ("gn_default", "gn", "gn_adamw_inner", "prox_linear", "layerwise")
#: One-micro-batch steps (``adamw`` is the unit of the tables).
SINGLE = ("adamw", "muon", "products")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Any, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def muon_step(model: torch.nn.Module, opts: list[torch.optim.Optimizer], batch: Any,
              autocast: torch.dtype | None = None) -> None:
    """One step of the Muon baseline on one micro-batch: forward, backward, clip, every optimizer steps."""
    x, y = batch
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    lm_loss(forward(model, x, autocast), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for opt in opts:
        opt.step()


def _on_device(it: Any, device: torch.device) -> Any:
    for x, y in it:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def measure(variant: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    dtype = autocast_dtype(args.precision)
    model = build_model(args.preset, vocab_size=args.vocab, device=device)
    seq = model.config.seq_len
    it = _on_device(batches(args.vocab, args.micro_batch, seq, 0), device)
    cuda = device.type == "cuda"
    _sync(device)
    weights = torch.cuda.memory_allocated() if cuda else 0
    if variant in SINGLE:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        muon = muon_optimizers(model, args.muon_ns_precision) if variant == "muon" else []
        ce = SoftmaxCrossEntropy()

        def one() -> None:
            if variant == "adamw":
                adamw_step(model, opt, next(it), autocast=dtype)
            elif variant == "muon":
                muon_step(model, muon, next(it), autocast=dtype)
            else:
                with model_autocast(dtype):
                    products_step(model, next(it), ce)
    else:
        gn = make_gn(model, variant, args.inner_steps, args.ls_range, args.muon_ns_precision,
                     autocast_dtype=dtype)

        def one() -> None:
            gn.step(it)

    for _ in range(2):  # warm-up: kernels, allocator, optimizer state, a non-zero warm start
        one()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = [_timed(one, device) for _ in range(args.repeats)]
    med = statistics.median(times)
    micro = 1 if variant in SINGLE else args.inner_steps  # training micro-batches per timed step
    out = {"seconds": med, "min_seconds": min(times),
           "tokens_per_second": micro * args.micro_batch * seq / med}
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        out |= {"peak_mb": peak / 2**20, "weights_mb": weights / 2**20,
                "working_mb": (peak - weights) / 2**20}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="45m")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--inner-steps", type=int, default=4)
    p.add_argument("--ls-range", type=int, default=5)
    p.add_argument("--repeats", type=int, default=7, help="timed steps per variant (median reported)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                   help="fp32, or bf16-mixed (bf16 autocast for the model's passes, float32 weights/states)")
    p.add_argument("--muon-ns-precision", choices=tuple(NS_PRECISIONS), default=None,
                   help="Newton-Schulz precision of every Muon (default: the device's, as gnopt train picks)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--variants", metavar="A,B",
                   help=f"comma-separated subset of {', '.join((*SINGLE, *VARIANTS))} (default: all; adamw, "
                   "the unit, always runs)")
    p.add_argument("--out", metavar="DIR", help="write the results here instead of benchmarks/results")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a smoke run of this script (its timings say nothing about a GPU; no memory)")
    args = p.parse_args()
    known = (*SINGLE, *VARIANTS)
    chosen = known if args.variants is None else tuple(
        v.strip() for v in args.variants.split(",") if v.strip())
    bad = [v for v in chosen if v not in known]
    if bad:
        print(f"gn_step_cost_cuda: error: unknown variant(s) {', '.join(bad)}; known: {', '.join(known)}",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gn_step_cost_cuda: error: no CUDA device (use benchmarks/gn_step_cost.py on a CPU)",
              file=sys.stderr)
        return 2
    if autocast_dtype(args.precision) is not None and not bf16_supported(device):
        print(f"gn_step_cost_cuda: error: --precision {args.precision} needs a bf16 GPU (Ampere or newer)",
              file=sys.stderr)
        return 2
    if args.muon_ns_precision is None:
        args.muon_ns_precision = default_muon_ns_precision(device.type)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    res = {}
    for v in (v for v in known if v == "adamw" or v in chosen):
        res[v] = measure(v, args, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the variant's model and state are gone with measure()'s frame
    unit = res["adamw"]["seconds"]
    n = args.inner_steps
    seq = build_model(args.preset, vocab_size=args.vocab, device="meta").config.seq_len
    gn = [v for v in VARIANTS if v in res]
    cfg = vars(args) | {"variants": list(res), "torch": torch.__version__,
                        "cuda": torch.version.cuda, "gpu": _device_name(device)}
    result = {
        "config": cfg,
        "results": res,
        "products_ratio": res["products"]["seconds"] / unit if "products" in res else None,
        "adamw_tokens_per_second": args.micro_batch * seq / unit,
        "tokens_per_second": {v: r["tokens_per_second"] for v, r in res.items()},
        "outer_vs_n_adamw": {v: res[v]["seconds"] / (n * unit) for v in gn},
        "outer_vs_n_muon": ({v: res[v]["seconds"] / (n * res["muon"]["seconds"]) for v in gn}
                            if "muon" in res else {}),
    }
    if device.type == "cuda":
        result["memory_ratio_working"] = {v: res[v]["working_mb"] / res["adamw"]["working_mb"] for v in res}
    name = "gn_step_cost_cuda" + ("" if args.precision == "fp32" else "_bf16")
    publish(name, result, render, write=not args.no_write, folder=Path(args.out) if args.out else None)
    return 0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from _common import cpu_name

    return f"CPU ({cpu_name()}; smoke run, not a GPU figure)"


def render(r: dict[str, Any]) -> str:
    c, res = r["config"], r["results"]
    precision = c.get("precision", "fp32")  # results written before --precision existed are fp32
    n = c["inner_steps"]
    unit = res["adamw"]["seconds"]
    numerics = "float32" if precision == "fp32" else "bf16 autocast, float32 weights"
    numerics += " with TF32" if c["tf32"] else ""
    rate = r.get("adamw_tokens_per_second")
    rates = r.get("tokens_per_second", {})  # results written before it existed lack it
    mem = r.get("memory_ratio_working")  # None: a CPU smoke run
    cuda = f", CUDA {c['cuda']}" if c.get("cuda") else ""
    subset = c.get("variants") and set(c["variants"]) != {*SINGLE, *VARIANTS}
    flags = "".join([" --tf32" if c["tf32"] else "",
                     "" if precision == "fp32" else f" --precision {precision}",
                     f" --variants {','.join(c['variants'])}" if subset else "",
                     " --device cpu" if c.get("device") == "cpu" else ""])
    products = r.get("products_ratio")
    lines = [
        "# Gauss-Newton outer-step cost and memory on a GPU",
        "",
        f"`python benchmarks/gn_step_cost_cuda.py --preset {c['preset']} --vocab {c['vocab']} --micro-batch "
        f"{c['micro_batch']} --inner-steps {n} --ls-range {c['ls_range']} --repeats {c['repeats']}{flags}` "
        f"({c['gpu']}, torch {c['torch']}{cuda}, {numerics}; medians).",
        "",
        f"One AdamW step (fwd+bwd+update, {c['micro_batch']} sequences): {unit * 1e3:.1f} ms."
        + (f" GN products alone for one micro-batch: {products:.2f} × that." if products is not None else "")
        + (f" AdamW: {rate:,.0f} tokens/s." if rate is not None else ""),
        "",
        f"| variant | outer step (ms) | per inner step (ms) | × {n} AdamW steps | × {n} Muon steps | "
        "training tokens/s | peak memory above the weights (MB) | × AdamW |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def memory(v: str) -> str:
        return f"{res[v]['working_mb']:.0f} | {mem[v]:.2f}" if mem is not None else "– | –"

    def tps(v: str) -> str:
        return f"{rates[v]:,.0f}" if v in rates else "–"

    for v in ("adamw", "muon"):
        if v in res:
            ratio = "1.00" if v == "adamw" else f"{res[v]['seconds'] / unit:.2f}"
            lines.append(f"| {v} (one step) | – | {res[v]['seconds'] * 1e3:.1f} | {ratio} (per step) | – | "
                         f"{tps(v)} | {memory(v)} |")
    vs_muon = r.get("outer_vs_n_muon") or {}
    for v in (v for v in VARIANTS if v in res):  # results written before gn_default existed lack it
        lines.append(
            f"| {v} | {res[v]['seconds'] * 1e3:.1f} | {res[v]['seconds'] / n * 1e3:.1f} | "
            f"{r['outer_vs_n_adamw'][v]:.2f} | {f'{vs_muon[v]:.2f}' if v in vs_muon else '–'} | {tps(v)} | "
            f"{memory(v)} |"
        )
    lines += [
        "",
        f"An outer step also runs the line search, inside the outer-step time: the paper's ({n} fresh "
        f"micro-batches × ({c['ls_range']} forwards + one JVP)) for every variant but `gn_default`, "
        f"whose model search takes ⌈{n}/8⌉ micro-batches × (one JVP + one or two forwards). Training "
        f"tokens/s of a GN variant: its {n} inner micro-batches per outer step (line-search tokens not "
        "counted).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
