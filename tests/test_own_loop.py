"""docs/own-loop.md runs as written: its code block trains a Hugging Face causal LM with GaussNewton on a
Hugging Face dataset read from a local text file (offline), driven by a torch OneCycleLR scheduler."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "own-loop.md"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_guide_trains_offline_on_a_local_file(corpus: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)  # the checkpoint lands here
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    namespace: dict[str, object] = {"__name__": "own_loop_guide"}
    exec(compile(blocks[0], str(GUIDE), "exec"), namespace)
    losses = namespace["train"](str(corpus), steps=4, seq_len=32, inner_steps=2)  # type: ignore[operator]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert (tmp_path / "gn-checkpoint.pt").is_file()
