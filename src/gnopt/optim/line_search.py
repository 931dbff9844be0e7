"""The Gauss-Newton line search: a fixed grid of step sizes, argmin of the true loss.

As in the paper: α ∈ {(1/√2)^k : k = 0 … ls_range−1}, evaluated on micro-batches that the inner loop did
not see (``source="fresh"``) — no α > 1 and no sufficient-decrease rule. gnopt adds the options that the
pilot run on this machine needed (../shared/design/pilot-findings.md): α = 0 as a candidate, a longer
range, and resetting the warm-started inner iterate when the chosen α is small. Non-finite losses are never
chosen; when no candidate is finite the outer step is rejected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gnopt.errors import GnoptError

LS_SOURCES: tuple[str, ...] = ("fresh", "inner")


@dataclass(frozen=True)
class LineSearch:
    """Line-search settings.

    Args:
        ls_range: number of grid points k = 0 … ls_range−1 (paper: 5 at 45M, 10 at 150M).
        include_zero: also consider α = 0 (stay at θ_t).
        source: ``"fresh"`` draws ``num_batches`` new micro-batches; ``"inner"`` reuses the inner loop's.
        num_batches: micro-batches for ``source="fresh"`` (``None``: as many as inner steps).
        reset_below: if the chosen α is below this, the warm-started inner iterate restarts from θ_{t+1}.
        model_decrease: evaluate the GN model's predicted decrease on the line-search batches (one JVP per
            batch, which also gives the loss at α = 0), so that ρ = actual / predicted is reported and
            adaptive damping can use it. Costs one tangent forward per batch.
    """

    ls_range: int = 5
    include_zero: bool = False
    source: str = "fresh"
    num_batches: int | None = None
    reset_below: float | None = None
    model_decrease: bool = True

    def __post_init__(self) -> None:
        if self.ls_range < 1:
            raise GnoptError(f"ls_range must be >= 1, got {self.ls_range}")
        if self.source not in LS_SOURCES:
            raise GnoptError(
                f"line-search source must be one of {', '.join(LS_SOURCES)}, got {self.source!r}"
            )
        if self.num_batches is not None and self.num_batches < 1:
            raise GnoptError(f"line-search num_batches must be >= 1, got {self.num_batches}")
        if self.reset_below is not None and not 0.0 < self.reset_below <= 1.0:
            raise GnoptError(f"reset_below must lie in (0, 1], got {self.reset_below}")

    def alphas(self) -> list[float]:
        """Candidate step sizes, largest first (α = 0 last when included)."""
        grid = [(1.0 / math.sqrt(2.0)) ** k for k in range(self.ls_range)]
        return grid + ([0.0] if self.include_zero else [])


def select(alphas: Sequence[float], losses: Sequence[float]) -> int | None:
    """Index of the smallest finite loss (ties: the larger α, i.e. the earlier one); None if none finite."""
    best: int | None = None
    for k, loss in enumerate(losses):
        if not math.isfinite(loss):
            continue
        if best is None or loss < losses[best]:
            best = k
    return best
