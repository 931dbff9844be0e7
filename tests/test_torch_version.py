"""The supported torch range: the runtime check, and pyproject.toml agreeing with it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import torch

from gnopt.cli import main
from gnopt.errors import GnoptError
from gnopt.torch_version import MIN_TORCH, check, parse

ROOT = Path(__file__).resolve().parents[1]


def test_parse_and_check() -> None:
    assert parse("2.13.0+cpu") == (2, 13) and parse("2.9.1") == (2, 9) and parse("3.0.0a0+git1") == (3, 0)
    check("2.9.0")
    check("2.13.0+cu128")
    with pytest.raises(GnoptError, match=r"gnopt needs torch >= 2\.9 .*this is torch 2\.8\.0"):
        check("2.8.0")
    with pytest.raises(GnoptError, match="cannot read the torch version"):
        check("nightly")


def test_pyproject_range_matches_the_check_and_the_installed_torch() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(r"torch\b", d)]
    m = re.fullmatch(r"torch>=(\d+)\.(\d+),<(\d+)\.(\d+)", spec.replace(" ", ""))
    assert m is not None, spec
    lower, upper = (int(m[1]), int(m[2])), (int(m[3]), int(m[4]))
    assert lower == MIN_TORCH
    assert lower <= parse(torch.__version__) < upper  # the torch this suite runs on is inside the range


def test_cli_on_a_too_old_torch_is_one_error(capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "__version__", "2.8.0")
    assert main(["info", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("gnopt: error: ")]
    assert len(lines) == 1 and "needs torch >= 2.9" in lines[0] and "Traceback" not in err
