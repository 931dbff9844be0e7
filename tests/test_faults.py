"""Faults: ``kill -9`` (also in the middle of a checkpoint write) then ``--resume``; SIGTERM / SIGINT;
non-finite values injected into GN inner steps, the GN line search and baseline gradients; two writers on
one folder; a parallel study stopped by a signal or killed."""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import read_metrics

import gnopt.train as train_mod
from gnopt.checkpoint import TEST_WRITE_DELAY_ENV, load_checkpoint
from gnopt.cli import main
from gnopt.config import TrainConfig, to_toml
from gnopt.errors import GnoptError
from gnopt.lock import LOCK_NAME, FolderLock

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12


def gn_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    """A tiny GN run (the stepper with the most state: θ, θ̂, inner Muon/AdamW state, schedule)."""
    return ["train", "--data", str(corpus), "--preset", "tiny", "--tokenizer", "bytes", "--optimizer", "gn",
            "--steps", str(STEPS), "--batch-tokens", "256", "--micro-batch-size", "4", "--eval-every", "3",
            "--eval-tokens", "1024", "--threads", "1", "--ckpt-every", "1", "--quiet", "--out", str(out),
            *extra]


def losses(out: Path) -> list[tuple[Any, ...]]:
    return [(r.get("type", "step"), r["step"], r.get("tokens"), r.get("loss"), r.get("val_loss"),
             r.get("alpha")) for r in read_metrics(out)]


@pytest.fixture(scope="module")
def reference(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run (in this process; same thread count as the subprocesses)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(gn_args(corpus, out)) == 0
    return out


def spawn(args: list[str], **env: str) -> subprocess.Popen[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    full_env.update(PYTHONPATH=str(ROOT / "src"), **env)
    return subprocess.Popen([sys.executable, "-m", "gnopt", *args], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen[str], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.communicate()[1][-2000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def temp_files(out: Path) -> list[Path]:
    return sorted(out.glob(".checkpoint.pt.*.tmp"))


def kill9(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow  # faster: test_train's atomic write and crash-resume tests, and the kill -9 + resume below
def test_kill_9_anywhere_then_resume_equals_the_uninterrupted_run(corpus: Path, tmp_path: Path,
                                                                 reference: Path) -> None:
    out = tmp_path / "run"
    delay = {TEST_WRITE_DELAY_ENV: "0.15"}  # test hook: 0.15 s between a checkpoint's write and rename

    # 1. killed in the middle of a checkpoint write (its temporary file exists, the rename has not happened)
    proc = spawn(gn_args(corpus, out), **delay)
    wait_for(lambda: (out / "checkpoint.pt").exists() and bool(temp_files(out)), proc,
             "a second checkpoint write")
    kill9(proc)
    assert temp_files(out), "the kill should have landed inside the write"
    step1 = load_checkpoint(out / "checkpoint.pt")["counters"]["step"]  # the previous checkpoint is intact
    assert step1 >= 1

    # 2. resumed, then killed at a random moment (seeded), writes still slowed so some kills land in them
    proc = spawn(gn_args(corpus, out, "--resume"), **delay)
    wait_for(lambda: not temp_files(out), proc, "the resume to clean the stale temporary file")
    wait_for(lambda: load_checkpoint_step(out) > step1, proc, "a checkpoint after the resume")
    time.sleep(random.Random(20240611).uniform(0.0, 0.6))
    assert proc.poll() is None, "the run finished before the random kill"
    kill9(proc)
    step2 = load_checkpoint(out / "checkpoint.pt")["counters"]["step"]
    assert step1 < step2 < STEPS

    # 3. resumed to the end: exactly the uninterrupted run's losses, no step logged twice or missing
    assert main(gn_args(corpus, out, "--resume")) == 0
    assert losses(out) == losses(reference)
    s_ref = json.loads((reference / "summary.json").read_text())
    s_out = json.loads((out / "summary.json").read_text())
    assert s_out["final_val_loss"] == s_ref["final_val_loss"] and s_out["tokens"] == s_ref["tokens"]
    assert not temp_files(out)


def load_checkpoint_step(out: Path) -> int:
    try:
        return int(load_checkpoint(out / "checkpoint.pt")["counters"]["step"])
    except Exception:  # absent, or (never, with atomic writes) unreadable
        return -1


# SIGINT takes the same path as SIGTERM (one GracefulStop handler; test_a_second_signal_... covers what
# differs): slow.
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])
def test_sigterm_or_sigint_checkpoints_exits_0_and_resumes_exactly(
        corpus: Path, tmp_path: Path, reference: Path, sig: signal.Signals) -> None:
    out = tmp_path / "run"
    proc = spawn(gn_args(corpus, out, "--ckpt-every", "0"))  # no checkpoint but the one the signal asks for
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 3, proc, "two steps")
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-2000:]
    assert f"{sig.name} received" in stderr
    stopped = int(stdout.split("stopped at step ")[1].split()[0])
    assert "resume with: gnopt train --data" in stdout
    assert stdout.rstrip().splitlines()[-2].endswith("--resume")
    assert 1 <= stopped < STEPS
    assert load_checkpoint(out / "checkpoint.pt")["counters"]["step"] == stopped
    assert max(r["step"] for r in read_metrics(out)) == stopped
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] is False and summary["steps"] == stopped

    assert main(gn_args(corpus, out, "--ckpt-every", "0", "--resume")) == 0
    assert losses(out) == losses(reference)


