"""``gnopt study``: init_from, the experiment schema, the S(B) fit, and the smoke study end to end."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gnopt.cli import main
from gnopt.config import OPTIMIZERS, TrainConfig, fingerprint, resolve
from gnopt.errors import GnoptError
from gnopt.study.analysis import (
    RUN_COLUMNS,
    RunCurve,
    RunResult,
    fit_critical_batch,
    gn_diagnostics,
    grid_edges,
    loss_at,
    read_curve,
    seed_ratios,
    to_target,
)
from gnopt.study.runner import run_action
from gnopt.study.spec import load_spec, plan_runs, plan_seed_runs, warmup_run
from gnopt.train import train

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------
# init_from: a run starts from another run's weights with a fresh optimizer
# ------------------------------------------------------------------------------------------------------


def _tiny(out: Path, **kw: object) -> TrainConfig:
    values: dict[str, object] = dict(preset="tiny", tokenizer="bytes", steps=3, batch_tokens=256,
                                     micro_batch_size=4, eval_every=0, eval_tokens=512, threads=1, quiet=True,
                                     out=str(out))
    values.update(kw)
    return TrainConfig(**values)  # type: ignore[arg-type]


def test_init_from_loads_the_weights_of_another_run(tmp_path: Path) -> None:
    first = train(_tiny(tmp_path / "first", optimizer="adamw"))
    second = train(_tiny(tmp_path / "second", optimizer="gn", init_from=str(tmp_path / "first")))
    # the same fixed validation set: the second run starts exactly where the first one ended
    assert second["initial_val_loss"] == first["final_val_loss"]
    assert second["initial_val_loss"] < first["initial_val_loss"]
    # a checkpoint file works as well as its run folder, and the path is part of the fingerprint
    third = resolve(_tiny(tmp_path / "third", init_from=str(tmp_path / "first" / "checkpoint.pt")))
    as_folder = resolve(_tiny(tmp_path / "third", init_from=str(tmp_path / "first")))
    assert fingerprint(third) != fingerprint(as_folder)
    assert train(third)["initial_val_loss"] == first["final_val_loss"]


def test_init_from_errors_are_clear_and_write_nothing(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(GnoptError, match="init_from: there is no checkpoint"):
        train(_tiny(tmp_path / "a", init_from=str(tmp_path / "missing")))
    assert not (tmp_path / "a").exists()
    train(_tiny(tmp_path / "small", optimizer="adamw"))
    args = ["train", "--preset", "tiny", "--tokenizer", "bytes", "--seq-len", "16", "--steps", "1",
            "--batch-tokens", "64", "--micro-batch-size", "4", "--eval-tokens", "64", "--threads", "1",
            "--quiet", "--out", str(tmp_path / "b"), "--init-from", str(tmp_path / "small")]
    assert main(args) == 0  # same shapes (RoPE tables are buffers, not weights): fine
    args[args.index("--preset") + 1] = "cpu-small"
    args[args.index("--out") + 1] = str(tmp_path / "c")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "init_from: the weights in" in err and "do not fit this model" in err
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------------------------
# the experiment file
# ------------------------------------------------------------------------------------------------------

MINIMAL = """
[experiment]
batch_tokens = [256, 512]
budget_tokens = 2048

[base]
preset = "tiny"
tokenizer = "bytes"
micro_batch_size = 4

[methods.adamw]
lr = [1e-3, 3e-3]

