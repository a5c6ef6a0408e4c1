"""Checkpoints that load with ``torch.load(weights_only=True)``.

A gated checkpoint records how to rebuild the network — an importable architecture
``module:callable`` with its keyword arguments, the cut points, gate specs, input spec,
normalization, class names, thresholds — plus the weights. Nothing is unpickled.
Whole pickled objects are accepted only with an explicit ``trust_pickle=True``
(``--trust-pickle``): unpickling runs arbitrary code from the file.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dgconvert.core.errors import CheckpointError
from dgconvert.core.io import atomic_write
from dgconvert.gating.network import GatedNetwork

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


def _safe_load(path: str | Path, trust_pickle: bool) -> Any:
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


def save(net: GatedNetwork, path: str | Path, *, pickle: bool = False) -> Path:
    """Write ``net`` as a weights-only checkpoint (or a whole pickle with ``pickle=True``)."""
    if pickle:
        return atomic_write(path, lambda p: torch.save(net, p))
    arch, backbone = net.meta.get("arch"), net.backbone
    if arch is None or backbone is None:
        how = "from_multi_exit" if net.meta.get("multi_exit") else "from_backbone"
        raise CheckpointError(
            f"this GatedNetwork has no importable architecture (it was not built with "
            f"GatedNetwork.{how}(..., arch={{'factory': 'module:callable', 'kwargs': {{...}}}})); "
            "a weights-only checkpoint could not rebuild it. Fix: pass arch=..., or save with "
            "pickle=True and load with trust_pickle=True."
        )
    if net.meta.get("multi_exit"):
        return _save_multi_exit(net, backbone, arch, path)
    state = {
        "format": GATED_FORMAT,
        "version": VERSION,
        "arch": arch,
        "cuts": list(net.meta["cuts"]),
        "gates": [g.spec() for g in net.gates],
        "num_classes": net.num_classes,
        "input": {"shape": net.input_shape, "normalization": net.normalization},
        "classes": net.classes,
        "thresholds": net.thresholds,
        "fit": net.meta.get("fit"),
        "backbone_state": backbone.state_dict(),
        "gates_state": [g.state_dict() for g in net.gates],
    }
    return atomic_write(path, lambda p: torch.save(state, p))


def load(path: str | Path, *, trust_pickle: bool = False) -> GatedNetwork:
    """Load a gated network saved by :func:`save` (safe), or a whole pickle if trusted."""
    return from_object(_safe_load(path, trust_pickle), path)


def from_object(obj: Any, path: str | Path) -> GatedNetwork:
    """The gated network a loaded checkpoint object describes (see :func:`load`)."""
    if isinstance(obj, GatedNetwork):
        return obj
    if not isinstance(obj, dict) or obj.get("format") != GATED_FORMAT:
        got = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path} is not a gated-network checkpoint (format {got!r}); expected "
            f"{GATED_FORMAT!r}. Fix: a backbone checkpoint needs gates first: "
            "`dgconvert gates fit BACKBONE.pt ...`."
        )
    if obj.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {obj.get('version')}; this dgconvert reads {VERSION}"
        )
    backbone = build_arch(obj["arch"])
    load_state(backbone, obj["backbone_state"], path)
    backbone.eval()
    spec = obj["input"]
    if obj.get("multi_exit"):
        info = obj["multi_exit"]
        net = GatedNetwork.from_multi_exit(
            backbone, info["exits"], info["score"], input_shape=spec["shape"],
            normalization=spec.get("normalization"), classes=obj.get("classes"),
            arch=obj["arch"],
        )
        net.thresholds = [float(t) for t in obj["thresholds"]]
        return net
    net = GatedNetwork.from_backbone(
        backbone,
        obj["cuts"],
        gate=[{k: v for k, v in g.items() if k in ("type", "score", "layout", "pool")}
              for g in obj["gates"]],
        num_classes=obj["num_classes"],
        input_shape=spec["shape"],
        normalization=spec.get("normalization"),
        classes=obj.get("classes"),
        arch=obj["arch"],
    )
    for g, s in zip(net.gates, obj["gates_state"], strict=True):
        load_state(g, s, path)
    net.thresholds = [float(t) for t in obj["thresholds"]]
    if obj.get("fit"):
        net.meta["fit"] = obj["fit"]
    return net


def _save_multi_exit(net: GatedNetwork, model: nn.Module, arch: dict[str, Any],
                     path: str | Path) -> Path:
    """A converted multi-exit model: its arch, exit names and score, and its own weights
    (the exit heads are part of the model); :func:`load` rebuilds it with
    :meth:`GatedNetwork.from_multi_exit`."""
    info = net.meta["multi_exit"]
    state = {
        "format": GATED_FORMAT,
        "version": VERSION,
        "arch": arch,
        "multi_exit": {"exits": list(info["exits"]), "score": info["score"]},
        "num_classes": net.num_classes,
        "input": {"shape": net.input_shape, "normalization": net.normalization},
        "classes": net.classes,
        "thresholds": net.thresholds,
        "backbone_state": model.state_dict(),
    }
    return atomic_write(path, lambda p: torch.save(state, p))


def load_state(module: nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """``module.load_state_dict(state)``; a :class:`CheckpointError` naming ``path`` if the
    weights do not fit."""
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
    obj = _safe_load(path, trust_pickle)
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
