"""Pretrained tokenizers (a tokenizer.json file, hf:NAME) and streamed, resumable corpora with a token budget.

Everything here is offline: the tokenizers are trained in ``tmp_path``, the "datasets" are local JSON files
streamed by ``datasets``, and the hub paths are checked to fail cleanly with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gnopt.data.stream as stream_mod
from gnopt.cli import main
from gnopt.data import prepare
from gnopt.data.tokenizer import PretrainedTokenizer
from gnopt.errors import GnoptError

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a quick brown fox jumps over lazy dog cat sat on mat while birds sing in green trees".split()


def _docs(n: int, seed: int, prefix: str = "") -> list[str]:
    rng = np.random.default_rng(seed)
    return [prefix + " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), 12)) + "." for _ in range(n)]


def _build_tokenizer(path: Path, vocab_size: int = 300, eos: bool = True) -> Path:
    """A tiny pretrained-style tokenizer.json: byte-level BPE with a ``</s>`` appended to each document
    (like T5's post-processor)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>"] if eos else [],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_docs(300, 0), trainer=trainer)
    if eos:
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def _jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)),
                    encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ tokenizers


def test_pretrained_tokenizer_file_prepares_and_keys_the_cache(tmp_path: Path, corpus: Path) -> None:
    tok_path = _build_tokenizer(tmp_path / "tok" / "tokenizer.json")
    cache = tmp_path / "cache"
    prepared = prepare(str(corpus), str(tok_path), cache_dir=cache)
    tok = prepared.tokenizer
    assert isinstance(tok, PretrainedTokenizer) and not prepared.cache_hit
    assert prepared.vocab_size == 300 and prepared.meta["tokenizer"] == "pretrained"
    text = corpus.read_text(encoding="utf-8")
    assert tok.decode(np.concatenate([prepared.train, prepared.valid])) == text  # no </s> inside a corpus
    assert len(prepared.train) < len(text) / 2  # real merges, not bytes

    # The same tokenizer elsewhere (a folder path) hits the same entry; cached, it is still pretrained.
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "tokenizer.json").write_bytes(tok_path.read_bytes())
    again = prepare(str(corpus), str(copy), cache_dir=cache)
    assert again.cache_hit and again.path == prepared.path
    assert isinstance(again.tokenizer, PretrainedTokenizer)
    # Another tokenizer misses: the key holds the tokenizer's content, not its path.
    _build_tokenizer(tok_path, vocab_size=280)
    other = prepare(str(corpus), str(tok_path), cache_dir=cache)
    assert not other.cache_hit and other.path != prepared.path and other.vocab_size == 280

    # `gnopt train` sizes the model by the tokenizer's vocabulary.
    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--preset", "tiny", "--tokenizer", str(tok_path),
                 "--steps", "2", "--batch-tokens", "256", "--micro-batch-size", "4", "--eval-every", "0",
                 "--eval-tokens", "512", "--threads", "1", "--quiet", "--out", str(out),
                 "--cache-dir", str(cache)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["vocab_size"] == 280 and summary["config"]["tokenizer"] == str(tok_path)


def test_bad_tokenizers_fail_cleanly_and_write_nothing(tmp_path: Path, corpus: Path) -> None:
    from tokenizers import Tokenizer, models

    cache = tmp_path / "cache"
    not_tok = tmp_path / "not.json"
    not_tok.write_text('{"hello": 1}', encoding="utf-8")
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x00\x01 not json")
    big = tmp_path / "big.json"
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(70_000)}, unk_token="w0")).save(str(big))
    cases = [
        (str(tmp_path / "missing.json"), "unknown tokenizer"),
        (str(not_tok), "is not a Hugging Face tokenizer.json"),
        (str(garbage), "is not a Hugging Face tokenizer.json"),
        (str(big), "70,000 tokens.*at most 65,536"),
    ]
    for spec, message in cases:
        with pytest.raises(GnoptError, match=message):
            prepare(str(corpus), spec, cache_dir=cache)
    assert not cache.exists()
    # The command line: one `gnopt: error:` line, exit 2, no cache folder.
    assert main(["prepare", "--data", str(corpus), "--tokenizer", str(big), "--cache-dir", str(cache)]) == 2
    assert main(["train", "--data", str(corpus), "--preset", "tiny", "--tokenizer", str(not_tok),
                 "--out", str(tmp_path / "run"), "--cache-dir", str(cache)]) == 2
    assert not cache.exists() and not (tmp_path / "run").exists()
    # A pretrained tokenizer brings its own vocabulary.
    with pytest.raises(GnoptError, match="vocab_size=512 cannot be combined"):
        from gnopt.config import TrainConfig, resolve

        resolve(TrainConfig(tokenizer=str(big), vocab_size=512))


