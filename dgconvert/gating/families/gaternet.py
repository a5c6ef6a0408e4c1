"""``gaternet``: a gater network switching the backbone's filters per sample
(:class:`~dgconvert.gating.gaternet.GaterNet`, fitted by
:func:`~dgconvert.gating.gaternet.fit_gaternet`), exported as one stage; with calibration
images its always-off filters are pruned first and the export is verified against the
*masked* model (those gates forced off)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dgconvert.core.errors import CheckpointError
from dgconvert.core.manifest import GaterNetInfo
from dgconvert.gating.checkpoint import build_arch, load_state
from dgconvert.gating.configs import GaterNetConfig
from dgconvert.gating.families.base import Checkpoint, Family, ManifestRecord, Prune, References
from dgconvert.gating.flops import count_flops
from dgconvert.gating.gaternet import (
    GaterNet,
    GaterNetFit,
    GaterNetFitConfig,
    distribution,
    filter_gate_counts,
    fit_gaternet,
    force_off,
    prune_always_off,
)
from dgconvert.gating.stages import SingleStage

Config = GaterNetConfig
GATERNET_FORMAT = "dgconvert-gaternet"


def build_gaternet(cfg: GaterNetConfig, backbone: nn.Module | None = None) -> GaterNet:
    """:meth:`GaterNet.build` from a config (``backbone``: given, else built from
    ``cfg.arch``)."""
    if backbone is None:
        if cfg.arch is None:
            raise ValueError("a gaternet config without arch needs backbone=...")
        backbone = build_arch(cfg.arch)
    return GaterNet.build(backbone, cfg.gated, cfg.gater, bottleneck=cfg.bottleneck,
                          input_shape=cfg.input_shape, num_classes=int(cfg.num_classes or 0),
                          arch=cfg.arch, normalization=cfg.normalization, classes=cfg.classes)


@torch.no_grad()
def gate_flip_rows(net: nn.Module, x: torch.Tensor, tol: float) -> np.ndarray:
    """Rows with a gate logit within ``tol`` of 0: float noise may flip that filter."""
    return (torch.abs(net.gater.logits(x)) <= tol).any(dim=1).numpy()  # type: ignore[union-attr,operator]


class GaterNetFamily(Family):
    name = "gaternet"
    Config = GaterNetConfig
    format = GATERNET_FORMAT
    record_keys = ("gated", "gater")
    weight_keys = ("state",)
    prunes = True
    summary = "a gater switching the backbone's filters per sample, always-off ones pruned"

    def build(self, cfg: GaterNetConfig, *, backbone: nn.Module | None = None,
              **parts: Any) -> GaterNet:
        return build_gaternet(cfg, backbone)

    def config_fields(self, obj: dict[str, Any]) -> dict[str, Any]:
        gater = dict(obj["gater"])
        return {"gated": list(obj["gated"]), "bottleneck": int(gater.pop("bottleneck", 8)),
                "gater": gater}

    def to_checkpoint(self, net: GaterNet) -> Checkpoint:
        if net.config.arch is None:
            raise CheckpointError(
                "this GaterNet has no importable backbone architecture (config.arch); a "
                "weights-only checkpoint could not rebuild it. Fix: fit it from a dgconvert "
                "backbone checkpoint or pass arch=..., or save with pickle=True.")
        if net.pruned:
            raise CheckpointError("a pruned GaterNet is saved in its bundle only; save the "
                                  "unpruned network (pruning happens at export)")
        cfg = net.config
        return self.checkpoint(net, {"gated": [lay.name for lay in net.layers],
                                     "gater": {**(cfg.gater or {}), "bottleneck": cfg.bottleneck}},
                               {"state": net.state_dict()})

    def from_checkpoint(self, ckpt: Checkpoint, path: str | Path) -> GaterNet:
        net = self.build(ckpt.config)  # type: ignore[arg-type]
        load_state(net, ckpt.weights["state"], path)
        net.fit_record = ckpt.fit
        return net.eval()

    def stage_modules(self, net: GaterNet) -> list[nn.Module]:
        return [SingleStage(net).eval()]

    def describe_stage(self, net: GaterNet, k: int) -> str:
        return "the GaterNet stage"

    def references(self, net: GaterNet, prune: Prune | None = None) -> References:
        exported, masked, info = self.prepare(net, prune)
        return References(exported, self.stage_modules(exported), exported, [None],
                          [info.flops_pruned], [], info.flops_pruned, [], masked=masked,
                          near=gate_flip_rows, record=info)

    def prepare(self, net: GaterNet, prune: Prune | None
                ) -> tuple[GaterNet, GaterNet, GaterNetInfo]:
        """``(exported, masked, info)``: the pruned network (or ``net`` itself without
        ``prune``), the masked reference it must equal, and the manifest record."""
        net.eval()
        one = torch.zeros(1, *net.input_shape)
        gater = {**(net.config.gater or {}), "bottleneck": net.config.bottleneck}
        if prune is None or len(prune.images) == 0:
            flops = count_flops(net, one)
            return net, net, GaterNetInfo([], 0, "", gater, flops, flops, 0.0)
        counts = filter_gate_counts(net, prune.images)
        off = counts == 0
        masked = force_off(net, off)
        pruned = prune_always_off(net, off, prune.multiple)
        info = GaterNetInfo(
            distribution(net, counts, len(prune.images), pruned.removed), len(prune.images),
            prune.source, gater, count_flops(masked, one), count_flops(pruned.net, one),
            float(pruned.removed.sum() / max(net.num_filter_gates, 1)),
            {"not_pruned": pruned.notes} if pruned.notes else {})
        return pruned.net.eval(), masked.eval(), info

    def manifest_record(self, net: GaterNet, refs: References) -> ManifestRecord:
        return ManifestRecord(source={"kind": "gaternet"}, gaternet=refs.record)

    def fit(self, cfg: GaterNetFitConfig) -> GaterNetFit:
        return fit_gaternet(cfg)
