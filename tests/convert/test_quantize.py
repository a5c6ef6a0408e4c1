"""Int8 bundles (``dgconvert quantize``): quantized torch-free, checked against the fp32
source, run with int8 stage boundaries, calibrated against the fp32 source, bad input refused."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from dgconvert.cli import main
from dgconvert.convert.quantize import (
    QuantizationMismatch,
    QuantizeError,
    QuantizeSettings,
    find_source,
    quantize_bundle,
    quantized_stages,
    source_digest,
    verify_quantized,
)
from dgconvert.core.bundle import Bundle
from dgconvert.core.manifest import Manifest
from dgconvert.runtime import GatedRunner

ROOT = Path(__file__).resolve().parents[2]
FEW = QuantizeSettings(calibration_images=32)


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


@pytest.fixture(scope="module")
def int8(exported_bundle: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[Bundle, Bundle]:
    """The test ResNet bundle and its int8 copy (calibrated on 32 images, checked on 32)."""
    src = exported_bundle("resnet").copy_to(tmp_path_factory.mktemp("q"))
    q, _ = quantize_bundle(src, src.path.parent / "int8.dg", _pixels(64), data="pixels",
                           settings=FEW)
    return src, q


def test_quantizes_every_stage_and_records_it(int8: tuple[Bundle, Bundle]) -> None:
    src, q = int8
    assert quantized_stages(q) == list(range(q.num_stages))
    rec = q.manifest.quantization
    assert rec is not None and q.manifest.precision == "int8" and src.manifest.precision == "fp32"
    assert rec.source_digest == source_digest(src) and rec.calibration_images == 32
    assert rec.settings["per_channel"] is True and rec.settings["keep_fp32"] == "gates"
    assert len(rec.verification["stage_agreement"]) == q.num_stages
    assert find_source(q).path == src.path
    # the record survives a round trip; a manifest without it still loads as fp32
    again = Manifest.parse(json.loads(q.manifest.dumps()))
    assert again.quantization == rec
    raw = json.loads(q.manifest.dumps())
    del raw["quantization"]
    assert Manifest.parse(raw).precision == "fp32"
    info = CliRunner().invoke(main, ["info", str(q.path)])
    assert info.exit_code == 0 and "precision: int8" in info.output and "MinMax" in info.output


def test_quantizes_and_runs_without_torch(exported_bundle: Callable[..., Any],
                                          tmp_path: Path) -> None:
    src = exported_bundle("resnet").copy_to(tmp_path)
    np.save(tmp_path / "px.npy", _pixels(48))
    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch fails
import numpy as np
from dgconvert.convert.quantize import QuantizeSettings, quantize_bundle
from dgconvert.runtime import GatedRunner
px = np.load({str(tmp_path / "px.npy")!r})
q, _ = quantize_bundle({str(src.path)!r}, {str(tmp_path / "q.dg")!r}, px,
                       settings=QuantizeSettings(calibration_images=24))
with GatedRunner(q, backend="onnxruntime", thresholds=[0.5] * q.num_gates) as r:
    res = r.predict(px)
print(len(res.labels), "torch" in sys.modules and sys.modules["torch"] is not None)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["48", "False"]


def test_int8_boundaries_match_the_contract_graphs_sample_by_sample(
        int8: tuple[Bundle, Bundle]) -> None:
    _, q = int8
    px = _pixels(96, seed=5)
    with GatedRunner(q, backend="onnxruntime", fuse_boundaries=False, compose=False) as plain:
        rec = plain.collect(px)
    # thresholds at the scores' median: rows exit at every gate
    t = [float(np.median(rec.scores[:, k])) for k in range(q.num_gates)]
    with GatedRunner(q, backend="onnxruntime", thresholds=t, compose=False) as fast, \
            GatedRunner(q, backend="onnxruntime", thresholds=t, fuse_boundaries=False,
                        compose=False) as ref, \
            GatedRunner(q, backend="onnxruntime", thresholds=t) as chain:
        assert "int8 (" in fast.backend.describe() and fast.backend.fast_paths_off() == []
        assert "heads pool int8" in fast.backend.describe()  # checked like the boundaries
        ops = {n.op_type for m in fast.backend._graphs for n in m.graph.node}
        assert "MatMulInteger" in ops
        want = ref.predict(px)
        assert len(set(want.exit_stage.tolist())) > 1
        for runner in (fast, chain):
            for bs in (1, 7, 96):
                got = runner.predict(px[:bs])
                np.testing.assert_array_equal(got.labels, want.labels[:bs])
                np.testing.assert_array_equal(got.exit_stage, want.exit_stage[:bs])
                np.testing.assert_allclose(got.scores, want.scores[:bs], rtol=1e-5, atol=1e-6)
        off = [t[0], float("inf"), t[2]]  # gate 1 off: the chain composed without its head
        chain.thresholds, ref.thresholds = off, off
        want_off, got_off = ref.predict(px), chain.predict(px)
        assert frozenset({1}) in chain.backend.chain_variants
        np.testing.assert_array_equal(got_off.labels, want_off.labels)
        np.testing.assert_array_equal(got_off.exit_stage, want_off.exit_stage)
        assert 1 not in set(got_off.exit_stage.tolist())
        out = fast.backend.run_stage(0, fast.prepare(px[:4]), None)
        contract = ref.backend.run_stage(0, ref.prepare(px[:4]), None)
        np.testing.assert_allclose(np.asarray(out.features), contract.features, atol=1e-6)


def test_integer_pooling_that_disagrees_is_refused_and_the_heads_stay_float(
        int8: tuple[Bundle, Bundle], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Fault injection: the integer pooling scales the sums twice over. The backend's check
    against the contract graphs refuses it, warns, and keeps the int8 boundaries with the
    heads as quantized (results still equal the contract graphs)."""
    import logging

    from dgconvert.runtime import onnxruntime_backend as backend_module
    from dgconvert.runtime.passes.int8_boundary import sum_pooled_heads

    def doubled(stages: Any, shapes: Any) -> Any:
        out = sum_pooled_heads(stages, shapes)
        for m in out.models:
            for init in m.graph.initializer:
                if init.name.endswith("/sum_pool/scale"):
                    init.CopyFrom(numpy_helper.from_array(
                        numpy_helper.to_array(init) * np.float32(2), init.name))
        return out

    monkeypatch.setattr(backend_module, "sum_pooled_heads", doubled)
    _, q = int8
    px = _pixels(24, seed=7)
    with caplog.at_level(logging.WARNING, logger="dgconvert.runtime.onnxruntime_backend"), \
            GatedRunner(q, backend="onnxruntime", thresholds=[0.5] * q.num_gates) as fast, \
            GatedRunner(q, backend="onnxruntime", thresholds=[0.5] * q.num_gates,
                        fuse_boundaries=False, compose=False) as ref:
        assert "integer pooling failed its check" in caplog.text
        assert "int8 (" in fast.backend.describe()
        assert "heads pool int8" not in fast.backend.describe()
        got, want = fast.predict(px), ref.predict(px)
        np.testing.assert_array_equal(got.labels, want.labels)
        np.testing.assert_array_equal(got.exit_stage, want.exit_stage)


