"""Checkpoints: atomic writes, ``weights_only`` loads, and the RNG states needed for bitwise resumes.

A checkpoint is a plain nested dict of tensors and Python scalars/containers, so it loads with
``torch.load(..., weights_only=True)``: loading never executes pickled code, and nothing in it depends on
gnopt's classes staying importable under the same names. Anything richer (numpy RNG state, dataclasses) is
converted to that form here.

Writes go to a temporary file in the same directory, are ``fsync``-ed, then ``os.replace``-d over the old
checkpoint (and the directory is fsync-ed), so a crash leaves either the old or the new checkpoint, never a
torn one. A process killed mid-write leaves only its temporary file (``.checkpoint.pt.*.tmp``), which
:func:`remove_stale_temp_files` deletes on the next resume.

Test hook (tests only, never set it otherwise): the environment variable
``GNOPT_TEST_CHECKPOINT_WRITE_DELAY=<seconds>`` makes :func:`save_checkpoint` sleep between writing the
temporary file and renaming it, so a test can kill the process in the middle of a checkpoint write.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gnopt.errors import GnoptError
from gnopt.run_folder import CHECKPOINT_NAME as CHECKPOINT_NAME  # re-exported (gnopt.run_folder)

#: Bumped when the checkpoint layout changes incompatibly.
CHECKPOINT_FORMAT = 1
#: Test-only environment hook: seconds to sleep inside a checkpoint write, before the rename.
TEST_WRITE_DELAY_ENV = "GNOPT_TEST_CHECKPOINT_WRITE_DELAY"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def atomic_write_bytes(path: str | os.PathLike[str], write: Any,
                       before_replace: Callable[[], None] | None = None) -> Path:
    """Call ``write(fileobj)`` on a temp file next to ``path``, fsync it, ``os.replace`` it over ``path``,
    fsync the directory. ``before_replace`` (if given) runs between the fsync and the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes the file private (0600); use the usual mode
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    return atomic_write_bytes(path, lambda fh: fh.write(text.encode("utf-8")))


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON value in ``path``, or None when it is missing, unreadable or not (yet) valid JSON.

    For the small run files written by :func:`atomic_write_text` (``config.json``, ``summary.json``):
    callers treat None as "no such record".
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def remove_stale_temp_files(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that interrupted atomic writes of ``path`` left behind; return them.

    Only for a file that no live process is writing (gnopt calls it when a run starts or resumes).
    """
    path = Path(path)
    removed = []
    if path.parent.is_dir():
        for tmp in path.parent.glob(_temp_prefix(path) + "*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _test_write_delay() -> None:
    """Test hook: sleep ``$GNOPT_TEST_CHECKPOINT_WRITE_DELAY`` seconds (unset: do nothing)."""
    value = os.environ.get(TEST_WRITE_DELAY_ENV)
    if value:
        time.sleep(float(value))


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Atomically write ``state`` (tensors and plain containers only) to ``path``."""
    payload = {"format": CHECKPOINT_FORMAT, **state}
    return atomic_write_bytes(path, lambda fh: torch.save(payload, fh), before_replace=_test_write_delay)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` onto the CPU, with ``weights_only=True``.

    Raises :class:`GnoptError` when the file is missing, unreadable, not a gnopt checkpoint, or of another
    format version.
    """
    path = Path(path)
    if not path.is_file():
        raise GnoptError(f"no checkpoint at {path}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GnoptError(f"checkpoint {path} cannot be read ({first}).") from None
    if not isinstance(state, dict) or "format" not in state:
        raise GnoptError(f"{path} is not a gnopt checkpoint.")
    if state["format"] != CHECKPOINT_FORMAT:
        raise GnoptError(
            f"checkpoint {path} has format {state['format']}, this gnopt reads format {CHECKPOINT_FORMAT}."
        )
    return state


# ------------------------------------------------------------------------------------------------------
# RNG states as weights_only-safe values
# ------------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, numpy (legacy global) and torch (CPU and every CUDA device) generator states."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where this process has the devices)."""
    py = state["python"]
    # weights_only loading returns the nested tuples of random.getstate() as tuples or lists.
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
