"""The outputs of a study: ``runs.csv``, ``runs.json``, ``study.json``, PNG plots and ``report.md``.

Plots use matplotlib with the Agg backend (no display needed); matplotlib is the optional ``plot`` extra,
and :func:`require_matplotlib` names the install command when it is missing.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from gnopt.checkpoint import atomic_write_bytes, atomic_write_text
from gnopt.errors import GnoptError
from gnopt.study.analysis import (
    FEW_STEPS,
    RUN_COLUMNS,
    SEED_METRICS,
    CriticalBatchFit,
    RunResult,
    SeedRatio,
    StudyResults,
    largest_batch_speedups,
)
from gnopt.study.spec import StudySpec

RUNS_CSV = "runs.csv"
RUNS_JSON = "runs.json"
STUDY_JSON = "study.json"
REPORT_MD = "report.md"
PLOT_LOSS = "val_loss_largest_batch.png"
PLOT_STEPS = "steps_to_target_vs_batch.png"
#: Every file :func:`write_outputs` produces, relative to the study folder.
OUTPUT_FILES: tuple[str, ...] = (RUNS_CSV, RUNS_JSON, STUDY_JSON, REPORT_MD, PLOT_LOSS, PLOT_STEPS)


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or a :class:`GnoptError` with the install command."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise GnoptError(
            "the study's plots need matplotlib, which is not installed; install the plot extra: "
            "pip install -c constraints.txt -e '.[plot]'."
        ) from None
    return plt


# ------------------------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------------------------


def _fmt(v: Any, kind: str = "g") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return "nan"
        if kind == "loss":
            return f"{v:.4f}"
        if kind == "steps":
            return f"{v:.1f}"
        if kind == "s":
            return f"{v:.1f}"
        if kind == "int":
            return f"{v:,.0f}"
        if kind == "ratio":
            return f"{v:.2f}"
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}" if kind == "int" else str(v)
    return str(v)


def ratio_text(value: float | None, bracket: tuple[float, float] | None, *, digits: int = 2,
               unit: str = "x") -> str:
    """A ratio as ``6.00x``, with its resolution bracket where it has one: ``6.00x [4.00x–12.00x]``."""
    if value is None:
        return "–"
    out = f"{value:.{digits}f}{unit}"
    if bracket is not None:
        out += f" [{bracket[0]:.{digits}f}{unit}–{bracket[1]:.{digits}f}{unit}]"
    return out


def _warm_start_share(spec: StudySpec, tokens: int) -> str:
    """The warm start's tokens as a share of one run's budget at the largest batch (whether the experiment
    gave ``warmup_fraction`` or the warm start's own ``steps``)."""
    return f"{tokens / spec.reference_budget_tokens:.0%} of a run's budget at the largest batch"


def _tokens(v: float | int | None) -> str:
    """Batch sizes / token counts: 65536 -> 64K, 1048576 -> 1M."""
    if v is None or not math.isfinite(float(v)):
        return "–"
    v = float(v)
    for unit, div in (("M", 2**20), ("K", 2**10)):
        if abs(v) >= div:
            q = v / div
            return f"{q:.0f}{unit}" if abs(q - round(q)) < 0.05 else f"{q:.1f}{unit}"
    return f"{v:.0f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _display_path(path: Any) -> str:
    """A path relative to the working directory when that is short (reports get committed), else as is."""
    try:
        rel = os.path.relpath(str(path))
    except ValueError:  # another drive (Windows)
        return str(path)
    return rel if rel.count("..") <= 2 else str(path)


#: Base settings the protocol table shows in rows of their own.
_SHOWN_BASE = ("data", "preset", "tokenizer", "micro_batch_size", "eval_tokens", "seed")


def _setting(r: RunResult) -> str:
    return f"{r.lr:g}" + (f" / {r.adam_lr:g}" if r.adam_lr is not None else "")


# ------------------------------------------------------------------------------------------------------
# data files
# ------------------------------------------------------------------------------------------------------


def write_runs_csv(results: StudyResults, path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(RUN_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in [*results.runs, *results.seed_runs]:
        row = r.row()
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


# ------------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------------


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, lambda fh: fh.write(buf.getvalue()))


def plot_loss_curves(results: StudyResults, path: Path) -> None:
    """Validation loss vs. step at the largest batch: the best run of every method."""
    plt = require_matplotlib()
    spec = results.spec
    b = spec.largest_batch
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    drawn = 0
    for i, m in enumerate(spec.methods):
        r = results.best.get((m.name, b))
        if r is None or not r.curve.evals:
            continue
        pts = [(s, v) for s, _, v in r.curve.evals if math.isfinite(v)]
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", markersize=2.5, linewidth=1.4, color=f"C{i % 10}",
                linestyle="-" if not m.is_gn else "--", label=f"{m.name} (lr {_setting(r)})")
        drawn += 1
    if results.target_loss is not None:
        ax.axhline(results.target_loss, color="black", linewidth=0.8, linestyle=":",
                   label=f"target {results.target_loss:.4f}")
    ax.set_xlabel("step (GN: outer step)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{spec.name}: validation loss at batch {_tokens(b)} tokens (best lr per method)")
    if drawn:
        # From the lowest loss to the shared starting loss: a diverging curve leaves through the top.
        curves = [[v for _, _, v in r.curve.evals if math.isfinite(v)] for r in results.best.values()
                  if r.batch_tokens == b]
        curves = [c for c in curves if c]
        if curves:
            lo, hi = min(min(c) for c in curves), max(c[0] for c in curves)
            if hi > lo:
                ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        ax.legend(fontsize=7, loc="upper right")
    else:
        ax.text(0.5, 0.5, "no finished run at the largest batch yet", ha="center", va="center",
                transform=ax.transAxes)
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def plot_steps_vs_batch(results: StudyResults, path: Path) -> None:
    """Steps to target vs. batch size (log-log), one line per method, with the S(B) fit and B_crit."""
    plt = require_matplotlib()
    spec = results.spec
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    bmin, bmax = spec.batch_tokens[0], spec.batch_tokens[-1]
    dense = np.geomspace(bmin / 1.5, bmax * 1.5, 200)
    drawn = 0
    for i, m in enumerate(spec.methods):
        runs = [r for b in spec.batch_tokens if (r := results.best.get((m.name, b))) is not None
                and r.steps_to_target]  # on a log axis: a run at the target from the start has no point
        pts = [(r.batch_tokens, r.steps_to_target) for r in runs]
        if not pts:
            continue
        color = f"C{i % 10}"
        fit = results.fits.get(m.name)
        label = m.name
        if fit is not None:
            bc = _tokens(fit.b_crit) if fit.b_crit > 0 else "0"
            edge = {"above": " (> grid)", "below": " (< grid)"}.get(fit.bound or "", "")
            label += f": B_crit≈{bc}{edge}" + (f" [{_crit_range(fit)}]" if fit.b_crit_low is not None else "")
        xs, ys = zip(*pts, strict=True)
        lows = [s - r.steps_interval[0] for r, s in zip(runs, ys, strict=True)]  # type: ignore[index]
        ax.errorbar(xs, ys, yerr=[lows, [0] * len(ys)], marker="o", linestyle="none", color=color,
                    capsize=2, label=label)
        if fit is not None:
            ax.plot(dense, fit.steps(dense), color=color, linewidth=1.0,
                    linestyle="-" if not m.is_gn else "--")
            if fit.b_crit > 0 and dense[0] <= fit.b_crit <= dense[-1]:
                ax.plot([fit.b_crit], [2 * fit.s_min], marker="*", markersize=11, color=color,
                        markeredgecolor="black", markeredgewidth=0.5)
        else:
            ax.plot(xs, ys, color=color, linewidth=0.8, alpha=0.6)
        drawn += 1
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (tokens per step)")
    ax.set_ylabel("whole steps to target (bar: since the previous evaluation)")
    tl = f"{results.target_loss:.4f}" if results.target_loss is not None else "undetermined"
    ax.set_title(f"{spec.name}: steps to val loss {tl}; fit S(B)=S_min(1+B_noise/B), ★ = B_crit")
    ax.set_xticks(list(spec.batch_tokens))
    ax.set_xticklabels([_tokens(b) for b in spec.batch_tokens])
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no run has reached the target yet", ha="center", va="center",
                transform=ax.transAxes)
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------
# markdown
# ------------------------------------------------------------------------------------------------------


