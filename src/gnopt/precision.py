"""``--precision``: what ``fp32`` and ``bf16-mixed`` mean for a training run (harness side).

``bf16-mixed`` is mixed precision in the usual sense, for every optimizer:

* the model's passes run under ``torch.autocast(dtype=torch.bfloat16)``: baselines' forward (and so the
  backward), evaluation, and every pass of Gauss-Newton (primal, forward-mode tangent, pullback, line
  search: :class:`gnopt.optim.GaussNewton` takes ``autocast_dtype`` itself, see
  :mod:`gnopt.optim.linearize`);
* the weights stay float32 (master weights), and so do optimizer and inner-loop states;
* logits are cast to float32 before the loss, so the loss, the logit gradient and the logit
  Hessian-vector products of GN are float32.

TF32: with ``bf16-mixed`` on CUDA the float32 matmuls that remain outside autocast (optimizer-side ones:
Shampoo/SOAP preconditioners, Muon's orthogonalisation where it is not bf16 already) may use TF32
(``torch.set_float32_matmul_precision("high")``): they feed an update that the model's bf16 passes already
perturb more. ``fp32`` keeps TF32 off: it is the reference precision, and GN's line search and model
decrease ρ compare losses that differ in their fourth digit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from gnopt.errors import GnoptError

if TYPE_CHECKING:
    import torch

#: ``--precision`` -> the torch dtype its autocast runs in, by name (``None``: no autocast). The one list
#: of precisions (the config validates against it); importing it does not import torch. ``fp32``: every
#: pass in float32; ``bf16-mixed``: bf16 autocast for the model's passes, float32 weights, optimizer
#: states and losses.
PRECISIONS: dict[str, str | None] = {"fp32": None, "bf16-mixed": "bfloat16"}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (``None``: no autocast). The harness converts once per run:
    :func:`gnopt.steppers.build_stepper` hands it to the stepper, and evaluation reads it there."""
    import torch

    try:
        name = PRECISIONS[precision]
    except KeyError:
        raise GnoptError(
            f"unknown precision {precision!r}; valid precisions: {', '.join(PRECISIONS)}."
        ) from None
    return None if name is None else getattr(torch, name)


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 autocast natively (CUDA: compute capability 8.0+, Ampere or newer)."""
    import torch

    if not torch.amp.is_autocast_available(device.type):
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu"


def check_supported(precision: str, device: torch.device) -> None:
    """A :class:`GnoptError` when ``device`` cannot run ``precision`` (checked before anything is written)."""
    import torch

    if autocast_dtype(precision) is not None and not bf16_supported(device):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise GnoptError(
            f"--precision {precision} needs bf16 support, which device {device} ({name}) lacks; "
            "use --precision fp32."
        )


@contextlib.contextmanager
def matmul_precision(precision: str, device: torch.device) -> Iterator[None]:
    """TF32 for float32 matmuls on CUDA under ``bf16-mixed`` (see the module docstring); restored after."""
    if device.type != "cuda" or autocast_dtype(precision) is None:
        yield
        return
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively, as oneDNN (torch's CPU matmul backend) sees it:
    ``avx512_bf16`` or ``amx_bf16``, and not restricted away with ``ONEDNN_MAX_CPU_ISA``."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def default_muon_ns_precision(device: str) -> str:
    """The Newton-Schulz precision of a Muon run that names none (``--device`` ``device``): ``bf16`` on
    CUDA, where tensor cores multiply bf16 fastest, and ``fp32`` on a CPU (docs/hardware.md).

    The value is resolved once, when the run is configured, and recorded in its config: a run resumed on
    another machine keeps it (:func:`gnopt.config.with_recorded_defaults`)."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "bf16" if device == "cuda" else "fp32"
