"""Reading checkpoints with ``torch.load(weights_only=True)``, and backbones.

A gated checkpoint records how to rebuild the network — an importable architecture
``module:callable`` with its keyword arguments, its family's config, input spec,
normalization, class names, thresholds — plus the weights; each network family writes and
reads its own (:mod:`dgconvert.gating.families`, :class:`~dgconvert.gating.families.base.
Checkpoint`). Nothing is unpickled. Whole pickled objects are accepted only with an
explicit ``trust_pickle=True`` (``--trust-pickle``): unpickling runs arbitrary code from
the file.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dgconvert.core.errors import CheckpointError

GATED_FORMAT = "dgconvert-gated"
BACKBONE_FORMAT = "dgconvert-backbone"
VERSION = 1


def resolve_factory(ref: str) -> Any:
    """Import ``"package.module:callable"``."""
    if not isinstance(ref, str) or ":" not in ref:
        raise CheckpointError(
            f"architecture reference {ref!r} is not of the form 'package.module:callable' "
            "(e.g. dgconvert.zoo:resnet)"
        )
    mod_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise CheckpointError(
            f"cannot import architecture {ref!r}: {exc}. Fix: install the package that "
            "defines it, or pass --arch module:callable naming an importable constructor."
        ) from exc
    if not callable(obj):
        raise CheckpointError(f"architecture {ref!r} is not callable")
    return obj


def build_arch(arch: dict[str, Any]) -> nn.Module:
    """Instantiate ``{"factory": "module:callable", "kwargs": {...}}``."""
    model = resolve_factory(arch["factory"])(**arch.get("kwargs", {}))
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{arch['factory']} returned {type(model).__name__}, not a Module")
    return model


def read_checkpoint(path: str | Path, trust_pickle: bool) -> Any:
    """The object in a checkpoint file, read weights-only (a whole pickle only when
    ``trust_pickle``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if not trust_pickle:
            if "weights_only" in str(exc) or "Unsupported global" in str(exc):
                raise CheckpointError(
                    f"{path} contains pickled Python objects, which can run arbitrary code "
                    "when loaded; refused. Expected a dgconvert checkpoint (dg.save) or a "
                    "state_dict. Fix: re-save it with dgconvert.save(net, path), or, only if "
                    "you trust the file's origin, pass --trust-pickle (trust_pickle=True)."
                ) from exc
            raise CheckpointError(
                f"cannot read {path} as a torch checkpoint: {exc}. The file may be corrupt "
                "or truncated; expected a file written by torch.save / dgconvert.save."
            ) from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path} even with --trust-pickle: {exc}") from exc


def load_state(module: nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """``module.load_state_dict(state)``, a mismatch as a :class:`CheckpointError`."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"weights in {path} do not fit {type(module).__name__}: {exc}. Expected the "
            "architecture the checkpoint names; fix --arch or its kwargs."
        ) from exc


def load_backbone(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_pickle: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a trained classifier: a dgconvert backbone checkpoint, a plain ``state_dict``
    plus ``arch`` (``module:callable``), or a whole pickled module (trusted only).

    Returns ``(model, info)`` where ``info`` carries ``arch``, ``input``, ``classes`` when known.
    """
    obj = read_checkpoint(path, trust_pickle)
    if isinstance(obj, nn.Module):
        return obj.eval(), {}
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}; expected a state_dict")
    info: dict[str, Any] = {}
    if obj.get("format") == BACKBONE_FORMAT:
        spec = obj["arch"]
        if arch:
            spec = {"factory": arch, "kwargs": arch_kwargs or {}}
        state = obj["state_dict"]
        info = {k: obj.get(k) for k in ("input", "classes", "metrics")}
    elif obj.get("format") == GATED_FORMAT:
        spec, state = obj["arch"], obj["backbone_state"]
        info = {"input": obj["input"], "classes": obj.get("classes")}
    else:
        if arch is None:
            raise CheckpointError(
                f"{path} is a plain state_dict; the architecture is needed to rebuild it. "
                "Fix: pass --arch module:callable (e.g. dgconvert.zoo:resnet, or "
                "torchvision.models:resnet18 when torchvision is installed)."
            )
        spec, state = {"factory": arch, "kwargs": arch_kwargs or {}}, obj
    model = build_arch(spec)
    load_state(model, state, path)
    info["arch"] = spec
    return model.eval(), info
