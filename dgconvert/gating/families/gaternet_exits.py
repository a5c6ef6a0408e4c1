"""``gaternet-exits``: early exits (d-gates) on a GaterNet, pruned first
(:func:`~dgconvert.gating.gaternet_exits.gaternet_exits`): the gater runs in stage 0 and its
gates travel packed with the features. :meth:`GaterNetExits.fit` is the whole flow of
``dgconvert gates gaternet-exits``: load, prune the always-off filters, attach and fit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from dgconvert.core.gates import DEFAULT_GATE, DEFAULT_HINGE, PRUNE_MULTIPLE
from dgconvert.gating.configs import GaterNetConfig, GaterNetExitsConfig
from dgconvert.gating.families.base import Checkpoint, EarlyExitFamily, load_network
from dgconvert.gating.families.gaternet import build_gaternet
from dgconvert.gating.fit import FitError, FitResult
from dgconvert.gating.gaternet import GaterNet, filter_gate_counts, prune_always_off
from dgconvert.gating.gaternet_exits import fit_gaternet_exits, gaternet_exits
from dgconvert.gating.network import GatedNetwork

if TYPE_CHECKING:
    from dgconvert.data import Dataset

Config = GaterNetExitsConfig
GATERNET_EXITS_FORMAT = "dgconvert-gaternet-exits"


@dataclass(kw_only=True)
class GaterNetExitsFitConfig:
    """Options of :meth:`GaterNetExits.fit`: the trained ``gaternet`` (a network or its
    checkpoint), ``prune_data`` (calibration images or their ``--data`` spec: filters whose
    gate is off for every one are pruned first, layers keeping multiples of
    ``prune_multiple``), then d-gates after ``cuts`` fitted on ``data`` as
    :func:`~dgconvert.gating.gaternet_exits.fit_gaternet_exits` does."""

    gaternet: GaterNet | str | Path
    data: str | Dataset
    cuts: list[str]
    gate: str = DEFAULT_GATE
    score: str | None = None
    hinge: str = DEFAULT_HINGE
    l2: float = 1e-4
    epochs: int = 20
    batch_size: int = 256
    lr: float = 0.2
    holdout: float = 0.1
    seed: int = 0
    prune_data: str | np.ndarray | None = None
    prune_multiple: int = PRUNE_MULTIPLE
    progress: bool = False


class GaterNetExits(EarlyExitFamily):
    name = "gaternet-exits"
    Config = GaterNetExitsConfig
    format = GATERNET_EXITS_FORMAT
    record_keys = ("gaternet", "pruned", "cuts", "gate", "score")
    weight_keys = ("gaternet_state", "gates_state")
    summary = "d-gates (early exits) on a pruned GaterNet, its gates packed with the features"

    def build(self, cfg: GaterNetExitsConfig, *, gaternet: GaterNet | None = None,
              **parts: Any) -> GatedNetwork:
        if gaternet is None:
            if cfg.gaternet is None:
                raise ValueError("a gaternet-exits config without gaternet needs gaternet=...")
            gaternet = build_gaternet(cfg.gaternet)
            if cfg.pruned:
                off = np.zeros(gaternet.num_filter_gates, bool)
                off[cfg.pruned["off"]] = True
                gaternet = prune_always_off(gaternet, off, int(cfg.pruned["multiple"])).net
        return gaternet_exits(gaternet.eval(), cfg.cuts, cfg.gate, cfg.score)

    def config_fields(self, obj: dict[str, Any]) -> dict[str, Any]:
        return {**{k: obj[k] for k in self.record_keys},
                "gaternet": GaterNetConfig.from_dict(obj["gaternet"])}

    def to_checkpoint(self, net: GatedNetwork) -> Checkpoint:
        cfg: GaterNetExitsConfig = net.config  # type: ignore[assignment]
        if cfg.arch is None or net.backbone is None:
            self.require_arch(net, "gaternet_exits on a GaterNet fitted", False)
        return self.checkpoint(
            net, {"gaternet": cfg.gaternet.to_dict() if cfg.gaternet else None,
                  "pruned": cfg.pruned, "cuts": list(cfg.cuts), "gate": cfg.gate,
                  "score": cfg.score},
            {"gaternet_state": net.backbone.state_dict(),  # type: ignore[union-attr]
             "gates_state": [g.state_dict() for g in net.gates]}, net.thresholds)

    def from_checkpoint(self, ckpt: Checkpoint, path: str | Path) -> GatedNetwork:
        from dgconvert.gating.checkpoint import load_state

        cfg: GaterNetExitsConfig = ckpt.config  # type: ignore[assignment]
        net = self.build(cfg)
        load_state(net.backbone, ckpt.weights["gaternet_state"], path)  # type: ignore[arg-type]
        for g, s in zip(net.gates, ckpt.weights["gates_state"], strict=True):
            load_state(g, s, path)
        net.thresholds = list(ckpt.thresholds)
        net.fit_record = ckpt.fit
        return net.eval()

    def fit(self, cfg: GaterNetExitsFitConfig) -> FitResult:
        from dgconvert.data import load_dataset

        if cfg.epochs < 1 or not 0.0 <= cfg.holdout < 1.0:
            raise FitError(f"epochs={cfg.epochs}, holdout={cfg.holdout}; expected epochs >= 1 "
                           "and a holdout share in [0, 1)")
        net = cfg.gaternet if isinstance(cfg.gaternet, nn.Module) else load_network(cfg.gaternet)
        if not isinstance(net, GaterNet):
            raise FitError(f"{cfg.gaternet} is not a GaterNet checkpoint (`dgconvert gates "
                           "gaternet` writes one); for a backbone use `dgconvert gates fit`.")
        pruned = None
        if cfg.prune_data is not None:
            images = (load_dataset(cfg.prune_data).images if isinstance(cfg.prune_data, str)
                      else cfg.prune_data)
            off = filter_gate_counts(net, images) == 0
            res = prune_always_off(net, off, cfg.prune_multiple)
            net = res.net
            pruned = {"removed": int(res.removed.sum()), "gates": len(off),
                      "off": int(off.sum()), "multiple": cfg.prune_multiple}
        result = fit_gaternet_exits(
            net, cfg.data, cfg.cuts, cfg.gate, score=cfg.score, hinge=cfg.hinge, l2=cfg.l2,
            epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, holdout=cfg.holdout,
            seed=cfg.seed, progress=cfg.progress)
        result.options["pruned"] = pruned
        return result
