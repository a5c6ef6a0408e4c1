"""Export a :class:`~dgconvert.gating.gaternet.GaterNet` to a verified one-stage bundle.

The gater runs inside the graph and its hard gates multiply the gated layers' channels per
sample, so the runtime needs nothing new: the bundle is a chain of one stage (``images ->
logits, label, score``, no gate). With calibration images (``prune_images``), the gates off
for every one of them are counted as *always off* and their filters are removed before
export (:func:`~dgconvert.gating.gaternet.prune_always_off`): the exported model then equals
the *masked* model — the GaterNet with those gates forced off — which on the calibration
images is the GaterNet itself. The manifest's ``gaternet`` entry records the gate kinds per
layer, the pruned share, and the per-image FLOPs before and after pruning.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dgconvert.convert.onnx_export import OPSET, export_onnx
from dgconvert.convert.specs import example_batch, progress_bar, tensor_specs
from dgconvert.convert.verify import (
    VerificationReport,
    check_runner,
    check_stage_graph,
    compare_outputs,
    tie_rows,
)
from dgconvert.core.bundle import Bundle, stamp_digests, write_manifest
from dgconvert.core.contract import CONTRACT
from dgconvert.core.errors import ExportVerificationError
from dgconvert.core.io import atomic_directory
from dgconvert.core.manifest import (
    FullInfo,
    GaterNetInfo,
    InputInfo,
    Manifest,
    StageInfo,
    ThresholdInfo,
    now_iso,
)
from dgconvert.gating.flops import count_flops
from dgconvert.gating.gaternet import (
    PRUNE_MULTIPLE,
    GaterNet,
    distribution,
    filter_gate_counts,
    force_off,
    prune_always_off,
)
from dgconvert.gating.heads import FinalHead


class GaterNetBundleStage(nn.Module):
    """The one stage of a GaterNet bundle: ``images -> (logits, label, score)``."""

    def __init__(self, net: GaterNet) -> None:
        super().__init__()
        self.net, self.head = net, FinalHead()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.net(images)
        score, label, _ = self.head(logits)
        return logits, label, score


def prepare(net: GaterNet, prune_images: np.ndarray | None, example: torch.Tensor,
            data: str = "", multiple: int = PRUNE_MULTIPLE) -> tuple[GaterNet, GaterNet, GaterNetInfo]:
    """``(exported, masked, info)``: the pruned network (or ``net`` itself without
    ``prune_images``; pruned layers keep a multiple of ``multiple`` channels), the masked
    reference it must equal, and the manifest record."""
    net.eval()
    one = example[:1]
    if prune_images is None or len(prune_images) == 0:
        flops = count_flops(net, one)
        return net, net, GaterNetInfo([], 0, "", dict(net.meta.get("gater", {})), flops, flops, 0.0)
    counts = filter_gate_counts(net, prune_images)
    off = counts == 0
    masked = force_off(net, off)
    pruned = prune_always_off(net, off, multiple)
    layers = distribution(net, counts, len(prune_images), pruned.removed)
    info = GaterNetInfo(
        layers, len(prune_images), data, dict(net.meta.get("gater", {})),
        count_flops(masked, one), count_flops(pruned.net, one),
        float(pruned.removed.sum() / max(net.num_filter_gates, 1)),
        {"not_pruned": pruned.notes} if pruned.notes else {},
    )
    return pruned.net.eval(), masked.eval(), info


def _near(net: GaterNet, x: torch.Tensor, tol: float) -> np.ndarray:
    """Rows float noise may change: a gate logit within ``tol`` of 0 (a filter may flip), or
    the two best class logits within ``tol``."""
    with torch.no_grad():
        g = net.gater.logits(x).numpy()
        logits = net(x).numpy()
    return (np.abs(g) <= tol).any(axis=1) | tie_rows(logits, tol)


@torch.no_grad()
def verify_gaternet_bundle(exported: GaterNet, masked: GaterNet, bundle: Bundle,
                           inputs: torch.Tensor, *, atol: float = 1e-4,
                           rtol: float = 1e-3) -> VerificationReport:
    """The stage graph and ``full.onnx`` against torch, the runtime at batch 1, 7 and
    ``len(inputs)`` sample by sample, and the exported (pruned) model against the masked
    one; raise :class:`ExportVerificationError` listing every mismatch."""
    from dgconvert.runtime.onnxruntime_backend import OnnxRuntimeBackend

    report = VerificationReport()
    backend = OnnxRuntimeBackend(bundle)
    x = inputs.float()
    near = _near(exported, x, atol + rtol) | _near(masked, x, atol + rtol)
    names = list(CONTRACT.outputs(0, 1))
    got = list(backend.run_contract(0, {CONTRACT.images: x.numpy()}).values())
    ref = [t.numpy() for t in GaterNetBundleStage(exported).eval()(x)]
    compare_outputs(report, "stage 0 (judged rows)", names, [g[~near] for g in got],
             [r[~near] for r in ref], atol, rtol)
    full = backend.run_full(x.numpy())
    compare_outputs(report, "full.onnx (judged rows)", list(CONTRACT.full_outputs), [full[~near]],
             [ref[0][~near]], atol, rtol)
    # pruned vs masked in torch: identical up to float summation order
    m = masked(x).numpy()
    compare_outputs(report, "pruned vs masked (judged rows)", [CONTRACT.logits, CONTRACT.label],
             [ref[0][~near], ref[1][~near]], [m[~near], m.argmax(1)[~near]], atol, rtol)
    report.max_abs["pruned_vs_masked"] = float(np.abs(ref[0] - m).max()) if len(m) else 0.0
    check_runner(report, bundle, backend, x.numpy(), [], ref[1], np.zeros(len(x), np.int64),
                 near, "chain", "the GaterNet in torch")
    backend.close()
    if report.mismatches:
        raise ExportVerificationError(report.mismatches)
    return report


def export_gaternet(
    net: GaterNet,
    out: str | Path,
    example_input: torch.Tensor | np.ndarray | None = None,
    *,
    verify_input: torch.Tensor | np.ndarray | None = None,
    prune_images: np.ndarray | None = None,
    prune_source: str = "",
    prune_multiple: int = PRUNE_MULTIPLE,
    force: bool = False,
    verify: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    source: dict[str, Any] | None = None,
    progress: bool = False,
    on_report: Callable[[VerificationReport], None] | None = None,
    exporter: str = "auto",
) -> Bundle:
    """Write ``out``: ``stage0.onnx`` (gater + gated backbone, pruned with ``prune_images``),
    ``full.onnx`` (the same model) and the manifest with its ``gaternet`` record; verified
    against torch (see :func:`verify_gaternet_bundle`). ``prune_multiple``: see
    :func:`~dgconvert.gating.gaternet.prune_always_off`. Other arguments as in
    :func:`dgconvert.convert.export.export`."""
    net.eval()
    shape = net.input_shape
    example = example_batch(example_input, shape)
    vin = example if verify_input is None else torch.as_tensor(verify_input).float()
    bar = progress_bar(4 + int(verify), progress)
    exported, masked, info = prepare(net, prune_images, example, prune_source, prune_multiple)
    bar.update(1)
    stage = GaterNetBundleStage(exported).eval()  # see convert.stages.stage_modules
    inputs, outputs = CONTRACT.inputs(0), CONTRACT.outputs(0, 1)
    with atomic_directory(out, force=force) as tmp, torch.no_grad():
        outs = list(stage(example))

        def check(path: Path) -> None:
            check_stage_graph(str(path), stage, example, first=True, atol=atol, rtol=rtol)

        used = export_onnx(stage, (example,), tmp / "stage0.onnx", inputs, outputs,
                           exporter=exporter, check=check, what="the GaterNet stage")
        bar.update(1)
        export_onnx(exported, (example,), tmp / "full.onnx", CONTRACT.full_inputs,
                    CONTRACT.full_outputs, exporter=exporter, what="full.onnx (the GaterNet)")
        bar.update(1)
        manifest = Manifest(
            input=InputInfo(CONTRACT.images, [None, *shape], "float32", net.normalization),
            num_classes=net.num_classes,
            stages=[StageInfo(0, "stage0.onnx", tensor_specs(inputs, [example], "N"),
                              tensor_specs(outputs, outs, "N"), info.flops_pruned, None,
                              extra={"exporter": used})],
            full=FullInfo("full.onnx", info.flops_pruned),
            thresholds=ThresholdInfo([], "export", now_iso()),
            classes=list(net.classes),
            source={**(source or {}), "kind": "gaternet"},
            opset=OPSET,
            gaternet=info,
        )
        stamp_digests(manifest, tmp)
        write_manifest(tmp, manifest)
        bar.update(1)
        if verify:
            report = verify_gaternet_bundle(exported, masked, Bundle.load(tmp), vin,
                                            atol=atol, rtol=rtol)
            if on_report:
                on_report(report)
            bar.update(1)
    bar.close()
    return Bundle.load(out)
