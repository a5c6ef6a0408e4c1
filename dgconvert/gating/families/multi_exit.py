"""``multi-exit``: a multi-exit model trained elsewhere (SDN, BranchyNet, MSDNet, EENets),
converted as it is (:meth:`GatedNetwork.from_multi_exit`); its own exit heads are the gates,
so there is nothing to fit. Exports are verified against the model's own exit rule too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from dgconvert.gating.checkpoint import GATED_FORMAT, build_arch, load_state
from dgconvert.gating.configs import MultiExitConfig
from dgconvert.gating.families.base import Checkpoint, EarlyExitFamily, ManifestRecord, References
from dgconvert.gating.fit import FitError
from dgconvert.gating.network import GatedNetwork

Config = MultiExitConfig


class MultiExit(EarlyExitFamily):
    name = "multi-exit"
    Config = MultiExitConfig
    format = GATED_FORMAT
    record_keys = ("multi_exit",)
    weight_keys = ("backbone_state",)
    fittable = False
    summary = "a multi-exit model trained elsewhere, its own exit heads as the gates"

    def build(self, cfg: MultiExitConfig, *, model: nn.Module | None = None,
              **parts: Any) -> GatedNetwork:
        if model is None:
            if cfg.arch is None:
                raise ValueError("a multi-exit config without arch needs model=...")
            model = build_arch(cfg.arch).eval()
        return GatedNetwork.from_multi_exit(
            model, cfg.exits, cfg.score, input_shape=cfg.input_shape,
            normalization=cfg.normalization, classes=cfg.classes, arch=cfg.arch)

    def reads(self, obj: dict[str, Any]) -> bool:
        return obj.get("format") == self.format and bool(obj.get("multi_exit"))

    def config_fields(self, obj: dict[str, Any]) -> dict[str, Any]:
        rec = obj["multi_exit"]
        return {"exits": list(rec["exits"]), "score": str(rec["score"])}

    def to_checkpoint(self, net: GatedNetwork) -> Checkpoint:
        self.require_arch(net, "GatedNetwork.from_multi_exit", net.backbone is not None)
        cfg: MultiExitConfig = net.config  # type: ignore[assignment]
        return self.checkpoint(
            net, {"multi_exit": {"exits": list(cfg.exits), "score": cfg.score}},
            {"backbone_state": net.backbone.state_dict()}, net.thresholds)  # type: ignore[union-attr]

    def from_checkpoint(self, ckpt: Checkpoint, path: str | Path) -> GatedNetwork:
        model = build_arch(ckpt.config.arch or {})
        load_state(model, ckpt.weights["backbone_state"], path)
        net = self.build(ckpt.config, model=model.eval())  # type: ignore[arg-type]
        net.thresholds = list(ckpt.thresholds)
        net.fit_record = ckpt.fit
        return net

    def manifest_record(self, net: GatedNetwork, refs: References) -> ManifestRecord:
        cfg: MultiExitConfig = net.config  # type: ignore[assignment]
        return ManifestRecord(source={"multi_exit": cfg.source(net.backbone)})

    def fit(self, cfg: Any) -> Any:
        raise FitError("a multi-exit model is converted as it is (its own exit heads are the "
                       "gates); there is nothing to fit. Fix: `dgconvert export MODEL --exits "
                       "...`, then `dgconvert calibrate`.")
