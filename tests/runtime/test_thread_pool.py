"""share_thread_pool: every session of the process on ONNX Runtime's one global pool.

The switch is process-wide and cannot be undone, so each case runs in a fresh interpreter;
its results are compared here, sample by sample, with a runner that has a pool per session.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dgconvert.runtime import GatedRunner

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str) -> dict[str, Any]:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


SHARED = """
import json, sys
import numpy as np
import onnxruntime as ort
from dgconvert.bench.systems import OnnxFullDefault
from dgconvert.core.errors import BackendOptionError
from dgconvert.runtime import GatedRunner, share_thread_pool, shared_threads

out = {"pool": share_thread_pool(2), "again": share_thread_pool(2)}
try:
    share_thread_pool(3)
except BackendOptionError as exc:
    out["resize"] = str(exc)
bundle, pixels = sys.argv[1], np.load(sys.argv[2])["x"]
t = json.loads(sys.argv[3])
runner = GatedRunner(bundle, backend="onnxruntime", thresholds=t)
out["describe"] = runner.backend.describe()
for name, r in (("gated", runner),
                ("stages", GatedRunner(bundle, backend="onnxruntime", thresholds=t,
                                       compose=False))):
    res = [r.predict(pixels[i:i + n]) for i, n in ((0, 1), (1, 1), (2, 7), (9, 55))]
    out[name] = {"labels": np.concatenate([x.labels for x in res]).tolist(),
                 "stage": np.concatenate([x.exit_stage for x in res]).tolist(),
                 "scores": np.concatenate([x.scores for x in res]).tolist()}
default = OnnxFullDefault(runner)
out["default_label"] = default.label
out["default_labels"] = default.predict(pixels[:8]).labels.tolist()
for bad in ({"threads": 1}, {"spinning": "run"}):
    try:
        GatedRunner(bundle, backend="onnxruntime", **bad)
    except BackendOptionError as exc:
        out[f"refused {sorted(bad)[0]}"] = str(exc)
try:  # ORT itself refuses a session with a pool of its own now
    ort.InferenceSession(runner.bundle.full_file().as_posix(), providers=["CPUExecutionProvider"])
except Exception as exc:
    out["own_pool"] = str(exc)
out["shared"] = shared_threads()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def case(exported_bundle: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
         ) -> dict[str, Any]:
    b = exported_bundle("resnet").bundle
    pixels = np.random.default_rng(5).integers(0, 256, (64, 1, 28, 28), dtype=np.uint8)
    rec = GatedRunner(b, backend="onnxruntime", compose=False).collect(pixels)
    t = [float(np.quantile(rec.scores[:, k], 0.5)) for k in range(rec.num_gates)]
    path = tmp_path_factory.mktemp("pool") / "x.npz"
    np.savez(path, x=pixels)
    ref = GatedRunner(b, backend="onnxruntime", thresholds=t, compose=False).predict(pixels)
    out = _run(SHARED, str(b.path), str(path), json.dumps(t))
    near = (np.abs(rec.scores - np.asarray(t, np.float32)) < 1e-4).any(axis=1)
    return {"ref": ref, "out": out, "near": near, "rec": rec}


def test_shared_pool_results_equal_a_pool_per_session(case: dict[str, Any]) -> None:
    ref, out, ok = case["ref"], case["out"], ~case["near"]
    for name in ("gated", "stages"):
        got = out[name]
        np.testing.assert_array_equal(np.asarray(got["labels"])[ok], ref.labels[ok])
        np.testing.assert_array_equal(np.asarray(got["stage"])[ok], ref.exit_stage[ok])
        np.testing.assert_allclose(np.asarray(got["scores"])[ok], ref.scores[ok],
                                   rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out["default_labels"], case["rec"].final_labels[:8])


def test_shared_pool_is_described_and_refuses_per_session_settings(
        case: dict[str, Any]) -> None:
    out = case["out"]
    assert out["pool"] == out["again"] == out["shared"] == 2
    assert "already shares a pool of 2 threads" in out["resize"]
    assert "one shared pool of 2 threads" in out["describe"]
    assert "shared pool of 2 threads" in out["default_label"]
    assert "threads=1" in out["refused threads"] and "share_thread_pool" in out["refused threads"]
    assert "spinning='run'" in out["refused spinning"]
    assert "use_per_session_threads" in out["own_pool"]


def test_no_shared_pool_by_default() -> None:
    out = _run("""
        import json
        from dgconvert.runtime import shared_threads
        from dgconvert.runtime.thread_pool import new_session_options
        print(json.dumps({"shared": shared_threads(),
                          "per_session": new_session_options().use_per_session_threads}))
    """)
    assert out == {"shared": None, "per_session": True}
