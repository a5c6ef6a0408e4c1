"""The one-session chain (ONNX Runtime, CPU): composition, self-check, edge thresholds."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from dgconvert.core.errors import DGConvertError
from dgconvert.core.preprocess import prepare_images
from dgconvert.runtime import GatedRunner
from dgconvert.runtime.onnxruntime_backend import OnnxRuntimeBackend, direct_run, session_options
from dgconvert.runtime.onnxruntime_chain import ChainSession, check_chain
from dgconvert.runtime.passes.chain import ChainError, compose_chain


@pytest.fixture(scope="module")
def tiny(exported_bundle: Callable[..., Any]) -> dict[str, Any]:
    e = exported_bundle("resnet")
    net, bundle = e.net, e.bundle
    pixels = np.random.default_rng(0).integers(0, 256, size=(48, 1, 28, 28), dtype=np.uint8)
    rec = GatedRunner(bundle, backend="onnxruntime", compose=False).collect(pixels)
    t = [float(np.quantile(rec.scores[:, k], 0.6)) for k in range(rec.scores.shape[1])]
    return {"net": net, "bundle": bundle, "pixels": pixels, "t": t}


def _stage_models(bundle: Any) -> list[onnx.ModelProto]:
    return [onnx.load(str(bundle.stage_file(k))) for k in range(bundle.num_stages)]


def _predict_both(tiny: dict[str, Any], thresholds: list[float]) -> tuple[Any, Any, list, list]:
    chained = GatedRunner(tiny["bundle"], backend="onnxruntime", thresholds=thresholds)
    staged = GatedRunner(tiny["bundle"], backend="onnxruntime", thresholds=thresholds,
                         compose=False)
    a, b = chained.predict(tiny["pixels"]), staged.predict(tiny["pixels"])
    return a, b, chained.stats, staged.stats


def test_chain_is_used_and_described(tiny: dict[str, Any]) -> None:
    be = OnnxRuntimeBackend(tiny["bundle"], threads=1)
    assert be.chain() is not None and "chain one session" in be.describe()
    off = OnnxRuntimeBackend(tiny["bundle"], threads=1, compose=False)
    assert off.chain() is None and "chain off (compose=False)" in off.describe()
    with pytest.raises(DGConvertError, match="compose=True was requested"):  # not CPU EP alone
        OnnxRuntimeBackend(tiny["bundle"], threads=1, compose=True,
                           providers=["CPUExecutionProvider", "CPUExecutionProvider"])


@pytest.mark.parametrize("where", ["calibrated", "all exit at gate 0", "nobody exits",
                                   "gate 1 off"])
def test_chain_equals_stage_sessions(tiny: dict[str, Any], where: str) -> None:
    k = tiny["bundle"].num_gates
    t = {"calibrated": tiny["t"], "all exit at gate 0": [-np.inf] * k,
         "nobody exits": [np.inf] * k,
         "gate 1 off": [v if g != 1 else np.inf for g, v in enumerate(tiny["t"])]}[where]
    a, b, stats_a, stats_b = _predict_both(tiny, t)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.exit_stage, b.exit_stage)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    assert stats_a == stats_b
    n = len(tiny["pixels"])
    if where == "all exit at gate 0":
        assert stats_a == [n] + [0] * k and not a.exit_stage.any()
    elif where == "nobody exits":
        assert stats_a == [n] * (k + 1) and (a.exit_stage == k).all()
    elif where == "gate 1 off":
        assert 1 not in a.exit_stage and len(set(a.exit_stage.tolist())) == k
    else:
        assert len(set(a.exit_stage.tolist())) == k + 1  # rows leave at every exit


def test_off_gates_cost_nothing(tiny: dict[str, Any]) -> None:
    """A chain composed without the gates that are off has neither their heads nor their
    compaction; with every gate off it is the full model, single images included."""
    models = _stage_models(tiny["bundle"])
    k = tiny["bundle"].num_gates
    ops = [n.op_type for n in compose_chain(models, range(k)).graph.node]
    on = [n.op_type for n in compose_chain(models).graph.node]
    assert "NonZero" not in ops and on.count("NonZero") == k
    assert ops.count("Gemm") == 1 and on.count("Gemm") == k + 1  # the classifier alone
    with pytest.raises(ChainError, match=r"gates \[5\] cannot be off"):
        compose_chain(models, [5])
    r = GatedRunner(tiny["bundle"], backend="onnxruntime", thresholds=[np.inf] * k)
    full = r.full_logits(tiny["pixels"])
    for batch in (tiny["pixels"][:1], tiny["pixels"]):
        res = r.predict(batch)
        np.testing.assert_array_equal(res.labels, full[: len(batch)].argmax(1))
        assert (res.exit_stage == k).all()
    assert list(r.backend.chain_variants) == [frozenset(range(k))]  # batch 1 used it too
    assert r.stats == [len(tiny["pixels"]) + 1] * (k + 1)


def test_a_chain_that_cannot_leave_gates_out_says_so(tiny: dict[str, Any]) -> None:
    """When the chain without an off gate cannot be composed, the full chain runs (off
    gates computed), results unchanged, and the fast path is reported off."""
    r = GatedRunner(tiny["bundle"], backend="onnxruntime", thresholds=[np.inf] * 3)
    staged = GatedRunner(tiny["bundle"], backend="onnxruntime", compose=False,
                         thresholds=[np.inf] * 3)
    stage1 = r.backend._graphs[1]  # its features gathered twice: which is compaction?
    gather = next(n for n in stage1.graph.node if n.op_type == "Gather" and n.input[0] == "x")
    stage1.graph.node.append(onnx.helper.make_node("Gather", list(gather.input), ["x2"]))
    res = r.predict(tiny["pixels"])
    np.testing.assert_array_equal(res.labels, staged.predict(tiny["pixels"]).labels)
    off = r.backend.fast_paths_off()
    assert len(off) == 1 and "chain without off gates off: gates [0, 1, 2]" in off[0]
    assert "2 Gather nodes read 's1/x'" in off[0]


def test_chain_outputs_per_stage_rows(tiny: dict[str, Any]) -> None:
    be = OnnxRuntimeBackend(tiny["bundle"], threads=1)
    x = prepare_images(tiny["pixels"], [1, 28, 28], tiny["bundle"].normalization)
    t = np.asarray(tiny["t"], np.float32)
    outs = be.chain()(x, t)
    assert len(outs) == tiny["bundle"].num_stages
    rows = len(x)
    for k, (score, label) in enumerate(outs):
        assert score.shape == label.shape == (rows,)
        assert score.dtype == np.float32 and label.dtype == np.int64
        if k < len(t):
            rows = int((~(score >= t[k])).sum())  # the rows that continue


def _session(model: onnx.ModelProto) -> Any:
    import onnxruntime as ort

    so = session_options(1)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def test_self_check_catches_a_wrong_graph(tiny: dict[str, Any]) -> None:
    import onnxruntime as ort

    be = OnnxRuntimeBackend(tiny["bundle"], threads=1, compose=False, fuse_boundaries=False)
    models = _stage_models(tiny["bundle"])
    gemm = next(n for n in models[1].graph.node if n.op_type == "Gemm")
    init = next(i for i in models[1].graph.initializer if i.name == gemm.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * -1.0, init.name))
    sess = _session(compose_chain(models))
    chain = ChainSession(sess, direct_run(sess), ort.RunOptions(), len(models))
    x = np.random.default_rng(3).standard_normal((16, 1, 28, 28)).astype(np.float32)
    with pytest.raises(ChainError, match="stage 1 (scores|labels) differ"):
        check_chain(chain, be.run_stage, x)
    good = compose_chain(_stage_models(tiny["bundle"]))
    sess = _session(good)
    t = check_chain(ChainSession(sess, direct_run(sess), ort.RunOptions(), len(models)),
                    be.run_stage, x)
    assert t.shape == (tiny["bundle"].num_gates,)


def test_compose_refuses_graphs_outside_the_contract(tiny: dict[str, Any]) -> None:
    models = _stage_models(tiny["bundle"])
    with pytest.raises(ChainError, match="at least 2 stage graphs"):
        compose_chain(models[:1])
    broken = _stage_models(tiny["bundle"])
    kept = [o for o in broken[1].graph.output if o.name != "score"]
    del broken[1].graph.output[:]
    broken[1].graph.output.extend(kept)
    with pytest.raises(ChainError, match="stage 1 graph outputs .* expected"):
        compose_chain(broken)


def test_chain_is_thread_safe(tiny: dict[str, Any]) -> None:
    r = GatedRunner(tiny["bundle"], backend="onnxruntime", thresholds=tiny["t"])
    x = tiny["pixels"]
    want = r.predict(x)
    got: list[Any] = [None] * 4

    def work(i: int) -> None:
        got[i] = [r.predict(x) for _ in range(5)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for results in got:
        for res in results:
            np.testing.assert_array_equal(res.labels, want.labels)
            np.testing.assert_array_equal(res.exit_stage, want.exit_stage)


def test_composed_graph_saves_and_reloads(tiny: dict[str, Any], tmp_path: Path) -> None:
    """The composed model is a valid ONNX model (checker) with the documented I/O."""
    model = compose_chain(_stage_models(tiny["bundle"]))
    onnx.checker.check_model(model)
    names = [o.name for o in model.graph.output]
    k = tiny["bundle"].num_stages
    assert names == [f"s{i}/{v}" for i in range(k) for v in ("score", "label")]
    assert [i.name for i in model.graph.input][-1] == "thresholds"
    onnx.save(model, tmp_path / "chain.onnx")
    assert onnx.load(str(tmp_path / "chain.onnx")).graph.node


@pytest.mark.parametrize("gate", ["confidence", "softmax", "mlp"])
def test_chain_with_every_gate_type(exported_bundle: Callable[..., Any], gate: str) -> None:
    """The composed graph is generic over gate heads: EENet confidence and softmax gates
    give the same results as the stage sessions, with rows leaving at every exit."""
    bundle = exported_bundle("densenet", gate).bundle
    pixels = np.random.default_rng(5).integers(0, 256, size=(64, 1, 28, 28), dtype=np.uint8)
    rec = GatedRunner(bundle, backend="onnxruntime", compose=False).collect(pixels)
    t = [float(np.quantile(rec.scores[:, k], 0.6)) for k in range(rec.scores.shape[1])]
    chained = GatedRunner(bundle, backend="onnxruntime", thresholds=t)
    staged = GatedRunner(bundle, backend="onnxruntime", thresholds=t, compose=False)
    assert chained.backend.chain() is not None
    a, b = chained.predict(pixels), staged.predict(pixels)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.exit_stage, b.exit_stage)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    assert chained.stats == staged.stats
    assert len(set(a.exit_stage.tolist())) == bundle.num_stages
