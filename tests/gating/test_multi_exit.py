"""GatedNetwork.from_multi_exit: a multi-exit model trained elsewhere, cut where its exit
heads read the trunk, its heads fused as gates; parity with the model's own outputs, the
score rules, the errors, and weights-only checkpoints."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import dgconvert as dg
from dgconvert.convert.verify import own_exit_rule, spread_thresholds
from dgconvert.core.errors import CheckpointError, CutError
from dgconvert.core.gates import (
    EXIT_HEAD,
    EXIT_SCORES,
    GATE_KINDS,
    GATE_TYPES,
    SCORE_CHOICES,
    exit_head_score,
)
from dgconvert.gating import GatedNetwork
from dgconvert.gating.multi_exit import ExitHeadGate, exit_score, own_exit_outputs
from tests import multi_exit_models as mm

SDN = ("tests.multi_exit_models:sdn_resnet", ["exit1", "exit2"])
EENET = ("tests.multi_exit_models:eenet", ["exit1", "exit2", "exit3"])


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread: None) -> Iterator[None]:
    yield


def _x(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _build(model: Callable[[], torch.nn.Module], exits: list[str], score: str,
           factory: str | None = None) -> GatedNetwork:
    arch = {"factory": factory, "kwargs": {}} if factory else None
    return GatedNetwork.from_multi_exit(model(), exits, score, _x(4), arch=arch).eval()


def test_exit_head_kind_is_metadata_not_a_fit_choice() -> None:
    kind = GATE_KINDS[EXIT_HEAD]
    assert set(EXIT_SCORES) == {"max-softmax", "margin-softmax", "margin-logits",
                                "neg-entropy", "confidence"}
    assert EXIT_HEAD not in GATE_TYPES  # `gates fit` cannot train it
    assert not set(EXIT_SCORES) & set(SCORE_CHOICES)
    assert kind.threshold_for("neg-entropy") < 0 < kind.threshold_for("max-softmax") <= 1


def test_score_rules_known_values() -> None:
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    p0 = np.exp([2.0, 1.0, 0.0]) / np.exp([2.0, 1.0, 0.0]).sum()
    expect = {
        "max-softmax": [p0[0], 1 / 3],
        "margin-softmax": [p0[0] - p0[1], 0.0],
        "margin-logits": [1.0, 0.0],
        "neg-entropy": [float((p0 * np.log(p0)).sum()), -np.log(3)],
    }
    for score, want in expect.items():
        np.testing.assert_allclose(exit_head_score(logits, None, score), want, rtol=1e-12)
        got = exit_score(torch.tensor(logits, dtype=torch.float32), None, score)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-7)
    conf = np.array([[0.25], [0.75]])
    np.testing.assert_array_equal(exit_head_score(logits, conf, "confidence"), [0.25, 0.75])
    with pytest.raises(ValueError, match="confidence output"):
        exit_head_score(logits, None, "confidence")


CASES = [
    (mm.sdn_resnet, SDN[1], "max-softmax"),
    (mm.sdn_resnet, SDN[1], "margin-softmax"),
    (mm.sdn_resnet, SDN[1], "neg-entropy"),
    (mm.eenet, EENET[1], "confidence"),
    (mm.eenet, EENET[1], "margin-logits"),
]


@pytest.mark.parametrize(("model", "exits", "score"), CASES)
def test_stages_and_gates_reproduce_the_models_own_exits(
    model: Callable[[], torch.nn.Module], exits: list[str], score: str
) -> None:
    net = _build(model, exits, score)
    assert net.num_gates == len(exits)
    assert all(isinstance(g, ExitHeadGate) and g.exit_name == e
               for g, e in zip(net.gates, exits, strict=True))
    x = _x(64, seed=1)
    with torch.no_grad():
        out = net.all_exits(x)
    own = own_exit_outputs(net.backbone, x, net.config.outputs)
    for k, (logits, conf) in enumerate(own[:-1]):
        np.testing.assert_allclose(out.scores[:, k].numpy(), exit_head_score(logits, conf, score),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out.labels[:, k].numpy(), logits.argmax(1))
    np.testing.assert_allclose(out.final_logits.numpy(), own[-1][0], rtol=1e-5, atol=1e-6)


def test_heads_are_fused_as_they_are() -> None:
    net = _build(mm.sdn_resnet, SDN[1], "max-softmax")
    model = net.backbone
    # the gate calls the model's own exit module: same object, same weights
    assert net.gates[0].head.exit1 is model.exit1
    assert net.gates[1].head.exit2 is model.exit2
    # no exit head computed inside a stage body
    for stage in net.stages:
        targets = {n.target for n in stage.graph.nodes if n.op == "call_module"}
        assert not targets & {"exit1", "exit2"}


@pytest.mark.parametrize("batch", [1, 7, 200])
@pytest.mark.parametrize(("model", "exits", "score"), [CASES[0], CASES[3]])
def test_gated_forward_equals_own_exit_rule(
    model: Callable[[], torch.nn.Module], exits: list[str], score: str, batch: int
) -> None:
    net = _build(model, exits, score)
    x_all = _x(200, seed=2)
    t = spread_thresholds(net, x_all)
    x = x_all[:batch]
    res = net.gated_forward(x, t, return_scores=True)
    labels, stage, near = own_exit_rule(net, x, t, 1e-5)
    assert own_exit_rule(net, x_all, t, 1e-5)[2].mean() <= 0.1  # the comparison is not vacuous
    np.testing.assert_array_equal(res.exit_stage[~near], stage[~near])
    np.testing.assert_array_equal(res.labels[~near], labels[~near])
    if batch == 200:  # the thresholds make samples exit at every exit
        assert (np.bincount(stage, minlength=len(exits) + 1) > 0).all()


@pytest.mark.parametrize("score", ["max-softmax", "margin-logits"])
def test_ops_after_the_head_module_belong_to_the_exit(score: str) -> None:
    torch.manual_seed(0)
    net = _build(lambda: mm.TemperatureExitNet().eval(), SDN[1], score)
    x = _x(64, seed=4)
    with torch.no_grad():
        out = net.all_exits(x)
    own = own_exit_outputs(net.backbone, x, net.config.outputs)
    for k, (logits, _) in enumerate(own[:-1]):
        np.testing.assert_allclose(out.scores[:, k].numpy(), exit_head_score(logits, None, score),
                                   rtol=1e-5, atol=1e-6)
    # the temperature changes the score: the gate is the entry, not just the module
    with torch.no_grad():
        plain = exit_score(net.backbone.exit1(net.stages[0](x)), None, score).numpy()
    assert np.abs(plain - out.scores[:, 0].numpy()).max() > 1e-3


def test_cli_choices_derive_from_the_gate_kinds() -> None:
    from click.testing import CliRunner

    from dgconvert.cli import main

    fit_help = CliRunner().invoke(main, ["gates", "fit", "--help"]).output
    export_help = CliRunner().invoke(main, ["export", "--help"]).output
    assert "neg-entropy" not in fit_help and "exit-head" not in fit_help
    for score in EXIT_SCORES:
        assert score in export_help
    with pytest.raises(ValueError, match="unknown gate type 'exit-head'"):
        dg.gating.make_gate("exit-head", 8, 10)


def test_the_inference_path_is_converted_whatever_the_mode() -> None:
    model = mm.TrainingOnlyExitsNet().train()
    net = GatedNetwork.from_multi_exit(model, SDN[1], "max-softmax", _x(4))
    assert model.training  # left as it was
    assert net.num_gates == 2


def test_final_classifier_may_be_named_too() -> None:
    net = _build(mm.eenet, [*EENET[1], "final"], "neg-entropy")
    assert net.num_gates == 3 and net.config.exits == EENET[1]
    assert net.config.outputs == [0, 1, 2, 3]


def test_a_subset_of_the_exits() -> None:
    net = _build(mm.eenet, ["exit2"], "confidence")
    assert net.num_gates == 1 and net.config.outputs == [1, 3]
    x = _x(32)
    t = spread_thresholds(net, x)
    labels, stage, near = own_exit_rule(net, x, t, 1e-5)
    res = net.gated_forward(x, t, return_scores=True)
    np.testing.assert_array_equal(res.exit_stage[~near], stage[~near])


ERRORS = [
    (mm.TwoTensorExitNet, ["exit1", "exit2"], "max-softmax",
     r"exit head 'exit2' \(entry 1\) reads 2 tensors of the trunk.*expected exactly one.*Fix"),
    (mm.SameCutNet, ["exit1", "exit2"], "max-softmax",
     r"exits 'exit1' and 'exit2' both read .*expected each exit at a different depth.*Fix"),
    (mm.SkipExitNet, ["exit1", "exit2"], "max-softmax",
     r"would carry 2 tensors across the stage boundary.*skip connection.*Fix"),
    (mm.SDNResNet, ["exit2", "exit1"], "max-softmax",
     r"out of execution order; expected \['exit1', 'exit2'\]"),
    (mm.SDNResNet, ["layer1"], "max-softmax", r"'layer1' is on the path to the final.*Fix"),
    (mm.SDNResNet, ["exit1", "nope"], "max-softmax", r"\['nope'\] are not modules of SDNResNet"),
    (mm.SDNResNet, ["exit1", "exit1"], "max-softmax", r"exits repeat"),
    (mm.SDNResNet, ["exit1"], "confidence",
     r"score='confidence' needs every exit to return \(logits, confidence.*exit 'exit1' "
     r"returns no confidence.*Fix"),
    (mm.SingleOutputNet, ["fc"], "max-softmax",
     r"returns Tensor; expected a list with one entry per exit.*from_backbone"),
]


@pytest.mark.parametrize(("model", "exits", "score", "match"), ERRORS,
                         ids=[e[0].__name__ + "-" + "-".join(e[1]) + "-" + e[2] for e in ERRORS])
def test_errors_say_what_and_how_to_fix(
    model: type[torch.nn.Module], exits: list[str], score: str, match: str
) -> None:
    with pytest.raises(CutError, match=match):
        GatedNetwork.from_multi_exit(model().eval(), exits, score, _x(2))


def test_unknown_score_and_wrong_input() -> None:
    with pytest.raises(ValueError, match="expected one of"):
        GatedNetwork.from_multi_exit(mm.sdn_resnet(), SDN[1], "max", _x(2))
    with pytest.raises(CutError, match=r"failed on example_input of shape \(2, 3, 28, 28\)"):
        GatedNetwork.from_multi_exit(mm.sdn_resnet(), SDN[1], "max-softmax",
                                     torch.zeros(2, 3, 28, 28))


@pytest.mark.parametrize(("model", "spec", "score"),
                         [(mm.sdn_resnet, SDN, "margin-softmax"), (mm.eenet, EENET, "confidence")])
def test_save_load_round_trip_without_pickles(
    tmp_path: Path, model: Callable[[], torch.nn.Module], spec: tuple[str, list[str]], score: str
) -> None:
    net = _build(model, spec[1], score, factory=spec[0])
    x = _x(100, seed=3)
    net.thresholds = spread_thresholds(net, x)
    path = dg.save(net, tmp_path / "multi.pt")
    raw = torch.load(path, weights_only=True)  # no pickled objects in it
    assert raw["multi_exit"] == {"exits": spec[1], "score": score}
    back = dg.load(path)
    assert back.family == net.family == "multi-exit" and back.config == net.config
    assert back.thresholds == net.thresholds
    assert [g.spec() for g in back.gates] == [g.spec() for g in net.gates]
    a, b = net.gated_forward(x, return_scores=True), back.gated_forward(x, return_scores=True)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.exit_stage, b.exit_stage)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert len(np.unique(a.exit_stage)) == net.num_gates + 1


def test_save_without_arch_says_how(tmp_path: Path) -> None:
    net = _build(mm.sdn_resnet, SDN[1], "max-softmax")
    with pytest.raises(CheckpointError, match=r"GatedNetwork.from_multi_exit\(\.\.\., arch="):
        dg.save(net, tmp_path / "x.pt")
