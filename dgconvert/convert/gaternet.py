"""Verify a one-stage bundle — a :class:`~dgconvert.gating.gaternet.GaterNet`'s (exported by
:func:`dgconvert.convert.export.export`, prepared by the ``gaternet`` family) or any model
without exits.

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

import numpy as np
import torch
from torch import nn

from dgconvert.convert.verify import VerificationReport, check_runner, compare_outputs, tie_rows
from dgconvert.core.bundle import Bundle
from dgconvert.core.contract import CONTRACT
from dgconvert.core.errors import ExportVerificationError
from dgconvert.gating.families.base import NearRows
from dgconvert.gating.families.gaternet import gate_flip_rows
from dgconvert.gating.gaternet import GaterNet
from dgconvert.gating.stages import SingleStage


@torch.no_grad()
def verify_gaternet_bundle(exported: GaterNet, masked: GaterNet, bundle: Bundle,
                           inputs: torch.Tensor, *, atol: float = 1e-4,
                           rtol: float = 1e-3) -> VerificationReport:
    """A GaterNet's bundle: :func:`verify_one_stage` with the rows whose gate logits are
    within float noise of 0 (a filter may flip) not judged."""
    return verify_one_stage(exported, masked, bundle, inputs, atol=atol, rtol=rtol,
                            near=gate_flip_rows, what="the GaterNet")


def _near(net: nn.Module, x: torch.Tensor, tol: float, near: NearRows | None) -> np.ndarray:
    """Rows float noise may change: the two best class logits within ``tol``, or what the
    family's ``near`` says (e.g. a filter gate that may flip)."""
    rows = tie_rows(net(x).numpy(), tol)
    return rows if near is None else rows | near(net, x, tol)


@torch.no_grad()
def verify_one_stage(exported: nn.Module, masked: nn.Module, bundle: Bundle,
                     inputs: torch.Tensor, *, atol: float = 1e-4, rtol: float = 1e-3,
                     near: NearRows | None = None, what: str = "the model"
                     ) -> VerificationReport:
    """A one-stage bundle: the stage graph and ``full.onnx`` against torch, the runtime at
    batch 1, 7 and ``len(inputs)`` sample by sample, and the exported (e.g. pruned) model
    against the ``masked`` one it must equal; raise :class:`ExportVerificationError`
    listing every mismatch. Rows float noise may flip are not judged (label ties, and
    ``near(net, x, tol)``)."""
    from dgconvert.runtime.onnxruntime_backend import OnnxRuntimeBackend

    report = VerificationReport()
    backend = OnnxRuntimeBackend(bundle)
    x = inputs.float()
    tol = atol + rtol
    bad = _near(exported, x, tol, near) | _near(masked, x, tol, near)
    names = list(CONTRACT.outputs(0, 1))
    got = list(backend.run_contract(0, {CONTRACT.images: x.numpy()}).values())
    ref = [t.numpy() for t in SingleStage(exported).eval()(x)]
    compare_outputs(report, "stage 0 (judged rows)", names, [g[~bad] for g in got],
             [r[~bad] for r in ref], atol, rtol)
    full = backend.run_full(x.numpy())
    compare_outputs(report, "full.onnx (judged rows)", list(CONTRACT.full_outputs), [full[~bad]],
             [ref[0][~bad]], atol, rtol)
    # pruned vs masked in torch: identical up to float summation order
    m = masked(x).numpy()
    compare_outputs(report, "pruned vs masked (judged rows)", [CONTRACT.logits, CONTRACT.label],
             [ref[0][~bad], ref[1][~bad]], [m[~bad], m.argmax(1)[~bad]], atol, rtol)
    report.max_abs["pruned_vs_masked"] = float(np.abs(ref[0] - m).max()) if len(m) else 0.0
    check_runner(report, bundle, backend, x.numpy(), [], ref[1], np.zeros(len(x), np.int64),
                 bad, "chain", f"{what} in torch")
    backend.close()
    if report.mismatches:
        raise ExportVerificationError(report.mismatches)
    return report
