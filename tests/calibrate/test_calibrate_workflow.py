"""`dgconvert calibrate` end to end on a small exported bundle: write-back, cache, errors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from dgconvert.calibrate import CalibrationError, CalibrationResult
from dgconvert.calibrate.workflow import calibrate_bundle
from dgconvert.cli import main
from dgconvert.core.bundle import Bundle
from dgconvert.core.errors import InputError
from dgconvert.data import DataError
from dgconvert.runtime import GatedRunner


@pytest.fixture(scope="module")
def exported(exported_bundle: Callable[..., Any]) -> Path:
    """The session's export; tests never touch it, they work on their own copy."""
    return exported_bundle("densenet", "softmax").bundle.path


@pytest.fixture()
def bundle_path(tmp_path: Path, exported: Path) -> Path:
    """A private copy of the exported bundle (its own manifest and records cache)."""
    return Path(shutil.copytree(exported, tmp_path / "b.dg"))


@pytest.fixture()
def data(tmp_path: Path, exported: Path) -> str:
    """A labelled .npz whose labels follow the (random) model's own final prediction on
    most samples, so accuracy targets are meaningful."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (600, 1, 28, 28), dtype=np.uint8)
    b = Bundle.load(exported)
    pred = GatedRunner(b, backend="onnxruntime", thresholds=[np.inf] * b.num_gates).predict(x).labels
    y = np.where(rng.random(len(x)) < 0.8, pred, rng.integers(0, 10, len(x)))
    path = tmp_path / "cal.npz"
    np.savez(path, x=x, y=y.astype(np.int64))
    return str(path)


def _tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_calibrate_writes_thresholds_and_runtime_uses_them(bundle_path: Path, data: str) -> None:
    work = bundle_path
    before = Bundle.load(work).thresholds
    out = calibrate_bundle(work, data, max_drop=0.02, backend="onnxruntime")
    b = Bundle.load(work)
    assert isinstance(out, CalibrationResult)  # the one result type of calibrate()
    assert b.thresholds == pytest.approx(out.thresholds)
    assert b.thresholds != before
    cal = b.manifest.calibration
    assert cal["data_hash"] and cal["method"] and cal["target_accuracy"] == pytest.approx(
        out.full_accuracy - 0.02
    )
    assert out.accuracy >= out.target_accuracy
    assert out.context["requested"]["max_drop"] == 2.0  # recorded in the CLI's points
    assert not out.context["records_cached"]
    assert cal["promise"] == out.promise and cal["mode"] == "expected"
    # the runtime's default thresholds are the calibrated ones
    assert GatedRunner(work, backend="onnxruntime").thresholds == pytest.approx(
        np.float32(out.thresholds).tolist()
    )
    # re-calibrating for another target reuses the collected scores
    again = calibrate_bundle(work, data, max_drop=0.05, backend="onnxruntime", write=False)
    assert again.context["records_cached"]
    assert again.full == out.full  # the same records, hence the same full-model row
    assert Bundle.load(work).thresholds == b.thresholds  # write=False leaves it alone


def test_cli_json_plot_and_dry_run(tmp_path: Path, bundle_path: Path, data: str) -> None:
    before = _tree(bundle_path)
    res = CliRunner().invoke(
        main,
        ["calibrate", str(bundle_path), "--data", data, "--max-drop", "1", "--dry-run",
         "--backend", "onnxruntime", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "f.png")],
    )
    assert res.exit_code == 0, res.output
    assert "| Model |" in res.output and "dry run" in res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    for key in ("thresholds", "target_accuracy", "accuracy", "full_accuracy", "heldout_accuracy",
                "cost_fraction", "exit_fractions", "method"):
        assert key in rep
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _tree(bundle_path) == before  # nothing written: no manifest change, no cache
    for key in ("mode", "promise", "expected", "selection"):
        assert key in rep
    assert rep["mode"] == "expected" and rep["expected"]["n"] > 0


def test_unreachable_target(bundle_path: Path, data: str) -> None:
    with pytest.raises(CalibrationError, match="full model"):
        calibrate_bundle(bundle_path, data, target_accuracy=0.9999, backend="onnxruntime", write=False)


def test_labels_outside_the_classes(tmp_path: Path, bundle_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((4, 1, 28, 28), np.uint8), y=np.array([0, 1, 12, 3]))
    with pytest.raises(DataError, match="12"):
        calibrate_bundle(bundle_path, str(path), max_drop=0.01, backend="onnxruntime", write=False)


def test_data_that_does_not_fit_the_bundle(tmp_path: Path, bundle_path: Path) -> None:
    path = tmp_path / "rgb.npz"
    np.savez(path, x=np.zeros((4, 3, 32, 32), np.uint8), y=np.array([0, 1, 2, 3]))
    with pytest.raises(InputError, match=r"expected \[N, 1, 28, 28\]"):
        calibrate_bundle(bundle_path, str(path), max_drop=0.01, backend="onnxruntime", write=False)


def test_cli_needs_exactly_one_target(bundle_path: Path, data: str) -> None:
    res = CliRunner().invoke(main, ["calibrate", str(bundle_path), "--data", data])
    assert res.exit_code != 0 and "exactly one of --target-acc" in res.output


def test_measure_adds_timed_columns(bundle_path: Path, data: str) -> None:
    """--measure times the rows through the bench layer and records them."""
    res = CliRunner().invoke(
        main,
        ["calibrate", str(bundle_path), "--data", data, "--max-drop", "2", "--measure",
         "--batch-size", "32", "--threads", "1", "--backend", "onnxruntime"],
    )
    assert res.exit_code == 0, res.output
    ms = Bundle.load(bundle_path).manifest.calibration["measured_ms_per_image"]
    assert set(ms) == {"full", "ours", "sequential", "shared"}
    assert all(v > 0 for v in ms.values())
    header = next(line for line in res.output.splitlines() if "| Model" in line)
    assert "ms/image" in header and "Speed-up" in header


def test_latency_costs_with_fewer_images_than_the_batch(bundle_path: Path, tmp_path: Path,
                                                       data: str) -> None:
    """--cost latency on 20 images at --batch-size 64 times batches of 20 (no division by
    zero), measures each gate's cost, calibrates in ms and turns off the gates that do not
    pay (their thresholds +inf, null in JSON)."""
    small = tmp_path / "small.npz"
    with np.load(data) as z:
        np.savez(small, x=z["x"][:20], y=z["y"][:20])
    res = CliRunner().invoke(
        main,
        ["calibrate", str(bundle_path), "--data", str(small), "--max-drop", "5", "--cost",
         "latency", "--batch-size", "64", "--threads", "1", "--backend", "onnxruntime",
         "--json", str(tmp_path / "r.json")],
    )
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    costs = rep["exit_costs"]
    k = Bundle.load(bundle_path).num_gates
    assert rep["cost_unit"] == "ms" and len(costs) == k + 1
    assert all(c > 0 for c in costs) and costs == sorted(costs)
    paid = rep["selection"]["gates_that_pay"]
    assert len(paid["gate_ms"]) == k and all(v >= 0 for v in paid["gate_ms"])
    assert len(paid["body_ms"]) == k + 1 and paid["batch_size"] == 20
    assert len(paid["tried"]) == 2 ** k and sorted(paid["on"] + paid["off"]) == list(range(k))
    assert all(rep["thresholds"][j] is None for j in paid["off"])
    assert "Measured cost per image of each gate that is on (batch 20)" in res.output


def test_records_cache_is_keyed_by_backend_identity(bundle_path: Path) -> None:
    """Scores from one backend/precision/engine set are never reused for another."""
    from dgconvert.calibrate.collect import cache_path, engine_identity

    class Fake:
        def __init__(self, name: str, record: dict | None = None) -> None:
            self.name, self.record, self.key = name, record, "gpu-key"

    b = Bundle.load(bundle_path)
    ids = [
        engine_identity(Fake("onnxruntime")),
        engine_identity(Fake("onnxruntime-gpu")),
        engine_identity(Fake("tensorrt", {"precision": "fp16", "stages": [{"sha256": "a"}]})),
        engine_identity(Fake("tensorrt", {"precision": "fp32", "stages": [{"sha256": "a"}]})),
        engine_identity(Fake("tensorrt", {"precision": "fp16", "stages": [{"sha256": "b"}]})),
    ]
    paths = {cache_path(b, "data", "digest", i) for i in ids}
    assert len(paths) == len(ids)
    assert cache_path(b, "data", "digest", ids[0]) == cache_path(b, "data", "digest", ids[0])
