"""GPU-hour estimate of a study plan from measured per-token costs (``gnopt study --dry-run``).

The only GPU measurements are in ``benchmarks/results/gn_step_cost_cuda.json`` (one NVIDIA H100 80GB HBM3,
torch 2.11.0+cu130, float32, the ``45m`` preset with a 32,000-token vocabulary, micro-batches of 8 × 1024
tokens, GN with 4 inner steps and a 5-point line search; medians of 7). They are copied into
:data:`GPU_SECONDS` below (a test checks that they match the file) so that an installed gnopt, without
the repository, can estimate too. Per training token:

* AdamW: one step (forward + backward + update) of 8,192 tokens;
* GN variants: one outer step (4 inner steps + the line search on 4 fresh micro-batches) per 4 × 8,192
  training tokens; the line-search tokens are inside the measured time, not counted as training tokens.

What is *not* measured, and how the estimate handles it (every point is printed with the estimate):

* Muon, SOAP and Shampoo have no GPU measurement: they are charged AdamW's cost per token, a lower bound
  (on the CPU they cost 1.0-1.2x AdamW, see ``experiments/cpu.toml``);
* other presets are scaled by their parameter count relative to the measured ``45m`` model
  (~6 × parameters FLOPs per token); attention's share, the more blocks of layerwise GN at 150M, a longer
  line search (``ls_range`` > 5) and evaluations are not in it;
* mixed precision would be faster: the figures are float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gnopt.study.spec import RunSpec

#: Where the measurements come from (printed with every estimate).
GPU_SOURCE = (
    "benchmarks/results/gn_step_cost_cuda.json: NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, float32, "
    "45m preset (vocab 32,000), micro-batch 8 x 1024 tokens, GN 4 inner steps + line search (ls_range 5)"
)
GPU_PRESET = "45m"
#: Presets the estimate is printed for: the measured one and the paper's other shape (scaled).
GPU_PRESETS: tuple[str, ...] = ("45m", "150m")
GPU_VOCAB = 32000
#: Measured medians (seconds) and the training tokens each covers: AdamW one step of 8 × 1024 tokens; GN
#: variants one outer step over 4 micro-batches of 8 × 1024 (line search included).
GPU_SECONDS: dict[str, tuple[float, int]] = {
    "adamw": (0.0480436200000014, 8 * 1024),
    "gn": (1.1874362500000046, 4 * 8 * 1024),
    "gn_adamw_inner": (1.1196107250000011, 4 * 8 * 1024),
    "prox_linear": (1.2877625520000038, 4 * 8 * 1024),
    "layerwise": (2.527133004999996, 4 * 8 * 1024),
}


def measured_key(optimizer: str, inner_optimizer: str) -> tuple[str, bool]:
    """(key of :data:`GPU_SECONDS` used for a run, whether that optimizer itself was measured)."""
    if optimizer == "adamw":
        return "adamw", True
    if optimizer in ("muon", "soap", "shampoo"):
        return "adamw", False
    if optimizer == "gn-prox-linear":
        return "prox_linear", inner_optimizer == "muon"
    if optimizer == "gn-layerwise":
        return "layerwise", inner_optimizer == "muon"
    if inner_optimizer == "adamw":
        return "gn_adamw_inner", True
    return "gn", inner_optimizer == "muon"


def seconds_per_token(optimizer: str, inner_optimizer: str, scale: float) -> float:
    key, _ = measured_key(optimizer, inner_optimizer)
    seconds, tokens = GPU_SECONDS[key]
    return seconds / tokens * scale


def parameter_count(preset: str, vocab_size: int = GPU_VOCAB) -> int:
    from gnopt.model import build_model, count_parameters

    return count_parameters(build_model(preset, vocab_size=vocab_size, device="meta"))["total"]


@dataclass(frozen=True)
class MethodEstimate:
    method: str
    optimizer: str
    runs: int
    tokens: int
    gpu_hours: float
    measured: bool


def estimate(runs: Sequence[RunSpec], preset: str) -> tuple[list[MethodEstimate], float]:
    """GPU-hours per method (in plan order, the warm-up first) and the parameter-count scale used."""
    scale = parameter_count(preset) / parameter_count(GPU_PRESET)
    out: dict[str, MethodEstimate] = {}
    for r in runs:
        inner = r.config.inner_optimizer
        tokens = r.steps * r.batch_tokens
        hours = tokens * seconds_per_token(r.optimizer, inner, scale) / 3600
        _, measured = measured_key(r.optimizer, inner)
        prev = out.get(r.method)
        if prev is None:
            out[r.method] = MethodEstimate(r.method, r.optimizer, 1, tokens, hours, measured)
        else:
            out[r.method] = MethodEstimate(r.method, r.optimizer, prev.runs + 1, prev.tokens + tokens,
                                           prev.gpu_hours + hours, prev.measured and measured)
    return list(out.values()), scale


def format_estimate(runs: Sequence[RunSpec], preset: str) -> list[str]:
    """The lines ``gnopt study --dry-run`` prints for the GPU estimate."""
    rows, scale = estimate(runs, preset)
    n_model, n_ref = parameter_count(preset), parameter_count(GPU_PRESET)
    lines = [f"GPU estimate (training tokens only) from measured per-token costs: {GPU_SOURCE}."]
    if preset != GPU_PRESET:
        lines.append(f"  {preset} has {n_model / 1e6:.1f}M parameters vs {n_ref / 1e6:.1f}M measured: costs "
                     f"scaled by the parameter count ({scale:.2f}x), not measured at this size.")
    micro, seq = runs[0].config.micro_batch_size, runs[0].config.seq_len
    if (micro, seq) != (8, 1024):
        lines.append(f"  This study's micro-batches are {micro} x {seq} tokens, the measurement's 8 x 1024: "
                     "the cost per token is assumed the same.")
    width = max(len(r.method) for r in rows)
    lines.append(f"  {'method':<{width}}  runs  training tokens     GPU-hours")
    for r in rows:
        note = "" if r.measured else "  (no GPU measurement: AdamW's per-token cost, a lower bound)"
        lines.append(f"  {r.method:<{width}}  {r.runs:4d}  {r.tokens:15,d}  {r.gpu_hours:12,.1f}{note}")
    total = sum(r.gpu_hours for r in rows)
    tokens = sum(r.tokens for r in rows)
    lines.append(f"  {'total':<{width}}  {sum(r.runs for r in rows):4d}  {tokens:15,d}  {total:12,.1f}")
    lines.append("  Not included: evaluations, checkpoints, data preparation, a line search longer than "
                 "5 points, mixed precision (faster); float32 throughout.")
    return lines
