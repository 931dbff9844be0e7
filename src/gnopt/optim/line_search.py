"""The Gauss-Newton line search: which multiple α of the inner loop's direction d the outer step takes.

Two kinds, each a pure selection rule over numbers the optimizer measures (:func:`select`,
:func:`model_alpha`, :func:`first_decrease`):

* ``"grid"`` — the paper's search: α ∈ {(1/√2)^k : k = 0 … ls_range−1}, the true loss at every candidate on
  micro-batches that the inner loop did not see (``source="fresh"``, N of them by default), the argmin
  taken — no α > 1 and no sufficient-decrease rule. :meth:`LineSearch.paper` builds exactly this.
* ``"model"`` — α from the GN model itself. Along d the model is a quadratic in α,
  q(α) = L(θ_t) + α gᵀJd + ½α² (Jd)ᵀH(Jd), whose two coefficients one JVP per line-search micro-batch
  gives (that pass also gives L(θ_t)); its minimizer α_q = −gᵀJd / (Jd)ᵀH(Jd), clipped to
  [α_min, 1], is **confirmed and corrected** by the true loss: L(α_q) with the exact slope gᵀJd and
  L(θ_t) fixes a parabola of the true loss along d, whose minimizer α_i (:func:`interpolated_alpha`) is
  evaluated too when it differs from α_q by more than 10%; the better of the two is taken if it is below
  L(θ_t). Otherwise the smaller is halved (at most ``max_backtracks`` times) until the loss decreases;
  when nothing does, the step stays at θ_t (α = 0, as the grid's ``include_zero``); when no loss at all is
  finite it is rejected. It costs one JVP and one or two forwards per micro-batch instead of ``ls_range``
  forwards, on a fraction of N micro-batches (``fraction``; losses on the same micro-batches are compared,
  so few are needed).

Both kinds never take a non-finite loss. gnopt adds what the pilot run on this machine needed
(docs/method.md, the pilot section): α = 0 as a candidate, a longer range, and resetting the
warm-started inner iterate when the chosen α is small.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gnopt.errors import GnoptError

LS_SOURCES: tuple[str, ...] = ("fresh", "inner")
LS_KINDS: tuple[str, ...] = ("grid", "model")
#: The model search's default share of N fresh micro-batches (measured: docs/results/cpu-cost.md).
MODEL_FRACTION = 0.125


@dataclass(frozen=True)
class LineSearch:
    """Line-search settings.

    Args:
        kind: ``"grid"`` (the paper's argmin over a fixed grid) or ``"model"`` (α from the GN model,
            confirmed by the true loss); see the module docstring.
        ls_range: grid points k = 0 … ls_range−1 (paper: 5 at 45M, 10 at 150M). ``"model"``: the smallest
            α_q it clips to is the grid's smallest point, (1/√2)^(ls_range−1), unless ``alpha_min`` is set.
        include_zero: also consider α = 0 (stay at θ_t); ``"model"`` always falls back to it.
        source: ``"fresh"`` draws new micro-batches; ``"inner"`` reuses the inner loop's.
        num_batches: micro-batches for ``source="fresh"`` (takes precedence over ``fraction``).
        fraction: with ``num_batches=None``, use ⌈fraction · N⌉ fresh micro-batches (``None``: N for the
            grid, ⌈N/8⌉ for the model search, :data:`MODEL_FRACTION`).
        reset_below: if the chosen α is below this, the warm-started inner iterate restarts from θ_{t+1}.
        model_decrease: evaluate the GN model's predicted decrease on the line-search batches (one JVP per
            batch, which also gives the loss at α = 0), so that ρ = actual / predicted is reported and
            adaptive damping can use it. ``"model"`` needs it.
        alpha_min: ``"model"``: the smallest α_q (``None``: the grid's smallest point).
        max_backtracks: ``"model"``: how many halvings of α_q to try after it fails to decrease the loss.
    """

    kind: str = "model"
    ls_range: int = 5
    include_zero: bool = False
    source: str = "fresh"
    num_batches: int | None = None
    fraction: float | None = None
    reset_below: float | None = None
    model_decrease: bool = True
    alpha_min: float | None = None
    max_backtracks: int = 2

    def __post_init__(self) -> None:
        if self.kind not in LS_KINDS:
            raise GnoptError(f"line-search kind must be one of {', '.join(LS_KINDS)}, got {self.kind!r}")
        if self.ls_range < 1:
            raise GnoptError(f"ls_range must be >= 1, got {self.ls_range}")
        if self.source not in LS_SOURCES:
            raise GnoptError(
                f"line-search source must be one of {', '.join(LS_SOURCES)}, got {self.source!r}"
            )
        if self.num_batches is not None and self.num_batches < 1:
            raise GnoptError(f"line-search num_batches must be >= 1, got {self.num_batches}")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise GnoptError(f"line-search fraction must lie in (0, 1], got {self.fraction}")
        if self.reset_below is not None and not 0.0 < self.reset_below <= 1.0:
            raise GnoptError(f"reset_below must lie in (0, 1], got {self.reset_below}")
        if self.alpha_min is not None and not 0.0 < self.alpha_min <= 1.0:
            raise GnoptError(f"alpha_min must lie in (0, 1], got {self.alpha_min}")
        if self.max_backtracks < 0:
            raise GnoptError(f"max_backtracks must be >= 0, got {self.max_backtracks}")
        if self.kind == "model" and not self.model_decrease:
            raise GnoptError("the 'model' line search needs model_decrease=True (it reads α from the model)")

    @classmethod
    def paper(cls, ls_range: int = 5) -> LineSearch:
        """The paper's search: ``ls_range`` grid points (5 at 45M, 10 at 150M) on N fresh micro-batches."""
        return cls(kind="grid", ls_range=ls_range, source="fresh", num_batches=None, fraction=None)

    @classmethod
    def fast(cls, fraction: float = MODEL_FRACTION, ls_range: int = 5) -> LineSearch:
        """α from the GN model, confirmed by the true loss on ⌈fraction · N⌉ fresh micro-batches."""
        return cls(kind="model", ls_range=ls_range, source="fresh", fraction=fraction)

    def batches_for(self, inner_steps: int) -> int:
        """How many fresh micro-batches one outer step with N = ``inner_steps`` draws for the search."""
        if self.num_batches is not None:
            return self.num_batches
        fraction = self.fraction if self.fraction is not None else (
            MODEL_FRACTION if self.kind == "model" else 1.0)
        return max(1, math.ceil(fraction * inner_steps - 1e-9))

    def alphas(self) -> list[float]:
        """The grid's candidate step sizes, largest first (α = 0 last when included)."""
        grid = [(1.0 / math.sqrt(2.0)) ** k for k in range(self.ls_range)]
        return grid + ([0.0] if self.include_zero else [])

    def smallest_alpha(self) -> float:
        """The smallest positive α either kind takes from its model or grid."""
        return self.alpha_min if self.alpha_min is not None else (1.0 / math.sqrt(2.0)) ** (self.ls_range - 1)


def select(alphas: Sequence[float], losses: Sequence[float]) -> int | None:
    """Index of the smallest finite loss (ties: the larger α, i.e. the earlier one); None if none finite."""
    best: int | None = None
    for k, loss in enumerate(losses):
        if not math.isfinite(loss):
            continue
        if best is None or loss < losses[best]:
            best = k
    return best


def model_alpha(slope: float, curvature: float, alpha_min: float, alpha_max: float = 1.0) -> float:
    """Minimizer of the model q(α) = q₀ + α·slope + ½α²·curvature, clipped to [alpha_min, alpha_max].

    ``slope`` = gᵀJd and ``curvature`` = (Jd)ᵀH(Jd) ≥ 0. A direction that does not descend under the model
    (slope ≥ 0) or a non-finite coefficient gives ``alpha_min`` (the true loss then decides); zero
    curvature with a descending slope gives ``alpha_max``.
    """
    if not (math.isfinite(slope) and math.isfinite(curvature)) or slope >= 0.0:
        return alpha_min
    if curvature <= 0.0:
        return alpha_max
    return min(max(-slope / curvature, alpha_min), alpha_max)


def interpolated_alpha(loss_at_zero: float, slope: float, alpha: float, loss: float, alpha_min: float,
                       alpha_max: float = 1.0) -> float | None:
    """Minimizer of the parabola through the true loss at 0 and at ``alpha`` with the exact slope at 0.

    ``slope`` = gᵀJd is the true loss's directional derivative at θ_t on the same micro-batches (the GN
    model's linear term is exact), so L(0), L'(0) and L(α) fix a parabola with curvature
    c = 2 (L(α) − L(0) − α·slope) / α². Its minimizer −slope / c, clipped to [alpha_min, alpha_max], corrects
    α_q when the true loss curves more (or less) than the GN model along d. None when it is undefined
    (non-finite values, slope ≥ 0); ``alpha_max`` when the parabola opens downwards.
    """
    values = (loss_at_zero, slope, alpha, loss)
    if not all(math.isfinite(v) for v in values) or slope >= 0.0 or alpha <= 0.0:
        return None
    curvature = 2.0 * (loss - loss_at_zero - alpha * slope) / (alpha * alpha)
    if curvature <= 0.0:
        return alpha_max
    return min(max(-slope / curvature, alpha_min), alpha_max)


def first_decrease(loss_at_zero: float, losses: Sequence[float]) -> int | None:
    """Index of the first candidate whose loss is finite and below ``loss_at_zero``; None if there is none.

    The candidates are tried in order (the model's α, then its halvings): the first that confirms a true
    decrease is taken.
    """
    for k, loss in enumerate(losses):
        if math.isfinite(loss) and loss < loss_at_zero:
            return k
    return None