def _spread(values: list[float], kind: str) -> str:
    """``median [min–max]`` of ``values`` (``–`` when empty)."""
    if not values:
        return "–"
    med = float(np.median(values))
    if len(values) == 1:
        return _fmt(med, kind)
    return f"{_fmt(med, kind)} [{_fmt(min(values), kind)}–{_fmt(max(values), kind)}]"


def _ratio_name(r: SeedRatio) -> str:
    what = {"steps": "steps", "passes": "passes", "wall": "wall time"}[r.metric]
    if r.numerator == "best baseline":
        return f"{r.denominator}: speed-up over the best baseline ({what} to target)"
    return f"{r.numerator} / {r.denominator} ({what} to target)"


def _seed_sections(results: StudyResults) -> list[str]:
    """The seed runs: each method's steps / passes / wall to target per seed, the headline ratios (median and
    range over seeds) and the GN diagnostics of every seed."""
    spec = results.spec
    seeds = sorted({s for runs in results.by_seed.values() for s in runs})
    where = "the largest batch" if spec.seed_batch == spec.largest_batch else "batch"
    out = [f"\n## Seeds at {where} ({_tokens(spec.seed_batch)} tokens)\n",
           f"The best setting of every method at {where} {_tokens(spec.seed_batch)} (chosen at seed "
           f"{spec.base_seed}, as "
           f"above) re-run with data seeds {', '.join(str(x) for x in spec.extra_seeds)}: the seed sets the "
           "order of the training batches and of the micro-batches GN's line search draws; every seed starts "
           "from the same shared warm start. Steps to target are whole outer steps (to the first evaluation "
           "at or below the target); `median [min–max]` over the seeds that reached the target.\n"]
    rows = []
    for m in spec.methods:
        runs = results.by_seed.get(m.name)
        if not runs:
            continue
        first = next(iter(runs.values()))
        per = [_fmt(runs[s].steps_to_target) if s in runs and runs[s].done
               else ("not run" if s not in runs else runs[s].status) for s in seeds]
        done = [r for r in runs.values() if r.done]
        vals = {k: [v for r in done if (v := getattr(r, a)) is not None] for k, a in SEED_METRICS.items()}
        rows.append([m.name, _setting(first), *per, _spread(vals["steps"], "g"),
                     _spread(vals["passes"], "int"), _spread(vals["wall"], "s"),
                     _spread([r.final_val_loss for r in done if r.final_val_loss is not None], "loss")])
    out.append(_table(["method", "lr", *[f"steps, seed {x}" for x in seeds], "steps to target",
                       "passes to target", "wall to target (s)", "final val loss"], rows))
    if results.ratios:
        out.append("\nHeadline ratios, per seed and as median [min–max] over seeds. Speed-up over the best "
                   "baseline: in each seed, the smallest steps (passes, wall time) to target of any baseline "
                   "divided by the method's (above 1 = the method needs less). `A / B`: A's value divided by "
                   "B's (above 1 = A needs more). A seed counts when both sides reached the target. Steps "
                   f"ratios are of whole steps; where a side took {FEW_STEPS} steps or fewer, the ratio's "
                   "resolution bracket (that side one whole step either way, at least 1) follows in "
                   "brackets, and `resolution` spans the seeds' brackets.\n")
        rrows = [[_ratio_name(r), *[ratio_text(r.per_seed[x], r.brackets.get(x), unit="")
                                    if x in r.per_seed else "–" for x in seeds],
                  _spread(r.values, "ratio"),
                  "–" if (res := r.resolution) is None else f"{res[0]:.2f}–{res[1]:.2f}"]
                 for r in results.ratios]
        out.append(_table(["ratio", *[f"seed {x}" for x in seeds], "median [range]", "resolution"], rrows))
    drows = []
    for (m, seed), d in sorted(results.seed_diagnostics.items(), key=lambda kv: (results._order(kv[0][0]),
                                                                                  kv[0][1])):
        drows.append([m, str(seed), str(d.steps), _fmt(d.alpha_median), f"{d.share_alpha_one:.0%}",
                      f"{d.share_at_floor:.0%}", f"{d.share_backtracked:.0%}", _fmt(d.rho_median),
                      str(d.resets), str(d.rejected), f"{d.passes_per_step:.1f}"])
    if drows:
        out.append("\nGauss-Newton diagnostics per seed (columns as in the diagnostics table below):\n")
        out.append(_table(["method", "seed", "steps", "α median", "α = 1", "α at floor", "backtracked",
                           "ρ median", "resets", "rejected", "passes/step"], drows))
    return out


