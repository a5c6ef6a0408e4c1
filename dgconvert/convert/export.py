"""Export a network of any family to a verified staged ONNX bundle."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dgconvert.convert.onnx_export import OPSET, export_onnx
from dgconvert.convert.specs import example_batch, progress_bar, tensor_specs
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
from dgconvert.gating.families import Family, Prune, References, family_of


def _keep_example(n: int) -> torch.Tensor:
    """An unordered example ``keep`` whose size ``M`` is neither 0, 1 nor ``n``."""
    m = n - 1 if n - 1 >= 3 else n + 2
    return torch.arange(m - 1, -1, -1) % n


def export(
    net: Any,
    out: str | Path,
    example_input: torch.Tensor | np.ndarray | None = None,
    *,
    verify_input: torch.Tensor | np.ndarray | None = None,
    verify_labels: np.ndarray | None = None,
    check_accuracy: bool = True,
    data_name: str = "the verification inputs",
    on_accuracy: Callable[[float], None] | None = None,
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

    One path for every network family (:mod:`dgconvert.gating.families`): the family says
    what the stages are, what they are verified against and what the manifest records.
    Every stage and the chain are checked against torch on ``verify_input`` (default:
    ``example_input``, else random inputs); all mismatches are raised at once. With
    ``verify_labels`` (the labels of ``verify_input``) the model's own accuracy on them is
    checked first: near chance (usually a wrong input normalization) raises
    :class:`~dgconvert.gating.fit.NearChanceError` unless ``check_accuracy=False``;
    ``on_accuracy`` receives it, ``data_name`` names the inputs in the message. The bundle
    appears atomically: an interrupted or failed export leaves nothing behind, and an
    existing ``out`` is replaced only with ``force=True``. ``exporter``: ``"auto"`` (the
    torch.export-based exporter, falling back to the TorchScript-based one for a stage it
    fails on or exports wrongly), ``"dynamo"`` or ``"torchscript"``.

    ``prune_images`` (GaterNet only): calibration images whose always-off filters are
    removed; ``prune_source`` names them in the manifest; ``prune_multiple``: pruned layers
    keep a multiple of this many channels.
    """
    fam = family_of(net)
    net.eval()
    shape = net.input_shape
    example = example_batch(example_input, shape)
    vin = example if verify_input is None else torch.as_tensor(verify_input).float()
    if verify_labels is not None:
        acc = near_chance_check(net, vin, verify_labels, data_name, check_accuracy)
        if on_accuracy:
            on_accuracy(acc)
    prune = (None if prune_images is None
             else Prune(prune_images, prune_source, prune_multiple))
    refs = fam.references(net, prune)
    record = fam.manifest_record(net, refs)
    bar = progress_bar(len(refs.stages) + 2 + int(verify), progress)
    with atomic_directory(out, force=force) as tmp, torch.no_grad():
        stages = _export_stages(fam, refs, example, tmp, exporter, atol, rtol, bar)
        export_onnx(refs.full, (example,), tmp / "full.onnx", CONTRACT.full_inputs,
                    CONTRACT.full_outputs, exporter=exporter,
                    what=f"full.onnx (the whole {fam.name} model)")  # fmt: skip
        bar.update(1)
        manifest = Manifest(
            input=InputInfo(CONTRACT.images, [None, *shape], "float32", net.normalization),
            num_classes=net.num_classes,
            stages=stages,
            full=FullInfo("full.onnx", refs.full_flops),
            thresholds=ThresholdInfo(list(refs.thresholds), "export", now_iso()),
            classes=list(net.classes),
            source={**(source or {}), **record.source},
            opset=OPSET,
            gaternet=record.gaternet,
        )
        stamp_digests(manifest, tmp)
        write_manifest(tmp, manifest)
        bar.update(1)
        if verify:
            report = verify_references(refs, Bundle.load(tmp), vin, atol=atol, rtol=rtol)
            if on_report:
                on_report(report)
            bar.update(1)
    bar.close()
    return Bundle.load(out)


def near_chance_check(net: Any, x: torch.Tensor, labels: np.ndarray, data_name: str,
                      check: bool = True) -> float:
    """The model's accuracy on ``x`` (labels ``labels``); near chance raises
    :class:`~dgconvert.gating.fit.NearChanceError` when ``check``."""
    from dgconvert.gating.fit import check_backbone_accuracy

    with torch.no_grad():
        logits = net.eval()(x).numpy()
    y = np.asarray(labels)[: len(logits)]
    if not check:
        return float((logits.argmax(1) == y).mean()) if len(y) else float("nan")
    return check_backbone_accuracy(logits, y, normalization=net.normalization, source=data_name,
                                   flag="`dgconvert gates fit --normalization`")


def _export_stages(fam: Family, refs: References, example: torch.Tensor, tmp: Path,
                   exporter: str, atol: float, rtol: float, bar: Any) -> list[StageInfo]:
    """Export each stage module (checked against torch as it is written)."""
    mods, last = refs.stages, len(refs.stages) - 1
    infos, x = [], example
    for k, mod in enumerate(mods):
        inputs, outputs = CONTRACT.inputs(k), CONTRACT.outputs(k, len(mods))
        args = (x,) if k == 0 else (x, _keep_example(len(x)))
        outs = list(mod(*args))
        spec = refs.gate_specs[k]
        gate = GateInfo.from_spec(spec, refs.gate_flops[k]) if spec is not None else None
        fname = f"stage{k}.onnx"
        empty_ok: dict[str, bool] = {}

        def check(path: Path, mod: Any = mod, x: torch.Tensor = x, k: int = k,
                  seen: dict[str, bool] = empty_ok) -> None:  # fmt: skip
            seen[str(path)] = check_stage_graph(str(path), mod, x, first=k == 0, atol=atol,
                                                rtol=rtol)  # fmt: skip

        used = export_onnx(mod, args, tmp / fname, inputs, outputs, exporter=exporter,
                           check=check, what=fam.describe_stage(refs.net, k))
        infos.append(StageInfo(
            k, fname, tensor_specs(inputs, list(args), "N"),
            tensor_specs(outputs, outs, "M" if k else "N"), refs.stage_flops[k], gate,
            extra={"exporter": used}, empty_batch=empty_ok.get(str(tmp / fname), True),
        ))
        bar.update(1)
        if k < last:
            x = outs[0]
    return infos


def verify_references(refs: References, bundle: Bundle, x: torch.Tensor, *,
                      atol: float = 1e-4, rtol: float = 1e-3) -> VerificationReport:
    """Verify a bundle against what its family said: the early-exit reference
    (``refs.gated``) or, for a one-stage model, the ``masked`` one (default: itself)."""
    if refs.gated is not None:
        return verify_bundle(refs.gated, bundle, x, atol=atol, rtol=rtol)
    from dgconvert.convert.gaternet import verify_one_stage

    return verify_one_stage(refs.net, refs.masked or refs.net, bundle, x, atol=atol, rtol=rtol,
                            near=refs.near, what=f"the {type(refs.net).__name__}")
