"""Conformance matrix: which classifier families convert, per gate type.

For every model (torchvision and timm constructors, random weights, nothing downloaded,
tiny widths and inputs where the constructor allows): cut automatically at K points of
about equal FLOPs (``cuts=K``), attach gates, export (``dg.export``, verified against
torch), and run the bundle with thresholds at which rows exit at every gate; compare labels
and exit stages with ``GatedNetwork.gated_forward`` sample by sample (ties aside).

    python benchmarks/conformance.py [--gates dgate,softmax,confidence] [--only vit,swin]

Writes ``benchmarks/results/conformance.{md,json}``. Needs torchvision (and timm for the
timm rows): ``pip install -e '.[export,models]'`` with a torchvision that pairs with torch.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

RESULTS = Path(__file__).parent / "results"


def _import_torchvision() -> Any:
    """``import torchvision``; when its compiled ops do not load beside this torch (PyPI's
    CUDA torchvision 0.28 beside the CPU torch 2.13.0 wheel: "operator torchvision::nms does
    not exist"), define the two op schemas it registers unconditionally and import the
    pure-Python model definitions anyway (no compiled op is used by a classifier)."""
    import importlib
    import sys

    try:
        return importlib.import_module("torchvision")
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 (kept alive for the import)
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    globals()["_TV_SHIM"] = lib
    return importlib.import_module("torchvision")


def _tv() -> dict[str, tuple[Callable[[], torch.nn.Module], int, int]]:
    """name -> (constructor, input size, cuts). Tiny variants where the constructor allows."""
    from torchvision import models as m
    from torchvision.models import convnext as cn
    from torchvision.models import efficientnet as ef
    from torchvision.models import maxvit as mx
    from torchvision.models import regnet as rg
    from torchvision.models import resnet as rn
    from torchvision.models import swin_transformer as sw
    from torchvision.models import vision_transformer as vt

    nc = 10
    tiny_swin = dict(patch_size=[4, 4], embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 1, 2, 2],
                     window_size=[4, 4], num_classes=nc)  # fmt: skip
    return {
        "resnet18": (lambda: m.resnet18(num_classes=nc), 32, 3),
        "resnext (tiny)": (lambda: rn.ResNet(rn.Bottleneck, [1, 1, 1, 1], groups=4,
                                             width_per_group=4, num_classes=nc), 32, 3),  # fmt: skip
        "wide_resnet (tiny)": (lambda: rn.ResNet(rn.Bottleneck, [1, 1, 1, 1],
                                                 width_per_group=128, num_classes=nc), 32, 3),  # fmt: skip
        "densenet (tiny)": (lambda: m.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2),
                                               num_init_features=16, num_classes=nc), 32, 3),  # fmt: skip
        "mobilenet_v2 (0.25)": (lambda: m.mobilenet_v2(width_mult=0.25, num_classes=nc), 32, 3),
        "mobilenet_v3_small": (lambda: m.mobilenet_v3_small(num_classes=nc), 32, 3),
        "efficientnet_b0": (lambda: m.efficientnet_b0(num_classes=nc), 32, 3),
        "efficientnet_v2 (tiny)": (lambda: ef.EfficientNet(
            [ef.FusedMBConvConfig(1, 3, 1, 8, 8, 1), ef.FusedMBConvConfig(4, 3, 2, 8, 16, 1),
             ef.MBConvConfig(4, 3, 2, 16, 32, 1), ef.MBConvConfig(6, 3, 2, 32, 48, 1)],
            dropout=0.0, last_channel=64, num_classes=nc), 32, 3),  # fmt: skip
        "regnet_y_400mf": (lambda: m.regnet_y_400mf(num_classes=nc), 32, 3),
        "regnet_x (tiny)": (lambda: rg.RegNet(rg.BlockParams.from_init_params(
            depth=4, w_0=8, w_a=8.0, w_m=2.0, group_width=8), num_classes=nc), 32, 3),  # fmt: skip
        "convnext (tiny widths)": (lambda: cn.ConvNeXt(
            [cn.CNBlockConfig(8, 16, 1), cn.CNBlockConfig(16, 32, 1), cn.CNBlockConfig(32, 64, 1),
             cn.CNBlockConfig(64, None, 1)], num_classes=nc), 32, 3),  # fmt: skip
        "vit (tiny)": (lambda: vt.VisionTransformer(image_size=32, patch_size=8, num_layers=4,
                                                    num_heads=2, hidden_dim=32, mlp_dim=64,
                                                    num_classes=nc), 32, 3),  # fmt: skip
        "swin (tiny)": (lambda: sw.SwinTransformer(**tiny_swin), 32, 3),
        "swin_v2 (tiny)": (lambda: sw.SwinTransformer(**tiny_swin, block=sw.SwinTransformerBlockV2,
                                                      downsample_layer=sw.PatchMergingV2), 32, 3),  # fmt: skip
        "maxvit (tiny)": (lambda: mx.MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2,
                                            block_channels=[8, 16], block_layers=[1, 1], head_dim=4,
                                            stochastic_depth_prob=0.0, num_classes=nc), 32, 3),  # fmt: skip
        "shufflenet_v2_x0_5": (lambda: m.shufflenet_v2_x0_5(num_classes=nc), 32, 3),
        "squeezenet1_1": (lambda: m.squeezenet1_1(num_classes=nc), 64, 3),
        "mnasnet0_5": (lambda: m.mnasnet0_5(num_classes=nc), 32, 3),
        "googlenet": (lambda: m.googlenet(num_classes=nc, aux_logits=False, init_weights=True), 64, 3),
        "inception_v3": (lambda: m.inception_v3(num_classes=nc, aux_logits=False,
                                                init_weights=True), 75, 3),  # fmt: skip
    }


def _timm() -> dict[str, tuple[Callable[[], torch.nn.Module], int, int]]:
    import timm

    def make(name: str, **kw: Any) -> Callable[[], torch.nn.Module]:
        return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kw)

    return {
        "timm deit_tiny": (make("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=4), 32, 3),
        "timm convnext_atto": (make("convnext_atto"), 32, 3),
        "timm efficientnet_b0": (make("efficientnet_b0"), 32, 3),
        "timm resnet18d": (make("resnet18d"), 32, 3),
        "timm vit_tiny_r_s16_p8 (hybrid)": (make("vit_tiny_r_s16_p8_224", img_size=32), 32, 3),
    }


def _one(name: str, make: Callable[[], torch.nn.Module], size: int, k: int, gate: str,
         tmp: Path) -> dict[str, Any]:  # fmt: skip
    import dgconvert as dg
    from dgconvert.convert.verify import spread_thresholds
    from dgconvert.gating import GatedNetwork
    from dgconvert.runtime import GatedRunner

    row: dict[str, Any] = {"model": name, "gate": gate, "input": size}
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(32, 3, size, size, generator=torch.Generator().manual_seed(1))
    _estimate_norm_statistics(model, x)
    stage = "cut"
    try:
        net = GatedNetwork.from_backbone(model, k, gate=gate, example_input=x[:2]).eval()
        row["cuts"] = net.cuts
        row["layouts"] = sorted({g.layout for g in net.gates})
        stage = "export"
        t0 = time.perf_counter()
        bundle = dg.export(net, tmp / f"{gate}.dg", verify_input=x, force=True)
        row["export_s"] = round(time.perf_counter() - t0, 1)
        row["exports"] = row["verifies"] = True
        row["exporters"] = [s.extra.get("exporter") for s in bundle.manifest.stages]
        row["empty_batch_crashes"] = [s.index for s in bundle.manifest.stages if not s.empty_batch]
        costs = bundle.exit_costs()
        row["flops_share"] = [round(c / costs[-1], 3) for c in costs]
        stage = "runner"
        t = spread_thresholds(net, x)
        ref = net.gated_forward(x, t, return_scores=True)
        with torch.no_grad():
            scores = net.all_exits(x).scores.numpy()
        ok = ~(np.abs(scores - np.asarray(t, np.float32)) < 1e-4).any(axis=1)
        res = GatedRunner(bundle.path, backend="onnxruntime", thresholds=t, max_batch=8).predict(x.numpy())
        same = (res.labels == np.asarray(ref.labels)) & (res.exit_stage == np.asarray(ref.exit_stage))
        row["runner_eq_torch"] = bool(same[ok].all())
        row["exit_at_every_gate"] = bool((np.bincount(res.exit_stage, minlength=bundle.num_stages) > 0).all())
    except Exception as exc:  # recorded in the matrix with the reason
        row.setdefault("exports", False if stage in ("cut", "export") else row.get("exports"))
        row["verifies"] = row.get("verifies", False)
        row["failed_at"] = stage
        row["reason"] = _reason(exc)
        row["trace"] = traceback.format_exc()[-1500:]
    return row


@torch.no_grad()
def _estimate_norm_statistics(model: torch.nn.Module, x: torch.Tensor) -> None:
    """BatchNorm running statistics from one train-mode pass over ``x`` (as after training):
    at their initial values (mean 0, var 1) a deep random network's activations grow
    without bound (Inception-v3: logits ~1e8), and float32 noise then exceeds any tolerance."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
    model.train()
    model(x)
    model.eval()


def _reason(exc: BaseException) -> str:
    """The exception's first line, plus its first mismatches for a verification error."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    head = f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__
    details = [ln[:400] for ln in getattr(exc, "mismatches", [])[:2]]
    return " ".join([head, *details])


def _isolated(name: str, make: Callable[[], torch.nn.Module], size: int, k: int, gate: str,
              tmp: Path) -> dict[str, Any]:  # fmt: skip
    """:func:`_one` in a forked child: a hard crash (a signal in an exporter or a runtime)
    becomes a failed row instead of ending the run."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=lambda: queue.put(_one(name, make, size, k, gate, tmp)))
    proc.start()
    proc.join()
    if not queue.empty():
        return queue.get()
    import signal

    code = proc.exitcode or 0
    how = signal.Signals(-code).name if code < 0 else f"exit code {code}"
    return {"model": name, "gate": gate, "input": size, "exports": False, "verifies": False,
            "failed_at": "process", "reason": f"the process died ({how}): a crash inside "
            "torch or ONNX Runtime, or out of memory"}  # fmt: skip


def _md(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Conformance matrix",
        "",
        f"`python benchmarks/conformance.py` — torch {meta['torch']}, torchvision "
        f"{meta['torchvision']}, timm {meta['timm']}, onnxruntime {meta['onnxruntime']}, "
        f"{meta['cpus']} CPU threads. Random weights, nothing downloaded; tiny widths/inputs "
        "where the constructor allows; BatchNorm statistics estimated in one train-mode "
        "pass over the 32 random inputs. Cuts: `cuts=3` (automatic, about equal FLOPs shares). "
        "*verifies*: every stage and full.onnx match torch in ONNX Runtime (dg.export's "
        "verification); *runner == torch*: GatedRunner's labels and exit stages equal "
        "`gated_forward` sample by sample (ties at a threshold aside) at thresholds where "
        "rows exit at every gate.",
        "",
        "| model | gate | input | cuts (auto) | layout | exports | verifies | runner == torch "
        "| exits at every gate | FLOPs share per exit | exporter per stage | export s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    yes = {True: "yes", False: "**no**", None: "–"}
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['gate']} | {r['input']} | {', '.join(r.get('cuts', [])) or '–'} "
            f"| {', '.join(r.get('layouts', [])) or '–'} | {yes[r.get('exports')]} "
            f"| {yes[r.get('verifies')]} | {yes[r.get('runner_eq_torch')]} "
            f"| {yes[r.get('exit_at_every_gate')]} | {r.get('flops_share', '–')} "
            f"| {', '.join(map(str, r.get('exporters', []))) or '–'} | {r.get('export_s', '–')} |"
        )
    fails = [r for r in rows if "reason" in r]
    ok = sum(1 for r in rows if r.get("runner_eq_torch") and r.get("verifies"))
    lines += ["", f"**{ok}/{len(rows)} rows convert, verify and match torch.**", ""]
    if fails:
        lines += ["## Failures", ""]
        lines += [f"- {r['model']} ({r['gate']}), at {r['failed_at']}: {r['reason']}" for r in fails]
    empty = [r for r in rows if r.get("empty_batch_crashes")]
    if empty:
        lines += ["", "## Stages ONNX Runtime cannot run on an empty batch", ""]
        lines += [f"- {r['model']} ({r['gate']}): stage(s) {r['empty_batch_crashes']} die of a "
                  "signal on M = 0 (recorded in the manifest; the runner never runs a stage no "
                  "row reaches, the one-session chain is off for this bundle)" for r in empty]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gates", default="dgate,softmax,confidence")
    ap.add_argument("--only", default=None, help="comma-separated prefixes of model names")
    ap.add_argument("--out", default=str(RESULTS / "conformance"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows already in --out.json, replacing those rerun")
    args = ap.parse_args()
    import onnxruntime

    torchvision = _import_torchvision()
    zoo = _tv()
    try:
        import timm

        zoo.update(_timm())
        timm_v = timm.__version__
    except ImportError:
        timm_v = "not installed"
    if args.only:
        keys = [s.strip() for s in args.only.split(",")]
        zoo = {k: v for k, v in zoo.items() if any(k.startswith(s) for s in keys)}
    gates = [g.strip() for g in args.gates.split(",")]
    meta = {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm_v,
            "onnxruntime": onnxruntime.__version__, "cpus": torch.get_num_threads(),
            "python": platform.python_version()}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    old: list[dict[str, Any]] = []
    if args.merge and out.with_suffix(".json").is_file():
        old = json.loads(out.with_suffix(".json").read_text())["rows"]

    def merged() -> list[dict[str, Any]]:
        new = {(r["model"], r["gate"]): r for r in rows}
        keep = [new.pop((r["model"], r["gate"]), r) for r in old]
        return keep + list(new.values())

    with tempfile.TemporaryDirectory() as d:
        bar = tqdm(total=len(zoo) * len(gates), desc="conformance")
        for name, (make, size, k) in zoo.items():
            for gate in gates:
                bar.set_postfix_str(f"{name} {gate}")
                rows.append(_isolated(name, make, size, k, gate, Path(d)))
                bar.update(1)
                # written after every row: a long run can be read (and resumed) while it goes
                out.with_suffix(".json").write_text(
                    json.dumps({"meta": meta, "rows": merged()}, indent=1) + "\n"
                )
                out.with_suffix(".md").write_text(_md(merged(), meta))
        bar.close()
    print(_md(merged(), meta))


if __name__ == "__main__":
    main()
