"""The GPU path's logic, tested on the CPU.

Pure functions (engine keys, profiles, precision plans, FP16 graph rewrite, manifest records,
backend choice) are tested directly. The build and the TensorRT backend are then run end to
end against the strict fakes of ``tensorrt`` (10 and 11) and ``cuda.bindings.runtime`` in
tests/fakes_tensorrt.py (real cuda-bindings types, asynchronous streams, separate device and
pinned memory; the fake engine executes the ONNX graph it was built from with ONNX Runtime,
reading and writing the bound addresses). That checks our side of the API contract
(profiles, flags, bindings, ping-pong buffers, pinned copies, stream handles, errors,
threads, freeing) — the real libraries are exercised in tests/runtime/test_gpu.py.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dgconvert.convert.precision import (
    Fp16Report,
    calibration_batches,
    convert_to_fp16,
    modelopt_calibration_options,
    stage_calibration_inputs,
)
from dgconvert.convert.tensorrt import (
    BuildError,
    BuildOptions,
    ShapeRange,
    build_engines,
    check_exit_fractions,
    expected_rows,
    parse_size,
    precision_plan,
    stage_profiles,
)
from dgconvert.core.bundle import Bundle
from dgconvert.core.errors import BackendUnavailableError, BundleError, DGConvertError, InputError
from dgconvert.runtime import GatedRunner, cuda
from dgconvert.runtime.onnxruntime_backend import OnnxRuntimeBackend
from dgconvert.runtime.select import Probe, pick_backend
from dgconvert.runtime.tensorrt_backend import (
    DeviceFeatures,
    TensorRTBackend,
    engine_key,
    sanitize_gpu_name,
    trt_version_tuple,
)
from tests import fakes_tensorrt as fakes
from tests.fakes_tensorrt import GPU_NAME, Kind

KEY10 = "nvidia-fake-gpu-80gb-hbm3_sm90_trt10.8"


# -- pure logic ------------------------------------------------------------------------------
def test_engine_key_names_gpu_capability_and_version() -> None:
    assert sanitize_gpu_name("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert sanitize_gpu_name("  NVIDIA GeForce RTX 4090 (TM)  ") == "nvidia-geforce-rtx-4090-tm"
    assert sanitize_gpu_name("///") == "unknown-gpu"
    assert engine_key("NVIDIA H100 80GB HBM3", 9, 0, "10.8.0.43") == "nvidia-h100-80gb-hbm3_sm90_trt10.8"
    assert engine_key("NVIDIA A10G", 8, 6, "11.2") == "nvidia-a10g_sm86_trt11.2"
    assert trt_version_tuple("10.8.0.43") == (10, 8, 0)
    assert trt_version_tuple("11") == (11, 0, 0)
    with pytest.raises(ValueError, match="cannot parse"):
        trt_version_tuple("dev")


@pytest.mark.parametrize(
    ("major", "precision", "graph", "flags", "strong", "calibrator"),
    [
        (10, "fp32", "fp32", (), False, None),
        (10, "fp16", "fp32", ("FP16",), False, None),
        (10, "int8", "fp32", ("INT8", "FP16"), False, "entropy2"),
        (11, "fp32", "fp32", (), True, None),
        (11, "fp16", "fp16", (), True, None),
        (11, "int8", "int8-qdq", (), True, None),
        (12, "fp16", "fp16", (), True, None),
    ],
)
def test_precision_plan_by_version(major: int, precision: str, graph: str, flags: tuple,
                                   strong: bool, calibrator: str | None) -> None:
    plan = precision_plan(major, precision)
    assert (plan.graph, plan.builder_flags, plan.strongly_typed, plan.calibrator) == (
        graph, flags, strong, calibrator)
    assert plan.needs_data == (precision == "int8")
    assert json.loads(json.dumps(plan.as_dict()))["precision"] == precision
    if major >= 11 and precision == "int8":
        assert "nvidia-modelopt[onnx]" in plan.requires


def test_precision_plan_rejects_bad_requests() -> None:
    with pytest.raises(BuildError, match="'bf16'.*fp32, fp16, int8"):
        precision_plan(10, "bf16")
    with pytest.raises(BackendUnavailableError, match="TensorRT 8.x.*tensorrt>=10"):
        precision_plan(8, "fp16")


def test_expected_rows_follow_exit_shares() -> None:
    assert expected_rows(256, None, 4) == [256] * 4
    assert expected_rows(256, [0.5, 0.25, 0.125, 0.125], 4) == [256, 128, 64, 32]
    assert expected_rows(10, [0.99, 0.01, 0.0], 3) == [10, 1, 1]  # never below 1


def _inputs(k: int) -> list[dict[str, Any]]:
    if k == 0:
        return [{"name": "images", "shape": ["N", 1, 28, 28]}]
    return [{"name": "x", "shape": ["N", 8 * k, 7, 7]}, {"name": "keep", "shape": ["M"]}]


def test_stage_profiles_two_dynamic_dims_and_survivor_opt() -> None:
    profiles = stage_profiles([_inputs(k) for k in range(4)], 256, 128, [0.5, 0.25, 0.125, 0.125])
    assert profiles[0] == {"images": ShapeRange((1, 1, 28, 28), (128, 1, 28, 28), (256, 1, 28, 28))}
    # stage k: x has the rows of stage k-1, keep the rows of stage k
    assert profiles[1]["x"] == ShapeRange((1, 8, 7, 7), (128, 8, 7, 7), (256, 8, 7, 7))
    assert profiles[1]["keep"] == ShapeRange((1,), (64,), (256,))
    assert profiles[2]["x"].opt[0] == 64 and profiles[2]["keep"].opt[0] == 32
    assert profiles[3]["x"].opt[0] == 32 and profiles[3]["keep"].opt[0] == 16
    flat = stage_profiles([_inputs(k) for k in range(2)], 64, 64)
    assert flat[1]["keep"].opt == (64,) and flat[1]["x"].max == (64, 8, 7, 7)
    with pytest.raises(BuildError, match="opt \\(300\\) <= max \\(256\\)"):
        stage_profiles([_inputs(0)], 256, 300)


def test_exit_fractions_are_validated() -> None:
    assert check_exit_fractions([0.5, 0.5], 2) == [0.5, 0.5]
    for bad in ([0.5, 0.4], [1.2, -0.2], [1.0], ["a", 1]):
        with pytest.raises(BundleError, match="exit_fractions"):
            check_exit_fractions(bad, 2)


def test_parse_size() -> None:
    assert parse_size("4G") == 4 * 2**30
    assert parse_size("512m") == 512 * 2**20
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("1024") == 1024 * 2**20
    assert parse_size(None) is None
    with pytest.raises(BuildError, match="not understood"):
        parse_size("lots")


def test_calibration_batches_reindex_keep_and_drop_tail() -> None:
    x = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    batches = list(calibration_batches({"x": x, "keep": np.arange(10)}, 4))
    assert len(batches) == 2
    np.testing.assert_array_equal(batches[1]["x"], x[4:8])
    np.testing.assert_array_equal(batches[1]["keep"], np.arange(4))


def test_cuda_helpers_pure() -> None:
    assert cuda.format_cuda_version(12080) == "12.8"
    assert cuda.format_cuda_version(0) == "none"
    gpus = cuda.parse_nvidia_smi("0, NVIDIA H100 80GB HBM3, 9.0, 81559, 550.54\n1, Tesla T4, 7.5, 15360, 550.54\n")
    assert [(g.index, g.name, g.sm) for g in gpus] == [(0, "NVIDIA H100 80GB HBM3", "sm90"), (1, "Tesla T4", "sm75")]
    assert gpus[1].memory_bytes == 15360 * 2**20


def test_modules_import_without_tensorrt_or_cuda() -> None:
    import importlib

    for mod in ["dgconvert.runtime.tensorrt_backend", "dgconvert.runtime.cuda",
                "dgconvert.runtime.onnxruntime_gpu", "dgconvert.runtime.select", "dgconvert.runtime.doctor",
                "dgconvert.convert.tensorrt", "dgconvert.convert.precision", "dgconvert.cli.build",
                "dgconvert.cli.doctor"]:
        importlib.import_module(mod)
    assert "tensorrt" not in sys.modules or isinstance(sys.modules["tensorrt"], fakes.FakeTRT)


# -- FP16 graph rewrite on synthetic graphs ----------------------------------------------------
def _model(nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any]) -> Any:
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _gate_like() -> Any:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "fc")
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    nodes = [
        helper.make_node("Conv", ["images", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["features"]),
        helper.make_node("ReduceMean", ["features", "axes"], ["pooled"], keepdims=0),
        helper.make_node("Gemm", ["pooled", "fc"], ["gate_logits"], transB=1),
        helper.make_node("ReduceMax", ["gate_logits", "one"], ["score"], keepdims=0),
        helper.make_node("ArgMax", ["gate_logits"], ["label"], axis=1, keepdims=0),
        helper.make_node("Constant", [], ["eps"], value=numpy_helper.from_array(np.array(1e-3, np.float32))),
        helper.make_node("Add", ["score", "eps"], ["score_eps"]),
    ]
    one = numpy_helper.from_array(np.array([1], np.int64), "one")
    f = TensorProto.FLOAT
    return _model(
        nodes,
        [helper.make_tensor_value_info("images", f, ["N", 1, 6, 6])],
        [helper.make_tensor_value_info("features", f, ["N", 4, 6, 6]),
         helper.make_tensor_value_info("score", f, ["N"]),
         helper.make_tensor_value_info("score_eps", f, ["N"]),
         helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("gate_logits", f, ["N", 3])],
        [w, fc, axes, one],
    )


def test_fp16_rewrite_keeps_runtime_io_fp32_and_gate_head_fp32() -> None:
    m = _gate_like()
    rep = Fp16Report()
    m16 = convert_to_fp16(m, report=rep)
    types_ = {v.name: v.type.tensor_type.elem_type for v in [*m16.graph.input, *m16.graph.output]}
    assert types_["images"] == TensorProto.FLOAT  # runtime feeds float32
    assert types_["score"] == TensorProto.FLOAT and types_["gate_logits"] == TensorProto.FLOAT
    assert types_["label"] == TensorProto.INT64
    assert types_["features"] == TensorProto.FLOAT16  # stage-to-stage activations halve
    inits = {t.name: t.data_type for t in m16.graph.initializer}
    assert inits["w__fp16"] == TensorProto.FLOAT16 and "w" not in inits  # conv weights converted
    assert inits["fc"] == TensorProto.FLOAT  # gate Gemm after the pool stays float32 (sticky)
    assert inits["axes"] == TensorProto.INT64
    assert {"ReduceMean", "Gemm", "ReduceMax", "ArgMax", "Add"} <= set(rep.fp32_nodes)
    assert rep.fp16_nodes == 2  # Conv, Relu
    casts = [n for n in m16.graph.node if n.op_type == "Cast"]
    # images -> fp16, features (fp16) -> fp32 for the pool, and score_eps (an output not in
    # fp32_io, computed in fp32) -> fp16 at the graph boundary
    assert len(casts) == rep.casts == 3
    assert types_["score_eps"] == TensorProto.FLOAT16
    x = np.random.default_rng(1).standard_normal((5, 1, 6, 6)).astype(np.float32)
    ref = ort.InferenceSession(m.SerializeToString()).run(None, {"images": x})
    got = ort.InferenceSession(m16.SerializeToString()).run(None, {"images": x})
    names = [o.name for o in m.graph.output]
    for name, a, b in zip(names, ref, got, strict=True):
        assert b.dtype == (np.float16 if name in ("features", "score_eps") else a.dtype)
        np.testing.assert_allclose(b.astype(np.float64), a, rtol=2e-2, atol=2e-2, err_msg=name)


def test_fp16_rewrite_options_and_special_inputs() -> None:
    m = _gate_like()
    # everything float32 at the graph boundary when asked, and a forced-fp32 op
    m_io = convert_to_fp16(m, fp32_io={"images", "features", "score", "score_eps", "gate_logits"},
                           fp32_ops={"Relu"})
    out = {v.name: v.type.tensor_type.elem_type for v in m_io.graph.output}
    assert out["features"] == TensorProto.FLOAT
    relu = next(n for n in m_io.graph.node if n.op_type == "Relu")
    assert relu.input[0].endswith("__to_fp32")  # conv ran in fp16, Relu forced to fp32
    # Resize's scales stay float32 while its data goes fp16
    f = TensorProto.FLOAT
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    r = _model([helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest"),
                helper.make_node("Relu", ["y"], ["z"])],
               [helper.make_tensor_value_info("x", f, ["N", 1, 2, 2])],
               [helper.make_tensor_value_info("z", f, ["N", 1, 4, 4])], [scales])
    r16 = convert_to_fp16(r, fp32_io=set())
    assert {t.name: t.data_type for t in r16.graph.initializer}["scales"] == TensorProto.FLOAT
    x = np.arange(8, dtype=np.float16).reshape(2, 1, 2, 2)
    z = ort.InferenceSession(r16.SerializeToString()).run(None, {"x": x})[0]
    assert z.dtype == np.float16 and z.shape == (2, 1, 4, 4) and float(z[1, 0, 3, 3]) == 7.0


def test_fp16_rewrite_refuses_control_flow() -> None:
    f = TensorProto.FLOAT
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["y1"])], "t", [],
                             [helper.make_tensor_value_info("y1", f, [1])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["y2"])], "e", [],
                              [helper.make_tensor_value_info("y2", f, [1])])
    m = _model([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
               [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                helper.make_tensor_value_info("x", f, [1])],
               [helper.make_tensor_value_info("y", f, [1])], [])
    with pytest.raises(BundleError, match="control flow \\['If'\\].*--precision fp32"):
        convert_to_fp16(m)


# -- the strict fakes (tests/fakes_tensorrt.py) ---------------------------------------------
@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Fake ``tensorrt`` 10.8 and ``cuda.bindings.runtime``: ``.trt``, ``.rt``, ``.use(v)``."""
    return fakes.install(monkeypatch, "10.8.0.43")


