"""First-order baselines from maintained libraries: AdamW, Muon (+AdamW), SOAP, Shampoo (+AdamW).

Nothing here re-implements an optimizer; this module only decides *which parameters* go to *which
library optimizer with which hyper-parameters*, and builds the warmup + decay schedule.

Routing (one place: :func:`route_hidden_matrices`, which calls
:func:`gnopt.optim.routing.split_hidden_matrices` with the default predicate, exactly like the GN inner
solver does):

* ``adamw`` — ``torch.optim.AdamW`` on everything.
* ``muon`` — ``torch.optim.Muon`` on the hidden 2-D matrices (attention and MLP weights), ``AdamW`` on the
  embedding, the LM head and the norm scales. ``torch.optim.Muon`` only accepts 2-D tensors, and
  orthogonalizing an embedding or a head update is known to hurt, hence the split.
  Two choices are made explicitly instead of inheriting torch's defaults:

  - ``weight_decay`` is passed from the config (torch's Muon defaults to 0.1, AdamW to 0.01; a silent
    default would make the two groups decay differently and the baselines differ from GN's inner Muon);
  - ``adjust_lr_fn="original"`` (:data:`MUON_ADJUST_LR_FN`): the update of an ``A×B`` matrix is scaled by
    ``lr·√max(1, A/B)`` as in Keller Jordan's reference Muon. With it ``lr`` lives on Muon's usual scale
    (0.01-0.1: the pilot's best was 0.05, the GN inner Muon is stable at 0.01), and it is the rule
    :class:`gnopt.optim.inner.MuonAdamW` uses (``adjust_lr_fn=None`` means "original"), so ``--lr`` means
    the same for the Muon baseline and for GN's inner Muon. ``"match_rms_adamw"`` (0.2·√max(A, B)) would put
    Muon's lr on AdamW's scale instead; it is not used so that the two Muon users agree.
  - the precision of the Newton–Schulz iteration is ``cfg.muon_ns_precision`` (:class:`gnopt.optim.muon.Muon`:
    ``"bf16"`` is ``torch.optim.Muon`` itself, ``"fp32"`` the same update in float32), the one GN's inner
    Muon uses too.
* ``soap`` — ``pytorch_optimizer.SOAP`` on everything (SOAP preconditions every dimension up to
  ``max_precondition_dim`` and falls back to Adam for 1-D tensors, so no AdamW group is needed). Note that
  SOAP's first ``step()`` only initialises its eigenbases and leaves the weights unchanged.
* ``shampoo`` — ``pytorch_optimizer.Shampoo`` on the hidden matrices, AdamW on the rest. Plain Shampoo
  keeps a full ``d×d`` statistic per tensor dimension and inverts it with an SVD every step; on the
  embedding/head that is a ``vocab×vocab`` matrix (4096² for ``cpu-small``), which is slow, and the
  inverse 4th root of a rank-deficient embedding statistic amplifies rows of rare tokens. Routing it like
  Muon avoids both.

Weight decay applies to tensors with ``ndim >= 2`` only (norm scales are never decayed), the usual LLM
convention (nanoGPT, LLaMA).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from gnopt.config import TrainConfig
from gnopt.errors import GnoptError
from gnopt.optim.muon import Muon
from gnopt.optim.routing import default_is_hidden_matrix, split_hidden_matrices
from gnopt.optim.schedules import lr_multiplier

#: torch.optim.Muon's per-shape learning-rate rule (see the module docstring).
MUON_ADJUST_LR_FN = "original"
#: Muon momentum (Nesterov), torch's and the reference implementation's default.
MUON_MOMENTUM = 0.95
#: AdamW betas of every baseline AdamW group: the usual LLM setting (GPT-3, LLaMA, nanoGPT).
ADAMW_BETAS: tuple[float, float] = (0.9, 0.95)
ADAMW_EPS = 1e-8
#: SOAP betas (the SOAP paper's defaults, as shipped by pytorch-optimizer). Its precondition frequency is
#: ``TrainConfig.soap_precondition_frequency`` (default 10, the same source's).
SOAP_BETAS: tuple[float, float] = (0.95, 0.95)

NamedParams = Sequence[tuple[str, Tensor]]


# ------------------------------------------------------------------------------------------------------
# schedule
# ------------------------------------------------------------------------------------------------------


def build_schedulers(optimizers: Iterable[Optimizer], cfg: TrainConfig) -> list[LambdaLR]:
    """One ``LambdaLR`` per optimizer, all following :func:`lr_multiplier` with the config's schedule."""
    assert cfg.warmup_steps is not None, "resolve() the config first"
    total, warmup, kind, min_ratio = cfg.steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio

    def multiplier(step: int) -> float:
        return lr_multiplier(step, total_steps=total, warmup_steps=warmup, kind=kind, min_ratio=min_ratio)

    return [LambdaLR(opt, multiplier) for opt in optimizers]


