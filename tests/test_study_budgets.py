"""``gnopt study`` for batch grids far past the critical batch size: per-batch learning-rate grids, seed runs
at a chosen batch, stopping runs at the target (``stop_at_loss``), and the tuning-cost table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from gnopt.cli import main
from gnopt.config import TrainConfig, fingerprint, resolve
from gnopt.errors import GnoptError
from gnopt.study.analysis import RunResult, analyse, read_curve, tuning_costs
from gnopt.study.runner import StudyOptions, StudyRunner, run_action
from gnopt.study.spec import load_spec, plan_runs, plan_seed_runs, warmup_run
from gnopt.train import train

EXPERIMENT = """
[experiment]
batch_tokens = [256, 512]
steps = { 256 = 8, 512 = 6 }
{extra}

[base]
preset = "tiny"
tokenizer = "bytes"
micro_batch_size = 4
eval_tokens = 256
ckpt_every = 1

[methods.adamw]
lr = {adamw_lr}

[methods.gn]
lr = [0.01, 0.02]
adam_lr = 1e-3
"""


def _write(tmp_path: Path, *, extra: str = "", adamw_lr: str = "[1e-3, 3e-3]",
           name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(EXPERIMENT.replace("{extra}", extra).replace("{adamw_lr}", adamw_lr), encoding="utf-8")
    return path


def _tiny(out: Path, **kw: object) -> TrainConfig:
    values: dict[str, object] = dict(preset="tiny", tokenizer="bytes", steps=8, batch_tokens=256,
                                     micro_batch_size=4, eval_every=1, eval_tokens=256, threads=1, quiet=True,
                                     out=str(out), ckpt_every=1)
    values.update(kw)
    return TrainConfig(**values)  # type: ignore[arg-type]


def _metrics(out: Path) -> list[dict[str, object]]:
    """metrics.jsonl without the wall-clock fields (``wall``, ``step_seconds``, GN's ``time_*`` and
    ``*_seconds``)."""
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    def timing(k: str) -> bool:
        return k == "wall" or k.startswith("time_") or k.endswith("seconds")

    return [{k: v for k, v in r.items() if not timing(k)} for r in recs]


# ------------------------------------------------------------------------------------------------------
# stop_at_loss: stop at the first evaluation at or below a loss, resume exactly
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adamw", "gn"])
def test_stop_at_loss_stops_there_and_resumes_exactly(tmp_path: Path, optimizer: str) -> None:
    full = train(_tiny(tmp_path / "full", optimizer=optimizer))
    evals = read_curve(tmp_path / "full").evals
    threshold = evals[3][2]  # the validation loss after step 3
    assert all(v > threshold for _, _, v in evals[:3])
    cfg = _tiny(tmp_path / "cut", optimizer=optimizer, stop_at_loss=threshold)
    stopped = train(cfg)
    assert stopped["completed"] is False and stopped["stop_reason"] == "stop_at_loss"
    assert stopped["steps"] == 3 and stopped["final_val_loss"] == threshold
    assert stopped["stop_at_loss"] == threshold
    # stop_at_loss is run control: not part of what the run computes
    assert fingerprint(resolve(cfg)) == fingerprint(resolve(_tiny(tmp_path / "cut", optimizer=optimizer)))
    # a lower threshold (here: none) trains on, bitwise as if it had never stopped
    resumed = train(_tiny(tmp_path / "cut", optimizer=optimizer), resume=True)
    assert resumed["completed"] is True and resumed["final_val_loss"] == full["final_val_loss"]
    assert _metrics(tmp_path / "cut") == _metrics(tmp_path / "full")


def test_stop_at_loss_flag_and_validation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "--preset", "tiny", "--tokenizer", "bytes", "--steps", "4", "--batch-tokens", "256",
            "--micro-batch-size", "4", "--eval-every", "1", "--eval-tokens", "256", "--threads", "1",
            "--quiet", "--out", str(tmp_path / "a"), "--stop-at-loss", "100"]
    assert main(args) == 0  # every evaluation is below 100: it stops after the first step
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["stop_reason"] == "stop_at_loss"
    args[args.index("--stop-at-loss") + 1] = "-1"
    args[args.index("--out") + 1] = str(tmp_path / "b")
    assert main(args) == 2
    assert "gnopt: error: stop_at_loss must be a positive finite validation loss" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------------------
# the experiment file: per-batch lr grids, seed batch, stop_at_target
# ------------------------------------------------------------------------------------------------------


def test_per_batch_lr_grids_and_seed_batch_plan(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, extra="seeds = [0, 5]\nseed_batch_tokens = 256",
                            adamw_lr="{ 256 = [1e-3, 3e-3], 512 = [3e-3, 6e-3, 1e-2] }"))
    out = tmp_path / "out"
    runs = plan_runs(spec, out)
    assert [(r.method, r.batch_tokens, r.lr, r.steps) for r in runs] == [
        ("adamw", 256, 1e-3, 8), ("adamw", 256, 3e-3, 8),
        ("adamw", 512, 3e-3, 6), ("adamw", 512, 6e-3, 6), ("adamw", 512, 1e-2, 6),
        ("gn", 256, 0.01, 8), ("gn", 256, 0.02, 8), ("gn", 512, 0.01, 6), ("gn", 512, 0.02, 6)]
    adamw = spec.method("adamw")
    assert adamw.lr == (1e-3, 3e-3, 6e-3, 1e-2)
    assert adamw.describe_lr() == "256: 0.001, 0.003; 512: 0.003, 0.006, 0.01"
    assert spec.seed_batch == 256 and spec.to_dict()["seed_batch_tokens"] == 256
    seeded = plan_seed_runs(spec, out, {"adamw": (3e-3, None), "gn": (0.02, 1e-3)})
    assert [(r.method, r.batch_tokens, r.seed, r.steps, r.rel) for r in seeded] == [
        ("adamw", 256, 5, 8, "runs/adamw/B256/lr0.003-seed5"),
        ("gn", 256, 5, 8, "runs/gn/B256/lr0.02-alr0.001-seed5")]
    # the warm-up's budget (5% of the largest batch's) and the default seed batch
    assert warmup_run(spec, out).config.seed == 6
    assert load_spec(_write(tmp_path, extra="seeds = [0, 1]", name="b.toml")).seed_batch == 512


@pytest.mark.parametrize(("extra", "adamw_lr", "message"), [
    ("seeds = [0, 1]\nseed_batch_tokens = 1024", "[1e-3, 3e-3]",
     "seed_batch_tokens = 1024 is not in the batch grid"),
    ("seed_batch_tokens = 256", "[1e-3, 3e-3]", "seed_batch_tokens is set but seeds is not"),
    ("stop_at_target = 1", "[1e-3, 3e-3]", "stop_at_target must be true or false"),
    ("", "{ 256 = [1e-3, 3e-3] }",
     "must name exactly the batch sizes the method runs at [256, 512]; missing [512]"),
    ("", "{ 256 = [1e-3, 3e-3], 512 = [1e-3, 3e-3], 1024 = [1e-3] }", "not a batch it runs at [1024]"),
    ("", "{ big = [1e-3] }", "lr key 'big' is not a batch size"),
    ("", "{ 256 = [1e-3, 3e-3], 512 = [1e-3] }",
     "[methods.adamw] sweeps 1 setting(s) at batch 512 but gn sweeps 2"),
    ("", "{ 256 = [1e-3, 3e-3], 512 = [1e-3, -1] }", "lr for batch 512 must hold positive numbers"),
])
def test_new_experiment_keys_are_validated(tmp_path: Path, extra: str, adamw_lr: str, message: str) -> None:
    with pytest.raises(GnoptError) as info:
        load_spec(_write(tmp_path, extra=extra, adamw_lr=adamw_lr))
    assert message in str(info.value)


# ------------------------------------------------------------------------------------------------------
# stop_at_target end to end
# ------------------------------------------------------------------------------------------------------


def _run(exp: Path, out: Path, jobs: int = 1, said: list[str] | None = None) -> StudyRunner:
    runner = StudyRunner(load_spec(exp), StudyOptions(out=out, threads=1, jobs=jobs, quiet=True, plots=False),
                         say=(said.append if said is not None else lambda line: None))
    runner.run()
    return runner


def test_stop_at_target_measures_what_full_runs_measure(tmp_path: Path) -> None:
    """A study that stops its runs at the target finds the same target, the same steps/passes to target of
    every run and the same best settings as the same study run to the end, for fewer steps."""
    said_full: list[str] = []
    said_cut: list[str] = []
    full = _run(_write(tmp_path, extra="seeds = [0, 1]\nseed_batch_tokens = 256", name="full.toml"),
                tmp_path / "full", said=said_full)
    cut = _run(_write(tmp_path, extra="seeds = [0, 1]\nseed_batch_tokens = 256\nstop_at_target = true",
                      name="cut.toml"), tmp_path / "cut", jobs=2, said=said_cut)
    # the ETA counts whole budgets: with stopping it is an upper bound and says so
    assert any("study ETA at most " in line for line in said_cut)
    assert any("sweep done; seed runs at B=256 with seeds 1 " in line for line in said_cut)  # not the largest
    assert any("study ETA " in line for line in said_full)
    assert not any("study ETA at most" in line for line in said_full)
    # two jobs: the two target runs start together; the next run waits for them instead of starting beside
    # them without a target (it would run to its end), so every other run stops at the target below
    assert sum("waits for the runs that set the target" in line for line in said_cut) == 1
    settled = next(i for i, line in enumerate(said_cut) if "(auto, from the 2 baseline runs" in line)
    assert all(i > settled for i, line in enumerate(said_cut)
               if " start " in line and "warmup" not in line and "B=512 " not in line)
    a = analyse(full.spec, full.out, full.all_runs, full.warmup)
    b = analyse(cut.spec, cut.out, cut.all_runs, cut.warmup)
    assert a.target_loss is not None and a.target_loss == b.target_loss == cut.target
    for ra, rb in zip([*a.runs, *a.seed_runs], [*b.runs, *b.seed_runs], strict=True):
        assert (ra.method, ra.batch_tokens, ra.lr, ra.seed) == (rb.method, rb.batch_tokens, rb.lr, rb.seed)
        assert rb.done and ra.steps_to_target_interp == rb.steps_to_target_interp
        assert ra.passes_to_target == rb.passes_to_target and ra.tokens_to_target == rb.tokens_to_target
        defines = rb.optimizer == "adamw" and rb.batch_tokens == 512 and rb not in b.seed_runs
        if defines or rb.steps_to_target is None:
            assert rb.status == "done" and rb.steps_done == rb.steps_planned
        else:  # it stopped at its first evaluation at or below the target
            assert rb.status == "stopped" and rb.steps_done == rb.steps_to_target
    assert {k: (r.lr, r.adam_lr) for k, r in a.best.items()} == {
        k: (r.lr, r.adam_lr) for k, r in b.best.items()}
    assert sum(r.steps_done for r in b.runs) < sum(r.steps_done for r in a.runs)
    assert [r.batch_tokens for r in b.seed_runs] == [256, 256]
    # a second invocation re-runs nothing
    assert all(a == "skip" for _, a in StudyRunner(cut.spec, StudyOptions(out=cut.out)).actions())
    # if the target moves lower, a stopped run is continued from its checkpoint (until the new target)
    summaries = {r.rel: json.loads((cut.out / r.rel / "summary.json").read_text()) for r in cut.all_runs}
    stopped = next(r for r in cut.all_runs if summaries[r.rel]["stop_reason"] == "stop_at_loss")
    assert run_action(stopped, b.target_loss) == "skip"
    assert run_action(stopped, 0.5) == "resume" and run_action(stopped) == "resume"
    # a run planned for resumption before the target was settled is skipped once it is
    later = StudyRunner(cut.spec, StudyOptions(out=cut.out), say=lambda line: None)
    assert later.target is None and not later._reached(0, 1, stopped, "resume")
    later.target = b.target_loss
    assert later._reached(0, 1, stopped, "resume")
    later.target = 0.5
    assert not later._reached(0, 1, stopped, "resume")
    lower = analyse(cut.spec, cut.out, cut.all_runs, cut.warmup, target_loss=0.5)
    assert next(r for r in lower.runs if r.run_dir == stopped.rel).status == "partial"


def test_defining_runs_run_first_and_never_stop(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, extra="stop_at_target = true"))
    runner = StudyRunner(spec, StudyOptions(out=tmp_path / "out"), say=lambda line: None)
    pending = [(i, r, "start") for i, r in enumerate(runner.runs)]
    order = [(r.method, r.batch_tokens) for _, r, _ in runner._ordered(pending)]
    assert order[:2] == [("adamw", 512), ("adamw", 512)] and order[2:4] == [("adamw", 256), ("adamw", 256)]
    assert {m for m, _ in order[4:]} == {"gn"}
    # while a target run is in flight and the target unknown, a run that is to stop at it waits
    defining = [r for _, r, _ in runner._ordered(pending)][:2]
    others = [r for r in runner.runs if r not in defining]
    assert all(runner._waits_for_target(r, defining[:1]) for r in others)
    assert not any(runner._waits_for_target(r, others[:1]) for r in others)  # no target run in flight
    assert not runner._waits_for_target(defining[1], defining[:1])  # a target run never waits
    runner.target = 3.0
    assert not any(runner._waits_for_target(r, defining[:1]) for r in others)
    assert [runner.stop_loss(r) for r in runner.runs] == [3.0, 3.0, None, None, 3.0, 3.0, 3.0, 3.0]
    # a declared target needs no defining runs: every run stops at it
    declared = load_spec(_write(tmp_path, extra="stop_at_target = true\ntarget_loss = 4.5", name="d.toml"))
    runner = StudyRunner(declared, StudyOptions(out=tmp_path / "d"), say=lambda line: None)
    runner.refresh_target()
    assert runner.target == 4.5 and all(runner.stop_loss(r) == 4.5 for r in runner.runs)
    # without the option nothing stops
    plain = StudyRunner(load_spec(_write(tmp_path, name="p.toml")), StudyOptions(out=tmp_path / "p"))
    plain.target = 3.0
    assert all(plain.stop_loss(r) is None for r in plain.runs)


# ------------------------------------------------------------------------------------------------------
# tuning cost
# ------------------------------------------------------------------------------------------------------


def _result(method: str, lr: float, steps: float | None, passes_to_target: float | None, passes: float,
            status: str = "done") -> RunResult:
    return RunResult(
        method=method, optimizer=method, batch_tokens=512, n_micro=2, lr=lr, adam_lr=None, seed=0,
        steps_planned=6, steps_done=6, status=status, selected=False, target_loss=3.0,
        steps_to_target=None if steps is None else int(steps + 0.999), steps_to_target_interp=steps,
        tokens_to_target=None, passes_to_target=passes_to_target, wall_to_target=None, final_val_loss=2.9,
        best_val_loss=2.9, initial_val_loss=4.0, tokens=4096, passes=passes, wall_seconds=1.0,
        seconds_per_step=0.1, run_dir="x")


def test_tuning_cost_counts_the_whole_grid(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path))
    runs = [_result("adamw", 1e-3, 5.5, 22.0, 24.0), _result("adamw", 3e-3, None, None, 24.0),
            _result("gn", 0.01, 2.5, 30.0, 60.0), _result("gn", 0.02, 1.5, 20.0, 20.0, status="stopped")]
    costs = {(t.method, t.batch_tokens): t for t in tuning_costs(spec, runs)}
    adamw = costs[("adamw", 512)]
    assert (adamw.settings, adamw.finished, adamw.reached) == (2, 2, 1)
    # whole steps (5.5 interpolated is 6 taken)
    assert adamw.steps_min == adamw.steps_max == 6 and adamw.best_passes == 22.0
    assert adamw.grid_passes == 48.0 and adamw.grid_passes_to_target == 22.0 + 24.0  # a miss counts whole
    gn = costs[("gn", 512)]
    assert (gn.reached, gn.steps_min, gn.steps_median, gn.steps_max) == (2, 2, 2.5, 3)
    assert gn.grid_passes == 80.0 and gn.grid_passes_to_target == 50.0 and gn.best_passes == 20.0
    assert costs[("adamw", 256)].settings == 0


def test_the_study_reports_tuning_cost(tmp_path: Path) -> None:
    runner = _run(_write(tmp_path), tmp_path / "out")
    study = json.loads((runner.out / "study.json").read_text())
    assert {(t["method"], t["batch_tokens"]) for t in study["tuning_cost"]} == {
        ("adamw", 256), ("adamw", 512), ("gn", 256), ("gn", 512)}
    assert all(t["settings"] == 2 and t["finished"] == 2 for t in study["tuning_cost"])
    report = (runner.out / "report.md").read_text(encoding="utf-8")
    assert "## Tuning cost" in report and "settings reaching the target" in report


def test_new_keys_keep_old_fingerprints(tmp_path: Path) -> None:
    """Runs planned without the new keys keep the fingerprints they had (a study in progress resumes)."""
    spec = load_spec(_write(tmp_path))
    new_keys = "stop_at_target = true\nseeds = [0, 1]\nseed_batch_tokens = 512"
    spec2 = load_spec(_write(tmp_path, extra=new_keys,
                             adamw_lr="{ 256 = [1e-3, 3e-3], 512 = [1e-3, 3e-3] }", name="new.toml"))
    out = tmp_path / "out"
    assert [fingerprint(r.config) for r in plan_runs(spec, out)] == [
        fingerprint(r.config) for r in plan_runs(spec2, out)]
    cfg = plan_runs(spec, out)[0].config
    assert fingerprint(dataclasses.replace(cfg, stop_at_loss=3.0)) == fingerprint(cfg)


def test_report_states_the_warm_starts_real_share(tmp_path: Path) -> None:
    """The protocol table gives the warm start's tokens over a run's budget at the largest batch, also when
    [warmup] sets its own steps (it used to print warmup_fraction, 5%, whatever the warm start was)."""
    from gnopt.study.report import _warm_start_share

    spec = load_spec(_write(tmp_path))  # largest batch 512 tokens x 6 steps = 3072 tokens
    assert _warm_start_share(spec, 3072) == "100% of a run's budget at the largest batch"
    assert _warm_start_share(spec, 307) == "10% of a run's budget at the largest batch"
    assert _warm_start_share(spec, spec.warmup_tokens()).startswith("5% ")
