"""The precisions Muon's Newton–Schulz iteration runs in (torch-free: the harness's config validates
against this list; :mod:`gnopt.optim.muon` is the optimizer)."""

from __future__ import annotations

#: ``ns_precision`` value -> the name of the torch dtype the iteration runs in.
NS_PRECISIONS: dict[str, str] = {"bf16": "bfloat16", "fp32": "float32"}
#: ``torch.optim.Muon``'s own: the precision of every Muon run recorded before the option existed.
TORCH_NS_PRECISION = "bf16"
