"""Streamed, resumable tokenization of a large ``hf:`` dataset up to a token budget (``--max-tokens``).

:func:`prepare_streamed` is what :func:`gnopt.data.prepare` runs when ``max_tokens`` is given. It reads the
dataset as a stream (``datasets.load_dataset(..., streaming=True)``: C4 is never downloaded as a whole),
encodes documents in batches with the tokenizer's parallel Rust encoder (``encode_batch``, every core) and
appends the ids to the same uint16 shards as the in-memory path, until ``max_tokens`` training tokens.

Validation: the dataset's own validation split (``validation``/``valid``/``val``, when no split is named)
gives :func:`valid_budget` tokens; without one, the first documents of the training stream are held out
for it (and not trained on). A gnopt BPE is trained on the stream's first ~10M characters; without a
validation split, those documents are training documents (the first ones) and the validation documents are
held out right after them, so the tokenizer never sees validation text. An explicit ``valid_data`` is read
and tokenized whole instead.

Resumable: the work happens in ``<cache>/data/.<entry>.partial/``, which holds the tokenizer, the growing
``valid.bin``/``train.bin`` and ``progress.json`` (token counts and the datasets' own stream positions,
``IterableDataset.state_dict()``). Progress is committed every :data:`COMMIT_TOKENS` tokens (shards
fsynced first, then ``progress.json`` replaced atomically); a rerun of the same command truncates the
shards to the last commit and continues the streams from there, so at most one commit's work is redone.
When the budget is reached the shard headers are written and the folder is renamed into place, exactly
like an in-memory entry. The lock file ``<cache>/data/.<entry>.lock`` (a :class:`~gnopt.lock.FolderLock`)
keeps two processes from building the same entry at once: it is taken before the partial folder is read,
deleted or written, and released after the rename; a second process is refused with an error naming the
first (see :mod:`gnopt.lock` for what the lock guarantees on NFS).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gnopt.data.shards import ShardAppender
from gnopt.data.sources import StreamedDataset, TextSource, open_hf_stream, row_text_getter
from gnopt.data.tokenizer import BPE_SAMPLE_CHARS, BPETokenizer, Tokenizer, load_tokenizer, make_tokenizer
from gnopt.errors import GnoptError
from gnopt.lock import FolderLock

log = logging.getLogger(__name__)

#: Progress is made durable about every this many tokens (a restart redoes at most that much).
COMMIT_TOKENS = 20_000_000
#: Documents per call of the parallel encoder.
BATCH_DOCS = 512
#: Validation tokens: 5% of the budget, at most this many (C4's own validation split has ~40M tokens).
VALID_MAX_TOKENS = 10_000_000
#: Shard headers count tokens in an int32.
MAX_SHARD_TOKENS = 2**31 - 1
PROGRESS = "progress.json"


def valid_budget(max_tokens: int) -> int:
    return max(1, min(VALID_MAX_TOKENS, max_tokens // 20))


def _encode_docs(tok: Tokenizer, docs: list[str]) -> list[tuple[str, np.ndarray]]:
    """(text, ids) of a batch of documents, encoded in parallel. A tokenizer that marks documents (T5:
    ``</s>``) does so itself; for the others each document ends in a newline plus a blank line, as in the
    in-memory path."""
    if not (isinstance(tok, BPETokenizer) and tok.marks_documents):
        docs = [(d if d.endswith("\n") else d + "\n") + "\n" for d in docs]
    if isinstance(tok, BPETokenizer):
        return list(zip(docs, tok.encode_documents(docs), strict=True))
    return [(d, tok.encode(d)) for d in docs]


def _nbytes(doc: str, kept: int, total: int) -> int:
    """UTF-8 bytes of the part of ``doc`` that ``kept`` of its ``total`` tokens cover (pro rata when cut)."""
    n = len(doc.encode("utf-8"))
    return n if kept >= total else round(n * kept / max(total, 1))


def _rows(ds: Any, what: str) -> Iterator[list[str]]:
    """Batches of non-empty documents of a streamed dataset."""
    get = row_text_getter(what)
    batch: list[str] = []
    for row in ds:
        text = get(row)
        if text:
            batch.append(text)
            if len(batch) == BATCH_DOCS:
                yield batch
                batch = []
    if batch:
        yield batch


def _state(ds: Any) -> Any:
    return ds.state_dict() if hasattr(ds, "state_dict") else None


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare_streamed(
    data_spec: str,
    tokenizer: str,
    vocab_size: int,
    pretrained: Tokenizer | None,
    max_tokens: int,
    folder: Path,
    key: str,
    valid_src: TextSource | None,
    meta_extra: dict[str, Any],
) -> None:
    """Build the cache entry ``folder`` by streaming ``data_spec`` (see the module docstring)."""
    if not 1 <= max_tokens <= MAX_SHARD_TOKENS:
        raise GnoptError(f"max_tokens must lie in [1, {MAX_SHARD_TOKENS:,}] (one shard's int32 token count), "
                         f"got {max_tokens:,}.")
    t0 = time.perf_counter()
    stream = open_hf_stream(data_spec)  # before anything is written: an unreachable dataset writes nothing
    partial = folder.with_name(f".{folder.name}.partial")
    folder.parent.mkdir(parents=True, exist_ok=True)
    # The partial folder is read, deleted, written and renamed only under this lock.
    with FolderLock(folder.parent, "the streamed cache entry", name=f".{folder.name}.lock", target=partial):
        if folder.is_dir():  # another process published it after our caller looked
            return
        _prepare_locked(data_spec, tokenizer, vocab_size, pretrained, max_tokens, folder, key, valid_src,
                        meta_extra, stream, partial, t0)


def _prepare_locked(
    data_spec: str,
    tokenizer: str,
    vocab_size: int,
    pretrained: Tokenizer | None,
    max_tokens: int,
    folder: Path,
    key: str,
    valid_src: TextSource | None,
    meta_extra: dict[str, Any],
    stream: StreamedDataset,
    partial: Path,
    t0: float,
) -> None:
    """:func:`prepare_streamed` once it holds the entry's lock."""
    vbudget = valid_budget(max_tokens)
    own_valid = valid_src is None and stream.valid is not None
    held_out = valid_src is None and stream.valid is None

    progress: dict[str, Any] | None = None
    if (partial / PROGRESS).is_file():
        try:
            progress = json.loads((partial / PROGRESS).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            progress = None
        if not progress or progress.get("key") != key:
            progress = None
    tok: Tokenizer
    head = 0  # held out after a BPE's sample: the stream's first `head` documents are training documents
    if progress is None:
        if pretrained is not None:
            tok = pretrained
        elif tokenizer == "bpe":  # trained on the first ~10M characters of the training stream
            sample: list[str] = []
            total = 0
            exhausted = True
            for batch in _rows(open_hf_stream(data_spec).train, data_spec):
                sample.extend(batch)
                total += sum(len(d) for d in batch)
                if total >= BPE_SAMPLE_CHARS:
                    exhausted = False
                    break
            if not sample:
                raise GnoptError(f"{stream.description} holds no text.")
            if held_out:
                # The validation documents are held out *after* the sample, whose documents are trained
                # on: the tokenizer never sees validation text. A stream that fits in the sample keeps its
                # last twentieth of documents out of it.
                if exhausted:
                    sample = sample[: len(sample) - max(1, len(sample) // 20)]
                if not sample:
                    raise GnoptError(f"{stream.description} is too small to hold out validation documents.")
                head = len(sample)
            tok = make_tokenizer("bpe", "\n".join(sample), vocab_size)
        else:
            tok = make_tokenizer(tokenizer)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        tok.save(partial)
        progress = {"key": key, "phase": "valid", "valid_tokens": 0,
                    "train_tokens": 0, "train_state": None, "valid_state": None, "documents": 0,
                    "train_bytes": 0, "valid_bytes": 0}
        if head:
            progress["train_head_docs"] = head
        if valid_src is not None:
            loaded = valid_src.read()
            ids = tok.encode_corpus(loaded.text)
            app = ShardAppender(partial / "valid.bin")
            app.append(ids)
            progress["valid_tokens"] = app.commit()
            app.close()
            progress["phase"] = "train"
            progress["valid_description"] = loaded.description
            progress["valid_bytes"] = len(loaded.text.encode("utf-8"))
        _write_json_atomic(partial / PROGRESS, progress)
    else:
        tok = load_tokenizer(partial / "tokenizer.json",
                             pretrained_source=getattr(pretrained, "source", None))
        log.info("data: resuming %s at %d training + %d validation tokens", partial,
                 progress["train_tokens"], progress["valid_tokens"])
        head = int(progress.get("train_head_docs", 0))

    train_app = ShardAppender(partial / "train.bin", progress["train_tokens"])
    valid_app = ShardAppender(partial / "valid.bin", progress["valid_tokens"])
    resumed_at = progress["train_tokens"] + progress["valid_tokens"]

    def commit() -> None:
        progress["valid_tokens"] = valid_app.commit()
        progress["train_tokens"] = train_app.commit()
        progress["train_state"] = _state(stream.train)
        if own_valid:
            progress["valid_state"] = _state(stream.valid)
        _write_json_atomic(partial / PROGRESS, progress)

    try:
        if progress["train_state"] is not None:
            stream.train.load_state_dict(progress["train_state"])
        if own_valid and progress["valid_state"] is not None:
            stream.valid.load_state_dict(progress["valid_state"])
        if own_valid and progress["phase"] == "valid":
            for batch in _rows(stream.valid, f"{data_spec} ({stream.valid_split})"):
                for doc, ids in _encode_docs(tok, batch):
                    kept = ids[: vbudget - valid_app.count]
                    valid_app.append(kept)
                    progress["valid_bytes"] += _nbytes(doc, len(kept), len(ids))
                progress["documents"] += len(batch)
                if valid_app.count >= vbudget:
                    break
            progress["phase"] = "train"
            commit()
        last = train_app.count + valid_app.count

        def full() -> bool:  # the training budget is reached and the validation documents are held out
            return train_app.count >= max_tokens and progress["phase"] != "valid"

        done = full()
        if not done:
            for batch in _rows(stream.train, data_spec):
                for j, (doc, ids) in enumerate(_encode_docs(tok, batch)):
                    # held out: the stream's first documents (after a BPE's sample, which is trained on)
                    if progress["phase"] == "valid" and progress["documents"] + j >= head:
                        valid_app.append(ids)
                        progress["valid_bytes"] += _nbytes(doc, len(ids), len(ids))
                        if valid_app.count >= vbudget:
                            progress["phase"] = "train"
                        continue
                    kept = ids[: max_tokens - train_app.count]
                    train_app.append(kept)
                    progress["train_bytes"] += _nbytes(doc, len(kept), len(ids))
                    if full():
                        break
                progress["documents"] += len(batch)  # (the last batch may be used in part)
                if full():
                    done = True
                    break
                if train_app.count + valid_app.count - last >= COMMIT_TOKENS:
                    commit()
                    last = train_app.count + valid_app.count
                    log.info("data: %s: %d / %d training tokens", partial.name, train_app.count, max_tokens)
        if train_app.count == 0 or valid_app.count == 0:
            raise GnoptError(f"{stream.description} gave {train_app.count} training and {valid_app.count} "
                             "validation tokens; it needs some of each.")
        progress["phase"] = "done"
        commit()
        train_app.finish()
        valid_app.finish()
    finally:
        train_app.close()
        valid_app.close()

    seconds = time.perf_counter() - t0
    new_tokens = train_app.count + valid_app.count - resumed_at
    if own_valid:
        valid_rule = f"validation from its own {stream.valid_split!r} split"
    elif held_out and head:
        valid_rule = "validation = the stream's first documents after the tokenizer's sample, held out"
    elif held_out:
        valid_rule = "validation = the stream's first documents, held out"
    else:
        valid_rule = f"validation text from {progress.get('valid_description')}"
    description = (f"{stream.description}, split {stream.train_split}, streamed up to {max_tokens:,} tokens; "
                   f"{valid_rule}")
    meta = {
        **meta_extra,
        "description": description,
        "source": stream.description,
        "vocab_size": tok.vocab_size,
        "train_tokens": int(train_app.count),
        "valid_tokens": int(valid_app.count),
        "documents": progress["documents"],
        "train_bytes": progress["train_bytes"],
        "valid_bytes": progress["valid_bytes"],
        "max_tokens": max_tokens,
        "budget_reached": done,
        "valid_source": "own split" if own_valid else ("held-out documents" if held_out else "explicit"),
        "seconds": {"stream": seconds},
        "tokens_per_second": new_tokens / seconds if seconds > 0 else None,
    }
    (partial / PROGRESS).unlink()
    (partial / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    try:
        os.rename(partial, folder)
    except OSError:
        if not folder.is_dir():
            raise
        shutil.rmtree(partial, ignore_errors=True)
    log.info("data: streamed %d + %d tokens in %.1fs (%.0f tokens/s) into %s", train_app.count,
             valid_app.count, seconds, meta["tokens_per_second"] or 0, folder)
