"""One writer per folder: an exclusive advisory lock that a run folder or a study folder holds while written.

``gnopt train`` (rank 0 under torchrun: the only process that writes) and ``gnopt study`` take
:class:`FolderLock` on their output folder *before* they inspect it, and hold it until they return. A
second process that wants the same folder (``gnopt train --resume`` / ``--overwrite``, or the same
``gnopt study`` twice) is refused at once with a :class:`~gnopt.errors.GnoptError` naming the process that
holds it, before it reads or writes anything there.

The lock is ``fcntl.flock`` on the file :data:`LOCK_NAME` inside the folder, which holds the PID, host and
command of the holder (only for that message). The kernel drops a ``flock`` when its process ends however
it ends, so a lock left by a process killed with ``kill -9`` (or by a power cut) never blocks: the next
process takes it over. The holder deletes the file when it releases the lock; to make that deletion safe,
a taker checks after locking that the path still names the file it locked (else it starts over).

A streamed cache entry (:mod:`gnopt.data.stream`) is guarded the same way, by the lock file
``.<entry>.lock`` beside it (its partial folder is deleted and recreated under that lock).

Without ``fcntl`` (not POSIX) no lock is taken. ``flock`` works on local file systems and, on Linux, on
NFS (emulated with POSIX byte-range locks, which the server's lock manager grants): processes on different
hosts then exclude each other as well. It guarantees nothing where the mount has no lock manager
(``nolock``, NFSv3 without ``lockd``/``statd``): the kernel then either grants every lock locally, so two
hosts could write the same folder, or refuses it (``ENOLCK``, and ``EOPNOTSUPP`` on some FUSE file
systems); a refusal is a :class:`~gnopt.errors.GnoptError` that says to use a local disk or enable locking.
A lock held by a host that crashes is released once the server notices (NFSv4: its lease expires; NFSv3:
the host's statd reports its reboot), not at once.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from gnopt.errors import GnoptError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".gnopt.lock"
#: ``flock`` errors that mean "this file system does not lock", not "someone else holds the lock".
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP}


def unsupported_lock_error(path: Path, exc: OSError) -> GnoptError:
    """The one-line error for a file system that cannot lock ``path`` (NFS without a lock manager, FUSE)."""
    code = errno.errorcode.get(exc.errno or 0, exc.errno)
    return GnoptError(
        f"cannot lock {path}: {exc.strerror or exc} ({code}); "
        "its file system does not support file locks (NFS mounted without a lock manager, e.g. 'nolock' or "
        "no lockd/statd, or a FUSE file system). gnopt locks the folders it writes so that two processes "
        "never write the same one: put it on a local disk (choose another --out, or --cache-dir / "
        "GNOPT_CACHE for the token cache), or mount the file system with locking enabled."
    )


def this_command() -> str:
    """How this process was started, for other processes' error messages (``gnopt study ...``)."""
    argv = sys.argv[1:]
    if argv[:1] in (["train"], ["study"], ["prepare"], ["info"]):
        cmd = shlex.join(["gnopt", *argv])
    else:
        cmd = shlex.join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *argv])
    return cmd if len(cmd) <= 300 else cmd[:297] + "..."


def _holder_info() -> dict[str, Any]:
    parent = multiprocessing.parent_process()
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": this_command(),
        "parent_pid": parent.pid if parent is not None else None,  # a study's worker: the study process
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def describe_holder(info: Any) -> str:
    """``process 123 (gnopt study ...) since ...`` from a lock file's contents (best effort)."""
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
        return "another process (it has not written its PID yet)"
    text = f"process {info['pid']}"
    host = info.get("host")
    if isinstance(host, str) and host != socket.gethostname():
        text += f" on host {host}"
    what = info.get("command")
    if isinstance(info.get("parent_pid"), int):
        what = f"a worker of process {info['parent_pid']}, {what}"
    if what:
        text += f" ({what})"
    if info.get("since"):
        text += f", since {info['since']}"
    return text


def _stop_hint(info: Any) -> str:
    """``kill -TERM <pid>`` for the process to stop: a study's worker is stopped through its study."""
    if isinstance(info, dict):
        for key in ("parent_pid", "pid"):
            if isinstance(info.get(key), int):
                return f"kill -TERM {info[key]}"
    return "kill -TERM <its PID>"


class FolderLock:
    """An exclusive lock on ``folder`` (which must exist) held from :meth:`acquire` to :meth:`release`.

    ``what`` names the folder in the refusal message ("the run folder", "the study folder"). Usable as a
    context manager. A process may hold several locks (a study's folder and its warm-up's folder), but not
    two on the same folder. ``name`` is the lock file's name in ``folder`` and ``target`` the path the
    refusal message names (default: ``folder``), for a lock on something that is not the folder itself.
    """

    def __init__(self, folder: str | os.PathLike[str], what: str = "the folder", *, name: str = LOCK_NAME,
                 target: str | os.PathLike[str] | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.what = what
        self.target = Path(target) if target is not None else self.folder
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        """Take the lock or raise :class:`GnoptError` naming its holder; a no-op without ``fcntl``."""
        if fcntl is None or self._fd is not None:
            return self
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise GnoptError(f"cannot create the lock file {self.path}: {exc.strerror}.") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise GnoptError(
                    f"{self.what} {self.target} is in use by {describe_holder(holder)}: only one process may "
                    f"write it at a time. Wait until that process ends, or stop it ({_stop_hint(holder)}: it "
                    "checkpoints and exits), then run this again."
                ) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in _NO_LOCKING:
                    raise unsupported_lock_error(self.path, exc) from None
                raise GnoptError(f"cannot lock {self.path}: {exc.strerror or exc}.") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder we waited behind deleted the file while releasing it: start over
        try:
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(_holder_info()) + "\n").encode())
        except OSError:
            pass  # the lock itself is held; the holder's details are only for others' error messages
        self._fd = fd
        return self

    def release(self) -> None:
        """Delete the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it (see the module docstring)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    @staticmethod
    def _read(fd: int) -> Any:
        try:
            data = os.pread(fd, 4096, 0)
            return json.loads(data.decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __del__(self) -> None:  # a lock object dropped without release (an exception path): free it
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
