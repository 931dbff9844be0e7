"""Data pipeline: sources, tokenizers, shards, cache, batches, statistics."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import gnopt.data.cache as cache_mod
from gnopt.data import (
    SHARD_MAGIC,
    BPETokenizer,
    ByteTokenizer,
    TokenBatcher,
    corpus_too_small_check,
    data_statistics,
    eval_batches,
    is_prepared_entry,
    load_tokenizer,
    parse_hf_spec,
    prepare,
    read_shard,
    read_text_file,
    resolve_data,
    split_tail,
    stdlib_source,
    unigram_entropy,
    write_shard,
)
from gnopt.data.tokenizer import iter_chunks
from gnopt.errors import GnoptError

# ------------------------------------------------------------------------------------------ tokenizers


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    text = "Hello, wörld — ☃ 日本\n"
    ids = tok.encode(text)
    assert ids.dtype == np.uint16 and len(ids) == len(text.encode("utf-8"))
    assert tok.vocab_size == 256 and tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids.astype(np.int64))) == text


def test_bpe_round_trip_and_save_load(english_text: str, tmp_path: Path) -> None:
    tok = BPETokenizer.train([english_text], vocab_size=600)
    assert 256 < tok.vocab_size <= 600
    sample = english_text[:5000] + "Ünïcödé ☃ and tabs\tand  spaces\n"
    ids = tok.encode(sample)
    assert ids.dtype == np.uint16 and len(ids) < len(sample.encode("utf-8")) / 2
    assert tok.decode(ids) == sample
    np.testing.assert_array_equal(tok.encode_corpus(english_text), tok.encode(english_text))
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    np.testing.assert_array_equal(again.encode(sample), ids)
    ByteTokenizer().save(tmp_path / "b")
    assert isinstance(load_tokenizer(tmp_path / "b" / "tokenizer.json"), ByteTokenizer)


def test_iter_chunks_reassembles_text(english_text: str) -> None:
    chunks = list(iter_chunks(english_text, 4096))
    assert "".join(chunks) == english_text and len(chunks) > 10
    assert all(len(c) <= 4096 for c in chunks)


# ------------------------------------------------------------------------------------------ shards


def test_shard_round_trip(tmp_path: Path) -> None:
    tokens = np.random.default_rng(0).integers(0, 65536, size=10_000).astype(np.uint16)
    path = write_shard(tmp_path / "x.bin", tokens)
    assert path.stat().st_size == 1024 + 2 * len(tokens)
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [SHARD_MAGIC, 1, len(tokens)]
    back = read_shard(path)
    assert isinstance(back, np.memmap)
    np.testing.assert_array_equal(back, tokens)
    assert len(read_shard(write_shard(tmp_path / "empty.bin", np.zeros(0, dtype=np.int64)))) == 0
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def test_shard_corruption_is_reported(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "x.bin", np.arange(100, dtype=np.uint16))
    data = bytearray(path.read_bytes())
    bad_magic = tmp_path / "magic.bin"
    bad_magic.write_bytes(b"\x00\x00\x00\x00" + bytes(data[4:]))
    with pytest.raises(GnoptError, match="magic.bin.*magic"):
        read_shard(bad_magic)
    truncated = tmp_path / "short.bin"
    truncated.write_bytes(bytes(data[:-10]))
    with pytest.raises(GnoptError, match="short.bin.*100 tokens"):
        read_shard(truncated)
    tiny = tmp_path / "tiny.bin"
    tiny.write_bytes(b"abc")
    with pytest.raises(GnoptError, match="tiny.bin"):
        read_shard(tiny)
    with pytest.raises(GnoptError, match="0..65535"):
        write_shard(tmp_path / "big.bin", np.array([70000]))


# ------------------------------------------------------------------------------------------ sources


def test_non_utf8_error_names_file_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("abc déf".encode("latin-1"))
    with pytest.raises(GnoptError, match=r"latin1\.txt.*UTF-8.*byte offset 5"):
        read_text_file(path)
    with pytest.raises(GnoptError, match=r"latin1\.txt.*byte offset 5"):
        prepare(path, "bytes")


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(GnoptError, match=r"nope\.txt does not exist"):
        prepare(tmp_path / "nope.txt", "bytes")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(GnoptError, match=r"empty\.txt is empty"):
        prepare(empty, "bytes")
    folder = tmp_path / "nothing"
    folder.mkdir()
    (folder / "notes.md").write_text("not a txt file")
    with pytest.raises(GnoptError, match="no .txt files"):
        prepare(folder, "bytes")


def test_folder_of_txt_files_is_read_recursively_in_order(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("third document\n" * 40)
    (tmp_path / "a.txt").write_text("first document\n" * 40)
    (tmp_path / "b" / "c.txt").write_text("second document\n" * 40)
    (tmp_path / "ignored.md").write_text("not text")
    train, valid = resolve_data(tmp_path)
    assert valid is None
    text = train.read().text
    assert text.index("first") < text.index("second") < text.index("third")
    assert "not text" not in text
    prepared = prepare(tmp_path, "bytes")
    tok = prepared.tokenizer
    assert tok.decode(prepared.train) + tok.decode(prepared.valid) == text
    assert "held-out" in prepared.description


def test_train_valid_folder_is_detected(tmp_path: Path, english_text: str) -> None:
    half = len(english_text) // 2
    (tmp_path / "train.txt").write_text(english_text[:half], encoding="utf-8")
    (tmp_path / "valid.txt").write_text(english_text[half:], encoding="utf-8")
    (tmp_path / "README.txt").write_text("not part of the corpus")
    prepared = prepare(tmp_path, "bytes")
    assert prepared.tokenizer.decode(prepared.train) == english_text[:half]
    assert prepared.tokenizer.decode(prepared.valid) == english_text[half:]
    assert "valid.txt" in prepared.description


def test_explicit_valid_data(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("training words\n" * 50)
    (tmp_path / "v.txt").write_text("validation words\n" * 5)
    prepared = prepare(tmp_path / "t.txt", "bytes", valid_data=tmp_path / "v.txt")
    assert prepared.tokenizer.decode(prepared.valid) == "validation words\n" * 5
    assert len(prepared.train) == len("training words\n") * 50


def test_embedded_default_corpus() -> None:
    loaded = stdlib_source().read()
    assert len(loaded.text.encode("utf-8")) > 100_000 and loaded.n_files > 10
    assert "standard library" in loaded.description
    assert "def " in loaded.text and "import " in loaded.text
    assert stdlib_source().read().text == loaded.text  # deterministic
    prepared = prepare(None, "bytes")
    assert len(prepared.train) > 100_000 and len(prepared.valid) > 1000
    assert "standard library" in prepared.description


def test_split_tail_cuts_at_a_line_break() -> None:
    text = "".join(f"line {i}\n" for i in range(1000))
    head, tail = split_tail(text, 0.05)
    assert head + tail == text and head.endswith("\n")
    assert abs(len(tail) / len(text) - 0.05) < 0.01
    with pytest.raises(GnoptError, match="valid_fraction"):
        split_tail(text, 1.5)


# ------------------------------------------------------------------------------------------ cache


def test_second_prepare_is_a_cache_hit(
    tmp_path: Path, english_text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(english_text, encoding="utf-8")
    cache = tmp_path / "cache"
    first = prepare(corpus, "bpe", vocab_size=512, cache_dir=cache)
    assert not first.cache_hit and first.vocab_size == 512
    assert (first.path / "tokenizer.json").is_file() and first.path.parent == cache / "data"
    meta = json.loads((first.path / "meta.json").read_text())
    assert meta["train_tokens"] == len(first.train)

    def no_tokenizing(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cache hit must not re-tokenize")

    monkeypatch.setattr(cache_mod, "make_tokenizer", no_tokenizing)
    second = prepare(corpus, "bpe", vocab_size=512, cache_dir=cache)
    assert second.cache_hit and second.path == first.path
    np.testing.assert_array_equal(second.train, first.train)
    np.testing.assert_array_equal(second.valid, first.valid)
    assert second.tokenizer.decode(second.valid) == first.tokenizer.decode(first.valid)

    # A different vocabulary or a changed file is a different entry.
    monkeypatch.undo()
    assert not prepare(corpus, "bpe", vocab_size=400, cache_dir=cache).cache_hit
    corpus.write_text(english_text + "one more line\n", encoding="utf-8")
    assert not prepare(corpus, "bpe", vocab_size=512, cache_dir=cache).cache_hit


def test_a_prepared_entry_copied_without_its_corpus_is_a_data_spec(
    tmp_path: Path, english_text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry folder moved to a machine without the corpus loads as it is (no tokenizing), and only under
    the tokenizer and vocabulary it holds."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(english_text, encoding="utf-8")
    first = prepare(corpus, "bpe", vocab_size=512, cache_dir=tmp_path / "cache")
    moved = tmp_path / "elsewhere" / "entry"
    shutil.copytree(first.path, moved)
    corpus.unlink()
    shutil.rmtree(tmp_path / "cache")
    assert is_prepared_entry(moved) and is_prepared_entry(str(moved))
    assert not is_prepared_entry(tmp_path) and not is_prepared_entry(None)
    monkeypatch.setattr(cache_mod, "make_tokenizer", lambda *a, **k: pytest.fail("must not tokenize"))
    got = prepare(str(moved), "bpe", vocab_size=512, cache_dir=tmp_path / "other")
    assert got.cache_hit and got.path == moved and not (tmp_path / "other").exists()
    np.testing.assert_array_equal(got.train, first.train)
    np.testing.assert_array_equal(got.valid, first.valid)
    assert got.tokenizer.decode(got.valid[:200]) == first.tokenizer.decode(first.valid[:200])
    with pytest.raises(GnoptError, match="holds bpe with vocab_size 512 tokens, not bpe with vocab_size 400"):
        prepare(moved, "bpe", vocab_size=400)
    with pytest.raises(GnoptError, match="not bytes"):
        prepare(moved, "bytes")
    with pytest.raises(GnoptError, match="drop valid_data"):
        prepare(moved, "bpe", vocab_size=512, valid_data=moved / "meta.json")
    (moved / "valid.bin").unlink()  # an incomplete entry is no entry: read as a corpus folder (no .txt)
    assert not is_prepared_entry(moved)
    with pytest.raises(GnoptError):
        prepare(moved, "bpe", vocab_size=512, cache_dir=tmp_path / "other")


def test_gnopt_cache_env_and_statistics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GNOPT_CACHE", str(tmp_path / "envcache"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("ab" * 5000)
    prepared = prepare(corpus, "bytes")
    assert prepared.path.parent == tmp_path / "envcache" / "data"
    stats = data_statistics(prepared)
    assert stats["train_tokens"] + stats["valid_tokens"] == 10_000
    assert stats["vocab_size"] == 256 and stats["bytes_per_token"] == 1.0
    assert stats["train_bytes"] == stats["train_tokens"]


def test_unknown_tokenizer_and_bad_vocab(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("text\n" * 100)
    with pytest.raises(GnoptError, match="unknown tokenizer 'wordpiece'"):
        prepare(corpus, "wordpiece")
    with pytest.raises(GnoptError, match="vocab_size"):
        prepare(corpus, "bpe", vocab_size=100_000)


# ------------------------------------------------------------------------------------------ HF datasets


def test_parse_hf_spec() -> None:
    spec = parse_hf_spec("hf:allenai/c4:en:validation")
    assert (spec.name, spec.config, spec.split) == ("allenai/c4", "en", "validation")
    assert parse_hf_spec("hf:wikitext::train").config is None
    with pytest.raises(GnoptError, match="hf:NAME"):
        parse_hf_spec("hf:")


def test_hf_loader_on_local_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets", reason="the optional 'datasets' package is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    train_rows = [f"training document number {i}. " * 5 for i in range(200)]
    valid_rows = [f"validation document {i}." for i in range(30)]
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"id": list(range(200)), "body": train_rows}),
            "validation": datasets.Dataset.from_dict({"id": list(range(30)), "body": valid_rows}),
        }
    )
    saved = tmp_path / "saved"
    dd.save_to_disk(str(saved))
    prepared = prepare(f"hf:{saved}", "bytes")  # the text column is found by type ('body')
    tok = prepared.tokenizer
    assert tok.decode(prepared.train).startswith("training document number 0.")
    assert tok.decode(prepared.valid) == "\n\n".join(valid_rows) + "\n"  # rows = documents
    assert "Hugging Face" in prepared.description
    assert prepare(f"hf:{saved}", "bytes").cache_hit

    only_train = prepare(f"hf:{saved}::train", "bytes")  # a named split: validation = held-out tail
    assert "held-out" in only_train.description

    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"text": r}) + "\n" for r in train_rows), encoding="utf-8")
    from_json = prepare(f"hf:{jsonl}", "bytes")
    text = from_json.tokenizer.decode(from_json.train) + from_json.tokenizer.decode(from_json.valid)
    assert text == "\n\n".join(train_rows) + "\n"

    txt = tmp_path / "doc.txt"
    txt.write_text("line one\nline two\n" * 100, encoding="utf-8")
    from_txt = prepare(f"hf:{txt}", "bytes")  # a .txt file is one document, not one row per line
    assert from_txt.tokenizer.decode(from_txt.train).startswith("line one\nline two\nline one\n")

    with pytest.raises(GnoptError, match="no split 'test'"):
        prepare(f"hf:{saved}::test", "bytes")


def test_hf_hub_names_are_streamed_and_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub path, with ``load_dataset`` replaced by a local streamed dataset (no network)."""
    datasets = pytest.importorskip("datasets", reason="the optional 'datasets' package is not installed")
    calls: list[tuple] = []

    def rows():  # a streamed dataset whose schema is unknown up front
        for i in range(10_000):
            yield {"id": i, "content": f"streamed row {i} " * 10}

    def fake_load_dataset(name: str, config: str | None = None, **kwargs: object) -> object:
        calls.append((name, config, kwargs))
        return datasets.IterableDataset.from_generator(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    prepared = prepare("hf:someone/corpus:en", "bytes", max_chars=20_000)
    assert calls == [("someone/corpus", "en", {"split": "train", "streaming": True})]
    text = prepared.tokenizer.decode(prepared.train) + prepared.tokenizer.decode(prepared.valid)
    assert text.startswith("streamed row 0 ") and 20_000 <= len(text) < 21_000
    assert "someone/corpus" in prepared.description and "held-out" in prepared.description


# ------------------------------------------------------------------------------------------ batches


def _stream(n_windows: int, seq_len: int) -> np.ndarray:
    return np.arange(n_windows * (seq_len + 1) + 3, dtype=np.uint16)  # +3 leftover tokens never used


def _window_ids(x: torch.Tensor, seq_len: int) -> list[int]:
    return (x[:, 0] // (seq_len + 1)).tolist()


def test_batches_shapes_and_shift() -> None:
    batcher = TokenBatcher(_stream(20, 8), seq_len=8, micro_batch_size=4, seed=0)
    x, y = next(batcher)
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.long
    torch.testing.assert_close(y[:, :-1], x[:, 1:])
    torch.testing.assert_close(y[:, -1], x[:, -1] + 1)
    assert batcher.tokens_per_micro_batch == 32


@pytest.mark.parametrize("n_windows", [24, 23])
def test_one_epoch_covers_every_window_once(n_windows: int) -> None:
    seq_len, b = 6, 4
    batcher = TokenBatcher(_stream(n_windows, seq_len), seq_len, b, seed=5)
    ids: list[int] = []
    for _ in range(3 * math.ceil(n_windows / b)):
        x, _ = next(batcher)
        assert (x[:, 0] % (seq_len + 1) == 0).all()  # windows start on window boundaries
        ids += _window_ids(x, seq_len)
    for epoch in range(3):
        assert sorted(ids[epoch * n_windows : (epoch + 1) * n_windows]) == list(range(n_windows))
    assert ids[:n_windows] != ids[n_windows : 2 * n_windows]  # a new permutation every epoch
    assert ids[:n_windows] != list(range(n_windows))  # shuffled


def test_batches_are_deterministic_per_seed() -> None:
    tokens = _stream(50, 8)
    a = [next(TokenBatcher(tokens, 8, 5, seed=1))[0] for _ in range(1)]
    b1, b2, b3 = (TokenBatcher(tokens, 8, 5, seed=s) for s in (1, 1, 2))
    seq1 = [next(b1)[0] for _ in range(12)]
    seq2 = [next(b2)[0] for _ in range(12)]
    seq3 = [next(b3)[0] for _ in range(12)]
    assert all(torch.equal(p, q) for p, q in zip(seq1, seq2, strict=True))
    assert torch.equal(a[0], seq1[0])
    assert not all(torch.equal(p, q) for p, q in zip(seq1, seq3, strict=True))


def test_state_dict_resume_gives_identical_batches() -> None:
    tokens = _stream(23, 6)
    ref = TokenBatcher(tokens, 6, 4, seed=9)
    for _ in range(7):  # 28 windows: already inside the second epoch
        next(ref)
    state = json.loads(json.dumps(ref.state_dict()))  # survives a JSON/ checkpoint round trip
    assert state["epoch"] == 1 and state["position"] == 5
    expected = [next(ref) for _ in range(10)]
    resumed = TokenBatcher(tokens, 6, 4, seed=0)
    resumed.load_state_dict(state)
    for (ex, ey), (rx, ry) in zip(expected, (next(resumed) for _ in range(10)), strict=True):
        assert torch.equal(ex, rx) and torch.equal(ey, ry)
    with pytest.raises(GnoptError, match="n_windows"):
        TokenBatcher(_stream(30, 6), 6, 4).load_state_dict(state)


def test_batches_from_memmap(tmp_path: Path) -> None:
    tokens = _stream(10, 4)
    mm = read_shard(write_shard(tmp_path / "t.bin", tokens))
    x1, _ = next(TokenBatcher(mm, 4, 3, seed=2))
    x2, _ = next(TokenBatcher(tokens, 4, 3, seed=2))
    assert torch.equal(x1, x2)


def test_eval_batches_are_contiguous_and_fixed() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    batches = eval_batches(tokens, seq_len=10, micro_batch_size=4, max_tokens=200)
    assert len(batches) == 5  # 20 windows of 10 predicted tokens
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert torch.equal(xs.flatten(), torch.arange(200))
    assert torch.equal(ys.flatten(), torch.arange(1, 201))
    small = eval_batches(tokens[:35], seq_len=10, micro_batch_size=8)
    assert len(small) == 1 and small[0][0].shape == (3, 10)
    with pytest.raises(GnoptError, match="validation data is too small"):
        eval_batches(tokens[:5], seq_len=10, micro_batch_size=2)


def test_corpus_too_small() -> None:
    corpus_too_small_check(4 * 9, 9, seq_len=8, micro_batch_size=4)
    with pytest.raises(GnoptError, match="training tokens"):
        corpus_too_small_check(4 * 9 - 1, 100, seq_len=8, micro_batch_size=4)
    with pytest.raises(GnoptError, match="validation tokens"):
        corpus_too_small_check(1000, 8, seq_len=8, micro_batch_size=4)
    with pytest.raises(GnoptError, match="too small"):
        TokenBatcher(np.arange(20, dtype=np.uint16), seq_len=8, micro_batch_size=4)


# ------------------------------------------------------------------------------------------ statistics


def test_unigram_entropy() -> None:
    assert unigram_entropy(np.arange(256).repeat(3), 256) == pytest.approx(math.log(256))
    assert unigram_entropy(np.zeros(10, dtype=np.uint16), 4) == 0.0
    p = np.array([0.5, 0.25, 0.25])
    tokens = np.array([0, 0, 1, 2])
    assert unigram_entropy(tokens, 3) == pytest.approx(float(-(p * np.log(p)).sum()))
    with pytest.raises(GnoptError, match="vocabulary"):
        unigram_entropy(np.array([5]), 3)