def test_a_second_signal_of_the_same_kind_interrupts_at_once() -> None:
    """Ctrl-C twice aborts; torchrun's SIGTERM after a Ctrl-C (SIGINT) does not spoil the checkpoint."""
    stop = train_mod.GracefulStop(announce=False)
    assert not stop.requested
    stop._handle(signal.SIGINT, None)
    assert stop.requested and stop.signal_name == "SIGINT"
    stop._handle(signal.SIGTERM, None)  # ignored
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)


# ------------------------------------------------------------------------------------------------------
# non-finite values
# ------------------------------------------------------------------------------------------------------


def poison(monkeypatch: pytest.MonkeyPatch, bad: set[int]) -> list[dict[str, torch.Tensor]]:
    """Make micro-batches number ``bad`` (0-based, in the order drawn) give NaN model outputs, and record
    the weights after every optimizer step (returned list, one entry per step)."""
    from gnopt.data import TokenBatcher

    real_next, drawn = TokenBatcher.__next__, [0]

    def next_batch(self: TokenBatcher) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = real_next(self)
        if drawn[0] in bad:
            x._gnopt_poison = True  # type: ignore[attr-defined]
        drawn[0] += 1
        return x, y

    def nan_outputs(module: torch.nn.Module, args: tuple[Any, ...],
                    output: torch.Tensor) -> torch.Tensor | None:
        return output * float("nan") if getattr(args[0], "_gnopt_poison", False) else None

    import gnopt.model

    real_build, real_stepper = gnopt.model.build_model, train_mod.build_stepper

    def build_model(*args: Any, **kwargs: Any) -> torch.nn.Module:
        model = real_build(*args, **kwargs)
        model.register_forward_hook(nan_outputs)
        return model

    snapshots: list[dict[str, torch.Tensor]] = []

    def build_stepper(cfg: Any, model: torch.nn.Module) -> Any:
        stepper = real_stepper(cfg, model)
        real_step = stepper.step

        def step(batches: Any) -> dict[str, Any]:
            rec = real_step(batches)
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
            return rec

        stepper.step = step  # type: ignore[method-assign]
        return stepper

    monkeypatch.setattr(TokenBatcher, "__next__", next_batch)
    monkeypatch.setattr(gnopt.model, "build_model", build_model)
    monkeypatch.setattr(train_mod, "build_stepper", build_stepper)
    return snapshots


