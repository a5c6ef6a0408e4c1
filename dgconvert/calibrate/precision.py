"""Calibrating a quantized bundle: ``--max-drop`` against the fp32 source's full model (what
the user compares with; the default) or against the int8 full model (``--drop-vs``).

The fp32 source is found through the digest the int8 bundle's manifest records
(:func:`dgconvert.convert.quantize.find_source`). A drop against it becomes an absolute
target: the fp32 full model's accuracy on the calibration split less the drop. Both drops
are reported on the held-out split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dgconvert.calibrate.bounds import split_indices
from dgconvert.calibrate.errors import CalibrationError
from dgconvert.calibrate.pipeline import CONFIDENCE_HOLDOUT, DEFAULT_HOLDOUT
from dgconvert.calibrate.report import CalibrationResult
from dgconvert.convert.quantize import QuantizeError, find_source
from dgconvert.core.bundle import Bundle

DROP_VS = ("fp32", "int8")


@dataclass(frozen=True)
class Fp32Reference:
    """The fp32 source's full model on the calibration data, for an int8 bundle."""

    drop_vs: str
    correct: np.ndarray | None  # per sample: the fp32 full model is right (None: no source)
    source: str = ""


def fp32_reference(bundle: Bundle, images: np.ndarray, y: np.ndarray, drop_vs: str = "fp32",
                   source: str | Path | None = None) -> Fp32Reference | None:
    """None for an fp32 bundle; for an int8 one, its source's full model on ``images``
    (raises when ``drop_vs="fp32"`` and the source cannot be found)."""
    if drop_vs not in DROP_VS:
        raise CalibrationError(f"drop_vs is {drop_vs!r}; expected one of {DROP_VS}")
    if bundle.manifest.quantization is None:
        if drop_vs != "fp32" or source is not None:
            raise CalibrationError(
                f"{bundle.path} is an fp32 bundle; --drop-vs int8 and --source are for int8 "
                "bundles (dgconvert quantize). Fix: drop them.")
        return None
    try:
        src = find_source(bundle, source)
    except QuantizeError:
        if drop_vs == "fp32":
            raise
        return Fp32Reference(drop_vs, None)
    from dgconvert.runtime import GatedRunner

    with GatedRunner(src, backend="onnxruntime") as runner:
        labels = runner.full_logits(images).argmax(axis=1)
    return Fp32Reference(drop_vs, labels == y, src.path.name)


def _split(ref: Fp32Reference, holdout: float | None, confidence: float | None,
           seed: int) -> tuple[np.ndarray, np.ndarray]:
    assert ref.correct is not None
    h = holdout if holdout is not None else (
        DEFAULT_HOLDOUT if confidence is None else CONFIDENCE_HOLDOUT)
    return split_indices(len(ref.correct), h, seed)


def fp32_target(ref: Fp32Reference, max_drop: float, holdout: float | None,
                confidence: float | None, seed: int) -> float:
    """The target accuracy (a fraction): the fp32 full model's on the calibration split (the
    one :func:`~dgconvert.calibrate.calibrate` measures the full model on) less ``max_drop``
    (a fraction: 0.003 = 0.3 points)."""
    cal, _ = _split(ref, holdout, confidence, seed)
    return max(float(np.mean(ref.correct[cal])) - max_drop, 0.0)  # type: ignore[index]


def drops(ref: Fp32Reference, result: CalibrationResult) -> dict[str, Any]:
    """The chosen thresholds' drop against both full models, on the held-out split (the
    calibration split when nothing is held out), in points."""
    ours, full = result.ours, result.full
    held = ours.heldout is not None and full.heldout is not None
    acc = (ours.heldout if held else ours.calibration).accuracy  # type: ignore[union-attr]
    full8 = (full.heldout if held else full.calibration).accuracy  # type: ignore[union-attr]
    out: dict[str, Any] = {"drop_vs": ref.drop_vs, "split": "held-out" if held else "calibration",
                           "accuracy": acc, "int8_full_accuracy": full8,
                           "drop_vs_int8_pt": 100 * (full8 - acc)}
    if ref.correct is not None:
        cal, heldout = _split(ref, result.holdout, result.confidence, result.seed)
        fp32 = float(np.mean(ref.correct[heldout if held else cal]))
        out.update(source=ref.source, fp32_full_accuracy=fp32, drop_vs_fp32_pt=100 * (fp32 - acc))
    return out


def describe_drops(d: dict[str, Any]) -> str:
    """One sentence for the terminal."""
    text = f"int8 bundle ({d['split']} split): drop {d['drop_vs_int8_pt']:.2f} pt vs the int8 " \
           f"full model ({100 * d['int8_full_accuracy']:.2f} %)"
    if "drop_vs_fp32_pt" in d:
        text += f", {d['drop_vs_fp32_pt']:.2f} pt vs the fp32 source's full model " \
                f"({d['source']}, {100 * d['fp32_full_accuracy']:.2f} %)"
    return text + f"; --max-drop meant the drop vs {d['drop_vs']}"
