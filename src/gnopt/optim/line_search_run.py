"""Running the line searches of :mod:`gnopt.optim.line_search` on the model: the passes that measure the
numbers its pure rules choose from.

:func:`run_line_search` looks the kind up in :data:`SEARCHES` (one function per kind: a new kind is a rule
in :mod:`.line_search`, its name in ``LS_KINDS`` and a function here), then fills the step record with the
candidates, their losses and, when the GN model along d was measured, the predicted decrease and ρ.

* :func:`model_along` — one JVP per micro-batch gives L(θ_t), gᵀJd and (Jd)ᵀH(Jd) (and, for prox-linear on
  the grid, the linearized model's loss at each α);
* :func:`losses_along` — one forward per micro-batch and α gives the true loss at θ_t + α d.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gnopt.optim.line_search import LineSearch, first_decrease, interpolated_alpha, model_alpha, select
from gnopt.optim.linearize import call, jvp
from gnopt.optim.problem import Batch, Dict, Problem
from gnopt.optim.record import FWD, JVP, GNStepRecord


@dataclass
class Along:
    """The GN model along d, means over the line-search micro-batches: L(θ_t), the slope gᵀJd, the
    curvature (Jd)ᵀH(Jd), and (prox-linear on the grid) the linearized model's loss at each grid α."""

    loss_at_theta: float
    slope: float
    curvature: float
    linearized: list[float]


@dataclass
class Candidates:
    """What a search measured: step sizes, their true losses, the chosen index (None: nothing finite), the
    model along d (None: not measured) and whether the chosen α = 0 drops the direction (the inner solver
    restarts from θ_t)."""

    alphas: list[float]
    losses: list[float]
    chosen: int | None
    along: Along | None
    restart: bool = False


def grid_search(ls: LineSearch, p: Problem, d: Dict, batches: list[Batch], rec: GNStepRecord) -> Candidates:
    """The paper's search: the true loss at every grid α, the argmin taken (finite values only)."""
    prox_alphas = ls.alphas() if p.mode == "prox_linear" else []
    along = model_along(p, d, batches, prox_alphas, rec) if ls.model_decrease else None
    alphas = ls.alphas()
    losses = losses_along(p, d, batches, alphas, rec, along.loss_at_theta if along is not None else None)
    return Candidates(alphas, losses, select(alphas, losses), along)


def model_search(ls: LineSearch, p: Problem, d: Dict, batches: list[Batch], rec: GNStepRecord
                 ) -> Candidates:
    """The model search: candidates, their true losses and the chosen index (None: rejected).

    α_q from the GN model; α_i from the true loss's parabola when it differs by > 10%; the better one
    if it lowers the loss, else halvings, else α = 0 (the loss at θ_t). Nothing finite at θ_t: None.
    """
    along = model_along(p, d, batches, [], rec)
    loss_at_theta, slope = along.loss_at_theta, along.slope
    alphas: list[float] = []
    losses: list[float] = []
    if not math.isfinite(loss_at_theta):
        return Candidates(alphas, losses, None, along)
    lo = ls.smallest_alpha()
    alphas.append(model_alpha(slope, along.curvature, lo))
    losses += losses_along(p, d, batches, alphas[-1:], rec, loss_at_theta)
    a_i = interpolated_alpha(loss_at_theta, slope, alphas[0], losses[0], lo)
    if a_i is not None and abs(a_i - alphas[0]) > 0.1 * alphas[0]:
        rec.ls_corrected = True
        alphas.append(a_i)
        losses += losses_along(p, d, batches, [a_i], rec, loss_at_theta)
    k = select(alphas, losses)
    if k is not None and losses[k] < loss_at_theta:
        return Candidates(alphas, losses, k, along)
    a = min(alphas) / 2.0
    for _ in range(ls.max_backtracks):
        rec.ls_backtracks += 1
        alphas.append(a)
        losses += losses_along(p, d, batches, [a], rec, loss_at_theta)
        if first_decrease(loss_at_theta, losses[-1:]) is not None:
            return Candidates(alphas, losses, len(alphas) - 1, along)
        a /= 2.0
    # no confirmed decrease: stay at θ_t and drop the direction (the inner solver restarts)
    return Candidates([*alphas, 0.0], [*losses, loss_at_theta], len(alphas), along, restart=True)