def tuning_section(results: StudyResults) -> list[str]:
    """What finding each method's best setting cost, per batch size (:class:`TuningCost`)."""
    out = ["\n## Tuning cost\n",
           "What finding the best setting cost, per method and batch size, over the sweep's settings: how "
           "many reach the target, the spread of their (whole) steps to target, the "
           "forward+backward-equivalent passes the whole grid consumed as it ran, the passes it would "
           "have consumed had every run stopped at the target (a run that misses it counts whole; this "
           "column compares across studies), and the best setting's passes to target. "
           "`grid / best` = the grid's passes to target over the best setting's.\n"]
    rows = []
    for t in results.tuning:
        spread = ("–" if t.steps_min is None else f"{t.steps_min:g}" if t.reached == 1
                  else f"{t.steps_min:g}–{t.steps_max:g} (median {t.steps_median:g})")
        ratio = (f"{t.grid_passes_to_target / t.best_passes:.1f}x"
                 if t.best_passes and t.finished == t.settings else "–")
        rows.append([t.method, _tokens(t.batch_tokens), f"{t.reached} of {t.settings}"
                     + (f" ({t.settings - t.finished} not finished)" if t.finished < t.settings else ""),
                     spread, _fmt(t.grid_passes, "int"), _fmt(t.grid_passes_to_target, "int"),
                     _fmt(t.best_passes, "int"), ratio])
    out.append(_table(["method", "batch", "settings reaching the target", "steps to target (spread)",
                       "grid passes (as run)", "grid passes (stopped at target)", "best setting's passes",
                       "grid / best"], rows))
    return out


