"""gnopt: Gauss-Newton training of language models in PyTorch.

Importing ``gnopt`` is cheap (no torch import): the public names below are loaded on first access.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it (resolved lazily by ``__getattr__``).
_LAZY: dict[str, str] = {
    "GnoptError": "gnopt.errors",
    "TrainConfig": "gnopt.config",
    "build_model": "gnopt.model",
    "PRESETS": "gnopt.model",
    "build_stepper": "gnopt.steppers",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gnopt' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
