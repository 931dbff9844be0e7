"""The files of a run folder, and the one reader of its ``metrics.jsonl`` (training, the study, analysis).

What ``gnopt train --out DIR`` leaves in ``DIR`` (see :mod:`gnopt.train` for what each holds):
``config.json`` (:data:`CONFIG_NAME`), ``metrics.jsonl`` (:data:`METRICS_NAME`), ``summary.json``
(:data:`SUMMARY_NAME`) and ``checkpoint.pt`` (:data:`CHECKPOINT_NAME`); :data:`RUN_FILES` are the files a run
owns (``--overwrite`` deletes these and nothing else).

``metrics.jsonl`` holds one JSON object per line: a step line (``step``, ``tokens``, ``loss``, ...) or an
evaluation line (``"type": "eval"``). :func:`iter_metrics` reads it: a missing file is empty, and a line that
is not a JSON object with an integer ``step`` (a torn last line of a killed run) is skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
CHECKPOINT_NAME = "checkpoint.pt"
#: The files a run owns in its output directory (``--overwrite`` deletes these and nothing else).
RUN_FILES: tuple[str, ...] = (CONFIG_NAME, METRICS_NAME, SUMMARY_NAME, CHECKPOINT_NAME)
#: ``summary.json`` ``stop_reason`` of a run that stopped at its ``stop_at_loss`` (:mod:`gnopt.train`).
STOP_AT_LOSS_REASON = "stop_at_loss"


def recorded_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The config a run folder records (``config.json``'s ``"config"``), or None when there is none (no
    folder, no file, a torn or foreign file)."""
    try:
        data = json.loads((Path(run_dir) / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    config = data.get("config") if isinstance(data, dict) else None
    return config if isinstance(config, dict) else None


def iter_metrics(run_dir: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(line, record)`` for every readable line of ``run_dir/metrics.jsonl``, in order."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            yield line, rec


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of ``run_dir/metrics.jsonl`` (step and evaluation lines), in order."""
    return [rec for _, rec in iter_metrics(run_dir)]


def is_step(rec: dict[str, Any]) -> bool:
    """Whether a metrics record is a step line (not an evaluation)."""
    return "type" not in rec
