"""Gate fitting: building blocks by hand, and real fits on a small Fashion-MNIST slice."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import dgconvert as dg
from dgconvert.core.errors import DGConvertError, GateKindError
from dgconvert.core.gates import GATE_TYPES
from dgconvert.data import load_dataset
from dgconvert.gating.fit import (
    DEFAULT_GATE,
    PAPER_DGATE,
    Features,
    FitError,
    coverage_curve,
    exit_costs,
    fit_gates,
    initial_threshold,
    train_heads,
)
from dgconvert.gating.heads import make_gate
from dgconvert.gating.losses import ovr_hinge

FMNIST = Path(os.environ.get("DGCONVERT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed: apt-get install -y dataset-fashion-mnist",
)
TRAIN = "fashion-mnist:train[:2000]"
TEST = "fashion-mnist:test[:1000]"
ARCH_KWARGS = {"widths": [8, 16, 24, 32]}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backbone(tiny_backbone: Path) -> Path:
    return tiny_backbone  # conftest: trained once per session on fashion-mnist:train[:2000]


# --------------------------------------------------------------------------- by hand


def test_coverage_curve_hand_computed() -> None:
    scores = np.array([0.9, 0.1, 0.8, 0.3])
    correct = np.array([True, False, False, True])
    # sorted by score: 0.9 (right), 0.8 (wrong), 0.3 (right), 0.1 (wrong)
    rows = coverage_curve(scores, correct, points=4)
    assert [r["coverage"] for r in rows] == [0.25, 0.5, 0.75, 1.0]
    assert [r["threshold"] for r in rows] == pytest.approx([0.9, 0.8, 0.3, 0.1])
    assert [r["accuracy"] for r in rows] == pytest.approx([1.0, 0.5, 2 / 3, 0.5])


def test_coverage_curve_counts_ties_as_covered() -> None:
    rows = coverage_curve(np.array([1.0, 1.0, 0.0]), np.array([True, False, True]), points=3)
    assert rows[0]["coverage"] == pytest.approx(2 / 3) and rows[0]["accuracy"] == 0.5


def test_initial_threshold_costs_no_accuracy() -> None:
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    gate = np.array([1, 0, 1, 1, 0], dtype=bool)
    final = np.array([1, 1, 0, 1, 1], dtype=bool)
    # running gate-minus-final: 0, -1, 0, 0, -1 -> lowest qualifying threshold is 2.0
    assert initial_threshold(scores, gate, final) == 2.0
    assert initial_threshold(scores, ~final, final) == math.inf  # gate never as good
    # ties cannot be split: the running sum is +1 inside the tie at 2.0 but -1 after it
    tied = np.array([3.0, 2.0, 2.0, 2.0, 1.0])
    g, f = np.array([1, 1, 0, 0, 1], bool), np.array([1, 0, 1, 1, 1], bool)
    assert initial_threshold(tied, g, f) == 3.0


def test_standardization_is_folded_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=gen) * torch.tensor([1, 10, 100, 0.1, 1, 5]) + 50
    y = torch.randint(0, 3, (400,), generator=gen)
    head = make_gate({"type": "softmax", "score": "max"}, 6, 3)
    torch.manual_seed(0)
    ref = make_gate({"type": "softmax", "score": "max"}, 6, 3)
    ref.load_state_dict(head.state_dict())
    train_heads([head], Features([x], torch.zeros(400, 3)), y, epochs=1, standardize=True)
    # the folded head on raw x equals an unfolded copy on standardized x
    mean, std = x.mean(0), x.std(0)
    unfolded = make_gate({"type": "softmax", "score": "max"}, 6, 3)
    with torch.no_grad():
        unfolded.linear.weight.copy_(head.linear.weight * std)
        unfolded.linear.bias.copy_(head.linear.bias + head.linear.weight @ mean)
        a, b = head(x)[2], unfolded((x - mean) / std)[2]
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-4)
    assert not torch.allclose(head.linear.weight, ref.linear.weight)  # it did train


@pytest.mark.parametrize("gate", GATE_TYPES)
def test_every_gate_type_folds_standardization_exactly(gate: str) -> None:
    """A head fitted with ``standardize=True`` on raw features equals the same head fitted on
    the standardized features: the fold reaches exactly the layers that read the input."""
    import copy

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 6, generator=gen) * torch.tensor([1, 10, 100, 0.1, 1, 5]) + 50
    y = torch.randint(0, 3, (300,), generator=gen)
    z = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    head = make_gate(gate, 6, 3)
    twin = copy.deepcopy(head)
    opts = {"epochs": 2, "costs": [0.4, 1.0], "seed": 3}
    final = torch.randn(300, 3, generator=gen)  # the final classifier's logits (L_v2)
    train_heads([head], Features([x], final), y, standardize=True, **opts)
    train_heads([twin], Features([z], final), y, standardize=False, **opts)
    with torch.no_grad():
        for a, b in zip(head(x), twin(z), strict=True):
            assert torch.allclose(a.float(), b.float(), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("hinge", ["ovr", "crammer-singer"])
@pytest.mark.parametrize("standardize", [True, False])
def test_hinge_gate_puts_separable_data_outside_the_margin(hinge: str, standardize: bool) -> None:
    """Margin semantics survive training and folding: on separable data every sample ends
    up with ``d_true >= 1`` and (one-vs-all) ``d_other <= -1``, or (Crammer–Singer) a gap >= 1."""
    gen = torch.Generator().manual_seed(1)
    centers = torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]])
    y = torch.arange(3).repeat(100)
    x = centers[y] + 0.3 * torch.randn(300, 4, generator=gen)
    if standardize:
        x = x * torch.tensor([50.0, 0.02, 1.0, 3.0]) + 7.0  # badly scaled features
    head = make_gate({"type": "dgate", "score": "max" if hinge == "ovr" else "margin"}, 4, 3)
    train_heads([head], Features([x], torch.zeros(300, 3)), y, hinge=hinge, l2=0.0,
                standardize=standardize, epochs=30, batch_size=32, lr=0.05)  # fmt: skip
    score, label, d = head(x)
    assert torch.equal(label, y)
    rows = torch.arange(300)
    if hinge == "ovr":
        assert ovr_hinge(d, y).item() < 1e-3
        assert (score >= 0.99).all() and (d[rows, y] >= 0.99).all()
    else:
        assert (score >= 0.99).all()  # top-1 minus top-2 distance >= 1: outside the margin


def test_exit_costs_are_cumulative_flops() -> None:
    from dgconvert.gating.flops import count_flops
    from dgconvert.zoo import resnet

    backbone = resnet(widths=[8, 16, 24, 32]).eval()
    net = dg.GatedNetwork.from_backbone(backbone, ["layer1", "layer2", "layer3"], input_shape=[1, 28, 28])
    costs = exit_costs(net)
    assert len(costs) == 4 and all(a < b for a, b in zip(costs, costs[1:], strict=False))
    gates = sum(count_flops(g, torch.zeros(1, g.in_features)) for g in net.gates)
    assert costs[-1] == pytest.approx(count_flops(backbone, torch.zeros(1, 1, 28, 28)) + gates)


def test_paper_setting_is_the_exact_formulation() -> None:
    assert PAPER_DGATE == {"gate": "dgate", "score": "max", "hinge": "ovr", "standardize": False}
    assert DEFAULT_GATE in ("dgate", "softmax", "confidence")


# --------------------------------------------------------------------------- real data


def _split_accuracy(net: dg.GatedNetwork, data: str) -> list[tuple[float, float]]:
    """Per gate: accuracy of the upper and lower half of test samples by gate score."""
    test = load_dataset(data)
    from dgconvert.core.preprocess import normalize

    x = torch.from_numpy(normalize(test.images, net.normalization))
    with torch.no_grad():
        out = net.all_exits(x)
    res = []
    for k in range(net.num_gates):
        s = out.scores[:, k].numpy()
        right = out.labels[:, k].numpy() == test.labels
        hi = s >= np.median(s)
        res.append((float(right[hi].mean()), float(right[~hi].mean())))
    return res


@needs_fmnist
@pytest.mark.parametrize(
    "options",
    [
        {"gate": "dgate"},
        {"gate": "dgate", "hinge": "ovr"},
        dict(PAPER_DGATE),
        {"gate": "softmax"},
        {"gate": "mlp"},
    ],
    ids=["dgate", "dgate-ovr", "dgate-paper", "softmax", "mlp"],
)
def test_fitted_gate_ranks_samples_by_accuracy(backbone: Path, options: dict) -> None:
    result = fit_gates(backbone, TRAIN, epochs=8, holdout=0.25, progress=False, **options)
    net = result.net
    assert [g.gate_type for g in net.gates] == [options["gate"]] * 3
    assert net.thresholds == result.thresholds and len(result.gates) == 3
    assert result.final_accuracy is not None and result.final_accuracy > 0.5
    fit = net.fit_record
    assert fit["options"]["holdout_samples"] == 500 and fit["options"]["train_samples"] == 1500
    assert len(fit["gates"]) == 3 and len(fit["gates"][2]["curve"]) == 20
    # the deepest gates must rank held-out test samples: high score -> more accurate
    for hi, lo in _split_accuracy(net, TEST)[1:]:
        assert hi > lo + 0.05, (hi, lo)
    # the held-out curve is recorded and its accuracy falls with coverage (top vs all)
    curve = result.gates[2].curve
    assert curve[0]["accuracy"] > curve[-1]["accuracy"]
    assert "gate 2 after layer3" in result.table()


@needs_fmnist
def test_confidence_gates_learn_lv2_on_unseen_data(backbone: Path) -> None:
    """EENet exits: the fitted confidences lower L_v2 on test data compared with the same
    heads at a constant confidence of 0.5 (what an untrained confidence branch gives)."""
    from dgconvert.gating.fit import extract_features
    from dgconvert.gating.losses import eenet_lv2

    result = fit_gates(backbone, TRAIN, gate="confidence", epochs=8, holdout=0.25, progress=False)
    net = result.net
    test = load_dataset(TEST)
    feats = extract_features(net, test.images, net.normalization)
    probs, confs = [], []
    with torch.no_grad():
        for head, x in zip(net.gates, feats.pooled, strict=True):
            h, _, logits = head(x)
            probs.append(torch.softmax(logits, 1))
            confs.append(h)
        probs.append(torch.softmax(feats.logits, 1))
    costs = [c / result.exit_costs[-1] for c in result.exit_costs]
    y = torch.from_numpy(test.labels)
    fitted = eenet_lv2(probs, confs, costs, y).item()
    constant = eenet_lv2(probs, [torch.full_like(h, 0.5) for h in confs], costs, y).item()
    assert fitted < constant - 0.05, (fitted, constant)
    tops = [g.holdout_accuracy for g in result.gates]
    assert tops[2] > 0.5  # the classifier branches are trained too (cross-entropy warm start)


@needs_fmnist
def test_fit_gates_round_trips_through_save(backbone: Path, tmp_path: Path) -> None:
    result = fit_gates(backbone, TRAIN, gate="dgate", epochs=2, holdout=0.2, progress=False)
    out = dg.save(result.net, tmp_path / "gated.pt")
    net = dg.load(out)
    assert net.thresholds == result.thresholds
    assert net.fit_record["options"]["gate"] == "dgate"
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        a, b = result.net.eval().all_exits(x), net.all_exits(x)
    assert torch.allclose(a.scores, b.scores, atol=1e-5)


@needs_fmnist
def test_joint_fine_tuning_changes_the_backbone(backbone: Path) -> None:
    before, _ = dg.load_backbone(backbone)
    result = fit_gates(backbone, "fashion-mnist:train[:600]", gate="confidence", epochs=2,
                       joint=True, joint_epochs=1, holdout=0.2, progress=False)  # fmt: skip
    after = result.net.backbone
    assert after is not None
    changed = [
        n for n, p in after.state_dict().items()
        if p.dtype.is_floating_point and not torch.equal(p, before.state_dict()[n])
    ]  # fmt: skip
    assert any(n.startswith("layer1") for n in changed) and "fc.weight" in changed
    assert not any("running_mean" in n for n in changed)  # BatchNorm statistics stay frozen
    assert all(p.requires_grad is False for p in after.parameters())


def test_errors_say_what_was_wrong(tmp_path: Path) -> None:
    from dgconvert.data import Dataset
    from dgconvert.zoo import resnet

    model = resnet(widths=[4, 8, 8, 8]).eval()
    ds = Dataset(np.zeros((20, 1, 28, 28), np.uint8), np.arange(20, dtype=np.int64) % 10, [])
    with pytest.raises(FitError, match="joint fine-tuning.*Fix: drop --joint"):
        fit_gates(model, ds, gate="dgate", joint=True, progress=False)
    with pytest.raises(FitError, match="holdout is 1.5"):
        fit_gates(model, ds, holdout=1.5, progress=False)
    with pytest.raises(GateKindError, match="score 'sigmoid' does not exist for dgate"):
        fit_gates(model, ds, gate="dgate", score="sigmoid", progress=False)
    bad = Dataset(np.zeros((20, 1, 28, 28), np.uint8), np.arange(20, dtype=np.int64), [])
    with pytest.raises(FitError, match="labels .* span 0..19.*10 outputs"):
        fit_gates(model, bad, input_shape=[1, 28, 28], progress=False)
    small = Dataset(np.zeros((20, 1, 14, 14), np.uint8), np.zeros(20, np.int64), [])
    with pytest.raises(FitError, match=r"shape \[1, 14, 14\].*expects \[1, 28, 28\]"):
        fit_gates(model, small, input_shape=[1, 28, 28], progress=False)
    assert issubclass(FitError, DGConvertError)
