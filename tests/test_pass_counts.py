"""Every GN variant's recorded ``passes`` equals the model passes it runs, counted as they run.

:class:`Counting` wraps the model: its ``forward`` (reached by every ``functional_call``: primal forwards,
forward-mode JVPs through dual tensors) counts one forward, a tangent pass when its output carries a
forward-mode tangent, and hooks the output so that every pullback through it counts one backward. For the
one-pass tangent forward of gnopt's LLaMA (which bypasses ``forward``) it exposes ``forward_with_tangent``
and counts that call as a forward plus a tangent. The convention (:mod:`gnopt.optim.record`): a forward is
1/3 of a pass, a tangent 2/3, a backward 2/3.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from gnopt.model import build_model
from gnopt.optim import CG, GaussNewton, LineSearch, SoftmaxCrossEntropy, TorchOptimizer
from gnopt.optim.linearize import has_tangent_forward
from gnopt.optim.record import BWD, FWD, TANGENT

PREFIX = "inner."


class Counting(nn.Module):
    """``inner`` with its forward, tangent and backward passes counted in :attr:`counts`."""

    def __init__(self, inner: nn.Module, *, one_pass_tangent: bool) -> None:
        super().__init__()
        self.inner = inner
        self.counts: Counter[str] = Counter()
        self.one_pass_tangent = one_pass_tangent

    def _out(self, z: Tensor) -> Tensor:
        self.counts["forward"] += 1
        if z.requires_grad:
            z.register_hook(self._backward)
        return z

    def _backward(self, g: Tensor) -> None:
        self.counts["backward"] += 1

    def forward(self, x: Tensor) -> Tensor:
        z = self.inner(x)
        if fwAD.unpack_dual(z).tangent is not None:
            self.counts["tangent"] += 1
        return self._out(z)

    def forward_with_tangent_applies(self) -> bool:
        return self.one_pass_tangent and has_tangent_forward(self.inner)

    def forward_with_tangent(self, params: dict[str, Tensor], x: Tensor, tangent: dict[str, Tensor]
                             ) -> tuple[Tensor, Tensor]:
        strip = {n.removeprefix(PREFIX): v for n, v in params.items()}
        tan = {n.removeprefix(PREFIX): v for n, v in tangent.items()}
        z, u = self.inner.forward_with_tangent(strip, x, tan)
        self.counts["tangent"] += 1
        return self._out(z), u

    def block_partition(self) -> list[list[str]]:
        return [[PREFIX + n for n in b] for b in self.inner.block_partition()]

    def passes(self) -> float:
        c = self.counts
        return c["forward"] * FWD + c["tangent"] * TANGENT + c["backward"] * BWD


def _batches(n: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 40, (2, 12), generator=gen), torch.randint(0, 40, (2, 12), generator=gen))
            for _ in range(n)]


def _sgd() -> TorchOptimizer:
    return TorchOptimizer(lambda ps: torch.optim.SGD(ps, lr=0.3))


#: name -> GaussNewton options (every variant; both line searches; warm scaling; both tangent paths).
VARIANTS: dict[str, dict[str, Any]] = {
    "full-model-ls": dict(inner=_sgd()),
    "full-grid-ls": dict(inner=_sgd(), line_search=LineSearch(kind="grid", num_batches=1, ls_range=3)),
    "full-grid-ls-model-decrease": dict(inner=_sgd(), line_search=LineSearch(
        kind="grid", num_batches=1, ls_range=3, model_decrease=True)),
    "full-warm-scale": dict(inner=_sgd(), warm_scale=True),
    "layerwise": dict(inner=_sgd(), partition="transformer"),
    "layerwise-grid-ls": dict(inner=_sgd(), partition="transformer",
                              line_search=LineSearch(kind="grid", num_batches=1, ls_range=3)),
    "prox-linear": dict(inner=_sgd(), mode="prox_linear"),
    "prox-linear-grid-ls": dict(inner=_sgd(), mode="prox_linear", line_search=LineSearch(
        kind="grid", num_batches=1, ls_range=3, model_decrease=True)),
    "cg": dict(inner=CG(max_iters=3)),
    "cg-grid-ls": dict(inner=CG(max_iters=3), line_search=LineSearch(kind="grid", num_batches=1, ls_range=3)),
    "layerwise-cg": dict(inner=CG(max_iters=2), partition="transformer"),
}


@pytest.mark.parametrize("one_pass_tangent", [False, True], ids=["generic-jvp", "one-pass-tangent"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_recorded_passes_equal_the_counted_model_passes(name: str, one_pass_tangent: bool) -> None:
    torch.manual_seed(0)
    inner = build_model("tiny", vocab_size=40, seq_len=12, dtype=torch.float64)
    model = Counting(inner, one_pass_tangent=one_pass_tangent)
    assert has_tangent_forward(model) == one_pass_tangent
    gn = GaussNewton(model, SoftmaxCrossEntropy(), inner_steps=2, inner_clip=None, **VARIANTS[name])
    batches = iter(_batches(40))
    for t in range(3):  # step 0 starts at θ_t (no tangent); later steps carry the inner iterate
        model.counts.clear()
        rec = gn.step(batches)
        assert model.counts["forward"] > 0
        assert rec.passes == pytest.approx(model.passes(), rel=1e-12, abs=1e-12), (t, dict(model.counts))
    assert model.counts["tangent"] > 0  # the last step did run tangent passes
