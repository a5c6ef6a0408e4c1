"""The exit rule is the same everywhere: runtime (batch-1, stage-by-stage and one-session
chain paths), the torch reference and the exit arithmetic of calibration. A gate that is off
(+inf) never exits, whatever its score; a NaN score never exits; +inf exits where the gate
is on. Property-based over batch sizes, max_batch and thresholds (with ties), and a
concurrency stress test."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dgconvert as dg
from dgconvert.core.exits import exit_points
from dgconvert.core.preprocess import prepare_images
from dgconvert.runtime import GatedRunner
from tests.models import NORMALIZATION, build

PATHS = {"chain": {}, "stage sessions": {"compose": False},
         "contract graphs": {"fuse_boundaries": False, "compose": False}}


def _reference(rec: Any, t: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Labels and exit stages by the exit rule on the runtime's own collected scores."""
    stage = exit_points(rec.scores, np.asarray(t, np.float32))
    labels = np.concatenate([rec.labels, rec.final_labels[:, None]], axis=1)
    return labels[np.arange(len(stage)), stage], stage


@pytest.fixture(scope="module")
def nonfinite(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A network whose gate 0 scores +inf for every sample and gate 1 NaN."""
    net = build("resnet", gate={"type": "dgate", "score": "max"})
    with torch.no_grad():
        net.gates[0].linear.bias[3] = float("inf")
        net.gates[1].linear.bias[:] = float("nan")
    bundle = dg.export(net, tmp_path_factory.mktemp("nf") / "m.dg", verify=False)
    pixels = np.random.default_rng(2).integers(0, 256, (40, 1, 28, 28), dtype=np.uint8)
    return {"net": net, "bundle": bundle, "pixels": pixels}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize(("t", "expected"), [
    ([np.inf, -np.inf, 0.0], 2),  # gate 0 off despite +inf scores; NaN never exits at gate 1
    ([5.0, -np.inf, np.inf], 0),  # +inf scores exit where the gate is on
    ([np.inf, -np.inf, np.inf], 3),
])
def test_nonfinite_scores(nonfinite: dict[str, Any], path: str, t: list[float],
                          expected: int) -> None:
    x = nonfinite["pixels"]
    ref = nonfinite["net"].gated_forward(
        torch.from_numpy(prepare_images(x, [1, 28, 28], NORMALIZATION)), t, return_scores=True)
    for batch in (1, 7, 40):
        r = GatedRunner(nonfinite["bundle"], backend="onnxruntime", thresholds=t,
                        max_batch=batch, **PATHS[path])
        res = r.predict(x)
        if expected < 3:
            assert (res.exit_stage == expected).all() or expected == 2
        np.testing.assert_array_equal(res.exit_stage, ref.exit_stage)
        np.testing.assert_array_equal(res.labels, ref.labels)
        rec = r.collect(x)
        labels, stage = _reference(rec, t)
        np.testing.assert_array_equal(res.exit_stage, stage)
        np.testing.assert_array_equal(res.labels, labels)
    if t[0] == np.inf:  # a gate that is off never lets a sample out, +inf score or not
        assert not (res.exit_stage == 0).any() and not (res.exit_stage == 1).any()


@pytest.fixture(scope="module")
def pool(exported_bundle: Callable[..., Any]) -> dict[str, Any]:
    e = exported_bundle("resnet")
    pixels = np.random.default_rng(7).integers(0, 256, (300, 1, 28, 28), dtype=np.uint8)
    runners = {p: GatedRunner(e.bundle, backend="onnxruntime", **o) for p, o in PATHS.items()}
    rec = runners["stage sessions"].collect(pixels)
    x = torch.from_numpy(prepare_images(pixels, [1, 28, 28], NORMALIZATION))
    with torch.no_grad():
        torch_scores = e.net.all_exits(x).scores.numpy()
    return {"net": e.net, "pixels": pixels, "x": x, "rec": rec, "runners": runners,
            "torch_scores": torch_scores}


def _thresholds(data: st.DataObject, scores: np.ndarray) -> list[float]:
    out = []
    for k in range(scores.shape[1]):
        kind = data.draw(st.sampled_from(["inf", "-inf", "tie", "quantile"]))
        if kind == "inf":
            out.append(np.inf)
        elif kind == "-inf":
            out.append(-np.inf)
        elif kind == "tie":  # exactly a score some sample has
            out.append(float(scores[data.draw(st.integers(0, len(scores) - 1)), k]))
        else:
            out.append(float(np.quantile(scores[:, k], data.draw(st.floats(0, 1)))))
    return out


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_runner_equals_the_exit_rule_on_every_path(pool: dict[str, Any], data: st.DataObject) -> None:
    rec = pool["rec"]
    n = data.draw(st.integers(0, 300), label="batch")
    rows = np.asarray(data.draw(st.permutations(range(300)))[:n], np.int64)
    t = _thresholds(data, rec.scores)
    path = data.draw(st.sampled_from(list(PATHS)), label="path")
    r = pool["runners"][path]
    r.thresholds = t
    r.max_batch = data.draw(st.integers(1, 300), label="max_batch")
    r.reset_stats()
    res = r.predict(pool["pixels"][rows])
    k_gates = len(t)
    # the rule on the runner's own numbers: an exit at gate k means score >= t[k], gate on
    gate_exit = res.exit_stage < k_gates
    t_arr = np.asarray(t + [np.inf], np.float32)[res.exit_stage]
    assert (res.scores[gate_exit] >= t_arr[gate_exit]).all()
    assert not np.isposinf(t_arr[gate_exit]).any()  # never at a gate that is off
    assert r.stats == [int((res.exit_stage >= k).sum()) for k in range(k_gates + 1)]
    # against the rule on the collected scores and against the torch reference, wherever
    # float noise (another batch composition, another kernel) cannot flip a comparison
    labels, stage = _reference(rec.subset(rows), t)
    tt = np.asarray(t, np.float32)
    for scores in (rec.scores[rows], pool["torch_scores"][rows]):
        near = (np.abs(scores - tt) <= 1e-4 * np.maximum(1.0, np.abs(tt))).any(axis=1)
        np.testing.assert_array_equal(res.exit_stage[~near], stage[~near])
        np.testing.assert_array_equal(res.labels[~near], labels[~near])
    ref = pool["net"].gated_forward(pool["x"][rows], t, return_scores=True)
    near = (np.abs(pool["torch_scores"][rows] - tt) < 1e-4).any(axis=1)
    np.testing.assert_array_equal(ref.exit_stage[~near], stage[~near])
    np.testing.assert_array_equal(ref.labels[~near], labels[~near])


def test_eight_threads_equal_serial(pool: dict[str, Any]) -> None:
    rec = pool["rec"]
    t = [float(np.quantile(rec.scores[:, k], 0.6)) for k in range(rec.num_gates)]
    r = GatedRunner(pool["runners"]["chain"].bundle, backend="onnxruntime", thresholds=t,
                    max_batch=32)
    rng = np.random.default_rng(11)
    jobs = [[rng.choice(300, size=int(rng.integers(1, 48)), replace=False) for _ in range(200)]
            for _ in range(8)]
    serial = GatedRunner(r.bundle, backend="onnxruntime", thresholds=t, max_batch=32)
    want = [[serial.predict(pool["pixels"][rows]) for rows in job] for job in jobs]
    got: list[list[Any]] = [[] for _ in jobs]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            got[i] = [r.predict(pool["pixels"][rows]) for rows in jobs[i]]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for g_job, w_job in zip(got, want, strict=True):
        for g, w in zip(g_job, w_job, strict=True):
            np.testing.assert_array_equal(g.labels, w.labels)
            np.testing.assert_array_equal(g.exit_stage, w.exit_stage)
            np.testing.assert_array_equal(g.scores, w.scores)
    assert r.stats == serial.stats  # every row counted exactly once


def test_runner_refuses_nan_thresholds(pool: dict[str, Any], tmp_path: Path) -> None:
    from dgconvert.core.errors import InputError

    with pytest.raises(InputError, match="NaN"):
        GatedRunner(pool["runners"]["chain"].bundle, backend="onnxruntime",
                    thresholds=[np.nan, 1, 1])
