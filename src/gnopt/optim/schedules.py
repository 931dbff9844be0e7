"""Learning-rate schedules as pure functions of the step.

Two families live here so that baselines and Gauss-Newton inner solvers share one implementation:

* :func:`lr_multiplier` — the classic one-level schedule of a first-order optimizer: linear warmup, then
  cosine or linear decay to ``min_ratio`` (or constant).
* :class:`InnerSchedule` — the two-level schedules of the GN inner optimizer (outer step ``t``, inner step
  ``i``), named as in the paper's code: ``global_cosine``, ``constant_with_inner_cosine``,
  ``cosine_with_global_schedule`` and ``constant``.

Every function returns a multiplier in ``[0, 1]`` applied to a parameter group's peak learning rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from gnopt.errors import GnoptError

DecayKind = Literal["cosine", "linear", "constant"]
DECAY_KINDS: tuple[str, ...] = ("cosine", "linear", "constant")

InnerScheduleKind = Literal[
    "global_cosine", "constant_with_inner_cosine", "cosine_with_global_schedule", "constant"
]
INNER_SCHEDULE_KINDS: tuple[str, ...] = (
    "global_cosine",
    "constant_with_inner_cosine",
    "cosine_with_global_schedule",
    "constant",
)


def _decay(progress: float, kind: str, min_ratio: float) -> float:
    """Multiplier for ``progress`` in [0, 1] after warmup: 1 at 0, ``min_ratio`` at 1."""
    progress = min(max(progress, 0.0), 1.0)
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    raise GnoptError(f"unknown schedule {kind!r}; choose one of {', '.join(DECAY_KINDS)}")


def lr_multiplier(
    step: int, *, total_steps: int, warmup_steps: int = 0, kind: str = "cosine", min_ratio: float = 0.0
) -> float:
    """Multiplier of the peak learning rate at 0-based ``step`` of ``total_steps``.

    Linear warmup from ``1/(warmup_steps)`` to 1 over the first ``warmup_steps`` steps (step 0 already
    takes a non-zero step), then ``kind`` decay over the remaining steps down to ``min_ratio`` at the last
    step.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps - 1, 1)
    return _decay((step - warmup_steps) / decay_steps, kind, min_ratio)


@dataclass(frozen=True)
class InnerSchedule:
    """Learning-rate multiplier of the GN inner optimizer at outer step ``t``, inner step ``i``.

    Args:
        kind: ``global_cosine`` — one warmup+cosine over all ``total_outer_steps * inner_steps`` inner
            steps; ``constant_with_inner_cosine`` — inside every outer step a (warmup+)cosine from the peak
            to ``min_ratio``, the same peak at every outer step; ``cosine_with_global_schedule`` — the
            inner cosine of the previous kind with a peak that follows a global cosine over outer steps;
            ``constant`` — the peak (after the global warmup).
        total_outer_steps: number of outer steps T of the run (for the global parts).
        inner_steps: N, inner steps per outer step (for the inner parts).
        global_warmup: warmup length in outer steps (global kinds and ``constant``).
        inner_warmup: warmup length in inner steps inside each outer step (inner-cosine kinds).
        min_ratio: floor of every cosine, as a fraction of the peak.
    """

    kind: str = "constant_with_inner_cosine"
    total_outer_steps: int = 1
    inner_steps: int = 1
    global_warmup: int = 0
    inner_warmup: int = 0
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in INNER_SCHEDULE_KINDS:
            raise GnoptError(
                f"unknown GN schedule {self.kind!r}; choose one of {', '.join(INNER_SCHEDULE_KINDS)}"
            )
        if self.total_outer_steps < 1 or self.inner_steps < 1:
            raise GnoptError("InnerSchedule needs total_outer_steps >= 1 and inner_steps >= 1")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise GnoptError(f"min_ratio must lie in [0, 1], got {self.min_ratio}")

    def _inner_cosine(self, i: int) -> float:
        return lr_multiplier(
            i, total_steps=self.inner_steps, warmup_steps=self.inner_warmup, kind="cosine",
            min_ratio=self.min_ratio,
        )

    def _global(self, t: int, kind: str) -> float:
        return lr_multiplier(
            t, total_steps=self.total_outer_steps, warmup_steps=self.global_warmup, kind=kind,
            min_ratio=self.min_ratio,
        )

    def __call__(self, t: int, i: int) -> float:
        if self.kind == "constant":
            return self._global(t, "constant")
        if self.kind == "constant_with_inner_cosine":
            return self._inner_cosine(i)
        if self.kind == "cosine_with_global_schedule":
            return self._global(t, "cosine") * self._inner_cosine(i)
        # global_cosine: one schedule over the flattened inner-step index.
        return lr_multiplier(
            t * self.inner_steps + i,
            total_steps=self.total_outer_steps * self.inner_steps,
            warmup_steps=self.global_warmup * self.inner_steps,
            kind="cosine",
            min_ratio=self.min_ratio,
        )
