"""Re-derive a committed study's report from its committed ``runs.csv`` alone, with the study package's own
analysis (whole steps to target, resolution brackets, B_crit ranges): the same code a live study runs.

    python benchmarks/rederive_reports.py                 # every study under docs/results/
    python benchmarks/rederive_reports.py cpu-lm-batch    # one study

A committed study keeps its ``runs.csv`` and ``study.json`` but not its run folders, so the evaluation
history (the curves) is gone. What a row still holds is enough for every number the report compares: the
whole steps to target (``steps_to_target``: the step of the first evaluation at or below the target), the
tokens, passes and wall seconds at that step, the final loss. What this script takes from elsewhere:

* the experiment (methods, grids, budgets, seeds, evaluation cadence) from the experiment file that
  ``study.json`` names, checked against ``study.json``'s own record of it (a mismatch stops the script);
* the target loss from ``study.json`` (an ``"auto"`` target needs the curves to be recomputed);
* each run's previous evaluation (the low end of its whole-step interval) from the cadence the study ran
  with, ``eval_every = ceil(steps_planned / evals_per_run)`` (or the declared ``eval_every``): the rule of
  the code that ran these studies, checked against every row (a count that is not a multiple of it, and not
  the run's last step, stops the script);
* the GN line-search diagnostics (computed from curves) are copied from ``study.json`` as recorded.

It rewrites ``report.md``, ``study.json``, ``runs.csv`` and ``steps_to_target_vs_batch.png`` in the study's
folder; ``val_loss_largest_batch.png`` (drawn from the curves) is left as it is. The report then opens with
a note that says so.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
STUDIES = ("cpu", "cpu-cost", "cpu-lm", "cpu-lm-batch")

from gnopt.checkpoint import atomic_write_text  # noqa: E402
from gnopt.study.analysis import (  # noqa: E402
    RUN_COLUMNS,
    GNDiagnostics,
    RunResult,
    StudyResults,
    critical_batch_fits,
    grid_edges,
    largest_batch_speedups,
    seed_ratios,
    select_best,
    tuning_costs,
)
from gnopt.study.report import (  # noqa: E402
    PLOT_STEPS,
    REPORT_MD,
    RUNS_CSV,
    STUDY_JSON,
    _json_safe,
    _relative_paths,
    plot_steps_vs_batch,
    render_report,
    write_runs_csv,
)
from gnopt.study.spec import StudySpec, load_spec  # noqa: E402

NOTE = ("> **Re-derived from the committed `runs.csv`** (issue 24) by `python benchmarks/rederive_reports.py "
        "{name}`: the run folders are gone, so this report was rendered by the study package from the rows "
        "alone, in whole steps to target. The target loss is the one the study set; the GN diagnostics are "
        "copied from the earlier `study.json`; the validation-loss plot is the study's own (drawn from the "
        "curves).\n")

_INT = {"batch_tokens", "n_micro", "seed", "steps_planned", "steps_done", "steps_to_target",
        "tokens_to_target", "tokens"}
_STR = {"method", "optimizer", "status", "run_dir"}


def _value(key: str, raw: str) -> Any:
    if key in _STR:
        return raw
    if key == "selected":
        return raw == "True"
    if raw in ("", "None"):
        return None
    if key in _INT:
        return int(float(raw))
    x = float(raw)
    return x if math.isfinite(x) else None


def eval_every(spec: StudySpec, steps_planned: int) -> int:
    """The evaluation cadence the committed studies ran with (see the module docstring)."""
    if spec.eval_every is not None:
        return spec.eval_every
    assert spec.evals_per_run is not None
    return max(1, math.ceil(steps_planned / spec.evals_per_run))


def row_result(row: dict[str, str], spec: StudySpec) -> RunResult:
    """One ``runs.csv`` row as the analysis's :class:`RunResult` (no curve; ``previous_eval`` from the
    cadence). An older ``runs.csv`` without a ``seed`` column ran the ``[base]`` seed."""
    values = {k: _value(k, row[k]) for k in RUN_COLUMNS if k in row}
    values.setdefault("seed", spec.base_seed)
    r = RunResult(**values)  # type: ignore[arg-type]
    s = r.steps_to_target
    if s is not None:
        e = eval_every(spec, r.steps_planned)
        if s % e and s != r.steps_done:
            raise SystemExit(f"{r.run_dir}: {s} steps to target is not on its evaluation cadence ({e})")
        r.previous_eval = ((s - 1) // e) * e if s > 0 else None
    return r


def _check_spec(spec: StudySpec, recorded: dict[str, Any]) -> None:
    mine = spec.to_dict()
    for key in ("batch_tokens", "budget", "evals_per_run", "eval_every", "target_fraction", "seeds"):
        if key in recorded and mine[key] != recorded[key]:
            raise SystemExit(f"{spec.name}: the experiment file's {key} {mine[key]!r} differs from the one "
                             f"study.json recorded, {recorded[key]!r}")
    names = [(m["name"], m["lr"], m["adam_lr"]) for m in mine["methods"]]
    were = [(m["name"], m["lr"], m["adam_lr"]) for m in recorded["methods"]]
    if names != were:
        raise SystemExit(f"{spec.name}: the experiment file's methods {names} differ from study.json's "
                         f"{were}")


def _diagnostics(recorded: dict[str, Any]) -> GNDiagnostics:
    """A recorded GN diagnostics entry; a field an older study did not record is NaN, which the report
    shows as `nan` (not recorded; :func:`rederive` writes it as `n/r`)."""
    got = {f.name: recorded.get(f.name) for f in fields(GNDiagnostics)}
    return GNDiagnostics(**{k: (math.nan if v is None and k.startswith("share_") else v)
                            for k, v in got.items()})


def rederive(folder: Path, *, plots: bool = True) -> StudyResults:
    """Re-render ``folder``'s report, study.json and runs.csv from its runs.csv (see the module doc)."""
    old = json.loads((folder / STUDY_JSON).read_text(encoding="utf-8"))
    spec = load_spec(ROOT / old["experiment"]["path"])
    _check_spec(spec, old["experiment"])
    with (folder / RUNS_CSV).open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    sweep_dirs = {r["run_dir"] for r in old["runs"]}
    results = [row_result(r, spec) for r in rows if r["run_dir"] in sweep_dirs]
    seed_results = [row_result(r, spec) for r in rows if r["run_dir"] not in sweep_dirs]
    for r in results + seed_results:
        r.selected = False
    best = select_best(results)
    for r in best.values():
        r.selected = True
    by_seed: dict[str, dict[int, RunResult]] = {}
    if seed_results:
        for m in spec.methods:
            if (sel := best.get((m.name, spec.seed_batch))) is not None:
                by_seed[m.name] = {sel.seed: sel}
        for r in seed_results:
            by_seed.setdefault(r.method, {})[r.seed] = r
    diagnostics = {(d["method"], d["batch_tokens"]): _diagnostics(d) for d in old["gn_diagnostics"]}
    seed_diag = {(d["method"], d["seed"]): _diagnostics(d)
                 for d in (old.get("seeds") or {}).get("gn_diagnostics", [])}
    warm = row_result({k: str(v) for k, v in old["warmup"].items()}, spec) if old.get("warmup") else None
    out = StudyResults(spec=spec, target_loss=old["target_loss"], target_source=old["target_source"],
                       runs=results, best=best, fits=critical_batch_fits(spec, best), warmup=warm,
                       diagnostics=diagnostics, seed_runs=seed_results, by_seed=by_seed,
                       ratios=seed_ratios(spec, by_seed) if by_seed else [], seed_diagnostics=seed_diag,
                       edges=grid_edges(results, best), tuning=tuning_costs(spec, results),
                       speedups=largest_batch_speedups(spec, best)[1])
    write_runs_csv(out, folder / RUNS_CSV)
    data = _relative_paths(_json_safe(out.to_dict()))
    data["rederived_from_runs_csv"] = True
    atomic_write_text(folder / STUDY_JSON, json.dumps(data, indent=1) + "\n")
    if plots:
        plot_steps_vs_batch(out, folder / PLOT_STEPS)
    report = render_report(out).replace("nan%", "n/r")
    head, _, rest = report.partition("\n\n")
    atomic_write_text(folder / REPORT_MD, head + "\n\n" + NOTE.format(name=folder.name) + "\n" + rest)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("studies", nargs="*", default=list(STUDIES), help="folders under docs/results/")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    for name in args.studies:
        res = rederive(RESULTS / name, plots=not args.no_plots)
        for s in res.speedups:
            print(f"{name}: {s.method} at {res.spec.largest_batch}: {s.steps} vs {s.reference_steps} "
                  f"({s.reference}) steps -> {s.steps_speedup} {s.steps_bracket}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
