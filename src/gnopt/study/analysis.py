"""What the runs of a study measured: steps/tokens/passes to target, the best setting, critical batch sizes.

Everything here reads the files a run leaves (``metrics.jsonl``, ``summary.json``; see :mod:`gnopt.train`),
so a study can be re-analysed at any time, at any target, without re-running anything.

Definitions (all documented in the study report as well):

* **steps to target**: the whole outer steps a run took up to its first *evaluated* step whose validation
  loss is <= the target, for every method (a method has no state between two outer steps, so it is
  credited with no fraction of one). Its resolution is the run's ``eval_every``: the run reached the target
  after its previous evaluation and by this one (:func:`steps_interval`). Every ratio, median, spread, best
  setting and fit uses this count. Where either side of a steps ratio took few steps (<= :data:`FEW_STEPS`)
  the ratio comes with its **resolution bracket** (:func:`steps_ratio_bracket`): the ratio with each
  few-step side moved by one whole step either way (at least 1), e.g. 12 vs 2 steps: 6.0x [4.0x-12.0x].
  **Interpolated steps to target** (``steps_to_target_interp`` in ``runs.csv``): the step where the straight
  line between that evaluation and the one before it crosses the target; a fraction of a step no method
  takes, kept for the record and never used in a ratio.
* **tokens to target**: cumulative tokens at that step, training plus line-search tokens (GN draws fresh
  micro-batches for its line search).
* **passes to target**: cumulative forward+backward-equivalent passes at that step; a baseline step costs
  one pass per micro-batch, a GN step counts its primal, tangent (JVP) and VJP passes of every inner step
  and the forward passes of its line search (``passes`` in ``metrics.jsonl``).
* **wall to target**: cumulative wall-clock seconds at that step (evaluations included).
* **best setting** of a method at a batch size: the run with the fewest steps to target, ties broken by
  the lower final validation loss; runs that miss the target rank after all that reach it, by final loss.
  A best setting at the lowest or highest value of its grid is flagged (:func:`grid_edges`): its optimum
  may lie beyond the grid.
* **critical batch size**: the fit of S(B) = S_min·(1 + B_noise/B) to a method's best (whole) steps to
  target S over the batch sizes B (least squares on log S; S_min is solved in closed form for each B_noise
  and B_noise by a 1-D search on a log grid refined by golden-section search, numpy only). We report
  B_crit = B_noise: at B = B_crit a method needs twice its minimal number of steps, S = 2·S_min, and twice
  its minimal number of tokens, E = S·B = 2·E_min with E_min = S_min·B_noise (McCandlish et al. 2018).
  Well below B_crit, doubling the batch halves the steps; well above it, doubling the batch buys almost
  nothing. A fit whose B_noise sits at the edge of the search range is flagged: ``"above"`` (the steps
  still fall like 1/B at the largest batch, B_crit is beyond the grid) or ``"below"`` (no gain from batch
  size at all in this grid). A whole count S at step s means the target was crossed after the previous
  evaluation p and by s, so the **B_crit range** is the range of the fits through every combination of
  the points' interval ends, max(p, 1) or s (:func:`fit_critical_batch_range`): what coarse counts leave
  undetermined.
* ``target_loss = "auto"``: the lowest validation loss that a finished baseline run at the largest batch
  has at ``target_fraction`` of its step budget (linear interpolation between evaluations).
* **seed runs** (``[experiment] seeds``): each method's best setting at the largest batch re-run with the
  other data seeds (:func:`gnopt.study.spec.plan_seed_runs`); the selected sweep run is the ``[base]`` seed's.
  A **headline ratio over seeds** (:func:`seed_ratios`) is computed within each seed, "best baseline" being
  the smallest value of that metric (steps, passes or wall time to target) over the baselines that reached
  the target in that seed, and summarised by its median and range; a seed counts when both sides reached
  the target.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gnopt.checkpoint import read_json
from gnopt.config import BASELINE_OPTIMIZERS
from gnopt.run_folder import CONFIG_NAME, STOP_AT_LOSS_REASON, SUMMARY_NAME, read_metrics
from gnopt.study.spec import RunSpec, StudySpec, plan_seed_runs

#: A steps count at or below this is "few": a steps ratio with such a side carries its resolution bracket.
FEW_STEPS = 5

#: Column order of ``runs.csv`` (and the keys of each ``runs.json`` record).
RUN_COLUMNS: tuple[str, ...] = (
    "method", "optimizer", "batch_tokens", "n_micro", "lr", "adam_lr", "seed", "steps_planned", "steps_done",
    "status", "selected", "target_loss", "steps_to_target", "steps_to_target_interp", "tokens_to_target",
    "passes_to_target", "wall_to_target", "final_val_loss", "best_val_loss", "initial_val_loss", "tokens",
    "passes", "wall_seconds", "seconds_per_step", "run_dir",
)


# ------------------------------------------------------------------------------------------------------
# reading a run
# ------------------------------------------------------------------------------------------------------


@dataclass
class RunCurve:
    """The logged history of one run: evaluations and cumulative counters per step."""

    evals: list[tuple[int, int, float]] = field(default_factory=list)  # (step, tokens, val_loss; inf if NaN)
    passes: dict[int, float] = field(default_factory=dict)  # step -> cumulative passes
    wall: dict[int, float] = field(default_factory=dict)  # step -> cumulative wall seconds
    last_step: int = 0
    gn: list[GNStep] = field(default_factory=list)  # Gauss-Newton steps only (empty for baselines)


@dataclass(frozen=True)
class GNStep:
    """What one Gauss-Newton outer step logged about its line search and its quadratic model."""

    alpha: float | None  # chosen step size (None: rejected)
    floor: float | None  # smallest positive candidate of the line-search grid (None: the model search)
    backtracked: bool  # model search: neither α_q nor its correction lowered the loss (halvings followed)
    corrected: bool  # model search: the true-loss parabola's α was evaluated besides α_q
    q_start: float | None  # model value minus loss at θ_t where the inner loop began (> 0: drift)
    rho: float | None  # actual / predicted decrease
    reset: bool
    passes: float


@dataclass
class GNDiagnostics:
    """Summary of a GN run's :class:`GNStep` records (the evidence for line-search drift)."""

    steps: int
    alpha_median: float | None
    share_alpha_one: float  # steps with α = 1
    share_at_floor: float  # steps with α at the smallest positive candidate (grid search)
    share_corrected: float  # model search: steps that evaluated the true-loss parabola's α too
    share_backtracked: float  # model search: steps where neither lowered the loss (halvings followed)
    q_start_median: float | None
    q_start_max: float | None
    share_q_start_positive: float  # inner loops that began above the model's value at θ_t
    rho_median: float | None
    resets: int
    rejected: int
    passes_per_step: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _median(xs: Sequence[float]) -> float | None:
    return float(np.median(np.asarray(xs, dtype=float))) if xs else None


