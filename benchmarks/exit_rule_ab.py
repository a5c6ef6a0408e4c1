"""A/B of the runner's hot path: a baseline checkout's ``GatedRunner`` against this one's,
interleaved, on the same small exported bundle (ONNX Runtime CPU, one thread).

Each side runs in its own worker process (``PYTHONPATH`` = its checkout) that times
``predict`` on the same fixed batches; rounds alternate the order of the two sides, and the
ratio ``this / baseline`` is taken within each round (other load on the machine hits both
alike). Thresholds sit at each gate's median score, so about half the rows exit at every
gate and the exit walk runs on every stage. Paths: ``walk`` (a backend replaying recorded
stage outputs: the runner's own Python, the exit walk, alone), ``stages``
(``compose=False``: ONNX Runtime stage by stage, batch 1 and batch N) and ``chain`` (the
one-session chain at batch >= 2; batch 1 walks stage by stage there too). Both sides must
give identical results. Timed as process CPU time (robust to other load on the cores) and
wall time. Then the exit walk once more with both runners in one process (the baseline's
package copied under another name), alternating 1,000-call blocks: no process or memory
layout differs between the two sides there.

    python benchmarks/exit_rule_ab.py --baseline /tmp/main-src [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from _util import header, write_results

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 8, 64)
PATHS = {"walk": None, "stages": {"compose": False}, "chain": {}}
#: predict calls per timing, by batch size
CALLS = {"walk": {1: 4000, 8: 2000, 64: 1000}, "ort": {1: 64, 8: 16, 64: 4}}

WORKER = r"""
import hashlib, json, sys, time
import numpy as np
from dgconvert.core.bundle import Bundle
from dgconvert.runtime import GatedRunner
from dgconvert.runtime.base import Backend, StageOutput
cfg = json.loads(sys.argv[1])
px = np.random.default_rng(3).integers(0, 256, (512, 1, 28, 28), dtype=np.uint8)

class Replay(Backend):
    # stage outputs drawn from fixed arrays: the runner's Python without the kernels
    name = "replay"
    def __init__(self, bundle):
        super().__init__(bundle)
        g = np.random.default_rng(0)
        self.n = 1 << 16
        self.scores = [g.standard_normal(self.n + 64).astype(np.float32)
                       for _ in range(bundle.num_stages)]
        self.labels = g.integers(0, 10, self.n + 64)
        self.features = np.zeros((self.n + 64, 1), np.float32)
        self.at = 0
    def run_stage(self, k, inputs, keep):
        m = len(inputs) if keep is None else len(keep)
        a = self.at = (self.at + 7) % self.n
        return StageOutput(self.features[:m], self.scores[k][a:a + m], self.labels[a:a + m])
    def run_full(self, images):
        raise NotImplementedError

runners = {}
for p, o in cfg["paths"].items():
    if o is None:
        b = Bundle.load(cfg["bundle"])
        runners[p] = GatedRunner(b, backend=Replay(b), thresholds=[0.0] * b.num_gates)
    else:
        runners[p] = GatedRunner(cfg["bundle"], backend="onnxruntime", threads=1,
                                 thresholds=cfg["thresholds"], **o)
for line in sys.stdin:
    path, batch, calls = json.loads(line)
    r = runners[path]
    if isinstance(r.backend, Replay):
        r.backend.at = 0
    batches = [r.prepare(px[(i * batch) % 512:(i * batch) % 512 + batch]) for i in range(8)]
    r.predict(batches[0])
    if isinstance(r.backend, Replay):
        r.backend.at = 0
    c0, t0 = time.process_time(), time.perf_counter()
    res = [r.predict(batches[i % 8]) for i in range(calls)]
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    h = hashlib.sha1()
    for x in res:
        h.update(x.labels.tobytes()); h.update(x.exit_stage.tobytes())
    n = calls * batch
    print(json.dumps({"cpu": dc / n * 1e6, "wall": dt / n * 1e6, "digest": h.hexdigest()}),
          flush=True)
"""


SAME_PROCESS = r"""
import json, sys, time
import numpy as np
import dgbaseline.core.bundle, dgbaseline.runtime, dgbaseline.runtime.base
import dgconvert.core.bundle, dgconvert.runtime, dgconvert.runtime.base
cfg = json.loads(sys.argv[1])
def runner(pkg):
    Backend, StageOutput = pkg.runtime.base.Backend, pkg.runtime.base.StageOutput
    ns: dict = {}
    exec(cfg["replay"], globals() | {"Backend": Backend, "StageOutput": StageOutput}, ns)
    b = pkg.core.bundle.Bundle.load(cfg["bundle"])
    return pkg.runtime.GatedRunner(b, backend=ns["Replay"](b), thresholds=[0.0] * b.num_gates)
sides = {"baseline": runner(dgbaseline), "this": runner(dgconvert)}
out = {}
for batch in (1, 8, 64):
    x = sides["this"].prepare(np.zeros((batch, 1, 28, 28), np.uint8))
    t = {"baseline": [], "this": []}
    for rep in range(cfg["blocks"]):
        for name in (list(sides) if rep % 2 == 0 else list(sides)[::-1]):
            r = sides[name]
            r.backend.at = 0
            c0 = time.process_time()
            for _ in range(1000):
                r.predict(x)
            t[name].append((time.process_time() - c0) * 1e3)  # us per call
    out[batch] = t