# ------------------------------------------------------------------------------------------------------
# routing and optimizers
# ------------------------------------------------------------------------------------------------------


def route_hidden_matrices(model: nn.Module) -> tuple[list[tuple[str, Tensor]], list[tuple[str, Tensor]]]:
    """(hidden 2-D matrices, everything else) among the trainable parameters of ``model``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return split_hidden_matrices(named, default_is_hidden_matrix(model))


def decay_groups(named: NamedParams, weight_decay: float, **extra: Any) -> list[dict[str, Any]]:
    """Parameter groups: ``ndim >= 2`` tensors with ``weight_decay``, the others without (empty ones
    dropped). ``extra`` options (lr, ...) go into every group."""
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, **extra})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, **extra})
    return groups


def _adamw(named: NamedParams, lr: float, weight_decay: float) -> Optimizer:
    return torch.optim.AdamW(decay_groups(named, weight_decay), lr=lr, betas=ADAMW_BETAS, eps=ADAMW_EPS)


def build_baseline_optimizers(cfg: TrainConfig, model: nn.Module) -> list[tuple[str, Optimizer]]:
    """The optimizers of baseline ``cfg.optimizer`` as ``(label, optimizer)`` pairs over disjoint
    parameters. The first one is the "main" group whose learning rate is ``cfg.lr``; a second AdamW one
    (label ``"adamw"``) uses ``cfg.adam_lr``."""
    assert cfg.lr is not None, "resolve() the config first"
    name, lr, wd = cfg.optimizer, cfg.lr, cfg.weight_decay
    if name == "adamw":
        return [("adamw", _adamw(list(model.named_parameters()), lr, wd))]
    if name == "soap":
        from pytorch_optimizer import SOAP

        groups = decay_groups(list(model.named_parameters()), wd)
        opt = SOAP(groups, lr=lr, betas=SOAP_BETAS, precondition_frequency=cfg.soap_precondition_frequency)
        return [("soap", opt)]
    if name in ("muon", "shampoo"):
        assert cfg.adam_lr is not None
        hidden, rest = route_hidden_matrices(model)
        if not hidden:
            raise GnoptError(f"optimizer {name!r} found no hidden 2-D matrices in the model to precondition.")
        params = [p for _, p in hidden]
        main: Optimizer
        if name == "muon":
            assert cfg.muon_ns_precision is not None
            main = Muon(
                params, lr=lr, weight_decay=wd, momentum=MUON_MOMENTUM, nesterov=True,
                adjust_lr_fn=MUON_ADJUST_LR_FN, ns_precision=cfg.muon_ns_precision,
            )
        else:
            from pytorch_optimizer import Shampoo

            main = Shampoo(params, lr=lr, weight_decay=wd, weight_decouple=True)
        out: list[tuple[str, Optimizer]] = [(name, main)]
        if rest:
            out.append(("adamw", _adamw(rest, cfg.adam_lr, wd)))
        return out
    raise GnoptError(f"{name!r} is not a baseline optimizer.")
