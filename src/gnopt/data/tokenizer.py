"""Tokenizers: raw UTF-8 bytes, a byte-level BPE trained on the training text with HF ``tokenizers``, or a
pretrained Hugging Face tokenizer (a ``tokenizer.json`` file, or ``hf:NAME`` downloaded from the Hub).

All share one small interface (:class:`Tokenizer`): ``encode(str) -> np.ndarray[uint16]``,
``decode(ids) -> str``, ``vocab_size``, ``kind``, ``save(folder)``, plus ``encode_corpus`` for large texts.
Ids are uint16 because shards store uint16 (vocabularies up to 65,536; a larger pretrained vocabulary is
refused when it is loaded).

A *tokenizer spec* (``--tokenizer``) is ``bpe``, ``bytes``, ``hf:NAME`` (e.g. ``hf:google-t5/t5-base``:
its ``tokenizer.json`` from the Hugging Face Hub, through the Hub's local cache, so it needs the network
once) or the path of a ``tokenizer.json`` file (or of a folder holding one).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from gnopt.errors import GnoptError

TOKENIZER_KINDS: tuple[str, ...] = ("bpe", "bytes")
#: The ``kind`` of a loaded pretrained tokenizer (a file or ``hf:NAME``).
PRETRAINED = "pretrained"
MAX_VOCAB = 1 << 16
#: BPE is trained on at most this many characters of training text (an evenly spaced sample).
BPE_SAMPLE_CHARS = 10_000_000
#: Texts are cut into pieces of about this many characters (at newlines) for batched encoding.
ENCODE_CHUNK_CHARS = 64 * 1024
#: How many chunks are handed to the Rust encoder per call (bounds the memory of Encoding objects).
ENCODE_GROUP = 64

TokenIds = np.ndarray | Sequence[int] | Iterable[int]


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of gnopt needs from a tokenizer."""

    kind: str

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> np.ndarray: ...

    def encode_corpus(self, text: str) -> np.ndarray: ...

    def decode(self, ids: TokenIds) -> str: ...

    def save(self, folder: str | os.PathLike[str]) -> Path: ...


def _as_int_list(ids: TokenIds) -> list[int]:
    if isinstance(ids, np.ndarray):
        return ids.astype(np.int64, copy=False).ravel().tolist()
    if hasattr(ids, "tolist"):  # torch tensors
        return [int(i) for i in ids.tolist()]  # type: ignore[union-attr]
    return [int(i) for i in ids]