def largest_batch_comparison(
        results: StudyResults) -> tuple[RunResult | None, list[str], list[list[str]]] | None:
    """The best run of every method at the largest batch against the baseline with the fewest whole steps
    to target (:func:`~gnopt.study.analysis.largest_batch_speedups`): (that baseline, headers, rows); None
    when no method reached the target there."""
    spec = results.spec
    b = spec.largest_batch
    ref, speedups = largest_batch_speedups(spec, results.best)
    by_name = {s.method: s for s in speedups}
    at_b = [(m, r) for m in spec.methods if (r := results.best.get((m.name, b))) is not None]
    if not any(r.steps_to_target is not None for _, r in at_b):
        return None
    rows = []
    for m, r in at_b:
        if r.steps_to_target is None:
            rows.append([m.name, _setting(r), "not reached", "–", "–", "–", "–", "–",
                         _fmt(r.final_val_loss, "loss")])
            continue
        sp = by_name[m.name]
        rows.append([m.name, _setting(r), _fmt(r.steps_to_target),
                     ratio_text(sp.steps_speedup, sp.steps_bracket),
                     _fmt(r.passes_to_target, "int"), ratio_text(sp.passes_speedup, None),
                     _fmt(r.wall_to_target, "s"), ratio_text(sp.wall_speedup, None),
                     _fmt(r.final_val_loss, "loss")])
    headers = ["method", "lr", "steps to target", "speed-up (steps)", "passes to target",
               "speed-up (passes)", "wall to target (s)", "speed-up (wall)", "final val loss"]
    return ref, headers, rows