def test_verification_catches_a_corrupted_stage(int8: tuple[Bundle, Bundle],
                                                tmp_path: Path) -> None:
    src, q = int8
    bad = Bundle.load(_copy(q.path, tmp_path / "bad.dg"))
    model = onnx.load(str(bad.stage_file(1)))
    flipped = 0
    for init in model.graph.initializer:  # every weight flips sign: stage 1 is broken
        if len(init.dims) != 4:
            continue
        w = numpy_helper.to_array(init)
        if init.data_type == onnx.TensorProto.INT8:
            w = (-w.astype(np.int16)).clip(-127, 127).astype(np.int8)
        elif init.data_type == onnx.TensorProto.UINT8:  # uint8 weights (no VNNI): mirrored
            w = (255 - w.astype(np.int16)).astype(np.uint8)
        else:
            continue
        init.CopyFrom(numpy_helper.from_array(w, init.name))
        flipped += 1
    assert flipped
    onnx.save(model, str(bad.stage_file(1)))
    bad.record_digests()
    px = _pixels(64, seed=9)
    assert verify_quantized(src, q, px).failures == []
    report = verify_quantized(src, bad, px)
    assert any(f.startswith("stage 1:") for f in report.failures)
    assert any(f.startswith("gate 1:") for f in report.failures)
    assert not any(f.startswith("stage 0:") or f.startswith("gate 0:") for f in report.failures)
    assert "stage 1" in str(QuantizationMismatch(report))


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_input_gets_a_clear_error_and_writes_nothing(int8: tuple[Bundle, Bundle],
                                                         tmp_path: Path) -> None:
    src, q = int8
    out = tmp_path / "out.dg"
    with pytest.raises(QuantizeError, match="is the fp32 bundle itself"):
        quantize_bundle(src, src.path, _pixels(8), settings=FEW, force=True)
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_bundle(q, out, _pixels(8), settings=FEW)
    with pytest.raises(QuantizeError, match=r"does not fit .*expected \[N, 1, 28, 28\]"):
        quantize_bundle(src, out, np.zeros((8, 3, 32, 32), np.uint8), settings=FEW)
    with pytest.raises(QuantizeError, match="0 images"):
        quantize_bundle(src, out, np.zeros((0, 1, 28, 28), np.uint8), settings=FEW)
    with pytest.raises(QuantizeError, match="calibration_images is 0"):
        quantize_bundle(src, out, _pixels(8), settings=QuantizeSettings(calibration_images=0))
    with pytest.raises(QuantizeError, match="calibrate_method is 'kl'; expected one of"):
        quantize_bundle(src, out, _pixels(8), settings=QuantizeSettings(calibrate_method="kl"))
    broken = Bundle.load(_copy(src.path, tmp_path / "broken.dg"))
    broken.stage_file(2).write_bytes(b"not an onnx graph")
    broken.record_digests()
    with pytest.raises(QuantizeError, match="refused stage 2"):
        quantize_bundle(broken, out, _pixels(8), settings=FEW)
    assert not out.exists() and not list(tmp_path.glob(".out.dg*"))