def _offline_gnopt(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "GNOPT_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "gnopt", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_hub_tokenizer_and_dataset_fail_offline_with_one_line(tmp_path: Path, corpus: Path) -> None:
    """hf:NAME needs the network: offline (HF_HUB_OFFLINE=1, empty Hub cache) it is one clear error line."""
    tok = _build_tokenizer(tmp_path / "tokenizer.json")
    runs = [
        (["prepare", "--data", str(corpus), "--tokenizer", "hf:google-t5/t5-base"],
         "cannot get tokenizer hf:google-t5/t5-base from the Hugging Face Hub"),
        (["prepare", "--data", "hf:allenai/c4:en", "--tokenizer", str(tok), "--max-tokens", "1000"],
         "cannot open Hugging Face dataset 'allenai/c4' (en) for streaming"),
    ]
    for args, message in runs:
        proc = _offline_gnopt(args, tmp_path)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("gnopt: error:")]
        assert proc.returncode == 2, proc.stderr
        assert len(errors) == 1 and message in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------------------ streaming


def test_streamed_budget_and_own_validation_split(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    data = tmp_path / "ds"
    train_docs, valid_docs = _docs(400, 1), _docs(60, 2, "valid ")
    _jsonl(data / "train.jsonl", train_docs)
    _jsonl(data / "validation.jsonl", valid_docs)
    tok_path = _build_tokenizer(tmp_path / "tokenizer.json")
    prepared = prepare(f"hf:{data}", str(tok_path), cache_dir=tmp_path / "cache", max_tokens=3000)
    tok = prepared.tokenizer
    assert len(prepared.train) == 3000 and prepared.meta["budget_reached"]
    assert prepared.meta["valid_source"] == "own split"
    assert len(prepared.valid) == 150  # 5% of the budget
    # Documents in stream order, each closed by the tokenizer's own </s>.
    eos = tok._tok.token_to_id("</s>")
    first = tok.decode(prepared.train[:200]).split("</s>")
    assert first[0] == train_docs[0] and first[1] == train_docs[1]
    assert tok.decode(prepared.valid).startswith(valid_docs[0] + "</s>")
    assert int((np.asarray(prepared.train) == eos).sum()) >= 3000 // 40
    assert prepare(f"hf:{data}", str(tok_path), cache_dir=tmp_path / "cache", max_tokens=3000).cache_hit
    # A budget larger than the data: everything, and the entry says so.
    whole = prepare(f"hf:{data}", "bytes", cache_dir=tmp_path / "cache", max_tokens=10**8)
    assert not whole.meta["budget_reached"]
    # Without a document-end token (bytes), documents end in a blank line, as when read whole.
    assert whole.tokenizer.decode(whole.train) == "".join(d + "\n\n" for d in train_docs)
    for part in ("train", "valid"):
        ids = getattr(whole, part)
        assert whole.meta[f"{part}_bytes"] == len(whole.tokenizer.decode(ids).encode("utf-8"))


def test_streamed_without_validation_split_holds_out_first_documents(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    docs = _docs(300, 3)
    path = _jsonl(tmp_path / "rows.jsonl", docs)
    prepared = prepare(f"hf:{path}", "bytes", cache_dir=tmp_path / "cache", max_tokens=4000)
    text_valid = prepared.tokenizer.decode(prepared.valid)
    assert text_valid.startswith(docs[0]) and len(prepared.valid) >= 200
    n_valid_docs = text_valid.count(".")
    assert prepared.tokenizer.decode(prepared.train).startswith(docs[n_valid_docs])
    assert len(prepared.train) == 4000 and prepared.meta["valid_source"] == "held-out documents"
    # An explicit validation text is read whole; a gnopt BPE is trained on the start of the stream.
    valid_txt = tmp_path / "valid.txt"
    valid_txt.write_text("held out by hand.\n" * 20, encoding="utf-8")
    explicit = prepare(f"hf:{path}", "bpe", vocab_size=300, cache_dir=tmp_path / "cache", max_tokens=4000,
                       valid_data=str(valid_txt))
    assert explicit.meta["valid_source"] == "explicit" and explicit.tokenizer.kind == "bpe"
    assert explicit.tokenizer.decode(explicit.valid) == valid_txt.read_text(encoding="utf-8")
    assert explicit.tokenizer.decode(explicit.train).startswith(docs[0] + "\n\n" + docs[1])
    with pytest.raises(GnoptError, match="max_tokens streams a Hugging Face dataset"):
        prepare(str(path), "bytes", cache_dir=tmp_path / "cache", max_tokens=4000)


class _Crash(Exception):
    pass


def test_interrupted_stream_resumes_instead_of_restarting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("datasets")
    data = tmp_path / "ds"
    _jsonl(data / "train.jsonl", _docs(1200, 4))
    _jsonl(data / "validation.jsonl", _docs(100, 5))
    tok_path = _build_tokenizer(tmp_path / "tokenizer.json")
    monkeypatch.setattr(stream_mod, "BATCH_DOCS", 50)
    monkeypatch.setattr(stream_mod, "COMMIT_TOKENS", 1000)
    budget = 12_000
    reference = prepare(f"hf:{data}", str(tok_path), cache_dir=tmp_path / "ref", max_tokens=budget)

    real = stream_mod._encode_docs
    calls: list[int] = []
    resumed_run: list[bool] = []

    def flaky(tok, docs):  # noqa: ANN001, ANN202
        calls.append(len(docs))
        if len(calls) == 6 and not resumed_run:
            raise _Crash  # as if the process were killed mid-way
        return real(tok, docs)

    monkeypatch.setattr(stream_mod, "_encode_docs", flaky)
    cache = tmp_path / "cache"
    with pytest.raises(_Crash):
        prepare(f"hf:{data}", str(tok_path), cache_dir=cache, max_tokens=budget)
    partial = [p for p in (cache / "data").iterdir() if p.name.endswith(".partial")]
    assert len(partial) == 1 and (partial[0] / "progress.json").is_file()
    done_before = json.loads((partial[0] / "progress.json").read_text())["train_tokens"]
    assert 0 < done_before < budget
    assert not [p for p in (cache / "data").iterdir() if not p.name.startswith(".")]  # nothing published

    calls.clear()
    resumed_run.append(True)
    resumed = prepare(f"hf:{data}", str(tok_path), cache_dir=cache, max_tokens=budget)
    np.testing.assert_array_equal(resumed.train, reference.train)
    np.testing.assert_array_equal(resumed.valid, reference.valid)
    docs_resumed = sum(calls)
    assert docs_resumed < reference.meta["documents"] - done_before // 40  # it did not start over
    assert not partial[0].exists()


_RACER = '''
import pathlib, sys, time
import gnopt.data.stream as s
role, sync, data, cache = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3], sys.argv[4]

def wait(name):  # the test process orders the two preparations through these files
    end = time.monotonic() + 60
    while not (sync / name).exists():
        if time.monotonic() > end:
            sys.exit(f"timed out waiting for {name}")
        time.sleep(0.01)

real_make, real_encode, first = s.make_tokenizer, s._encode_docs, [True]

def make(*args, **kwargs):
    if role == "B":  # B has seen no progress.json and is about to (re)start the partial folder
        (sync / "b-tokenizing").touch()
        wait("go-b")
    return real_make(*args, **kwargs)

def encode(tok, docs):
    if first[0]:  # half-way: the partial folder holds a tokenizer and progress.json, the shards grow
        first[0] = False
        (sync / f"{role.lower()}-writing").touch()
        wait(f"go-{role.lower()}-writing")
    return real_encode(tok, docs)

s.make_tokenizer, s._encode_docs = make, encode
from gnopt.data import prepare
from gnopt.errors import GnoptError
try:
    prepare(f"hf:{data}", "bytes", cache_dir=cache, max_tokens=4000)
except GnoptError as exc:
    print(f"gnopt: error: {exc}")
    sys.exit(3)
'''


def test_two_processes_preparing_one_streamed_entry_end_in_one_valid_entry(tmp_path: Path) -> None:
    """B checks for progress, then (slowly, as while a BPE trains) starts its partial folder; A meanwhile
    starts, writes and waits half-way; then B goes on, then A. Whatever the order, the partial folder is
    only touched under the lock: each process either builds the entry or is refused with one clean error,
    and the cache ends with one entry that loads and equals a preparation made alone."""
    pytest.importorskip("datasets")
    path = _jsonl(tmp_path / "rows.jsonl", _docs(300, 7))
    reference = prepare(f"hf:{path}", "bytes", cache_dir=tmp_path / "ref", max_tokens=4000)
    cache, sync = tmp_path / "cache", tmp_path / "sync"
    sync.mkdir()
    script = tmp_path / "racer.py"
    script.write_text(_RACER, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}

    def start(role: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, str(script), role, str(sync), str(path), str(cache)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def until(name: str, proc: subprocess.Popen[str]) -> None:
        for _ in range(6000):
            if (sync / name).exists() or proc.poll() is not None:
                return
            time.sleep(0.01)
        raise AssertionError(f"neither {name} nor an exit")

    b = start("B")
    until("b-tokenizing", b)
    a = start("A")
    until("a-writing", a)
    (sync / "go-b").touch()
    until("b-writing", b)
    (sync / "go-a-writing").touch()
    a_out = a.communicate(timeout=120)[0]
    (sync / "go-b-writing").touch()
    b_out = b.communicate(timeout=120)[0]
    outcomes = {"A": (a.returncode, a_out), "B": (b.returncode, b_out)}
    for role, (rc, out) in outcomes.items():
        assert rc == 0 or (rc == 3 and out.startswith("gnopt: error:") and "in use by" in out), (role, out)
    assert 0 in (a.returncode, b.returncode)
    entries = sorted(p.name for p in (cache / "data").iterdir())
    assert len(entries) == 1 and not entries[0].startswith("."), entries  # no partial folder, no lock file
    again = prepare(f"hf:{path}", "bytes", cache_dir=cache, max_tokens=4000)
    assert again.cache_hit
    np.testing.assert_array_equal(again.train, reference.train)
    np.testing.assert_array_equal(again.valid, reference.valid)


def test_streamed_bpe_without_validation_split_is_trained_on_training_documents_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No validation split: validation is held out from the stream, and a gnopt BPE must not have seen it.
    Every document is numbered: the BPE's sample holds training documents only, validation none of them;
    nothing is lost or repeated; a preparation interrupted half-way resumes to the same entry."""
    pytest.importorskip("datasets")
    docs = [f"doc{i:04d} {d}" for i, d in enumerate(_docs(500, 8))]
    path = _jsonl(tmp_path / "rows.jsonl", docs)
    monkeypatch.setattr(stream_mod, "BATCH_DOCS", 20)
    monkeypatch.setattr(stream_mod, "BPE_SAMPLE_CHARS", 3000)
    monkeypatch.setattr(stream_mod, "COMMIT_TOKENS", 500)
    samples: list[str] = []
    real_make = stream_mod.make_tokenizer

    def spy(kind: str, text: str | None = None, *args: Any) -> Any:
        samples.append(text or "")
        return real_make(kind, text, *args)

    monkeypatch.setattr(stream_mod, "make_tokenizer", spy)
    prepared = prepare(f"hf:{path}", "bpe", vocab_size=300, cache_dir=tmp_path / "cache", max_tokens=4000)
    assert prepared.meta["valid_source"] == "held-out documents" and prepared.meta["budget_reached"]

    def numbers(text: str) -> list[int]:
        return [int(m) for m in re.findall(r"doc(\d{4})", text)]

    seen = numbers(samples[0])
    valid = numbers(prepared.tokenizer.decode(prepared.valid))
    train = numbers(prepared.tokenizer.decode(prepared.train))
    assert len(seen) >= 20 and valid and train
    assert not set(seen) & set(valid), "the tokenizer was trained on validation documents"
    assert set(seen) <= set(train)
    assert len(prepared.valid) >= 200  # 5% of the budget
    # Stream order, nothing lost or repeated: training starts with the tokenizer's sample, validation
    # follows it, then training goes on (the last training document may be cut by the budget).
    assert valid == list(range(valid[0], valid[-1] + 1)) and valid[0] == len(seen)
    assert train == [*range(len(seen)), *range(valid[-1] + 1, train[-1] + 1)]

    real_encode = stream_mod._encode_docs
    calls: list[int] = []

    def crash_once(tok: Any, batch: list[str]) -> Any:
        calls.append(1)
        if len(calls) == 5:
            raise _Crash
        return real_encode(tok, batch)

    monkeypatch.setattr(stream_mod, "_encode_docs", crash_once)
    with pytest.raises(_Crash):
        prepare(f"hf:{path}", "bpe", vocab_size=300, cache_dir=tmp_path / "again", max_tokens=4000)
    resumed = prepare(f"hf:{path}", "bpe", vocab_size=300, cache_dir=tmp_path / "again", max_tokens=4000)
    np.testing.assert_array_equal(resumed.train, prepared.train)
    np.testing.assert_array_equal(resumed.valid, prepared.valid)

    # A stream that fits in the tokenizer's sample: its last twentieth of documents stays out of it.
    monkeypatch.setattr(stream_mod, "_encode_docs", real_encode)
    monkeypatch.setattr(stream_mod, "BPE_SAMPLE_CHARS", 10**7)
    samples.clear()
    small = prepare(f"hf:{path}", "bpe", vocab_size=300, cache_dir=tmp_path / "small", max_tokens=10**5)
    seen = numbers(samples[0])
    assert seen == list(range(475))
    assert numbers(small.tokenizer.decode(small.valid)) == list(range(475, 500))
    assert numbers(small.tokenizer.decode(small.train)) == seen


def test_progress_file_keeps_its_layout_so_builds_resume_across_versions(tmp_path: Path) -> None:
    """``progress.json`` as gnopt wrote it before the build became a state object (a plain dict with
    these keys) is read back, and written with the same keys, so an interrupted build resumes."""
    before = {"key": "k", "phase": "train", "valid_tokens": 10, "train_tokens": 20, "train_state": {"s": 1},
              "valid_state": None, "documents": 3, "train_bytes": 40, "valid_bytes": 50,
              "train_head_docs": 2}
    path = tmp_path / "progress.json"
    path.write_text(json.dumps(before), encoding="utf-8")
    progress = stream_mod._Progress.read(path, "k")
    assert progress is not None and progress.train_head_docs == 2 and progress.phase == "train"
    progress.write(path)
    assert json.loads(path.read_text(encoding="utf-8")) == before
    # another entry's progress, an unknown phase or a damaged file: the build starts afresh
    assert stream_mod._Progress.read(path, "other") is None
    path.write_text(json.dumps({**before, "phase": "halfway"}), encoding="utf-8")
    assert stream_mod._Progress.read(path, "k") is None
    path.write_text("{", encoding="utf-8")
    assert stream_mod._Progress.read(path, "k") is None
    fresh = stream_mod._Progress(key="k")
    fresh.write(path)
    assert set(json.loads(path.read_text(encoding="utf-8"))) == set(before) - {"train_head_docs"}
