"""The regularization of the Gauss-Newton subproblem: Levenberg-Marquardt damping λ, its adaptation, and
the proximal weight μ, as one settings object (:class:`Damping`).

Both terms add (λ + μ)‖Δ‖²/2 to the inner objective (so (λ + μ)Δ to the inner gradient, and (λ + μ)I to
the matrix CG solves with). λ may adapt from ρ = actual / predicted decrease after each outer step
(×2/3 if ρ > 3/4, ×3/2 if ρ < 1/4 or after a failed step); μ stays fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

from gnopt.errors import GnoptError


@dataclass(frozen=True)
class Damping:
    """Settings of the subproblem's regularization.

    Args:
        damping: the initial Levenberg-Marquardt λ (the optimizer keeps the current λ as its state).
        adapt: adjust λ from ρ after each outer step (needs ``damping > 0``).
        prox: the proximal weight μ (fixed).
    """

    damping: float = 0.0
    adapt: bool = False
    prox: float = 0.0

    def __post_init__(self) -> None:
        if self.damping < 0 or self.prox < 0:
            raise GnoptError(f"damping and prox must be >= 0, got {self.damping}, {self.prox}")
        if self.adapt and self.damping <= 0:
            raise GnoptError("adapt_damping needs a positive initial damping")

    def adapted(self, lam: float, rho: float | None, *, failed: bool = False) -> float:
        """The next λ after a step with ratio ``rho`` (unchanged without adaptation or without ρ).

        A ``failed`` step (rejected, or α = 0: no step size lowered the loss, so ρ is 0/0) counts as the
        worst ρ, as in Levenberg-Marquardt: λ rises (else a λ too small would never move).
        """
        if not self.adapt:
            return lam
        if failed:
            return lam * 1.5
        if rho is None:
            return lam
        if rho > 0.75:
            lam *= 2.0 / 3.0
        elif rho < 0.25:
            lam *= 1.5
        return lam
