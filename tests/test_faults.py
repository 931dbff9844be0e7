"""Faults: ``kill -9`` (also in the middle of a checkpoint write) then ``--resume``; SIGTERM / SIGINT;
non-finite values injected into GN inner steps, the GN line search and baseline gradients."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import gnopt.train as train_mod
from gnopt.checkpoint import TEST_WRITE_DELAY_ENV, load_checkpoint
from gnopt.cli import main

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12


def gn_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    """A tiny GN run (the stepper with the most state: θ, θ̂, inner Muon/AdamW state, schedule)."""
    return ["train", "--data", str(corpus), "--preset", "tiny", "--tokenizer", "bytes", "--optimizer", "gn",
            "--steps", str(STEPS), "--batch-tokens", "256", "--micro-batch-size", "4", "--eval-every", "3",
            "--eval-tokens", "1024", "--threads", "1", "--ckpt-every", "1", "--quiet", "--out", str(out),
            *extra]


def read_metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
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


@pytest.mark.parametrize("optimizer", ["gn", "gn-prox-linear"])
def test_gn_nonfinite_inner_step_and_line_search_never_corrupt_theta(
        corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        optimizer: str) -> None:
    # N = 2 inner + 2 line-search micro-batches per step: step s draws 4s .. 4s+3 (0-based s).
    snaps = poison(monkeypatch, bad={1, 6})  # step 1: 2nd inner micro-batch; step 2: 1st line-search one
    out = tmp_path / "run"
    args = gn_args(corpus, out, "--optimizer", optimizer, "--steps", "4", "--ckpt-every", "0")
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
