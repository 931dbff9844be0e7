"""Run a study end to end, resumably: the shared warm start, every run of the sweep, the analysis, the report.

Layout of a study folder (``--out``, default ``runs/study-<name>``, which git ignores)::

    experiment.toml      a copy of the experiment file as last run
    study.log            the progress lines (appended)
    warmup/              the shared AdamW warm start (a normal gnopt run folder)
    runs/<method>/B<batch>/lr<lr>[-alr<adam_lr>]/     one gnopt run folder per run (init_from = warmup/)
    runs.csv, runs.json, study.json, report.md, *.png  (see gnopt.study.report)

Resuming: every run folder is inspected before it is touched. A finished run (``summary.json`` complete,
same fingerprint) is skipped; a run with a checkpoint is continued with ``resume=True`` (bitwise, see
:mod:`gnopt.train`); a run that died before its first checkpoint is started over. A folder that holds a
run with a *different* configuration (the experiment file changed after it ran) stops the study with an
error naming the fields that differ, so results are never silently mixed or replaced. ``target_loss`` is
not part of any run's configuration, so the target may change without invalidating anything.

Stopping: SIGTERM, SIGINT (Ctrl-C) or SIGHUP ask the study to stop. Every run in flight finishes its
current step and writes a checkpoint (with ``--jobs`` > 1 the study process forwards the request to its
workers, which ignore the signals themselves, also while they start up), no new run starts, the study says
which runs stopped at which step and the command that continues it (the same ``gnopt study`` command), and
exits with status 0 once every worker has exited. The same signal again stops at once (workers are killed;
their last checkpoints stay valid; exit 130). A worker never outlives the study: one whose study process
died (``kill -9``) notices within
:data:`WORKER_POLL_S` seconds, stops its run after the current step with a checkpoint and exits (at the
latest :data:`ORPHAN_GRACE_S` seconds later).

One writer per folder: the study process holds the study folder's lock (:class:`gnopt.lock.FolderLock`)
while it runs, and every run holds its run folder's, so a second ``gnopt study`` on the same folder, or a
``gnopt train --resume`` / ``--overwrite`` of one of its runs, is refused with an error naming the process
that holds it.

Progress: one line per run start and end, with the estimated time left for the whole study (and, with
``--jobs`` > 1, whose workers are quiet, a line every minute with the step each run in flight is at). The
estimate uses the measured seconds per (step × batch token) of each method's finished runs (cost grows
linearly in the batch for every method); a method without a finished run yet is estimated from the
measured ones and a rough relative-cost prior (:data:`COST_PRIORS`). With ``stop_at_target`` the estimate
counts every run's whole budget and is said as "at most": runs that reach the target stop sooner.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from gnopt.checkpoint import read_json
from gnopt.config import BASELINE_OPTIMIZERS, fingerprint, fingerprint_diff, fingerprint_fields
from gnopt.errors import GnoptError
from gnopt.lock import FolderLock
from gnopt.run_folder import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    STOP_AT_LOSS_REASON,
    SUMMARY_NAME,
    is_step,
    read_metrics,
)
from gnopt.study.analysis import StudyResults, analyse, read_curve, seed_settings
from gnopt.study.report import require_matplotlib, write_outputs
from gnopt.study.spec import (
    RunSpec,
    StudySpec,
    plan_runs,
    plan_seed_runs,
    seed_standin_settings,
    warmup_run,
)

#: Rough wall-clock cost per token relative to AdamW, measured in the ``cpu-lm`` study (``cpu-small``, 2 CPU
#: cores, two 1-thread runs side by side; GN includes the default model line search, the paper's grid search
#: costs about 2x more; Shampoo was not run there and gets SOAP's). Only used until a method has a
#: finished run of its own.
COST_PRIORS: dict[str, float] = {
    "adamw": 1.0, "muon": 1.0, "soap": 1.3, "shampoo": 1.3,
    "gn": 1.9, "gn-prox-linear": 1.9, "gn-layerwise": 5.0,
}
LOG_NAME = "study.log"
#: Seconds between a worker's checks whether its study asked it to stop or died.
WORKER_POLL_S = 0.2
#: A worker whose study process died exits at the latest this many seconds later, even in the middle of a
#: step (normally it exits as soon as its current step and checkpoint are done).
ORPHAN_GRACE_S = 600.0

Say = Callable[[str], None]


# ------------------------------------------------------------------------------------------------------
# state of one run folder
# ------------------------------------------------------------------------------------------------------


def run_action(run: RunSpec, target: float | None = None) -> str:
    """What the study must do with ``run``: ``"skip"`` (finished), ``"resume"``, ``"restart"`` or ``"start"``.

    A run that stopped at its ``stop_at_loss`` (``stop_at_target``) is finished when one of its evaluations
    is at or below ``target``; otherwise (the target moved lower, or is not known yet) it is resumed.
    Raises :class:`GnoptError` when the folder holds a run with another configuration.
    """
    out = Path(run.config.out or "")
    cfg_json = read_json(out / CONFIG_NAME)
    if not (out / CONFIG_NAME).exists():
        if (out / CHECKPOINT_NAME).exists() or (out / SUMMARY_NAME).exists():
            raise GnoptError(f"{out} holds run files but no {CONFIG_NAME}; move it away or delete it.")
        return "start"
    old = cfg_json.get("config") if isinstance(cfg_json, dict) else None
    if not isinstance(old, dict):
        raise GnoptError(f"{out / CONFIG_NAME} is unreadable; delete {out} to run it again.")
    diff = fingerprint_diff(old, fingerprint_fields(run.config))
    if diff:
        raise GnoptError(
            f"{out} holds a run of {run.label} with another configuration ({'; '.join(diff)}): the "
            "experiment file changed since it ran. Use another --out for the new study, or delete "
            f"{out} to redo the run."
        )
    summary = read_json(out / SUMMARY_NAME)
    if (isinstance(summary, dict) and summary.get("completed")
            and summary.get("fingerprint") == fingerprint(run.config)):
        return "skip"
    if (target is not None and isinstance(summary, dict) and summary.get("stop_reason") == STOP_AT_LOSS_REASON
            and summary.get("fingerprint") == fingerprint(run.config)
            and any(v <= target for _, _, v in read_curve(out).evals)):
        return "skip"
    return "resume" if (out / CHECKPOINT_NAME).exists() else "restart"


def _finished(summary: dict[str, Any]) -> bool:
    """Whether a run's summary says it is done: ran its budget, or stopped at its ``stop_at_loss``."""
    return bool(summary.get("completed", True)) or summary.get("stop_reason") == STOP_AT_LOSS_REASON


