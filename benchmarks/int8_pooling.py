"""Int8 gate heads: pooling the int8 features directly (``sum_pooled_heads``: an exact
int32 sum, then a scale) against dequantizing the whole feature map and averaging it in
float32 (the quantizer's graph), in the composed chain of an int8 bundle, its thresholds,
interleaved passes at batch 1 / 8 / 64 / 256 (issue 25).

    python benchmarks/int8_pooling.py [INT8_BUNDLE] [--data fashion-mnist:test] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from _util import TEST_DATA, require

from dgconvert.core.bundle import Bundle
from dgconvert.data import load_dataset
from dgconvert.runtime import GatedRunner
from dgconvert.runtime.passes.chain import THRESHOLDS, compose_chain
from dgconvert.runtime.passes.int8_boundary import (
    Int8Stages,
    keep_int8_boundaries,
    sum_pooled_heads,
)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _optimized_stages(bundle: Bundle, threads: int) -> list[onnx.ModelProto]:
    """ORT's optimized stage graphs for this machine, as the backend composes from them."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(bundle.num_stages):
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.optimized_model_filepath = str(Path(tmp) / f"stage{k}.onnx")
            ort.InferenceSession(str(bundle.stage_file(k)), so, providers=["CPUExecutionProvider"])
            out.append(onnx.load(so.optimized_model_filepath))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", nargs="?", type=Path, default=Path("out/reference-int8.dg"))
    ap.add_argument("--data", default=TEST_DATA)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    bundle = Bundle.load(require(args.bundle, "int8 bundle"))
    runner = GatedRunner(bundle, backend="onnxruntime", threads=args.threads, paths="default")
    be = runner.backend
    plain = _optimized_stages(bundle, args.threads)
    images = runner.prepare(load_dataset(args.data, num_classes=bundle.num_classes).images[:1024])
    float_heads = keep_int8_boundaries([_copy(m) for m in plain])
    pooled = sum_pooled_heads(
        Int8Stages([_copy(m) for m in float_heads.models], float_heads.int8_input,
                   float_heads.int8_output), be._feature_shapes())
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    sessions = {name: ort.InferenceSession(compose_chain(s.models).SerializeToString(), so,
                                           providers=["CPUExecutionProvider"])
                for name, s in (("float heads", float_heads), ("int8 pooling", pooled))}
    name = sessions["float heads"].get_inputs()[0].name
    t = runner.exit_thresholds
    print(f"{bundle.path.name}: {pooled.pooled_heads} heads pooled; thresholds {list(t)}")
    print("| batch | float heads µs/image | int8 pooling µs/image | speed-up |")
    print("|---:|---:|---:|---:|")
    for bs in (1, 8, 64, 256):
        n = 256 if bs < 64 else 1024
        ts: dict[str, list[float]] = {k: [] for k in sessions}
        for r in range(args.rounds):
            for k in (list(sessions) if r % 2 else list(sessions)[::-1]):
                s = sessions[k]
                s.run(None, {name: images[:bs], THRESHOLDS: t})
                t0 = time.perf_counter()
                for i in range(0, n, bs):
                    s.run(None, {name: images[i:i + bs], THRESHOLDS: t})
                ts[k].append((time.perf_counter() - t0) / n * 1e6)
                time.sleep(0.1)
        m = {k: float(np.median(v)) for k, v in ts.items()}
        print(f"| {bs} | {m['float heads']:.1f} | {m['int8 pooling']:.1f} | "
              f"{m['float heads'] / m['int8 pooling']:.3f}× |", flush=True)


if __name__ == "__main__":
    main()
