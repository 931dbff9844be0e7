"""Claims in whole steps: a method is credited only with the outer steps it took (issue 24).

A study whose evaluations put GN at 2 whole steps and the defining baseline (Muon) at 12: its speed-up is
12 / 2 = 6.0x with the resolution bracket [4.0x–12.0x] in the report, ``study.json`` and the seed table,
although the interpolated count (GN crosses the target a third of the way into its second step) would say
9.0x. Built from run folders written by hand (no training).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gnopt.config import fingerprint
from gnopt.study.analysis import analyse
from gnopt.study.report import write_outputs
from gnopt.study.spec import load_spec, plan_runs, plan_seed_runs, warmup_run

EXPERIMENT = """
[experiment]
batch_tokens = [512]
steps = { 512 = 18 }
eval_every = 1
seeds = [0, 1]
target_fraction = 0.6666666666666666

[base]
preset = "tiny"
tokenizer = "bytes"
micro_batch_size = 4

[methods.muon]
lr = [0.02]
adam_lr = 1e-3

[methods.gn]
lr = [0.02]
adam_lr = 1e-3
"""


def _write_run(folder: Path, cfg: object, losses: list[float], passes_per_step: float) -> None:
    """A finished run's folder: config, summary and metrics with one evaluation per listed loss (step 0..)."""
    folder.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(cfg)  # type: ignore[arg-type]
    (folder / "config.json").write_text(json.dumps({"fingerprint": fp, "config": {}}))
    lines = []
    for step, v in enumerate(losses):
        if step:
            lines.append(json.dumps({"step": step, "tokens": 512 * step, "loss": v, "passes": passes_per_step,
                                     "wall": 2.0 * step}))
        lines.append(json.dumps({"type": "eval", "step": step, "tokens": 512 * step, "val_loss": v}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    steps = len(losses) - 1
    (folder / "summary.json").write_text(json.dumps({
        "fingerprint": fp, "completed": True, "steps": steps, "final_val_loss": losses[-1],
        "tokens": 512 * steps, "passes": passes_per_step * steps, "wall_seconds": 2.0 * steps}))


def _muon(shift: float) -> list[float]:
    # 4 - s/12 at every step: exactly 3.0 at step 12 (2/3 of 18 steps: the auto target) and above before
    return [4.0 - s / 12 + (shift if s else 0.0) for s in range(19)]


#: GN: 3.5 after step 1, 2.0 after step 2: the target 3.0 is crossed a third of the way into step 2
GN = [4.0, 3.5, 2.0] + [1.9] * 16


def test_speedup_in_whole_steps_with_its_bracket(tmp_path: Path) -> None:
    path = tmp_path / "exp.toml"
    path.write_text(EXPERIMENT, encoding="utf-8")
    spec = load_spec(path)
    out = tmp_path / "study"
    runs = plan_runs(spec, out)
    warm = warmup_run(spec, out)
    _write_run(out / warm.rel, warm.config, [5.0, 4.0], 2.0)
    for r in runs:
        _write_run(out / r.rel, r.config, _muon(0.0) if r.method == "muon" else GN,
                   2.0 if r.method == "muon" else 10.0)
    for r in plan_seed_runs(spec, out, {"muon": (0.02, 1e-3), "gn": (0.02, 1e-3)}):
        _write_run(out / r.rel, r.config, _muon(0.0) if r.method == "muon" else GN,
                   2.0 if r.method == "muon" else 10.0)
    results = analyse(spec, out, runs, warm)
    assert results.target_loss == 3.0 and results.target_source == "auto"
    gn = results.best[("gn", 512)]
    assert gn.steps_to_target == 2 and gn.steps_to_target_interp == pytest.approx(4 / 3)
    write_outputs(results, out, plots=False)

    # the report: the comparison at the largest batch and the seed table
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| gn | 0.02 / 0.001 | 2 | 6.00x [4.00x–12.00x] | 20 | 1.20x |" in report
    assert "| gn: speed-up over the best baseline (steps to target) | 6.00 [4.00–12.00] | " \
           "6.00 [4.00–12.00] | 6.00 [6.00–6.00] | 4.00–12.00 |" in report
    assert "| gn | 0.02 / 0.001 | 2 | 2 | 2 [2–2] |" in report  # seed table: whole steps per seed
    assert "9.00" not in report and "1.3" not in report.split("## All runs")[0]

    # study.json: 12 / 2 whole steps, not 12 / 1.33 interpolated
    study = json.loads((out / "study.json").read_text())
    sp = {s["method"]: s for s in study["largest_batch"]["speedups"]}
    assert study["largest_batch"]["reference"] == "muon"
    assert sp["gn"]["steps"] == 2 and sp["gn"]["reference_steps"] == 12
    assert sp["gn"]["steps_speedup"] == pytest.approx(6.0)
    assert sp["gn"]["steps_bracket"] == pytest.approx([4.0, 12.0])
    assert sp["gn"]["passes_speedup"] == pytest.approx(24.0 / 20.0)
    assert sp["muon"]["steps_speedup"] == pytest.approx(1.0) and sp["muon"]["steps_bracket"] is None
    ratios = {(r["numerator"], r["denominator"], r["metric"]): r for r in study["seeds"]["ratios"]}
    steps = ratios[("best baseline", "gn", "steps")]
    assert steps["per_seed"] == {"0": pytest.approx(6.0), "1": pytest.approx(6.0)}
    assert steps["median"] == pytest.approx(6.0)
    assert steps["resolution"]["min"] == pytest.approx(4.0)
    assert steps["resolution"]["max"] == pytest.approx(12.0)
    assert ratios[("best baseline", "gn", "passes")]["resolution"] is None
    assert getattr(gn, "steps_interval", None) == (1, 2)  # crossed after its evaluation at step 1


def test_brackets_and_intervals() -> None:
    from gnopt.study.analysis import steps_interval, steps_ratio_bracket

    assert steps_ratio_bracket(12, 2) == (4.0, 12.0)
    assert steps_ratio_bracket(14, 3) == pytest.approx((3.5, 7.0))
    assert steps_ratio_bracket(12, 1) == (6.0, 12.0)  # one whole step is the fewest possible
    assert steps_ratio_bracket(3, 2) == pytest.approx((2 / 3, 4.0))  # both sides few
    assert steps_ratio_bracket(12, 6) is None
    assert steps_interval(8, 2) == (6, 8) and steps_interval(3, 1) == (2, 3)
    assert steps_interval(1, 1) == (1, 1)
    assert steps_interval(7, 2) == (6, 7)  # the last step is evaluated off the grid
    assert steps_interval(16, 0) == (1, 16)  # evaluated only at the start and the end


def test_critical_batch_range_spans_the_fits_through_the_interval_ends() -> None:
    from gnopt.study.analysis import fit_critical_batch_range

    batches = [65536, 262144, 1048576]
    fit = fit_critical_batch_range(batches, [8, 3, 2], [(6, 8), (2, 3), (1, 2)])
    assert fit is not None and fit.b_crit_low is not None and fit.b_crit_high is not None
    assert fit.b_crit_low <= fit.b_crit <= fit.b_crit_high
    # the ends are the extreme fits: the steepest combination (8, 2, 1) and the flattest (6, 3, 2)
    steep = fit_critical_batch_range(batches, [8, 3, 1], [(8, 8), (3, 3), (1, 1)])
    flat = fit_critical_batch_range(batches, [6, 3, 2], [(6, 6), (3, 3), (2, 2)])
    assert steep is not None and flat is not None
    assert fit.b_crit_high >= steep.b_crit and fit.b_crit_low <= flat.b_crit
    assert steep.b_crit_low == steep.b_crit_high == steep.b_crit  # no interval: no range