# ------------------------------------------------------------------------------------------------------
# time estimates
# ------------------------------------------------------------------------------------------------------


@dataclass
class CostModel:
    """Seconds per (step × batch token) per method, from finished runs; priors for unmeasured methods."""

    seconds: dict[str, float] = field(default_factory=dict)
    work: dict[str, float] = field(default_factory=dict)
    optimizer_of: dict[str, str] = field(default_factory=dict)

    def add(self, method: str, optimizer: str, seconds: float, steps: int, batch_tokens: int) -> None:
        if seconds > 0 and steps > 0:
            self.seconds[method] = self.seconds.get(method, 0.0) + seconds
            self.work[method] = self.work.get(method, 0.0) + steps * batch_tokens
            self.optimizer_of[method] = optimizer

    def rate(self, method: str, optimizer: str) -> float | None:
        if method in self.seconds:
            return self.seconds[method] / self.work[method]
        if not self.seconds:
            return None
        units = [self.seconds[m] / self.work[m] / COST_PRIORS.get(self.optimizer_of[m], 1.0)
                 for m in self.seconds]
        return sum(units) / len(units) * COST_PRIORS.get(optimizer, 1.0)

    def estimate(self, run: RunSpec, steps_left: int | None = None) -> float | None:
        r = self.rate(run.method, run.optimizer)
        steps = run.steps if steps_left is None else steps_left
        return None if r is None else r * steps * run.batch_tokens


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _steps_done(run: RunSpec) -> int:
    """Steps already logged by a partial run (0 when none)."""
    steps = [rec["step"] for rec in read_metrics(Path(run.config.out or "")) if is_step(rec)]
    return max(steps, default=0)


# ------------------------------------------------------------------------------------------------------
# executing runs
# ------------------------------------------------------------------------------------------------------


def _execute(cfg_dict: dict[str, Any], action: str, stop: Any = None) -> dict[str, Any]:
    """Run one training run (in the study process, or in a worker): returns its summary."""
    from gnopt.config import TrainConfig
    from gnopt.train import train

    cfg = TrainConfig(**cfg_dict)
    return train(cfg, resume=action == "resume", overwrite=action == "restart", stop=stop)