def gn_diagnostics(curve: RunCurve) -> GNDiagnostics | None:
    """Line-search and model statistics over a GN run (None for a run without GN steps)."""
    g = curve.gn
    if not g:
        return None
    alphas = [s.alpha for s in g if s.alpha is not None]
    qs = [s.q_start for s in g if s.q_start is not None]
    n = len(g)
    return GNDiagnostics(
        steps=n,
        alpha_median=_median(alphas),
        share_alpha_one=sum(1 for a in alphas if abs(a - 1.0) < 1e-9) / n,
        share_at_floor=sum(1 for s in g if s.alpha is not None and s.floor is not None
                           and abs(s.alpha - s.floor) < 1e-9 and s.floor < 1.0) / n,
        share_corrected=sum(s.corrected for s in g) / n,
        share_backtracked=sum(s.backtracked for s in g) / n,
        q_start_median=_median(qs),
        q_start_max=max(qs) if qs else None,
        share_q_start_positive=sum(1 for q in qs if q > 1e-6) / n,
        rho_median=_median([s.rho for s in g if s.rho is not None]),
        resets=sum(s.reset for s in g),
        rejected=sum(1 for s in g if s.alpha is None),
        passes_per_step=sum(s.passes for s in g) / n,
    )


def read_curve(run_dir: Path) -> RunCurve:
    """Parse ``metrics.jsonl`` (a missing file or a torn last line is fine)."""
    curve = RunCurve()
    total = 0.0
    for rec in read_metrics(run_dir):
        step = rec["step"]
        if rec.get("type") == "eval":
            val = rec.get("val_loss")
            v = float(val) if isinstance(val, (int, float)) and math.isfinite(val) else math.inf
            curve.evals.append((step, int(rec.get("tokens") or 0), v))
        elif "type" not in rec:
            total += float(rec.get("passes") or 0.0)
            curve.passes[step] = total
            if isinstance(rec.get("wall"), (int, float)):
                curve.wall[step] = float(rec["wall"])
            curve.last_step = max(curve.last_step, step)
            if rec.get("mode") is not None and "alphas" in rec:
                curve.gn.append(_gn_step(rec))
    curve.evals.sort()
    return curve


def _gn_step(rec: dict[str, Any]) -> GNStep:
    alphas = [a for a in rec.get("alphas") or [] if isinstance(a, (int, float)) and a > 0]
    model = rec.get("ls_kind") == "model"  # records written before the model search have no ls_kind
    return GNStep(
        alpha=None if rec.get("rejected") else _finite(rec.get("alpha")),
        floor=None if model else (min(alphas) if alphas else None),
        backtracked=model and bool(rec.get("ls_backtracks")),
        corrected=model and bool(rec.get("ls_corrected")),
        q_start=_finite(rec.get("q_start")),
        rho=_finite(rec.get("rho")),
        reset=bool(rec.get("reset_inner")),
        passes=float(rec.get("passes") or 0.0),
    )


def loss_at(curve: RunCurve, step: float) -> float | None:
    """Validation loss at ``step`` by linear interpolation between evaluations (None outside them)."""
    ev = curve.evals
    if not ev or step < ev[0][0] or step > ev[-1][0]:
        return None
    for (s0, _, v0), (s1, _, v1) in zip(ev, ev[1:], strict=False):
        if s0 <= step <= s1:
            if s1 == s0 or not (math.isfinite(v0) and math.isfinite(v1)):
                return v1 if step == s1 else v0
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return ev[-1][2] if step == ev[-1][0] else None