class ByteTokenizer:
    """Token id = one UTF-8 byte (vocab 256). No training, lossless; decoding replaces broken sequences."""

    kind = "bytes"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def encode_corpus(self, text: str) -> np.ndarray:
        return self.encode(text)

    def decode(self, ids: TokenIds) -> str:
        values = _as_int_list(ids)
        bad = [i for i in values if not 0 <= i < 256]
        if bad:
            raise GnoptError(f"byte tokenizer cannot decode id {bad[0]}: ids must lie in 0..255.")
        return bytes(values).decode("utf-8", errors="replace")

    def save(self, folder: str | os.PathLike[str]) -> Path:
        path = Path(folder) / "tokenizer.json"
        _atomic_write_text(path, json.dumps({"gnopt_tokenizer": "bytes", "vocab_size": 256}))
        return path

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization, no special tokens) backed by HF ``tokenizers``."""

    kind = "bpe"

    def __init__(self, hf_tokenizer: object) -> None:
        self._tok = hf_tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))  # type: ignore[attr-defined]

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 4096, *, length: int | None = None
    ) -> BPETokenizer:
        """Train a byte-level BPE of at most ``vocab_size`` tokens on ``texts`` (an iterable of pieces).

        The result can be smaller than ``vocab_size`` when the text is too short to learn that many merges;
        ``vocab_size`` reports the real size.
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if not 256 < vocab_size <= MAX_VOCAB:
            raise GnoptError(f"BPE vocab_size must be in 257..{MAX_VOCAB}, got {vocab_size}.")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
        )
        tok.train_from_iterator(texts, trainer=trainer, length=length)
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise GnoptError(f"cannot load BPE tokenizer from {path}: {exc}.") from exc

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(
            self._tok.encode(text, add_special_tokens=False).ids, dtype=np.uint16  # type: ignore[attr-defined]
        )

    @property
    def marks_documents(self) -> bool:
        """Whether encoding a document adds special tokens (e.g. T5's ``</s>``) that mark its end."""
        return int(self._tok.num_special_tokens_to_add(False)) > 0  # type: ignore[attr-defined]

    def encode_documents(self, texts: list[str]) -> list[np.ndarray]:
        """Encode whole documents in one parallel batch, each as the tokenizer encodes a document (with its
        special tokens, e.g. T5's closing ``</s>``; a gnopt-trained BPE has none)."""
        encode_batch = getattr(self._tok, "encode_batch_fast", None) or self._tok.encode_batch  # type: ignore[attr-defined]
        return [np.asarray(e.ids, dtype=np.uint16) for e in encode_batch(texts, add_special_tokens=True)]

    def encode_corpus(self, text: str) -> np.ndarray:
        """Encode a large text quickly: cut at newlines into ~64K-character chunks and encode them in
        parallel batches (``encode_batch_fast``). The cuts are where pre-tokenization splits anyway (see
        :func:`iter_chunks`), so the result equals ``encode(text)`` unless a 32K-character stretch has no
        ``"x\\nY"`` newline."""
        encode_batch = getattr(self._tok, "encode_batch_fast", None) or self._tok.encode_batch  # type: ignore[attr-defined]
        parts: list[np.ndarray] = []
        group: list[str] = []
        for chunk in iter_chunks(text, ENCODE_CHUNK_CHARS):
            group.append(chunk)
            if len(group) == ENCODE_GROUP:
                parts.extend(
                    np.asarray(e.ids, dtype=np.uint16) for e in encode_batch(group, add_special_tokens=False)
                )
                group = []
        if group:
            parts.extend(
                np.asarray(e.ids, dtype=np.uint16) for e in encode_batch(group, add_special_tokens=False)
            )
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)

    def decode(self, ids: TokenIds) -> str:
        return self._tok.decode(_as_int_list(ids), skip_special_tokens=False)  # type: ignore[attr-defined]

    def save(self, folder: str | os.PathLike[str]) -> Path:
        path = Path(folder) / "tokenizer.json"
        _atomic_write_text(path, self._tok.to_str())  # type: ignore[attr-defined]
        return path

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


class PretrainedTokenizer(BPETokenizer):
    """A pretrained Hugging Face tokenizer (any model: BPE, Unigram/SentencePiece, WordPiece) used as is.

    ``source`` says where it came from (a path or ``hf:NAME``); ``identity`` is the SHA-256 of its
    canonical JSON, so two copies of the same tokenizer share cache entries and any change misses.
    ``encode``/``encode_corpus`` add no special tokens (a text is not a document);
    ``encode_documents`` adds the tokenizer's own (T5: ``</s>`` after each document).
    """

    kind = PRETRAINED

    def __init__(self, hf_tokenizer: object, source: str) -> None:
        super().__init__(hf_tokenizer)
        self.source = source
        # The id range, not just the count: shards and the model's embedding need every id < vocab_size.
        vocab = hf_tokenizer.get_vocab(with_added_tokens=True)  # type: ignore[attr-defined]
        size = max(len(vocab), max(vocab.values(), default=-1) + 1)
        if size > MAX_VOCAB:
            raise GnoptError(
                f"tokenizer {source} has a vocabulary of {size:,} tokens; token shards store uint16 ids, "
                f"so at most {MAX_VOCAB:,} are supported."
            )
        self._size = size

    @property
    def vocab_size(self) -> int:
        return self._size

    @property
    def identity(self) -> str:
        return hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"PretrainedTokenizer({self.source!r}, vocab_size={self.vocab_size})"


def is_pretrained_spec(spec: str | None) -> bool:
    """Whether a ``--tokenizer`` value names a pretrained tokenizer (anything but ``bpe`` / ``bytes``)."""
    return spec is not None and spec not in TOKENIZER_KINDS


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__


def _hf_tokenizer_from_file(path: Path, what: str) -> object:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return HFTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on anything it cannot parse
        raise GnoptError(f"{what} is not a Hugging Face tokenizer.json ({_first_line(exc)}).") from None


