"""What a network family provides, and the registry of families.

A *family* is one kind of network dgconvert builds, saves, fits and exports (a backbone cut
into stages with gate heads, a converted multi-exit model, a GaterNet, …). Every network
records its family by name (``net.family``) and its typed config (``net.config``); code
that has to treat kinds differently asks the family (``family_of(net)``) instead of
testing types. Adding a family is one module with a :class:`Family` subclass and its
:func:`register_family` line in :mod:`dgconvert.gating.families`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import nn

from dgconvert.core.errors import CheckpointError
from dgconvert.core.gates import PRUNE_MULTIPLE
from dgconvert.core.manifest import GaterNetInfo
from dgconvert.gating.configs import NetworkConfig

#: The checkpoint layout version written; :data:`READABLE_VERSIONS` are read.
CHECKPOINT_VERSION = 1
READABLE_VERSIONS = (1,)


@dataclass
class Checkpoint:
    """A weights-only checkpoint, typed as the bundle manifest is: the family, its config,
    the weights (``name -> state_dict`` or list of them), thresholds and the fit record.

    On disk (``torch.save`` of :meth:`to_dict`, read with ``weights_only=True``) it is the
    version-1 layout earlier dgconvert versions wrote — ``format``, ``version``, ``arch``,
    ``num_classes``, ``input {shape, normalization}``, ``classes``, ``thresholds``, ``fit``,
    the family's own keys (``record``) and its weights at the top level — plus ``family``,
    which older files lack (:func:`checkpoint_family` then recognises them)."""

    format: str
    family: str
    config: NetworkConfig
    record: dict[str, Any]
    weights: dict[str, Any]
    thresholds: list[float] = field(default_factory=list)
    fit: dict[str, Any] | None = None
    version: int = CHECKPOINT_VERSION

    def to_dict(self) -> dict[str, Any]:
        cfg = self.config
        return {"format": self.format, "version": self.version, "family": self.family,
                "arch": cfg.arch, **self.record, "num_classes": cfg.num_classes,
                "input": {"shape": list(cfg.input_shape), "normalization": cfg.normalization},
                "classes": cfg.classes, "thresholds": list(self.thresholds), "fit": self.fit,
                **self.weights}

    @classmethod
    def parse(cls, obj: dict[str, Any], fam: Family, path: str | Path) -> Checkpoint:
        """Check the header and split ``obj`` into config, record and weights; a missing
        or mistyped entry raises :class:`CheckpointError` naming it."""
        if obj.get("version") not in READABLE_VERSIONS:
            raise CheckpointError(
                f"{path} has checkpoint version {obj.get('version')}; this dgconvert reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}. Fix: re-save it with this dgconvert "
                "version's dgconvert.save, or load it with the version that wrote it.")
        missing = [k for k in ("arch", "input", "num_classes", *fam.record_keys,
                               *fam.weight_keys) if k not in obj]
        spec = obj.get("input")
        if missing or not isinstance(spec, dict) or "shape" not in spec:
            raise CheckpointError(
                f"{path} is a {obj.get('format')!r} checkpoint of family {fam.name!r} without "
                f"{', '.join(missing) or 'input.shape'}; expected a file written by dg.save.")
        cfg = fam.Config.from_dict({**fam.config_fields(obj), "arch": obj["arch"],
                                    "input_shape": list(spec["shape"]),
                                    "normalization": spec.get("normalization"),
                                    "num_classes": obj["num_classes"],
                                    "classes": obj.get("classes")})
        return cls(str(obj["format"]), fam.name, cfg,
                   {k: obj[k] for k in fam.record_keys}, {k: obj[k] for k in fam.weight_keys},
                   [float(t) for t in obj.get("thresholds") or []], obj.get("fit"),
                   int(obj["version"]))


@dataclass
class Prune:
    """Prune before export: ``images`` (calibration inputs; filters whose gate is off for
    every one are removed), ``source`` (their name in the manifest), ``multiple`` (pruned
    layers keep a multiple of this many channels)."""

    images: np.ndarray
    source: str = ""
    multiple: int = PRUNE_MULTIPLE


#: ``near(net, x, tol) -> bool [N]``: rows whose prediction float noise may change (not
#: judged when a one-stage export is verified), beyond label ties
NearRows = Callable[[nn.Module, Any, float], np.ndarray]


@dataclass
class References:
    """What an export writes and what it is verified against.

    ``net``: the network exported (pruned, where the family prunes); ``stages``: one
    contract-shaped module per stage (:mod:`dgconvert.gating.stages`); ``full``: the model
    ``full.onnx`` holds; ``gate_specs``: each stage's gate spec (``None`` for the last);
    ``stage_flops`` / ``gate_flops`` / ``full_flops``: per-sample FLOPs; ``thresholds``: the
    initial thresholds. Verification: ``gated`` — the early-exit reference (``gated_forward``,
    stage by stage, the chain) — or, for a one-stage filter-gated model, ``masked`` — the
    model the (pruned) export must equal, ``near`` the rows float noise may flip there.
    ``record``: what the family found while preparing
    (read back by its :meth:`Family.manifest_record`)."""

    net: nn.Module
    stages: list[nn.Module]
    full: nn.Module
    gate_specs: list[dict[str, Any] | None]
    stage_flops: list[int]
    gate_flops: list[int]
    full_flops: int
    thresholds: list[float]
    gated: Any = None  # GatedNetwork
    masked: nn.Module | None = None
    near: NearRows | None = None
    record: Any = None  # what the family found preparing the export (manifest_record)


@dataclass
class ManifestRecord:
    """What a family adds to the bundle manifest: ``source`` entries and the optional
    ``gaternet`` record."""

    source: dict[str, Any] = field(default_factory=dict)
    gaternet: GaterNetInfo | None = None


class Family(abc.ABC):
    """One network family. Subclasses set :attr:`name`, :attr:`Config`, the checkpoint
    :attr:`format`, their own checkpoint keys (:attr:`record_keys`, :attr:`weight_keys`)
    and implement the methods below."""

    name: ClassVar[str]
    Config: ClassVar[type[NetworkConfig]]
    format: ClassVar[str]
    record_keys: ClassVar[tuple[str, ...]] = ()
    weight_keys: ClassVar[tuple[str, ...]] = ()
    #: can :meth:`fit` train one (``False``: converted as it is, e.g. multi-exit models)
    fittable: ClassVar[bool] = True
    #: does :meth:`references` take a :class:`Prune` (calibration images to prune with)
    prunes: ClassVar[bool] = False
    summary: ClassVar[str] = ""

    @abc.abstractmethod
    def build(self, cfg: Any, **parts: Any) -> nn.Module:
        """A network from its config (``parts``: modules given instead of built from
        ``cfg.arch``, e.g. a trained ``backbone``)."""

    # -- checkpoints -------------------------------------------------------------------
    @abc.abstractmethod
    def to_checkpoint(self, net: Any) -> Checkpoint:
        """The typed checkpoint of ``net`` (raises :class:`CheckpointError` when it cannot
        be rebuilt weights-only, saying how to fix that)."""

    @abc.abstractmethod
    def from_checkpoint(self, ckpt: Checkpoint, path: str | Path) -> nn.Module:
        """The network a checkpoint describes."""

    def config_fields(self, obj: dict[str, Any]) -> dict[str, Any]:
        """The config fields this family stores in its own checkpoint keys."""
        return {k: obj[k] for k in self.record_keys}

    def reads(self, obj: dict[str, Any]) -> bool:
        """Whether a checkpoint object without a ``family`` key (written before families
        had names) is this family's."""
        return obj.get("format") == self.format

    # -- export ------------------------------------------------------------------------
    @abc.abstractmethod
    def stage_modules(self, net: Any) -> list[nn.Module]:
        """One contract-shaped module per bundle stage (:mod:`dgconvert.gating.stages`)."""

    def describe_stage(self, net: Any, k: int) -> str:
        """Stage ``k`` of ``net`` in words, for export errors and logs."""
        return f"stage {k} of the {self.name} network"

    @abc.abstractmethod
    def references(self, net: Any, prune: Prune | None = None) -> References:
        """What to export and verify (``prune``: only for families that prune)."""

    def manifest_record(self, net: Any, refs: References) -> ManifestRecord:
        """What this family adds to the manifest (nothing by default)."""
        return ManifestRecord()

    # -- fitting -----------------------------------------------------------------------
    @abc.abstractmethod
    def fit(self, cfg: Any) -> Any:
        """Fit a network of this family (``cfg``: the family's fit options dataclass);
        returns its fit result (``.net``, ``.table()``, ``.as_dict()``)."""

    # -- helpers for subclasses --------------------------------------------------------
    def checkpoint(self, net: Any, record: dict[str, Any], weights: dict[str, Any],
                   thresholds: Sequence[float] = ()) -> Checkpoint:
        """``net``'s checkpoint: its config with the net's input spec and classes as they
        are now, the family's ``record`` keys, ``weights``, ``thresholds``, fit record."""
        cfg = replace(net.config, input_shape=list(net.input_shape), num_classes=net.num_classes,
                      normalization=net.normalization, classes=list(net.classes))
        return Checkpoint(self.format, self.name, cfg, record, weights,
                          [float(t) for t in thresholds], net.fit_record)

    def require_arch(self, net: Any, how: str, rebuildable: bool = True) -> dict[str, Any]:
        """The network's importable architecture, or a :class:`CheckpointError` saying
        how to record one (also when ``rebuildable`` is false: the network was not built
        from the architecture's module)."""
        arch = None if net.config is None else net.config.arch
        if arch is None or not rebuildable:
            raise CheckpointError(
                f"this {self.name} network has no importable architecture (it was not built "
                f"with {how}(..., arch={{'factory': 'module:callable', 'kwargs': {{...}}}})); "
                "a weights-only checkpoint could not rebuild it. Fix: pass arch=..., or save "
                "with pickle=True and load with trust_pickle=True.")
        return arch

    def no_prune(self, prune: Prune | None) -> None:
        """Refuse ``prune`` for a family that does not prune."""
        if prune is not None:
            raise ValueError(
                f"prune_images applies to a GaterNet; this is a {self.name} network (early "
                "exits only). Fix: drop prune_images (CLI --prune-data).")


