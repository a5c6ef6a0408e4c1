"""Export a :class:`GatedNetwork` to a verified staged ONNX bundle."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dgconvert.convert.onnx_export import OPSET, export_onnx
from dgconvert.convert.specs import example_batch, progress_bar, tensor_specs
from dgconvert.convert.stages import stage_modules
from dgconvert.convert.verify import VerificationReport, check_stage_graph, verify_bundle
from dgconvert.core.bundle import Bundle, stamp_digests, write_manifest
from dgconvert.core.contract import CONTRACT
from dgconvert.core.gates import PRUNE_MULTIPLE
from dgconvert.core.io import atomic_directory
from dgconvert.core.manifest import (
    FullInfo,
    GateInfo,
    InputInfo,
    Manifest,
    StageInfo,
    ThresholdInfo,
    now_iso,
)
from dgconvert.gating.flops import count_flops, stage_flops
from dgconvert.gating.multi_exit import MultiExitInfo
from dgconvert.gating.network import GatedNetwork


def _keep_example(n: int) -> torch.Tensor:
    """An unordered example ``keep`` whose size ``M`` is neither 0, 1 nor ``n``."""
    m = n - 1 if n - 1 >= 3 else n + 2
    return torch.arange(m - 1, -1, -1) % n


def describe_stage(net: GatedNetwork, k: int) -> str:
    """``stage k (backbone from after 'a' to 'b'; modules …)`` for errors and logs."""
    cuts = net.cuts
    last = net.num_gates
    start = "the input" if k == 0 else f"after {cuts[k - 1]!r}" if cuts else f"stage {k - 1}"
    end = "the logits" if k == last else f"{cuts[k]!r}" if cuts else "its gate"
    body = net.stages[k]
    mods: list[str] = []
    graph = getattr(body, "graph", None)
    if graph is not None:
        for node in graph.nodes:
            if node.op == "call_module" and str(node.target).split(".")[0] not in mods:
                mods.append(str(node.target))
    shown = ", ".join(mods[:8]) + (f", … ({len(mods) - 8} more)" if len(mods) > 8 else "")
    spec = net.gates[k].spec() if k < last else {}
    gate = f" + {spec['type']} gate ({spec.get('layout', 'own head')})" if k < last else ""
    return f"stage {k} (backbone from {start} to {end}{gate}; modules: {shown or type(body).__name__})"


def _multi_exit_source(net: GatedNetwork) -> dict[str, Any]:
    """What a network converted from a multi-exit model was (``source.multi_exit``)."""
    info = MultiExitInfo.of(net.meta)
    return {} if info is None else {"multi_exit": info.source(net.backbone)}


def export(
    net: Any,
    out: str | Path,
    example_input: torch.Tensor | np.ndarray | None = None,
    *,
    verify_input: torch.Tensor | np.ndarray | None = None,
    force: bool = False,
    verify: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    source: dict[str, Any] | None = None,
    progress: bool = False,
    on_report: Callable[[VerificationReport], None] | None = None,
    exporter: str = "auto",
    prune_images: np.ndarray | None = None,
    prune_source: str = "",
    prune_multiple: int = PRUNE_MULTIPLE,
) -> Bundle:
    """Write ``out`` (a ``.dg`` directory): one ONNX graph per stage, ``full.onnx``, manifest.

    Every stage and the chain are checked against torch on ``verify_input`` (default:
    ``example_input``, else random inputs); all mismatches are raised at once. The bundle
    appears atomically: an interrupted or failed export leaves nothing behind, and an
    existing ``out`` is replaced only with ``force=True``. ``exporter``: ``"auto"`` (the
    torch.export-based exporter, falling back to the TorchScript-based one for a stage it
    fails on or exports wrongly), ``"dynamo"`` or ``"torchscript"``.

    A :class:`~dgconvert.gating.gaternet.GaterNet` goes to
    :func:`dgconvert.convert.gaternet.export_gaternet` (``prune_images``: calibration images
    whose always-off filters are removed; ``prune_source`` names them in the manifest;
    ``prune_multiple``: pruned layers keep a multiple of this many channels).
    """
    if not isinstance(net, GatedNetwork):
        from dgconvert.convert.gaternet import export_gaternet

        return export_gaternet(net, out, example_input, verify_input=verify_input,
                               prune_images=prune_images, prune_source=prune_source,
                               prune_multiple=prune_multiple,
                               force=force, verify=verify, atol=atol, rtol=rtol, source=source,
                               progress=progress, on_report=on_report, exporter=exporter)
    if prune_images is not None:
        raise ValueError("prune_images applies to a GaterNet; this is a GatedNetwork "
                         "(early exits only). Fix: drop prune_images (CLI --prune-data).")
    net.eval()
    shape = net.input_shape
    example = example_batch(example_input, shape)
    vin = example if verify_input is None else torch.as_tensor(verify_input).float()
    mods = stage_modules(net)
    num_stages = len(mods)
    last = num_stages - 1
    bar = progress_bar(len(mods) + 2 + int(verify), progress)
    body_flops, gate_flops = stage_flops(net)
    with atomic_directory(out, force=force) as tmp, torch.no_grad():
        stages, x = [], example
        for k, mod in enumerate(mods):
            inputs, outputs = CONTRACT.inputs(k), CONTRACT.outputs(k, num_stages)
            args = (x,) if k == 0 else (x, _keep_example(len(x)))
            outs = list(mod(*args))
            gate = GateInfo.from_spec(net.gates[k].spec(), gate_flops[k]) if k < last else None
            fname = f"stage{k}.onnx"

            empty_ok: dict[str, bool] = {}

            def check(path: Path, mod: Any = mod, x: torch.Tensor = x, k: int = k,
                      seen: dict[str, bool] = empty_ok) -> None:  # fmt: skip
                seen[str(path)] = check_stage_graph(str(path), mod, x, first=k == 0, atol=atol,
                                                    rtol=rtol)  # fmt: skip

            used = export_onnx(mod, args, tmp / fname, inputs, outputs, exporter=exporter,
                               check=check, what=describe_stage(net, k))  # fmt: skip
            stages.append(StageInfo(
                k, fname, tensor_specs(inputs, list(args), "N"),
                tensor_specs(outputs, outs, "M" if k else "N"), body_flops[k], gate,
                extra={"exporter": used}, empty_batch=empty_ok.get(str(tmp / fname), True),
            ))
            bar.update(1)
            if k < last:
                x = outs[0]
        export_onnx(net, (example,), tmp / "full.onnx", CONTRACT.full_inputs,
                    CONTRACT.full_outputs, exporter=exporter,
                    what="full.onnx (the ungated model)")  # fmt: skip
        bar.update(1)
        manifest = Manifest(
            input=InputInfo(CONTRACT.images, [None, *shape], "float32", net.normalization),
            num_classes=net.num_classes,
            stages=stages,
            full=FullInfo("full.onnx", count_flops(net, example[:1])),
            thresholds=ThresholdInfo(list(net.thresholds), "export", now_iso()),
            classes=list(net.classes),
            source={**(source or {}), **_multi_exit_source(net)},
            opset=OPSET,
        )
        stamp_digests(manifest, tmp)
        write_manifest(tmp, manifest)
        bar.update(1)
        if verify:
            report = verify_bundle(net, Bundle.load(tmp), vin, atol=atol, rtol=rtol)
            if on_report:
                on_report(report)
            bar.update(1)
    bar.close()
    return Bundle.load(out)
