"""Helpers shared by the benchmark scripts: process memory readings and the results files."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def status_mb(key: str) -> float:
    """A memory line of ``/proc/self/status`` in MB: ``VmRSS`` (now) or ``VmHWM`` (this process's peak;
    unlike ``ru_maxrss`` it is not inherited across fork + exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_name() -> str:
    """The CPU model and whether it has native bf16 (``avx512_bf16``/``amx_bf16``: torch Muon's
    Newton-Schulz runs in bf16), from ``/proc/cpuinfo``."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU"
    names = [ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")]
    model = names[0] if names else "CPU"
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in info]
    return f"{model}, {'+'.join(bf16) if bf16 else 'no native bf16'}"


#: Environment variables that restrict torch's CPU kernels (oneDNN's dispatcher, ATen's vectorized kernels).
ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def bf16_support() -> dict[str, Any]:
    """The CPU's native bf16 support as ``/proc/cpuinfo`` and torch see it: the ``avx512_bf16`` /
    ``amx_bf16`` flags, torch's CPU capability and oneDNN's bf16 support (both follow :data:`ISA_ENV`,
    which this also reports, with the command prefix that sets them)."""
    import torch

    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    env = {k: os.environ[k] for k in ISA_ENV if k in os.environ}
    return {
        "cpuinfo_flags": [f for f in ("avx512_bf16", "amx_bf16") if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "env": env,
        "env_prefix": "".join(f"{k}={v} " for k, v in env.items()),
    }


def publish(name: str, result: dict[str, Any], render: Callable[[dict[str, Any]], str], *,
            write: bool = True, folder: Path | None = None) -> str:
    """Render ``result`` as markdown and print it; with ``write``, also save it as
    ``benchmarks/results/<name>.json`` and ``.md`` (the table the README and closing notes quote), or in
    ``folder`` instead."""
    markdown = render(result)
    print(markdown)
    if write:
        out = RESULTS if folder is None else folder
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / f"{name}.md").write_text(markdown)
    return markdown
