"""The registry of network families: names, typed checkpoints (version-1 layout, a
``family`` key), the GaterNet + d-gates checkpoint, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import dgconvert as dg
from dgconvert.core.errors import CheckpointError
from dgconvert.gating.families import Family, family, family_names, family_of, register_family
from dgconvert.gating.families.cut_backbone import CutBackbone
from dgconvert.gating.fit import FitError
from dgconvert.gating.gaternet import filter_gate_counts, prune_always_off
from tests.gating.test_gaternet import tiny
from tests.models import build

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ["cut-backbone", "multi-exit", "gaternet", "gaternet-exits"]
X = torch.randn(48, 1, 28, 28, generator=torch.Generator().manual_seed(5))


def test_registry_names_and_errors() -> None:
    assert family_names()[: len(FAMILIES)] == FAMILIES  # registration order; more may follow
    assert "multi-exit" in family_names(fittable=False)
    assert not set(family_names(fittable=True)) & set(family_names(fittable=False))
    for name in FAMILIES:
        fam = family(name)
        assert isinstance(fam, Family) and fam.name == name
    with pytest.raises(ValueError, match="'nope' is unknown; expected one of cut-backbone, "):
        family("nope")

    class Other(CutBackbone):
        pass

    with pytest.raises(ValueError, match="registered already"):
        register_family(Other())
    assert register_family(CutBackbone()).name == "cut-backbone"  # same kind again: fine


def test_network_records_its_family_and_typed_config() -> None:
    net = build("resnet")
    assert family_of(net).name == "cut-backbone"
    assert net.config.cuts == ["layer1", "layer2", "layer3"]
    assert net.config.arch == {"factory": "dgconvert.zoo:resnet", "kwargs": {"widths": [8, 16, 16, 32]}}
    assert net.meta == {"cuts": net.cuts, "arch": net.config.arch}  # the old view, read-only
    with pytest.raises(TypeError, match="expected a dgconvert network"):
        family_of(torch.nn.Linear(2, 2))


def test_checkpoint_keeps_the_version_1_layout_plus_its_family(tmp_path: Path) -> None:
    net = build("resnet")
    raw = torch.load(dg.save(net, tmp_path / "g.pt"), weights_only=True)
    assert raw["family"] == "cut-backbone" and raw["version"] == 1
    assert {"format", "arch", "cuts", "gates", "num_classes", "input", "classes", "thresholds",
            "fit", "backbone_state", "gates_state"} <= set(raw)
    raw["version"] = 9
    torch.save(raw, tmp_path / "v9.pt")
    with pytest.raises(CheckpointError, match="checkpoint version 9; this dgconvert reads 1"):
        dg.load(tmp_path / "v9.pt")
    del raw["cuts"]
    raw["version"] = 1
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="of family 'cut-backbone' without cuts"):
        dg.load(tmp_path / "bad.pt")
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a gated-network checkpoint .*'other'"):
        dg.load(tmp_path / "other.pt")


def test_gaternet_exits_on_a_pruned_gaternet_round_trip(tmp_path: Path) -> None:
    gn = tiny()
    calib = (np.random.default_rng(0).random((64, 1, 28, 28)) * 255).astype(np.uint8)
    pruned = prune_always_off(gn, filter_gate_counts(gn, calib) == 0, 4)
    assert pruned.removed.any()
    fam = family("gaternet-exits")
    net = fam.build(fam.Config(cuts=["layer1", "layer2"]), gaternet=pruned.net)
    with torch.no_grad():
        for g in net.gates:  # non-trivial heads
            for p in g.parameters():
                p.normal_(0.0, 0.5)
    with torch.no_grad():
        scores = net.all_exits(X).scores.numpy()
    net.thresholds = [float(np.quantile(scores[:, k], 0.7)) for k in range(net.num_gates)]
    back = dg.load(dg.save(net, tmp_path / "ge.pt"))
    assert back.family == "gaternet-exits" and back.config.pruned == pruned.net.pruned
    assert back.thresholds == net.thresholds
    a, b = net.gated_forward(X, return_scores=True), back.gated_forward(X, return_scores=True)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.exit_stage, b.exit_stage)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert len(np.unique(a.exit_stage)) == 3


def test_a_multi_exit_model_has_nothing_to_fit() -> None:
    with pytest.raises(FitError, match="nothing to fit"):
        family("multi-exit").fit(None)