@dataclass
class ToTarget:
    steps: int | None = None
    steps_interp: float | None = None
    previous_eval: int | None = None  # the step of the evaluation before that one (None: none before it)
    tokens: int | None = None
    passes: float | None = None
    wall: float | None = None


def to_target(curve: RunCurve, target: float | None) -> ToTarget:
    """Steps, interpolated steps, tokens, passes and wall seconds to the first evaluation <= ``target``."""
    if target is None:
        return ToTarget()
    prev: tuple[int, int, float] | None = None
    for step, tokens, val in curve.evals:
        if val <= target:
            interp = float(step)
            if prev is not None and math.isfinite(prev[2]) and prev[2] > val:
                s0, _, v0 = prev
                interp = s0 + (v0 - target) / (v0 - val) * (step - s0)
            return ToTarget(steps=step, steps_interp=interp, previous_eval=prev[0] if prev else None,
                            tokens=tokens,
                            passes=curve.passes.get(step, 0.0), wall=curve.wall.get(step, 0.0))
        prev = (step, tokens, val)
    return ToTarget()


# ------------------------------------------------------------------------------------------------------
# one record per run
# ------------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """One row of ``runs.csv``."""

    method: str
    optimizer: str
    batch_tokens: int
    n_micro: int
    lr: float
    adam_lr: float | None
    seed: int  # the run's data seed
    steps_planned: int
    steps_done: int
    status: str  # done | stopped (at the target: stop_at_target) | partial | missing
    selected: bool
    target_loss: float | None
    steps_to_target: int | None
    steps_to_target_interp: float | None
    tokens_to_target: int | None
    passes_to_target: float | None
    wall_to_target: float | None
    final_val_loss: float | None
    best_val_loss: float | None
    initial_val_loss: float | None
    tokens: int | None
    passes: float | None
    wall_seconds: float | None
    seconds_per_step: float | None
    run_dir: str
    curve: RunCurve = field(default_factory=RunCurve, repr=False)
    #: the step of the evaluation before the one at steps_to_target (None: not reached, or none before it)
    previous_eval: int | None = None

    @property
    def done(self) -> bool:
        """Finished: ran its whole budget, or stopped at the target (``stop_at_target``)."""
        return self.status in ("done", "stopped")

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("curve")
        return {k: d[k] for k in RUN_COLUMNS}

    @property
    def steps_interval(self) -> tuple[int, int] | None:
        """Where this run crossed the target, in whole steps (None: target not reached): after the
        evaluation before its first one at or below the target (step p, from its own evaluations, so a run
        resumed with another cadence is read as it ran) and by that one: ``(max(p, 1), steps_to_target)``."""
        if self.steps_to_target is None:
            return None
        s = self.steps_to_target
        return (min(max(self.previous_eval or 0, 1), s), s)  # at the target from the start: (0, 0)