def _no_memory(rt: fakes.FakeCudaRuntime) -> bool:
    return not rt.device and not rt.pinned


@pytest.fixture
def bundle(exported_bundle: Callable[..., Any], tmp_path: Path) -> Bundle:
    return exported_bundle("resnet").copy_to(tmp_path)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 28, 28)).astype(np.float32)


def _spread(bundle: Bundle, x: np.ndarray) -> list[float]:
    """Thresholds near the 60th percentile of each gate's scores (exits at every stage), in
    the widest gap between neighbouring scores there: no score sits at a threshold, where
    rounding differences between two backends (another CPU's kernels) would flip the exit."""
    rec = GatedRunner(bundle, backend="onnxruntime").collect(x)
    out = []
    for k in range(bundle.num_gates):
        s = np.sort(rec.scores[:, k].astype(np.float64))
        lo = int(0.5 * len(s))
        i = lo + int(np.argmax(np.diff(s[lo:int(0.7 * len(s)) + 1])))
        out.append(float((s[i] + s[i + 1]) / 2))
    return out


# -- build with the fakes --------------------------------------------------------------------
def test_build_without_tensorrt_says_what_is_missing(bundle: Bundle) -> None:
    if "tensorrt" in sys.modules:
        pytest.skip("a tensorrt module is importable here")
    with pytest.raises(BackendUnavailableError) as exc:
        build_engines(bundle)
    msg = str(exc.value)
    assert "TensorRT" in msg and "cuda-python" in msg and "pip install tensorrt cuda-python" in msg


