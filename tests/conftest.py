"""Shared test fixtures: importable ``src/``, an isolated gnopt cache, and the shared text corpus."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))

#: The shared gutenberg-fiction corpus lies beside the repository (never inside it).
GUTENBERG = ROOT.parent / "shared" / "data" / "gutenberg-fiction"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny numerical tests (on 2 shared cores more threads only spin);
    restored after the module. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_gnopt_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every test's token cache out of ~/.cache/gnopt."""
    monkeypatch.setenv("GNOPT_CACHE", str(tmp_path_factory.getbasetemp() / "gnopt-cache"))


@pytest.fixture(scope="session")
def gutenberg_dir() -> Path:
    if not (GUTENBERG / "train.txt").is_file():
        pytest.skip(f"shared corpus not found at {GUTENBERG}")
    return GUTENBERG


@pytest.fixture(scope="session")
def english_text(gutenberg_dir: Path) -> str:
    """About 200 KB of real English prose (a slice of gutenberg-fiction train.txt, cut at line breaks)."""
    with open(gutenberg_dir / "train.txt", "rb") as f:
        f.seek(1_000_000)
        raw = f.read(200_000)
    return raw[raw.index(b"\n") + 1 : raw.rindex(b"\n") + 1].decode("utf-8")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~60 KB of repetitive but learnable text (plenty for tiny: 32-token windows, 4 per micro-batch)."""
    import random

    rng = random.Random(0)
    words = "the a quick brown fox jumps over lazy dog cat sat on mat while birds sing in green trees".split()
    lines = [" ".join(rng.choice(words) for _ in range(10)) + "." for _ in range(1200)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
