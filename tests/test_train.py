"""The training loop: outputs, target recording, exact resume, atomic checkpoints, the README commands."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import torch
from _helpers import read_metrics

import gnopt.checkpoint as checkpoint_mod
import gnopt.train as train_mod
from gnopt.checkpoint import load_checkpoint
from gnopt.cli import main
from gnopt.config import TrainConfig
from gnopt.model import build_model

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--data", str(corpus), "--preset", "tiny", "--tokenizer", "bytes", "--optimizer", "muon",
        "--steps", "6", "--batch-tokens", "256", "--micro-batch-size", "4", "--eval-every", "2",
        "--eval-tokens", "1024", "--threads", "1", "--quiet", "--out", str(out), *extra,
    ]


def losses(records: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(r.get("type", "step"), r["step"], r.get("tokens"), r.get("loss"), r.get("val_loss"))
            for r in records]


def test_outputs_and_summary_fields(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(tiny_args(corpus, out)) == 0
    printed = capsys.readouterr().out
    assert 'optimizer = "muon"' in printed and "batch_tokens = 256" in printed  # resolved config printed

    summary = json.loads((out / "summary.json").read_text())
    for key in ("optimizer", "preset", "batch_tokens", "steps", "tokens", "train_tokens", "ls_tokens",
                "passes", "final_val_loss", "steps_to_target", "tokens_to_target", "wall_seconds", "n_params",
                "config", "data"):
        assert key in summary, key
    assert summary["steps"] == 6 and summary["tokens"] == 6 * 256 == summary["train_tokens"]
    assert summary["ls_tokens"] == 0 and summary["passes"] == 12 and summary["completed"] is True
    assert summary["steps_to_target"] is None and summary["tokens_to_target"] is None
    assert summary["n_params"] == sum(p.numel() for p in build_model("tiny").parameters())
    assert summary["config"]["micro_batch_size"] == 4 and summary["data"]["tokenizer"] == "bytes"
    assert summary["final_val_loss"] < summary["initial_val_loss"]

    recs = read_metrics(out)
    steps = [r for r in recs if "type" not in r]
    evals = [r for r in recs if r.get("type") == "eval"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [0, 2, 4, 6]
    for r in steps:
        assert {"step", "tokens", "loss", "lr", "grad_norm", "wall", "train_tokens", "ls_tokens", "passes",
                "adam_lr", "skipped"} <= set(r)
    assert evals[-1]["val_loss"] == summary["final_val_loss"]

    state = load_checkpoint(out / "checkpoint.pt")  # weights_only=True inside
    assert state["counters"]["step"] == 6 and set(state) >= {"model", "stepper", "batcher", "rng", "config"}


def test_steps_to_target_is_the_first_evaluated_crossing(corpus: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    assert main(tiny_args(corpus, ref, "--eval-every", "1")) == 0
    evals = [r for r in read_metrics(ref) if r.get("type") == "eval"]
    target = evals[3]["val_loss"] + 1e-9  # reached at step 3 at the latest
    first = next(r for r in evals if r["val_loss"] <= target)

    out = tmp_path / "target"
    assert main(tiny_args(corpus, out, "--eval-every", "1", "--target-loss", repr(target))) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_to_target"] == first["step"] and summary["tokens_to_target"] == first["tokens"]
    assert summary["target_loss"] == target


def test_resume_after_a_crash_is_bitwise_identical(corpus: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    straight = tmp_path / "straight"
    assert main(tiny_args(corpus, straight, "--ckpt-every", "0")) == 0

    # Crash during step 5 of a run that checkpoints every 3 steps: metrics.jsonl then holds steps 1-4,
    # the checkpoint step 3.
    crashed = tmp_path / "crashed"
    real_build = train_mod.build_stepper

    def crashing_build(cfg: TrainConfig, model: torch.nn.Module) -> Any:
        stepper = real_build(cfg, model)
        real_step, calls = stepper.step, [0]

        def step(batches: Any) -> dict[str, float]:
            calls[0] += 1
            if calls[0] == 5:
                raise RuntimeError("simulated crash")
            return real_step(batches)

        stepper.step = step  # type: ignore[method-assign]
        return stepper

    monkeypatch.setattr(train_mod, "build_stepper", crashing_build)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(tiny_args(corpus, crashed, "--ckpt-every", "3"))
    monkeypatch.setattr(train_mod, "build_stepper", real_build)
    assert max(r["step"] for r in read_metrics(crashed)) == 4
    assert load_checkpoint(crashed / "checkpoint.pt")["counters"]["step"] == 3

    assert main(tiny_args(corpus, crashed, "--ckpt-every", "3", "--resume")) == 0
    a, b = read_metrics(straight), read_metrics(crashed)
    assert losses(a) == losses(b)  # exact ==, no duplicated or missing line
    s1 = json.loads((straight / "summary.json").read_text())
    s2 = json.loads((crashed / "summary.json").read_text())
    assert s1["final_val_loss"] == s2["final_val_loss"] and s1["tokens"] == s2["tokens"]


@pytest.mark.parametrize("optimizer", ["adamw", "soap", "gn"])
def test_stop_after_then_resume_is_bitwise_identical(corpus: Path, tmp_path: Path, optimizer: str) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(tiny_args(corpus, straight, "--optimizer", optimizer)) == 0
    assert main(tiny_args(corpus, split, "--optimizer", optimizer, "--stop-after", "3")) == 0
    partial = json.loads((split / "summary.json").read_text())
    assert partial["completed"] is False and partial["steps"] == 3
    assert main(tiny_args(corpus, split, "--optimizer", optimizer, "--resume")) == 0
    assert losses(read_metrics(straight)) == losses(read_metrics(split))


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.pt"
    checkpoint_mod.save_checkpoint(path, {"x": torch.arange(3)})
    before = path.read_bytes()

    def broken_save(obj: Any, fh: Any) -> None:
        fh.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_mod.torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoint_mod.save_checkpoint(path, {"x": torch.arange(5)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind
    assert torch.equal(load_checkpoint(path)["x"], torch.arange(3))


# ------------------------------------------------------------------------------------------------------
# README and CI stay honest
# ------------------------------------------------------------------------------------------------------


def readme_commands() -> tuple[str, str]:
    """(main `gnopt study` command, test command) from the README's first two bash blocks."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    main_cmd = next(line.split("#")[0].strip() for line in blocks[0].splitlines()
                    if line.startswith("gnopt study "))
    *installs, test_cmd = (line.split("#")[0].strip() for line in blocks[1].splitlines() if line.strip())
    assert installs == ["pip install -c constraints.txt -e '.[dev]'",
                        "pip install -c constraints.txt --no-deps curvlinops-for-pytorch==3.0.1"]
    # the plot needs matplotlib
    assert blocks[0].splitlines()[0] == "pip install -c constraints.txt -e '.[plot]'"
    return main_cmd, test_cmd


