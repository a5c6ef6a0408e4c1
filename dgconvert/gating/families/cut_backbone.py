"""``cut-backbone``: a trained classifier cut after named modules, a gate head after each
(:meth:`GatedNetwork.from_backbone`; fitted by :func:`dgconvert.gating.fit.fit_gates`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from dgconvert.gating.checkpoint import GATED_FORMAT, build_arch, load_state
from dgconvert.gating.configs import CutBackboneConfig
from dgconvert.gating.families.base import Checkpoint, EarlyExitFamily
from dgconvert.gating.fit import FitConfig, FitResult, fit_gates
from dgconvert.gating.network import GatedNetwork

Config = CutBackboneConfig


class CutBackbone(EarlyExitFamily):
    name = "cut-backbone"
    Config = CutBackboneConfig
    format = GATED_FORMAT
    record_keys = ("cuts", "gates")
    weight_keys = ("backbone_state", "gates_state")
    summary = "a trained classifier cut into stages, a fitted gate head after each"

    def build(self, cfg: CutBackboneConfig, *, backbone: nn.Module | None = None,
              **parts: Any) -> GatedNetwork:
        model = backbone if backbone is not None else build_arch(self.arch_of(cfg)).eval()
        return GatedNetwork.from_backbone(
            model, cfg.cuts, gate=cfg.gates, num_classes=cfg.num_classes,
            input_shape=cfg.input_shape, normalization=cfg.normalization, classes=cfg.classes,
            arch=cfg.arch, shares=cfg.shares, layout=cfg.layout, token_pool=cfg.token_pool)

    def arch_of(self, cfg: Any) -> dict[str, Any]:
        if cfg.arch is None:
            raise ValueError(f"a {self.name} config without arch needs backbone=...")
        return cfg.arch

    def reads(self, obj: dict[str, Any]) -> bool:
        return obj.get("format") == self.format and not obj.get("multi_exit")

    def config_fields(self, obj: dict[str, Any]) -> dict[str, Any]:
        keep = ("type", "score", "layout", "pool")  # the rest of a spec is derived
        return {"cuts": list(obj["cuts"]),
                "gates": [{k: v for k, v in g.items() if k in keep} for g in obj["gates"]]}

    def to_checkpoint(self, net: GatedNetwork) -> Checkpoint:
        self.require_arch(net, "GatedNetwork.from_backbone", net.backbone is not None)
        return self.checkpoint(
            net, {"cuts": list(net.cuts), "gates": [g.spec() for g in net.gates]},
            {"backbone_state": net.backbone.state_dict(),  # type: ignore[union-attr]
             "gates_state": [g.state_dict() for g in net.gates]}, net.thresholds)

    def from_checkpoint(self, ckpt: Checkpoint, path: str | Path) -> GatedNetwork:
        backbone = build_arch(self.arch_of(ckpt.config))
        load_state(backbone, ckpt.weights["backbone_state"], path)
        net = self.build(ckpt.config, backbone=backbone.eval())
        for g, s in zip(net.gates, ckpt.weights["gates_state"], strict=True):
            load_state(g, s, path)
        net.thresholds = list(ckpt.thresholds)
        net.fit_record = ckpt.fit
        return net

    def fit(self, cfg: FitConfig) -> FitResult:
        return fit_gates(cfg)
