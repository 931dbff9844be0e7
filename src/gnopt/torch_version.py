"""The torch versions gnopt supports, checked at run time with one clear message.

The lower bound is the first torch with every API gnopt uses: ``torch.optim.Muon`` (with
``adjust_lr_fn``) shipped in torch 2.9; the others are older (``torch.nn.utils.get_total_norm`` /
``clip_grads_with_norm_``: 2.6, ``F.rms_norm`` and ``torch.amp.is_autocast_available``: 2.4,
``torch.nn.attention.sdpa_kernel``: 2.3, ``torch.func`` and forward-mode AD: 2.0). The upper bound in
``pyproject.toml`` is the newest minor version tested (README, "Supported torch versions").
"""

from __future__ import annotations

import re

from gnopt.errors import GnoptError

#: Oldest supported torch (major, minor).
MIN_TORCH: tuple[int, int] = (2, 9)


def parse(version: str) -> tuple[int, int]:
    """``"2.13.0+cpu"`` -> ``(2, 13)``."""
    m = re.match(r"(\d+)\.(\d+)", str(version))
    if m is None:
        raise GnoptError(f"cannot read the torch version {version!r}")
    return int(m.group(1)), int(m.group(2))


def check(version: str | None = None) -> None:
    """A :class:`GnoptError` if ``version`` (default: the installed torch) is older than :data:`MIN_TORCH`."""
    if version is None:
        import torch

        version = str(torch.__version__)
    if parse(version) < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise GnoptError(
            f"gnopt needs torch >= {need} (torch.optim.Muon first shipped in torch {need}); this is torch "
            f"{version}: install a newer torch (pip install 'torch>={need}')."
        )