[methods.gn]
lr = [0.01, 0.02]
"""


def _spec_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "exp.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(GnoptError) as info:
        load_spec(path)
    return str(info.value)


def test_minimal_experiment_plan(tmp_path: Path) -> None:
    path = tmp_path / "exp.toml"
    path.write_text(MINIMAL, encoding="utf-8")
    spec = load_spec(path)
    assert spec.name == "exp" and spec.target_loss is None and spec.batch_tokens == (256, 512)
    runs = plan_runs(spec, tmp_path / "out")
    assert [(r.method, r.batch_tokens, r.lr, r.steps) for r in runs] == [
        ("adamw", 256, 1e-3, 8), ("adamw", 256, 3e-3, 8), ("adamw", 512, 1e-3, 4), ("adamw", 512, 3e-3, 4),
        ("gn", 256, 0.01, 8), ("gn", 256, 0.02, 8), ("gn", 512, 0.01, 4), ("gn", 512, 0.02, 4),
    ]
    r = runs[-1]
    assert r.rel == "runs/gn/B512/lr0.02" and r.config.init_from == str(tmp_path / "out" / "warmup")
    assert r.config.target_loss is None and r.config.out == str(tmp_path / "out" / r.rel)
    warm = warmup_run(spec, tmp_path / "out")
    # 5% of the budget at the largest batch (2048 tokens) at the smallest batch; another data seed
    assert warm.config.optimizer == "adamw" and warm.steps == 1 and warm.config.seed == 1
    assert [r.method for r in plan_runs(spec, tmp_path / "out", only=["gn"])] == ["gn"] * 4


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.replace("[experiment]", "[experimentt]"), "unknown table [experimentt]"),
    (lambda t: t.replace("budget_tokens = 2048", "budget_tokens = 2048\ntarget = 3.0"),
     "unknown key 'target' in [experiment] (did you mean 'target_loss'?)"),
    (lambda t: t.replace("budget_tokens = 2048", ""), "give the run length"),
    (lambda t: t.replace("budget_tokens = 2048", "steps = { 256 = 8 }"), "missing [512]"),
    (lambda t: t.replace("batch_tokens = [256, 512]", "batch_tokens = []"), "non-empty list"),
    (lambda t: t.replace("budget_tokens = 2048", "budget_tokens = 2048\ntarget_loss = -1"),
     "target_loss must be a positive number"),
    (lambda t: t + '\n[methods.muon]\nlr = [0.02]\npreset = "cpu-small"\n', "'preset' cannot be set here"),
    (lambda t: t.replace("micro_batch_size = 4", "micro_batch_size = 4\nlr = 0.1"),
     "'lr' cannot be set here"),
    (lambda t: t + "\n[methods.fancy]\nlr = [0.1]\n", "give optimizer = one of"),
    (lambda t: t + '\n[methods.fancy]\noptimizer = "lion"\nlr = [0.1]\n', "unknown optimizer 'lion'"),
    (lambda t: t + "\n[methods.muon]\nlr = [0.02]\n",
     "the protocol gives every baseline at least GN's tuning"),
    (lambda t: t.replace("lr = [0.01, 0.02]", "lr = [0.01, 0.02]\nls_range = 0"),
     "[methods.gn] at batch_tokens=256: ls_range must be a positive integer"),
    (lambda t: t.replace("lr = [0.01, 0.02]", "lr = [0.01, 0.01]"), "lists a learning rate twice"),
    (lambda t: t.replace("lr = [1e-3, 3e-3]", "lr = [1e-3, 3e-3]\nbogus = 1"), "unknown key 'bogus'"),
    (lambda t: t.replace("batch_tokens = [256, 512]", "batch_tokens = [256, 500]"), "not a multiple"),
    (lambda t: t.replace("budget_tokens = 2048", "budget_tokens = 2048\nseeds = [1, 2]"),
     "seeds must begin with the sweep's seed, [base] seed = 0"),
    (lambda t: t.replace("budget_tokens = 2048", "budget_tokens = 2048\nseeds = [0, 1, 1]"),
     "lists a seed twice"),
    (lambda t: t.replace("budget_tokens = 2048", "budget_tokens = 2048\nseeds = [0, -1]"),
     "seeds must be a non-empty list of non-negative integers"),
    (lambda t: t.replace("budget_tokens = 2048", "budget_tokens = 2048\nseeds = [0, 1]")
     + "\n[warmup]\nseed = 1\n", "[warmup] seed = 1 is also a run seed"),
    (lambda t: t.replace("lr = [0.01, 0.02]", "lr = [0.01, 0.02]\nbatch_tokens = [1024]"),
     "batch_tokens [1024] not in the experiment's grid [256, 512]"),
    (lambda t: t.replace("lr = [0.01, 0.02]", "lr = [0.01, 0.02]\nbatch_tokens = 512"),
     "batch_tokens must be a non-empty list"),
])
def test_experiment_validation_errors(tmp_path: Path, edit: Any, message: str) -> None:
    assert message in _spec_error(tmp_path, edit(MINIMAL))


def test_seeds_and_batch_subsets_plan(tmp_path: Path) -> None:
    path = tmp_path / "exp.toml"
    path.write_text(MINIMAL.replace("budget_tokens = 2048", "budget_tokens = 2048\nseeds = [0, 3]")
                    .replace("lr = [0.01, 0.02]", "lr = [0.01, 0.02]\nbatch_tokens = [512]"),
                    encoding="utf-8")
    spec = load_spec(path)
    out = tmp_path / "out"
    assert spec.seeds == (0, 3) and spec.extra_seeds == (3,)
    assert [(r.method, r.batch_tokens) for r in plan_runs(spec, out)] == [
        ("adamw", 256), ("adamw", 256), ("adamw", 512), ("adamw", 512), ("gn", 512), ("gn", 512)]
    # the warm-up's data order is none of the runs' (default: one past the largest seed)
    assert warmup_run(spec, out).config.seed == 4
    seeded = plan_seed_runs(spec, out, {"adamw": (3e-3, None), "gn": (0.02, 1e-3)})
    assert [(r.method, r.batch_tokens, r.lr, r.adam_lr, r.seed, r.config.seed, r.rel) for r in seeded] == [
        ("adamw", 512, 3e-3, None, 3, 3, "runs/adamw/B512/lr0.003-seed3"),
        ("gn", 512, 0.02, 1e-3, 3, 3, "runs/gn/B512/lr0.02-alr0.001-seed3")]
    assert all(r.config.init_from == str(out / "warmup") and r.steps == 4 for r in seeded)
    assert seeded[1].config.adam_lr == 1e-3 and "seed=3" in seeded[1].label
    assert [r.method for r in plan_seed_runs(spec, out, {"adamw": (3e-3, None)}, only=["gn"])] == []


def _result(method: str, optimizer: str, seed: int, steps: float | None, passes: float | None = None,
            wall: float | None = None) -> RunResult:
    return RunResult(
        method=method, optimizer=optimizer, batch_tokens=512, n_micro=2, lr=0.01, adam_lr=None, seed=seed,
        steps_planned=8, steps_done=8, status="done", selected=False, target_loss=3.0,
        steps_to_target=None if steps is None else int(np.ceil(steps)), steps_to_target_interp=steps,
        tokens_to_target=None, passes_to_target=passes, wall_to_target=wall, final_val_loss=2.9,
        best_val_loss=2.9, initial_val_loss=4.0, tokens=4096, passes=16.0, wall_seconds=1.0,
        seconds_per_step=0.1, run_dir="x")


def test_seed_ratios_take_the_best_baseline_per_seed(tmp_path: Path) -> None:
    path = tmp_path / "exp.toml"
    path.write_text(MINIMAL.replace("budget_tokens = 2048", "budget_tokens = 2048\nseeds = [0, 1, 2]")
                    + "\n[methods.muon]\nlr = [0.02, 0.05]\n[methods.gn-layerwise]\nlr = [0.02]\n",
                    encoding="utf-8")
    spec = load_spec(path)
    by_seed = {
        "adamw": {0: _result("adamw", "adamw", 0, 8.0, 16, 2.0),
                  1: _result("adamw", "adamw", 1, 6.0, 12, 1.5), 2: _result("adamw", "adamw", 2, None)},
        "muon": {0: _result("muon", "muon", 0, 4.0, 8, 3.0), 1: _result("muon", "muon", 1, 12.0, 24, 3.0),
                 2: _result("muon", "muon", 2, 5.0, 10, 1.0)},
        "gn": {0: _result("gn", "gn", 0, 2.0, 10, 0.5), 1: _result("gn", "gn", 1, 3.0, 12, 1.0),
               2: _result("gn", "gn", 2, 1.0, 5, 2.0)},
        "gn-layerwise": {0: _result("gn-layerwise", "gn-layerwise", 0, 3.0, 30, 1.0),
                         2: _result("gn-layerwise", "gn-layerwise", 2, None)},
    }
    ratios = {(r.numerator, r.denominator, r.metric): r for r in seed_ratios(spec, by_seed)}
    # best baseline per seed: min over the baselines that reached the target (seed 1: AdamW; 0 and 2: Muon)
    steps = ratios[("best baseline", "gn", "steps")]
    assert steps.per_seed == {0: 2.0, 1: 2.0, 2: 5.0} and steps.median == 2.0 and (steps.low, steps.high) == (
        2.0, 5.0)
    # each metric's best baseline is taken on its own (seed 0: the fewest passes and the least wall time
    # may come from different baselines)
    assert ratios[("best baseline", "gn", "passes")].per_seed == {0: 0.8, 1: 1.0, 2: 2.0}
    assert ratios[("best baseline", "gn", "wall")].per_seed == {0: 4.0, 1: 1.5, 2: 0.5}
    # a side that missed the target (or has no run in that seed) drops the seed
    lw = ratios[("gn-layerwise", "gn", "steps")]
    assert lw.per_seed == {0: 1.5} and lw.median == lw.low == lw.high == 1.5
    assert ratios[("best baseline", "gn-layerwise", "steps")].per_seed == {0: 4.0 / 3.0}
    assert ("best baseline", "adamw", "steps") not in ratios  # baselines are not ratios' denominators


def test_grid_edges_flag_best_settings_at_the_end_of_their_grid() -> None:
    def run(method: str, lr: float, adam_lr: float | None = None, batch: int = 512, seed: int = 0,
            status: str = "done") -> RunResult:
        return dataclasses.replace(_result(method, "adamw", seed, 4.0), lr=lr, adam_lr=adam_lr,
                                   batch_tokens=batch, status=status)

    results = [run("adamw", 1e-3), run("adamw", 3e-3), run("adamw", 1e-2),   # best 1e-3: the lowest lr
               run("adamw", 1e-3, batch=256), run("adamw", 3e-3, batch=256),
               run("adamw", 1e-2, batch=256),                                 # best 3e-3: inside
               run("muon", 0.02, 1e-3), run("muon", 0.05, 1e-3),              # best (0.05, 3e-3): the highest
               run("muon", 0.02, 3e-3), run("muon", 0.05, 3e-3),              # lr and the highest adam_lr
               run("gn", 0.01), run("gn", 0.02, status="partial"),           # an unfinished run is no grid
               run("soap", 1e-3), run("soap", 3e-3), run("soap", 1e-3, seed=1)]
    best = {("adamw", 512): results[0], ("adamw", 256): results[4], ("muon", 512): results[9],
            ("gn", 512): results[10], ("soap", 512): results[14]}
    assert grid_edges(results, best) == {("adamw", 512): ["lowest lr"],
                                         ("muon", 512): ["highest lr", "highest adam_lr"]}
    # a seed's run is compared with its own seed's runs only (soap seed 1 has one setting)


def test_shipped_experiments_are_valid() -> None:
    smoke = load_spec(ROOT / "experiments" / "smoke.toml")
    assert {m.optimizer for m in smoke.methods} == set(OPTIMIZERS)
    assert "gn-adamw-inner" in [m.name for m in smoke.methods]
    cpu = load_spec(ROOT / "experiments" / "cpu.toml")
    assert {m.name for m in cpu.methods} == {m.name for m in smoke.methods}
    assert cpu.base["data"] == str(ROOT.parent / "shared" / "data" / "gutenberg-fiction")
    assert cpu.target_loss is None and abs(cpu.target_fraction - 2 / 3) < 0.01 and cpu.warmup_fraction == 0.05
    sizes = {m.name: len(m.grid) for m in cpu.methods}
    assert min(v for k, v in sizes.items() if not k.startswith("gn")) >= max(
        v for k, v in sizes.items() if k.startswith("gn"))


def test_cpu_lm_experiment_meets_its_protocol() -> None:
    """experiments/cpu-lm.toml: >= 1M parameters, BPE >= 2048, sequence >= 128, a warm start of >= 5% of the
    model's Chinchilla budget, 3 seeds, every baseline tuned at least as much as any GN variant."""
    from gnopt.model import build_model

    spec = load_spec(ROOT / "experiments" / "cpu-lm.toml")
    base = spec.base
    n_params = sum(p.numel() for p in build_model(base["preset"], vocab_size=base["vocab_size"],
                                                   seq_len=base["seq_len"]).parameters())
    assert n_params >= 1_000_000 and base["tokenizer"] == "bpe" and base["vocab_size"] >= 2048
    assert base["seq_len"] >= 128 and spec.seeds == (0, 1, 2)
    warm = warmup_run(spec, Path("out"))
    assert warm.steps * warm.batch_tokens >= 0.05 * 20 * n_params
    assert warm.config.seed not in spec.seeds
    assert {m.optimizer for m in spec.methods} == {"adamw", "muon", "soap", "gn", "gn-layerwise",
                                                    "gn-prox-linear"}
    paper = spec.method("gn-paper")
    assert paper.overrides.get("ls_kind") == "grid" and spec.method("gn").overrides.get("ls_kind") is None
    gn_max = max(len(m.grid) for m in spec.methods if m.is_gn)
    assert all(len(m.grid) >= gn_max for m in spec.methods if not m.is_gn)
    assert all(spec.largest_batch in spec.batches_of(m) for m in spec.methods)
    quick = load_spec(ROOT / "experiments" / "quickstart.toml")
    assert "data" not in quick.base and quick.extra_seeds == ()


