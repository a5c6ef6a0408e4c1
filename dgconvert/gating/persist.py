"""``dg.save`` / ``dg.load``: one entry point for every checkpoint dgconvert writes, whatever
the network's family (:mod:`dgconvert.gating.families`); all weights-only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dgconvert.core.io import atomic_write
from dgconvert.gating.families import family_of
from dgconvert.gating.families.base import load_network


def save(net: Any, path: str | Path, *, pickle: bool = False) -> Path:
    """Write ``net`` as a weights-only checkpoint (or a whole pickle with ``pickle=True``)."""
    if pickle:
        return atomic_write(path, lambda p: torch.save(net, p))
    state = family_of(net).to_checkpoint(net).to_dict()
    return atomic_write(path, lambda p: torch.save(state, p))


def load(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """Load a network saved by :func:`save` (safe), or a whole pickle of one if trusted."""
    return load_network(path, trust_pickle=trust_pickle)