def edge_note(results: StudyResults) -> str | None:
    """One sentence naming the best settings at an edge of their grid, or None when there are none."""
    if not results.edges:
        return None
    where = [f"{m} at {_tokens(b)} ({', '.join(what)})" for (m, b), what in results._in_order(results.edges)]
    return ("Best setting at an edge of its grid (its optimum may lie beyond the grid; widen it there): "
            + "; ".join(where) + ".")


def summary_text(results: StudyResults, study_dir: Path) -> str:
    """What ``gnopt study`` prints when it is done: the comparison at the largest batch as an aligned table,
    and where the report and the plots are."""
    spec = results.spec
    tgt = _fmt(results.target_loss, "loss")
    lines = [f"Study {spec.name!r}: best setting of each method at batch {_tokens(spec.largest_batch)} "
             f"tokens, target validation loss {tgt} ({results.target_source})."]
    comparison = largest_batch_comparison(results)
    if comparison is None:
        lines.append("No method reached the target at the largest batch.")
    else:
        ref, headers, rows = comparison
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        for row in [headers, *rows]:
            lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                                   enumerate(zip(row, widths, strict=True))).rstrip())
        if ref is not None:
            lines.append(f"Speed-ups relative to {ref.method}, the baseline with the fewest whole steps to "
                         "target (above 1 = fewer than it); [..] = the steps ratio with a side of "
                         f"{FEW_STEPS} steps or fewer one step either way.")
    fits = [(m, f) for m in spec.methods if (f := results.fits.get(m.name)) is not None]
    if fits:
        def crit(name: str, f: CriticalBatchFit) -> str:
            if f.bound == "above":
                return f"{name} beyond the grid (its steps still fall with the batch)"
            if f.bound == "below" or f.b_crit <= 0:
                return f"{name} below the grid (no gain from batch size in it)"
            return (f"{name} {_tokens(f.b_crit)} tokens [{_crit_range(f)}] (the largest batch is "
                    f"{spec.largest_batch / f.b_crit:.1f}x it)")

        lines.append("Critical batch size (fit of steps to target over the batch grid): "
                     + "; ".join(crit(m.name, f) for m, f in fits) + ".")
    if (note := edge_note(results)) is not None:
        lines.append(note)
    lines.append(f"Report: {_display_path(study_dir / REPORT_MD)}"
                 + (f"; validation loss vs step: {_display_path(study_dir / PLOT_LOSS)}"
                    if (study_dir / PLOT_LOSS).is_file() else ""))
    return "\n".join(lines)


def _crit_range(f: CriticalBatchFit) -> str:
    """B_crit's range over the fits through the steps intervals' ends, e.g. ``317K–600K``."""
    if f.b_crit_low is None or f.b_crit_high is None:
        return "–"
    lo = "< grid" if "below" in f.range_bound else (_tokens(f.b_crit_low) if f.b_crit_low > 0 else "0")
    hi = "> grid" if "above" in f.range_bound else _tokens(f.b_crit_high)
    return lo if lo == hi else f"{lo}–{hi}"


