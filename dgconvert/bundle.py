"""The bundle: a directory with ``manifest.json``, one ONNX graph per stage, ``full.onnx``
and optionally TensorRT engines. Versioned, checked on read, written atomically.
Torch-free: the runtime reads bundles with numpy + onnxruntime only.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dgconvert._io import atomic_write_json
from dgconvert.errors import BundleError

FORMAT = "dgconvert-bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def _version() -> str:
    from dgconvert import __version__

    return __version__


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Bundle:
    """A loaded, validated bundle directory (see ``docs/internals.md`` for the schema)."""

    def __init__(self, path: str | Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest

    @classmethod
    def load(cls, path: str | Path) -> Bundle:
        """Read and validate ``path/manifest.json`` and every file it references."""
        path = Path(path)
        mpath = path / MANIFEST
        if not path.is_dir() or not mpath.is_file():
            raise BundleError(
                f"{path} is not a dgconvert bundle (no {MANIFEST}); expected a directory "
                "written by `dgconvert export MODEL.pt -o MODEL.dg`."
            )
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(
                f"{mpath} is not valid JSON ({exc}); the bundle is corrupt. Fix: re-export it."
            ) from exc
        bundle = cls(path, manifest)
        bundle.validate()
        return bundle

    def validate(self) -> None:
        """Check format, schema version, required keys and referenced files."""
        m = self.manifest
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            got = m.get("format") if isinstance(m, dict) else type(m).__name__
            raise BundleError(f"{self.path}: manifest format is {got!r}, expected {FORMAT!r}")
        version = m.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{self.path} has manifest schema_version {version!r} (written by dgconvert "
                f"{m.get('dgconvert_version', '?')}); this dgconvert {_version()} reads version "
                f"{SCHEMA_VERSION}. Fix: re-export the model with this version "
                "(`dgconvert export MODEL.pt -o MODEL.dg --force`)."
            )
        missing_keys = [
            k for k in ("input", "num_classes", "stages", "thresholds", "full") if k not in m
        ]
        if missing_keys:
            raise BundleError(f"{self.path}: manifest lacks keys {missing_keys}; re-export it")
        stages = m["stages"]
        if not isinstance(stages, list) or len(stages) < 2:
            raise BundleError(f"{self.path}: expected at least 2 stages, got {stages!r:.80}")
        k = len(stages) - 1
        if len(m["thresholds"].get("values", [])) != k:
            raise BundleError(
                f"{self.path}: {len(m['thresholds'].get('values', []))} thresholds for {k} gates"
            )
        files = [s["file"] for s in stages] + [m["full"]["file"]]
        missing = [f for f in files if not (self.path / f).is_file()]
        if missing:
            raise BundleError(
                f"{self.path} is incomplete: missing {missing}. Expected every stage graph "
                "listed in the manifest. Fix: re-export the bundle."
            )

    # -- accessors ---------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.manifest["stages"])

    @property
    def num_gates(self) -> int:
        return self.num_stages - 1

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.get("classes") or [str(i) for i in range(self.num_classes)])

    @property
    def input_shape(self) -> list[int]:
        """Sample shape without the batch dimension."""
        return [int(s) for s in self.manifest["input"]["shape"][1:]]

    @property
    def normalization(self) -> dict[str, Any] | None:
        return self.manifest["input"].get("normalization")

    @property
    def thresholds(self) -> list[float]:
        """Per-gate thresholds; ``null`` in the manifest means +inf (gate disabled)."""
        return [math.inf if t is None else float(t) for t in self.manifest["thresholds"]["values"]]

    @property
    def stage_flops(self) -> list[int]:
        return [int(s.get("flops", 0)) for s in self.manifest["stages"]]

    @property
    def gate_flops(self) -> list[int]:
        return [int((s.get("gate") or {}).get("flops", 0)) for s in self.manifest["stages"][:-1]]

    @property
    def full_flops(self) -> int:
        return int(self.manifest["full"].get("flops", 0))

    def stage_file(self, k: int) -> Path:
        return self.path / self.manifest["stages"][k]["file"]

    def full_file(self) -> Path:
        return self.path / self.manifest["full"]["file"]

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

    def update_manifest(self, fn: Callable[[dict[str, Any]], None]) -> None:
        """Apply ``fn`` to a copy of the manifest, validate, and write it atomically."""
        new = json.loads(json.dumps(self.manifest))
        fn(new)
        Bundle(self.path, new).validate()
        write_manifest(self.path, new)
        self.manifest = new

    def set_thresholds(self, values: list[float], source: str) -> None:
        if len(values) != self.num_gates:
            raise BundleError(f"got {len(values)} thresholds for {self.num_gates} gates")

        def fn(m: dict[str, Any]) -> None:
            m["thresholds"] = {
                "values": [None if math.isinf(v) and v > 0 else float(v) for v in values],
                "source": source,
                "updated": now_iso(),
            }

        self.update_manifest(fn)


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically into the bundle directory ``path``."""
    return atomic_write_json(Path(path) / MANIFEST, manifest)


def new_manifest(**fields: Any) -> dict[str, Any]:
    """A manifest skeleton with format, version and creation fields filled in."""
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "dgconvert_version": _version(),
        "created": now_iso(),
        **fields,
        "calibration": fields.get("calibration"),
        "engines": fields.get("engines", {}),
    }
