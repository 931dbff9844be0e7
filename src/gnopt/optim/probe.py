"""The directional probe: how much of the Gauss-Newton model's decrease an update direction captures.

At one point θ (a model's parameters) and on one fixed GN batch of N micro-batches B_1 … B_N, with every
quantity the mean over the N micro-batches (each micro-batch's loss is its own mean, as in the GN inner
loop and gnopt's gradient accumulation):

* g = (1/N) Σ_i J_iᵀ g_z,i, the loss gradient, and G = (1/N) Σ_i J_iᵀ H_z,i J_i, the GN matrix (never
  formed: dᵀGd = (1/N) Σ_i (J_i d)ᵀ H_z,i (J_i d), one JVP per micro-batch);
* the GN quadratic model q(Δ) = L(θ) + gᵀΔ + ½ ΔᵀGΔ of the loss around θ.

For a direction d (any update: a GN direction, an optimizer's next step, −g) the probe reports

* ``slope`` = gᵀd and ``curvature`` = dᵀGd;
* ``gain`` = (gᵀd)² / (dᵀGd): twice the model's decrease at the best step along d,
  −2 min_α [q(αd) − q(0)], reached at ``alpha_star`` = −gᵀd / dᵀGd (α* < 0: d points uphill and the best
  step reverses it; the gain counts it all the same). dᵀGd = 0 gives ∞ if gᵀd ≠ 0 (the model is
  unbounded along d) and 0 if gᵀd = 0. The gain does not depend on the length of d.
* ``share`` = gain(d) / gain(d_full), with d_full the full-GN direction **actually computed** (by the
  given :class:`~gnopt.optim.gauss_newton.GaussNewton`, a finite inner solve), not the exact minimizer
  −G⁺g: 1 is the oracle's, and a direction can exceed 1 when that inner solve is short of the minimizer
  (the exact minimizer's gain gᵀG⁺g bounds every direction's);
* ``cos_full``, ``cos_layerwise``: the cosine of d with the full-GN and the layerwise-GN direction, in
  the parameters' Euclidean inner product.

Per block b of the **probe partition** (:func:`probe_partition`: embedding, each layer's attention and
MLP, the norms, the head; finer than layerwise GN's blocks) every direction is restricted to the block
(d_b: d on b's parameters, 0 elsewhere) and the same numbers are taken on the block's model:
slope g_bᵀd_b, curvature d_bᵀ G_bb d_b, gain (g_bᵀd_b)² / (d_bᵀ G_bb d_b), the cosines of d_b with the
full-GN and layerwise-GN directions restricted alike; the block ``share`` divides by the **layerwise-GN
direction's** block gain. Layerwise GN minimizes each of its own blocks' models (an attention + MLP layer,
say) with the others frozen; restricted to a finer probe block it need not minimize that block's model,
so a block share can exceed 1 there too.

Only JVPs and VJPs are used (:mod:`.linearize`), never J or G. Cost: one forward and one pullback per
micro-batch for g, and per direction and micro-batch one JVP per probe block (the total's tangent is their
sum: J d = Σ_b J d_b). Single process (no data-parallel mean).

The pieces: :func:`gn_direction` (a GaussNewton's inner solve on the batch, on a copy),
:func:`loss_gradient`, :func:`optimizer_update` (any optimizer's next update from its own state, on a
copy), :func:`measure` (the numbers for given directions) and :func:`probe` (all of it); tables and the
heat map are the harness's (:mod:`gnopt.probe`). Definitions and an example: docs/probe.md.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from gnopt.optim.linearize import call, jvp, linearized_pass, model_autocast
from gnopt.optim.losses import OutputLoss
from gnopt.optim.partition import Partition, trainable_names
from gnopt.optim.problem import Batch, Dict

if TYPE_CHECKING:
    from gnopt.optim.gauss_newton import GaussNewton

__all__ = [
    "FULL",
    "GRADIENT",
    "LAYERWISE",
    "Measure",
    "ProbeResult",
    "gn_direction",
    "loss_gradient",
    "measure",
    "optimizer_update",
    "probe",
    "probe_partition",
]

#: The names :func:`probe` gives the reference directions and the negative gradient.
FULL = "full GN"
LAYERWISE = "layerwise GN"
GRADIENT = "-gradient"
#: The label of the whole-vector row next to the blocks' rows.
TOTAL = "total"


# ---------------------------------------------------------------------------------------------- partition
_LAYER = re.compile(r"(^|\.)(blocks|layers|layer|h)\.(\d+)\.")
_NORM = re.compile(r"norm|(^|[._])ln(_|\b|\d)", re.IGNORECASE)
_ATTN = re.compile(r"attn|attention", re.IGNORECASE)
_MLP = re.compile(r"mlp|ffn|feed_forward", re.IGNORECASE)


def probe_partition(model: nn.Module) -> Partition:
    """The probe's blocks, from parameter names: ``embedding`` (before the first layer), per layer k
    ``layer{k}.attn`` and ``layer{k}.mlp`` (and ``layer{k}`` for anything else in it), ``norms`` (every
    parameter whose name says norm, in or outside the layers), ``head`` (after the last layer).

    Layers are ``<prefix>.<blocks|layers|layer|h>.<k>.``: gnopt's LLaMA (``blocks.k.attn``,
    ``blocks.k.mlp``, ``blocks.k.attn_norm``, ...) and Hugging Face decoders (``layers.k.self_attn``,
    ``layers.k.mlp``, ``layers.k.input_layernorm``; GPT-2's ``h.k.attn``, ``h.k.ln_1``). A model without
    such layers gets one block per parameter tensor (labelled by its name); pass your own
    :class:`~gnopt.optim.partition.Partition` to :func:`measure` for anything else.
    """
    names = trainable_names(model)
    if not any(_LAYER.search(n) for n in names):
        return Partition(tuple((n,) for n in names), tuple(names)).validate(model)
    groups: dict[str, list[str]] = {}
    pre: list[str] = []
    post: list[str] = []
    norms: list[str] = []
    seen_layer = False
    for n in names:
        m = _LAYER.search(n)
        if _NORM.search(n):
            norms.append(n)
        elif m is None:
            (post if seen_layer else pre).append(n)
        else:
            seen_layer = True
            rest = n[m.end():]
            part = ".attn" if _ATTN.search(rest) else ".mlp" if _MLP.search(rest) else ""
            groups.setdefault(f"layer{m.group(3)}{part}", []).append(n)
    labelled = ([("embedding", pre)] if pre else []) + list(groups.items()) + (
        [("norms", norms)] if norms else []) + ([("head", post)] if post else [])
    return Partition(tuple(tuple(b) for _, b in labelled), tuple(lab for lab, _ in labelled)).validate(model)


def _partition(model: nn.Module, partition: Partition | str | None) -> Partition:
    if partition is None:
        return probe_partition(model)
    if partition == "tensor":
        names = trainable_names(model)
        return Partition(tuple((n,) for n in names), tuple(names)).validate(model)
    if isinstance(partition, Partition):
        return partition.validate(model)
    raise ValueError(f"partition must be None (the probe partition), 'tensor' or a Partition, "
                     f"got {partition!r}")


# ---------------------------------------------------------------------------------------------- directions
def _clone(obj: Any, memo: dict[int, Any]) -> Any:
    """``copy.deepcopy(obj, memo)``, keeping every attribute of a ``torch.optim.Optimizer``.

    torch's ``Optimizer.__getstate__`` keeps only ``defaults``, ``state`` and ``param_groups``: the other
    attributes (GaussNewton's model and blocks, a custom optimizer's own) are copied here too, except an
    instance ``step`` (a learning-rate scheduler's wrapper, which would step the original).
    """
    new = copy.deepcopy(obj, memo)
    if isinstance(obj, torch.optim.Optimizer):
        missing = {k: v for k, v in vars(obj).items() if k not in vars(new) and k != "step"}
        vars(new).update(copy.deepcopy(missing, memo))
    return new


def _check_batches(batches: Sequence[Batch]) -> list[Batch]:
    out = list(batches)
    if not out:
        raise ValueError("the probe needs at least one micro-batch")
    return out


def gn_direction(gn: GaussNewton, batches: Sequence[Batch]) -> Dict:
    """The GN direction d = θ̂ − θ_t that ``gn``'s next outer step would search along, on ``batches``.

    Runs :meth:`~gnopt.optim.gauss_newton.GaussNewton.inner_direction` (the inner solve alone: no line
    search, no update) on a deep copy of ``gn`` and its model, so both stay untouched; the copy starts from
    ``gn``'s own state (a warm-started θ̂ and the inner optimizers' state carry over as in a real step).
    ``batches`` are the inner loop's N = ``gn.inner_steps`` micro-batches (a CG solve uses all N).
    """
    batches = _check_batches(batches)
    if len(batches) != gn.inner_steps:
        raise ValueError(f"the GN direction needs inner_steps = {gn.inner_steps} micro-batches, "
                         f"got {len(batches)}")
    copied: GaussNewton = _clone(gn, {})
    return copied.inner_direction(iter(batches))


def loss_gradient(model: nn.Module, loss: OutputLoss, batches: Sequence[Batch], *,
                  autocast_dtype: torch.dtype | None = None) -> tuple[Dict, float]:
    """g = (1/N) Σ_i ∇L_i(θ) over the trainable parameters, and the mean loss (1/N) Σ_i L_i(θ)."""
    batches = _check_batches(batches)
    theta = _theta(model)
    names = list(theta)
    g = {n: torch.zeros_like(v) for n, v in theta.items()}
    total = 0.0
    with model_autocast(autocast_dtype):
        for x, y in batches:
            held: dict[str, Tensor] = {}

            def cot(z0: Tensor, u: Tensor | None, y: Tensor = y, held: dict[str, Tensor] = held) -> Tensor:
                loc = loss.local(z0, y)
                held["value"] = loc.value
                return loc.grad

            _, _, gb = linearized_pass(model, theta, x, tangent=None, wrt=names, cotangent=cot)
            total += float(held["value"])
            for n in names:
                g[n].add_(gb[n], alpha=1.0 / len(batches))
    return g, total / len(batches)


def optimizer_update(model: nn.Module, optimizer: Any, grad: Mapping[str, Tensor], *,
                     grad_clip: float | None = None) -> Dict:
    """An optimizer's next update d = θ_after − θ from its own state, given the gradient ``grad``.

    ``optimizer`` is a ``torch.optim.Optimizer`` over ``model``'s parameters (or anything with
    ``param_groups`` and ``step()``, e.g. gnopt's ``OptimizerChain``), or a sequence of them stepped in
    order (Muon on the hidden matrices and AdamW on the rest, say). On a deep copy of the model and the
    optimizers (the caller's are untouched): every trainable parameter's ``.grad`` is set to ``grad``
    (the probe batch's :func:`loss_gradient`), clipped to the global norm ``grad_clip`` if given (as a
    training step would), then each optimizer steps once. Optimizers whose ``step`` needs a closure
    (L-BFGS) are not supported.
    """
    optimizers = list(optimizer) if isinstance(optimizer, Sequence) else [optimizer]
    if not optimizers:
        raise ValueError("optimizer_update needs at least one optimizer")
    for opt in optimizers:
        if not hasattr(opt, "param_groups") or not callable(getattr(opt, "step", None)):
            raise TypeError(f"expected a torch.optim-style optimizer (param_groups and step()), got "
                            f"{type(opt).__name__}")
    memo: dict[int, Any] = {}
    m = copy.deepcopy(model, memo)
    opts = [_clone(opt, memo) for opt in optimizers]
    params = dict(m.named_parameters())
    own = {id(p) for p in params.values()}
    for opt in opts:
        if any(id(p) not in own for g in opt.param_groups for p in g["params"]):
            raise ValueError(f"{type(opt).__name__} steps tensors that are not the model's parameters")
    names = trainable_names(m)
    missing = [n for n in names if n not in grad]
    if missing:
        raise ValueError(f"grad has no entry for parameter {missing[0]!r}")
    before = {n: params[n].detach().clone() for n in names}
    for n, p in params.items():
        p.grad = grad[n].detach().clone().to(p.dtype) if n in before else None
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([params[n] for n in names], grad_clip)
    for opt in opts:
        opt.step()
    return {n: params[n].detach() - before[n] for n in names}


# ---------------------------------------------------------------------------------------------- measures
@dataclass(frozen=True)
class Measure:
    """One direction on the whole model (``total``) or restricted to one probe block (definitions: the
    module docstring). ``share`` divides ``gain`` by the full-GN direction's (total) or the layerwise-GN
    direction's (block)."""

    norm: float
    slope: float
    curvature: float
    gain: float
    share: float
    cos_full: float
    cos_layerwise: float

    @property
    def alpha_star(self) -> float:
        """The best step along d under the model, −gᵀd / dᵀGd (NaN when dᵀGd = 0)."""
        return -self.slope / self.curvature if self.curvature > 0 else math.nan


@dataclass(frozen=True)
class ProbeResult:
    """The probe's numbers: ``total[direction]`` and ``blocks[direction][label]``, the directions in the
    order given (``full`` and ``layerwise`` name the two references), the probe blocks in ``labels``,
    the mean loss at θ on the probe batch and its number of micro-batches."""

    directions: tuple[str, ...]
    labels: tuple[str, ...]
    total: dict[str, Measure]
    blocks: dict[str, dict[str, Measure]]
    full: str
    layerwise: str
    loss: float
    micro_batches: int

    def rows(self) -> list[dict[str, Any]]:
        """One row per direction and block (``block`` = ``"total"`` first): the table's content."""
        out: list[dict[str, Any]] = []
        for d in self.directions:
            for label, m in [(TOTAL, self.total[d]), *self.blocks[d].items()]:
                out.append({"direction": d, "block": label, **asdict(m), "alpha_star": m.alpha_star})
        return out


def gain(slope: float, curvature: float) -> float:
    """(gᵀd)² / dᵀGd: twice the model's best decrease along d (∞ when dᵀGd = 0 < |gᵀd|, 0 when both
    vanish)."""
    if curvature > 0:
        return slope * slope / curvature
    return math.inf if slope != 0 else 0.0


def _ratio(a: float, b: float) -> float:
    if b == 0 or not math.isfinite(b):
        return math.nan
    return a / b


def _dot(a: Dict, b: Dict, names: Sequence[str]) -> float:
    return float(sum(torch.vdot(a[n].reshape(-1).double(), b[n].reshape(-1).double()) for n in names))


def _cos(a: Dict, b: Dict, names: Sequence[str]) -> float:
    den = math.sqrt(_dot(a, a, names) * _dot(b, b, names))
    return _dot(a, b, names) / den if den > 0 else math.nan


def _theta(model: nn.Module) -> Dict:
    params = dict(model.named_parameters())
    return {n: params[n].detach() for n in trainable_names(model)}


def measure(
    model: nn.Module,
    loss: OutputLoss,
    batches: Sequence[Batch],
    directions: Mapping[str, Mapping[str, Tensor]],
    *,
    full: str = FULL,
    layerwise: str = LAYERWISE,
    partition: Partition | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> ProbeResult:
    """The probe's numbers for ``directions`` at the model's parameters θ on ``batches``.

    Args:
        model: the model at θ (not changed).
        loss: its output loss (H_z must be PSD, as for GaussNewton).
        batches: the probe batch, N micro-batches ``(inputs, targets)``; g and G are means over them.
        directions: name -> {parameter name: tensor} for every trainable parameter; ``full`` and
            ``layerwise`` must be among the names (they are the references of shares and cosines).
        partition: the probe blocks: ``None`` (:func:`probe_partition`), ``"tensor"`` (one block per
            parameter tensor) or a :class:`~gnopt.optim.partition.Partition`.
        autocast_dtype: run the model passes under ``model_autocast`` (``None``: in the model's dtype).
    """
    batches = _check_batches(batches)
    part = _partition(model, partition)
    theta = _theta(model)
    names = list(theta)
    for key in (full, layerwise):
        if key not in directions:
            raise ValueError(f"directions has no {key!r} direction (the reference of shares and cosines)")
    dirs: dict[str, Dict] = {}
    for key, d in directions.items():
        absent = [n for n in names if n not in d]
        if absent:
            raise ValueError(f"direction {key!r} has no entry for parameter {absent[0]!r}")
        for n in names:
            if tuple(d[n].shape) != tuple(theta[n].shape):
                raise ValueError(f"direction {key!r}: {n!r} has shape {tuple(d[n].shape)}, the parameter "
                                 f"{tuple(theta[n].shape)}")
        dirs[key] = {n: d[n].detach().to(theta[n].dtype) for n in names}
    blocks = list(zip(part.labels, part.blocks, strict=True))
    # sums over micro-batches of g_zᵀu and uᵀH_z u: [direction][block index], index len(blocks) = total
    slope = {k: [0.0] * (len(blocks) + 1) for k in dirs}
    curv = {k: [0.0] * (len(blocks) + 1) for k in dirs}
    with torch.no_grad(), model_autocast(autocast_dtype):
        loss_sum = 0.0
        for x, y in batches:
            loc = None
            for key, d in dirs.items():
                u_total: Tensor | None = None
                for k, (_, block) in enumerate(blocks):
                    if all(not bool(d[n].any()) for n in block):
                        continue  # d_b = 0: no slope, no curvature, no tangent
                    z0, u = jvp(model, theta, x, {n: d[n] for n in block})
                    if loc is None:
                        loc = loss.local(z0, y)
                        loss_sum += float(loc.value)
                    a, b = loc.directional(u)
                    slope[key][k] += float(a)
                    curv[key][k] += float(b)
                    u_total = u if u_total is None else u_total.add_(u)
                if u_total is not None:
                    assert loc is not None
                    a, b = loc.directional(u_total)
                    slope[key][-1] += float(a)
                    curv[key][-1] += float(b)
            if loc is None:  # every direction is zero: the loss alone
                loss_sum += float(loss.value(call(model, theta, x), y))
    n_mb = len(batches)
    totals: dict[str, Measure] = {}
    per_block: dict[str, dict[str, Measure]] = {}

    def one(key: str, k: int, names_b: Sequence[str], ref: str) -> Measure:
        s, c = slope[key][k] / n_mb, curv[key][k] / n_mb
        s_ref, c_ref = slope[ref][k] / n_mb, curv[ref][k] / n_mb
        d = dirs[key]
        return Measure(
            norm=math.sqrt(_dot(d, d, names_b)), slope=s, curvature=c, gain=gain(s, c),
            share=_ratio(gain(s, c), gain(s_ref, c_ref)),
            cos_full=_cos(d, dirs[full], names_b), cos_layerwise=_cos(d, dirs[layerwise], names_b),
        )

    for key in dirs:
        totals[key] = one(key, len(blocks), names, full)
        per_block[key] = {label: one(key, k, block, layerwise) for k, (label, block) in enumerate(blocks)}
    return ProbeResult(directions=tuple(dirs), labels=tuple(part.labels), total=totals, blocks=per_block,
                       full=full, layerwise=layerwise, loss=loss_sum / n_mb, micro_batches=n_mb)


def _check_same_point(model: nn.Module, other: nn.Module, what: str) -> None:
    mine, theirs = _theta(model), _theta(other)
    if list(mine) != list(theirs) or any(not torch.equal(mine[n], theirs[n]) for n in mine):
        raise ValueError(f"{what}'s model is not at the probe model's parameters (same names and values)")


def probe(
    model: nn.Module,
    loss: OutputLoss,
    batches: Sequence[Batch],
    *,
    full_gn: GaussNewton,
    layerwise_gn: GaussNewton,
    optimizers: Mapping[str, Any] | None = None,
    gradient: bool = True,
    grad_clip: float | None = None,
    partition: Partition | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> ProbeResult:
    """The whole probe at the model's parameters θ on the probe batch ``batches`` (N micro-batches).

    Directions, in this order: :data:`FULL` (``full_gn``'s :func:`gn_direction`), :data:`LAYERWISE`
    (``layerwise_gn``'s), each of ``optimizers`` (name -> optimizer or sequence of optimizers over
    ``model``'s parameters: its :func:`optimizer_update` with the probe batch's gradient, clipped to
    ``grad_clip``), and :data:`GRADIENT` (−g) when ``gradient``. Both GaussNewton optimizers must be bound
    to a model at the same parameters (``model`` itself, or a copy) and take N = ``len(batches)`` inner
    steps. Nothing passed in is changed. The numbers: :func:`measure`.
    """
    batches = _check_batches(batches)
    _check_same_point(model, full_gn.model, "full_gn")
    _check_same_point(model, layerwise_gn.model, "layerwise_gn")
    directions: dict[str, Dict] = {FULL: gn_direction(full_gn, batches),
                                   LAYERWISE: gn_direction(layerwise_gn, batches)}
    optimizers = dict(optimizers or {})
    for key in optimizers:
        if key in (FULL, LAYERWISE, GRADIENT):
            raise ValueError(f"optimizer name {key!r} is taken by a reference direction")
    if optimizers or gradient:
        g, _ = loss_gradient(model, loss, batches, autocast_dtype=autocast_dtype)
        for key, opt in optimizers.items():
            directions[key] = optimizer_update(model, opt, g, grad_clip=grad_clip)
        if gradient:
            directions[GRADIENT] = {n: -v for n, v in g.items()}
    return measure(model, loss, batches, directions, full=FULL, layerwise=LAYERWISE, partition=partition,
                   autocast_dtype=autocast_dtype)