def render_report(results: StudyResults) -> str:
    spec = results.spec
    base = spec.base
    lines: list[str] = [f"# Study `{spec.name}`\n"]
    if spec.description:
        lines.append(spec.description.strip() + "\n")
    done = sum(r.done for r in results.runs)
    seeds_done = sum(r.done for r in results.seed_runs)
    seeds = f", seed runs {seeds_done} of {len(results.seed_runs)}" if results.seed_runs else ""
    lines.append(f"Experiment file: `{_display_path(spec.path)}`. "
                 f"Runs finished: {done} of {len(results.runs)}{seeds}.\n")

    # --- protocol -----------------------------------------------------------------------------------
    lines.append("## Protocol\n")
    any_run = next((r for r in results.runs), None)
    cfg_rows = [
        ["data", _display_path(base["data"]) if base.get("data") else "embedded default corpus"],
        ["preset / tokenizer",
         f"{base.get('preset', 'cpu-small')} / {base.get('tokenizer', 'the preset default')}"],
        ["micro-batch", f"{base.get('micro_batch_size', 16)} sequences"
         + (f" ({any_run.batch_tokens // max(any_run.n_micro, 1):,} tokens)" if any_run else "")],
        ["batch grid (tokens)", ", ".join(_tokens(b) for b in spec.batch_tokens)],
        ["budget", spec.budget.describe()],
        ["evaluation", f"{base.get('eval_tokens', 32768):,} validation tokens, "
         + (f"every {spec.eval_every} steps" if spec.eval_every
            else f"{spec.evals_per_run} evaluations per run")],
        ["seed", str(base.get("seed", 0))],
    ]
    others = {k: v for k, v in base.items() if k not in _SHOWN_BASE}
    if others:
        cfg_rows.append(["other shared settings", ", ".join(f"{k} = {v}" for k, v in others.items())])
    w = results.warmup
    if w is not None:
        cfg_rows.append(["shared warm start", f"{spec.warmup.get('optimizer', 'adamw')} lr {w.lr:g}, "
                         f"{w.steps_planned} steps at batch {_tokens(w.batch_tokens)} "
                         f"({_warm_start_share(spec, w.steps_planned * w.batch_tokens)}); val loss "
                         f"{_fmt(w.initial_val_loss, 'loss')} → {_fmt(w.final_val_loss, 'loss')}"])
    tgt = _fmt(results.target_loss, "loss")
    how = {
        "declared": "declared in the experiment file",
        "given": "given on the command line",
        "auto": f"auto: the lowest loss any baseline run at batch {_tokens(spec.largest_batch)} has at "
        f"{spec.target_fraction:.0%} of its budget",
    }.get(results.target_source, results.target_source)
    cfg_rows.append(["target validation loss", f"{tgt} ({how})"])
    if spec.stop_at_target:
        cfg_rows.append(["stop at the target", "yes: every run except the baselines at the largest batch "
                         "(which set the target) stops at its first evaluation at or below the target; its "
                         "final val loss is the loss where it stopped"])
    lines.append(_table(["", ""], cfg_rows))
    lines.append("\nMethods and their learning-rate grids (every setting is run at each of the method's "
                 "batch sizes, or the batch size's own grid where one is given; the best one is chosen by "
                 "steps to target, ties by final validation loss):\n")
    mrows = []
    for m in spec.methods:
        over = ", ".join(f"{k}={v}" for k, v in m.overrides.items()) or "–"
        grid = m.describe_lr()
        if m.adam_lr != (None,):
            grid += " × adam_lr " + ", ".join(f"{x:g}" for x in m.adam_lr if x is not None)
        sizes = sorted({len(m.grid_at(b)) for b in spec.batches_of(m)})
        n_set = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}–{sizes[-1]}"
        mrows.append([m.name, m.optimizer, grid, n_set,
                      ", ".join(_tokens(b) for b in m.batch_tokens) if m.batch_tokens else "all", over,
                      spec.budget_of(m).describe() if m.budget else "experiment's"])
    lines.append(_table(["method", "optimizer", "lr grid", "settings", "batch sizes", "fixed overrides",
                         "budget"], mrows))

    # --- best per (method, batch) --------------------------------------------------------------------
    lines.append("\n## Best setting per method and batch size\n")
    lines.append("Steps (whole outer steps), tokens (training + line-search), forward+backward-equivalent "
                 "passes and wall seconds are counted up to the first evaluation at or below the target; "
                 "`evaluated` = the evaluation interval that step ends (the target was crossed after its "
                 "start); `–` = target not reached within the budget. Interpolated steps, a fraction of a "
                 f"step no method takes, are in `{RUNS_CSV}` only.\n")
    rows = []
    for m in spec.methods:
        for b in spec.batches_of(m):
            r = results.best.get((m.name, b))
            if r is None:
                rows.append([m.name, _tokens(b), "not run"] + ["–"] * 7)
                continue
            edge = results.edges.get((m.name, b))
            rows.append([m.name, _tokens(b), _setting(r) + (f" ({', '.join(edge)})" if edge else ""),
                         f"{r.steps_planned}", _fmt(r.steps_to_target),
                         "–" if (iv := r.steps_interval) is None else f"{iv[0]}–{iv[1]}" if iv[0] < iv[1]
                         else f"{iv[1]}", _tokens(r.tokens_to_target),
                         _fmt(r.passes_to_target, "int"), _fmt(r.wall_to_target, "s"),
                         _fmt(r.final_val_loss, "loss")])
    lines.append(_table(["method", "batch", "lr", "steps", "steps to target", "evaluated", "tokens to target",
                         "passes to target", "wall to target (s)", "final val loss"], rows))
    if results.best:
        inside = "Every best setting lies inside its grid (neither its lowest nor its highest value)."
        lines.append("\n" + (edge_note(results) or inside) + "\n")

    # --- largest batch comparison -------------------------------------------------------------------
    comparison = largest_batch_comparison(results)
    if comparison is not None:
        ref, headers, rows = comparison
        lines.append(f"\n## At the largest batch ({_tokens(spec.largest_batch)} tokens)\n")
        lines.append("Speed-ups are relative to the baseline with the fewest whole steps to target"
                     + (f" ({ref.method})" if ref is not None else "") + "; above 1 = fewer than it. "
                     f"Where a side took {FEW_STEPS} steps or fewer, the steps speed-up is followed by its "
                     "resolution bracket: that side one whole step either way (at least 1).\n")
        lines.append(_table(headers, rows))

    # --- seeds ----------------------------------------------------------------------------------------
    if results.by_seed:
        lines += _seed_sections(results)

    # --- tuning cost -----------------------------------------------------------------------------------
    if results.tuning:
        lines += tuning_section(results)

    # --- critical batch --------------------------------------------------------------------------------
    lines.append("\n## Critical batch size\n")
    lines.append("Fit of S(B) = S_min·(1 + B_noise/B) to the best whole steps to target over the "
                 "batch sizes where the target was reached (least squares on log S). B_crit = B_noise: the "
                 "batch at which a method needs twice its minimal steps (and twice its minimal tokens). "
                 "`> grid` / `< grid`: the fit runs into the edge of its search range (B_crit far above / "
                 "below the grid). `B_crit range`: the lowest and highest B_crit of the fits through every "
                 "combination of the points' interval ends (a count of s steps, evaluated after step p: "
                 f"max(p, 1) or s), what the coarse counts leave open. See `{PLOT_STEPS}`.\n")
    rows = []
    for m in spec.methods:
        fit = results.fits.get(m.name)
        npts = sum(1 for bb in spec.batch_tokens if (m.name, bb) in results.best
                   and results.best[(m.name, bb)].steps_to_target is not None)
        if fit is None:
            rows.append([m.name, "–", "–", "–", str(npts), "–",
                         "too few points (needs 2 batch sizes at target)"])
            continue
        edge = {"above": "> grid", "below": "< grid"}.get(fit.bound or "", "")
        rows.append([m.name, _fmt(fit.s_min, "steps"), _tokens(fit.b_crit) + (f" ({edge})" if edge else ""),
                     _crit_range(fit), str(fit.n_points), f"{fit.rmse_log:.3f}",
                     "exact (2 points)" if fit.n_points == 2 else ""])
    lines.append(_table(["method", "S_min (steps)", "B_crit (tokens)", "B_crit range", "points",
                         "rmse(log S)", "note"], rows))

    # --- GN diagnostics --------------------------------------------------------------------------------
    drows = []
    for m in spec.methods:
        for b in spec.batch_tokens:
            d = results.diagnostics.get((m.name, b))
            if d is None:
                continue
            drows.append([m.name, _tokens(b), str(d.steps), _fmt(d.alpha_median), f"{d.share_alpha_one:.0%}",
                          f"{d.share_at_floor:.0%}", f"{d.share_corrected:.0%}", f"{d.share_backtracked:.0%}",
                          _fmt(d.q_start_median),
                          _fmt(d.q_start_max),
                          f"{d.share_q_start_positive:.0%}", _fmt(d.rho_median), str(d.resets),
                          str(d.rejected), f"{d.passes_per_step:.1f}"])
    if drows:
        lines.append("\n## Gauss-Newton diagnostics (selected runs)\n")
        lines.append(
            "Over all outer steps of each selected GN run: the line search's chosen α (median; share of "
            "steps with α = 1 and with α at the smallest candidate of the grid; for the model search, the "
            "share of steps that also evaluated the true loss's parabola (corrected) and of steps where "
            "neither α lowered the loss, so that it was halved (backtracked)), `q_start` = the "
            "quadratic model's value minus the loss at θ_t where the warm-started inner loop began (> 0: the "
            "carried-over iterate was already worse than θ_t under the model, the drift the pilot found), "
            "ρ = actual / predicted decrease, inner-iterate resets, rejected steps, and "
            "forward+backward-equivalent passes per outer step.\n")
        lines.append(_table(["method", "batch", "steps", "α median", "α = 1", "α at floor", "corrected",
                             "backtracked",
                             "q_start median",
                             "q_start max", "q_start > 0", "ρ median", "resets", "rejected", "passes/step"],
                            drows))

    # --- plots -----------------------------------------------------------------------------------------
    lines.append("\n## Plots\n")
    lines.append(f"![validation loss at the largest batch]({PLOT_LOSS})\n")
    lines.append(f"![steps to target vs batch size]({PLOT_STEPS})\n")

    # --- all runs -------------------------------------------------------------------------------------
    lines.append("\n## All runs\n")
    lines.append(f"Every run of the sweep (also in `{RUNS_CSV}` / `{RUNS_JSON}`); ✓ = the selected "
                 "setting.\n")
    rows = []
    for r in [*results.runs, *results.seed_runs]:
        rows.append([r.method, _tokens(r.batch_tokens), _setting(r) + (
            f" (seed {r.seed})" if r in results.seed_runs else ""), r.status, "✓" if r.selected else "",
                     f"{r.steps_done}/{r.steps_planned}", _fmt(r.steps_to_target),
                     _fmt(r.final_val_loss, "loss"), _fmt(r.best_val_loss, "loss"), _fmt(r.wall_seconds, "s"),
                     _fmt(r.seconds_per_step, "g")])
    lines.append(_table(["method", "batch", "lr", "status", "best", "steps", "steps to target", "final val",
                         "best val", "wall (s)", "s/step"], rows))
    return "\n".join(lines)


