"""Verify a :class:`~dgconvert.gating.gaternet.GaterNet`'s one-stage bundle (exported by
:func:`dgconvert.convert.export.export`, prepared by the ``gaternet`` family).

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

from dgconvert.convert.verify import VerificationReport, _compare, _tie_rows, check_runner
from dgconvert.core.bundle import Bundle
from dgconvert.core.contract import CONTRACT
from dgconvert.core.errors import ExportVerificationError
from dgconvert.gating.gaternet import GaterNet
from dgconvert.gating.stages import SingleStage


def _near(net: GaterNet, x: torch.Tensor, tol: float) -> np.ndarray:
    """Rows float noise may change: a gate logit within ``tol`` of 0 (a filter may flip), or
    the two best class logits within ``tol``."""
    with torch.no_grad():
        g = net.gater.logits(x).numpy()
        logits = net(x).numpy()
    return (np.abs(g) <= tol).any(axis=1) | _tie_rows(logits, tol)


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
    ref = [t.numpy() for t in SingleStage(exported).eval()(x)]
    _compare(report, "stage 0 (judged rows)", names, [g[~near] for g in got],
             [r[~near] for r in ref], atol, rtol)
    full = backend.run_full(x.numpy())
    _compare(report, "full.onnx (judged rows)", list(CONTRACT.full_outputs), [full[~near]],
             [ref[0][~near]], atol, rtol)
    # pruned vs masked in torch: identical up to float summation order
    m = masked(x).numpy()
    _compare(report, "pruned vs masked (judged rows)", [CONTRACT.logits, CONTRACT.label],
             [ref[0][~near], ref[1][~near]], [m[~near], m.argmax(1)[~near]], atol, rtol)
    report.max_abs["pruned_vs_masked"] = float(np.abs(ref[0] - m).max()) if len(m) else 0.0
    check_runner(report, bundle, backend, x.numpy(), [], ref[1], np.zeros(len(x), np.int64),
                 near, "chain", "the GaterNet in torch")
    backend.close()
    if report.mismatches:
        raise ExportVerificationError(report.mismatches)
    return report
