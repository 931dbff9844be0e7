"""Cost and memory of Gauss-Newton outer steps on a CUDA GPU, relative to AdamW, measured side by side.

The CPU benchmark (``gn_step_cost.py``) splits an outer step into its parts with the optimizer's own
timers; on a GPU those timers do not synchronize, so this script times whole outer steps between
``torch.cuda.synchronize()`` calls instead. For one preset and micro-batch, each variant in turn on a fresh
model (``--precision fp32``: float32, TF32 matmuls off unless ``--tf32``; ``--precision bf16-mixed``: every
model pass under bf16 autocast, weights, optimizer states and losses in float32, as ``gnopt train
--precision bf16-mixed`` runs them):

* ``adamw``: one AdamW step (forward + backward + clip + update on one micro-batch) — the unit;
* ``products``: GN's products alone for one micro-batch (z₀, JΔ, Jᵀ(g + H JΔ); no optimizer update);
* ``gn``, ``gn_adamw_inner``, ``prox_linear``, ``layerwise``: one outer step = N inner steps + the line
  search (N fresh micro-batches × (ls_range forwards + one JVP for ρ)), reported per outer step and
  per inner step (outer / N), and as a multiple of N AdamW steps (what a baseline does with the same
  training micro-batches);

plus the peak allocated GPU memory of each variant above the weights (``torch.cuda.max_memory_allocated``)
and AdamW's training tokens per second. Results go to ``benchmarks/results/gn_step_cost_cuda.{json,md}``
(``gn_step_cost_cuda_bf16.{json,md}`` for ``--precision bf16-mixed``).

    python benchmarks/gn_step_cost_cuda.py --preset 45m --vocab 32000 --micro-batch 8 --inner-steps 4
    python benchmarks/gn_step_cost_cuda.py --preset 45m --vocab 32000 --micro-batch 8 --inner-steps 4 \
        --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
from _common import publish
from gn_step_cost import adamw_step, batches, make_gn, products_step

from gnopt.model import build_model
from gnopt.optim import SoftmaxCrossEntropy, model_autocast
from gnopt.precision import PRECISIONS, autocast_dtype, bf16_supported

#: ``gn_default``: the library's defaults (model line search on ⌈N/8⌉ micro-batches); the others keep the
#: paper's line search (``ls_range`` step sizes on N fresh micro-batches), as in results measured before.
VARIANTS = ("gn_default", "gn", "gn_adamw_inner", "prox_linear", "layerwise")


def _timed(fn: Any) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _on_device(it: Any, device: torch.device) -> Any:
    for x, y in it:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def measure(variant: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    dtype = autocast_dtype(args.precision)
    model = build_model(args.preset, vocab_size=args.vocab, device=device)
    seq = model.config.seq_len
    it = _on_device(batches(args.vocab, args.micro_batch, seq, 0), device)
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated()
    if variant in ("adamw", "products"):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ce = SoftmaxCrossEntropy()

        def one() -> None:
            if variant == "adamw":
                adamw_step(model, opt, next(it), autocast=dtype)
            else:
                with model_autocast(dtype):
                    products_step(model, next(it), ce)
    else:
        gn = make_gn(model, variant, args.inner_steps, args.ls_range, autocast_dtype=dtype)

        def one() -> None:
            gn.step(it)

    for _ in range(2):  # warm-up: kernels, allocator, optimizer state, a non-zero warm start
        one()
    torch.cuda.reset_peak_memory_stats()
    times = [_timed(one) for _ in range(args.repeats)]
    peak = torch.cuda.max_memory_allocated()
    return {"seconds": statistics.median(times), "min_seconds": min(times),
            "peak_mb": peak / 2**20, "weights_mb": weights / 2**20, "working_mb": (peak - weights) / 2**20}


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
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gn_step_cost_cuda: error: no CUDA device (use benchmarks/gn_step_cost.py on a CPU)",
              file=sys.stderr)
        return 2
    if autocast_dtype(args.precision) is not None and not bf16_supported(torch.device("cuda")):
        print(f"gn_step_cost_cuda: error: --precision {args.precision} needs a bf16 GPU (Ampere or newer)",
              file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    device = torch.device("cuda")
    res = {}
    for v in ("adamw", "products", *VARIANTS):
        res[v] = measure(v, args, device)
        torch.cuda.empty_cache()  # the variant's model and state are gone with measure()'s frame
    unit = res["adamw"]["seconds"]
    n = args.inner_steps
    seq = build_model(args.preset, vocab_size=args.vocab, device="meta").config.seq_len
    result = {
        "config": vars(args) | {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()},
        "results": res,
        "products_ratio": res["products"]["seconds"] / unit,
        "adamw_tokens_per_second": args.micro_batch * seq / unit,
        "outer_vs_n_adamw": {v: res[v]["seconds"] / (n * unit) for v in VARIANTS},
        "memory_ratio_working": {v: res[v]["working_mb"] / res["adamw"]["working_mb"] for v in res},
    }
    name = "gn_step_cost_cuda" + ("" if args.precision == "fp32" else "_bf16")
    publish(name, result, render, write=not args.no_write)
    return 0


def render(r: dict[str, Any]) -> str:
    c, res = r["config"], r["results"]
    precision = c.get("precision", "fp32")  # results written before --precision existed are fp32
    n = c["inner_steps"]
    unit = res["adamw"]["seconds"]
    numerics = "float32" if precision == "fp32" else "bf16 autocast, float32 weights"
    numerics += " with TF32" if c["tf32"] else ""
    rate = r.get("adamw_tokens_per_second")
    lines = [
        "# Gauss-Newton outer-step cost and memory on a GPU",
        "",
        f"`python benchmarks/gn_step_cost_cuda.py --preset {c['preset']} --vocab {c['vocab']} --micro-batch "
        f"{c['micro_batch']} --inner-steps {n} --ls-range {c['ls_range']} --repeats {c['repeats']}"
        + (" --tf32" if c["tf32"] else "") + ("" if precision == "fp32" else f" --precision {precision}")
        + f"` ({c['gpu']}, torch {c['torch']}, {numerics}; medians).",
        "",
        f"One AdamW step (fwd+bwd+update, {c['micro_batch']} sequences): {unit * 1e3:.1f} ms. "
        f"GN products alone for one micro-batch: {r['products_ratio']:.2f} × that."
        + (f" AdamW: {rate:,.0f} tokens/s." if rate is not None else ""),
        "",
        f"| variant | outer step (ms) | per inner step (ms) | × {n} AdamW steps | peak memory above the "
        "weights (MB) | × AdamW |",
        "|---|---|---|---|---|---|",
        f"| adamw (one step) | – | {unit * 1e3:.1f} | – | {res['adamw']['working_mb']:.0f} | 1.00 |",
    ]
    for v in (v for v in VARIANTS if v in res):  # results written before gn_default existed lack it
        lines.append(
            f"| {v} | {res[v]['seconds'] * 1e3:.1f} | {res[v]['seconds'] / n * 1e3:.1f} | "
            f"{r['outer_vs_n_adamw'][v]:.2f} | {res[v]['working_mb']:.0f} | "
            f"{r['memory_ratio_working'][v]:.2f} |"
        )
    lines += [
        "",
        f"An outer step also runs the line search, inside the outer-step time: the paper's ({n} fresh "
        f"micro-batches × ({c['ls_range']} forwards + one JVP)) for every variant but `gn_default`, "
        f"whose model search takes ⌈{n}/8⌉ micro-batches × (one JVP + one or two forwards).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
