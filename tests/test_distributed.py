"""Data parallelism: 2 gloo processes equal 1 process; the real torchrun path; a dead or hung rank.

The equivalence runs in float64 (the model is cast after it is built). In float32 the summation order of
one batch of B rows and of two shards of B/2 rows differs in the last bit, and torch's Muon (also GN's inner
Muon) runs its Newton-Schulz iteration in bfloat16, where such a last-bit difference sometimes flips a
rounding: after 3 steps float32 runs differ by ~2e-5 (Muon) to ~6e-5 (GN) in the loss and ~2e-4 in the
weights, while AdamW stays within 3e-7 / 2e-7. In float64 the runs agree to ~1e-15, so the required
tolerances (losses 1e-6, parameters 1e-5) have a wide margin and a real error cannot hide behind them.
The real ``torchrun -m gnopt train`` run is float32 and is compared more loosely.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import env_without_dist, free_port, read_metrics

import gnopt.distributed as distributed
from gnopt.config import TrainConfig
from gnopt.errors import GnoptError

PYTHON = sys.executable
OPTIMIZERS = ("adamw", "muon", "gn", "gn-layerwise")
STEPS = 3


def tiny_cfg(corpus: Path, out: Path, optimizer: str, **kw: Any) -> TrainConfig:
    values: dict[str, Any] = dict(
        data=str(corpus), preset="tiny", tokenizer="bytes", optimizer=optimizer, steps=STEPS,
        batch_tokens=256, micro_batch_size=4, eval_every=1, eval_tokens=1024, ckpt_every=0, threads=1,
        quiet=True, out=str(out), dist_timeout=60.0,
    )
    values.update(kw)
    return TrainConfig(**values)


def _float64_and_capture(captured: dict[str, Any]) -> None:
    """Patch the harness (in this process): float64 models, and keep the last checkpoint state."""
    import gnopt.model
    import gnopt.train as train_mod

    real_build, real_state = gnopt.model.build_model, train_mod._checkpoint_state

    def build_model(*args: Any, **kwargs: Any) -> torch.nn.Module:
        return real_build(*args, **kwargs).double()

    def checkpoint_state(*args: Any, **kwargs: Any) -> dict[str, Any]:
        state = real_state(*args, **kwargs)
        captured["state"] = {"model": state["model"], "stepper": state["stepper"]}
        return state

    gnopt.model.build_model = build_model  # type: ignore[assignment]
    train_mod._checkpoint_state = checkpoint_state  # type: ignore[assignment]


def _worker(rank: int, world: int, port: int, corpus: str, root: str, cache: str) -> None:
    """One rank of the 2-process run: every optimizer in turn, in one process group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), GNOPT_CACHE=cache)
    from gnopt.train import train

    captured: dict[str, Any] = {}
    _float64_and_capture(captured)
    with distributed.session(timeout=60.0):
        for opt in OPTIMIZERS:
            train(tiny_cfg(Path(corpus), Path(root) / f"dp-{opt}", opt))
            torch.save(captured["state"], Path(root) / f"state-{opt}-rank{rank}.pt")


