"""The Gauss-Newton subproblem of one outer step, as the inner solvers and the line search see it.

:class:`Problem` bundles what they share: the model linearized at θ_t, the output loss, the mode, the
blocks with their inner iterates θ̂_b (:class:`Block`), the regularization λ + μ, the inner schedule and the
micro-batch source. :class:`~gnopt.optim.gauss_newton.GaussNewton` builds one per outer step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gnopt.errors import GnoptError
from gnopt.optim.losses import OutputLoss
from gnopt.optim.parallel import ProcessMean

Batch = tuple[Any, Tensor]
Dict = dict[str, Tensor]


class Block:
    """Inner state of one block: its names, the inner iterate θ̂ and the inner optimizer."""

    def __init__(self, label: str, names: tuple[str, ...]) -> None:
        self.label = label
        self.names = names
        self.theta_hat: Dict = {}
        self.optimizer: Any = None  # a torch.optim-style optimizer (first-order inner solvers), else None
        #: GaussNewton's param groups of this block, one per ``optimizer`` group: their ``"lr"`` is the peak
        self.groups: list[dict[str, Any]] = []
        self.at_origin = True  # θ̂ == θ_t exactly: the tangent is zero and can be skipped


@dataclass
class Problem:
    """One outer step's subproblem: minimize the model of ``loss`` around θ_t = ``theta``, per block.

    ``batches`` is the caller's micro-batch iterator; ``kept`` holds the N inner micro-batches when they
    were drawn up front (CG, or a line search on the inner micro-batches). ``reg`` is λ + μ.
    """

    model: nn.Module
    loss: OutputLoss
    mode: str
    theta: Dict
    blocks: list[Block]
    t: int
    inner_steps: int
    schedule: Callable[[int, int], float]
    reg: float
    warm_scale: bool
    inner_clip: float | None
    mean: ProcessMean
    batches: Iterator[Batch]
    kept: list[Batch] | None

    @property
    def names(self) -> list[str]:
        return [n for blk in self.blocks for n in blk.names]

    def batch(self, i: int) -> Batch:
        """The i-th inner micro-batch (drawn now unless it was drawn up front)."""
        return self.kept[i] if self.kept is not None else next_batch(self.batches)

    def delta(self, blk: Block) -> Dict:
        """Δ = θ̂_b − θ_t for block ``blk``."""
        return {n: blk.theta_hat[n].detach() - self.theta[n] for n in blk.names}


def next_batch(batches: Iterator[Batch]) -> Batch:
    try:
        return next(batches)
    except StopIteration:
        raise GnoptError("the batch iterator ran out in the middle of a Gauss-Newton step") from None


def dot(a: Dict, b: Dict) -> Tensor:
    return sum((torch.vdot(a[n].reshape(-1), b[n].reshape(-1)) for n in a), torch.zeros(()))


def norm(a: Dict) -> float:
    return math.sqrt(sum(float(v.pow(2).sum()) for v in a.values()))


def all_finite(a: Dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in a.values())