def test_build_fp32_writes_engines_and_manifest(fake_gpu: Any, bundle: Bundle, tmp_path: Path) -> None:
    cache = tmp_path / "timing.cache"
    rec = build_engines(bundle, BuildOptions(max_batch=64, opt_batch=32, workspace=parse_size("256M"),
                                             timing_cache=cache))
    m = Bundle.load(bundle.path).manifest
    assert list(m.engines) == [KEY10] and m.engines[KEY10] == rec
    assert rec["gpu"] == GPU_NAME and rec["compute_capability"] == "9.0" and rec["tensorrt"] == "10.8.0.43"
    assert rec["precision"] == "fp32" and rec["max_batch"] == 64 and rec["opt_batch"] == 32
    assert len(rec["stages"]) == bundle.num_stages and rec["full"]["file"] == f"engines/{KEY10}/full.engine"
    for k, s in enumerate(rec["stages"]):
        path = bundle.path / s["file"]
        assert s["file"] == f"engines/{KEY10}/stage{k}.engine" and s["index"] == k
        assert hashlib.sha256(path.read_bytes()).hexdigest() == s["sha256"] and path.stat().st_size == s["bytes"]
    assert rec["stages"][1]["profile"]["keep"] == {"min": [1], "opt": [32], "max": [64]}
    assert rec["stages"][2]["profile"]["x"]["max"][0] == 64
    builds = fake_gpu.trt.builds
    assert len(builds) == bundle.num_stages + 1
    assert all(b["flags"] == [] and b["network_flags"] == 0 for b in builds)
    assert builds[1]["profile"]["keep"] == ((1,), (32,), (64,)) and builds[0]["pool"] == {"WORKSPACE": 256 * 2**20}
    assert all(b["timing_cache"] for b in builds) and cache.read_bytes() == b"+"
    assert not list((bundle.path / "engines").glob(".*"))  # no temporary leftovers
    build_engines(bundle, BuildOptions(max_batch=64, timing_cache=cache))  # rebuild reuses the cache
    assert cache.read_bytes() == b"++"


