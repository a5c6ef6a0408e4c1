"""The batch-1 ``If`` graph with lean gate heads (labels in the exit branches, a margin as one
``MatMul``, the outputs written by the outermost ``If``) against the heads as exported
(``compose_if(..., lean=False)``), and both against the ungated prefix up to the same exit
(the physical limit): one image, the exit forced at each gate and at the end, interleaved
rounds, 1 and 2 threads (issue 24).

    python benchmarks/lean_heads.py [BUNDLE ...] [--rounds 40] [--threads 1,2]

Writes ``results/lean_heads.{md,json}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from _util import DEFAULT_BUNDLE, header, interleaved_rounds, require, write_results

from dgconvert.core.bundle import Bundle
from dgconvert.core.exits import ExitRule
from dgconvert.runtime.onnxruntime_backend import OnnxRuntimeBackend
from dgconvert.runtime.passes.if_graph import OUTPUTS, compose_if
from dgconvert.runtime.passes.prefix import prefix_graphs

BURST = 20  # calls per system and round


def _session(model: onnx.ModelProto, threads: int, level: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.graph_optimization_level = threads, level
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    so.add_session_config_entry("session.force_spinning_stop", "1")  # spin within a run only
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def measure(bundle: Bundle, threads: int, rounds: int) -> list[dict]:
    be = OnnxRuntimeBackend(bundle, threads=threads)
    extended = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    lean = _session(compose_if(be._graphs), threads, extended)
    plain = _session(compose_if(be._graphs, lean=False), threads, extended)
    contract = [onnx.load(str(bundle.stage_file(k))) for k in range(bundle.num_stages)]
    prefixes = [_session(m, threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
                for m in prefix_graphs(contract, onnx.load(str(bundle.full_file())))]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, *bundle.input_shape)).astype(np.float32)
    name, k = lean.get_inputs()[0].name, bundle.num_gates
    rows = []
    for j in range(k + 1):
        t = [3.0e38] * k  # on, but no score reaches it
        if j < k:
            t[j] = -np.inf
        feeds = {name: x, "thresholds": ExitRule.from_thresholds(t).exit_at}
        got = [s.run(list(OUTPUTS), feeds) for s in (lean, plain)]
        if not all(np.array_equal(a, b) for a, b in zip(*got, strict=True)):
            raise SystemExit(f"lean and plain If graphs disagree at exit {j}: {got}")
        p = prefixes[j]
        fs = {"prefix": lambda p=p: p.run(None, {p.get_inputs()[0].name: x}),
              "plain": lambda f=feeds: plain.run(list(OUTPUTS), f),
              "lean": lambda f=feeds: lean.run(list(OUTPUTS), f)}
        us = interleaved_rounds(fs, rounds, BURST)
        med = {n: float(np.median(v)) for n, v in us.items()}
        ratio = float(np.median(np.array(us["lean"]) / np.array(us["plain"])))
        rows.append({"threads": threads, "exit": j, **{f"{n}_us": v for n, v in med.items()},
                     "lean_over_plain": ratio})
        print(rows[-1], flush=True)
    be.close()
    return rows


def _table(rows: list[dict], k: int) -> str:
    lines = ["| threads | exit at | prefix (limit) µs | heads as exported µs (over the prefix) "
             "| lean heads µs (over the prefix) | lean / as exported (median of rounds) |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        where = "the end" if r["exit"] == k else f"gate {r['exit']}"
        lines.append(f"| {r['threads']} | {where} | {r['prefix_us']:.1f} | {r['plain_us']:.1f} "
                     f"(+{r['plain_us'] - r['prefix_us']:.1f}) | {r['lean_us']:.1f} "
                     f"(+{r['lean_us'] - r['prefix_us']:.1f}) | {r['lean_over_plain']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="*", type=Path, default=[DEFAULT_BUNDLE])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    md = [header("Lean gate heads in the batch-1 If graph (issue 24)")]
    data: dict[str, list[dict]] = {}
    for path in args.bundles:
        bundle = Bundle.load(require(path, "bundle"))
        rows = [r for th in args.threads.split(",") for r in measure(bundle, int(th), args.rounds)]
        data[str(path)] = rows
        md += ["", f"## {path}", "", _table(rows, bundle.num_gates)]
    write_results("lean_heads", "\n".join(md), data)


if __name__ == "__main__":
    main()
