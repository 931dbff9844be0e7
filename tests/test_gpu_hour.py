"""benchmarks/gpu_hour.py's CPU mode: the three parts of the GPU script run end to end on the tiny preset,
so the command prepared for the first GPU session cannot rot (its numbers say nothing about a GPU)."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_hour  # noqa: E402


def test_cpu_mode_runs_every_part_and_writes_the_results(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc = gpu_hour.main(["run", "--cpu", "--out", str(out), "--study-dir", str(tmp_path / "study")])
    summary = json.loads((out / "summary.json").read_text())
    assert rc == 0, summary
    assert set(summary["parts"]) >= {"tests", "step_cost_fp32", "comparison"}
    assert all(p["rc"] == 0 for p in summary["parts"].values())
    assert "skipped" in (out / "test_cuda.txt").read_text()  # no CUDA here: every CUDA test skips
    cost = json.loads((out / "gn_step_cost_cuda.json").read_text())
    assert set(cost["results"]) == {"adamw", "muon", "gn_default", "layerwise"}
    assert all(r["tokens_per_second"] > 0 for r in cost["results"].values())
    comp = (out / "comparison" / "comparison.md").read_text()
    assert "| muon | 0.02 / 0.001 |" in comp and "| gn | 0.01 / 0.001 |" in comp
    exp = tomllib.loads((out / "comparison" / "experiment.toml").read_text())
    assert not Path(exp["base"]["data"]).is_absolute()  # committed with the results: no machine path
    assert json.loads((out / "device.json").read_text())["mode"] == "cpu"


def test_gpu_experiment_is_the_documented_one(tmp_path: Path) -> None:
    """The GPU study: 45M at 1M tokens per step, 8 steps, Muon at two lrs, GN at the library defaults."""
    exp = tomllib.loads(gpu_hour.experiment(Path("entry"), cpu=False))
    assert exp["experiment"]["batch_tokens"] == [2**20] and exp["experiment"]["steps"] == {"1048576": 8}
    assert exp["base"]["preset"] == "45m" and exp["base"]["device"] == "cuda"
    assert exp["methods"]["muon"]["lr"] == [0.02, 0.04] and exp["methods"]["gn"]["lr"] == [0.01]
    toml = tmp_path / "e.toml"
    toml.write_text(gpu_hour.experiment(tmp_path, cpu=False))
    from gnopt.study.spec import load_spec

    load_spec(toml)  # validates against the study's schema (no data is read)


def test_run_without_cuda_or_cache_is_one_error_line(capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    assert gpu_hour.main(["run", "--out", str(tmp_path), "--data", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.startswith("gpu_hour: error:")
