"""``dg.save`` / ``dg.load``: one entry point for every checkpoint dgconvert writes — a
:class:`~dgconvert.gating.network.GatedNetwork` (:mod:`~dgconvert.gating.checkpoint`) or a
:class:`~dgconvert.gating.gaternet.GaterNet`; both weights-only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dgconvert.gating import checkpoint
from dgconvert.gating.gaternet import GATERNET_FORMAT, GaterNet, load_gaternet, save_gaternet


def save(net: Any, path: str | Path, *, pickle: bool = False) -> Path:
    """Write ``net`` as a weights-only checkpoint (or a whole pickle with ``pickle=True``)."""
    if isinstance(net, GaterNet) and not pickle:
        return save_gaternet(net, path)
    return checkpoint.save(net, path, pickle=pickle)


def load(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """Load a gated network or a GaterNet saved by :func:`save` (safe), or a whole pickle
    of either if trusted."""
    obj = checkpoint._safe_load(path, trust_pickle)
    if isinstance(obj, GaterNet):
        return obj
    if isinstance(obj, dict) and obj.get("format") == GATERNET_FORMAT:
        return load_gaternet(obj, path)
    return checkpoint.from_object(obj, path)
