"""The bundle: a directory with ``manifest.json``, one ONNX graph per stage, ``full.onnx``
and optionally TensorRT engines. Checked on read, written atomically. Torch-free."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dgconvert.core.errors import BundleError
from dgconvert.core.io import atomic_write_text
from dgconvert.core.manifest import FIX, Manifest, ThresholdInfo, now_iso

MANIFEST = "manifest.json"


def read_manifest(path: Path) -> Manifest:
    """Parse and validate ``path/manifest.json``."""
    mpath = path / MANIFEST
    if not path.is_dir() or not mpath.is_file():
        raise BundleError(
            f"{path} is not a dgconvert bundle (no {MANIFEST}); expected a directory "
            "written by `dgconvert export MODEL.pt -o MODEL.dg`."
        )
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{mpath} is not valid JSON ({exc}); the bundle is corrupt. {FIX}") from exc
    return Manifest.parse(raw, str(mpath))


def write_manifest(path: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically into the bundle directory ``path``."""
    return atomic_write_text(Path(path) / MANIFEST, manifest.dumps())


class Bundle:
    """A loaded, validated bundle directory (see ``docs/internals.md`` for the schema)."""

    def __init__(self, path: str | Path, manifest: Manifest) -> None:
        self.path = Path(path)
        self.manifest = manifest

    @classmethod
    def load(cls, path: str | Path) -> Bundle:
        """Read ``path/manifest.json``, validate it and check every file it names."""
        bundle = cls(Path(path), read_manifest(Path(path)))
        bundle.check_files()
        return bundle

    def check_files(self) -> None:
        """Every stage graph and ``full.onnx`` exists."""
        files = [s.file for s in self.manifest.stages] + [self.manifest.full.file]
        missing = [f for f in files if not self.resolve(f).is_file()]
        if missing:
            raise BundleError(
                f"{self.path} is incomplete: missing {missing}. Expected every stage graph "
                f"listed in the manifest. {FIX}"
            )

    def resolve(self, name: str) -> Path:
        """The absolute path of a file the manifest names (relative to the bundle)."""
        return self.path / name

    # -- accessors ---------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return self.manifest.num_stages

    @property
    def num_gates(self) -> int:
        return self.manifest.num_gates

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes or [str(i) for i in range(self.num_classes)])

    @property
    def input_shape(self) -> list[int]:
        """Sample shape without the batch dimension."""
        return self.manifest.input.sample_shape

    @property
    def normalization(self) -> dict[str, Any] | None:
        return self.manifest.input.normalization

    @property
    def thresholds(self) -> list[float]:
        """Per-gate thresholds; +inf means the gate is off."""
        return list(self.manifest.thresholds.values)

    @property
    def stage_flops(self) -> list[int]:
        return [s.flops for s in self.manifest.stages]

    @property
    def gate_flops(self) -> list[int]:
        return [s.gate.flops if s.gate else 0 for s in self.manifest.stages[:-1]]

    @property
    def full_flops(self) -> int:
        return self.manifest.full.flops

    def stage_file(self, k: int) -> Path:
        return self.resolve(self.manifest.stages[k].file)

    def full_file(self) -> Path:
        return self.resolve(self.manifest.full.file)

    def exit_costs(self) -> list[float]:
        """Cumulative per-sample FLOPs of a sample exiting at exit point k (0..K).

        A sample exiting at gate k paid stages 0..k and gates 0..k; one reaching the end
        paid every stage and every gate.
        """
        costs, acc = [], 0.0
        for k in range(self.num_stages):
            acc += self.stage_flops[k]
            if k < self.num_gates:
                acc += self.gate_flops[k]
            costs.append(acc)
        return costs

    def update_manifest(self, fn: Callable[[Manifest], None]) -> None:
        """Apply ``fn`` to a copy of the manifest, validate, and write it atomically."""
        new = self.manifest.updated(fn)
        write_manifest(self.path, new)
        self.manifest = new

    def set_thresholds(self, values: Sequence[float], source: str) -> None:
        """Store new thresholds (+inf = gate off) in the manifest."""
        if len(values) != self.num_gates:
            raise BundleError(f"got {len(values)} thresholds for {self.num_gates} gates")

        def fn(m: Manifest) -> None:
            m.thresholds = ThresholdInfo([float(v) for v in values], source, now_iso())

        self.update_manifest(fn)