def load_pretrained(spec: str) -> PretrainedTokenizer:
    """Load a pretrained tokenizer: ``hf:NAME`` (the Hub's ``tokenizer.json``, via its local cache) or a
    ``tokenizer.json`` path (or a folder holding one). Every failure is one :class:`GnoptError` line."""
    if spec.startswith("hf:"):
        name = spec[3:].strip()
        if not name:
            raise GnoptError("bad tokenizer 'hf:'; expected hf:NAME, e.g. hf:google-t5/t5-base.")
        try:
            from huggingface_hub import hf_hub_download

            local = hf_hub_download(repo_id=name, filename="tokenizer.json")
        except Exception as exc:  # offline, unknown repository, no tokenizer.json, ...
            raise GnoptError(
                f"cannot get tokenizer {spec} from the Hugging Face Hub ({type(exc).__name__}: "
                f"{_first_line(exc)}); it needs the network once (or the Hub cache), else pass a "
                "tokenizer.json path."
            ) from None
        hf_tok = _hf_tokenizer_from_file(Path(local), f"the tokenizer.json of {spec}")
        return PretrainedTokenizer(hf_tok, spec)
    p = Path(spec).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise GnoptError(
            f"unknown tokenizer {spec!r}: not {', '.join(TOKENIZER_KINDS)}, hf:NAME or an existing "
            "tokenizer.json file."
        )
    return PretrainedTokenizer(_hf_tokenizer_from_file(p, f"tokenizer file {p}"), str(p))


def iter_chunks(text: str, size: int) -> Iterator[str]:
    """Consecutive pieces of ``text`` of about ``size`` characters; concatenated they give ``text``.

    A piece ends, when possible, just after a newline that sits between two non-space characters
    (``"x\nY"``): byte-level pre-tokenization always splits there, so encoding the pieces separately gives
    exactly the tokens of the whole text. Failing that (no such newline in the second half of the piece),
    the cut is at ``size`` characters.
    """
    start, n = 0, len(text)
    while start < n:
        end = min(start + size, n)
        if end < n:
            lo = start + size // 2
            cut = text.rfind("\n", lo, end - 1)
            while cut != -1 and (text[cut - 1].isspace() or text[cut + 1].isspace()):
                cut = text.rfind("\n", lo, cut)
            if cut != -1:
                end = cut + 1
        yield text[start:end]
        start = end


def bpe_training_sample(text: str, max_chars: int = BPE_SAMPLE_CHARS, pieces: int = 200) -> list[str]:
    """The text to train BPE on: all of ``text`` if short, else ``pieces`` evenly spaced slices totalling
    about ``max_chars`` (deterministic; spread over the corpus so every part/author is represented)."""
    if len(text) <= max_chars:
        return list(iter_chunks(text, ENCODE_CHUNK_CHARS))
    piece = max_chars // pieces
    stride = len(text) // pieces
    out: list[str] = []
    for i in range(pieces):
        s = i * stride
        out.extend(iter_chunks(text[s : s + piece], ENCODE_CHUNK_CHARS))
    return out


def make_tokenizer(kind: str, train_text: str | None = None, vocab_size: int = 4096) -> Tokenizer:
    """A ``bytes`` tokenizer, or a ``bpe`` tokenizer trained on (a bounded sample of) ``train_text``."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        if train_text is None:
            raise GnoptError("a BPE tokenizer needs training text.")
        sample = bpe_training_sample(train_text)
        return BPETokenizer.train(sample, vocab_size, length=len(sample))
    raise GnoptError(f"unknown tokenizer {kind!r}; valid tokenizers: {', '.join(TOKENIZER_KINDS)}.")


def load_tokenizer(path: str | os.PathLike[str], *, pretrained_source: str | None = None) -> Tokenizer:
    """Load a tokenizer saved by ``save`` (a ``tokenizer.json`` file or the folder that holds one).

    ``pretrained_source``: the file holds the pretrained tokenizer that came from there (a cache entry's
    copy); it is loaded as a :class:`PretrainedTokenizer`."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise GnoptError(f"tokenizer file {p} does not exist.")
    try:
        head = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GnoptError(f"tokenizer file {p} is not valid JSON: {exc}.") from exc
    if isinstance(head, dict) and head.get("gnopt_tokenizer") == "bytes":
        return ByteTokenizer()
    if pretrained_source is not None:
        return PretrainedTokenizer(_hf_tokenizer_from_file(p, f"tokenizer file {p}"), pretrained_source)
    return BPETokenizer.load(p)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