def test_build_opt_shapes_follow_calibrated_exits(fake_gpu: Any, bundle: Bundle) -> None:
    bundle.update_manifest(lambda m: setattr(m, "calibration", {"exit_fractions": [0.5, 0.25, 0.125, 0.125]}))
    rec = build_engines(bundle, BuildOptions(max_batch=256, full=False))
    assert rec["full"] is None and rec["exit_fractions"] == [0.5, 0.25, 0.125, 0.125]
    opts = [{n: p["opt"][0] for n, p in s["profile"].items()} for s in rec["stages"]]
    assert opts == [{"images": 256}, {"x": 256, "keep": 128}, {"x": 128, "keep": 64}, {"x": 64, "keep": 32}]


def test_build_fp16_uses_flag_on_trt10_and_fp16_graph_on_trt11(fake_gpu: Any, bundle: Bundle) -> None:
    build_engines(bundle, BuildOptions(precision="fp16", max_batch=16, full=False))
    b10 = fake_gpu.trt.builds
    assert all(b["flags"] == ["FP16"] and b["network_flags"] == 0 for b in b10)
    assert b10[1]["input_types"]["x"] == TensorProto.FLOAT
    fake_gpu.trt.builds = []
    fake_gpu.use("11.2.0.1")
    rec = build_engines(bundle, BuildOptions(precision="fp16", max_batch=16, full=False))
    b11 = fake_gpu.trt.builds
    assert all(b["flags"] == [] and b["network_flags"] == 2 for b in b11)  # STRONGLY_TYPED
    assert b11[0]["input_types"]["images"] == TensorProto.FLOAT
    assert b11[1]["input_types"]["x"] == TensorProto.FLOAT16
    m = Bundle.load(bundle.path).manifest
    assert set(m.engines) == {KEY10, "nvidia-fake-gpu-80gb-hbm3_sm90_trt11.2"}
    assert rec["plan"]["graph"] == "fp16"


