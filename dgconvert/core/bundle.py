"""The bundle: a directory with ``manifest.json``, one ONNX graph per stage, ``full.onnx``
and optionally TensorRT engines. Checked on read, written atomically. Torch-free."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
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


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stamp_digests(manifest: Manifest, folder: Path) -> None:
    """Set the SHA-256 of every stage graph and ``full.onnx`` in ``manifest`` from the files
    in ``folder`` (at export, and when a graph is rewritten on purpose)."""
    for info in [*manifest.stages, manifest.full]:
        info.sha256 = file_sha256(folder / info.file)


def write_manifest(path: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically into the bundle directory ``path``."""
    return atomic_write_text(Path(path) / MANIFEST, manifest.dumps())


class Bundle:
    """A loaded, validated bundle directory (see ``docs/internals.md`` for the schema)."""

    def __init__(self, path: str | Path, manifest: Manifest) -> None:
        self.path = Path(path)
        self.manifest = manifest

    @classmethod
    def load(cls, path: str | Path, *, check_digests: bool = True) -> Bundle:
        """Read ``path/manifest.json``, validate it and check every file it names: inside the
        bundle, present, and (``check_digests``) equal to the SHA-256 recorded at export."""
        bundle = cls(Path(path), read_manifest(Path(path)))
        bundle.check_files(check_digests)
        return bundle

    def graph_files(self) -> Iterator[tuple[str, str, str | None]]:
        """``(manifest entry, file, sha256 or None)`` of every graph and engine file."""
        m = self.manifest
        for k, s in enumerate(m.stages):
            yield f"stages[{k}].file", s.file, s.sha256
        yield "full.file", m.full.file, m.full.sha256
        for key, rec in m.engines.items():
            for i, s in enumerate(rec.get("stages") or []):
                yield f"engines[{key!r}].stages[{i}].file", s.get("file"), s.get("sha256")
            full = rec.get("full")
            if isinstance(full, dict):
                yield f"engines[{key!r}].full.file", full.get("file"), full.get("sha256")

    def check_files(self, check_digests: bool = True) -> None:
        """Every file the manifest names lies inside the bundle; every stage graph and
        ``full.onnx`` exists and (``check_digests``) has its recorded SHA-256."""
        paths = {entry: self.resolve(name, entry) for entry, name, _ in self.graph_files()}
        graphs = [(e, f, h) for e, f, h in self.graph_files() if not e.startswith("engines")]
        missing = [f for e, f, _ in graphs if not paths[e].is_file()]
        if missing:
            raise BundleError(
                f"{self.path} is incomplete: missing {missing}. Expected every stage graph "
                f"listed in the manifest. {FIX}"
            )
        if check_digests:
            for entry, _name, digest in graphs:
                if digest is not None and file_sha256(paths[entry]) != digest:
                    raise BundleError(
                        f"{paths[entry]} does not match the SHA-256 the manifest records for "
                        f"{entry} (the file was modified or truncated after export). {FIX}"
                    )

    def resolve(self, name: Any, entry: str = "file") -> Path:
        """The path of a file the manifest names; it must lie inside the bundle."""
        where = f"{self.path}: manifest {entry} is {name!r}"
        if not isinstance(name, str) or not name:
            raise BundleError(f"{where}; expected a file name inside the bundle. {FIX}")
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if Path(name).is_absolute() or name.startswith(("/", "\\")) or ".." in parts:
            raise BundleError(
                f"{where}; expected a path relative to the bundle, without '..' (a manifest "
                f"naming files outside its bundle was edited or is not trustworthy). {FIX}"
            )
        path = self.path / name
        root = self.path.resolve()
        if not path.resolve().is_relative_to(root):
            raise BundleError(f"{where}, which resolves outside the bundle ({path.resolve()}: "
                              f"a symbolic link?). {FIX}")
        return path

    def record_digests(self) -> None:
        """Record the SHA-256 of every stage graph and ``full.onnx`` as they are now (after
        rewriting a graph on purpose)."""
        self.update_manifest(lambda m: stamp_digests(m, self.path))

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
        return self.resolve(self.manifest.stages[k].file, f"stages[{k}].file")

    def full_file(self) -> Path:
        return self.resolve(self.manifest.full.file, "full.file")

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
