"""The map across sizes: GN's speed-up over the best baseline against B / B_crit(best baseline), and what
tuning cost every method, from the committed results of every study (``docs/results/<study>/``).

    python experiments/size_map.py            # -> docs/results/size-map.png, size-map.csv, tuning-cost.csv

It reads only the files the studies wrote (``study.json``, ``runs.csv``); it runs nothing. A point of the
map is one batch size B of one study where GN (the ``gn`` method: the library's defaults) and at least one
baseline reached the study's target: its speed-up is the fewest whole steps, or passes, to target of any
baseline at B divided by GN's (whole steps: the outer steps taken up to the first evaluation at or below the
target, the study analysis's count; where a side took few steps the ratio carries the analysis's resolution
bracket, one step either way: ``speedup_steps_low`` / ``_high``, the bars of the map); its x is B over
the critical batch size (the S(B) fit of its study) of the study's best baseline: the one with the fewest
whole steps at the largest batch where a baseline reached the target, ties by the lower final loss (a study
whose fit of it has no finite B_crit inside the fit's range is left out). The paper's
points are placed from the numbers its text gives (``PAPER_POINTS``); nothing is fitted.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from gnopt.study.analysis import steps_ratio_bracket

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
BASELINES = ("adamw", "muon", "soap", "shampoo")

#: (study folder, label on the map)
STUDIES: tuple[tuple[str, str], ...] = (
    ("cpu", "tiny, bytes, 37K params (cpu)"),
    ("cpu-cost", "tiny, bytes, 37K params (cpu-cost)"),
    ("cpu-lm", "cpu-small, BPE, 1.4M params (cpu-lm)"),
    ("cpu-lm-batch", "cpu-small, BPE, 1.4M params (cpu-lm-batch)"),
)

#: The paper's headline (arXiv 2510.09378, 150M, target 3.25): GN 54 steps against SOAP's 292 = 5.4x. Its
#: abstract gives no batch size; the project's design notes give the baselines' critical batch size as
#: 4-12M tokens, and a reviewer's reading of the paper's Figure 1 puts the baselines at 40M tokens per step
#: (docs/results/cpu-lm-batch.md, "The map"). So the point is drawn as a range of x, 40M / 12M .. 40M / 4M,
#: at y = 5.4, and is only as good as those two second-hand numbers: (label, x_low, x_high, speed-up).
PAPER_POINTS: list[tuple[str, float, float, float]] = [
    ("paper, 150M, vs SOAP (batch and B_crit second-hand)", 40 / 12, 40 / 4, 292 / 54)]


def _f(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def map_points(study: str, data: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per batch size where GN and a baseline reached the target.

    y: the fewest steps (passes) to target of any baseline at B over GN's. x: B over the critical batch size
    of the study's best baseline, the one with the fewest steps to target at the largest batch where a
    baseline reached it (the baseline of the claims tables). One reference per study keeps x monotone in B:
    the best baseline at each B can flip between near-ties whose fits differ several-fold (``cpu-lm-batch``
    at 64K: SOAP and Muon at 22 whole steps each; their B_crit fits differ several-fold). A study whose
    reference has no finite B_crit inside its fit's range gives no points."""
    best = {(b["method"], b["batch_tokens"]): b for b in data["best"]}

    def rank(r: dict[str, Any]) -> tuple[float, float]:  # the analysis's best-setting order
        return (r["steps_to_target"], _f(r.get("final_val_loss")) or math.inf)
    fits = data.get("critical_batch", {})

    def baselines_at(b: int) -> list[dict[str, Any]]:
        return [r for (m, bb), r in best.items() if bb == b and r["optimizer"] in BASELINES
                and _f(r["steps_to_target"]) is not None]

    reached = [b for b in data["experiment"]["batch_tokens"] if baselines_at(b)]
    if not reached:
        return []
    ref = min(baselines_at(max(reached)), key=rank)["method"]
    fit = fits.get(ref) or {}
    b_crit = _f(fit.get("b_crit"))
    if b_crit is None or b_crit <= 0 or fit.get("bound"):
        return []
    out = []
    for b in data["experiment"]["batch_tokens"]:
        gn = best.get(("gn", b))
        base = baselines_at(b)
        if gn is None or not _f(gn["steps_to_target"]) or not base:
            continue
        by_steps = min(base, key=rank)
        b_steps, g_steps = by_steps["steps_to_target"], gn["steps_to_target"]
        low, high = steps_ratio_bracket(b_steps, g_steps) or (b_steps / g_steps, b_steps / g_steps)
        passes = min(r["passes_to_target"] for r in base if _f(r["passes_to_target"]) is not None)
        out.append({
            "study": study, "batch_tokens": b, "reference_baseline": ref, "b_crit": b_crit,
            "b_over_bcrit": b / b_crit, "best_baseline": by_steps["method"],
            "baseline_steps": b_steps, "gn_steps": g_steps, "speedup_steps": b_steps / g_steps,
            "speedup_steps_low": low, "speedup_steps_high": high,
            "speedup_passes": passes / gn["passes_to_target"],
        })
    return out


