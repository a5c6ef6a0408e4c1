"""The gate-kind registry: every kind's head, defaults and validation come from one entry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dgconvert.core.errors import GateKindError
from dgconvert.core.gates import EXIT_HEAD, GATE_KINDS, GATE_TYPES, GateKind, gate_kind
from dgconvert.gating.fit import fit_gates
from dgconvert.gating.heads import GateHead, make_gate
from dgconvert.gating.network import GatedNetwork


@pytest.mark.parametrize("name", GATE_TYPES)
def test_every_fittable_kind_builds_its_head_with_its_defaults(name: str) -> None:
    kind = GATE_KINDS[name]
    head = make_gate({"type": name, "score": kind.default_score}, 8, 3)
    assert isinstance(head, kind.head_class()) and isinstance(head, GateHead)
    assert head.gate_type == name and head.score_kind == kind.default_score
    assert GatedNetwork.default_threshold(head) == kind.default_threshold
    for score in kind.scores:
        assert make_gate({"type": name, "score": score}, 8, 3).score_kind == score


def test_unknown_kinds_and_scores_raise_one_error_type() -> None:
    from dgconvert.data import Dataset
    from dgconvert.zoo import resnet

    with pytest.raises(GateKindError, match="unknown gate type 'nope'; expected one of dgate"):
        make_gate("nope", 8, 3)
    with pytest.raises(GateKindError, match="unknown gate type 'exit-head'.*from_multi_exit"):
        gate_kind(EXIT_HEAD, fittable=True)
    with pytest.raises(GateKindError, match="score 'sigmoid' does not exist for softmax"):
        make_gate({"type": "softmax", "score": "sigmoid"}, 8, 3)
    ds = Dataset(np.zeros((20, 1, 28, 28), np.uint8), np.arange(20, dtype=np.int64) % 10, [])
    with pytest.raises(GateKindError, match="unknown gate type 'nope'"):
        fit_gates(resnet(widths=[4, 8, 8, 8]), ds, gate="nope", progress=False)
    with pytest.raises(GateKindError, match="default score 'x'"):
        GateKind("bad", ("max",), "x", 0.5, "loss", "summary")
    with pytest.raises(GateKindError, match="objective 'mse'"):
        GateKind("bad", ("max",), "max", 0.5, "loss", "summary", objective="mse")
    assert issubclass(GateKindError, ValueError)


@pytest.mark.parametrize("name", GATE_TYPES)
def test_every_fittable_kind_round_trips_through_a_checkpoint(name: str, tmp_path: Path) -> None:
    import torch

    import dgconvert as dg
    from tests.models import build

    net = build("resnet", name)
    back = dg.load(dg.save(net, tmp_path / "g.pt"))
    assert [type(g) for g in back.gates] == [GATE_KINDS[name].head_class()] * net.num_gates
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        a, b = net.all_exits(x), back.all_exits(x)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.final_logits, b.final_logits)