# ------------------------------------------------------------------------------------------------------
# analysis: the S(B) fit, steps to target
# ------------------------------------------------------------------------------------------------------


def test_gn_diagnostics_from_metrics(tmp_path: Path) -> None:
    grid = [1.0, 0.5, 0.25]

    def gn(step: int, alpha: float | None, q: float, rho: float | None, reset: bool = False) -> str:
        return json.dumps({"step": step, "tokens": 8 * step, "passes": 10.0, "mode": "gn", "alphas": grid,
                           "alpha": alpha, "rejected": alpha is None, "q_start": q, "rho": rho,
                           "reset_inner": reset})

    lines = [json.dumps({"type": "eval", "step": 0, "tokens": 0, "val_loss": 3.0}),
             gn(1, 1.0, 0.0, 0.9), gn(2, 0.25, 0.2, 1.1, reset=True), gn(3, 0.25, 0.0, None),
             gn(4, None, 0.5, None), "{torn"]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines), encoding="utf-8")
    curve = read_curve(tmp_path)
    assert len(curve.gn) == 4 and curve.last_step == 4
    d = gn_diagnostics(curve)
    assert d is not None and d.steps == 4 and d.rejected == 1 and d.resets == 1
    assert d.alpha_median == 0.25 and d.share_alpha_one == 0.25 and d.share_at_floor == 0.5
    assert d.q_start_max == 0.5 and d.q_start_median == pytest.approx(0.1) and d.share_q_start_positive == 0.5
    assert d.rho_median == pytest.approx(1.0) and d.passes_per_step == 10.0
    assert d.share_backtracked == 0.0  # grid records (no ls_kind: written before the model search)
    # the model search: no grid floor; corrected = α_i evaluated, backtracked = halvings evaluated
    model = [json.dumps({"step": k + 1, "tokens": 8, "passes": 5.0, "mode": "gn", "ls_kind": "model",
                         "alphas": alphas, "alpha": alphas[-1], "rejected": False, "q_start": -0.1,
                         "rho": 0.9, "reset_inner": alphas[-1] == 0.0, "ls_corrected": corrected,
                         "ls_backtracks": backtracks})
             for k, (alphas, corrected, backtracks) in enumerate(
                 [([0.6], False, 0), ([0.6, 0.3], True, 0), ([0.25], False, 0),
                  ([0.4, 0.3, 0.15, 0.075, 0.0], True, 2)])]
    (tmp_path / "metrics.jsonl").write_text("\n".join(model), encoding="utf-8")
    d = gn_diagnostics(read_curve(tmp_path))
    assert d is not None and d.share_at_floor == 0.0 and d.resets == 1
    assert d.share_corrected == 0.5 and d.share_backtracked == 0.25
    # a baseline run has no GN records
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens": 8, "loss": 2.0, "passes": 1}),
                                            encoding="utf-8")
    assert gn_diagnostics(read_curve(tmp_path)) is None