print(json.dumps(out))
"""


#: the package name where it names a module (``dgconvert.x``, ``import dgconvert``), not in
#: strings such as the manifest's format name
_MODULE = re.compile(r"\bdgconvert(?=\.[a-z_])|(?<=import )dgconvert\b|(?<=from )dgconvert(?= import)")


def same_process_walk(baseline: Path, bundle: str, blocks: int) -> dict[str, Any]:
    """Both runners' exit walk in one process (the baseline as package ``dgbaseline``)."""
    replay = WORKER[WORKER.index("class Replay"):WORKER.index("runners = {}")]
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "dgbaseline"
        shutil.copytree(baseline / "dgconvert", dst)
        for f in dst.rglob("*.py"):
            text = f.read_text(encoding="utf-8")
            f.write_text(_MODULE.sub("dgbaseline", text), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": f"{tmp}{os.pathsep}{ROOT}"}
        cfg = {"bundle": bundle, "replay": replay, "blocks": blocks}
        out = subprocess.run([sys.executable, "-c", SAME_PROCESS, json.dumps(cfg)], env=env,
                             check=False, capture_output=True, text=True,
                             cwd=tempfile.gettempdir())
    if out.returncode:
        raise SystemExit(f"the same-process walk failed:\n{out.stderr}")
    return json.loads(out.stdout)


def make_bundle(folder: Path) -> tuple[str, list[float]]:
    """The tests' small ResNet exported, and each gate's median score as thresholds."""
    sys.path.insert(0, str(ROOT))
    import dgconvert as dg
    from dgconvert.runtime import GatedRunner
    from tests.models import build

    bundle = dg.export(build("resnet"), folder / "ab.dg", verify=False)
    px = np.random.default_rng(3).integers(0, 256, (512, 1, 28, 28), dtype=np.uint8)
    rec = GatedRunner(bundle, backend="onnxruntime", compose=False).collect(px)
    return str(bundle.path), [float(np.median(rec.scores[:, k])) for k in range(rec.num_gates)]


class Worker:
    def __init__(self, source: Path, cfg: dict[str, Any]) -> None:
        env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, cwd=tempfile.gettempdir())

    def time(self, path: str, batch: int) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        calls = CALLS["walk" if PATHS[path] is None else "ort"][batch]
        self.proc.stdin.write(json.dumps([path, batch, calls]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, default=Path("/work/main"),
                    help="checkout whose dgconvert is the baseline (main)")
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle, t = make_bundle(Path(tmp))
        cfg = {"bundle": bundle, "thresholds": t, "paths": PATHS}
        sides = {"baseline": Worker(args.baseline, cfg), "this": Worker(ROOT, cfg)}
        times: dict[str, dict[str, dict[str, list[float]]]] = {}
        try:
            for r in range(args.rounds):
                order = list(sides) if r % 2 == 0 else list(sides)[::-1]
                for path in PATHS:
                    for batch in BATCHES:
                        key = f"{path} b{batch}"
                        got = {s: sides[s].time(path, batch) for s in order}
                        if got["baseline"]["digest"] != got["this"]["digest"]:
                            raise SystemExit(f"{key}: the two runners' results differ")
                        for s, g in got.items():
                            for clock in ("cpu", "wall"):
                                times.setdefault(key, {}).setdefault(clock, {}).setdefault(
                                    s, []).append(g[clock])
        finally:
            for w in sides.values():
                w.close()
        same = same_process_walk(args.baseline, bundle, max(2 * args.rounds, 20))
    rows, data = [], {}
    for key, clocks in times.items():
        cells, data[key] = [], {}
        for clock, d in clocks.items():
            a, b = np.asarray(d["baseline"]), np.asarray(d["this"])
            q1, med, q3 = np.percentile(b / a, [25, 50, 75])
            data[key][clock] = {"baseline_us": d["baseline"], "this_us": d["this"],
                                "ratio_median": float(med), "ratio_q1": float(q1),
                                "ratio_q3": float(q3)}
            cells.append(f"{np.median(a):.2f} | {np.median(b):.2f} | **{med:.3f}** "
                         f"({q1:.3f}–{q3:.3f})")
        rows.append(f"| {key} | " + " | ".join(cells) + " |")
    md = "\n".join([
        header("Exit rule A/B: the runner's hot path, baseline vs this checkout", [
            f"baseline: `{args.baseline}`; {args.rounds} interleaved rounds; ONNX Runtime CPU, "
            "1 thread; the tests' small ResNet (3 gates), thresholds at each gate's median "
            "score; identical labels and exit stages checked every round",
        ]),
        "CPU time of the process (µs per image) first, wall time second; ratio = this / "
        "baseline within each round, median (interquartile range) over the rounds.",
        "",
        "| path, batch | CPU baseline | CPU this | CPU ratio | wall baseline | wall this "
        "| wall ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ])
    same_rows = []
    for batch, d in same.items():
        a, b = np.asarray(d["baseline"]), np.asarray(d["this"])
        q1, med, q3 = np.percentile(b / a, [25, 50, 75])
        data[f"same-process walk b{batch}"] = {"cpu": {
            "baseline_us": d["baseline"], "this_us": d["this"], "ratio_median": float(med),
            "ratio_q1": float(q1), "ratio_q3": float(q3), "ratio_of_minima": float(b.min() / a.min())}}
        same_rows.append(f"| walk b{batch} | {a.min():.2f} | {b.min():.2f} | {b.min() / a.min():.3f} "
                         f"| **{med:.3f}** ({q1:.3f}–{q3:.3f}) |")
    md += "\n".join([
        "", "", "## The exit walk, both runners in one process",
        "",
        "CPU µs per `predict` call (replayed stage outputs), best 1,000-call block of each side, "
        "and the ratio this / baseline of alternating blocks.",
        "",
        "| path, batch | baseline best | this best | ratio of bests | ratio, median (IQR) |",
        "|---|---:|---:|---:|---:|",
        *same_rows,
    ])
    print(md)
    write_results("exit_rule_ab", md, {"thresholds": t, "rounds": args.rounds, "results": data})


if __name__ == "__main__":
    main()
