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

Under the lock a :class:`_StreamedBuild` does the work in explicit phases (:data:`Phase`: ``valid``, then
``train``, then ``done``), its durable state a typed :class:`_Progress` (the keys of ``progress.json``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

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
    request = _Request(data_spec, tokenizer, vocab_size, pretrained, max_tokens, key, valid_src, meta_extra)
    t0 = time.perf_counter()
    stream = open_hf_stream(data_spec)  # before anything is written: an unreachable dataset writes nothing
    partial = folder.with_name(f".{folder.name}.partial")
    folder.parent.mkdir(parents=True, exist_ok=True)
    # The partial folder is read, deleted, written and renamed only under this lock.
    with FolderLock(folder.parent, "the streamed cache entry", name=f".{folder.name}.lock", target=partial):
        if folder.is_dir():  # another process published it after our caller looked
            return
        _StreamedBuild(request, stream, partial, t0).run(folder)


@dataclass(frozen=True)
class _Request:
    """What the entry holds: the arguments of :func:`prepare_streamed` that decide its content."""

    data_spec: str
    tokenizer: str
    vocab_size: int
    pretrained: Tokenizer | None
    max_tokens: int
    key: str
    valid_src: TextSource | None
    meta_extra: dict[str, Any]


#: Where a build stands: ``valid`` fills the validation shard (from the dataset's own split, or with the
#: training stream's first documents held out), ``train`` fills the training shard, ``done`` is complete.
Phase = Literal["valid", "train", "done"]
PHASES: tuple[Phase, ...] = ("valid", "train", "done")


@dataclass
class _Progress:
    """``progress.json``: what the last commit made durable (a rerun continues from it)."""

    key: str
    phase: Phase = "valid"
    valid_tokens: int = 0
    train_tokens: int = 0
    train_state: Any = None  # the training stream's position (``IterableDataset.state_dict()``)
    valid_state: Any = None  # the own validation split's position
    documents: int = 0
    train_bytes: int = 0
    valid_bytes: int = 0
    #: After a BPE's sample, with held-out validation: the stream's first documents are training ones.
    train_head_docs: int = 0
    valid_description: str | None = None  # an explicit validation source

    @classmethod
    def read(cls, path: Path, key: str) -> _Progress | None:
        """The progress of a build of ``key`` at ``path``; ``None`` for none, another key or a bad file."""
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        if not isinstance(raw, dict) or raw.get("key") != key or raw.get("phase") not in PHASES:
            return None
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in raw.items() if k in names})
        except TypeError:
            return None

    def write(self, path: Path) -> None:
        obj = asdict(self)
        if not self.train_head_docs:
            del obj["train_head_docs"]
        if self.valid_description is None:
            del obj["valid_description"]
        _write_json_atomic(path, obj)


