"""Load test of ``dgconvert serve``: closed-loop ``tritonclient.http`` clients (one client
per thread) against the gated server and the ``--full`` server, per model.

For each concurrency (1 / 8 / 32) and request size (1 / 8 images), every client sends
binary-tensor requests for ``--seconds``; the gated and full apps are measured one after
the other on the same Ray Serve instance (one replica each, idle while the other runs).

The serving overhead ``o`` (machine time per request that is not the model) is measured by
serving a trivial model (a few kFLOPs, same input size) the same way: ``o = 1 / its
requests/s``. The model's own cost per request ``c`` comes from in-process
``GatedPool``s (same batching, same clients, no HTTP): ``c = 1 / requests/s``. The served
ideal is then ``(c_full + o) / (c_exit_mix + o)``: what the gated server would gain over
the full one if serving added exactly ``o`` to each request.

Models: the reference bundle (``make demo``) and a compute-heavy ResNet-50 (bottleneck
blocks [3, 4, 6, 3], 128 px, random weights) with d-gates after layer1-3 and thresholds
set for a fixed exit mix on the benchmark images.

    .venv/bin/python benchmarks/serve_load.py [--reference out/reference.dg] [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _util import DEFAULT_BUNDLE, TEST_DATA, header, write_results
from pool_throughput import _closed_loop
from torch import nn

import dgconvert as dg
from dgconvert.core.bundle import Bundle
from dgconvert.data import load_dataset
from dgconvert.runtime import GatedPool, GatedRunner
from dgconvert.serve import ServeOptions
from dgconvert.serve.app import AppSpec, start_many

EXIT_MIX = (0.35, 0.25, 0.2, 0.2)  # compute-heavy model: exits at gates 0, 1, 2, final


# -- models -------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


class ResNet50(nn.Module):
    """torchvision's ResNet-50 layout (stem 7x7/2 + max-pool, bottlenecks [3, 4, 6, 3])."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        cin = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(cin, width, 2 if i > 0 and j == 0 else 1))
                cin = 4 * width
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