def test_fit_recovers_s_min_and_b_noise() -> None:
    batches = np.array([1024, 2048, 4096, 8192, 16384, 32768, 65536], dtype=float)
    steps = 40.0 * (1 + 6000.0 / batches)
    fit = fit_critical_batch(batches, steps)
    assert fit is not None and fit.bound is None and fit.n_points == 7
    assert fit.s_min == pytest.approx(40.0, rel=1e-5) and fit.b_crit == pytest.approx(6000.0, rel=1e-5)
    assert fit.rmse_log < 1e-6 and fit.steps(6000.0) == pytest.approx(80.0, rel=1e-5)
    # multiplicative noise: still close
    rng = np.random.default_rng(0)
    noisy = steps * np.exp(rng.normal(0.0, 0.03, size=steps.size))
    fit = fit_critical_batch(batches, noisy)
    assert fit is not None and fit.s_min == pytest.approx(40.0, rel=0.1)
    assert fit.b_crit == pytest.approx(6000.0, rel=0.25)
    # two points: an exact fit
    fit = fit_critical_batch([2048, 8192], [40.0 * (1 + 6000 / 2048), 40.0 * (1 + 6000 / 8192)])
    assert fit is not None and fit.b_crit == pytest.approx(6000.0, rel=1e-4)


def test_fit_edge_cases() -> None:
    batches = [1024.0, 4096.0, 16384.0]
    perfect = fit_critical_batch(batches, [1e4 / b for b in batches])  # S ∝ 1/B: no critical batch in sight
    assert perfect is not None and perfect.bound == "above" and perfect.b_crit > 16384 * 100
    flat = fit_critical_batch(batches, [30.0, 31.0, 30.5])  # no gain from batch size
    assert flat is not None and flat.bound == "below" and flat.b_crit == 0.0
    assert flat.s_min == pytest.approx(30.5, rel=0.02)
    assert fit_critical_batch([1024.0], [10.0]) is None
    assert fit_critical_batch([1024.0, 1024.0], [10.0, 11.0]) is None
    assert fit_critical_batch([1024.0, 2048.0], [10.0, float("nan")]) is None