class _Worker:
    """The study-facing state of a ``--jobs`` worker process (one per process, made by :func:`_worker_init`).

    A thread polls every :data:`WORKER_POLL_S` seconds whether the study asked its workers to stop (a
    shared event) or died (this process's parent changed): then it asks the run in flight to stop after its
    current step (it checkpoints and returns), and an orphaned worker exits as soon as no run is in flight.
    """

    def __init__(self, stop_event: Any, study_pid: int) -> None:
        self.stop_event = stop_event
        self.study_pid = study_pid
        self.lock = threading.Lock()
        self.current: Any = None  # the GracefulStop of the run in flight

    def orphaned(self) -> bool:
        return os.getppid() != self.study_pid

    def reason(self) -> str | None:
        if self.orphaned():
            return "the study process ended"
        if self.stop_event.is_set():
            return "the study was stopped"
        return None

    def watch(self) -> None:
        orphaned_at: float | None = None
        while True:
            time.sleep(WORKER_POLL_S)
            reason = self.reason()
            with self.lock:
                busy = self.current is not None
                if busy and reason is not None:
                    self.current.request(reason)
            if orphaned_at is None and self.orphaned():
                orphaned_at = time.monotonic()
            if orphaned_at is not None and (not busy or time.monotonic() - orphaned_at > ORPHAN_GRACE_S):
                os._exit(0 if not busy else 1)  # nobody is left to hand a result to


_WORKER: _Worker | None = None


def _worker_init(stop_event: Any, study_pid: int) -> None:
    """Initializer of the worker processes of ``--jobs`` (see :class:`_Worker`)."""
    from gnopt.stopping import STOP_SIGNALS

    global _WORKER
    # Between runs the study process alone decides (it forwards a stop through ``stop_event``); during a
    # run the run's GracefulStop handles a signal sent to the worker itself (e.g. Ctrl-C to the terminal's
    # process group), and restores this afterwards.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked while this worker started (_stop_signals_held); a
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # signal pending since then is dropped now
    # tqdm's default lock is a multiprocessing one (a named semaphore): a worker killed at once (a second
    # signal to the study) could not release it, and Python's resource tracker would warn. Workers are quiet.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    _WORKER = _Worker(stop_event, study_pid)
    threading.Thread(target=_WORKER.watch, name="gnopt-study-watch", daemon=True).start()


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[None]:
    """Block the stop signals in this thread while it starts ``--jobs`` workers (``pool.submit``).

    A new process inherits the signal mask, so a Ctrl-C that reaches a worker while it is still starting up,
    before :func:`_worker_init` ignores it, waits (and is then dropped) instead of killing the worker, which
    would break the pool. This process still gets the signal: another thread takes it, or it is delivered
    when the mask is restored.
    """
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX
        yield
        return
    from gnopt.stopping import STOP_SIGNALS

    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _execute_in_worker(cfg_dict: dict[str, Any], action: str) -> dict[str, Any]:
    """A worker's task: the run, stoppable by the study (``{"started": False}``: the study stopped first)."""
    from gnopt.stopping import GracefulStop

    worker = _WORKER
    assert worker is not None, "_execute_in_worker runs in the workers of StudyRunner._run_parallel"
    stop = GracefulStop(announce=False)
    with worker.lock:
        if worker.reason() is not None:
            return {"completed": False, "started": False}
        worker.current = stop
    try:
        return _execute(cfg_dict, action, stop)
    finally:
        with worker.lock:
            worker.current = None


def study_command() -> str:
    """The command that continues this study: the ``gnopt study`` command of this process, unchanged."""
    argv = sys.argv[1:]
    if argv[:1] == ["study"]:
        return shlex.join(["gnopt", *argv])
    return "the same `gnopt study` command"


@dataclass
class StudyOptions:
    """How ``gnopt study`` runs (none of these change what a run computes)."""

    out: Path
    threads: int | None = None
    jobs: int = 1
    only: Sequence[str] | None = None
    quiet: bool = False  # no per-evaluation lines from the training loop
    plots: bool = True
    progress_every: float = 60.0  # --jobs > 1: seconds between "at step s/S" lines for the runs in flight


