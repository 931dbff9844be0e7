"""The paper's recipes (experiments/paper-*.toml) parse and plan, and ``--dry-run`` estimates GPU-hours from
the measured GPU costs, without data or network."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gnopt.cli import main
from gnopt.study.estimate import GPU_SECONDS, parameter_count, seconds_per_token
from gnopt.study.spec import load_spec, plan_runs, warmup_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, preset, target", [("paper-45m", "45m", None), ("paper-150m", "150m", 3.25)])
def test_paper_recipes_parse_and_plan(name: str, preset: str, target: float | None, tmp_path: Path) -> None:
    spec = load_spec(ROOT / "experiments" / f"{name}.toml")
    assert spec.base["preset"] == preset and spec.base["seq_len"] == 1024
    assert spec.base["data"] == "hf:allenai/c4:en" and spec.base["tokenizer"] == "hf:google-t5/t5-base"
    assert spec.target_loss == target
    assert [m.optimizer for m in spec.methods] == ["adamw", "muon", "soap", "gn", "gn-layerwise"]
    assert all(b % (1 << 20) == 0 for b in spec.batch_tokens) and spec.largest_batch >= 40 * (1 << 20)
    # The budget is Chinchilla's 20 tokens per parameter (T5 vocabulary), the warm start 5% of it.
    n_params = parameter_count(preset, vocab_size=32100)
    assert spec.budget.tokens == pytest.approx(20 * n_params, rel=1e-3)
    warm = warmup_run(spec, tmp_path)
    assert warm.steps * warm.batch_tokens == pytest.approx(0.05 * spec.budget.tokens, rel=0.02)
    runs = plan_runs(spec, tmp_path)
    assert len(runs) == 4 * (4 + 4 + 4 + 2 + 2)
    for r in runs:
        assert r.config.seq_len == 1024 and r.config.max_tokens == 2_000_000_000
        assert r.steps == math.ceil(spec.budget.tokens / r.batch_tokens)


def test_dry_run_prints_the_plan_and_gpu_hours_without_data(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "study"
    assert main(["study", str(ROOT / "experiments" / "paper-150m.toml"), "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert not out.exists()  # a dry run writes nothing
    assert "65 of 65 runs to do" in text and "training tokens" in text
    assert "NVIDIA H100 80GB HBM3" in text and "scaled by the parameter count" in text
    total = [line for line in text.splitlines() if line.split("]")[-1].split()[:1] == ["total"]]
    assert len(total) == 1
    hours = float(total[0].split()[-1].replace(",", ""))
    # Recompute the total from the measured costs: every run's tokens × its method's seconds per token.
    spec = load_spec(ROOT / "experiments" / "paper-150m.toml")
    scale = parameter_count("150m") / parameter_count("45m")
    expected = sum(r.steps * r.batch_tokens * seconds_per_token(r.optimizer, r.config.inner_optimizer, scale)
                   for r in [warmup_run(spec, out), *plan_runs(spec, out)]) / 3600
    assert hours == pytest.approx(expected, abs=0.1)
    assert "lower bound" in text  # Muon / SOAP have no GPU measurement and say so


def test_gpu_costs_match_the_benchmark_results_file() -> None:
    data = json.loads((ROOT / "benchmarks" / "results" / "gn_step_cost_cuda.json").read_text())
    assert data["config"]["preset"] == "45m" and data["config"]["micro_batch"] == 8
    assert data["config"]["inner_steps"] == 4 and not data["config"]["tf32"]
    for key, (seconds, tokens) in GPU_SECONDS.items():
        assert seconds == data["results"][key]["seconds"], key
        per_step = 8 * 1024 * (1 if key == "adamw" else data["config"]["inner_steps"])
        assert tokens == per_step
