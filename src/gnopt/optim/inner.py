"""Inner solvers of the Gauss-Newton subproblem.

An inner solver minimizes the GN model of the loss around θ_t. Every one implements :class:`InnerSolver`,
the one interface the outer step uses (:meth:`InnerSolver.solve` on the step's
:class:`~gnopt.optim.problem.Problem`). Two families:

* first-order optimizers stepping the inner iterate θ̂ with the inner gradient Jᵀ(g_z + H_z JΔ) on a fresh
  micro-batch every step (the paper's scheme): :class:`MuonAdamW` (the paper's default: Muon on hidden 2-D
  matrices, AdamW on embedding, head and 1-D parameters) or :class:`TorchOptimizer` wrapping **any**
  ``torch.optim.Optimizer`` factory (AdamW, SOAP and Shampoo from pytorch-optimizer, ...);
* :class:`CG` — Hessian-free conjugate gradients with exact GN-vector products on a fixed set of
  micro-batches.

Every optimizer built here records each parameter group's peak learning rate under ``"peak_lr"``, so the
GN schedule can scale ``"lr"`` without losing it (and the value survives ``state_dict``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from gnopt.errors import GnoptError
from gnopt.optim.cg import solve_cg
from gnopt.optim.inner_loop import run_inner_loop
from gnopt.optim.muon import Muon
from gnopt.optim.ns_precision import NS_PRECISIONS, TORCH_NS_PRECISION
from gnopt.optim.problem import Problem
from gnopt.optim.record import GNStepRecord
from gnopt.optim.routing import HiddenPredicate, default_is_hidden_matrix, split_hidden_matrices

NamedParams = Sequence[tuple[str, Tensor]]


class OptimizerChain:
    """Several optimizers over disjoint parameters that step together (Muon + AdamW, say)."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        if not optimizers:
            raise GnoptError("OptimizerChain needs at least one optimizer")
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @torch.no_grad()
    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        states = state["optimizers"]
        if len(states) != len(self.optimizers):
            raise GnoptError(
                f"optimizer state holds {len(states)} optimizers, this chain has {len(self.optimizers)}"
            )
        for opt, sd in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(sd)


def _record_peak_lr(opt: torch.optim.Optimizer | OptimizerChain) -> None:
    for g in opt.param_groups:
        g.setdefault("peak_lr", float(g["lr"]))


class InnerSolver:
    """What the outer step asks of an inner solver.

    * ``fixed_batches``: the solver needs its N micro-batches drawn before it starts (``Problem.kept``);
    * :meth:`check_mode`: refuse a GN mode the solver cannot minimize;
    * :meth:`build`: the state that steps one block's inner iterate (a ``torch.optim``-style optimizer),
      built afresh whenever the block restarts; ``None`` for a stateless solver;
    * :meth:`solve`: minimize the subproblem, leaving each block's solution in ``Block.theta_hat``, and
      fill the step record (loss, pass counts, ...).
    """

    fixed_batches: ClassVar[bool] = False

    def check_mode(self, mode: str) -> None:
        """Raise :class:`GnoptError` if this solver cannot minimize the model of ``mode``."""

    def build(self, named_params: NamedParams, model: nn.Module
              ) -> torch.optim.Optimizer | OptimizerChain | None:
        return None

    def solve(self, problem: Problem, rec: GNStepRecord) -> None:
        raise NotImplementedError


class InnerOptimizer(InnerSolver):
    """A first-order inner solver: builds the optimizer that steps the inner iterate of one block, and
    runs the inner loop (:func:`gnopt.optim.inner_loop.run_inner_loop`) with it."""

    def build(self, named_params: NamedParams, model: nn.Module) -> torch.optim.Optimizer | OptimizerChain:
        raise NotImplementedError

    def solve(self, problem: Problem, rec: GNStepRecord) -> None:
        run_inner_loop(problem, rec)


