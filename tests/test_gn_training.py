"""Gauss-Newton through the training harness: `gnopt train --optimizer gn | gn-prox-linear | gn-layerwise`.

The numerical core is checked against dense references in test_gauss_newton.py; here: GN really trains
a language model faster per step than tuned AdamW at the same batch, every variant and inner solver runs
end to end through the CLI, and tokens are counted honestly (line-search tokens separately).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gnopt.cli import main


@pytest.fixture(scope="module")
def prose(tmp_path_factory: pytest.TempPathFactory, gutenberg_dir: Path) -> Path:
    """400 KB of train text and 60 KB of held-out books from gutenberg-fiction."""
    d = tmp_path_factory.mktemp("gt")
    for name, size in (("train.txt", 400_000), ("valid.txt", 60_000)):
        raw = (gutenberg_dir / name).read_bytes()[:size]
        (d / name).write_bytes(raw[: raw.rindex(b"\n") + 1])
    return d


def _train(prose: Path, out: Path, *args: str) -> dict:
    argv = ["train", "--data", str(prose), "--preset", "tiny", "--tokenizer", "bytes", "--micro-batch-size",
            "16", "--eval-tokens", "8192", "--threads", "1", "--quiet", "--out", str(out), *args]
    assert main(argv) == 0
    return json.loads((out / "summary.json").read_text())


def test_gn_reaches_target_in_fewer_steps_than_tuned_adamw(prose: Path, tmp_path: Path) -> None:
    """Same data, same batch (4096 tokens), same budget: AdamW at three learning rates vs GN at one."""
    common = ["--steps", "20", "--batch-tokens", "4096", "--eval-every", "2", "--target-loss", "3.45"]
    gn = _train(prose, tmp_path / "gn", "--optimizer", "gn", "--lr", "0.03", "--adam-lr", "3e-3", *common)
    assert gn["steps_to_target"] is not None and gn["steps_to_target"] <= 12, gn["steps_to_target"]
    for lr in ("3e-3", "1e-2", "3e-2"):
        adamw = _train(prose, tmp_path / f"adamw{lr}", "--optimizer", "adamw", "--lr", lr, *common)
        reached = adamw["steps_to_target"]
        assert reached is None or reached > gn["steps_to_target"], (lr, reached)


@pytest.mark.parametrize(
    "variant",
    [
        ["--optimizer", "gn-prox-linear"],
        ["--optimizer", "gn-layerwise"],
        ["--optimizer", "gn", "--inner-optimizer", "adamw", "--lr", "3e-3"],
        ["--optimizer", "gn", "--inner-optimizer", "soap", "--lr", "3e-3"],
        ["--optimizer", "gn", "--inner-optimizer", "shampoo", "--lr", "1e-3"],
        ["--optimizer", "gn", "--inner-optimizer", "cg", "--damping", "1e-3", "--cg-max-iters", "5"],
        ["--optimizer", "gn", "--ls-zero", "--reset-below", "0.5", "--ema-decay", "0.9",
         "--gn-schedule", "global_cosine"],
    ],
    ids=["prox-linear", "layerwise", "inner-adamw", "inner-soap", "inner-shampoo", "cg", "options"],
)
def test_gn_variants_train_end_to_end(prose: Path, tmp_path: Path, variant: list[str]) -> None:
    s = _train(prose, tmp_path / "run", "--steps", "3", "--batch-tokens", "1024", "--eval-every", "3",
               *variant)
    assert s["final_val_loss"] < s["initial_val_loss"], s
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x.get("type") != "eval"]
    assert len(steps) == 3
    micro_tokens = 16 * 32  # micro-batch size × tiny's seq_len
    n = 1024 // micro_tokens
    for rec in steps:
        assert rec["train_tokens"] == n * micro_tokens
        # fresh line-search batches, counted separately: the model search's ⌈N/8⌉ by default
        assert rec["ls_micro_batches"] == 1 and rec["ls_tokens"] == micro_tokens
        assert rec["alpha"] is None or 0.0 <= rec["alpha"] <= 1.0
        assert rec["passes"] > n  # more than n forward+backward equivalents: JVPs and line search counted
    assert s["train_tokens"] == 3 * n * micro_tokens and s["ls_tokens"] == 3 * micro_tokens
    assert s["tokens"] == s["train_tokens"] + s["ls_tokens"]


def test_inner_steps_sets_the_gn_batch_and_must_agree_with_batch_tokens(
    prose: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = _train(prose, tmp_path / "n3", "--optimizer", "gn", "--inner-steps", "3", "--steps", "1")
    assert s["config"]["batch_tokens"] == 3 * 16 * 32 and s["train_tokens"] == 3 * 16 * 32
    argv = ["train", "--data", str(prose), "--preset", "tiny", "--optimizer", "gn", "--inner-steps", "3",
            "--batch-tokens", "1000", "--out", str(tmp_path / "bad")]
    assert main(argv) == 2
    assert "disagree" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_default_inner_learning_rates_follow_the_inner_optimizer() -> None:
    from gnopt.config import TrainConfig, resolve

    lrs = {io: (resolve(TrainConfig(optimizer="gn", inner_optimizer=io)).lr,
                resolve(TrainConfig(optimizer="gn", inner_optimizer=io)).adam_lr)
           for io in ("muon", "adamw", "soap", "shampoo")}
    assert lrs == {"muon": (0.01, 1e-3), "adamw": (1e-3, None), "soap": (3e-3, None), "shampoo": (1e-3, None)}
    assert resolve(TrainConfig(optimizer="gn", inner_optimizer="adamw", lr=5e-4)).lr == 5e-4
