"""gnopt.optim — Gauss-Newton optimizers for any ``nn.Module`` (the library; no harness imports).

Typical use::

    from gnopt.optim import GaussNewton, SoftmaxCrossEntropy, LineSearch, InnerSchedule, MuonAdamW

    gn = GaussNewton(model, SoftmaxCrossEntropy(), inner_steps=16,
                     inner=MuonAdamW(lr=0.01, adam_lr=1e-3),
                     line_search=LineSearch(),  # or LineSearch.paper(ls_range=5)
                     schedule=InnerSchedule("constant_with_inner_cosine", total_outer_steps=100,
                                            inner_steps=16))
    for t in range(100):
        record = gn.step(batches)        # batches yields (inputs, targets) micro-batches
        print(record.loss, record.alpha, record.rho)
"""

from gnopt.torch_version import check as _check_torch

_check_torch()  # one clear message on a torch without the APIs used below (hence imports after code)

# ruff: noqa: E402
from gnopt.optim.cg import conjugate_gradient
from gnopt.optim.damping import Damping
from gnopt.optim.gauss_newton import MODES, GaussNewton
from gnopt.optim.inner import CG, InnerOptimizer, InnerSolver, MuonAdamW, OptimizerChain, TorchOptimizer
from gnopt.optim.line_search import LineSearch
from gnopt.optim.linearize import jvp, linearized_pass, model_autocast
from gnopt.optim.losses import AutogradLoss, LocalLoss, MSELoss, OutputLoss, SoftmaxCrossEntropy
from gnopt.optim.partition import Partition
from gnopt.optim.record import GNStepRecord
from gnopt.optim.schedules import InnerSchedule, lr_multiplier

__all__ = [
    "CG",
    "MODES",
    "AutogradLoss",
    "Damping",
    "GNStepRecord",
    "GaussNewton",
    "InnerOptimizer",
    "InnerSolver",
    "InnerSchedule",
    "LineSearch",
    "LocalLoss",
    "MSELoss",
    "MuonAdamW",
    "OptimizerChain",
    "OutputLoss",
    "Partition",
    "SoftmaxCrossEntropy",
    "TorchOptimizer",
    "conjugate_gradient",
    "jvp",
    "linearized_pass",
    "lr_multiplier",
    "model_autocast",
]