#: Path-valued settings of an experiment that ``study.json`` shows relative to the working directory.
PATH_KEYS: tuple[str, ...] = ("data", "valid_data", "cache_dir", "tokenizer", "init_from")


def _relative_paths(data: dict[str, Any]) -> dict[str, Any]:
    """The experiment's file and path settings as :func:`_display_path` shows them (results get committed:
    they should not carry the absolute paths of the machine that ran them)."""
    exp = data.get("experiment")
    if isinstance(exp, dict):
        if isinstance(exp.get("path"), str):
            exp["path"] = _display_path(exp["path"])
        for table in (exp.get("base"), exp.get("warmup")):
            if isinstance(table, dict):
                for key in PATH_KEYS:
                    value = table.get(key)
                    if isinstance(value, str) and os.path.isabs(value):
                        table[key] = _display_path(value)
    return data


def write_outputs(results: StudyResults, study_dir: Path, *, plots: bool = True) -> list[Path]:
    """Write every output file into ``study_dir``; returns their paths."""
    study_dir.mkdir(parents=True, exist_ok=True)
    written = []
    write_runs_csv(results, study_dir / RUNS_CSV)
    written.append(study_dir / RUNS_CSV)
    data = _relative_paths(_json_safe(results.to_dict()))
    atomic_write_text(study_dir / RUNS_JSON, json.dumps(data["runs"] + data["seed_runs"], indent=1) + "\n")
    atomic_write_text(study_dir / STUDY_JSON, json.dumps(data, indent=1) + "\n")
    written += [study_dir / RUNS_JSON, study_dir / STUDY_JSON]
    if plots:
        plot_loss_curves(results, study_dir / PLOT_LOSS)
        plot_steps_vs_batch(results, study_dir / PLOT_STEPS)
        written += [study_dir / PLOT_LOSS, study_dir / PLOT_STEPS]
    atomic_write_text(study_dir / REPORT_MD, render_report(results))
    written.append(study_dir / REPORT_MD)
    return written
