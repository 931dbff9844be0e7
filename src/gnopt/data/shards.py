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
