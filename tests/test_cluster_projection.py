"""benchmarks/cluster_projection.py: whole steps read from runs.csv, the ring model, GN's collectives as it
runs, and a page written end to end."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import cluster_projection as cp  # noqa: E402


def test_points_are_the_whole_steps_of_the_selected_runs() -> None:
    pts = {(p.method, p.batch): p for p in cp.load_points()}
    rows = [r for r in csv.DictReader(cp.RUNS.open()) if r["selected"] == "True" and r["seed"] == "0"]
    for r in rows:
        key = (r["method"], int(r["batch_tokens"]))
        if r["method"] in cp.METHODS and r["steps_to_target"]:
            assert pts[key].steps == int(r["steps_to_target"])
            assert pts[key].steps * pts[key].step_seconds == pytest.approx(float(r["wall_to_target"]))
        else:
            assert key not in pts  # a miss (AdamW, SOAP at 1M) is no point


def test_ring_all_reduce_and_one_worker() -> None:
    assert cp.ring(1, 1e9, 1e9, 1e-5) == 0.0
    assert cp.ring(4, 8e9, 1e9, 1e-5) == pytest.approx(6 * 1e-5 + 1.5 * 8)
    pt = cp.Point("muon", 65536, 22, 8.0, 32)
    coll = {"tensor_per_inner": 1.0, "tensor_fixed": 0.0, "scalar_per_inner": 1.0, "scalar_fixed": 0.0}
    assert cp.step_time(pt, 1, coll) == pytest.approx(8.0)  # P = 1: the measured step
    assert math.isinf(cp.step_time(pt, 1024, coll))  # 64 tokens per worker: less than a sequence
    assert math.isinf(cp.step_time(cp.Point("gn", 65536, 8, 19.0, 32), 32, coll))  # 16 rows


def test_gn_issues_one_parameter_sized_all_reduce_per_inner_step() -> None:
    coll = cp.count_gn_collectives()
    assert coll["tensor_per_inner"] == pytest.approx(1.0)
    assert coll["tensor_fixed"] == pytest.approx(0.0, abs=1e-9)
    assert coll["scalar_per_inner"] >= 1.0


def test_page_is_written(tmp_path: Path) -> None:
    assert cp.main(["--out", str(tmp_path), "--no-plot"]) == 0
    page = (tmp_path / "cluster-projection.md").read_text()
    assert "## At the same P" in page and "beta /10" in page and "GN S+1, baselines S-1" in page
