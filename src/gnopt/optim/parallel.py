"""The data-parallel mean of a Gauss-Newton step: every process feeds its shard of each micro-batch, and
inner gradients, GN-vector products, losses and line-search losses are averaged over the processes with
the caller's ``all_reduce_mean`` (one collective call per quantity group), so every process takes identical
steps."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Dict = dict[str, Tensor]


class ProcessMean:
    """Averages over data-parallel processes; the identity when ``all_reduce_mean`` is ``None``.

    ``all_reduce_mean`` returns the mean of a tensor over all processes (it may work in place; its result
    is used). ``device`` gives the device scalars travel on (the model's).
    """

    def __init__(self, all_reduce_mean: Callable[[Tensor], Tensor] | None,
                 device: Callable[[], torch.device]) -> None:
        self.all_reduce_mean = all_reduce_mean
        self._device = device

    def tensors(self, d: Dict) -> Dict:
        """Average a dict of tensors over the processes (one collective call)."""
        if self.all_reduce_mean is None or not d:
            return d
        names = list(d)
        flat = self.all_reduce_mean(torch.cat([d[n].reshape(-1) for n in names]))
        out: Dict = {}
        offset = 0
        for n in names:
            k = d[n].numel()
            out[n] = flat[offset:offset + k].view_as(d[n])
            offset += k
        return out

    def scalars(self, *values: Tensor | float) -> list[float]:
        """Python floats of ``values``, averaged over the processes (one collective call)."""
        vec = torch.stack([torch.as_tensor(v, dtype=torch.float64).reshape(()).cpu() for v in values])
        if self.all_reduce_mean is not None:
            vec = self.all_reduce_mean(vec.to(self._device())).cpu()
        return vec.tolist()