def all_finite(params: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params.values())


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("optimizer,ls_kind", [("gn", "grid"), ("gn-prox-linear", "grid"), ("gn", "model")])
def test_gn_nonfinite_inner_step_and_line_search_never_corrupt_theta(
        corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        optimizer: str, ls_kind: str) -> None:
    # grid: N = 2 inner + 2 line-search micro-batches per step, step s draws 4s .. 4s+3 (0-based s);
    # model: 2 inner + ⌈2/8⌉ = 1 line-search micro-batch, step s draws 3s .. 3s+2.
    # Step 1: its 2nd inner micro-batch is bad; step 2: its 1st line-search one.
    snaps = poison(monkeypatch, bad={1, 6} if ls_kind == "grid" else {1, 5})
    out = tmp_path / "run"
    args = gn_args(corpus, out, "--optimizer", optimizer, "--steps", "4", "--ckpt-every", "0",
                   "--ls-kind", ls_kind)
    args.remove("--quiet")
    assert main(args) == 0
    printed = capsys.readouterr().out
    steps = [r for r in read_metrics(out) if "type" not in r]
    assert [r["inner_nonfinite"] for r in steps] == [1, 0, 0, 0]
    assert [r["rejected"] for r in steps] == [False, True, False, False]
    assert steps[0]["alpha"] is not None  # the skipped inner update did not stop the outer step
    assert "step 1: 1 inner step(s) met non-finite values and were skipped." in printed
    assert "step 2: no finite line-search loss; outer step rejected (weights unchanged)." in printed
    assert all(all_finite(s) for s in snaps)
    assert same(snaps[1], snaps[0]) and not same(snaps[2], snaps[1])  # θ kept at step 2, training goes on
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rejected_steps"] == 1 and summary["nonfinite_inner_steps"] == 1
    assert summary["final_val_loss"] < summary["initial_val_loss"]


@pytest.mark.parametrize("skip", [True, False])
def test_baseline_skips_a_nonfinite_gradient_when_asked(corpus: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, skip: bool) -> None:
    snaps = poison(monkeypatch, bad={2})  # 2 micro-batches per step: the first of step 2
    out = tmp_path / "run"
    args = gn_args(corpus, out, "--optimizer", "adamw", "--steps", "3", "--ckpt-every", "0")
    assert main([*args, "--skip-nonfinite" if skip else "--no-skip-nonfinite"]) == 0
    steps = [r for r in read_metrics(out) if "type" not in r]
    if skip:
        assert [r["skipped"] for r in steps] == [0, 1, 0]
        assert all(all_finite(s) for s in snaps)
        assert same(snaps[1], snaps[0]) and not same(snaps[2], snaps[1])
        assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 1
    else:  # asked not to skip: the NaN reaches the weights (the documented --no-skip-nonfinite behaviour)
        assert [r["skipped"] for r in steps] == [0, 0, 0]
        assert all_finite(snaps[0]) and not all_finite(snaps[1])


# ------------------------------------------------------------------------------------------------------
# one writer per folder
# ------------------------------------------------------------------------------------------------------