def test_cli_quantize_calibrate_predict(exported_bundle: Callable[..., Any], tmp_path: Path,
                                        fashion_available: bool) -> None:
    if not fashion_available:
        pytest.skip("Fashion-MNIST not installed: apt-get install -y dataset-fashion-mnist")
    src = exported_bundle("resnet").copy_to(tmp_path)
    q = tmp_path / "q.dg"
    cli = CliRunner()
    res = cli.invoke(main, ["quantize", str(src.path), "-o", str(q), "--data",
                            "fashion-mnist:train[:96]", "--calibration-images", "48"])
    assert res.exit_code == 0, res.output
    assert "label agreement per stage" in res.output
    again = cli.invoke(main, ["quantize", str(src.path), "-o", str(q), "--data",
                              "fashion-mnist:train[:96]"])
    assert again.exit_code != 0 and "already exists" in again.output
    res = cli.invoke(main, ["calibrate", str(q), "--data", "fashion-mnist:train[1000:1400]",
                            "--max-drop", "2"])
    assert res.exit_code == 0, res.output
    assert "vs the fp32 source's full model" in res.output and "meant the drop vs fp32" in res.output
    cal = Bundle.load(q).manifest.calibration
    assert cal is not None and cal["max_drop"] is None  # the fp32 drop became a target
    res = cli.invoke(main, ["calibrate", str(q), "--data", "fashion-mnist:train[1000:1400]",
                            "--max-drop", "2", "--drop-vs", "int8", "--dry-run"])
    assert res.exit_code == 0 and "meant the drop vs int8" in res.output
    res = cli.invoke(main, ["predict", str(q), "--data", "fashion-mnist:test[:64]"])
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.output.lower()


def test_a_thin_stem_convolution_stays_float32(int8: tuple[Bundle, Bundle]) -> None:
    """The stem convolution on the 1-channel image keeps float32 weights (int8 kernels are
    slower there); every other convolution of stage 0 reads int8 weights through a
    DequantizeLinear; the manifest records the rule."""
    _, q = int8
    assert q.manifest.quantization.settings["fp32_stem"] is True
    m = onnx.load(str(q.stage_file(0)))
    inits = {i.name: i for i in m.graph.initializer}
    dq = {n.output[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    float_weights = [n for n in convs if n.input[1] in inits
                     and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT]
    assert [list(inits[n.input[1]].dims)[1] for n in float_weights] == [1]
    assert len(convs) > 1 and all(n.input[1] in dq for n in convs if n not in float_weights)


def test_percentile_calibration_is_used_and_recorded(exported_bundle: Callable[..., Any],
                                                     tmp_path: Path,
                                                     fashion_available: bool) -> None:
    """--calibrate-method percentile: ONNX Runtime's percentile calibrator sets the ranges
    (on the same images, stage 0's activation scales differ from MinMax's), the manifest and
    `info` say so, and the bundle runs torch-free."""
    if not fashion_available:
        pytest.skip("Fashion-MNIST not installed: apt-get install -y dataset-fashion-mnist")
    src = exported_bundle("resnet").copy_to(tmp_path)
    out = {}
    for method in ("minmax", "percentile"):
        res = CliRunner().invoke(main, [
            "quantize", str(src.path), "-o", str(tmp_path / f"{method}.dg"), "--data",
            "fashion-mnist:train[:96]", "--calibration-images", "48", "--calibrate-method",
            method])
        assert res.exit_code == 0, res.output
        out[method] = Bundle.load(tmp_path / f"{method}.dg")
    q = out["percentile"]
    assert q.manifest.quantization.settings["calibrate_method"] == "Percentile"
    assert out["minmax"].manifest.quantization.settings["calibrate_method"] == "MinMax"
    assert "Percentile" in CliRunner().invoke(main, ["info", str(q.path)]).output

    def scales(b: Bundle) -> dict[str, float]:
        m = onnx.load(str(b.stage_file(0)))
        return {t.name: float(numpy_helper.to_array(t).ravel()[0]) for t in m.graph.initializer
                if t.name.endswith("_scale") and t.data_type == onnx.TensorProto.FLOAT
                and numpy_helper.to_array(t).size == 1}

    a, b = scales(out["minmax"]), scales(q)
    assert a.keys() == b.keys() and any(abs(a[n] - b[n]) > 1e-6 * a[n] for n in a)
    assert GatedRunner(q, backend="onnxruntime").predict(_pixels(16, seed=3)).labels.shape == (16,)