@dataclass(frozen=True)
class MuonAdamW(InnerOptimizer):
    """The paper's inner optimizer: ``torch.optim.Muon`` on hidden 2-D matrices, AdamW on the rest.

    Muon is :class:`gnopt.optim.muon.Muon`: torch's optimizer, whose Newton–Schulz iteration runs in
    ``ns_precision`` (``"bf16"``, torch's own and the default: bit for bit ``torch.optim.Muon``; ``"fp32"``:
    several times faster on a CPU without native bf16, where GN runs it once per inner step).

    Args:
        lr: Muon learning rate (hidden matrices).
        adam_lr: AdamW learning rate (embedding, head, 1-D parameters).
        betas: AdamW betas (paper: (0.9, 0.999)).
        adam_weight_decay: decoupled weight decay of the AdamW group only (applied to θ̂ itself).
        muon_weight_decay: weight decay of the Muon group (torch's default is 0.1; the paper uses none).
        momentum: Muon momentum (Nesterov).
        adjust_lr_fn: torch Muon's per-shape learning-rate rule (``None`` = "original": lr·√max(1, m/n)).
        is_hidden: routing predicate; default :func:`gnopt.optim.routing.default_is_hidden_matrix`.
        ns_precision: precision of Muon's Newton–Schulz iteration, ``"bf16"`` or ``"fp32"``.
    """

    lr: float = 0.01
    adam_lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = 0.0
    muon_weight_decay: float = 0.0
    momentum: float = 0.95
    adjust_lr_fn: str | None = None
    is_hidden: HiddenPredicate | None = None
    ns_precision: str = TORCH_NS_PRECISION

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.adam_lr <= 0:
            raise GnoptError(f"inner learning rates must be > 0, got lr={self.lr}, adam_lr={self.adam_lr}")
        if self.ns_precision not in NS_PRECISIONS:
            raise GnoptError(f"MuonAdamW's ns_precision must be one of {', '.join(NS_PRECISIONS)}, got "
                             f"{self.ns_precision!r}")

    def build(self, named_params: NamedParams, model: nn.Module) -> OptimizerChain:
        pred = self.is_hidden or default_is_hidden_matrix(model)
        hidden, rest = split_hidden_matrices(named_params, pred)
        opts: list[torch.optim.Optimizer] = []
        if hidden:
            opts.append(
                Muon(
                    [p for _, p in hidden], lr=self.lr, weight_decay=self.muon_weight_decay,
                    momentum=self.momentum, adjust_lr_fn=self.adjust_lr_fn, ns_precision=self.ns_precision,
                )
            )
        if rest:
            opts.append(
                torch.optim.AdamW(
                    [p for _, p in rest], lr=self.adam_lr, betas=self.betas,
                    weight_decay=self.adam_weight_decay,
                )
            )
        chain = OptimizerChain(opts)
        _record_peak_lr(chain)
        return chain


@dataclass(frozen=True)
class TorchOptimizer(InnerOptimizer):
    """Any ``torch.optim``-style optimizer as the inner solver.

    ``factory`` receives the list of inner-iterate tensors of one block and returns the optimizer, e.g.
    ``TorchOptimizer(lambda ps: torch.optim.AdamW(ps, lr=1e-3))`` or
    ``TorchOptimizer(lambda ps: pytorch_optimizer.SOAP(ps, lr=3e-3))``.
    """

    factory: Callable[[list[Tensor]], torch.optim.Optimizer]

    def build(self, named_params: NamedParams, model: nn.Module) -> torch.optim.Optimizer:
        opt = self.factory([p for _, p in named_params])
        if not hasattr(opt, "param_groups") or not hasattr(opt, "step"):
            raise GnoptError("TorchOptimizer's factory must return a torch.optim-style optimizer")
        _record_peak_lr(opt)
        return opt


@dataclass(frozen=True)
class CG(InnerSolver):
    """Hessian-free inner solver: conjugate gradients on (G + λI) d = −g over a fixed set of micro-batches
    (:func:`gnopt.optim.cg.solve_cg`).

    Args:
        tol: stop when ‖residual‖ ≤ tol · ‖g‖.
        max_iters: at most this many CG iterations (each costs one GN-vector product per micro-batch).
    """

    fixed_batches: ClassVar[bool] = True

    tol: float = 1e-4
    max_iters: int = 50

    def __post_init__(self) -> None:
        if self.tol <= 0 or self.max_iters < 1:
            raise GnoptError(f"CG needs tol > 0 and max_iters >= 1, got {self.tol}, {self.max_iters}")

    def check_mode(self, mode: str) -> None:
        if mode != "gn":
            raise GnoptError("the CG inner solver solves the quadratic GN model: use mode='gn'")

    def solve(self, problem: Problem, rec: GNStepRecord) -> None:
        solve_cg(problem, self.tol, self.max_iters, rec)
