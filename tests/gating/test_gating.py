"""Cutting backbones, gate heads and the reference semantics (torch side)."""

from __future__ import annotations

import pytest
import torch

from dgconvert import zoo
from dgconvert.core.errors import CutError
from dgconvert.gating import GatedNetwork, make_gate, valid_cut_points
from tests.models import ARCHS, build


@pytest.mark.parametrize("name", list(ARCHS))
def test_stages_compose_to_the_backbone(name: str) -> None:
    net = build(name)
    x = torch.randn(5, 1, 28, 28)
    assert torch.allclose(net(x), net.backbone(x), atol=1e-5)
    assert len(net.stages) == len(ARCHS[name][2]) + 1


def test_multi_tensor_cut_is_refused_with_names_and_suggestions() -> None:
    model = zoo.two_path_net().eval()
    with pytest.raises(CutError) as err:
        GatedNetwork.from_backbone(model, ["block1"], input_shape=[1, 28, 28])
    msg = str(err.value)
    assert "2 tensors" in msg and "stem" in msg and "block1" in msg
    assert "block3" in msg  # the valid boundary is suggested
    assert "block3" in valid_cut_points(model) and "block1" not in valid_cut_points(model)


def test_bad_cut_points() -> None:
    model = zoo.resnet()
    with pytest.raises(CutError, match="not modules"):
        GatedNetwork.from_backbone(model, ["layer9"], input_shape=[1, 28, 28])
    with pytest.raises(CutError, match="execution order"):
        GatedNetwork.from_backbone(model, ["layer2", "layer1"], input_shape=[1, 28, 28])


def test_gated_forward_picks_the_first_exit() -> None:
    net = build("resnet")
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        allx = net.all_exits(x)
    t = [float(allx.scores[:, k].median()) for k in range(net.num_gates)]
    labels, exits = net.gated_forward(x, t)
    for i in range(len(x)):
        first = next((k for k in range(net.num_gates) if allx.scores[i, k] >= t[k]), net.num_gates)
        assert exits[i] == first
        want = allx.labels[i, first] if first < net.num_gates else allx.final_logits[i].argmax()
        assert labels[i] == want
    # never exit: the full model's labels
    labels, exits = net.gated_forward(x, [float("inf")] * net.num_gates)
    assert (exits == net.num_gates).all() and (labels == net(x).argmax(1)).all()


@pytest.mark.parametrize("kind,score", [("dgate", "max"), ("dgate", "margin"), ("softmax", "max"), ("confidence", "sigmoid")])
def test_gate_heads_contract(kind: str, score: str) -> None:
    gate = make_gate({"type": kind, "score": score}, 6, 4)
    f = torch.randn(3, 6, 5, 5)
    s, lab, logits = gate(f)
    assert s.shape == (3,) and lab.shape == (3,) and logits.shape == (3, 4)
    assert (lab == logits.argmax(1)).all()
    pooled = f.mean(dim=(2, 3))
    if kind == "dgate":
        d = gate.linear(pooled)
        top = d.topk(2, dim=1).values
        want = top[:, 0] if score == "max" else top[:, 0] - top[:, 1]
        assert torch.allclose(s, want)
    if kind == "confidence":
        assert ((s > 0) & (s < 1)).all()
    with pytest.raises(ValueError, match="score"):
        make_gate({"type": kind, "score": "nope"}, 6, 4)