class _StreamedBuild:
    """One build of a streamed entry, under its lock: start or resume, fill the shards phase by phase
    (committing as it goes), publish."""

    def __init__(self, request: _Request, stream: StreamedDataset, partial: Path, t0: float) -> None:
        self.req = request
        self.stream = stream
        self.partial = partial
        self.t0 = t0
        self.vbudget = valid_budget(request.max_tokens)
        #: the validation text: the dataset's own split, documents held out of the training stream, or
        #: an explicit source (neither flag)
        self.own_valid = request.valid_src is None and stream.valid is not None
        self.held_out = request.valid_src is None and stream.valid is None

    def run(self, folder: Path) -> None:
        progress = _Progress.read(self.partial / PROGRESS, self.req.key)
        if progress is None:
            tok, progress = self._start()
        else:
            tok = load_tokenizer(self.partial / "tokenizer.json",
                                 pretrained_source=getattr(self.req.pretrained, "source", None))
            log.info("data: resuming %s at %d training + %d validation tokens", self.partial,
                     progress.train_tokens, progress.valid_tokens)
        self.progress = progress
        self.train_app = ShardAppender(self.partial / "train.bin", progress.train_tokens)
        self.valid_app = ShardAppender(self.partial / "valid.bin", progress.valid_tokens)
        resumed_at = progress.train_tokens + progress.valid_tokens
        try:
            if progress.train_state is not None:
                self.stream.train.load_state_dict(progress.train_state)
            if self.own_valid and progress.valid_state is not None:
                self.stream.valid.load_state_dict(progress.valid_state)
            if self.own_valid and progress.phase == "valid":
                self._fill_own_valid(tok)
            done = self._full() or self._fill_train(tok)
            if self.train_app.count == 0 or self.valid_app.count == 0:
                raise GnoptError(f"{self.stream.description} gave {self.train_app.count} training and "
                                 f"{self.valid_app.count} validation tokens; it needs some of each.")
            progress.phase = "done"
            self._commit()
            self.train_app.finish()
            self.valid_app.finish()
        finally:
            self.train_app.close()
            self.valid_app.close()
        self._publish(folder, tok, done, resumed_at)

    # ---------------------------------------------------------------------------------- the phases
    def _start(self) -> tuple[Tokenizer, _Progress]:
        """A fresh partial folder: the tokenizer (a BPE trained on the stream's head), then an explicit
        validation source tokenized whole (phase ``train``) or nothing yet (phase ``valid``)."""
        tok, head = self._tokenizer()
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        tok.save(self.partial)
        progress = _Progress(key=self.req.key, train_head_docs=head)
        if self.req.valid_src is not None:
            loaded = self.req.valid_src.read()
            app = ShardAppender(self.partial / "valid.bin")
            app.append(tok.encode_corpus(loaded.text))
            progress.valid_tokens = app.commit()
            app.close()
            progress.phase = "train"
            progress.valid_description = loaded.description
            progress.valid_bytes = len(loaded.text.encode("utf-8"))
        progress.write(self.partial / PROGRESS)
        return tok, progress

    def _tokenizer(self) -> tuple[Tokenizer, int]:
        """The entry's tokenizer and, with held-out validation after a BPE's sample, how many of the
        stream's first documents (the sample's, trained on) come before the held-out ones."""
        req = self.req
        if req.pretrained is not None:
            return req.pretrained, 0
        if req.tokenizer != "bpe":
            return make_tokenizer(req.tokenizer), 0
        sample: list[str] = []  # the first ~10M characters of the training stream
        total = 0
        exhausted = True
        for batch in _rows(open_hf_stream(req.data_spec).train, req.data_spec):
            sample.extend(batch)
            total += sum(len(d) for d in batch)
            if total >= BPE_SAMPLE_CHARS:
                exhausted = False
                break
        if not sample:
            raise GnoptError(f"{self.stream.description} holds no text.")
        head = 0
        if self.held_out:
            # The validation documents are held out *after* the sample, whose documents are trained on: the
            # tokenizer never sees validation text. A stream that fits in the sample keeps its last
            # twentieth of documents out of it.
            if exhausted:
                sample = sample[: len(sample) - max(1, len(sample) // 20)]
            if not sample:
                raise GnoptError(f"{self.stream.description} is too small to hold out validation documents.")
            head = len(sample)
        return make_tokenizer("bpe", "\n".join(sample), req.vocab_size), head

    def _fill_own_valid(self, tok: Tokenizer) -> None:
        """Phase ``valid`` from the dataset's own validation split, up to the validation budget."""
        progress, app = self.progress, self.valid_app
        for batch in _rows(self.stream.valid, f"{self.req.data_spec} ({self.stream.valid_split})"):
            for doc, ids in _encode_docs(tok, batch):
                kept = ids[: self.vbudget - app.count]
                app.append(kept)
                progress.valid_bytes += _nbytes(doc, len(kept), len(ids))
            progress.documents += len(batch)
            if app.count >= self.vbudget:
                break
        progress.phase = "train"
        self._commit()

    def _fill_train(self, tok: Tokenizer) -> bool:
        """Stream training documents (first holding out validation ones, in phase ``valid``) until the
        budget; commit every :data:`COMMIT_TOKENS`. Whether the budget was reached."""
        progress, train, valid = self.progress, self.train_app, self.valid_app
        max_tokens = self.req.max_tokens
        last = train.count + valid.count
        for batch in _rows(self.stream.train, self.req.data_spec):
            for j, (doc, ids) in enumerate(_encode_docs(tok, batch)):
                # held out: the stream's first documents (after a BPE's sample, which is trained on)
                if progress.phase == "valid" and progress.documents + j >= progress.train_head_docs:
                    valid.append(ids)
                    progress.valid_bytes += _nbytes(doc, len(ids), len(ids))
                    if valid.count >= self.vbudget:
                        progress.phase = "train"
                    continue
                kept = ids[: max_tokens - train.count]
                train.append(kept)
                progress.train_bytes += _nbytes(doc, len(kept), len(ids))
                if self._full():
                    break
            progress.documents += len(batch)  # (the last batch may be used in part)
            if self._full():
                return True
            if train.count + valid.count - last >= COMMIT_TOKENS:
                self._commit()
                last = train.count + valid.count
                log.info("data: %s: %d / %d training tokens", self.partial.name, train.count, max_tokens)
        return False

    def _full(self) -> bool:
        """The training budget is reached and the validation documents are held out."""
        return self.train_app.count >= self.req.max_tokens and self.progress.phase != "valid"

    def _commit(self) -> None:
        """Shards fsynced first, then ``progress.json`` replaced atomically."""
        progress = self.progress
        progress.valid_tokens = self.valid_app.commit()
        progress.train_tokens = self.train_app.commit()
        progress.train_state = _state(self.stream.train)
        if self.own_valid:
            progress.valid_state = _state(self.stream.valid)
        progress.write(self.partial / PROGRESS)

    def _publish(self, folder: Path, tok: Tokenizer, done: bool, resumed_at: int) -> None:
        """``meta.json`` in place of ``progress.json``, then the partial folder renamed into ``folder``."""
        req, stream, progress = self.req, self.stream, self.progress
        train_tokens, valid_tokens = self.train_app.count, self.valid_app.count
        seconds = time.perf_counter() - self.t0
        new_tokens = train_tokens + valid_tokens - resumed_at
        if self.own_valid:
            valid_rule = f"validation from its own {stream.valid_split!r} split"
        elif self.held_out and progress.train_head_docs:
            valid_rule = "validation = the stream's first documents after the tokenizer's sample, held out"
        elif self.held_out:
            valid_rule = "validation = the stream's first documents, held out"
        else:
            valid_rule = f"validation text from {progress.valid_description}"
        description = (f"{stream.description}, split {stream.train_split}, streamed up to "
                       f"{req.max_tokens:,} tokens; {valid_rule}")
        meta = {
            **req.meta_extra,
            "description": description,
            "source": stream.description,
            "vocab_size": tok.vocab_size,
            "train_tokens": int(train_tokens),
            "valid_tokens": int(valid_tokens),
            "documents": progress.documents,
            "train_bytes": progress.train_bytes,
            "valid_bytes": progress.valid_bytes,
            "max_tokens": req.max_tokens,
            "budget_reached": done,
            "valid_source": "own split" if self.own_valid else (
                "held-out documents" if self.held_out else "explicit"),
            "seconds": {"stream": seconds},
            "tokens_per_second": new_tokens / seconds if seconds > 0 else None,
        }
        (self.partial / PROGRESS).unlink()
        (self.partial / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        try:
            os.rename(self.partial, folder)
        except OSError:
            if not folder.is_dir():
                raise
            shutil.rmtree(self.partial, ignore_errors=True)
        log.info("data: streamed %d + %d tokens in %.1fs (%.0f tokens/s) into %s", train_tokens, valid_tokens,
                 seconds, meta["tokens_per_second"] or 0, folder)