class Trivial(nn.Module):
    """A few kFLOPs on the same input: what serving costs without a model."""

    def __init__(self, channels: int, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.AdaptiveAvgPool2d(4)
        self.b1 = nn.Conv2d(channels, 4, 1)
        self.b2 = nn.Conv2d(4, 4, 1)
        self.b3 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b3(self.b2(self.b1(self.stem(x))))
        return self.fc(torch.flatten(x, 1))


def export(model: nn.Module, cuts: list[str], shape: list[int], out: Path,
           pixels: np.ndarray) -> Bundle:
    torch.manual_seed(0)
    model.eval()
    norm = {"scale": 255.0, "mean": [0.5] * shape[0], "std": [0.25] * shape[0]}
    net = dg.GatedNetwork.from_backbone(model, cuts, gate="dgate", input_shape=shape,
                                        normalization=norm).eval()
    from dgconvert.core.preprocess import prepare_images

    x = torch.from_numpy(prepare_images(pixels[:8], shape, norm))
    return dg.export(net, out, verify_input=x, force=True)


def set_exit_mix(bundle: Bundle, pixels: np.ndarray, mix: tuple[float, ...]) -> list[float]:
    """Thresholds with which the gates exit ``mix`` of ``pixels`` at each stage, in order."""
    rec = GatedRunner(bundle, backend="onnxruntime", compose=False).collect(pixels)
    left = np.ones(len(pixels), bool)
    t = []
    for k in range(rec.num_gates):
        want = mix[k] / max(left.mean(), 1e-9)
        s = rec.scores[left, k]
        tk = float(np.quantile(s, 1 - min(want, 1.0)))
        t.append(tk)
        left &= ~(rec.scores[:, k] >= tk)
    bundle.set_thresholds(t, "serve_load.py: fixed exit mix")
    return t


# -- load -----------------------------------------------------------------------------------
def served_loop(url: str, model: str, images: np.ndarray, clients: int, size: int,
                seconds: float) -> tuple[float, list[float]]:
    """Requests/s and latencies (ms) of ``clients`` threads, one tritonclient each."""
    import tritonclient.http as th

    stop = time.perf_counter() + seconds
    counts = [0] * clients
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    dtype = "UINT8" if images.dtype == np.uint8 else "FP32"

    def client(i: int) -> None:
        c = th.InferenceServerClient(url, network_timeout=120)
        rng = np.random.default_rng(i)
        try:
            while time.perf_counter() < stop:
                r = int(rng.integers(0, len(images) - size))
                inp = th.InferInput("images", [size, *images.shape[1:]], dtype)
                inp.set_data_from_numpy(images[r:r + size])
                t0 = time.perf_counter()
                c.infer(model, [inp])
                lat[i].append(1e3 * (time.perf_counter() - t0))
                counts[i] += 1
        except BaseException as exc:  # noqa: BLE001 - raised below
            errors.append(exc)
        finally:
            c.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for th_ in threads:
        th_.start()
    for th_ in threads:
        th_.join()
    if errors:
        raise errors[0]
    return sum(counts) / (time.perf_counter() - t0), [v for li in lat for v in li]


def stats(url: str, model: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{url}/v2/models/{model}/stats", timeout=30) as r:
        return json.loads(r.read())["model_stats"][0]


def bench_model(label: str, bundle: Bundle, trivial: Bundle, images: np.ndarray,
                args: argparse.Namespace, port: int) -> list[dict[str, Any]]:
    from ray import serve

    opts = dict(max_batch=args.max_batch, max_delay_ms=args.max_delay_ms, replica_cpus=0.5)
    apps = {"gated": AppSpec(bundle, ServeOptions(**opts), name=f"{label}-g", route_prefix="/g"),
            "full": AppSpec(bundle, ServeOptions(full=True, **opts), name=f"{label}-f",
                            route_prefix="/f"),
            "trivial": AppSpec(trivial, ServeOptions(full=True, **opts), name=f"{label}-t",
                               route_prefix="/t")}
    start_many(list(apps.values()), host="127.0.0.1", port=port)
    url = {k: f"127.0.0.1:{port}{a.route_prefix}" for k, a in apps.items()}
    name = {k: Path(a.bundle.path).name.removesuffix(".dg") for k, a in apps.items()}
    pools = {"gated": GatedPool(bundle, max_batch=args.max_batch,
                                max_delay_ms=args.max_delay_ms, backend="onnxruntime"),
             "full": GatedPool(bundle, max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
                               full=True, backend="onnxruntime")}
    rows = []
    try:
        for clients in args.clients:
            for size in args.sizes:
                rps: dict[str, float] = {}
                lats: dict[str, list[float]] = {}
                before = stats(url["gated"], name["gated"])
                for k in ("gated", "full", "trivial"):
                    served_loop(url[k], name[k], images, clients, size, 1.0)  # warm
                    if k == "gated":
                        before = stats(url["gated"], name["gated"])
                    rps[k], lats[k] = served_loop(url[k], name[k], images, clients, size,
                                                  args.seconds)
                    if k == "gated":
                        after = stats(url["gated"], name["gated"])
                inproc = {k: _closed_loop(p, images, clients, size, args.inproc_seconds)[0]
                          for k, p in pools.items()}
                o = 1e3 / rps["trivial"]
                c_full, c_mix = 1e3 / inproc["full"], 1e3 / inproc["gated"]
                ideal = (c_full + o) / (c_mix + o)
                ratio = rps["gated"] / rps["full"]
                stage_rows = np.subtract(after["rows_per_stage"], before["rows_per_stage"])
                row = {
                    "model": label, "clients": clients, "request_size": size,
                    "gated_img_s": rps["gated"] * size, "full_img_s": rps["full"] * size,
                    "ratio": ratio, "o_ms": o, "c_full_ms": c_full, "c_mix_ms": c_mix,
                    "inproc_ratio": inproc["gated"] / inproc["full"],
                    "served_ideal": ideal, "of_ideal": ratio / ideal,
                    "gated_p50_ms": float(np.percentile(lats["gated"], 50)),
                    "gated_p99_ms": float(np.percentile(lats["gated"], 99)),
                    "full_p50_ms": float(np.percentile(lats["full"], 50)),
                    "full_p99_ms": float(np.percentile(lats["full"], 99)),
                    "trivial_p50_ms": float(np.percentile(lats["trivial"], 50)),
                    "rows_per_stage": stage_rows.tolist(),
                    "requests": {k: len(v) for k, v in lats.items()},
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        for p in pools.values():
            p.close()
        for a in apps.values():
            serve.delete(a.name)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--data", default=TEST_DATA)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--sizes", default="1,8")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--inproc-seconds", type=float, default=4.0)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-delay-ms", type=float, default=2.0)
    ap.add_argument("--models", default="reference,resnet50")
    ap.add_argument("--port", type=int, default=18700)
    ap.add_argument("--stem", default="serve_load")
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.sizes = [int(s) for s in args.sizes.split(",")]
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="serve_load_"))
    rows: list[dict[str, Any]] = []
    notes = []
    t0 = time.perf_counter()
    for model in args.models.split(","):
        if model == "reference":
            images = load_dataset(args.data).images[:4096]
            if images.ndim == 3:
                images = images[:, None]
            bundle = Bundle.load(args.reference)
            trivial = export(Trivial(1), ["b1", "b2", "b3"], [1, 28, 28], tmp / "trivial28.dg",
                             images)
            notes.append(f"reference: {bundle.path.name}, calibrated thresholds "
                         f"{[round(v, 3) for v in bundle.thresholds]}, images {args.data}")
        else:
            images = np.random.default_rng(0).integers(0, 256, (512, 3, 128, 128), np.uint8)
            bundle = export(ResNet50(), ["layer1", "layer2", "layer3"], [3, 128, 128],
                            tmp / "resnet50.dg", images)
            t = set_exit_mix(bundle, images, EXIT_MIX)
            trivial = export(Trivial(3), ["b1", "b2", "b3"], [3, 128, 128],
                             tmp / "trivial128.dg", images)
            notes.append(f"resnet50: ResNet-50 layout at 128 px, random weights, "
                         f"{bundle.full_flops / 1e9:.2f} GFLOPs/image, d-gates after layer1-3, "
                         f"thresholds {[round(v, 3) for v in t]} for the exit mix {EXIT_MIX} "
                         "on 512 random images")
        rows += bench_model(model, bundle, trivial, images, args, args.port)
        print(f"{model} done at {time.perf_counter() - t0:.0f} s", flush=True)
    ray.shutdown()
    md = [header("dgconvert serve: closed-loop tritonclient load, gated vs --full", [
        *notes,
        f"one replica per app (GatedPool max_batch {args.max_batch}, max_delay_ms "
        f"{args.max_delay_ms}, ONNX Runtime on all cores), binary tensors, {args.seconds:.0f} s "
        "per served cell; clients run on the same 2 cores as the server",
        "o = 1 / (requests/s of a trivial model served the same way); c = 1 / (requests/s "
        "of in-process GatedPools, same clients); served ideal = (c_full + o) / (c_mix + o); "
        "targets (resnet50, 32 clients, batch 1): ratio >= 0.85 x served ideal, gated p99 "
        "<= full p99"]),
        "| model | clients | request | gated img/s | full img/s | gated/full | in-process "
        "gated/full | o ms | served ideal | of ideal | gated p50 / p99 ms | full p50 / p99 ms "
        "| rows per stage (gated) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        md.append(
            f"| {r['model']} | {r['clients']} | {r['request_size']} | {r['gated_img_s']:,.0f} | "
            f"{r['full_img_s']:,.0f} | {r['ratio']:.2f}× | {r['inproc_ratio']:.2f}× | "
            f"{r['o_ms']:.2f} | {r['served_ideal']:.2f}× | {r['of_ideal']:.2f} | "
            f"{r['gated_p50_ms']:.1f} / {r['gated_p99_ms']:.1f} | {r['full_p50_ms']:.1f} / "
            f"{r['full_p99_ms']:.1f} | {r['rows_per_stage']} |")
    target = [r for r in rows if r["model"] == "resnet50" and r["clients"] == 32
              and r["request_size"] == 1]
    if target:
        r = target[0]
        md += ["", f"Targets (resnet50, 32 clients, batch 1): gated/full {r['ratio']:.2f}× vs "
               f"0.85 × served ideal = {0.85 * r['served_ideal']:.2f}× — "
               f"{'met' if r['of_ideal'] >= 0.85 else 'missed'}; gated p99 "
               f"{r['gated_p99_ms']:.1f} ms vs full p99 {r['full_p99_ms']:.1f} ms — "
               f"{'met' if r['gated_p99_ms'] <= r['full_p99_ms'] else 'missed'}."]
    write_results(args.stem, "\n".join(md), {"rows": rows, "notes": notes,
                                             "median_of_ideal": statistics.median(
                                                 [r["of_ideal"] for r in rows])})


if __name__ == "__main__":
    main()
