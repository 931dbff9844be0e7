"""uint16 token shards in the nanoGPT / modded-nanogpt ``.bin`` format.

Layout: a header of 256 little-endian int32 (``[0]`` magic 20240520, ``[1]`` version 1, ``[2]`` number of
tokens, the rest 0), then the tokens as little-endian uint16. Files are written atomically (temporary
file in the same folder, then ``os.replace``) so a crash never leaves a half-written shard under the final
name, and read back with ``np.memmap`` so a large corpus costs no RAM until it is touched.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from gnopt.errors import GnoptError

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")


def write_shard(path: str | os.PathLike[str], tokens: np.ndarray) -> Path:
    """Write ``tokens`` (any integer array with values in 0..65535) to ``path`` atomically."""
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise GnoptError(f"shard {path}: tokens must be a 1-D array, got shape {arr.shape}.")
    if arr.dtype != TOKEN_DTYPE:
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
            raise GnoptError(f"shard {path}: token ids must lie in 0..65535 to be stored as uint16.")
        arr = arr.astype(TOKEN_DTYPE)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, arr.size
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header.tobytes())
            f.write(np.ascontiguousarray(arr).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_shard_header(path: str | os.PathLike[str]) -> int:
    """Validate the header of shard ``path`` and its size; return the number of tokens."""
    path = Path(path)
    if not path.is_file():
        raise GnoptError(f"token shard {path} does not exist.")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise GnoptError(f"token shard {path} is corrupt: {size} bytes is shorter than its header.")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if int(header[0]) != SHARD_MAGIC:
        raise GnoptError(f"token shard {path} is corrupt: bad magic number {int(header[0])}.")
    if int(header[1]) != SHARD_VERSION:
        raise GnoptError(f"token shard {path} has unsupported version {int(header[1])}.")
    n = int(header[2])
    expected = HEADER_BYTES + 2 * n
    if n < 0 or size != expected:
        raise GnoptError(
            f"token shard {path} is corrupt: header says {n} tokens ({expected} bytes), file has {size}."
        )
    return n


def read_shard(path: str | os.PathLike[str]) -> np.ndarray:
    """Memory-map the tokens of shard ``path`` (read-only uint16 array) after validating its header."""
    n = read_shard_header(path)
    if n == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n,))


class ShardAppender:
    """Grow a shard by appending tokens, with commit points an interrupted writer can resume from.

    The file starts with a header that says 0 tokens (so a half-built file is never mistaken for a
    finished shard); ``append`` adds tokens, ``commit`` makes everything so far durable (flush + fsync) and
    returns the committed count, ``finish`` writes the real header. Re-opening with ``committed=n`` cuts
    the file back to its first ``n`` tokens, dropping whatever was appended after the last commit.
    """

    def __init__(self, path: str | os.PathLike[str], committed: int = 0) -> None:
        self.path = Path(path)
        if committed == 0 or not self.path.exists():
            if committed:
                raise GnoptError(f"partial shard {self.path} is missing; delete its folder to start over.")
            with self.path.open("wb") as f:
                f.write(np.zeros(HEADER_INTS, dtype="<i4").tobytes())
        elif self.path.stat().st_size < HEADER_BYTES + 2 * committed:
            raise GnoptError(f"partial shard {self.path} is shorter than its progress record says; delete "
                             "its folder to start over.")
        self._f = self.path.open("r+b")
        self._f.truncate(HEADER_BYTES + 2 * committed)
        self._f.seek(0, os.SEEK_END)
        self.count = committed

    def append(self, tokens: np.ndarray) -> None:
        arr = np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)
        self._f.write(arr.tobytes())
        self.count += arr.size

    def commit(self) -> int:
        self._f.flush()
        os.fsync(self._f.fileno())
        return self.count

    def finish(self) -> None:
        """Write the header with the final count, make it durable and close the file."""
        header = np.zeros(HEADER_INTS, dtype="<i4")
        header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, self.count
        self._f.seek(0)
        self._f.write(header.tobytes())
        self.commit()
        self._f.close()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