def test_ci_runs_exactly_the_readme_test_command() -> None:
    _, test_cmd = readme_commands()
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    assert lines[0] == "set -euo pipefail"
    assert "pip install -c constraints.txt -e '.[dev]'" in lines
    assert "pip install -c constraints.txt --no-deps curvlinops-for-pytorch==3.0.1" in lines
    assert "ruff check src tests benchmarks" in lines
    assert lines[-1] == test_cmd == "pytest -q --durations=20"  # the slowest tests, in every CI log


def test_readme_main_command_runs_at_smoke_size(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The README's main command on its experiment file, shrunk to smoke size (the same methods, corpus,
    model and protocol; tiny batches, budgets and evaluations): it ends in the printed comparison table and
    writes the plot and the report."""
    main_cmd, _ = readme_commands()
    argv = shlex.split(main_cmd)
    assert argv[:3] == ["gnopt", "study", "experiments/quickstart.toml"]
    exp = tomllib.loads((ROOT / argv[2]).read_text(encoding="utf-8"))
    assert "data" not in exp["base"]  # the embedded default corpus: no download
    largest = max(exp["experiment"]["batch_tokens"])
    exp["experiment"].update(batch_tokens=[256, 512], budget_tokens=1024, evals_per_run=2)
    exp["base"].update(micro_batch_size=2, eval_tokens=512, warmup_steps=0)
    exp["warmup"].update(batch_tokens=256, steps=2, warmup_steps=0)
    for method in exp["methods"].values():
        if "batch_tokens" in method:
            method["batch_tokens"] = [512 if b == largest else 256 for b in method["batch_tokens"]]
    path = tmp_path / "quickstart.toml"
    path.write_text(tomli_w.dumps(exp), encoding="utf-8")
    out = tmp_path / "study"
    assert main(["study", str(path), *argv[3:], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("Study 'quickstart': best setting of each method at batch 512 tokens"):]
    rows = [line.split()[0] for line in table.splitlines()[2:] if line and not line[0].isupper()]
    assert rows == list(exp["methods"])
    assert (out / "val_loss_largest_batch.png").read_bytes()[:4] == b"\x89PNG"
    assert "## At the largest batch" in (out / "report.md").read_text(encoding="utf-8")


def test_readme_single_model_command_runs_at_smoke_size(tmp_path: Path) -> None:
    """The README's `gnopt train` example, unchanged except: 2 steps, a small evaluation, a temp --out."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    train_cmd = next(line for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
                     for line in block.splitlines() if line.startswith("gnopt train --preset cpu-small"))
    argv = shlex.split(train_cmd)
    assert "--data" not in argv  # embedded corpus, no download
    args = argv[1:]
    for flag, value in {"--steps": "2", "--out": str(tmp_path / "demo")}.items():
        args[args.index(flag) + 1] = value
    args += ["--eval-tokens", "2048", "--quiet", "--threads", "1"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["preset"] == "cpu-small" and summary["optimizer"] == "gn"
    assert summary["final_val_loss"] < summary["initial_val_loss"]


@pytest.mark.parametrize("doc", ["README.md", "docs/results/cpu.md", "docs/results/cpu/report.md",
                                 "docs/results/cpu-lm.md", "docs/results/cpu-lm/report.md",
                                 "docs/architecture.md"])
def test_relative_links_in_the_docs_point_at_files(doc: str) -> None:
    """Every relative markdown link or image (results pages, plots, experiment files) exists in the repo."""
    path = ROOT / doc
    links = re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8"))
    relative = [link.split("#")[0] for link in links if "://" not in link and not link.startswith("#")]
    missing = [link for link in relative if link and not (path.parent / link).exists()]
    assert not missing, f"{doc} links to missing files: {missing}"
