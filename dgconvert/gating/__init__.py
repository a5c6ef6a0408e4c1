"""Torch side: gate heads, :class:`GatedNetwork`, cutting a backbone, checkpoints, fitting."""

from dgconvert.gating.checkpoint import load_backbone
from dgconvert.gating.cut import cut_backbone, valid_cut_points
from dgconvert.gating.heads import ConfidenceGate, DGate, GateHead, SoftmaxGate, make_gate
from dgconvert.gating.network import GatedNetwork
from dgconvert.gating.persist import load, save

__all__ = [
    "ConfidenceGate",
    "DGate",
    "GateHead",
    "GatedNetwork",
    "SoftmaxGate",
    "cut_backbone",
    "load",
    "load_backbone",
    "make_gate",
    "save",
    "valid_cut_points",
]
