"""What one Gauss-Newton outer step did (:class:`GNStepRecord`), and what its passes cost.

Pass accounting: every model pass of a step adds its forward+backward-equivalent cost to
``GNStepRecord.passes`` — a forward is 1/3 of a training step (:data:`FWD`), a forward-mode tangent
(:data:`TANGENT`) and a reverse pullback (:data:`BWD`) 2/3 each. A unit is one baseline micro-batch step
(one forward and one backward). Each call of a :mod:`gnopt.optim.linearize` primitive costs what it runs:

* a primal forward (``call``, ``forward_with_graph``): :data:`FWD`;
* a JVP (``jvp``: one forward carrying the tangent; the fused ``forward_with_graph_and_tangent`` likewise):
  :data:`FWD` + :data:`TANGENT` = 1 (:data:`JVP`);
* a pullback (``pullback``): :data:`BWD`, also when it stops early at a block near the output (an upper
  bound for layerwise GN's partial backwards);
* ``linearized_pass`` with a tangent runs a JVP, then a second primal forward with a graph, then a pullback:
  :data:`LINEARIZED_PASS` = 2; without a tangent a forward and a pullback, 1 (:data:`GRADIENT_PASS`).

``tests/test_pass_counts.py`` checks every variant's record against the model calls counted as it runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Forward+backward-equivalent cost of each kind of pass (a forward is 1/3 of a training step).
FWD = 1.0 / 3.0
TANGENT = 2.0 / 3.0
BWD = 2.0 / 3.0
#: One JVP: a primal forward that carries the tangent.
JVP = FWD + TANGENT
#: ``linearize.linearized_pass`` with a tangent (CG's GN-vector product): JVP, primal forward with a graph,
#: pullback.
LINEARIZED_PASS = JVP + FWD + BWD
#: ``linearize.linearized_pass`` without a tangent (a loss gradient): primal forward with a graph, pullback.
GRADIENT_PASS = FWD + BWD


@dataclass
class GNStepRecord:
    """What one outer step did. ``loss`` is the mean loss at θ_t over the inner micro-batches.

    ``q_start`` / ``q_end`` are the model's value minus the loss at θ_t (the model decrease, summed over
    blocks) at the first and last inner step: a warm-started inner iterate that is already worse than θ_t
    under the model shows up as ``q_start > 0``. ``q_trace`` holds the same quantity at the inner steps
    ``q_trace_steps`` (at most five: first, last and every ⌊N/4⌋-th). With ``warm_scale`` the carried
    iterate is first scaled by ``warm_scales`` (one factor per block): ``q_carried`` is the model value of
    the carried iterate before that scaling, ``q_start`` the value the inner loop starts from.
    """

    step: int
    loss: float
    mode: str
    alpha: float | None
    rejected: bool
    alphas: list[float]
    ls_losses: list[float]
    ls_loss_at_theta: float | None = None
    predicted_decrease: float | None = None
    actual_decrease: float | None = None
    rho: float | None = None
    q_start: float | None = None
    q_end: float | None = None
    q_carried: float | None = None
    warm_scales: list[float] = field(default_factory=list)
    ls_kind: str = "grid"
    ls_corrected: bool = False  # model search: the true-loss parabola's α was evaluated besides α_q
    ls_backtracks: int = 0  # model search: halvings evaluated after α_q (and α_i) did not lower the loss
    q_trace: list[float] = field(default_factory=list)
    q_trace_steps: list[int] = field(default_factory=list)
    inner_grad_norm_first: float | None = None
    inner_grad_norm_last: float | None = None
    inner_grad_norm_mean: float | None = None
    inner_nonfinite: int = 0
    lr_factor: float | None = None
    direction_norm: float = 0.0
    reset_inner: bool = False
    damping: float = 0.0
    cg_iters: list[int] = field(default_factory=list)
    cg_rel_residual: list[float] = field(default_factory=list)
    block_seconds: list[float] = field(default_factory=list)
    shared_forward_seconds: float = 0.0
    time_inner: float = 0.0
    time_line_search: float = 0.0
    train_micro_batches: int = 0
    ls_micro_batches: int = 0
    train_tokens: int = 0
    ls_tokens: int = 0
    passes: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
