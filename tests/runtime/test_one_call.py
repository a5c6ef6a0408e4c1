"""Batch 1 and the chain in one graph (:mod:`dgconvert.runtime.passes.one_call`): each
branch equals its graph run alone, the backend runs both paths on one session (off-gate
variants too), and a merge that fails leaves two working sessions and says so."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dgconvert.runtime import GatedRunner
from dgconvert.runtime import onnxruntime_backend as backend_module
from dgconvert.runtime.onnxruntime_backend import OnnxRuntimeBackend
from dgconvert.runtime.passes.chain import THRESHOLDS, ChainError, compose_chain
from dgconvert.runtime.passes.if_graph import OUTPUTS, compose_if
from dgconvert.runtime.passes.one_call import ONE_IMAGE, compose_one_call


@pytest.fixture(scope="module")
def tiny(exported_bundle: Callable[..., Any]) -> Any:
    return exported_bundle("resnet")


def _session(model: onnx.ModelProto) -> Any:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_each_branch_equals_its_graph_alone(tiny: Any) -> None:
    b = tiny.bundle
    models = [onnx.load(str(b.stage_file(k))) for k in range(b.num_stages)]
    single, chain = compose_if(models), compose_chain(models)
    merged = compose_one_call(single, chain)
    onnx.checker.check_model(merged)
    names = [o.name for o in merged.graph.output]
    chain_names = [o.name for o in chain.graph.output]
    assert names == [*OUTPUTS, *chain_names]
    alone_if, alone_chain, both = _session(single), _session(chain), _session(merged)
    image = single.graph.input[0].name
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, *b.input_shape)).astype(np.float32)
    first = alone_chain.run([chain_names[0]], {image: x, THRESHOLDS: np.full(
        b.num_gates, np.inf, np.float32)})[0]
    for t in (np.full(b.num_gates, np.inf, np.float32), np.full(b.num_gates, -np.inf, np.float32),
              np.full(b.num_gates, np.median(first), np.float32)):
        for i in range(3):  # batch 1 through the If branch
            got = both.run(None, {image: x[i:i + 1], THRESHOLDS: t, ONE_IMAGE: np.array([True])})
            want = alone_if.run(None, {image: x[i:i + 1], THRESHOLDS: t})
            for g, w in zip(got[:3], want, strict=True):
                np.testing.assert_array_equal(g, w)
            assert all(g.size == 0 for g in got[3:])  # the chain's outputs: empty
        for rows in (x, x[:1]):  # the chain branch, one row included
            got = both.run(None, {image: rows, THRESHOLDS: t, ONE_IMAGE: np.array([False])})
            want = alone_chain.run(None, {image: rows, THRESHOLDS: t})
            for g, w in zip(got[3:], want, strict=True):
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
            assert all(g.size == 0 for g in got[:3])


def test_graphs_that_read_different_inputs_are_refused(tiny: Any) -> None:
    b = tiny.bundle
    models = [onnx.load(str(b.stage_file(k))) for k in range(b.num_stages)]
    chain = compose_chain(models)
    chain.graph.input[0].name = "pixels"
    with pytest.raises(ChainError, match="expected both to read the same images"):
        compose_one_call(compose_if(models), chain)


def test_backend_runs_both_paths_and_their_variants_on_one_session(tiny: Any) -> None:
    b = tiny.bundle
    be = OnnxRuntimeBackend(b, threads=1)
    try:
        assert be.one_session and be.fast_paths_off() == []
        off = frozenset({0})
        t = np.zeros(b.num_gates, np.float32)
        t[0] = np.inf
        x = np.random.default_rng(1).standard_normal((4, *b.input_shape)).astype(np.float32)
        be.chain()(x, t)
        be.single()(x[:1], t)
        assert be.chain_variants[off].session is be.in_graph_exits.variants[off].session
        assert be.chain_variants[off].session is not be.chain_session.session
        every = frozenset(range(b.num_gates))  # the full model: the chain alone serves it
        be.chain()(x, np.full(b.num_gates, np.inf, np.float32))
        assert be.chain_variants[every].session.get_inputs()[-1].name == THRESHOLDS
    finally:
        be.close()


def test_a_merge_that_fails_leaves_two_sessions_and_says_why(
        tiny: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Fault injection: the merged graph cannot be composed. Both paths still run (each on
    its own session, spinning within runs), equal to the stage chain; the user is told."""
    def refuse(single: Any, chain: Any) -> Any:
        raise ChainError("injected: no merged graph")

    monkeypatch.setattr(backend_module, "compose_one_call", refuse)
    b = tiny.bundle
    with caplog.at_level(logging.WARNING, logger="dgconvert.runtime.onnxruntime_backend"):
        be = OnnxRuntimeBackend(b, threads=1)
    try:
        assert not be.one_session
        assert be.in_graph_exits.full.session is not be.chain_session.session
        assert be.fast_paths_off() == [
            "one session for batch 1 and the chain off: injected: no merged graph"]
        assert "separate sessions" in caplog.text
        assert "within runs in one-session calls" in be.describe()
        pixels = np.random.default_rng(2).integers(0, 256, (6, 1, 28, 28), dtype=np.uint8)
        runner = GatedRunner(b, backend=be, paths="default")
        staged = GatedRunner(b, backend="onnxruntime", compose=False)
        for rows in (pixels[:1], pixels):
            got, want = runner.predict(rows), staged.predict(rows)
            np.testing.assert_array_equal(got.labels, want.labels)
            np.testing.assert_array_equal(got.exit_stage, want.exit_stage)
    finally:
        be.close()