def tuning_rows(study: str, runs_csv: Path) -> list[dict[str, Any]]:
    """Per method and batch of a study's sweep (its first seed): settings, settings reaching the target, the
    spread of whole steps to target, and the passes of the whole grid had every run stopped at the target."""
    with runs_csv.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    seeds = [int(r.get("seed") or 0) for r in rows]  # older studies have no seed column: one seed
    seed0 = min(seeds, default=0)
    groups: dict[tuple[str, int], list[dict[str, str]]] = {}
    for r, seed in zip(rows, seeds, strict=True):
        if seed == seed0 and r["status"] in ("done", "stopped"):
            groups.setdefault((r["method"], int(r["batch_tokens"])), []).append(r)
    out = []
    for (method, b), rs in groups.items():
        steps = sorted(s for r in rs if (s := _f(r["steps_to_target"])) is not None)
        to_target = sum(_f(r["passes_to_target"]) or _f(r["passes"]) or 0.0 for r in rs)
        best = [r for r in rs if r["selected"] == "True"]
        best_passes = _f(best[0]["passes_to_target"]) if best else None
        out.append({
            "study": study, "method": method, "batch_tokens": b, "settings": len(rs), "reached": len(steps),
            "steps_min": steps[0] if steps else None,
            "steps_median": statistics.median(steps) if steps else None,
            "steps_max": steps[-1] if steps else None, "grid_passes_to_target": to_target,
            "best_passes": best_passes,
            "grid_over_best": to_target / best_passes if best_passes else None,
        })
    return out


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5.0), sharex=True)
    markers = {"cpu": "o", "cpu-cost": "s", "cpu-lm": "^", "cpu-lm-batch": "D"}
    labels = dict(STUDIES)
    for ax, key, what in ((axes[0], "speedup_steps", "steps"), (axes[1], "speedup_passes", "passes")):
        for study, _ in STUDIES:
            pts = [p for p in points if p["study"] == study]
            if pts:
                xs, ys = [p["b_over_bcrit"] for p in pts], [p[key] for p in pts]
                if key == "speedup_steps":  # the resolution bracket of a ratio with a few-step side
                    yerr = [[y - p["speedup_steps_low"] for p, y in zip(pts, ys, strict=True)],
                            [p["speedup_steps_high"] - y for p, y in zip(pts, ys, strict=True)]]
                    ax.errorbar(xs, ys, yerr=yerr, marker=markers[study], linestyle="-", capsize=3,
                                label=labels[study])
                else:
                    ax.plot(xs, ys, marker=markers[study], linestyle="-", label=labels[study])
        if key == "speedup_steps":
            for label, x_low, x_high, y in PAPER_POINTS:
                ax.plot([x_low, x_high], [y, y], color="black", linewidth=2.5)
                ax.plot([(x_low * x_high) ** 0.5], [y], marker="*", markersize=14, color="black",
                        linestyle="none", label=label)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("B / B_crit of the study's best baseline")
        ax.set_ylabel(f"GN speed-up over the best baseline ({what} to target)"
                      + (" [bar: one step either way]" if key == "speedup_steps" else ""))
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=2)  # below the panels: no point hidden
    fig.suptitle("GN's advantage against how far the batch is past the baselines' critical batch size")
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    points: list[dict[str, Any]] = []
    tuning: list[dict[str, Any]] = []
    for study, _ in STUDIES:
        folder = RESULTS / study
        if not (folder / "study.json").is_file():
            print(f"{study}: no results in {folder.relative_to(ROOT)} (yet); skipped")
            continue
        points += map_points(study, json.loads((folder / "study.json").read_text(encoding="utf-8")))
        tuning += tuning_rows(study, folder / "runs.csv")
    for p in points:
        print(f"{p['study']:>13} B={p['batch_tokens']:>8} best baseline {p['best_baseline']:>5} "
              f"B/B_crit({p['reference_baseline']}) {p['b_over_bcrit']:6.2f} "
              f"speed-up steps {p['baseline_steps']}/{p['gn_steps']} = {p['speedup_steps']:5.2f}x "
              f"[{p['speedup_steps_low']:.2f}-{p['speedup_steps_high']:.2f}] "
              f"passes {p['speedup_passes']:5.2f}x")
    _write_csv(RESULTS / "size-map.csv", points)
    _write_csv(RESULTS / "tuning-cost.csv", tuning)
    if points:
        plot(points, RESULTS / "size-map.png")
    print("wrote docs/results/size-map.csv, size-map.png, tuning-cost.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
