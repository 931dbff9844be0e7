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

The public names below load on first access, after a check of the installed torch (one clear message on a
torch without the APIs they use). So the torch-free modules (:mod:`.line_search`, :mod:`.schedules`,
:mod:`.damping`, :mod:`.ns_precision`) import without torch: the harness's config takes its option lists
and rules from them.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

#: public name -> the module that defines it (resolved lazily by ``__getattr__``).
_LAZY: dict[str, str] = {
    "CG": "gnopt.optim.inner",
    "MODES": "gnopt.optim.gauss_newton",
    "AutogradLoss": "gnopt.optim.losses",
    "Damping": "gnopt.optim.damping",
    "GNStepRecord": "gnopt.optim.record",
    "GaussNewton": "gnopt.optim.gauss_newton",
    "InnerOptimizer": "gnopt.optim.inner",
    "InnerSchedule": "gnopt.optim.schedules",
    "InnerSolver": "gnopt.optim.inner",
    "LineSearch": "gnopt.optim.line_search",
    "LocalLoss": "gnopt.optim.losses",
    "MSELoss": "gnopt.optim.losses",
    "Muon": "gnopt.optim.muon",
    "MuonAdamW": "gnopt.optim.inner",
    "OptimizerChain": "gnopt.optim.inner",
    "OutputLoss": "gnopt.optim.losses",
    "Partition": "gnopt.optim.partition",
    "SoftmaxCrossEntropy": "gnopt.optim.losses",
    "TorchOptimizer": "gnopt.optim.inner",
    "conjugate_gradient": "gnopt.optim.cg",
    "jvp": "gnopt.optim.linearize",
    "linearized_pass": "gnopt.optim.linearize",
    "lr_multiplier": "gnopt.optim.schedules",
    "model_autocast": "gnopt.optim.linearize",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gnopt.optim' has no attribute {name!r}")
    from gnopt.torch_version import check

    check()
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
