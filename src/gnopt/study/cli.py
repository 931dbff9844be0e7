"""The ``gnopt study EXPERIMENT.toml`` subcommand (registered by :mod:`gnopt.cli`).

This module only imports argparse at import time, so building the ``gnopt`` parser stays cheap.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path
from typing import Any

from gnopt.errors import GnoptError


def add_study_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``study`` subparser to ``gnopt``'s subparsers action."""
    p: argparse.ArgumentParser = sub.add_parser(
        "study", help="run a declared experiment end to end (resumable), then write its report",
        description="Run every run an experiment file declares (the shared warm start, then each method × "
        "batch size × learning rate), skipping finished runs and resuming interrupted ones; then write "
        "runs.csv, runs.json, study.json, report.md and the plots into the study folder.",
    )
    p.add_argument("experiment", metavar="EXPERIMENT.toml", help="the experiment file (see experiments/)")
    p.add_argument("--out", metavar="DIR", help="study folder (default: runs/study-<experiment name>)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch threads per run (default: every core; with --jobs: 1)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="runs at once, each in its own worker process (default 1)")
    p.add_argument("--only", action="append", metavar="METHOD",
                   help="run only this method (repeatable, or comma-separated); the warm-up runs if needed "
                   "and the report covers every finished run")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: analyse the finished runs and write the outputs")
    p.add_argument("--target-loss", type=float, metavar="LOSS",
                   help="with --report-only: analyse at this target instead of the experiment's; the outputs "
                   "go to <study folder>/target-LOSS unless --report-dir says otherwise")
    p.add_argument("--report-dir", metavar="DIR",
                   help="with --report-only: write the outputs here instead of the study folder")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate; run nothing")
    p.add_argument("--quiet", action="store_true",
                   help="print only the study's progress lines, not every run's evaluations")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots (no matplotlib needed)")
    return p


def cmd_study(ns: argparse.Namespace) -> int:
    """Handler of ``gnopt study``; returns the exit status."""
    from gnopt.study.report import summary_text
    from gnopt.study.runner import StudyOptions, StudyRunner, default_out
    from gnopt.study.spec import load_spec

    spec = load_spec(ns.experiment)
    only: list[str] | None = None
    if ns.only:
        only = [name.strip() for item in ns.only for name in item.split(",") if name.strip()]
        for name in only:
            spec.method(name)  # unknown name -> GnoptError listing the methods
    if ns.report_only and ns.dry_run:
        raise GnoptError("--report-only and --dry-run contradict each other; pass only one.")
    if (ns.target_loss is not None or ns.report_dir) and not ns.report_only:
        raise GnoptError("--target-loss and --report-dir only apply to --report-only (a re-analysis of "
                         "finished runs); add --report-only.")
    if ns.target_loss is not None and not (math.isfinite(ns.target_loss) and ns.target_loss > 0):
        raise GnoptError(f"--target-loss must be a positive finite loss, got {ns.target_loss}")
    out = Path(ns.out) if ns.out else default_out(spec)
    options = StudyOptions(out=out, threads=ns.threads, jobs=ns.jobs, only=only, quiet=ns.quiet,
                           plots=not ns.no_plots)
    runner = StudyRunner(spec, options)
    if ns.dry_run:
        runner.dry_run()
        return 0
    if ns.report_only:
        report_dir = Path(ns.report_dir) if ns.report_dir else (
            out / f"target-{ns.target_loss:g}" if ns.target_loss is not None else None)
        with contextlib.ExitStack() as held:
            if report_dir is None and out.is_dir():  # the study's own outputs: not while it writes them
                from gnopt.lock import FolderLock

                held.enter_context(FolderLock(out, "the study folder"))
            runner.actions()  # refuse folders that hold other configurations
            if report_dir is not None and report_dir.exists() and not report_dir.is_dir():
                raise GnoptError(f"--report-dir {report_dir} exists and is not a folder")
            results = runner.report(target_loss=ns.target_loss, report_dir=report_dir)
        print(summary_text(results, report_dir or out))
        return 0
    results = runner.run()
    if results is not None:  # None: stopped before every run was done (it said how to continue)
        print(summary_text(results, out))
    return 0
