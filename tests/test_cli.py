"""CLI: every bad input is one clear error, exit status 2, no traceback, and nothing is overwritten."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gnopt.cli import main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli-corpus") / "corpus.txt"
    path.write_text("".join(f"line {i}: the cat sat on the mat, the dog did not.\n" for i in range(800)),
                    encoding="utf-8")
    return path


def train_args(data: Path | str, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--data", str(data), "--preset", "tiny", "--tokenizer", "bytes", "--steps", "2",
        "--batch-tokens", "256", "--micro-batch-size", "4", "--eval-every", "0", "--eval-tokens", "512",
        "--threads", "1", "--quiet", "--out", str(out), *extra,
    ]


def run_err(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI expecting a user error; return its message."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("gnopt: error: ")]
    assert len(lines) == 1, captured.err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


@pytest.fixture(scope="module")
def finished_run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "done"
    assert main(train_args(corpus, out)) == 0
    return out


# ------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------


def test_missing_corpus(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    msg = run_err(capsys, train_args(tmp_path / "nope.txt", tmp_path / "out"))
    assert "does not exist" in msg and "nope.txt" in msg
    assert not (tmp_path / "out").exists()


def test_empty_corpus(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty" in run_err(capsys, train_args(empty, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_non_utf8_corpus(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 200)
    assert "UTF-8" in run_err(capsys, train_args(bad, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_corpus_too_small_for_one_batch(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    small = tmp_path / "small.txt"
    small.write_text("a few words only, but enough to hold out validation text.\n" * 4)
    msg = run_err(capsys, train_args(small, tmp_path / "out"))
    assert "too small" in msg
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------
# config values
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--optimizer", "sgd"], "unknown optimizer 'sgd'; valid optimizers: adamw, muon, soap, shampoo, gn"),
        (["--preset", "huge"], "unknown preset 'huge'; valid presets: tiny, cpu-small"),
        (["--lr", "0"], "lr must be positive"),
        (["--lr", "-1e-3"], "lr must be positive"),
        (["--lr", "nan"], "lr must be positive and finite"),
        (["--steps", "0"], "steps must be a positive integer"),
        (["--batch-tokens", "300"], "is not a multiple of the micro-batch tokens"),
        (["--micro-batch-size", "0"], "micro_batch_size must be a positive integer"),
        (["--min-lr-ratio", "1.5"], "min_lr_ratio must lie in [0.0, 1.0]"),
        (["--schedule", "step"], "unknown schedule 'step'"),
        (["--warmup-steps", "5"], "warmup_steps must lie in [0, steps=2]"),
        (["--grad-clip", "-1"], "grad_clip must be non-negative"),
        (["--tokenizer", "words"], "unknown tokenizer 'words'"),
        (["--inner-optimizer", "lbfgs"], "unknown inner optimizer 'lbfgs'"),
        (["--ema-decay", "1.0"], "ema_decay must lie in [0.0, 1.0)"),
        (["--lr", "abc"], "invalid float value: 'abc'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--resume", "--overwrite"], "contradict"),
    ],
)
def test_invalid_values(capsys: pytest.CaptureFixture[str], tmp_path: Path, corpus: Path,
                        extra: list[str], expected: str) -> None:
    assert expected in run_err(capsys, train_args(corpus, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


def test_toml_unknown_key_and_bad_type(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                       corpus: Path) -> None:
    cfg = tmp_path / "run.toml"
    args = train_args(corpus, tmp_path / "out", "--config", str(cfg))
    cfg.write_text('optimizer = "adamw"\nbatch_tokenz = 512\n')
    msg = run_err(capsys, args)
    assert "unknown config key 'batch_tokenz'" in msg and "did you mean 'batch_tokens'" in msg
    cfg.write_text('steps = "many"\n')
    assert "'steps' must be an integer" in run_err(capsys, args)
    cfg.write_text("steps = [1\n")
    assert "not valid TOML" in run_err(capsys, args)
    cfg.unlink()
    assert "does not exist" in run_err(capsys, args)
    assert not (tmp_path / "out").exists()


def test_toml_file_with_flag_override(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                      corpus: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('optimizer = "adamw"\nsteps = 50\nlr = 0.004\nwarmup-steps = 0\n')
    out = tmp_path / "out"
    assert main(train_args(corpus, out, "--config", str(cfg)) + ["--steps", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["steps"] == 1 and summary["config"]["lr"] == 0.004  # flag wins, file applies
    assert summary["optimizer"] == "adamw"
    # the printed resolved config is itself a loadable config file
    printed = capsys.readouterr().out
    toml_text = printed.split("\ndone:")[0]
    (tmp_path / "resolved.toml").write_text(toml_text)
    out2 = tmp_path / "out2"
    assert main(["train", "--config", str(tmp_path / "resolved.toml"), "--out", str(out2)]) == 0
    again = json.loads((out2 / "summary.json").read_text())
    assert again["fingerprint"] == summary["fingerprint"]


# ------------------------------------------------------------------------------------------------------
# output directory and resume
# ------------------------------------------------------------------------------------------------------


def test_resume_without_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path, corpus: Path) -> None:
    msg = run_err(capsys, train_args(corpus, tmp_path / "fresh", "--resume"))
    assert "no checkpoint" in msg
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (["--optimizer", "adamw"], "optimizer: 'muon' -> 'adamw'"),
        (["--preset", "cpu-small", "--batch-tokens", "2048"], "preset: 'tiny' -> 'cpu-small'"),
        (["--batch-tokens", "512"], "batch_tokens: 256 -> 512"),
        (["--seed", "1"], "seed: 0 -> 1"),
    ],
)
def test_resume_from_incompatible_checkpoint(capsys: pytest.CaptureFixture[str], finished_run: Path,
                                             corpus: Path, extra: list[str], field: str) -> None:
    before = snapshot(finished_run)
    msg = run_err(capsys, train_args(corpus, finished_run, "--resume", *extra))
    assert "cannot resume" in msg and field in msg
    assert snapshot(finished_run) == before


def test_resume_with_other_vocab_is_refused(capsys: pytest.CaptureFixture[str], finished_run: Path,
                                            corpus: Path) -> None:
    before = snapshot(finished_run)
    args = train_args(corpus, finished_run, "--resume")
    args[args.index("bytes")] = "bpe"
    msg = run_err(capsys, args + ["--vocab-size", "300"])
    assert "tokenizer: 'bytes' -> 'bpe'" in msg and "vocab_size: 256 -> 300" in msg
    assert snapshot(finished_run) == before


def test_out_dir_with_other_run_is_not_overwritten(capsys: pytest.CaptureFixture[str], finished_run: Path,
                                                   corpus: Path) -> None:
    before = snapshot(finished_run)
    msg = run_err(capsys, train_args(corpus, finished_run, "--lr", "0.05"))
    assert "holds a different run" in msg and "lr: 0.02 -> 0.05" in msg and "--overwrite" in msg
    msg = run_err(capsys, train_args(corpus, finished_run))
    assert "already holds this run" in msg and "--resume" in msg
    assert snapshot(finished_run) == before


def test_run_that_died_before_its_first_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                   corpus: Path) -> None:
    out = tmp_path / "run"
    assert main(train_args(corpus, out)) == 0
    (out / "checkpoint.pt").unlink()
    (out / "summary.json").unlink()
    before = snapshot(out)
    assert "no checkpoint to resume from; start it over with --overwrite" in run_err(
        capsys, train_args(corpus, out))
    assert "stopped before its first checkpoint" in run_err(capsys, train_args(corpus, out, "--resume"))
    assert snapshot(out) == before
    assert main(train_args(corpus, out, "--overwrite")) == 0


def test_overwrite_replaces_only_run_files(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                           corpus: Path) -> None:
    out = tmp_path / "run"
    assert main(train_args(corpus, out)) == 0
    (out / "notes.txt").write_text("keep me")
    assert main(train_args(corpus, out, "--overwrite", "--optimizer", "adamw")) == 0
    assert json.loads((out / "summary.json").read_text())["optimizer"] == "adamw"
    assert (out / "notes.txt").read_text() == "keep me"


def test_corrupt_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    msg = run_err(capsys, train_args(corpus, out, "--resume"))
    assert "cannot be read" in msg
    assert snapshot(out) == {"checkpoint.pt": b"not a checkpoint"}


# ------------------------------------------------------------------------------------------------------
# other subcommands and entry points
# ------------------------------------------------------------------------------------------------------


def test_study_needs_an_experiment_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert "EXPERIMENT.toml" in run_err(capsys, ["study"])  # the study itself: tests/test_study.py


def test_info_prints_block_counts(capsys: pytest.CaptureFixture[str], corpus: Path) -> None:
    assert main(["info", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "blocks.0" in out and "lm_head" in out and "total" in out
    assert main(["info", "--preset", "tiny", "--data", str(corpus), "--tokenizer", "bytes"]) == 0
    assert "train_tokens" in capsys.readouterr().out
    assert "unknown preset" in run_err(capsys, ["info", "--preset", "nope"])
    assert main(["info", "--preset", "45m"]) == 0  # shape-only model; training batch settings not checked
    assert "49,549,824" in capsys.readouterr().out


def test_prepare_prints_statistics(capsys: pytest.CaptureFixture[str], corpus: Path, tmp_path: Path) -> None:
    assert main(["prepare", "--data", str(corpus), "--tokenizer", "bytes"]) == 0
    out = capsys.readouterr().out
    assert "train_tokens" in out and "valid_tokens" in out
    assert "does not exist" in run_err(capsys, ["prepare", "--data", str(tmp_path / "missing")])


def test_python_dash_m_reports_errors_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gnopt", "train", "--optimizer", "nope", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")},
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("gnopt: error: unknown optimizer 'nope'") and "Traceback" not in proc.stderr


def test_config_takes_the_library_option_lists_and_imports_without_torch() -> None:
    """One home for every option: the config's lists are the library's (and precision.py's) objects, its
    line-search batch default is LineSearch.batches_for, and neither it nor the CLI imports torch."""
    code = ("import sys, gnopt.cli, gnopt.config; assert 'torch' not in sys.modules, 'torch imported'; "
            "import gnopt.optim.line_search as ls, gnopt.optim.schedules as sc, gnopt.precision as pr; "
            "c = gnopt.config; assert c.LS_KINDS is ls.LS_KINDS and c.LS_SOURCES is ls.LS_SOURCES; "
            "assert c.GN_SCHEDULES is sc.INNER_SCHEDULE_KINDS and c.PRECISIONS is pr.PRECISIONS; "
            "assert 'torch' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert proc.returncode == 0, proc.stderr
    from gnopt.config import TrainConfig, resolve
    from gnopt.optim import LineSearch

    cases = [("model", 16, 0.125, 2), ("model", 7, 0.3, 3), ("grid", 16, 0.5, 16), ("model", 1, 0.01, 1)]
    for kind, n, fraction, expected in cases:
        cfg = resolve(TrainConfig(preset="tiny", micro_batch_size=2, batch_tokens=n * 64, ls_kind=kind,
                                  ls_fraction=fraction))
        want = LineSearch(kind=kind, fraction=fraction if kind == "model" else None).batches_for(n)
        assert cfg.ls_batches == want == expected


def test_gnopt_error_is_a_value_error() -> None:
    """Users catch ``ValueError`` for bad arguments (torch.optim raises it): gnopt's refusals too."""
    from gnopt.errors import GnoptError
    from gnopt.optim import LineSearch

    assert issubclass(GnoptError, ValueError)
    with pytest.raises(ValueError, match="ls_range must be >= 1"):
        LineSearch(ls_range=0)
