"""In-graph exits (ONNX ``If`` per gate, batch 1): composition, self-check, and results
equal to the stage chain sample by sample at every exit stage, every gate off and NaN
scores."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

import dgconvert as dg
from dgconvert.core.errors import DGConvertError
from dgconvert.runtime import GatedRunner
from dgconvert.runtime.onnxruntime_backend import OnnxRuntimeBackend
from dgconvert.runtime.onnxruntime_if import IfSession, check_if, stage_chain_single
from dgconvert.runtime.passes.chain import ChainError
from dgconvert.runtime.passes.if_graph import compose_if
from tests.models import build


@pytest.fixture(scope="module")
def tiny(exported_bundle: Callable[..., Any]) -> dict[str, Any]:
    e = exported_bundle("resnet")
    pixels = np.random.default_rng(3).integers(0, 256, size=(24, 1, 28, 28), dtype=np.uint8)
    staged = GatedRunner(e.bundle, backend="onnxruntime", compose=False)
    rec = staged.collect(pixels)
    t = [float(np.quantile(rec.scores[:, k], 0.5)) for k in range(rec.scores.shape[1])]
    return {"bundle": e.bundle, "pixels": pixels, "t": t, "staged": staged}


def _ifs(node: Any) -> int:
    """``If`` nodes in ``node``'s subgraphs, nested ones included."""
    return sum((n.op_type == "If") + _ifs(n) for a in node.attribute for n in a.g.node)


def _count_if(model: onnx.ModelProto) -> int:
    return sum((n.op_type == "If") + _ifs(n) for n in model.graph.node)


def test_composition_has_an_if_per_gate_that_is_on(tiny: dict[str, Any]) -> None:
    models = [onnx.load(str(tiny["bundle"].stage_file(k)))
              for k in range(tiny["bundle"].num_stages)]
    k = tiny["bundle"].num_gates
    full = compose_if(models)
    onnx.checker.check_model(full)
    assert _count_if(full) == k
    assert _count_if(compose_if(models, [1])) == k - 1
    assert _count_if(compose_if(models, range(k))) == 0
    assert [o.name for o in full.graph.output] == ["score", "label", "exit_stage"]
    with pytest.raises(ChainError, match=r"gates \[7\] cannot be off"):
        compose_if(models, [7])
    with pytest.raises(ChainError, match="at least 2 stage graphs"):
        compose_if(models[:1])


def _branch(node: Any, name: str) -> Any:
    return next(a.g for a in node.attribute if a.name == name)


