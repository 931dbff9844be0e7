"""``gnopt study``: init_from, the experiment schema, the S(B) fit, and the smoke study end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from gnopt.cli import main
from gnopt.config import TrainConfig, fingerprint, resolve
from gnopt.errors import GnoptError
from gnopt.train import train

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------
# init_from: a run starts from another run's weights with a fresh optimizer
# ------------------------------------------------------------------------------------------------------


def _tiny(out: Path, **kw: object) -> TrainConfig:
    values: dict[str, object] = dict(preset="tiny", tokenizer="bytes", steps=3, batch_tokens=256,
                                     micro_batch_size=4, eval_every=0, eval_tokens=512, threads=1, quiet=True,
                                     out=str(out))
    values.update(kw)
    return TrainConfig(**values)  # type: ignore[arg-type]


def test_init_from_loads_the_weights_of_another_run(tmp_path: Path) -> None:
    first = train(_tiny(tmp_path / "first", optimizer="adamw"))
    second = train(_tiny(tmp_path / "second", optimizer="gn", init_from=str(tmp_path / "first")))
    # the same fixed validation set: the second run starts exactly where the first one ended
    assert second["initial_val_loss"] == first["final_val_loss"]
    assert second["initial_val_loss"] < first["initial_val_loss"]
    # a checkpoint file works as well as its run folder, and the path is part of the fingerprint
    third = resolve(_tiny(tmp_path / "third", init_from=str(tmp_path / "first" / "checkpoint.pt")))
    as_folder = resolve(_tiny(tmp_path / "third", init_from=str(tmp_path / "first")))
    assert fingerprint(third) != fingerprint(as_folder)
    assert train(third)["initial_val_loss"] == first["final_val_loss"]


def test_init_from_errors_are_clear_and_write_nothing(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(GnoptError, match="init_from: there is no checkpoint"):
        train(_tiny(tmp_path / "a", init_from=str(tmp_path / "missing")))
    assert not (tmp_path / "a").exists()
    train(_tiny(tmp_path / "small", optimizer="adamw"))
    args = ["train", "--preset", "tiny", "--tokenizer", "bytes", "--seq-len", "16", "--steps", "1",
            "--batch-tokens", "64", "--micro-batch-size", "4", "--eval-tokens", "64", "--threads", "1",
            "--quiet", "--out", str(tmp_path / "b"), "--init-from", str(tmp_path / "small")]
    assert main(args) == 0  # same shapes (RoPE tables are buffers, not weights): fine
    args[args.index("--preset") + 1] = "cpu-small"
    args[args.index("--out") + 1] = str(tmp_path / "c")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "init_from: the weights in" in err and "do not fit this model" in err
    assert not (tmp_path / "c").exists()
