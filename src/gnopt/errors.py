"""The one user-facing exception type of gnopt.

Everything that is the user's fault (a bad path, a corrupt file, an unknown preset, a corpus that is too
small, ...) raises :class:`GnoptError` with one clear sentence naming the file or value at fault. The CLI
catches it, prints the message and exits with status 2; anything else is a bug and keeps its traceback.

It is a :class:`ValueError`, as the arguments torch.optim refuses are: code that calls the library and
catches ``ValueError`` for bad arguments catches gnopt's too.
"""

from __future__ import annotations


class GnoptError(ValueError):
    """A user-facing error: bad input, bad configuration or bad data, explained in one sentence."""
