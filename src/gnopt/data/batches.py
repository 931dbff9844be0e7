"""Deterministic language-model batches from a token stream.

Training (:class:`TokenBatcher`): the stream is cut into non-overlapping windows of ``seq_len + 1``
tokens (window ``w`` = tokens ``[w·(T+1), (w+1)·(T+1))``). Each epoch visits every window exactly once
in a seeded random order (a permutation that depends only on ``(seed, epoch)``), so sampling is *without
replacement*. Micro-batches take the next ``B`` windows of that order; a micro-batch that runs past the end
of an epoch continues with the next epoch's permutation, so every batch is full and each epoch still
covers each window once. The state is three integers (seed, epoch, position), which makes a resumed run
see exactly the batches the interrupted run would have seen.

Evaluation (:func:`eval_batches`): a fixed validation set, the first ``max_tokens`` predicted tokens of the
validation stream in contiguous windows, grouped into micro-batches of equal size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gnopt.errors import GnoptError

Batch = tuple[Tensor, Tensor]


def corpus_too_small_check(
    train_tokens: int,
    valid_tokens: int,
    seq_len: int,
    micro_batch_size: int,
    *,
    what: str = "the corpus",
) -> None:
    """Raise :class:`GnoptError` unless the training tokens fill one micro-batch of ``micro_batch_size``
    windows of ``seq_len + 1`` tokens and the validation tokens fill at least one window."""
    if seq_len < 1 or micro_batch_size < 1:
        raise GnoptError(
            f"seq_len and micro_batch_size must be positive, got {seq_len} and {micro_batch_size}."
        )
    need = micro_batch_size * (seq_len + 1)
    if train_tokens < need:
        raise GnoptError(
            f"{what} is too small: {train_tokens} training tokens cannot fill one micro-batch of "
            f"{micro_batch_size} x {seq_len + 1} = {need} tokens; use more data or a smaller batch/seq_len."
        )
    if valid_tokens < seq_len + 1:
        raise GnoptError(
            f"{what} is too small: {valid_tokens} validation tokens cannot fill one window of "
            f"{seq_len + 1} tokens; use more validation data or a smaller seq_len."
        )


def _to_batch(windows: np.ndarray, device: torch.device | str | None) -> Batch:
    arr = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.int64))
    x, y = arr[:, :-1], arr[:, 1:]
    if device is not None and torch.device(device).type != "cpu":
        x = x.pin_memory().to(device, non_blocking=True)
        y = y.pin_memory().to(device, non_blocking=True)
    else:
        x, y = x.contiguous(), y.contiguous()
    return x, y


class TokenBatcher:
    """Infinite iterator of ``(x, y)`` LongTensor pairs [B, T], y = x shifted by one token.

    Deterministic given ``seed``; without replacement within each epoch; resumable through
    :meth:`state_dict` / :meth:`load_state_dict`.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        micro_batch_size: int,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        if tokens.ndim != 1:
            raise GnoptError(f"tokens must be a 1-D array, got shape {tokens.shape}.")
        if seq_len < 1 or micro_batch_size < 1:
            raise GnoptError(
                f"seq_len and micro_batch_size must be positive, got {seq_len} and {micro_batch_size}."
            )
        if len(tokens) < micro_batch_size * (seq_len + 1):
            raise GnoptError(
                f"the training data is too small: {len(tokens)} tokens cannot fill one micro-batch of "
                f"{micro_batch_size} x {seq_len + 1} tokens."
            )
        self.tokens = tokens
        self.seq_len = int(seq_len)
        self.micro_batch_size = int(micro_batch_size)
        self.device = device
        self.seed = int(seed)
        self.n_windows = len(tokens) // (self.seq_len + 1)
        self.epoch = 0
        self.position = 0  # windows already consumed in the current epoch
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)
        self._offsets = np.arange(self.seq_len + 1, dtype=np.int64)

    @property
    def tokens_per_micro_batch(self) -> int:
        """Predicted tokens per micro-batch, B·T."""
        return self.micro_batch_size * self.seq_len

    def permutation(self, epoch: int) -> np.ndarray:
        """Order in which epoch ``epoch`` visits the windows (depends only on seed and epoch)."""
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def next_window_ids(self) -> np.ndarray:
        """Advance the state by one micro-batch and return its window indices."""
        ids: list[np.ndarray] = []
        need = self.micro_batch_size
        while need > 0:
            perm = self.permutation(self.epoch)
            take = perm[self.position : self.position + need]
            ids.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position >= self.n_windows:
                self.epoch += 1
                self.position = 0
        return np.concatenate(ids)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        ids = self.next_window_ids()
        index = ids[:, None] * (self.seq_len + 1) + self._offsets[None, :]
        return _to_batch(self.tokens[index], self.device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "seq_len": self.seq_len,
            "n_windows": self.n_windows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore (seed, epoch, position). The data (window count) and ``seq_len`` must match the saved
        run, else the restored position would point at different text."""
        for key in ("seq_len", "n_windows"):
            if key in state and int(state[key]) != getattr(self, key):
                raise GnoptError(
                    f"batcher state has {key}={state[key]} but the current data gives {getattr(self, key)}; "
                    "resume with the same data and seq_len."
                )
        position = int(state["position"])
        if not 0 <= position < self.n_windows:
            raise GnoptError(f"batcher state position {position} is outside 0..{self.n_windows - 1}.")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = position
        self._perm_epoch = -1


def eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    micro_batch_size: int,
    max_tokens: int | None = None,
    device: torch.device | str | None = None,
) -> list[Batch]:
    """The fixed validation set: the first ``max_tokens`` predicted tokens of ``tokens``.

    Windows of ``seq_len + 1`` tokens start every ``seq_len`` tokens (consecutive windows share their
    boundary token), so every token of the covered prefix after the first is predicted exactly once.
    Only whole micro-batches are kept, so all batches have the same size and a plain mean of batch losses
    is the token mean; if not even one micro-batch fits, a single smaller batch holds every window.
    """
    n_pred = len(tokens) - 1
    if max_tokens is not None:
        n_pred = min(n_pred, int(max_tokens))
    n_windows = n_pred // seq_len
    if n_windows < 1:
        raise GnoptError(
            f"validation data is too small: {len(tokens)} tokens cannot fill one window of {seq_len + 1} "
            f"tokens (max_tokens={max_tokens})."
        )
    starts = np.arange(n_windows, dtype=np.int64) * seq_len
    index = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
    windows = np.asarray(tokens[index])
    b = micro_batch_size
    if n_windows < b:
        return [_to_batch(windows, device)]
    n_full = n_windows // b
    return [_to_batch(windows[i * b : (i + 1) * b], device) for i in range(n_full)]