def test_build_int8_trt10_calibrates_with_entropy_calibrator(fake_gpu: Any, bundle: Bundle) -> None:
    with pytest.raises(BuildError, match="needs calibration images.*--data"):
        build_engines(bundle, BuildOptions(precision="int8"))
    pixels = (np.random.default_rng(0).random((40, 1, 28, 28)) * 255).astype(np.uint8)
    build_engines(bundle, BuildOptions(precision="int8", max_batch=32, data=pixels, calib_batch=16,
                                       calib_samples=40, full=False))
    builds = fake_gpu.trt.builds
    assert [b["calibration_batches"] for b in builds] == [2] * bundle.num_stages  # 40 // 16
    assert builds[0]["flags"] == ["INT8", "FP16"]
    assert builds[1]["calibration_profile"]["keep"] == ((16,), (16,), (16,))
    assert builds[1]["calibration_profile"]["x"][0][0] == 16
    caches = sorted(p.name for p in (bundle.path / "engines" / KEY10).glob("*.calib"))
    assert caches == [f"stage{k}.calib" for k in range(bundle.num_stages)]
    assert _no_memory(fake_gpu.rt)  # calibration buffers freed
    fake_gpu.trt.builds = []  # a rebuild reads the caches instead of calibrating again
    build_engines(bundle, BuildOptions(precision="int8", max_batch=32, data=pixels, calib_batch=16,
                                       full=False))
    assert [b["calibration_batches"] for b in fake_gpu.trt.builds] == [0] * bundle.num_stages


def test_build_int8_trt11_quantizes_with_modelopt(fake_gpu: Any, bundle: Bundle,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu.use("11.0.0")
    pixels = (np.random.default_rng(0).random((20, 1, 28, 28)) * 255).astype(np.uint8)
    monkeypatch.setitem(sys.modules, "modelopt", None)  # not installed
    with pytest.raises(BackendUnavailableError, match="ModelOpt.*pip install 'nvidia-modelopt"):
        build_engines(bundle, BuildOptions(precision="int8", data=pixels, full=False))
    calls = []

    def quantize(**kw: Any) -> None:
        calls.append(kw)
        Path(kw["output_path"]).write_bytes(Path(kw["onnx_path"]).read_bytes())

    q = types.ModuleType("modelopt.onnx.quantization")
    q.quantize = quantize  # type: ignore[attr-defined]
    for name in ("modelopt", "modelopt.onnx", "modelopt.onnx.quantization"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name) if name != q.__name__ else q)
    sys.modules["modelopt"].onnx = sys.modules["modelopt.onnx"]  # type: ignore[attr-defined]
    sys.modules["modelopt.onnx"].quantization = q  # type: ignore[attr-defined]
    build_engines(bundle, BuildOptions(precision="int8", data=pixels, max_batch=32, full=False))
    assert len(calls) == bundle.num_stages
    assert all(c["quantize_mode"] == "int8" and c["calibration_method"] == "entropy" for c in calls)
    assert set(calls[0]["calibration_data"]) == {"images"} and calls[0]["calibration_data"]["images"].shape == (20, 1, 28, 28)
    assert set(calls[2]["calibration_data"]) == {"x", "keep"}
    np.testing.assert_array_equal(calls[2]["calibration_data"]["keep"], np.arange(20))
    x_shape = "x".join(map(str, calls[2]["calibration_data"]["x"].shape))
    assert calls[2]["calibration_shapes"] == f"x:{x_shape},keep:20"  # one full-N step
    assert calls[0]["calibration_shapes"] == "images:20x1x28x28"
    assert all(c["calibration_eps"] == ["cuda:0", "cpu"] for c in calls)
    assert all(b["flags"] == [] and b["calibration_batches"] == 0 for b in fake_gpu.trt.builds)
    assert not list((bundle.path / "engines").rglob("*.int8.onnx"))


def test_stage_calibration_inputs_match_the_chain(bundle: Bundle) -> None:
    x = _images(12)
    inputs = stage_calibration_inputs(bundle, x)
    assert [sorted(d) for d in inputs] == [["images"]] + [["keep", "x"]] * bundle.num_gates
    be = OnnxRuntimeBackend(bundle)
    out = be.run_stage(0, x, None)
    np.testing.assert_allclose(inputs[1]["x"], out.features, rtol=1e-5, atol=1e-6)
    assert inputs[3]["x"].shape[0] == 12 and inputs[3]["keep"].dtype == np.int64


