"""dgconvert: deploy early-exit (decision-gated) networks with real savings.

The top-level names are imported lazily so that ``import dgconvert`` (and the torch-free
:mod:`dgconvert.runtime`) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from dgconvert.core.version import __version__

_LAZY = {
    "GatedNetwork": "dgconvert.gating.network",
    "save": "dgconvert.gating.persist",
    "load": "dgconvert.gating.persist",
    "load_backbone": "dgconvert.gating.checkpoint",
    "export": "dgconvert.convert.export",
    "fit_gates": "dgconvert.gating.fit",
    "Bundle": "dgconvert.core.bundle",
    "GatedResult": "dgconvert.core.exits",
    "GatedRunner": "dgconvert.runtime.runner",
    "load_dataset": "dgconvert.data",
}

__all__ = ["__version__", *_LAZY, "runtime"]


def __getattr__(name: str) -> Any:
    if name == "runtime":
        return importlib.import_module("dgconvert.runtime")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dgconvert' has no attribute {name!r}")
