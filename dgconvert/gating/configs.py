"""The typed record every network carries: ``net.family`` names the family that built it
(:mod:`dgconvert.gating.families`) and ``net.config`` is that family's ``Config`` — what
``build(config)`` takes and what a checkpoint stores to rebuild the network.

The four families that existed before the registry keep their configs here, below the
builders that fill them (``GatedNetwork.from_backbone`` / ``from_multi_exit``,
``GaterNet.build``, ``gaternet_exits``), so that those stay public entry points without an
import cycle; a new family defines its ``Config`` in its own module. Torch-free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from dgconvert.core.gates import DEFAULT_EXIT_SCORE, DEFAULT_GATE

C = TypeVar("C", bound="NetworkConfig")


@dataclass(kw_only=True)
class NetworkConfig:
    """What every family's config holds: the input spec, the classes and the importable
    backbone architecture (``{"factory": "module:callable", "kwargs": {...}}``; without it a
    network cannot be saved weights-only)."""

    input_shape: list[int] = field(default_factory=list)
    num_classes: int | None = None
    normalization: dict[str, Any] | None = None
    classes: list[str] | None = None
    arch: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able record."""
        return asdict(self)

    @classmethod
    def from_dict(cls: type[C], obj: dict[str, Any]) -> C:
        """The config a :meth:`to_dict` record describes (unknown keys ignored)."""
        return cls(**{f.name: obj[f.name] for f in fields(cls) if f.name in obj})


@dataclass(kw_only=True)
class CutBackboneConfig(NetworkConfig):
    """``cut-backbone``: a classifier cut after ``cuts`` with a gate head after each.

    ``cuts``: module names, or an int K (K automatic cut points at about equal FLOPs shares,
    or at the cumulative ``shares``); ``gates``: one spec for all gates or one per cut
    (``{"type", "score", "layout", "pool"}``); ``layout`` / ``token_pool``: defaults for the
    specs. Once built, ``cuts`` are names and ``gates`` one full spec per cut."""

    cuts: list[str] | int = field(default_factory=lambda: ["layer1", "layer2", "layer3"])
    gates: str | dict[str, Any] | list[str | dict[str, Any]] = DEFAULT_GATE
    shares: list[float] | None = None
    layout: str | list[str | None] | None = None
    token_pool: str | None = None


@dataclass(kw_only=True)
class MultiExitConfig(NetworkConfig):
    """``multi-exit``: a multi-exit model trained elsewhere, converted as it is: ``exits``
    names its exit-head modules in execution order, ``score`` the exit score rule;
    ``outputs`` (found when built) is each exit's index in the model's output list, the final
    classifier's last."""

    exits: list[str] = field(default_factory=list)
    score: str = DEFAULT_EXIT_SCORE
    outputs: list[int] = field(default_factory=list)

    def source(self, model: Any) -> dict[str, Any]:
        """The bundle manifest's ``source.multi_exit`` record."""
        return {"model": None if model is None else type(model).__name__,
                "exits": list(self.exits), "score": self.score}


@dataclass(kw_only=True)
class GaterNetConfig(NetworkConfig):
    """``gaternet``: a gater network that switches the filters of the backbone's ``gated``
    layers per sample (default: the first convolution block of every residual block);
    ``gater``: its ``{"factory", "kwargs"}`` (default: a narrow zoo ResNet) and its
    ``bottleneck`` width."""

    gated: list[str] | None = None
    gater: dict[str, Any] | None = None
    bottleneck: int = 8


@dataclass(kw_only=True)
class GaterNetExitsConfig(NetworkConfig):
    """``gaternet-exits``: a (possibly pruned) GaterNet run in stages cut after ``cuts``,
    with a ``gate`` head (``score``: its exit score) after each. ``gaternet`` records the
    GaterNet's own config and ``pruned`` how it was pruned (``GaterNet.pruned``: the gates
    asked off and the channel multiple; ``None``: not pruned); ``gated`` /
    ``num_filter_gates`` what it gates."""

    cuts: list[str] = field(default_factory=lambda: ["layer1", "layer2", "layer3"])
    gate: str = DEFAULT_GATE
    score: str | None = None
    gaternet: GaterNetConfig | None = None
    pruned: dict[str, Any] | None = None
    gated: list[str] = field(default_factory=list)
    num_filter_gates: int = 0

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> GaterNetExitsConfig:
        cfg = super().from_dict(obj)
        if isinstance(cfg.gaternet, dict):
            cfg.gaternet = GaterNetConfig.from_dict(cfg.gaternet)
        return cfg
