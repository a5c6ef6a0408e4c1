"""Property-based checks of the readers of untrusted input: random or truncated data files
raise DataError and nothing else; manifests with random wrong types raise BundleError and
nothing else."""

from __future__ import annotations

import copy
import gzip
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dgconvert.core.errors import BundleError, DataError
from dgconvert.core.manifest import Manifest
from dgconvert.data import load_dataset

V1 = json.loads((Path(__file__).parent / "core" / "data" / "manifest_v1.json").read_text())


def _idx_bytes(images: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, images.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in images.shape)
    return head + images.tobytes()


def _npz_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=x, y=np.arange(len(x)) % 3)
    return buf.getvalue()


def _png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(buf, format="PNG")
    return buf.getvalue()


def _load(name: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if name.endswith(".png"):  # a folder of classes
            (Path(d) / "folder" / "b").mkdir()
            (Path(d) / "folder" / "b" / "ok.png").write_bytes(VALID[name])
            path = Path(d) / "folder"
        try:
            load_dataset(str(path))
        except DataError:
            pass  # the only error a reader may raise on bad bytes


VALID = {
    "images-idx3-ubyte": _idx_bytes(np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)),
    "images-idx3-ubyte.gz": gzip.compress(_idx_bytes(np.zeros((2, 3, 3), np.uint8))),
    "data.npz": _npz_bytes(np.zeros((3, 4, 4), np.uint8)),
    "folder/a/img.png": _png_bytes(),
}


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(sorted(VALID)), data=st.data())
def test_truncated_or_corrupted_files_raise_data_error_only(name: str, data: st.DataObject) -> None:
    raw = bytearray(VALID[name])
    how = data.draw(st.sampled_from(["truncate", "flip", "garbage"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
    else:
        raw = bytearray(data.draw(st.binary(min_size=0, max_size=300)))
    _load(name, bytes(raw))


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


PATHS = _paths(V1)
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**12), st.floats(allow_nan=True),
                 st.text(max_size=8), st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(edits=st.lists(st.tuples(st.sampled_from(PATHS), JUNK, st.booleans()), min_size=1,
                      max_size=4))
def test_manifests_with_wrong_types_raise_bundle_error_only(
        edits: list[tuple[tuple[Any, ...], Any, bool]]) -> None:
    raw = copy.deepcopy(V1)
    for path, value, delete in edits:
        node: Any = raw
        try:
            for p in path[:-1]:
                node = node[p]
            if delete and isinstance(node, dict):
                node.pop(path[-1], None)
            else:
                node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed or replaced the parent
    try:
        m = Manifest.parse(raw)
    except BundleError:
        return
    json.loads(m.dumps())  # what parses writes back as standard JSON
