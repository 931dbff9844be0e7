"""The repository cites only itself: no design doc outside it, no absolute path of a machine."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Where a user of the package or a reader of the repository would follow a reference.
SCANNED = ("src", "experiments", "docs", "benchmarks", "README.md")
#: A design note outside the repository, or an absolute home/work path of some machine.
SUFFIXES = {".py", ".md", ".toml", ".sh", ".json", ".csv"}
FORBIDDEN = re.compile(r"shared/design|/work/|/home/[a-z]|/Users/[A-Za-z]")


def _files() -> list[Path]:
    out: list[Path] = []
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            out.append(path)
            continue
        out += [p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES
                and "egg-info" not in p.parts]
    return out


def test_no_reference_outside_the_repository() -> None:
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
            for p in _files() for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if FORBIDDEN.search(line)]
    assert not hits, "references outside the repository:\n" + "\n".join(hits)


def test_method_page_exists_and_is_cited() -> None:
    assert (ROOT / "docs" / "method.md").is_file()
    source = (ROOT / "src" / "gnopt" / "optim" / "gauss_newton.py").read_text(encoding="utf-8")
    assert "docs/method.md" in source