# -- the TensorRT backend with the fakes --------------------------------------------------------
def test_backend_matches_onnxruntime_and_keeps_features_on_device(fake_gpu: Any, bundle: Bundle) -> None:
    build_engines(bundle, BuildOptions(max_batch=64))
    x = _images(150, seed=3)
    t = _spread(bundle, x)
    ref = GatedRunner(bundle, backend="onnxruntime", thresholds=t).predict(x)
    runner = GatedRunner(bundle, backend="tensorrt", thresholds=t)
    assert runner.max_batch == 64 and runner.backend.max_batch() == 64
    got = runner.predict(x)
    np.testing.assert_array_equal(got.labels, ref.labels)
    np.testing.assert_array_equal(got.exit_stage, ref.exit_stage)
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-5, atol=1e-6)
    assert len(set(got.exit_stage.tolist())) == bundle.num_stages  # exits everywhere
    ref_runner = GatedRunner(bundle, backend="onnxruntime", thresholds=t, max_batch=64)
    ref_runner.predict(x)
    assert runner.stats == ref_runner.stats and runner.stats[0] == 150 > runner.stats[-1] > 0
    be = runner.backend
    assert "tensorrt 10.8.0.43" in be.describe() and KEY10 in be.describe()
    # device-resident features, only score/label come back, only keep goes in
    o0 = be.run_stage(0, x[:10], None)
    assert isinstance(o0.features, DeviceFeatures) and o0.features.shape[0] == 10
    ort0 = OnnxRuntimeBackend(bundle).run_stage(0, x[:10], None)
    np.testing.assert_allclose(o0.features.to_host(), ort0.features, rtol=1e-6)
    fake_gpu.rt.copies.clear()
    keep = np.array([7, 2, 5], np.int64)
    o1 = be.run_stage(1, o0.features, keep)
    h2d = [n for kind, n in fake_gpu.rt.copies if kind == Kind.cudaMemcpyHostToDevice]
    d2h = [n for kind, n in fake_gpu.rt.copies if kind == Kind.cudaMemcpyDeviceToHost]
    assert h2d == [3 * 8] and d2h == [3 * 4, 3 * 8]  # keep in; score, label out
    ort1 = OnnxRuntimeBackend(bundle).run_stage(1, ort0.features, keep)
    np.testing.assert_allclose(o1.score, ort1.score, rtol=1e-5)
    np.testing.assert_array_equal(o1.label, ort1.label)
    assert o1.features.ptr != o0.features.ptr  # ping-pong
    np.testing.assert_allclose(be.run_full(x[:5]), OnnxRuntimeBackend(bundle).run_full(x[:5]), rtol=1e-5)
    assert fake_gpu.rt.device and fake_gpu.rt.pinned
    runner.close()
    assert _no_memory(fake_gpu.rt)  # every device and pinned buffer freed


def test_backend_rejects_misuse_with_clear_errors(fake_gpu: Any, bundle: Bundle) -> None:
    build_engines(bundle, BuildOptions(max_batch=8, full=False))
    be = TensorRTBackend(bundle)
    with pytest.raises(InputError, match="at most 8.*--max-batch 9"):
        be.run_stage(0, _images(9), None)
    o0 = be.run_stage(0, _images(4), None)
    with pytest.raises(InputError, match="indices span 0..4.*0..3"):
        be.run_stage(1, o0.features, np.array([0, 4]))
    with pytest.raises(InputError, match="keep is empty"):
        be.run_stage(1, o0.features, np.array([], np.int64))
    with pytest.raises(InputError, match="expected the DeviceFeatures"):
        be.run_stage(1, np.zeros((4, 8, 28, 28), np.float32), np.array([0]))
    o1 = be.run_stage(1, o0.features, np.array([0, 1]))
    with pytest.raises(InputError, match="stale features handle"):
        be.run_stage(1, o0.features, np.array([0]))  # o0's buffer may have been reused
    be.run_stage(2, o1.features, np.array([1]))
    be.close()
    assert _no_memory(fake_gpu.rt)


def test_backend_checks_engines_belong_to_this_gpu_and_version(fake_gpu: Any, bundle: Bundle) -> None:
    with pytest.raises(BundleError, match=f"no TensorRT engines.*{KEY10}.*built: none.*dgconvert build"):
        TensorRTBackend(bundle)
    build_engines(bundle, BuildOptions(max_batch=8, full=False))
    fake_gpu.use("10.8.1")  # same key (10.8), different build of TensorRT
    with pytest.raises(BundleError, match="built with TensorRT 10.8.0.43, this is TensorRT 10.8.1.*dgconvert build"):
        TensorRTBackend(bundle)
    fake_gpu.use("10.9.0")
    with pytest.raises(BundleError, match="_trt10.9.*built: nvidia-fake"):
        TensorRTBackend(bundle)
    fake_gpu.use("10.8.0.43")
    engine = bundle.path / "engines" / KEY10 / "stage2.engine"
    data = engine.read_bytes()
    engine.write_bytes(data[:-2] + b"  ")
    with pytest.raises(BundleError, match="SHA-256.*dgconvert build"):
        TensorRTBackend(bundle)
    engine.write_bytes(data)
    assert TensorRTBackend(bundle).max_batch() == 8


def test_backend_is_thread_safe(fake_gpu: Any, bundle: Bundle) -> None:
    build_engines(bundle, BuildOptions(max_batch=32, full=False))
    x = _images(96, seed=5)
    t = _spread(bundle, x)
    ref = GatedRunner(bundle, backend="onnxruntime", thresholds=t).predict(x)
    runner = GatedRunner(bundle, backend="tensorrt", thresholds=t)
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                results[i] = runner.predict(x)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for res in results.values():
        np.testing.assert_array_equal(res.labels, ref.labels)
        np.testing.assert_array_equal(res.exit_stage, ref.exit_stage)
    assert len(runner.backend._workspaces) == 4  # one set of contexts/buffers per thread
    runner.close()
    assert _no_memory(fake_gpu.rt)


