"""Collect the reference model's gate records once, for the calibration simulation.

    .venv/bin/python benchmarks/collect_records.py [out/reference.dg]

Runs the collection pass of :mod:`dgconvert.calibrate` (every gate's score and label and
the final label per image, no exits) on 20,000 labelled images that neither the backbone
nor the gates were trained on (``fashion-mnist:train[50000:]`` and ``fashion-mnist:test``)
and writes ``benchmarks/data/reference_records.npz`` (scores, labels, final_labels, y,
exit_costs in FLOPs), so that ``calibration_sim.py`` reruns without the model.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np

from dgconvert.calibrate.collect import collect_records
from dgconvert.core.bundle import Bundle
from dgconvert.core.io import atomic_write
from dgconvert.data import load_dataset

ROOT = Path(__file__).resolve().parent
DATA = ("fashion-mnist:train[50000:]", "fashion-mnist:test")
OUT = ROOT / "data" / "reference_records.npz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("bundle", nargs="?", type=Path, default=Path("out/reference.dg"))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--backend", default="onnxruntime")
    args = ap.parse_args()
    b = Bundle.load(args.bundle)
    parts = []
    for spec in DATA:
        ds = load_dataset(spec, num_classes=b.num_classes)
        rec, _ = collect_records(b, ds.images, backend=args.backend, progress=True)
        parts.append((rec, ds.require_labels("calibration")))
    arrays = {
        "scores": np.concatenate([r.scores for r, _ in parts]).astype(np.float32),
        "labels": np.concatenate([r.labels for r, _ in parts]).astype(np.int8),
        "final_labels": np.concatenate([r.final_labels for r, _ in parts]).astype(np.int8),
        "y": np.concatenate([y for _, y in parts]).astype(np.int8),
        "exit_costs": np.asarray(b.exit_costs(), np.float64),
        "sources": np.array(DATA),
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write(args.out, lambda p: p.write_bytes(buf.getvalue()))
    full = float(np.mean(arrays["final_labels"] == arrays["y"]))
    print(f"wrote {args.out}: {len(arrays['y'])} samples, {b.num_gates} gates, "
          f"full-model accuracy {full:.4f}")


if __name__ == "__main__":
    main()