def test_to_target_and_interpolation() -> None:
    curve = RunCurve(evals=[(0, 0, 5.0), (10, 100, 4.0), (20, 200, 3.0), (30, 300, 2.5)],
                     passes={s: 2.0 * s for s in range(1, 31)}, wall={s: 0.5 * s for s in range(1, 31)})
    t = to_target(curve, 3.5)
    assert (t.steps, t.tokens, t.passes, t.wall) == (20, 200, 40.0, 10.0)
    assert t.steps_interp == pytest.approx(15.0)
    assert to_target(curve, 2.0).steps is None and to_target(curve, None).steps is None
    assert loss_at(curve, 25) == pytest.approx(2.75) and loss_at(curve, 31) is None


# ------------------------------------------------------------------------------------------------------
# the smoke study end to end: outputs, resume, refusal of a changed experiment
# ------------------------------------------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _study(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code = main(["study", *args])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def _outputs_are_well_formed(out: Path, n_runs: int, methods: list[str]) -> None:
    with (out / "runs.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and list(rows[0]) == list(RUN_COLUMNS) and len(rows) == n_runs
    assert all(r["status"] == "done" for r in rows)
    assert {r["method"] for r in rows} == set(methods)
    for r in rows:
        assert float(r["final_val_loss"]) > 0 and float(r["wall_seconds"]) > 0 and int(r["steps_done"]) > 0
        if r["steps_to_target"]:
            assert float(r["passes_to_target"]) > 0 and int(r["tokens_to_target"]) > 0
    selected = [r for r in rows if r["selected"] == "True"]
    assert len(selected) == len(methods) * 2  # one per (method, batch)
    runs_json = json.loads((out / "runs.json").read_text())
    assert isinstance(runs_json, list) and len(runs_json) == n_runs and set(runs_json[0]) == set(RUN_COLUMNS)
    study = json.loads((out / "study.json").read_text())
    keys = {"experiment", "target_loss", "target_source", "warmup", "best", "critical_batch", "runs",
            "gn_diagnostics"}
    assert keys <= set(study)
    # committed results carry no absolute path of the machine: the experiment file as the report shows it
    assert study["experiment"]["path"] == os.path.relpath(ROOT / "experiments" / "smoke.toml")
    gn_methods = {m for m in methods if m.startswith("gn")}
    assert {d["method"] for d in study["gn_diagnostics"]} == gn_methods
    assert len(study["gn_diagnostics"]) == 2 * len(gn_methods)
    for d in study["gn_diagnostics"]:
        assert d["steps"] > 0 and 0 < d["alpha_median"] <= 1 and d["passes_per_step"] > 0
    assert study["target_source"] == "auto" and 0 < study["target_loss"] < 10
    assert set(study["critical_batch"]) == set(methods) and len(study["best"]) == len(methods) * 2
    # the best baseline reaches the auto target within the budget at the largest batch, by construction
    assert any(b["steps_to_target"] is not None for b in study["best"]
               if b["batch_tokens"] == 2048 and b["optimizer"] in ("adamw", "muon", "soap", "shampoo"))
    for png in ("val_loss_largest_batch.png", "steps_to_target_vs_batch.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, png
    report = (out / "report.md").read_text(encoding="utf-8")
    for heading in ("## Protocol", "## Best setting per method and batch size", "## At the largest batch",
                    "## Critical batch size", "## Gauss-Newton diagnostics (selected runs)", "## All runs"):
        assert heading in report, heading
    for m in methods:
        assert f"| {m} | 512 |" in report and f"| {m} | 2K |" in report
    assert "(val_loss_largest_batch.png)" in report and "(steps_to_target_vs_batch.png)" in report


def test_smoke_study_end_to_end_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = ROOT / "experiments" / "smoke.toml"
    out = tmp_path / "smoke"
    methods = [m.name for m in load_spec(exp).methods]
    printed = _study(capsys, str(exp), "--out", str(out), "--threads", "1", "--quiet")
    assert "25 runs (warm-up + 24), 0 already finished, 25 to do" in printed.splitlines()[0]
    assert "study ETA" in printed and "writing the report" in printed
    _outputs_are_well_formed(out, 24, methods)
    # every run started from the warm-up's weights
    warm_final = json.loads((out / "warmup" / "summary.json").read_text())["final_val_loss"]
    for summary in out.glob("runs/*/B*/*/summary.json"):
        s = json.loads(summary.read_text())
        assert s["initial_val_loss"] == warm_final and s["config"]["init_from"] == str(out / "warmup")

    # a second invocation re-runs nothing (no file of any run changes) and rewrites the report
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/**/*") if p.is_file()}
    printed = _study(capsys, str(exp), "--out", str(out), "--threads", "1", "--quiet")
    assert "25 runs (warm-up + 24), 25 already finished, 0 to do" in printed
    assert " start " not in printed and "finished earlier, skipped" in printed
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("runs/**/*") if p.is_file()}

    # an interrupted study continues: a run killed after its checkpoint is resumed, a lost one restarted
    killed = out / "runs" / "adamw" / "B512" / "lr0.01"
    (killed / "summary.json").unlink()
    lost = out / "runs" / "soap" / "B2048" / "lr0.003"
    shutil.rmtree(lost)
    printed = _study(capsys, str(exp), "--out", str(out), "--threads", "1", "--quiet")
    assert "2 to do" in printed and "resume at step 24 adamw B=512 lr=0.01" in printed
    assert "start soap B=2048 lr=0.003" in printed and printed.count(" start ") == 1
    assert (killed / "summary.json").is_file() and (lost / "summary.json").is_file()
    _outputs_are_well_formed(out, 24, methods)

    # --dry-run and --report-only run nothing
    assert "0 of 25 runs to do" in _study(capsys, str(exp), "--out", str(out), "--dry-run")
    (out / "report.md").unlink()
    _study(capsys, str(exp), "--out", str(out), "--report-only", "--quiet")
    assert (out / "report.md").is_file()
    # a re-analysis at another target goes to its own folder; the study's own report stays as it was
    before = (out / "report.md").read_bytes()
    _study(capsys, str(exp), "--out", str(out), "--report-only", "--target-loss", "9", "--quiet")
    other = (out / "target-9" / "report.md").read_text(encoding="utf-8")
    assert "9.0000 (given on the command line)" in other and (out / "report.md").read_bytes() == before
    assert json.loads((out / "target-9" / "study.json").read_text())["target_loss"] == 9.0
    assert main(["study", str(exp), "--out", str(out), "--target-loss", "3"]) == 2
    assert "only apply to --report-only" in capsys.readouterr().err

    # a changed experiment never mixes with the old results
    changed = tmp_path / "changed.toml"
    changed.write_text(exp.read_text().replace("eval_tokens = 2048", "eval_tokens = 1024"), encoding="utf-8")
    assert main(["study", str(changed), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds a run of warmup" in err and "eval_tokens: 2048 -> 1024" in err
    assert main(["study", str(exp), "--out", str(out), "--only", "lion"]) == 2
    assert "has no method 'lion'" in capsys.readouterr().err


def test_run_actions_and_parallel_jobs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = tmp_path / "mini.toml"
    exp.write_text(MINIMAL.replace('micro_batch_size = 4', 'micro_batch_size = 4\neval_tokens = 256')
                   .replace("[methods.gn]", "[methods.gn]\nadam_lr = 1e-3"), encoding="utf-8")
    out = tmp_path / "study"
    spec = load_spec(exp)
    run = plan_runs(spec, out)[0]
    assert run_action(run) == "start"
    # a run stopped early (as by SIGTERM) is resumed, a finished one skipped
    warm = warmup_run(spec, out)
    train(dataclasses.replace(warm.config, quiet=True, threads=1))
    train(dataclasses.replace(run.config, stop_after=2, quiet=True, threads=1))
    assert run_action(run) == "resume"
    printed = _study(capsys, str(exp), "--out", str(out), "--jobs", "2", "--quiet")
    assert "resume at step 2 adamw B=256 lr=0.001" in printed and printed.count("/8 done ") == 8
    assert run_action(run) == "skip"
    assert len(list(out.glob("runs/*/B*/*/summary.json"))) == 8 and (out / "report.md").is_file()
    other = dataclasses.replace(run, config=dataclasses.replace(run.config, weight_decay=0.1))
    with pytest.raises(GnoptError, match="weight_decay: 0.0 -> 0.1"):
        run_action(other)


def test_seed_runs_follow_the_sweep_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the printed paths are relative to the working directory when short
    exp = tmp_path / "seeds.toml"
    exp.write_text(MINIMAL.replace("budget_tokens = 2048", "budget_tokens = 2048\nseeds = [0, 1]")
                   .replace("micro_batch_size = 4", "micro_batch_size = 4\neval_tokens = 256")
                   .replace("lr = [0.01, 0.02]", "lr = [0.02]\nadam_lr = 1e-3\nbatch_tokens = [512]"),
                   encoding="utf-8")
    out = tmp_path / "study"
    printed = _study(capsys, str(exp), "--out", str(out), "--threads", "1", "--quiet")
    assert "8 runs (warm-up + 5 + 2 seed runs), 0 already finished, 6 to do before the seed runs" in printed
    assert "sweep done; seed runs at B=512 with seeds 1 of the best settings" in printed
    # it ends with the comparison at the largest batch, as a table, and says where the report is
    tail = printed[printed.index("Study 'seeds': best setting of each method at batch 512 tokens"):]
    header = tail.splitlines()[1].split()
    assert header[:5] == ["method", "lr", "steps", "to", "target"]
    assert any(line.startswith("adamw ") for line in tail.splitlines())
    assert any(line.startswith("gn ") for line in tail.splitlines())
    assert f"Report: {os.path.join('study', 'report.md')}" in tail
    # adamw's 2-point grid puts its best at an edge, whichever it is; gn's single lr has no edge
    edge_line = next(line for line in tail.splitlines() if line.startswith("Best setting at an edge"))
    assert "adamw at 512 (" in edge_line and "gn at" not in edge_line
    study = json.loads((out / "study.json").read_text())
    best = {(b["method"], b["batch_tokens"]): b for b in study["best"]}
    for method in ("adamw", "gn"):
        chosen = best[(method, 512)]
        folder = out / "runs" / method / "B512"
        seeded = [p for p in folder.iterdir() if p.name.endswith("-seed1")]
        # the seed run re-runs the setting the sweep selected, with the other data seed, from the warm-up
        assert [p.name for p in seeded] == [f"lr{chosen['lr']:g}" + (
            f"-alr{chosen['adam_lr']:g}" if chosen["adam_lr"] is not None else "") + "-seed1"]
        cfg = json.loads((seeded[0] / "config.json").read_text())["config"]
        assert cfg["seed"] == 1 and cfg["init_from"] == str(out / "warmup") and cfg["lr"] == chosen["lr"]
    runs = json.loads((out / "runs.json").read_text())
    assert len(runs) == 7 and sorted(r["seed"] for r in runs) == [0, 0, 0, 0, 0, 1, 1]
    ratios = {(r["numerator"], r["denominator"], r["metric"]): r for r in study["seeds"]["ratios"]}
    seed_runs = {(r["method"], r["seed"]): r for r in study["seed_runs"]}
    for seed, ratio in ratios[("best baseline", "gn", "steps")]["per_seed"].items():
        gn = best[("gn", 512)] if seed == "0" else seed_runs[("gn", 1)]
        ada = best[("adamw", 512)] if seed == "0" else seed_runs[("adamw", 1)]
        # whole steps on both sides (issue 24), never the interpolated count
        assert ratio == pytest.approx(ada["steps_to_target"] / gn["steps_to_target"])
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "## Seeds at the largest batch (512 tokens)" in report and "steps, seed 1" in report
    assert "(seed 1)" in report  # the seed runs are listed with every other run
    # a second invocation re-runs nothing, seed runs included
    printed = _study(capsys, str(exp), "--out", str(out), "--threads", "1", "--quiet")
    assert " start " not in printed and printed.count("finished earlier, skipped") == 7
    # once the sweep is done, --dry-run plans the actual seed runs (here: all finished), not stand-ins
    printed = _study(capsys, str(exp), "--out", str(out), "--dry-run")
    assert "0 of 8 runs to do" in printed and "at most" not in printed and "-seed1" in printed