def lock_holder(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None


def one_error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("gnopt: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_folder_lock_is_exclusive_names_its_holder_and_leaves_no_file(tmp_path: Path) -> None:
    with FolderLock(tmp_path, "the run folder") as held:
        assert held.held and lock_holder(tmp_path)["pid"] == os.getpid()  # type: ignore[index]
        in_use = f"the run folder {tmp_path} is in use by process {os.getpid()} "
        with pytest.raises(GnoptError, match=in_use):
            FolderLock(tmp_path, "the run folder").acquire()  # flock: exclusive between open files as well
    assert not (tmp_path / LOCK_NAME).exists()
    (tmp_path / LOCK_NAME).write_text("{torn")  # left by a process killed while it wrote its details
    with FolderLock(tmp_path) as held:
        assert held.held and lock_holder(tmp_path)["pid"] == os.getpid()  # type: ignore[index]


def test_two_writers_on_one_run_folder_are_refused_and_a_stale_lock_does_not_block(
        corpus: Path, tmp_path: Path, reference: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    proc = spawn(gn_args(corpus, out), **{TEST_WRITE_DELAY_ENV: "0.2"})  # slow steps: time to try
    wait_for(lambda: load_checkpoint_step(out) >= 1, proc, "a checkpoint")
    for extra in ("--resume", "--overwrite"):
        msg = one_error_line(capsys, gn_args(corpus, out, extra))
        assert f"the run folder {out} is in use by process {proc.pid} (gnopt train --data" in msg, msg
        assert (out / "checkpoint.pt").is_file() and (out / "config.json").is_file()  # nothing deleted
    assert proc.poll() is None, "the run ended before the second writers were refused"
    kill9(proc)
    assert lock_holder(out)["pid"] == proc.pid  # type: ignore[index]  # a stale lock file ...
    assert main(gn_args(corpus, out, "--resume")) == 0  # ... blocks nothing: the kernel dropped the lock
    assert losses(out) == losses(reference) and not (out / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------------------
# a study stopped by a signal, or orphaned: its runs checkpoint, no process is left, it continues exactly
# ------------------------------------------------------------------------------------------------------

MINI_STUDY = """
[experiment]
batch_tokens = [256]
budget_tokens = 4096              # 16 steps
target_loss = "auto"
evals_per_run = 4

[base]
preset = "tiny"
tokenizer = "bytes"
micro_batch_size = 4
eval_tokens = 512
ckpt_every = 1

[warmup]
lr = 3e-3

[methods.adamw]
lr = [1e-3, 3e-3]

[methods.gn]
lr = [0.01]
adam_lr = 1e-3
"""
#: runs.csv columns that a continued study must reproduce exactly (not wall times)
RESULT_COLUMNS = ("method", "lr", "steps_planned", "steps_done", "status", "selected", "target_loss",
                  "steps_to_target", "steps_to_target_interp", "tokens_to_target", "passes_to_target",
                  "final_val_loss", "best_val_loss", "initial_val_loss", "tokens", "passes")


def study_args(exp: Path, out: Path, jobs: int) -> list[str]:
    return ["study", str(exp), "--out", str(out), "--jobs", str(jobs), "--threads", "1", "--no-plots",
            "--quiet"]


def results(out: Path) -> list[dict[str, str]]:
    with (out / "runs.csv").open(encoding="utf-8") as fh:
        return [{k: row[k] for k in RESULT_COLUMNS} for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def mini_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The experiment file and its uninterrupted study (in this process, one run at a time)."""
    folder = tmp_path_factory.mktemp("mini-study")
    exp = folder / "mini.toml"
    exp.write_text(MINI_STUDY, encoding="utf-8")
    assert main(study_args(exp, folder / "reference", 1)) == 0
    rows = results(folder / "reference")
    assert [r["status"] for r in rows] == ["done"] * 3 and any(r["steps_to_target"] for r in rows)
    return exp, folder / "reference"


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not yet reaped by its new parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def runs_in_flight(out: Path, min_steps: int = 2) -> list[Path]:
    """Run folders whose worker holds the lock and has logged ``min_steps`` steps (no summary yet)."""
    found = []
    for folder in sorted(out.glob("runs/*/B*/*")):
        metrics = folder / "metrics.jsonl"
        if (lock_holder(folder) is not None and not (folder / "summary.json").exists() and metrics.exists()
                and sum('"type"' not in line for line in metrics.read_text().splitlines()) >= min_steps):
            found.append(folder)
    return found


@pytest.fixture
def started() -> Iterator[list[int]]:
    """PIDs a test started: any of them still running when it ends (it failed) is killed."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def spawn_study_until_two_runs_fly(exp: Path, out: Path,
                                   started: list[int]) -> tuple[subprocess.Popen[str], list[Path], list[int]]:
    proc = spawn(study_args(exp, out, 2), **{TEST_WRITE_DELAY_ENV: "0.15"})  # >= 0.15 s per step
    started.append(proc.pid)
    wait_for(lambda: len(runs_in_flight(out)) == 2, proc, "two runs in flight", timeout=180)
    flying = runs_in_flight(out)
    holders = [lock_holder(f) for f in flying]
    assert all(h is not None and h["parent_pid"] == proc.pid for h in holders), holders  # the study's workers
    workers = [int(h["pid"]) for h in holders]  # type: ignore[index]
    started.extend(workers)
    assert len(set(workers)) == 2 and all(alive(pid) for pid in workers)
    return proc, flying, workers


def checkpointed_where_stopped(folder: Path, reason: str) -> int:
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["completed"] is False and summary["stop_reason"] == reason, summary
    step = int(summary["steps"])
    assert 2 <= step < summary["steps_planned"]
    assert load_checkpoint_step(folder) == step == max(r["step"] for r in read_metrics(folder))
    assert not (folder / LOCK_NAME).exists()
    return step


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_stops_a_parallel_study_cleanly_and_it_continues_exactly(
        tmp_path: Path, mini_study: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
        started: list[int]) -> None:
    exp, reference = mini_study
    out = tmp_path / "study"
    proc, flying, workers = spawn_study_until_two_runs_fly(exp, out, started)
    # while it runs, nobody else may write its folders
    msg = one_error_line(capsys, study_args(exp, out, 1))
    assert f"the study folder {out} is in use by process {proc.pid} (gnopt study {exp}" in msg, msg
    cfg = TrainConfig(**json.loads((flying[0] / "config.json").read_text())["config"])
    (tmp_path / "run.toml").write_text(to_toml(cfg), encoding="utf-8")
    msg = one_error_line(capsys, ["train", "--config", str(tmp_path / "run.toml"), "--resume"])
    in_use = f"the run folder {flying[0]} is in use by process {workers[0]} (a worker of process {proc.pid}, "
    assert in_use + "gnopt study" in msg and f"(kill -TERM {proc.pid}: it checkpoints" in msg, msg
    with pytest.raises(GnoptError, match=re.escape(in_use)):
        train_mod.train(cfg, overwrite=True)
    assert proc.poll() is None, "the study ended before the signal"

    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "SIGTERM received: the runs in flight finish their current step" in stderr
    assert not [pid for pid in workers if alive(pid)], "a worker outlived the study"
    steps = [checkpointed_where_stopped(f, "the study was stopped") for f in flying]
    last = stdout.rstrip().splitlines()
    assert "study stopped (SIGTERM)" in last[-2] and "1 of 4 runs finished" in last[-2]
    for step in steps:
        assert f" at step {step}/16" in last[-2] and f"stopped at step {step}/16" in stdout
    assert last[-1].startswith(f"[study mini] continue with: gnopt study {exp} --out {out} --jobs 2")
    assert not (out / LOCK_NAME).exists() and not (out / "runs.csv").exists()

    # running it again continues it (one run at a time here: quicker to start, and --jobs changes no result):
    # the stopped runs resume, and the results are the uninterrupted study's
    code = main(study_args(exp, out, 1))
    printed = capsys.readouterr().out
    assert code == 0 and printed.count("resume at step") == 2 and "all runs done" in printed
    assert results(out) == results(reference)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_of_a_killed_study_checkpoint_and_exit_by_themselves(
        tmp_path: Path, mini_study: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
        started: list[int]) -> None:
    exp, reference = mini_study
    out = tmp_path / "study"
    proc, flying, workers = spawn_study_until_two_runs_fly(exp, out, started)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL  # (not communicate(): the workers share its pipes)
    t0 = time.monotonic()
    while [pid for pid in workers if alive(pid)]:
        assert time.monotonic() - t0 < 30, "the workers of a killed study are still running after 30 s"
        time.sleep(0.05)
    proc.communicate(timeout=30)
    for folder in flying:
        checkpointed_where_stopped(folder, "the study process ended")
    assert lock_holder(out)["pid"] == proc.pid  # type: ignore[index]  # the dead study's stale lock ...
    assert main(study_args(exp, out, 1)) == 0  # ... blocks nothing
    printed = capsys.readouterr().out
    assert printed.count("resume at step") == 2
    assert results(out) == results(reference)


def test_a_signal_stops_a_one_process_study_after_a_step(tmp_path: Path, mini_study: tuple[Path, Path],
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capfd: pytest.CaptureFixture[str]) -> None:
    import gnopt.study.runner as runner

    exp, reference = mini_study
    out = tmp_path / "study"
    real = runner._execute

    def signalled_in_run_2(cfg: dict[str, Any], action: str, stop: Any = None) -> dict[str, Any]:
        if cfg["lr"] == 3e-3 and cfg["optimizer"] == "adamw" and "warmup" not in cfg["out"]:
            os.kill(os.getpid(), signal.SIGHUP)  # e.g. the terminal closed
        return real(cfg, action, stop)

    monkeypatch.setattr(runner, "_execute", signalled_in_run_2)
    assert main(study_args(exp, out, 1)) == 0
    captured = capfd.readouterr()
    assert "SIGHUP received" in captured.err
    last = captured.out.rstrip().splitlines()
    assert "run 2/3 adamw B=256 lr=0.003 stopped at step 1/16 (SIGHUP)" in captured.out
    assert "study stopped (SIGHUP)" in last[-2] and "2 of 4 runs finished" in last[-2]
    assert "continue with: " in last[-1] and "all runs done" not in captured.out
    assert not (out / "runs" / "gn").exists()  # no run started after the signal
    monkeypatch.undo()
    assert main(study_args(exp, out, 1)) == 0
    assert "resume at step 1 adamw B=256 lr=0.003" in capfd.readouterr().out
    assert results(out) == results(reference)


def _spawned_workers(pid: int) -> list[int]:
    """PIDs of the multiprocessing ``spawn`` workers among the children of process ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_while_the_workers_start_stops_the_study_gracefully(tmp_path: Path,
                                                                  started: list[int]) -> None:
    """Ctrl-C reaches the terminal's whole process group: here while the ``--jobs`` workers are still
    starting up (importing), before they could set their own signal handling. They must not die of it (a
    dead worker breaks the pool: a ``BrokenProcessPool`` traceback); the study stops as after any Ctrl-C."""
    exp = tmp_path / "mini.toml"
    exp.write_text(MINI_STUDY, encoding="utf-8")
    out = tmp_path / "study"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env.update(PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "gnopt", *study_args(exp, out, 2)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    started.append(proc.pid)
    wait_for(lambda: bool(_spawned_workers(proc.pid)), proc, "a worker process", timeout=120)
    workers = _spawned_workers(proc.pid)
    started.extend(workers)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert "SIGINT received" in stderr and "study stopped (SIGINT)" in stdout, (stdout, stderr)
    assert not [pid for pid in workers if alive(pid)]


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP], ids=["ENOLCK", "EOPNOTSUPP"])
def test_a_file_system_without_locks_is_one_error_line(tmp_path: Path, corpus: Path, code: int,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """NFS without a lock manager (ENOLCK) or a FUSE mount (EOPNOTSUPP) refuses ``flock``: one
    ``gnopt: error:`` line that says why and what to do, for a run folder and for a streamed cache entry."""
    import fcntl

    import gnopt.lock as lock_mod

    def refuse(fd: int, op: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(lock_mod, "fcntl", types.SimpleNamespace(flock=refuse, LOCK_EX=fcntl.LOCK_EX,
                                                                  LOCK_NB=fcntl.LOCK_NB))
    out = tmp_path / "run"
    msg = one_error_line(capsys, gn_args(corpus, out))
    assert f"cannot lock {out / LOCK_NAME}" in msg and "does not support file locks" in msg, msg
    assert "local disk" in msg and "--out" in msg, msg
    pytest.importorskip("datasets")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"document {i}."}) + "\n" for i in range(50)),
                    encoding="utf-8")
    msg = one_error_line(capsys, ["prepare", "--data", f"hf:{rows}", "--tokenizer", "bytes", "--max-tokens",
                                  "200", "--cache-dir", str(tmp_path / "cache")])
    assert "does not support file locks" in msg and "--cache-dir" in msg, msg


def test_the_data_and_lock_modules_import_without_fcntl(tmp_path: Path) -> None:
    """Not POSIX (Windows): no ``fcntl``. The streamed-data module still imports, and locks are no-ops."""
    code = ("import sys; sys.modules['fcntl'] = None\n"
            "import gnopt.data.stream\n"
            "from gnopt.lock import FolderLock\n"
            f"assert not FolderLock({str(tmp_path)!r}).acquire().held\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
