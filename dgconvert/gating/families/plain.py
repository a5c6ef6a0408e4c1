"""``plain``: a classifier without exits, exported whole as a one-stage bundle — the
baseline that the gated bundles are served and benchmarked against, by the same runtime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dgconvert.gating.checkpoint import build_arch, load_state
from dgconvert.gating.configs import NetworkConfig
from dgconvert.gating.families.base import Checkpoint, Family, Prune, References
from dgconvert.gating.fit import FitError
from dgconvert.gating.flops import count_flops
from dgconvert.gating.stages import SingleStage


@dataclass(kw_only=True)
class Config(NetworkConfig):
    """Nothing beyond the input spec, the classes and the architecture."""


class PlainNetwork(nn.Module):
    """A classifier carrying the record every network has (``family``, ``config``)."""

    family = "plain"

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.model, self.config, self.fit_record = model, cfg, None
        self.input_shape = [int(s) for s in cfg.input_shape]
        self.num_classes = int(cfg.num_classes or 0)
        self.normalization = cfg.normalization
        self.classes = list(cfg.classes or [str(i) for i in range(self.num_classes)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class Plain(Family):
    name = "plain"
    Config = Config
    format = "dgconvert-plain"
    weight_keys = ("state",)
    fittable = False
    summary = "a classifier without exits, exported whole (the baseline)"

    def build(self, cfg: Config, *, model: nn.Module | None = None, **parts: Any) -> PlainNetwork:
        model = (model if model is not None else build_arch(cfg.arch or {})).eval()
        if cfg.num_classes is None:
            with torch.no_grad():
                cfg.num_classes = int(model(torch.zeros(2, *cfg.input_shape)).shape[1])
        return PlainNetwork(model, cfg)

    def to_checkpoint(self, net: PlainNetwork) -> Checkpoint:
        self.require_arch(net, "family('plain').build")
        return self.checkpoint(net, {}, {"state": net.model.state_dict()})

    def from_checkpoint(self, ckpt: Checkpoint, path: str | Path) -> PlainNetwork:
        net = self.build(ckpt.config)  # type: ignore[arg-type]
        load_state(net.model, ckpt.weights["state"], path)
        return net

    def stage_modules(self, net: PlainNetwork) -> list[nn.Module]:
        return [SingleStage(net).eval()]

    def references(self, net: PlainNetwork, prune: Prune | None = None) -> References:
        self.no_prune(prune)
        flops = count_flops(net.eval(), torch.zeros(1, *net.input_shape))
        return References(net, self.stage_modules(net), net, [None], [flops], [], flops, [])

    def fit(self, cfg: Any) -> Any:
        raise FitError("a plain classifier has no gates to fit. Fix: `dgconvert gates fit` "
                       "attaches and fits gates (the cut-backbone family).")