def steps_interval(steps: int, eval_every: int) -> tuple[int, int]:
    """The same interval for a run evaluated at every multiple of ``eval_every`` (and at its last step):
    where a run that first evaluates at or below the target at step ``steps`` crossed it, after its previous
    evaluation p and by ``steps``; the low end is max(p, 1), the fewest whole steps that could have done it
    when the count is read as continuous. For records without their curve (a committed ``runs.csv``)."""
    e = int(eval_every)
    prev = ((steps - 1) // e) * e if e > 0 else 0  # eval_every = 0: only the start and the last step
    return (min(max(prev, 1), steps), steps)


def few_steps_range(steps: float) -> tuple[float, float]:
    """A whole steps count with one step either way when it is few (<= FEW_STEPS; at least 1), else itself."""
    return (max(steps - 1.0, 1.0), steps + 1.0) if steps <= FEW_STEPS else (steps, steps)


def steps_ratio_bracket(numerator: float, denominator: float) -> tuple[float, float] | None:
    """The resolution bracket of the steps ratio ``numerator / denominator``: the ratio with every few-step
    side (<= FEW_STEPS) moved by one whole step either way (at least 1 step). None when neither side is
    few (the ratio's resolution is then better than ~20%). Example: 12 vs 2 steps -> (4.0, 12.0)."""
    if numerator > FEW_STEPS and denominator > FEW_STEPS:
        return None
    (a_lo, a_hi), (b_lo, b_hi) = few_steps_range(numerator), few_steps_range(denominator)
    return (a_lo / b_hi, a_hi / b_lo)


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def read_run(run: RunSpec, study_dir: Path) -> RunResult:
    """The results of ``run`` as far as its folder holds them (:func:`analyse` fills the target fields)."""
    run_dir = study_dir / run.rel
    curve = read_curve(run_dir)
    summary = read_json(run_dir / SUMMARY_NAME)
    config = read_json(run_dir / CONFIG_NAME)
    same = isinstance(config, dict) and isinstance(summary, dict) and (
        summary.get("fingerprint") == config.get("fingerprint"))
    if isinstance(summary, dict) and summary.get("completed") and same:
        status = "done"
    elif isinstance(summary, dict) and summary.get("stop_reason") == STOP_AT_LOSS_REASON and same:
        status = "stopped"  # at its stop_at_loss; _apply_target demotes it if the target is lower
    elif curve.last_step > 0 or curve.evals:
        status = "partial"
    else:
        status = "missing"
    s = summary if status in ("done", "stopped") else {}
    evals = [v for _, _, v in curve.evals]
    wall = _finite(s.get("wall_seconds")) if s else (curve.wall.get(curve.last_step) if curve.wall else None)
    steps_done = int(s.get("steps", 0)) if s else curve.last_step
    return RunResult(
        method=run.method, optimizer=run.optimizer, batch_tokens=run.batch_tokens,
        n_micro=run.config.n_micro, lr=run.lr, adam_lr=run.adam_lr, seed=run.config.seed,
        steps_planned=run.steps,
        steps_done=steps_done, status=status, selected=False, target_loss=None, steps_to_target=None,
        steps_to_target_interp=None, tokens_to_target=None, passes_to_target=None, wall_to_target=None,
        final_val_loss=_finite(s.get("final_val_loss")) if s else (_finite(evals[-1]) if evals else None),
        best_val_loss=min((v for v in evals if math.isfinite(v)), default=None),
        initial_val_loss=_finite(evals[0]) if evals else None,
        tokens=int(s["tokens"]) if s and "tokens" in s else None,
        passes=(_finite(s.get("passes")) if s
                else (curve.passes.get(curve.last_step) if curve.passes else None)),
        wall_seconds=wall,
        seconds_per_step=(wall / steps_done) if wall is not None and steps_done > 0 else None,
        run_dir=run.rel, curve=curve,
    )


# ------------------------------------------------------------------------------------------------------
# target, selection
# ------------------------------------------------------------------------------------------------------


def auto_target(results: Sequence[RunResult], largest_batch: int, fraction: float) -> float | None:
    """The lowest validation loss that a finished baseline run at ``largest_batch`` has at ``fraction`` of
    its step budget, rounded up to 4 decimals; None when there is no such run."""
    best: float | None = None
    for r in results:
        if r.done and r.optimizer in BASELINE_OPTIMIZERS and r.batch_tokens == largest_batch:
            v = loss_at(r.curve, fraction * r.steps_planned)
            if v is not None and math.isfinite(v) and (best is None or v < best):
                best = v
    return None if best is None else math.ceil(best * 1e4) / 1e4


def _rank_key(r: RunResult) -> tuple[int, float, float]:
    steps = r.steps_to_target
    final = r.final_val_loss if r.final_val_loss is not None else math.inf
    return (0 if steps is not None else 1, float(steps) if steps is not None else math.inf, final)


def select_best(results: Iterable[RunResult]) -> dict[tuple[str, int], RunResult]:
    """Best finished run per (method, batch): fewest steps to target, then lower final loss."""
    best: dict[tuple[str, int], RunResult] = {}
    for r in results:
        if not r.done:
            continue
        key = (r.method, r.batch_tokens)
        if key not in best or _rank_key(r) < _rank_key(best[key]):
            best[key] = r
    return best


def grid_edges(results: Iterable[RunResult],
               best: dict[tuple[str, int], RunResult]) -> dict[tuple[str, int], list[str]]:
    """Where a best setting sits at an edge of the grid it was chosen from: (method, batch) -> what is at
    the edge, e.g. ``["lowest lr"]``. Each swept value (lr, adam_lr) is compared with the finished runs of
    that method and batch that share the other value; a value swept at one point has no edge. A best
    setting at an edge may have its optimum beyond the grid: the grid should be widened there."""
    sweeps: dict[tuple[str, int], list[RunResult]] = {}
    for r in results:
        if r.done:
            sweeps.setdefault((r.method, r.batch_tokens), []).append(r)
    edges: dict[tuple[str, int], list[str]] = {}
    for key, sel in best.items():
        peers = [r for r in sweeps.get(key, []) if r.seed == sel.seed]
        found = []
        for value, other in (("lr", "adam_lr"), ("adam_lr", "lr")):
            mine = getattr(sel, value)
            values = sorted({getattr(r, value) for r in peers
                             if getattr(r, other) == getattr(sel, other) and getattr(r, value) is not None})
            if mine is None or len(values) < 2:
                continue
            if mine == values[0]:
                found.append(f"lowest {value}")
            elif mine == values[-1]:
                found.append(f"highest {value}")
        if found:
            edges[key] = found
    return edges


# ------------------------------------------------------------------------------------------------------
# critical batch size
# ------------------------------------------------------------------------------------------------------


@dataclass
class CriticalBatchFit:
    """S(B) = s_min·(1 + b_noise/B), fitted on log S. ``b_crit`` = ``b_noise`` (see the module docstring)."""

    s_min: float
    b_noise: float
    rmse_log: float  # root-mean-square residual of log S (natural log)
    n_points: int
    bound: str | None = None  # "above" / "below" when b_noise sits at the edge of the search range
    #: B_crit over the fits through every combination of the points' whole-step interval ends
    #: (:func:`fit_critical_batch_range`); ``range_bound`` flags an end of it at the search range's edge
    b_crit_low: float | None = None
    b_crit_high: float | None = None
    range_bound: list[str] = field(default_factory=list)

    @property
    def b_crit(self) -> float:
        return self.b_noise

    def steps(self, batch: np.ndarray | float) -> np.ndarray | float:
        return self.s_min * (1.0 + self.b_noise / np.asarray(batch, dtype=float))

    def to_dict(self) -> dict[str, Any]:
        return {"s_min": self.s_min, "b_noise": self.b_noise, "b_crit": self.b_crit,
                "rmse_log": self.rmse_log, "n_points": self.n_points, "bound": self.bound,
                "b_crit_low": self.b_crit_low, "b_crit_high": self.b_crit_high,
                "range_bound": list(self.range_bound)}


def fit_critical_batch(batches: Sequence[float], steps: Sequence[float], *,
                       span: float = 1e3) -> CriticalBatchFit | None:
    """Least-squares fit of log S = log S_min + log(1 + B_noise/B) (numpy only).

    For a fixed B_noise the best log S_min is the mean of log S − log(1 + B_noise/B), so the fit is a 1-D
    search over B_noise in [min(B)/span, max(B)·span] (a log grid, then golden-section refinement), plus
    the limit B_noise = 0 (S constant). Returns None with fewer than two distinct batch sizes.
    """
    b = np.asarray(batches, dtype=float)
    s = np.asarray(steps, dtype=float)
    keep = np.isfinite(b) & np.isfinite(s) & (b > 0) & (s > 0)
    b, s = b[keep], s[keep]
    if b.size < 2 or np.unique(b).size < 2:
        return None
    y = np.log(s)

    def sse(log_bn: float) -> tuple[float, float]:
        g = np.log1p(np.exp(log_bn) / b)
        c = float(np.mean(y - g))
        r = y - c - g
        return float(r @ r), c

    lo, hi = math.log(b.min() / span), math.log(b.max() * span)
    grid = np.linspace(lo, hi, 1201)
    g_all = np.log1p(np.exp(grid)[:, None] / b[None, :])  # sse() at every grid point at once
    r_all = y[None, :] - g_all
    r_all -= r_all.mean(axis=1, keepdims=True)
    values = (r_all * r_all).sum(axis=1)
    k = int(np.argmin(values))
    a, c_ = grid[max(k - 1, 0)], grid[min(k + 1, grid.size - 1)]
    phi = (math.sqrt(5) - 1) / 2
    x1, x2 = c_ - phi * (c_ - a), a + phi * (c_ - a)
    f1, f2 = sse(x1)[0], sse(x2)[0]
    for _ in range(80):
        if f1 < f2:
            c_, x2, f2 = x2, x1, f1
            x1 = c_ - phi * (c_ - a)
            f1 = sse(x1)[0]
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + phi * (c_ - a)
            f2 = sse(x2)[0]
    x_best = (a + c_) / 2
    best_sse, log_smin = sse(x_best)
    if values[k] < best_sse:
        x_best, (best_sse, log_smin) = float(grid[k]), sse(float(grid[k]))
    bound: str | None = None
    const_c = float(np.mean(y))
    const_sse = float(((y - const_c) ** 2).sum())
    if const_sse <= best_sse + 1e-15:  # no gain from batch size: B_noise -> 0
        return CriticalBatchFit(s_min=math.exp(const_c), b_noise=0.0, rmse_log=math.sqrt(const_sse / y.size),
                                n_points=int(y.size), bound="below")
    if k == 0:
        bound = "below"
    elif k == grid.size - 1:
        bound = "above"
    return CriticalBatchFit(s_min=math.exp(log_smin), b_noise=math.exp(x_best),
                            rmse_log=math.sqrt(best_sse / y.size), n_points=int(y.size), bound=bound)


def fit_critical_batch_range(batches: Sequence[float], steps: Sequence[int],
                             intervals: Sequence[tuple[int, int]]) -> CriticalBatchFit | None:
    """:func:`fit_critical_batch` on the whole ``steps``, with the range of B_crit over the fits through
    every combination of the interval ends ``intervals[i] = (low, high)`` (:func:`steps_interval`): how
    much the coarseness of the counts leaves open. ``range_bound`` holds ``"above"`` when some combination
    puts B_crit beyond the grid, ``"below"`` when some finds no gain from batch size."""
    fit = fit_critical_batch(batches, [float(x) for x in steps])
    if fit is None:
        return None
    lows, highs, bounds = [], [], set()
    combos = {tuple(c) for c in itertools.product(*[sorted({lo, hi}) for lo, hi in intervals])}
    for combo in sorted(combos):
        f = fit_critical_batch(batches, [float(x) for x in combo])
        if f is None:
            continue
        lows.append(f.b_crit)
        highs.append(f.b_crit)
        if f.bound is not None:
            bounds.add(f.bound)
    if lows:
        fit.b_crit_low, fit.b_crit_high = min(lows), max(highs)
        fit.range_bound = sorted(bounds)
    return fit


# ------------------------------------------------------------------------------------------------------
# tuning cost
# ------------------------------------------------------------------------------------------------------


@dataclass
class TuningCost:
    """What finding a method's best setting at one batch size cost: its sweep (the ``[base]`` seed's runs).

    * ``settings`` / ``finished`` / ``reached``: the grid's settings, those finished, those that reach the
      target;
    * ``steps_min`` / ``steps_median`` / ``steps_max``: the spread of (whole) steps to target over the
      settings that reach it (the best setting has ``steps_min``);
    * ``grid_passes``: the forward+backward-equivalent passes every finished run of the grid consumed, as it
      ran (to the end of its budget, or to where it stopped at the target);
    * ``grid_passes_to_target``: the same grid if every run stopped at the target: passes to target for a
      run that reaches it, its whole run for one that does not. This one compares across studies with and
      without ``stop_at_target``;
    * ``best_passes``: passes to target of the best setting (the cost of one run, once it is known).
    """

    method: str
    batch_tokens: int
    settings: int
    finished: int
    reached: int
    steps_min: float | None
    steps_median: float | None
    steps_max: float | None
    grid_passes: float
    grid_passes_to_target: float
    best_passes: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tuning_costs(spec: StudySpec, results: Sequence[RunResult]) -> list[TuningCost]:
    """One :class:`TuningCost` per (method, batch) of the sweep, in the experiment's method order."""
    out: list[TuningCost] = []
    for m in spec.methods:
        for b in spec.batches_of(m):
            runs = [r for r in results if r.method == m.name and r.batch_tokens == b
                    and r.seed == spec.base_seed]
            done = [r for r in runs if r.done]
            reached = [r for r in done if r.steps_to_target is not None]
            steps = sorted(float(r.steps_to_target) for r in reached)  # type: ignore[arg-type]
            passes = [r.passes or 0.0 for r in done]
            to_target = [(r.passes_to_target if r.passes_to_target is not None else (r.passes or 0.0))
                         for r in done]
            best = min(reached, key=_rank_key) if reached else None
            out.append(TuningCost(
                method=m.name, batch_tokens=b, settings=len(runs), finished=len(done), reached=len(reached),
                steps_min=steps[0] if steps else None,
                steps_median=float(np.median(steps)) if steps else None,
                steps_max=steps[-1] if steps else None,
                grid_passes=float(sum(passes)), grid_passes_to_target=float(sum(to_target)),
                best_passes=best.passes_to_target if best is not None else None,
            ))
    return out


# ------------------------------------------------------------------------------------------------------
# seeds
# ------------------------------------------------------------------------------------------------------


def seed_settings(spec: StudySpec,
                  best: dict[tuple[str, int], RunResult]) -> dict[str, tuple[float, float | None]]:
    """Each method's best (lr, adam_lr) at the seed batch (default: the largest): what its seed runs
    re-run."""
    b = spec.seed_batch
    return {m.name: (r.lr, r.adam_lr) for m in spec.methods if (r := best.get((m.name, b))) is not None}


#: The per-seed quantities a headline ratio can be taken of (RunResult attributes).
SEED_METRICS: dict[str, str] = {"steps": "steps_to_target", "passes": "passes_to_target",
                                "wall": "wall_to_target"}


@dataclass
class SeedRatio:
    """A headline ratio at the largest batch, per seed, with its median and range over seeds.

    ``numerator`` / ``denominator`` name methods; ``"best baseline"`` is, in each seed, the smallest value of
    the metric over the baselines that reached the target in that seed.
    """

    numerator: str
    denominator: str
    metric: str  # a key of SEED_METRICS
    per_seed: dict[int, float]
    #: steps ratios: the resolution bracket of each seed's ratio where a side took few steps
    #: (:func:`steps_ratio_bracket`)
    brackets: dict[int, tuple[float, float]] = field(default_factory=dict)

    @property
    def resolution(self) -> tuple[float, float] | None:
        """The lowest and highest end of the seeds' brackets (a seed without one counts its ratio), or
        None when no seed's ratio has a bracket."""
        if not self.brackets:
            return None
        ends = [self.brackets.get(s, (v, v)) for s, v in self.per_seed.items()]
        return (min(lo for lo, _ in ends), max(hi for _, hi in ends))

    @property
    def values(self) -> list[float]:
        return [self.per_seed[s] for s in sorted(self.per_seed)]

    @property
    def median(self) -> float | None:
        return float(np.median(self.values)) if self.per_seed else None

    @property
    def low(self) -> float | None:
        return min(self.values) if self.per_seed else None

    @property
    def high(self) -> float | None:
        return max(self.values) if self.per_seed else None

    def to_dict(self) -> dict[str, Any]:
        res = self.resolution
        return {"numerator": self.numerator, "denominator": self.denominator, "metric": self.metric,
                "per_seed": {str(k): v for k, v in sorted(self.per_seed.items())}, "median": self.median,
                "min": self.low, "max": self.high,
                "resolution": None if res is None else {
                    "per_seed": {str(k): list(v) for k, v in sorted(self.brackets.items())},
                    "min": res[0], "max": res[1]}}


def _seed_value(spec: StudySpec, by_seed: dict[str, dict[int, RunResult]], name: str, seed: int,
                attr: str) -> float | None:
    if name == "best baseline":
        vals = [v for m in spec.methods if not m.is_gn
                if (r := by_seed.get(m.name, {}).get(seed)) is not None and r.done
                and (v := getattr(r, attr)) is not None]
        return min(vals) if vals else None
    r = by_seed.get(name, {}).get(seed)
    return getattr(r, attr) if r is not None and r.done else None


def reference_gn(spec: StudySpec) -> str | None:
    """The GN method the other GN variants are compared with: ``gn`` if declared, else the first GN method."""
    names = [m.name for m in spec.methods if m.is_gn]
    return "gn" if "gn" in names else (names[0] if names else None)


def seed_ratios(spec: StudySpec, by_seed: dict[str, dict[int, RunResult]]) -> list[SeedRatio]:
    """The headline ratios over seeds: best baseline / each GN method (steps, passes, wall), and each other
    GN method / the reference GN method (steps, passes). A seed counts when both sides reached the target."""
    seeds = sorted({s for runs in by_seed.values() for s in runs})
    ref = reference_gn(spec)
    pairs: list[tuple[str, str, str]] = []
    for m in spec.methods:
        if m.is_gn:
            pairs += [("best baseline", m.name, k) for k in SEED_METRICS]
    for m in spec.methods:
        if m.is_gn and ref is not None and m.name != ref:
            pairs += [(m.name, ref, "steps"), (m.name, ref, "passes")]
    out: list[SeedRatio] = []
    for num, den, metric in pairs:
        attr = SEED_METRICS[metric]
        per_seed: dict[int, float] = {}
        brackets: dict[int, tuple[float, float]] = {}
        for s in seeds:
            a, b = _seed_value(spec, by_seed, num, s, attr), _seed_value(spec, by_seed, den, s, attr)
            if a is not None and b is not None and b > 0:
                per_seed[s] = a / b
                if metric == "steps" and (br := steps_ratio_bracket(a, b)) is not None:
                    brackets[s] = br
        out.append(SeedRatio(numerator=num, denominator=den, metric=metric, per_seed=per_seed,
                             brackets=brackets))
    return out


@dataclass
class Speedup:
    """One method's best run at the largest batch against the reference baseline (the baseline with the
    fewest whole steps to target there, then the lower final loss): the reference's value over the
    method's (above 1 = the method needs less), and the steps ratio's resolution bracket."""

    method: str
    reference: str | None
    steps: int | None
    reference_steps: int | None
    steps_speedup: float | None
    steps_bracket: tuple[float, float] | None
    passes_speedup: float | None
    wall_speedup: float | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["steps_bracket"] = list(self.steps_bracket) if self.steps_bracket is not None else None
        return d


def _over(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def largest_batch_speedups(spec: StudySpec, best: dict[tuple[str, int], RunResult]
                           ) -> tuple[RunResult | None, list[Speedup]]:
    """(the reference baseline's run, one :class:`Speedup` per method with a best run at the largest batch);
    the reference is None when no baseline reached the target there."""
    b = spec.largest_batch
    at_b = [(m, r) for m in spec.methods if (r := best.get((m.name, b))) is not None]
    base = [r for m, r in at_b if not m.is_gn and r.steps_to_target is not None]
    ref = min(base, key=_rank_key) if base else None
    out = []
    for m, r in at_b:
        rs, s = (ref.steps_to_target if ref is not None else None), r.steps_to_target
        out.append(Speedup(
            method=m.name, reference=ref.method if ref is not None else None, steps=s, reference_steps=rs,
            steps_speedup=_over(rs, s),
            steps_bracket=steps_ratio_bracket(rs, s) if rs and s else None,
            passes_speedup=_over(ref.passes_to_target if ref is not None else None, r.passes_to_target),
            wall_speedup=_over(ref.wall_to_target if ref is not None else None, r.wall_to_target)))
    return ref, out


# ------------------------------------------------------------------------------------------------------
# the whole study
# ------------------------------------------------------------------------------------------------------


@dataclass
class StudyResults:
    """Everything the report shows."""

    spec: StudySpec
    target_loss: float | None
    target_source: str  # "declared" | "auto" | "auto (no finished baseline at the largest batch)"
    runs: list[RunResult]
    best: dict[tuple[str, int], RunResult]
    fits: dict[str, CriticalBatchFit | None]
    warmup: RunResult | None
    #: line-search / model statistics of the selected GN runs (baselines have none)
    diagnostics: dict[tuple[str, int], GNDiagnostics] = field(default_factory=dict)
    #: the seed runs ([experiment] seeds), planned from the best settings at the largest batch
    seed_runs: list[RunResult] = field(default_factory=list)
    #: method -> seed -> run at the largest batch: the selected sweep run (the [base] seed) and its seed runs
    by_seed: dict[str, dict[int, RunResult]] = field(default_factory=dict)
    ratios: list[SeedRatio] = field(default_factory=list)
    #: GN diagnostics at the largest batch per (method, seed), the [base] seed's selected run included
    seed_diagnostics: dict[tuple[str, int], GNDiagnostics] = field(default_factory=dict)
    #: best settings at an edge of their grid (:func:`grid_edges`)
    edges: dict[tuple[str, int], list[str]] = field(default_factory=dict)
    #: what each method's grid cost per batch size (:func:`tuning_costs`)
    tuning: list[TuningCost] = field(default_factory=list)
    #: the best run of every method at the largest batch against the reference baseline
    speedups: list[Speedup] = field(default_factory=list)

    def _in_order(self, d: dict[tuple[str, int], Any]) -> list[tuple[tuple[str, int], Any]]:
        """Items keyed by (method, batch) in the experiment's method order, then by batch."""
        return sorted(d.items(), key=lambda kv: (self._order(kv[0][0]), kv[0][1]))

    def to_dict(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "experiment": spec.to_dict(),
            "target_loss": self.target_loss,
            "target_source": self.target_source,
            "warmup": self.warmup.row() if self.warmup is not None else None,
            "best": [
                {"method": m, "batch_tokens": b, **{k: v for k, v in r.row().items()
                                                     if k not in ("method", "batch_tokens")},
                 "grid_edge": self.edges.get((m, b), [])}
                for (m, b), r in self._in_order(self.best)
            ],
            "largest_batch": {"batch_tokens": spec.largest_batch,
                              "reference": next((s.reference for s in self.speedups), None),
                              "speedups": [s.to_dict() for s in self.speedups]},
            "critical_batch": {m: (f.to_dict() if f is not None else None) for m, f in self.fits.items()},
            "gn_diagnostics": [{"method": m, "batch_tokens": b, **d.to_dict()}
                               for (m, b), d in self._in_order(self.diagnostics)],
            "seeds": {
                "seeds": sorted({s for runs in self.by_seed.values() for s in runs}),
                "ratios": [r.to_dict() for r in self.ratios],
                "gn_diagnostics": [{"method": m, "seed": s, **d.to_dict()}
                                   for (m, s), d in self._in_order(self.seed_diagnostics)],
            },
            "tuning_cost": [t.to_dict() for t in self.tuning],
            "runs": [r.row() for r in self.runs],
            "seed_runs": [r.row() for r in self.seed_runs],
        }

    def _order(self, method: str) -> int:
        names = [m.name for m in self.spec.methods]
        return names.index(method) if method in names else len(names)


def _apply_target(r: RunResult, target: float | None) -> None:
    r.target_loss = target
    t = to_target(r.curve, target) if r.done else ToTarget()
    r.steps_to_target, r.steps_to_target_interp, r.previous_eval = t.steps, t.steps_interp, t.previous_eval
    r.tokens_to_target, r.passes_to_target, r.wall_to_target = t.tokens, t.passes, t.wall
    if r.status == "stopped" and r.steps_to_target is None:
        r.status = "partial"  # it stopped at a higher loss than this target: the study continues it


def analyse(spec: StudySpec, study_dir: Path, runs: Sequence[RunSpec], warmup: RunSpec | None = None,
            *, target_loss: float | None = None) -> StudyResults:
    """Read every run, settle the target (declared, given, or auto), select the best settings, fit S(B)."""
    results = [read_run(r, study_dir) for r in runs]
    if target_loss is not None:
        target, source = target_loss, "given"
    elif spec.target_loss is not None:
        target, source = spec.target_loss, "declared"
    else:
        target = auto_target(results, spec.largest_batch, spec.target_fraction)
        source = "auto" if target is not None else "auto (no finished baseline run at the largest batch yet)"
    for r in results:
        _apply_target(r, target)
    best = select_best(results)
    for r in best.values():
        r.selected = True
    fits = critical_batch_fits(spec, best)
    diagnostics = {key: d for key, r in best.items() if (d := gn_diagnostics(r.curve)) is not None}
    warm = read_run(warmup, study_dir) if warmup is not None else None
    seed_results: list[RunResult] = []
    by_seed: dict[str, dict[int, RunResult]] = {}
    if spec.extra_seeds:
        seed_results = [read_run(r, study_dir)
                        for r in plan_seed_runs(spec, study_dir, seed_settings(spec, best))]
        for r in seed_results:
            _apply_target(r, target)
        for m in spec.methods:
            if (sel := best.get((m.name, spec.seed_batch))) is not None:
                by_seed[m.name] = {sel.seed: sel}
        for r in seed_results:
            by_seed.setdefault(r.method, {})[r.seed] = r
    seed_diag = {(m, seed): d for m, runs in by_seed.items() for seed, r in runs.items()
                 if r.done and (d := gn_diagnostics(r.curve)) is not None}
    return StudyResults(spec=spec, target_loss=target, target_source=source, runs=results, best=best,
                        fits=fits, warmup=warm, diagnostics=diagnostics, seed_runs=seed_results,
                        by_seed=by_seed, ratios=seed_ratios(spec, by_seed) if by_seed else [],
                        seed_diagnostics=seed_diag, edges=grid_edges(results, best),
                        tuning=tuning_costs(spec, results), speedups=largest_batch_speedups(spec, best)[1])


def critical_batch_fits(spec: StudySpec, best: dict[tuple[str, int], RunResult]
                        ) -> dict[str, CriticalBatchFit | None]:
    """Each method's S(B) fit on its best whole steps to target, with the B_crit range of the counts'
    intervals (:func:`fit_critical_batch_range`)."""
    fits: dict[str, CriticalBatchFit | None] = {}
    for m in spec.methods:
        pts = [r for b in spec.batch_tokens if (r := best.get((m.name, b))) is not None
               and r.steps_interval is not None]
        fits[m.name] = fit_critical_batch_range([r.batch_tokens for r in pts],
                                                [r.steps_to_target for r in pts],  # type: ignore[misc]
                                                [r.steps_interval for r in pts])  # type: ignore[misc]
    return fits
