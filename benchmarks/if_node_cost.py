"""What one ONNX ``If`` node costs ONNX Runtime on the CPU (issue 24), apart from the gate
heads: a one-op graph (``Relu``) against the same op behind 1 and 3 nested ``If`` nodes
(taking the first branch, or going through every level), 1 and 2 intra-op threads, a
[1, 64] tensor, session calls back to back. Prints µs per call (median of 7 passes).

    python benchmarks/if_node_cost.py
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

DEPTHS = (0, 1, 3)


def model(depth: int) -> bytes:
    """``Relu(x)`` behind ``depth`` nested ``If`` nodes on ``c`` (then: ``Identity(x)``)."""
    def level(d: int, out: str) -> list:
        if d == 0:
            return [helper.make_node("Relu", ["x"], [out])]
        then_g = helper.make_graph(
            [helper.make_node("Identity", ["x"], [f"t{d}"])], f"then{d}", [],
            [helper.make_tensor_value_info(f"t{d}", TensorProto.FLOAT, None)])
        else_g = helper.make_graph(
            level(d - 1, f"e{d}"), f"else{d}", [],
            [helper.make_tensor_value_info(f"e{d}", TensorProto.FLOAT, None)])
        return [helper.make_node("If", ["c"], [out], then_branch=then_g, else_branch=else_g)]

    graph = helper.make_graph(
        level(depth, "y"), "if_cost",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=8).SerializeToString()


def per_call_us(sess: ort.InferenceSession, feeds: dict, calls: int = 2000) -> float:
    for _ in range(200):
        sess.run(None, feeds)
    passes = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(calls):
            sess.run(None, feeds)
        passes.append((time.perf_counter() - t0) / calls * 1e6)
    return float(np.median(passes))


def main() -> None:
    x = np.ones((1, 64), np.float32)
    print("| threads | " + " | ".join(f"{d} If: first branch / through all" for d in DEPTHS)
          + " |")
    for threads in (1, 2):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        cells = []
        for d in DEPTHS:
            sess = ort.InferenceSession(model(d), so, providers=["CPUExecutionProvider"])
            first, through = (per_call_us(sess, {"x": x, "c": np.array([c])})
                              for c in (True, False))
            cells.append(f"{first:.2f} / {through:.2f} µs")
        print(f"| {threads} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