class StudyRunner:
    """Executes the plan of a :class:`StudySpec` into a study folder; see the module docstring."""

    def __init__(self, spec: StudySpec, options: StudyOptions, *, say: Say | None = None) -> None:
        if options.jobs < 1:
            raise GnoptError(f"--jobs must be >= 1, got {options.jobs}.")
        if options.threads is not None and options.threads < 1:
            raise GnoptError(f"--threads must be >= 1, got {options.threads}.")
        self.spec = spec
        self.opt = options
        self.out = options.out.resolve()
        self.warmup = warmup_run(spec, self.out)
        self.runs = plan_runs(spec, self.out, only=options.only)
        self.all_runs = plan_runs(spec, self.out)
        # The seed runs ([experiment] seeds) re-run each method's best setting at the largest batch, which
        # only the finished sweep knows: until then these stand-ins (each method's first setting) count
        # them in the plan and the time estimate.
        self.seed_standins = plan_seed_runs(spec, self.out, seed_standin_settings(spec), only=options.only)
        self._later: list[RunSpec] = list(self.seed_standins)
        self.cost = CostModel()
        #: stop_at_target: the target runs stop at (None: not known yet, or the option is off)
        self.target: float | None = None
        self._say = say
        self._log_fh: Any = None
        self.t0 = time.perf_counter()

    # ---------------------------------------------------------------- output
    def say(self, msg: str) -> None:
        line = f"[study {self.spec.name}] {msg}"
        if self._say is not None:
            self._say(line)
        else:
            with contextlib.suppress(OSError):  # the terminal hung up (SIGHUP): study.log still gets it
                print(line, flush=True)
        if self._log_fh is not None:
            self._log_fh.write(time.strftime("%Y-%m-%d %H:%M:%S ") + line + "\n")
            self._log_fh.flush()

    def _config(self, run: RunSpec, threads: int | None, quiet: bool) -> dict[str, Any]:
        cfg = run.config
        if threads is not None:
            cfg = dataclasses.replace(cfg, threads=threads)
        cfg = dataclasses.replace(cfg, quiet=quiet, stop_at_loss=self.stop_loss(run))
        return cfg.to_dict()

    # ---------------------------------------------------------------- stop_at_target
    def _stops_at_target(self, run: RunSpec) -> bool:
        """With ``stop_at_target``: every run but the warm-up and the runs that set an ``"auto"`` target."""
        return self.spec.stop_at_target and run.method != "warmup" and not self.spec.defines_target(run)

    def stop_loss(self, run: RunSpec) -> float | None:
        """The ``stop_at_loss`` ``run`` gets: the target with ``stop_at_target`` (once it is known), except
        for the runs that set an ``"auto"`` target, which always run to the end."""
        return self.target if self._stops_at_target(run) else None

    def refresh_target(self) -> None:
        """With ``stop_at_target``: settle the target runs stop at, the declared one or, once every run that
        sets an ``"auto"`` target has finished, the auto target (until then None: runs start unstopped)."""
        if not self.spec.stop_at_target:
            return
        if self.spec.target_loss is not None:
            self.target = self.spec.target_loss
            return
        defining = [r for r in self.all_runs if self.spec.defines_target(r)]
        if self.target is None and defining and all(run_action(r) == "skip" for r in defining):
            self.target = analyse(self.spec, self.out, self.all_runs, self.warmup).target_loss
            if self.target is not None:
                self.say(f"target {self.target:.4f} (auto, from the {len(defining)} baseline runs at the "
                         "largest batch): every other run stops at its first evaluation at or below it")

    def _reached(self, idx: int, n: int, run: RunSpec, action: str) -> bool:
        """A run planned for resumption before the target was known, that turns out to have stopped at or
        below it (``stop_at_target``: the target is settled while the study runs); says so."""
        reached = (action == "resume" and self.stop_loss(run) is not None
                   and run_action(run, self.target) == "skip")
        if reached:
            self.say(f"run {idx}/{n} {run.label}: already at the target {self.target}, skipped")
        return reached

    def _waits_for_target(self, run: RunSpec, running: Sequence[RunSpec]) -> bool:
        """With ``stop_at_target`` and an ``"auto"`` target not known yet: whether ``run``, which is to stop
        at the target, must wait for the runs in flight that set it. Started now it would run unstopped, to
        the end of its budget, and a run that had stopped at the target of an earlier pass (before a wider
        grid added a run that sets it) would be continued to its end: work that the target, once known,
        makes useless. Waiting leaves at most the slots beside the last target runs idle until they end."""
        return (self.target is None and self._stops_at_target(run)
                and any(self.spec.defines_target(r) for r in running))

    def _ordered(self, pending: list[tuple[int, RunSpec, str]]) -> list[tuple[int, RunSpec, str]]:
        """With ``stop_at_target``: the runs that set the target first, then the baselines' other runs, then
        the GN methods' (which gain the most from stopping at a known target); else the plan's order."""
        if not self.spec.stop_at_target:
            return pending
        return sorted(pending, key=lambda p: (not self.spec.defines_target(p[1]),
                                              p[1].optimizer not in BASELINE_OPTIMIZERS))

    # ---------------------------------------------------------------- plan / status
    def actions(self) -> list[tuple[RunSpec, str]]:
        """(run, action) for the warm-up and every planned run; checks every folder before any work."""
        self.refresh_target()
        return [(self.warmup, run_action(self.warmup))] + [(r, run_action(r, self.target)) for r in self.runs]

    def _seed_costs(self, actions: Sequence[tuple[RunSpec, str]]) -> None:
        for run, action in actions:
            if action == "skip":
                s = read_json(Path(run.config.out or "") / SUMMARY_NAME)
                if isinstance(s, dict) and isinstance(s.get("wall_seconds"), (int, float)):
                    self.cost.add(run.method, run.optimizer, float(s["wall_seconds"]), int(s.get("steps", 0)),
                                  run.batch_tokens)

    def eta(self, pending: Sequence[RunSpec], current: Sequence[RunSpec] = ()) -> float | None:
        """Estimated seconds for ``pending`` runs plus the rest of ``current`` ones, divided over the jobs."""
        total = 0.0
        for r in list(pending) + list(current) + self._later:
            left = r.steps - _steps_done(r)
            e = self.cost.estimate(r, max(left, 0))
            if e is None:
                return None
            total += e
        return total / self.opt.jobs

    def _eta_text(self, eta: float | None) -> str:
        """``eta`` as the progress lines say it. With ``stop_at_target`` it is an upper bound: it counts every
        run's whole budget, and a run that reaches the target stops sooner by an amount no one knows yet."""
        if eta is not None and self.spec.stop_at_target:
            return f"at most {_duration(eta)}"
        return _duration(eta)

    def dry_run(self) -> list[tuple[RunSpec, str]]:
        """Print the plan (and the estimate where runs have been measured; for the ``45m`` / ``150m``
        presets also an estimate in GPU-hours from the measured GPU costs); runs nothing, reads no data."""
        from gnopt.study.estimate import GPU_PRESETS, format_estimate

        acts = self.actions()
        self._seed_costs(acts)
        todo = [r for r, a in acts if a != "skip"]
        n_all = len(acts) - 1 + len(self.seed_standins)
        for i, (r, a) in enumerate(acts):
            self._say_planned(f"{i}/{len(acts) - 1}", r, a)
        if self.seed_standins and not todo:  # the sweep is done: its best settings name the seed runs
            seed_acts = self._seed_actions()
            for k, (r, a) in enumerate(seed_acts):
                self._say_planned(f"{len(acts) + k}/{n_all}", r, a)
            seeds_todo = [r for r, a in seed_acts if a != "skip"]
            self._later = seeds_todo  # what eta() adds to the sweep's runs
        else:
            for k, r in enumerate(self.seed_standins):
                est = self.cost.estimate(r)
                self.say(f"{len(acts) + k}/{n_all} after the sweep: {r.method} B={r.batch_tokens} at its "
                         f"best setting, seed {r.seed}: {r.steps} steps = {r.steps * r.batch_tokens:,} tokens"
                         + (f", ~{_duration(est)}" if est is not None else ""))
            seeds_todo = list(self.seed_standins)
        tokens = sum(r.steps * r.batch_tokens for r in todo + seeds_todo)
        self.say(f"{len(todo) + len(seeds_todo)} of {len(acts) + len(self.seed_standins)} runs to do"
                 + (f" (at most; {len(seeds_todo)} seed runs)" if self.seed_standins and todo else "")
                 + f", {tokens:,} training tokens; estimated {self._eta_text(self.eta(todo))}"
                 + ("" if self.cost.seconds else " (no measured run yet)"))
        preset = self.warmup.config.preset
        if todo and preset in GPU_PRESETS:
            for line in format_estimate(todo, preset):
                self.say(line)
        return acts

    # ---------------------------------------------------------------- the study
    def run(self) -> StudyResults | None:
        """Run (or continue) the study, then write the outputs; returns the analysed results, or None when
        the study was stopped (SIGTERM / SIGINT / SIGHUP: see the module docstring) before every run was
        done."""
        from gnopt.stopping import GracefulStop

        if self.opt.plots:
            require_matplotlib()  # fail now, not after hours of training
        stop = GracefulStop(message="the runs in flight finish their current step and write a checkpoint, "
                            "then the study stops (send it again to stop at once, without checkpoints).")
        lock = FolderLock(self.out, "the study folder")
        with stop.installed(), contextlib.ExitStack() as held:
            if self.out.is_dir():
                held.enter_context(lock)  # before reading the run folders: nobody may change them meanwhile
            acts = self.actions()
            self.out.mkdir(parents=True, exist_ok=True)
            if not lock.held:
                held.enter_context(lock)
                acts = self.actions()  # another study may have started here since
            shutil.copyfile(self.spec.path, self.out / "experiment.toml")
            self._log_fh = (self.out / LOG_NAME).open("a", encoding="utf-8")
            try:
                return self._run(acts, stop)
            finally:
                logging.getLogger("gnopt.data").setLevel(logging.NOTSET)
                self._log_fh.close()
                self._log_fh = None

    def _run(self, acts: Sequence[tuple[RunSpec, str]], stop: Any) -> StudyResults | None:
        self._seed_costs(acts)
        n_seed = len(self.seed_standins)
        n = len(acts) - 1 + n_seed
        total = len(acts) + n_seed
        n_todo = sum(a != "skip" for _, a in acts)
        self.say(f"{total} runs (warm-up + {len(acts) - 1}" + (f" + {n_seed} seed runs" if n_seed else "")
                 + f"), {len(acts) - n_todo} already finished, {n_todo} to do"
                 + (" before the seed runs" if n_seed else "") + f"; output {self.out}")
        stopped: list[tuple[int, RunSpec, int]] = []  # (index, run, step it stopped at)
        finished = len(acts) - n_todo
        warm_action = acts[0][1]
        if warm_action != "skip" and not stop.requested:
            # The warm-up runs alone, so it gets the cores of all --jobs workers: jobs x threads (with
            # --jobs 1, --threads or torch's default).
            warm_threads = ((self.opt.threads or 1) * self.opt.jobs if self.opt.jobs > 1
                            else self.opt.threads)
            rest = [r for r, a in acts[1:] if a != "skip"]
            summary = self._run_one(0, n, self.warmup, warm_action, rest, warm_threads, stop)
            if _finished(summary):
                finished += 1
            else:
                stopped.append((0, self.warmup, int(summary.get("steps") or 0)))
        pending = self._ordered([(i + 1, r, a) for i, (r, a) in enumerate(acts[1:]) if a != "skip"])
        for i, (r, a) in enumerate(acts[1:]):
            if a == "skip":
                self.say(f"run {i + 1}/{n} {r.label}: finished earlier, skipped")
        if not (stopped or stop.requested):  # else the warm-up stopped: every run starts from it
            done, stopped = self._run_pending(pending, n, stop)
            finished += done
        if not stopped and finished == len(acts) and n_seed:
            seed_acts = self._seed_actions()
            self._later = []
            # a method with no finished run at the largest batch has no seed runs
            total = len(acts) + len(seed_acts)
            for i, (r, a) in enumerate(seed_acts):
                if a == "skip":
                    finished += 1
                    self.say(f"run {len(acts) + i}/{n} {r.label}: finished earlier, skipped")
            pending = [(len(acts) + i, r, a) for i, (r, a) in enumerate(seed_acts) if a != "skip"]
            if pending and not stop.requested:
                done, stopped = self._run_pending(pending, n, stop)
                finished += done
        if stopped or finished < total:
            self._say_stopped(stop.reason or "a run was stopped", stopped, finished, total)
            return None
        self.say(f"all runs done in {_duration(time.perf_counter() - self.t0)}; writing the report")
        return self.report()

    def _say_planned(self, index: str, r: RunSpec, action: str) -> None:
        """One line of the dry-run plan: the run, what will be done with it, its estimated time."""
        est = self.cost.estimate(r, r.steps - _steps_done(r)) if action != "skip" else None
        self.say(f"{index} {action:7s} {r.label}: {r.steps} steps of {r.config.n_micro} micro-batches = "
                 f"{r.steps * r.batch_tokens:,} tokens" + (f", ~{_duration(est)}" if est is not None else "")
                 + f" -> {r.rel}")

    def _seed_actions(self) -> list[tuple[RunSpec, str]]:
        """The seed runs of the finished sweep (each method's best setting at the largest batch, as the
        report selects it) and what to do with each."""
        results = analyse(self.spec, self.out, self.all_runs, self.warmup)
        settings = seed_settings(self.spec, results.best)
        runs = plan_seed_runs(self.spec, self.out, settings, only=self.opt.only)
        chosen = ", ".join(f"{m} lr={lr:g}" + (f" adam_lr={alr:g}" if alr is not None else "")
                           for m, (lr, alr) in settings.items() if not self.opt.only or m in self.opt.only)
        self.say(f"sweep done; seed runs at B={self.spec.seed_batch} with seeds "
                 f"{', '.join(map(str, self.spec.extra_seeds))} of the best settings (target "
                 f"{results.target_loss if results.target_loss is not None else 'undetermined'}): {chosen}")
        self.refresh_target()
        return [(r, run_action(r, self.target)) for r in runs]

    def _run_pending(self, pending: Sequence[tuple[int, RunSpec, str]], n: int,
                     stop: Any) -> tuple[int, list[tuple[int, RunSpec, int]]]:
        """Run ``pending`` (index, run, action) one at a time or on ``--jobs`` workers; returns the number of
        runs finished and the runs stopped (index, run, step)."""
        if self.opt.jobs > 1:
            return self._run_parallel(pending, n, stop)
        finished, stopped = 0, []
        for k, (idx, r, a) in enumerate(pending):
            if stop.requested:
                break
            if self._reached(idx, n, r, a):
                finished += 1
                continue
            summary = self._run_one(idx, n, r, a, [p[1] for p in pending[k + 1:]], self.opt.threads, stop)
            if not _finished(summary):
                stopped.append((idx, r, int(summary.get("steps") or 0)))
                break
            finished += 1
        return finished, stopped

    def _say_stopped(self, reason: str, stopped: Sequence[tuple[int, RunSpec, int]], finished: int,
                     total: int) -> None:
        n = total - 1
        where = ", ".join(f"run {i}/{n} {r.label} at step {s}/{r.steps}" for i, r, s in stopped)
        self.say(f"study stopped ({reason}) after {_duration(time.perf_counter() - self.t0)}: "
                 + (f"{where} (checkpointed); " if stopped else "")
                 + f"{finished} of {total} runs finished (warm-up included), {total - finished} to do")
        self.say(f"continue with: {study_command()} (the report is written when every run is done; "
                 "--report-only writes one of the finished runs now)")

    def _start_line(self, idx: int, n: int, run: RunSpec, action: str, rest: Sequence[RunSpec]) -> None:
        verb = {"start": "start", "resume": f"resume at step {_steps_done(run)}",
                "restart": "restart"}[action]
        eta = self.eta(rest, [run])
        self.say(f"run {idx}/{n} {verb} {run.label}: {run.steps} steps x {run.config.n_micro} micro-batches "
                 f"| elapsed {_duration(time.perf_counter() - self.t0)}, study ETA {self._eta_text(eta)}")

    def _end_line(self, idx: int, n: int, run: RunSpec, summary: dict[str, Any], rest: Sequence[RunSpec],
                  running: Sequence[RunSpec] = ()) -> None:
        wall = float(summary.get("wall_seconds") or 0.0)
        steps = int(summary.get("steps") or 0)
        self.cost.add(run.method, run.optimizer, wall, steps, run.batch_tokens)
        final = summary.get("final_val_loss")
        final_s = f"{final:.4f}" if isinstance(final, float) else "not finite"
        at_target = summary.get("stop_reason") == STOP_AT_LOSS_REASON
        if self.target is None:
            self.refresh_target()
        eta = self.eta(rest, running)
        self.say(f"run {idx}/{n} done {run.label}: {steps} steps in {_duration(wall)} "
                 f"({wall / max(steps, 1):.2f} s/step), "
                 + (f"stopped at the target with val loss {final_s}" if at_target
                    else f"final val loss {final_s}")
                 + f" | elapsed {_duration(time.perf_counter() - self.t0)}, study ETA {self._eta_text(eta)}")

    def _stopped_line(self, idx: int, n: int, run: RunSpec, summary: dict[str, Any]) -> None:
        why = summary.get("stop_reason")
        self.say(f"run {idx}/{n} {run.label} stopped at step {summary.get('steps')}/{run.steps}"
                 + (f" ({why})" if why else "") + "; checkpoint written")

    def _run_one(self, idx: int, n: int, run: RunSpec, action: str, rest: Sequence[RunSpec],
                 threads: int | None, stop: Any) -> dict[str, Any]:
        """Run one run in this process; returns its summary (``completed`` False: it was stopped)."""
        self._start_line(idx, n, run, action, rest)
        summary = _execute(self._config(run, threads, self.opt.quiet), action, stop)
        # Every run reads the same corpus: after the first one, "data: cache hit ..." is noise.
        logging.getLogger("gnopt.data").setLevel(logging.WARNING)
        if _finished(summary):
            self._end_line(idx, n, run, summary, rest)
        else:
            self._stopped_line(idx, n, run, summary)
        return summary

    def _run_parallel(self, pending: Sequence[tuple[int, RunSpec, str]], n: int,
                      stop: Any) -> tuple[int, list[tuple[int, RunSpec, int]]]:
        """Run ``pending`` on ``jobs`` worker processes (each with ``threads`` threads, quiet); returns the
        number of runs finished and the runs stopped (index, run, step)."""
        queue = list(pending)
        threads = self.opt.threads or 1
        ctx = get_context("spawn")
        stop_event = ctx.Event()  # set: every worker stops its run after the current step
        stop.on_request = lambda reason: stop_event.set()
        if stop.requested:
            stop_event.set()
        running: dict[Future[dict[str, Any]], tuple[int, RunSpec]] = {}
        finished, stopped = 0, []
        halt = False  # a run stopped by a signal to its worker alone: start no new run
        waiting_said = False
        pool = ProcessPoolExecutor(max_workers=self.opt.jobs, mp_context=ctx, initializer=_worker_init,
                                   initargs=(stop_event, os.getpid()))
        try:
            while queue or running:
                while queue and len(running) < self.opt.jobs and not (halt or stop.requested):
                    if self._waits_for_target(queue[0][1], [v[1] for v in running.values()]):
                        if not waiting_said:
                            self.say(f"run {queue[0][0]}/{n} {queue[0][1].label} waits for the runs that set "
                                     "the target (started now, it would run unstopped)")
                            waiting_said = True
                        break
                    idx, r, a = queue.pop(0)
                    if self._reached(idx, n, r, a):
                        finished += 1
                        continue
                    self._start_line(idx, n, r, a, [q[1] for q in queue])
                    with _stop_signals_held():  # the pool may start a worker here
                        fut = pool.submit(_execute_in_worker, self._config(r, threads, True), a)
                    running[fut] = (idx, r)
                if not running:
                    break
                done, _ = wait(list(running), timeout=self.opt.progress_every, return_when=FIRST_COMPLETED)
                if not done:  # the workers are quiet: say where they are
                    where = "; ".join(f"run {i}/{n} {r.label} at step {_steps_done(r)}/{r.steps}"
                                      for i, r in running.values())
                    eta = self.eta([q[1] for q in queue], [v[1] for v in running.values()])
                    self.say(f"{where} | elapsed {_duration(time.perf_counter() - self.t0)}, study ETA "
                             f"{self._eta_text(eta)}")
                for fut in done:
                    idx, r = running.pop(fut)
                    summary = fut.result()  # a worker's GnoptError / bug surfaces here
                    if summary.get("started") is False:
                        continue  # the stop came before the run began
                    if not _finished(summary):
                        self._stopped_line(idx, n, r, summary)
                        stopped.append((idx, r, int(summary.get("steps") or 0)))
                        halt = True
                        continue
                    finished += 1
                    self._end_line(idx, n, r, summary, [q[1] for q in queue],
                                   [v[1] for v in running.values()])
        except BaseException as exc:
            stop_event.set()  # the runs in flight checkpoint and stop
            if isinstance(exc, KeyboardInterrupt):  # stop at once: the last checkpoints stay valid
                # (ProcessPoolExecutor has no public way to kill its workers before Python 3.14)
                for proc in list((getattr(pool, "_processes", None) or {}).values()):
                    with contextlib.suppress(OSError):
                        proc.kill()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            stop.on_request = None
        return finished, stopped

    # ---------------------------------------------------------------- outputs
    def report(self, *, target_loss: float | None = None, report_dir: Path | None = None) -> StudyResults:
        """Analyse every planned run of the experiment (not only ``--only``) and write the outputs into
        ``report_dir`` (default: the study folder)."""
        results = analyse(self.spec, self.out, self.all_runs, self.warmup, target_loss=target_loss)
        report_dir = self.out if report_dir is None else report_dir
        written = write_outputs(results, report_dir, plots=self.opt.plots)
        done = sum(r.done for r in results.runs)
        tl = f"{results.target_loss:.4f}" if results.target_loss is not None else "undetermined"
        self.say(f"report: {done}/{len(results.runs)} runs finished, target loss {tl} "
                 f"({results.target_source}); wrote {', '.join(p.name for p in written)} in {report_dir}")
        return results


def default_out(spec: StudySpec) -> Path:
    """``runs/study-<name>`` under the current directory (``runs/`` is git-ignored)."""
    return Path("runs") / f"study-{spec.name}"


def run_study(spec: StudySpec, options: StudyOptions, *, say: Say | None = None) -> StudyResults | None:
    """Convenience wrapper: ``StudyRunner(spec, options).run()``."""
    return StudyRunner(spec, options, say=say).run()