def _max_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between two nested states of the same structure."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
        if not a.is_floating_point():
            return 0.0 if torch.equal(a, b) else float("inf")
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if isinstance(a, dict):
        assert set(a) == set(b)
        return max((_max_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        return max((_max_diff(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    assert a == b or (a != a and b != b), (a, b)  # equal scalars (nan == nan here)
    return 0.0


def _loss_pairs(ref: list[dict[str, Any]], dp: list[dict[str, Any]]) -> list[tuple[float, float]]:
    assert [(r.get("type"), r["step"], r["tokens"]) for r in ref] == \
           [(r.get("type"), r["step"], r["tokens"]) for r in dp]  # same steps, global token counts
    pairs = []
    for a, b in zip(ref, dp, strict=True):
        for key in ("loss", "val_loss", "grad_norm", "alpha"):
            if a.get(key) is not None:
                pairs.append((a[key], b[key]))
    return pairs


def test_two_gloo_processes_equal_one_process(corpus: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """AdamW, Muon, GN and layerwise GN: 2 ranks × half micro-batches == 1 process, same global batches;
    both ranks hold identical weights and optimizer / inner states."""
    import torch.multiprocessing as mp

    cache = os.environ["GNOPT_CACHE"]
    ctx = mp.start_processes(_worker, args=(2, free_port(), str(corpus), str(tmp_path), cache), nprocs=2,
                             start_method="spawn", join=False)
    # The 1-process references run here meanwhile (same float64 patch), so both sides overlap.
    from gnopt.train import train

    captured: dict[str, Any] = {}
    import gnopt.model
    import gnopt.train as train_mod

    monkeypatch.setattr(gnopt.model, "build_model", gnopt.model.build_model)
    monkeypatch.setattr(train_mod, "_checkpoint_state", train_mod._checkpoint_state)
    _float64_and_capture(captured)
    ref_states = {}
    for opt in OPTIMIZERS:
        train(tiny_cfg(corpus, tmp_path / f"ref-{opt}", opt))
        ref_states[opt] = captured["state"]
    while not ctx.join(timeout=120):
        pass

    for opt in OPTIMIZERS:
        ref, dp = read_metrics(tmp_path / f"ref-{opt}"), read_metrics(tmp_path / f"dp-{opt}")
        pairs = _loss_pairs(ref, dp)
        loss_diff = max(abs(a - b) for a, b in pairs)
        r0 = torch.load(tmp_path / f"state-{opt}-rank0.pt", weights_only=True)
        r1 = torch.load(tmp_path / f"state-{opt}-rank1.pt", weights_only=True)
        assert _max_diff(r0, r1) == 0.0, opt  # the ranks are bitwise replicas
        param_diff = _max_diff(ref_states[opt]["model"], r0["model"])
        state_diff = _max_diff(ref_states[opt]["stepper"], r0["stepper"])
        print(f"{opt}: max |loss diff| {loss_diff:.2e}, max |param diff| {param_diff:.2e}, "
              f"max |optimizer-state diff| {state_diff:.2e}")
        assert loss_diff <= 1e-6, opt
        assert param_diff <= 1e-5, opt
        summary = json.loads((tmp_path / f"dp-{opt}" / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] == STEPS


def cli_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(corpus), "--preset", "tiny", "--tokenizer", "bytes", "--optimizer", "gn",
            "--steps", str(STEPS), "--batch-tokens", "256", "--micro-batch-size", "4", "--eval-every", "1",
            "--eval-tokens", "1024", "--threads", "1", "--quiet", "--out", str(out), *extra]


def test_torchrun_cli_matches_one_process(corpus: Path, tmp_path: Path) -> None:
    """The real launcher: ``torchrun --nproc_per_node 2 -m gnopt train`` (float32, GN)."""
    from gnopt.cli import main

    torchrun = Path(PYTHON).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [PYTHON, "-m", "torch.distributed.run"]
    cmd = [*launcher, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "gnopt",
           *cli_args(corpus, tmp_path / "dp")]
    proc = subprocess.Popen(cmd, env=env_without_dist(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert main(cli_args(corpus, tmp_path / "ref")) == 0  # the reference runs meanwhile
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("done: ") == 1 and stdout.count("# gnopt train: resolved config") == 1  # rank 0 only

    ref, dp = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "dp")
    pairs = _loss_pairs(ref, dp)  # also: no line twice, global token counts
    assert abs(pairs[0][0] - pairs[0][1]) <= 1e-6  # initial val loss: sharded evaluation
    # float32: the inner Muon's bf16 Newton-Schulz turns last-bit noise into ~6e-5 loss differences
    assert max(abs(a - b) for a, b in pairs) <= 5e-4
    summary = json.loads((tmp_path / "dp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["completed"] is True
    assert sorted(p.name for p in (tmp_path / "dp").iterdir()) == \
        ["checkpoint.pt", "config.json", "metrics.jsonl", "summary.json"]


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_dead_or_hung_rank_makes_the_other_exit_with_a_clear_error(corpus: Path, tmp_path: Path,
                                                                     fault: str) -> None:
    """Rank 1 is SIGKILLed (its sockets close) or SIGSTOPped (it hangs) mid-run: rank 0 must exit with
    status 2 and a message naming its rank and the timeout, within the timeout (plus start-up slack)."""
    timeout = 4.0
    port = free_port()
    out = tmp_path / "run"
    args = cli_args(corpus, out, "--steps", "200", "--ckpt-every", "1", "--dist-timeout", str(timeout))
    procs = []
    for rank in (0, 1):
        env = env_without_dist()
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
        procs.append(subprocess.Popen([PYTHON, "-m", "gnopt", *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    victim = procs[1]
    try:
        deadline = time.monotonic() + 60
        while not (out / "checkpoint.pt").exists():  # training is under way
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].stderr.read()  # type: ignore[union-attr]
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        t0 = time.monotonic()
        _, stderr = procs[0].communicate(timeout=timeout + 30)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[0].returncode == 2, stderr[-2000:]
    assert "gnopt: error: rank 0 of 2:" in stderr and "another rank died, hung or was stopped" in stderr
    assert f"timeout {timeout:g} s" in stderr
    assert waited < timeout + 10, waited
    if fault == "kill":
        assert waited < timeout  # a closed connection is noticed at once, not after the timeout


# ------------------------------------------------------------------------------------------------------
# no process group: everything is the identity
# ------------------------------------------------------------------------------------------------------


def test_helpers_without_a_process_group() -> None:
    assert not distributed.is_initialized()
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    t = torch.arange(4.0)
    assert distributed.all_reduce_mean(t) is t and torch.equal(t, torch.arange(4.0))
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    batch = (torch.zeros(3, 2), torch.ones(3, 2))
    assert distributed.shard(batch) is batch
    assert distributed.main_first(lambda: 7, "x") == 7
    distributed.barrier()
    distributed.check_identical([t], "x")
    with distributed.session(timeout=1.0) as owned:
        assert owned is False


def test_setup_errors_are_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(GnoptError, match="micro_batch_size=4 is not divisible by the number of data-"):
        distributed.check_divisible(4)
    monkeypatch.undo()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(GnoptError, match="launch with torchrun"):
        distributed.init(timeout=1.0)
    with pytest.raises(GnoptError, match="dist_timeout must be positive"):
        distributed.init(timeout=0.0)