#: One function per line-search kind (``LineSearch.kind``, the names in ``line_search.LS_KINDS``).
SEARCHES: dict[str, Callable[[LineSearch, Problem, Dict, list[Batch], GNStepRecord], Candidates]] = {
    "grid": grid_search,
    "model": model_search,
}


@torch.no_grad()
def run_line_search(ls: LineSearch, p: Problem, d: Dict, batches: list[Batch], rec: GNStepRecord
                    ) -> Candidates:
    """Search along ``d`` on ``batches``; fills the record (``rejected`` when nothing was finite)."""
    c = SEARCHES[ls.kind](ls, p, d, batches, rec)
    along = c.along
    loss_at_theta = along.loss_at_theta if along is not None else None
    rec.alphas, rec.ls_losses, rec.ls_loss_at_theta = c.alphas, c.losses, loss_at_theta
    if c.chosen is None:
        rec.rejected = True
        return c
    k = c.chosen
    alpha = c.alphas[k]
    rec.alpha = alpha
    if along is not None and loss_at_theta is not None:
        rec.actual_decrease = loss_at_theta - c.losses[k]
        if not along.linearized:  # the GN quadratic along α d
            predicted = -(alpha * along.slope + 0.5 * alpha * alpha * along.curvature)
        else:  # prox-linear with the grid: the linearized model's own loss at α
            predicted = loss_at_theta - along.linearized[k]
        rec.predicted_decrease = predicted
        rec.rho = rec.actual_decrease / predicted if predicted != 0 else None
    return c


def model_along(p: Problem, d: Dict, batches: list[Batch], prox_alphas: list[float], rec: GNStepRecord
                ) -> Along:
    """Means over ``batches`` of L(θ_t), gᵀJd, (Jd)ᵀH(Jd) and L(z₀ + α Jd) for α in ``prox_alphas``.

    One JVP per batch (its primal is the loss at θ_t); one sync and one collective at the end.
    """
    sums = [torch.zeros((), dtype=torch.float64) for _ in range(3 + len(prox_alphas))]
    for x, y in batches:
        z0, u = jvp(p.model, p.theta, x, d)
        rec.passes += JVP
        loc = p.loss.local(z0, y)
        for k, v in enumerate((loc.value, *loc.directional(u))):
            sums[k] += v.detach().double().cpu()
        for k, a in enumerate(prox_alphas):
            sums[3 + k] += p.loss.value(z0 + a * u, y).double().cpu()
        del z0, u, loc
    means = [v / len(batches) for v in p.mean.scalars(*sums)]
    return Along(means[0], means[1], means[2], means[3:])


def losses_along(p: Problem, d: Dict, batches: list[Batch], alphas: list[float], rec: GNStepRecord,
                 loss_at_theta: float | None) -> list[float]:
    """Mean true loss over ``batches`` at θ_t + α d for every α (α = 0 reuses ``loss_at_theta``)."""
    sums: list[Tensor] = []
    for a in alphas:
        if a == 0.0 and loss_at_theta is not None:
            sums.append(torch.tensor(loss_at_theta * len(batches), dtype=torch.float64))
            continue
        params = {n: p.theta[n] + a * d[n] for n in p.theta} if a != 0.0 else p.theta
        total = torch.zeros((), dtype=torch.float64)
        for x, y in batches:
            total += p.loss.value(call(p.model, params, x), y).double().cpu()
            rec.passes += FWD
        sums.append(total)
    return [v / len(batches) for v in p.mean.scalars(*sums)]