class EarlyExitFamily(Family):
    """A family of :class:`~dgconvert.gating.network.GatedNetwork` s (stages with an exit
    after each but the last): exported stage by stage as they are and verified against
    their own ``gated_forward``."""

    def stage_modules(self, net: Any) -> list[nn.Module]:
        from dgconvert.gating.stages import stage_modules

        return stage_modules(net)

    def describe_stage(self, net: Any, k: int) -> str:
        from dgconvert.gating.stages import describe_stage

        return describe_stage(net, k)

    def references(self, net: Any, prune: Prune | None = None) -> References:
        import torch

        from dgconvert.gating.flops import count_flops, stage_flops

        self.no_prune(prune)
        net.eval()
        bodies, gates = stage_flops(net)
        return References(
            net, self.stage_modules(net), net, [g.spec() for g in net.gates] + [None], bodies,
            gates, count_flops(net, torch.zeros(1, *net.input_shape)), list(net.thresholds),
            gated=net)


_FAMILIES: dict[str, Family] = {}


def register_family(fam: Family) -> Family:
    """Add ``fam`` to the registry under ``fam.name`` (a name is registered once)."""
    if fam.name in _FAMILIES and type(_FAMILIES[fam.name]) is not type(fam):
        raise ValueError(f"network family {fam.name!r} is registered already "
                         f"({type(_FAMILIES[fam.name]).__name__})")
    _FAMILIES[fam.name] = fam
    return fam


