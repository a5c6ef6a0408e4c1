"""The typed manifest: version-1 files load unchanged, wrong types are BundleErrors, one
threshold encoding."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

from dgconvert.core.bundle import Bundle, read_manifest, write_manifest
from dgconvert.core.errors import BundleError
from dgconvert.core.manifest import (
    Manifest,
    ThresholdInfo,
    decode_threshold,
    decode_thresholds,
    encode_threshold,
    encode_thresholds,
)

V1 = json.loads((Path(__file__).parent / "data" / "manifest_v1.json").read_text())


def test_a_version_1_manifest_round_trips_unchanged() -> None:
    """Written by dgconvert 0.1.0 before the typed manifest: every key survives."""
    m = Manifest.parse(copy.deepcopy(V1))
    assert m.to_dict() == V1
    assert m.num_stages == 4 and m.num_gates == 3
    assert m.stages[1].inputs[1].name == "keep" and m.stages[0].gate is not None
    assert m.stages[0].gate.type == "dgate" and m.stages[-1].gate is None
    assert m.input.sample_shape == [1, 28, 28]


def test_unknown_keys_are_kept() -> None:
    raw = copy.deepcopy(V1)
    raw["future_key"] = {"a": 1}
    raw["stages"][0]["note"] = "x"
    raw["stages"][0]["gate"]["layout"] = "nchw"
    assert Manifest.parse(raw).to_dict() == raw


def _set(raw: dict[str, Any], path: str, value: Any) -> None:
    *head, last = path.split(".")
    node: Any = raw
    for p in head:
        node = node[int(p)] if p.isdigit() else node[p]
    node[int(last) if last.isdigit() else last] = value


@pytest.mark.parametrize(("path", "value", "expected"), [
    ("thresholds", "high", "thresholds is 'high'"),
    ("thresholds.values", "1,2,3", "thresholds.values"),
    ("thresholds.values.0", "1.5", r"thresholds.values\[0\]"),
    ("thresholds.values.1", True, r"thresholds.values\[1\]"),
    ("input.shape", "1x28x28", "input.shape"),
    ("input.shape", [None, "1", 28, 28], "input.shape"),
    ("input.normalization", "255", "input.normalization"),
    ("input.normalization.mean", "0.2", "normalization.mean"),
    ("num_classes", "10", "num_classes"),
    ("stages", {"0": {}}, "stages"),
    ("stages.1", [], r"stages\[1\]"),
    ("stages.1.file", 7, r"stages\[1\].file"),
    ("stages.1.flops", 1.5, r"stages\[1\].flops"),
    ("stages.1.inputs.0.shape", "N", r"stages\[1\].inputs\[0\]"),
    ("stages.0.gate", "dgate", r"stages\[0\].gate"),
    ("stages.3.gate", {"type": "dgate", "score": "max"}, "every stage but the last"),
    ("stages.2.index", 5, "expected 2"),
    ("full", None, "full is None"),
    ("engines", [], "engines"),
    ("classes", [1, 2], "classes must be strings"),
])
def test_wrong_types_raise_bundle_errors(path: str, value: Any, expected: str) -> None:
    raw = copy.deepcopy(V1)
    _set(raw, path, value)
    with pytest.raises(BundleError, match=expected) as err:
        Manifest.parse(raw)
    assert "re-export" in str(err.value)


def test_missing_keys_and_counts() -> None:
    raw = copy.deepcopy(V1)
    del raw["stages"][1]["file"]
    with pytest.raises(BundleError, match=r"stages\[1\] lacks 'file'"):
        Manifest.parse(raw)
    raw = copy.deepcopy(V1)
    raw["thresholds"]["values"] = [1.0]
    with pytest.raises(BundleError, match="1 thresholds for 3 gates"):
        Manifest.parse(raw)


def test_threshold_encoding_is_one_mapping() -> None:
    values = [1.5, math.inf, -2.0]
    assert encode_thresholds(values) == [1.5, None, -2.0]
    assert decode_thresholds(encode_thresholds(values)) == values
    assert decode_threshold(None) == math.inf and encode_threshold(math.inf) is None
    for bad in (math.nan, -math.inf):
        with pytest.raises(BundleError, match="finite number or \\+inf"):
            encode_threshold(bad)


def test_thresholds_written_are_standard_json(tmp_path: Path) -> None:
    m = Manifest.parse(copy.deepcopy(V1))
    m.thresholds = ThresholdInfo([0.5, math.inf, 2.0], "test")
    (tmp_path / "stage0.onnx").touch()
    write_manifest(tmp_path, m)
    text = (tmp_path / "manifest.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text)["thresholds"]["values"] == [0.5, None, 2.0]
    assert read_manifest(tmp_path).thresholds.values == [0.5, math.inf, 2.0]


def test_set_thresholds_refuses_nan(tmp_path: Path) -> None:
    b = Bundle(tmp_path, Manifest.parse(copy.deepcopy(V1)))
    with pytest.raises(BundleError, match="finite number"):
        b.set_thresholds([0.5, math.nan, 1.0], "test")
    assert not (tmp_path / "manifest.json").exists()  # nothing written