@pytest.fixture(scope="module")
def margin(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The test ResNet with margin d-gates (score: largest minus second-largest)."""
    net = build("resnet", gate={"type": "dgate", "score": "margin"})
    return dg.export(net, Path(tmp_path_factory.mktemp("margin")) / "m.dg", verify=False)


@pytest.mark.parametrize("score", ["max", "margin"])
def test_gate_heads_are_lean_and_exact(tiny: dict[str, Any], margin: Any, score: str) -> None:
    """Each label is computed in its exit branch only, a margin head is one MatMul, and the
    first If writes the graph's outputs; scores stay bit-identical to the stage graphs'."""
    bundle = tiny["bundle"] if score == "max" else margin
    k = bundle.num_gates
    be = OnnxRuntimeBackend(bundle, threads=1)
    contract = [onnx.load(str(bundle.stage_file(j))) for j in range(bundle.num_stages)]
    matmuls = int(score == "margin")
    for models in (contract, be._graphs):
        graph = compose_if(models).graph
        top = [n.op_type for n in graph.node]
        assert top.count("MatMul") == matmuls and top.count("If") == 1
        assert not {"ArgMax", "Sub", "Identity", "Less", "Where"} & set(top)
        first_if = next(n for n in graph.node if n.op_type == "If")
        assert list(first_if.output) == ["score", "label", "exit_stage"]
        exit_ops = [n.op_type for n in _branch(first_if, "then_branch").node]
        assert exit_ops == ["Reshape" if matmuls else "Identity", "ArgMax", "Constant"]
        deeper = [n.op_type for n in _branch(first_if, "else_branch").node]
        assert "ArgMax" not in deeper and deeper.count("MatMul") == matmuls
    pixels = tiny["pixels"][:8]
    x = GatedRunner(bundle, backend="onnxruntime", compose=False).prepare(pixels)
    single = be.single()
    for j in range(k + 1):
        t = np.full(k, np.inf, np.float32)
        if j < k:
            t[j] = -np.inf
        for i in range(len(x)):
            got = single(x[i:i + 1], t)
            want = stage_chain_single(be.run_stage, x[i:i + 1], t, bundle.num_stages)
            assert (got[2], got[1]) == (want[2], want[1]) and got[2] == j
            assert np.float32(got[0]).tobytes() == np.float32(want[0]).tobytes()


def _per_image(runner: GatedRunner, pixels: np.ndarray) -> tuple[np.ndarray, ...]:
    res = [runner.predict(pixels[i:i + 1]) for i in range(len(pixels))]
    return tuple(np.concatenate([getattr(r, f) for r in res])
                 for f in ("labels", "exit_stage", "scores"))


def _assert_same(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> None:
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[2], b[2], rtol=1e-5, atol=1e-6)


def _cases(k: int, calibrated: list[float]) -> dict[str, list[float]]:
    cases = {f"exit at {j}": [np.inf] * j + [-np.inf] + [np.inf] * (k - j - 1)
             for j in range(k)}
    cases["all gates off"] = [np.inf] * k
    cases["calibrated"] = calibrated
    cases["gate 1 off"] = [v if g != 1 else np.inf for g, v in enumerate(calibrated)]
    return cases


@pytest.mark.parametrize("case", ["exit at 0", "exit at 1", "exit at 2", "all gates off",
                                  "calibrated", "gate 1 off"])
def test_batch1_equals_stage_chain(tiny: dict[str, Any], case: str) -> None:
    bundle, pixels = tiny["bundle"], tiny["pixels"]
    k = bundle.num_gates
    t = _cases(k, tiny["t"])[case]
    r = GatedRunner(bundle, backend="onnxruntime", thresholds=t, paths="default")
    assert r.path(1) == "in-graph exits" or case == "all gates off"
    assert r.backend.single() is not None and "in-graph exits on (batch 1)" in \
        r.backend.describe()
    staged = tiny["staged"]
    staged.thresholds = t
    staged.reset_stats()
    got, want = _per_image(r, pixels), _per_image(staged, pixels)
    _assert_same(got, want)
    assert r.stats == staged.stats
    if case.startswith("exit at"):
        assert (got[1] == int(case[-1])).all()
    if case == "calibrated":
        assert len(set(got[1].tolist())) == k + 1  # images leave at every exit
    if case == "all gates off":  # the runner takes the composed full model: the If graph
        single, x = r.backend.single(), r.prepare(pixels)
        for i in range(len(x)):
            score, label, stage = single(x[i:i + 1], np.full(k, np.inf, np.float32))
            assert (stage, label) == (k, want[0][i])
            assert score == pytest.approx(want[2][i], rel=1e-5, abs=1e-6)


def test_off_gates_are_left_out_and_cached(tiny: dict[str, Any]) -> None:
    be = OnnxRuntimeBackend(tiny["bundle"], threads=1)
    exits = be.single()
    k = tiny["bundle"].num_gates
    x = np.zeros((1, 1, 28, 28), np.float32)
    t = np.array([np.inf, 0.0, np.inf][:k], np.float32)  # +inf: off
    exits(x, t)
    exits(x, t)
    assert set(exits.variants) == {frozenset(), frozenset({0, 2})}
    assert exits.variants[frozenset({0, 2})].off == {0, 2}


def test_options_and_description(tiny: dict[str, Any]) -> None:
    b = tiny["bundle"]
    assert OnnxRuntimeBackend(b, threads=1, in_graph_exits=False).single() is None
    off = OnnxRuntimeBackend(b, threads=1, compose=False)
    assert off.single() is None and "in-graph exits off (compose=False)" in off.describe()
    assert off.fast_paths_off() == []
    with pytest.raises(DGConvertError, match="in_graph_exits=True was requested"):
        OnnxRuntimeBackend(b, threads=1, in_graph_exits=True,
                           providers=["CPUExecutionProvider", "CPUExecutionProvider"])


def test_self_check_catches_a_wrong_graph(tiny: dict[str, Any]) -> None:
    """An If graph whose exit goes one stage too far is refused by the check."""
    be = OnnxRuntimeBackend(tiny["bundle"], threads=1)
    good = be.single().full
    models = be._graphs
    wrong = compose_if(models)
    first_if = next(n for n in wrong.graph.node if n.op_type == "If")
    then_b = next(a for a in first_if.attribute if a.name == "then_branch")
    const = next(n for n in then_b.g.node if n.op_type == "Constant")
    const.attribute[0].t.CopyFrom(onnx.numpy_helper.from_array(np.array([1], np.int64)))
    sess = be._extended_session(wrong)
    bad = IfSession(sess, sess.run, None)
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    with pytest.raises(ChainError, match="left at stage 1, the stage chain at 0"):
        check_if(bad, be.run_stage, x, tiny["bundle"].num_stages)
    check_if(good, be.run_stage, x, tiny["bundle"].num_stages)


@pytest.fixture(scope="module")
def nonfinite(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Gate 0 scores +inf for every sample, gate 1 NaN."""
    net = build("resnet", gate={"type": "dgate", "score": "max"})
    with torch.no_grad():
        net.gates[0].linear.bias[3] = float("inf")
        net.gates[1].linear.bias[:] = float("nan")
    return dg.export(net, Path(tmp_path_factory.mktemp("nf")) / "m.dg", verify=False)


@pytest.mark.parametrize("t", [[np.inf, -np.inf, 0.0], [5.0, -np.inf, np.inf],
                               [np.inf, -np.inf, np.inf]])
def test_nan_and_inf_scores(nonfinite: Any, t: list[float]) -> None:
    pixels = np.random.default_rng(2).integers(0, 256, (8, 1, 28, 28), dtype=np.uint8)
    r = GatedRunner(nonfinite, backend="onnxruntime", thresholds=t, paths="default")
    staged = GatedRunner(nonfinite, backend="onnxruntime", thresholds=t, compose=False)
    assert r.backend.single() is not None
    got, want = _per_image(r, pixels), _per_image(staged, pixels)
    _assert_same(got, want)
    assert not (got[1] == 1).any()  # NaN scores never exit at gate 1
    assert (got[1] == 0).all() == (t[0] == 5.0)  # +inf scores exit where gate 0 is on
