"""Stopping a run, or a study, gracefully on SIGTERM / SIGINT / SIGHUP (:class:`GracefulStop`).

The training loop (:mod:`gnopt.train`) checks :attr:`GracefulStop.requested` after every step, writes a
checkpoint and returns; ``gnopt study`` (:mod:`gnopt.study.runner`) owns one for the whole study and hands
it to the runs it runs in its own process, or asks its workers' stops with :meth:`GracefulStop.request`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

#: The signals that ask a run (or a study) to stop after the current step: ``kill``'s default, Ctrl-C, and
#: the hang-up of the terminal (or ``kill -HUP``).
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGHUP")) if s is not None
)


class GracefulStop:
    """SIGTERM / SIGINT / SIGHUP handling for the training loop (and for ``gnopt study``).

    The first signal only records itself (and says so on stderr); the loop finishes the step it is in,
    writes a checkpoint and returns. The same signal a second time raises :class:`KeyboardInterrupt` at once
    (no checkpoint: the last one stays valid); another signal is ignored after the first, because
    torchrun answers a Ctrl-C (SIGINT to every process) by sending its workers SIGTERM as well. Handlers
    are installed only in the main thread and restored on exit; installing an installed stop again is a
    no-op (a study hands its stop to the runs it runs in its own process).

    :meth:`request` asks for the same graceful stop without a signal, from any thread (a study's worker
    process does so when the study stops or dies). ``on_request`` (if set) is called once, with the
    reason, when the first request or signal arrives (inside the signal handler: keep it short).
    """

    SIGNALS: tuple[signal.Signals, ...] = STOP_SIGNALS
    MESSAGE = ("finishing the current step, then writing a checkpoint (send it again to stop at once, "
               "without one).")

    def __init__(self, *, announce: bool = True, message: str = MESSAGE,
                 on_request: Callable[[str], None] | None = None) -> None:
        self.signal_name: str | None = None
        self.reason: str | None = None
        self.announce = announce
        self.message = message
        self.on_request = on_request
        self._installed = False

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def request(self, reason: str) -> None:
        """Ask for a stop after the current step (the first reason given is kept)."""
        if self.reason is not None:
            return
        self.reason = reason
        if self.on_request is not None:
            self.on_request(reason)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            if name == self.signal_name:
                raise KeyboardInterrupt
            return
        self.signal_name = name
        if self.announce:
            # os.write, not print: a handler may interrupt a print to the same stream.
            with contextlib.suppress(OSError):  # e.g. SIGHUP: the terminal is gone
                os.write(2, f"gnopt: {name} received: {self.message}\n".encode())
        self.request(name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[GracefulStop]:
        if threading.current_thread() is not threading.main_thread() or self._installed:
            yield self
            return
        old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        self._installed = True
        try:
            yield self
        finally:
            self._installed = False
            for s, handler in old.items():
                signal.signal(s, handler)