def family(name: str) -> Family:
    """The registered family called ``name``."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"network family {name!r} is unknown; expected one of "
                         f"{', '.join(family_names())}") from None


def family_names(*, fittable: bool | None = None) -> list[str]:
    """The registered family names (``fittable``: only those that can / cannot be fitted)."""
    return [n for n, f in _FAMILIES.items() if fittable is None or f.fittable == fittable]


def family_of(net: Any) -> Family:
    """The family of a network (its ``family`` attribute)."""
    name = getattr(net, "family", None)
    if not isinstance(name, str):
        raise TypeError(f"got a {type(net).__name__}; expected a dgconvert network "
                        "(GatedNetwork or GaterNet) recording its family")
    return family(name)


def load_network(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """The network a checkpoint file holds, whatever its family (``dg.load``)."""
    from dgconvert.gating.checkpoint import read_checkpoint

    obj = read_checkpoint(path, trust_pickle)
    if isinstance(obj, nn.Module) and isinstance(getattr(obj, "family", None), str):
        return obj
    if not isinstance(obj, dict):
        obj = {"format": type(obj).__name__}
    fam = checkpoint_family(obj, path)
    return fam.from_checkpoint(Checkpoint.parse(obj, fam, path), path)


def checkpoint_family(obj: dict[str, Any], path: str | Path) -> Family:
    """The family a loaded checkpoint object belongs to (its ``family`` key, or for older
    files the family that recognises it)."""
    name = obj.get("family")
    if isinstance(name, str):
        return family(name)
    for fam in _FAMILIES.values():
        if fam.reads(obj):
            return fam
    known = sorted({f.format for f in _FAMILIES.values()})
    raise CheckpointError(
        f"{path} is not a gated-network checkpoint (format {obj.get('format')!r}); expected "
        f"one of {', '.join(map(repr, known))}. Fix: a backbone checkpoint needs gates first: "
        "`dgconvert gates fit BACKBONE.pt ...`.")
