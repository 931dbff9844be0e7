"""Tokenize a corpus once and cache it: train/valid uint16 shards plus the tokenizer.

``prepare(data_spec, tokenizer, vocab_size, cache_dir)`` resolves the spec (see :mod:`gnopt.data.sources`),
derives a cache key from the corpus identity (file paths, sizes and modification times; Python version
for the default corpus; the dataset name for the hub), the tokenizer kind (a pretrained tokenizer: the
SHA-256 of its JSON), the vocabulary size, the token budget of a streamed entry (and, for a streamed BPE
without explicit validation data, that its BPE sees training documents only), the validation rule and
:data:`FORMAT_VERSION`, and then either

- **hits**: memory-maps ``<cache>/data/<name>-<key>/{train,valid}.bin`` and loads ``tokenizer.json``
  without reading or tokenizing any text, or
- **misses**: with ``max_tokens``, streams an ``hf:`` dataset up to that many tokens, resumably (see
  :mod:`gnopt.data.stream`); otherwise reads the text, holds out the validation text (an explicit
  validation source, else the last ``valid_fraction`` of the training text, cut at a line break), trains
  the tokenizer on the *training* text only (BPE: on a bounded, evenly spaced sample of at most ~10M
  characters; a pretrained tokenizer is used as is), tokenizes both parts (batched, parallel) and
  publishes the folder atomically (built under a temporary name, then renamed, so
  concurrent or interrupted runs never see a half-written cache entry).

The cache root is the ``cache_dir`` argument, else ``$GNOPT_CACHE``, else ``~/.cache/gnopt``.

A cache entry is itself a data spec: ``prepare(<cache>/data/<entry>, ...)`` (``--data <entry folder>``) loads
that entry as it is, without its corpus, its key or a cache root (:func:`is_prepared_entry`), once the
tokenizer asked for is the entry's own; so an entry copied to a machine without the corpus (a GPU machine
without network, say) trains there unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gnopt.data.shards import read_shard, write_shard
from gnopt.data.sources import HF_MAX_CHARS, TextSource, hf_stream_source, resolve_data
from gnopt.data.tokenizer import (
    BPE_SAMPLE_CHARS,
    MAX_VOCAB,
    PRETRAINED,
    PretrainedTokenizer,
    Tokenizer,
    is_pretrained_spec,
    load_pretrained,
    load_tokenizer,
    make_tokenizer,
)
from gnopt.errors import GnoptError

log = logging.getLogger(__name__)

#: Bump when the shard layout, the tokenizer training or the split rule changes: old entries then miss.
FORMAT_VERSION = 1
DEFAULT_VALID_FRACTION = 0.05


def default_cache_dir() -> Path:
    """``$GNOPT_CACHE`` if set, else ``~/.cache/gnopt``."""
    env = os.environ.get("GNOPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gnopt"


@dataclass
class PreparedData:
    """A tokenized corpus: ``train``/``valid`` are uint16 arrays (memory-mapped from the cache)."""

    train: np.ndarray
    valid: np.ndarray
    tokenizer: Tokenizer
    description: str
    path: Path
    cache_hit: bool
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def split_tail(text: str, fraction: float) -> tuple[str, str]:
    """(head, tail) with the tail about ``fraction`` of ``text``, cut just after a line break when one lies
    in the last 1% of the head (so no line is split), else at the exact character."""
    if not 0.0 < fraction < 1.0:
        raise GnoptError(f"valid_fraction must be strictly between 0 and 1, got {fraction}.")
    cut = int(len(text) * (1.0 - fraction))
    nl = text.rfind("\n", max(0, cut - max(1, len(text) // 100)), cut)
    if nl != -1:
        cut = nl + 1
    return text[:cut], text[cut:]


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return (s or "corpus")[:40]


def cache_key(
    train: TextSource,
    valid: TextSource | None,
    tokenizer: str,
    vocab_size: int,
    valid_fraction: float,
    *,
    tokenizer_sha256: str | None = None,
    max_tokens: int | None = None,
) -> str:
    """Hex digest identifying a prepared corpus (see the module docstring for what goes into it).

    A pretrained tokenizer (``tokenizer="pretrained"``) is identified by the SHA-256 of its JSON, not by
    where it came from; ``max_tokens`` (a streamed entry) keys the budget and the streamed source."""
    payload: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "train": train.identity,
        "valid": valid.identity if valid is not None else {"tail_fraction": valid_fraction},
        "tokenizer": tokenizer,
        "vocab_size": vocab_size if tokenizer in ("bpe", PRETRAINED) else 256,
        "bpe_sample_chars": BPE_SAMPLE_CHARS if tokenizer == "bpe" else None,
    }
    if tokenizer_sha256 is not None:
        payload["tokenizer_sha256"] = tokenizer_sha256
    if max_tokens is not None:
        payload["max_tokens"] = max_tokens
        if tokenizer == "bpe" and valid is None:
            # a streamed BPE is trained on training documents only (a validation held out of the stream
            # follows its sample): entries built before, whose BPE had seen that validation text, miss
            payload["bpe_sample"] = "training documents"
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()[:20]


def _load_entry(folder: Path) -> PreparedData:
    meta_path = folder / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GnoptError(
            f"cache entry {meta_path} is unreadable ({exc}); delete {folder} to rebuild it."
        ) from None
    if meta.get("format") != FORMAT_VERSION:
        raise GnoptError(f"cache entry {folder} has format {meta.get('format')!r}; delete it to rebuild it.")
    train = read_shard(folder / "train.bin")
    valid = read_shard(folder / "valid.bin")
    source = meta.get("tokenizer_source") if meta.get("tokenizer") == PRETRAINED else None
    tok = load_tokenizer(folder / "tokenizer.json", pretrained_source=source)
    if len(train) != meta.get("train_tokens") or len(valid) != meta.get("valid_tokens"):
        raise GnoptError(f"cache entry {folder} does not match its meta.json; delete it to rebuild it.")
    return PreparedData(train, valid, tok, meta["description"], folder, True, meta)


#: The files of a cache entry (besides ``meta.json``).
ENTRY_FILES: tuple[str, ...] = ("train.bin", "valid.bin", "tokenizer.json")


def is_prepared_entry(data_spec: str | os.PathLike[str] | None) -> bool:
    """Whether ``data_spec`` is the folder of a prepared cache entry (``meta.json`` naming a format and a key,
    and the entry's shards and tokenizer) rather than a corpus."""
    if data_spec is None or (isinstance(data_spec, str) and data_spec.startswith("hf:")):
        return False
    folder = Path(data_spec).expanduser()
    if not (folder / "meta.json").is_file() or not all((folder / f).is_file() for f in ENTRY_FILES):
        return False
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and "format" in meta and "key" in meta


def _load_prepared_entry(folder: Path, tokenizer: str, vocab_size: int, valid_data: Any,
                         max_tokens: int | None) -> PreparedData:
    """Load the entry ``folder`` given as the data spec, once the request matches what it holds."""
    prepared = _load_entry(folder)
    meta = prepared.meta
    if valid_data is not None or max_tokens is not None:
        raise GnoptError(f"{folder} is a prepared cache entry: it holds its own validation split and token "
                         "budget; drop valid_data / max_tokens.")
    kind = meta.get("tokenizer")
    if is_pretrained_spec(tokenizer):
        want = load_pretrained(tokenizer).identity
        if kind != PRETRAINED or meta.get("tokenizer_sha256") != want:
            raise GnoptError(f"the prepared entry {folder} was not tokenized with {tokenizer} (its "
                             f"tokenizer: {kind}, sha256 {meta.get('tokenizer_sha256')}).")
    elif tokenizer != kind or (kind == "bpe" and meta.get("requested_vocab_size") != vocab_size):
        held = f"{kind}" + (f" with vocab_size {meta.get('requested_vocab_size')}" if kind == "bpe" else "")
        asked = f"{tokenizer}" + (f" with vocab_size {vocab_size}" if tokenizer == "bpe" else "")
        raise GnoptError(f"the prepared entry {folder} holds {held} tokens, not {asked}; ask for its own "
                         "tokenizer and vocabulary (its meta.json says which).")
    log.info("data: prepared entry %s (%s)", folder, prepared.description)
    return prepared


def prepare(
    data_spec: str | os.PathLike[str] | None = None,
    tokenizer: str = "bpe",
    vocab_size: int = 4096,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    valid_data: str | os.PathLike[str] | None = None,
    valid_fraction: float = DEFAULT_VALID_FRACTION,
    max_chars: int = HF_MAX_CHARS,
    max_tokens: int | None = None,
    rebuild: bool = False,
) -> PreparedData:
    """Tokenize ``data_spec`` once (cached) and return its train/valid tokens and tokenizer.

    Args:
        data_spec: file, folder, ``hf:NAME[:CONFIG][:SPLIT]``, ``None`` for the embedded default corpus, or
            the folder of a prepared cache entry (loaded as it is; see the module docstring).
        tokenizer: ``"bpe"`` (byte-level BPE trained on the training text), ``"bytes"`` (vocab 256), or a
            pretrained tokenizer: ``"hf:NAME"`` or the path of a ``tokenizer.json`` (vocabulary <= 65,536).
        vocab_size: BPE vocabulary size (ignored for ``bytes`` and pretrained tokenizers); the trained
            vocabulary can be smaller on a tiny corpus: use ``PreparedData.vocab_size`` for the model.
        cache_dir: cache root (default ``$GNOPT_CACHE`` or ``~/.cache/gnopt``).
        valid_data: explicit validation text (a file, folder or hf spec); by default a folder's
            ``valid.txt`` or a local dataset's validation split, else the held-out tail.
        valid_fraction: size of the held-out tail when there is no validation source.
        max_chars: cap on the characters read from a Hugging Face dataset (not streamed with a budget).
        max_tokens: stream an ``hf:`` dataset and tokenize it up to this many training tokens, resumably
            (see :mod:`gnopt.data.stream`); validation comes from the dataset's own validation split.
        rebuild: ignore and replace an existing cache entry.
    """
    if is_prepared_entry(data_spec):
        assert data_spec is not None
        return _load_prepared_entry(Path(data_spec).expanduser(), tokenizer, vocab_size, valid_data,
                                    max_tokens)
    pretrained: PretrainedTokenizer | None = None
    if is_pretrained_spec(tokenizer):
        # a bad file, a too large vocabulary, offline: fail before anything is written
        pretrained = load_pretrained(tokenizer)
        vocab_size = pretrained.vocab_size
    elif tokenizer == "bpe" and not 256 < vocab_size <= MAX_VOCAB:
        raise GnoptError(f"BPE vocab_size must be in 257..{MAX_VOCAB}, got {vocab_size}.")
    kind = PRETRAINED if pretrained is not None else tokenizer
    if max_tokens is not None:
        if not (isinstance(data_spec, str) and data_spec.startswith("hf:")):
            raise GnoptError("max_tokens streams a Hugging Face dataset: --data must be hf:NAME[:CONFIG]"
                             f"[:SPLIT] (a local file works too: hf:PATH), got {data_spec!r}.")
        if max_tokens < 1:
            raise GnoptError(f"max_tokens must be a positive integer, got {max_tokens}.")
        _, valid_src = resolve_data(None, valid_data) if valid_data is not None else (None, None)
        train_src = hf_stream_source(data_spec)
    else:
        train_src, valid_src = resolve_data(data_spec, valid_data, max_chars=max_chars)
    key = cache_key(train_src, valid_src, kind, vocab_size, valid_fraction,
                    tokenizer_sha256=pretrained.identity if pretrained is not None else None,
                    max_tokens=max_tokens)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if pretrained is not None:  # named by content (the key), not by path: copies share the entry
        vtag = f"pretrained{vocab_size}"
    else:
        vtag = f"{tokenizer}{vocab_size}" if tokenizer == "bpe" else "bytes"
    budget_tag = f"-{max_tokens}tok" if max_tokens is not None else ""
    folder = root / "data" / f"{_slug(train_src.name)}-{vtag}{budget_tag}-{key}"

    if folder.is_dir() and not rebuild:
        prepared = _load_entry(folder)
        log.info("data: cache hit %s (%s)", folder, prepared.description)
        return prepared

    if max_tokens is not None:
        from gnopt.data.stream import prepare_streamed

        assert isinstance(data_spec, str)
        if rebuild and folder.exists():
            shutil.rmtree(folder)
        prepare_streamed(
            data_spec, tokenizer, vocab_size, pretrained, max_tokens, folder, key, valid_src,
            {"format": FORMAT_VERSION, "key": key, "tokenizer": kind,
             "tokenizer_source": pretrained.source if pretrained is not None else None,
             "tokenizer_sha256": pretrained.identity if pretrained is not None else None,
             "requested_vocab_size": vocab_size if tokenizer == "bpe" else None},
        )
        prepared = _load_entry(folder)
        prepared.cache_hit = False
        return prepared

    t0 = time.perf_counter()
    log.info("data: preparing %s (tokenizer %s) into %s", train_src.description, vtag, folder)
    loaded = train_src.read()
    if valid_src is not None:
        vloaded = valid_src.read()
        train_text, valid_text = loaded.text, vloaded.text
        valid_rule = f"validation text from {vloaded.description}"
    else:
        train_text, valid_text = split_tail(loaded.text, valid_fraction)
        valid_rule = f"validation = held-out last {valid_fraction:.0%} of the text"
    if not train_text or not valid_text:
        raise GnoptError(f"corpus {loaded.description} is too small to hold out validation text.")
    description = f"{loaded.description}; {valid_rule}"

    t1 = time.perf_counter()
    tok = pretrained if pretrained is not None else make_tokenizer(tokenizer, train_text, vocab_size)
    t2 = time.perf_counter()
    train_ids = tok.encode_corpus(train_text)
    valid_ids = tok.encode_corpus(valid_text)
    t3 = time.perf_counter()
    log.info(
        "data: tokenizer trained in %.1fs, %d + %d tokens in %.1fs",
        t2 - t1, len(train_ids), len(valid_ids), t3 - t2,
    )

    train_bytes = len(train_text.encode("utf-8"))
    valid_bytes = len(valid_text.encode("utf-8"))
    meta: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "key": key,
        "description": description,
        "source": train_src.description,
        "tokenizer": kind,
        "tokenizer_source": pretrained.source if pretrained is not None else None,
        "tokenizer_sha256": pretrained.identity if pretrained is not None else None,
        "vocab_size": tok.vocab_size,
        "requested_vocab_size": vocab_size if tokenizer == "bpe" else (256 if tokenizer == "bytes" else None),
        "train_tokens": int(len(train_ids)),
        "valid_tokens": int(len(valid_ids)),
        "train_bytes": train_bytes,
        "valid_bytes": valid_bytes,
        "train_files": loaded.n_files,
        "valid_source": "explicit" if valid_src is not None else "tail",
        "valid_fraction": None if valid_src is not None else valid_fraction,
        "seconds": {"read": t1 - t0, "tokenizer": t2 - t1, "encode": t3 - t2},
    }
    root.joinpath("data").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root / "data", prefix=f".{folder.name}.tmp-"))
    try:
        write_shard(tmp / "train.bin", train_ids)
        write_shard(tmp / "valid.bin", valid_ids)
        tok.save(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if rebuild and folder.exists():
            shutil.rmtree(folder)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():  # a concurrent run publishing the same key is fine; anything else is not
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prepared = _load_entry(folder)
    prepared.cache_hit = False
    log.info("data: prepared %s in %.1fs", folder, time.perf_counter() - t0)
    return prepared