# -- backend="auto" ----------------------------------------------------------------------------
def _gpu() -> cuda.GpuInfo:
    return cuda.GpuInfo(0, GPU_NAME, 9, 0)


def test_pick_backend_prefers_matching_engines_then_ort_gpu_then_cpu(bundle: Bundle) -> None:
    cpu_only = Probe(ort_providers=["CPUExecutionProvider"], notes={"tensorrt": "tensorrt is not installed"})
    name, opts, why = pick_backend(bundle, cpu_only)
    assert (name, opts) == ("onnxruntime", {}) and "CPU" in why and "tensorrt is not installed" in why
    gpu_ort = Probe(trt_version="10.8.0.43", cuda_python=True, gpus=[_gpu()],
                    ort_providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    name, opts, why = pick_backend(bundle, gpu_ort)
    assert name in ("onnxruntime-gpu", "onnxruntime")
    assert opts["providers"][0] == ("CUDAExecutionProvider", {"device_id": 0})
    assert f"no engines for {KEY10}" in why and f"dgconvert build {bundle.path}" in why
    bundle.update_manifest(lambda m: m.engines.update({KEY10: {"tensorrt": "10.8.0.43", "precision": "fp16"}}))
    name, opts, why = pick_backend(bundle, gpu_ort)
    assert (name, opts) == ("tensorrt", {"device": 0}) and KEY10 in why and "fp16" in why
    other = Probe(trt_version="10.8.1", cuda_python=True, gpus=[_gpu()], ort_providers=["CPUExecutionProvider"])
    name, _, why = pick_backend(bundle, other)
    assert name == "onnxruntime" and "built with TensorRT 10.8.0.43, this is 10.8.1" in why
    no_gpu = Probe(trt_version="10.8.0.43", cuda_python=True, gpus=[],
                   ort_providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    name, _, why = pick_backend(bundle, no_gpu)
    assert name == "onnxruntime" and "no GPU visible" in why


def test_errors_are_dgconvert_errors() -> None:
    assert issubclass(BuildError, DGConvertError) and issubclass(cuda.CudaError, BackendUnavailableError)


# -- API-review fixes (issue 14) ------------------------------------------------------------
def test_backend_enqueues_on_its_own_stream_handle(fake_gpu: Any, bundle: Bundle) -> None:
    """execute_async_v3 gets int(cudaStream_t) of the thread's stream (not getPtr()), and
    nothing is read before the stream is synchronized."""
    build_engines(bundle, BuildOptions(max_batch=16, full=False))
    be = TensorRTBackend(bundle)
    out = be.run_stage(0, _images(4), None)
    ws = be._ws()
    assert be._trt.executions == [int(ws.stream.handle)] == [fakes.STREAM_BASE]
    assert ws.stream.handle.getPtr() != int(ws.stream.handle)
    assert fake_gpu.rt.pending() == 0 and out.score.shape == (4,)
    other = TensorRTBackend(bundle)  # a second backend gets its own stream
    other.run_stage(0, _images(2), None)
    assert be._trt.executions[-1] != fakes.STREAM_BASE
    be.close()
    other.close()
    assert _no_memory(fake_gpu.rt) and not fake_gpu.rt.streams


def test_trt11_fake_lacks_the_removed_apis(fake_gpu: Any) -> None:
    trt = fake_gpu.use("11.1.0")
    assert not hasattr(trt.BuilderFlag, "FP16") and not hasattr(trt.BuilderFlag, "INT8")
    assert not hasattr(trt, "IInt8EntropyCalibrator2")
    assert not hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    config = trt.Builder(trt.Logger()).create_builder_config()
    with pytest.raises(AttributeError):
        config.int8_calibrator = object()
    assert not hasattr(config, "set_calibration_profile")


def test_cuda_that_cannot_start_is_backend_unavailable(fake_gpu: Any, bundle: Bundle) -> None:
    """trt.Runtime / trt.Builder return nullptr (pybind11 TypeError) when CUDA cannot start."""
    build_engines(bundle, BuildOptions(max_batch=8, full=False))
    fake_gpu.trt.cuda_broken = True
    with pytest.raises(BackendUnavailableError, match="Runtime.*nullptr.*driver.*dgconvert doctor"):
        TensorRTBackend(bundle)
    with pytest.raises(BackendUnavailableError, match="Builder.*nullptr.*CUDA 12 \\(driver >= 525"):
        build_engines(bundle, BuildOptions(max_batch=8, full=False))
    fake_gpu.use("11.1.0").cuda_broken = True
    with pytest.raises(BackendUnavailableError, match="TensorRT 11.x is built for CUDA 13 \\(driver >= 580"):
        build_engines(bundle, BuildOptions(max_batch=8, full=False))


def test_dynamic_sample_dims_size_buffers_from_the_profile(fake_gpu: Any, bundle: Bundle) -> None:
    """A -1 beyond the batch dim takes the profile maximum (was: a negative buffer size)."""
    build_engines(bundle, BuildOptions(max_batch=16, full=False))
    fake_gpu.trt.dynamic_sample_dims = True
    x = _images(12, seed=2)
    t = _spread(bundle, x)
    ref = GatedRunner(bundle, backend="onnxruntime", thresholds=t).predict(x)
    runner = GatedRunner(bundle, backend="tensorrt", thresholds=t)
    got = runner.predict(x)
    np.testing.assert_array_equal(got.labels, ref.labels)
    assert runner.backend._engines[1].inputs["x"][1] == tuple(
        bundle.manifest.stages[1].inputs[0].shape[1:])
    runner.close()
    from dgconvert.runtime.tensorrt_backend import _bytes

    with pytest.raises(BundleError, match="dynamic \\(-1\\).*static"):
        _bytes((np.dtype(np.float32), (8, -1, 7)))


def test_run_full_checks_set_tensor_address(fake_gpu: Any, bundle: Bundle) -> None:
    build_engines(bundle, BuildOptions(max_batch=8))
    be = TensorRTBackend(bundle)
    fake_gpu.trt.refuse_addresses = {"logits"}
    with pytest.raises(BackendUnavailableError, match="refused the address of output 'logits'"):
        be.run_full(_images(2))
    be.close()


def test_int8_calibrator_frees_buffers_and_carries_its_cache(fake_gpu: Any, bundle: Bundle) -> None:
    pixels = (np.random.default_rng(0).random((32, 1, 28, 28)) * 255).astype(np.uint8)
    opts = BuildOptions(precision="int8", max_batch=16, data=pixels, calib_batch=16,
                        calib_samples=32, full=False)
    build_engines(bundle, opts)
    folder = bundle.path / "engines" / KEY10
    assert [b["calibration_batches"] for b in fake_gpu.trt.builds] == [2] * bundle.num_stages
    for _ in range(2):  # rebuilds read the cache, keep it in the new folder, leak nothing
        fake_gpu.trt.builds = []
        build_engines(bundle, opts)
        assert [b["calibration_batches"] for b in fake_gpu.trt.builds] == [0] * bundle.num_stages
        assert sorted(p.name for p in folder.glob("*.calib")) == [
            f"stage{k}.calib" for k in range(bundle.num_stages)]
        assert _no_memory(fake_gpu.rt)


def test_build_can_turn_tf32_off(fake_gpu: Any, bundle: Bundle) -> None:
    build_engines(bundle, BuildOptions(max_batch=8, full=False))
    assert all(b["tf32"] for b in fake_gpu.trt.builds)
    fake_gpu.trt.builds = []
    rec = build_engines(bundle, BuildOptions(max_batch=8, full=False, tf32=False))
    assert rec["tf32"] is False and not any(b["tf32"] for b in fake_gpu.trt.builds)
    fake_gpu.use("11.1.0")
    build_engines(bundle, BuildOptions(max_batch=8, full=False, tf32=False))
    assert not fake_gpu.trt.builds[-1]["tf32"]


def test_modelopt_calibrates_a_stage_in_one_full_n_step(bundle: Bundle) -> None:
    """ModelOpt splits inputs by calibration_shapes; full-N shapes keep x and keep whole."""
    inputs = stage_calibration_inputs(bundle, _images(6))[1]
    opts = modelopt_calibration_options(inputs)
    x_shape = "x".join(map(str, inputs["x"].shape))
    assert opts == {"calibration_shapes": f"x:{x_shape},keep:6", "calibration_eps": ["cuda:0", "cpu"]}
    sess = ort.InferenceSession(str(bundle.stage_file(1)), providers=["CPUExecutionProvider"])
    assert sess.run(["score"], inputs)[0].shape == (6,)
    with pytest.raises(BundleError, match="keep indexes row 6 but x has 6 rows.*arange"):
        modelopt_calibration_options({"x": inputs["x"], "keep": np.arange(7)})


def test_modelopt_reader_feeds_a_stage1_graph_with_these_options(bundle: Bundle) -> None:
    """With ModelOpt's real reader: its default 1-row chunks break the stage-1 graph (keep
    indexes past a 1-row x); our calibration_shapes give one step that runs."""
    calib_utils = pytest.importorskip("modelopt.onnx.quantization.calib_utils",
                                      reason="nvidia-modelopt is not installed (int8 extra)")
    inputs = stage_calibration_inputs(bundle, _images(6))[1]
    path = str(bundle.stage_file(1))
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    default = calib_utils.CalibrationDataProvider(path, inputs)
    with pytest.raises(Exception, match="out of (data )?bounds|indices"):  # noqa: B017
        while (feed := default.get_next()) is not None:
            sess.run(None, feed)
    shapes = modelopt_calibration_options(inputs)["calibration_shapes"]
    ours = calib_utils.CalibrationDataProvider(path, inputs, shapes)
    steps = 0
    while (feed := ours.get_next()) is not None:
        assert sess.run(["score"], feed)[0].shape == (6,)
        steps += 1
    assert steps == 1
