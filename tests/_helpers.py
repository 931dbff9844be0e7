"""Helpers shared by the test modules (numerical comparisons, run folders, processes)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gnopt.run_folder import METRICS_NAME

ROOT = Path(__file__).resolve().parents[1]


def rel_err(a: Tensor, b: Tensor) -> float:
    """max |a − b| / max |b| (b is the reference)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def theta_flat(model: nn.Module) -> Tensor:
    """A copy of the model's parameters, flattened and concatenated."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """Every line of a run's metrics.jsonl (strict: a line that does not parse fails the test)."""
    import json

    return [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_without_dist() -> dict[str, str]:
    """This process's environment without torchrun's variables, importing this checkout's ``src``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT / "src")
    return env
