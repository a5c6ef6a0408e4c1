"""Checkpoints and a bundle written by an earlier dgconvert (``make_fixtures.py``, run with
main at commit c2d20c1) load with today's code and give the same outputs: labels and exit
stages identical, floats equal up to the rounding of another CPU's kernels (the fixtures
were written on an AMD machine; an Intel one differs in the last bits)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import dgconvert as dg
from dgconvert.core.preprocess import normalize

DATA = Path(__file__).parent / "data"
#: float32 kernels of another CPU (AVX-512 vs AVX2 paths) reorder sums: last-bit differences
CLOSE = {"rtol": 1e-5, "atol": 1e-6}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(DATA / "expected.npz") as f:
        return dict(f)


def _x(net: torch.nn.Module, expected: dict[str, np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(normalize(expected["images"], net.normalization))


def _same_gated(prefix: str, net: torch.nn.Module, x: torch.Tensor,
                expected: dict[str, np.ndarray]) -> None:
    with torch.no_grad():
        np.testing.assert_allclose(net(x).numpy(), expected[f"{prefix}_logits"], **CLOSE)
        res = net.gated_forward(x, return_scores=True)
    np.testing.assert_array_equal(res.labels, expected[f"{prefix}_labels"])
    np.testing.assert_array_equal(res.exit_stage, expected[f"{prefix}_exit_stage"])
    np.testing.assert_allclose(res.scores, expected[f"{prefix}_scores"], **CLOSE)
    assert len(np.unique(res.exit_stage)) == net.num_gates + 1  # every stage is exercised


@pytest.mark.parametrize(("name", "family"), [("cut_backbone", "cut-backbone"),
                                              ("multi_exit", "multi-exit")])
def test_gated_checkpoints_load_and_predict_identically(
    name: str, family: str, expected: dict[str, np.ndarray]
) -> None:
    net = dg.load(DATA / f"{name}.pt")
    assert net.family == family
    _same_gated(name, net, _x(net, expected), expected)


def test_old_whole_pickle_loads_with_trust_and_gets_its_family(
    expected: dict[str, np.ndarray]
) -> None:
    from dgconvert.core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="--trust-pickle"):
        dg.load(DATA / "cut_backbone_pickle.pt")
    net = dg.load(DATA / "cut_backbone_pickle.pt", trust_pickle=True)
    assert net.family == "cut-backbone" and net.cuts == ["layer1", "layer2", "layer3"]
    assert net.fit_record == {"options": {"gate": "mixed", "train_samples": 7},
                              "final_accuracy": 0.5}
    _same_gated("cut_backbone", net, _x(net, expected), expected)


def test_cut_backbone_checkpoint_keeps_its_record(expected: dict[str, np.ndarray]) -> None:
    net = dg.load(DATA / "cut_backbone.pt")
    assert net.config.cuts == ["layer1", "layer2", "layer3"]
    assert [g["type"] for g in net.config.gates] == ["dgate", "softmax", "dgate"]
    assert net.classes == [f"c{i}" for i in range(10)]
    assert net.fit_record == {"options": {"gate": "mixed", "train_samples": 7},
                              "final_accuracy": 0.5}


def test_gaternet_checkpoint_loads_and_predicts_identically(
    expected: dict[str, np.ndarray]
) -> None:
    net = dg.load(DATA / "gaternet.pt")
    assert net.family == "gaternet"
    assert net.fit_record == {"options": {"sparsity": 2.0}, "accuracy": 0.25}
    with torch.no_grad():
        np.testing.assert_allclose(net(_x(net, expected)).numpy(), expected["gaternet_logits"],
                                   **CLOSE)


def test_gaternet_exits_rebuild_identically(expected: dict[str, np.ndarray]) -> None:
    """The old GaterNet checkpoint + the d-gate heads' weights, through the family."""
    from dgconvert.gating.families import family

    heads = torch.load(DATA / "gaternet_exits_heads.pt", weights_only=True)
    fam = family("gaternet-exits")
    net = fam.build(fam.Config(cuts=heads["cuts"], gate=heads["gate"]),
                    gaternet=dg.load(DATA / "gaternet.pt"))
    for g, s in zip(net.gates, heads["gates_state"], strict=True):
        g.load_state_dict(s)
    net.thresholds = list(heads["thresholds"])
    assert net.family == "gaternet-exits"
    _same_gated("gaternet_exits", net, _x(net, expected), expected)


def test_old_bundle_predicts_identically_torch_free(expected: dict[str, np.ndarray]) -> None:
    from dgconvert.runtime import GatedRunner

    runner = GatedRunner(DATA / "cut_backbone.dg", backend="onnxruntime")
    res = runner.predict(expected["images"])
    np.testing.assert_array_equal(res.labels, expected["bundle_labels"])
    np.testing.assert_array_equal(res.exit_stage, expected["bundle_exit_stage"])
    np.testing.assert_allclose(res.scores, expected["bundle_scores"], **CLOSE)
    # and the old bundle agrees with the old checkpoint it was exported from
    np.testing.assert_array_equal(res.labels, expected["cut_backbone_labels"])
