"""Corpus statistics for ``gnopt info`` and reports."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from gnopt.errors import GnoptError

if TYPE_CHECKING:
    from gnopt.data.cache import PreparedData


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy of the empirical unigram distribution of ``tokens``, in nats per token.

    The cross-entropy a model reaches by predicting token frequencies only (ignoring context): a useful
    "the model learned something" line in reports.
    """
    if len(tokens) == 0:
        raise GnoptError("cannot compute the unigram entropy of an empty token array.")
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
    if len(counts) > vocab_size:
        raise GnoptError(f"token id {len(counts) - 1} is outside the vocabulary of size {vocab_size}.")
    p = counts[counts > 0] / len(tokens)
    return float(-(p * np.log(p)).sum())


def data_statistics(prepared: PreparedData) -> dict[str, Any]:
    """Token and byte counts of a prepared corpus (for ``gnopt info``)."""
    meta = prepared.meta
    train_tokens, valid_tokens = int(len(prepared.train)), int(len(prepared.valid))
    train_bytes = int(meta.get("train_bytes", 0))
    valid_bytes = int(meta.get("valid_bytes", 0))
    return {
        "description": prepared.description,
        "cache_path": str(prepared.path),
        "tokenizer": prepared.tokenizer.kind,
        "vocab_size": prepared.vocab_size,
        "train_tokens": train_tokens,
        "valid_tokens": valid_tokens,
        "train_bytes": train_bytes,
        "valid_bytes": valid_bytes,
        "bytes_per_token": train_bytes / train_tokens if train_tokens else float("nan"),
        "valid_bytes_per_token": valid_bytes / valid_tokens if valid_tokens else float("nan"),
        # the validation loss of a model that ignores context (a baseline for training curves)
        "unigram_entropy_nats": (
            unigram_entropy(prepared.train, prepared.vocab_size) if train_tokens else None
        ),
    }
