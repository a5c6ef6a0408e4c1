"""A bundle is what it says: files stay inside it, graphs match their recorded digests,
wrong types are clear errors, and what export writes follows the umask."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import dgconvert as dg
from dgconvert.core.bundle import Bundle
from dgconvert.core.errors import BundleError


@pytest.fixture()
def copy(exported_bundle: Callable[..., Any], tmp_path: Path) -> Bundle:
    return exported_bundle("resnet").copy_to(tmp_path)


def _edit(bundle: Bundle, fn: Callable[[dict[str, Any]], None]) -> None:
    path = bundle.path / "manifest.json"
    raw = json.loads(path.read_text())
    fn(raw)
    path.write_text(json.dumps(raw))


def test_export_records_a_digest_per_graph(copy: Bundle) -> None:
    m = copy.manifest
    assert all(len(s.sha256 or "") == 64 for s in m.stages) and len(m.full.sha256 or "") == 64


def test_a_file_outside_the_bundle_is_refused(copy: Bundle) -> None:
    outside = copy.path.parent / "outside.onnx"
    outside.write_bytes(copy.stage_file(1).read_bytes())  # a valid graph out there
    _edit(copy, lambda m: m["stages"][1].update(file="../outside.onnx"))
    with pytest.raises(BundleError, match=r"stages\[1\].file is '../outside.onnx'.*re-export"):
        Bundle.load(copy.path)


def test_an_absolute_path_is_refused(copy: Bundle) -> None:
    target = str(copy.stage_file(1).resolve())
    _edit(copy, lambda m: m["stages"][1].update(file=target))
    with pytest.raises(BundleError, match=r"stages\[1\].file.*relative to the bundle"):
        Bundle.load(copy.path)


def test_a_symlink_out_of_the_bundle_is_refused(copy: Bundle) -> None:
    outside = copy.path.parent / "elsewhere.onnx"
    outside.write_bytes(copy.stage_file(2).read_bytes())
    copy.stage_file(2).unlink()
    copy.stage_file(2).symlink_to(outside)
    with pytest.raises(BundleError, match="resolves outside the bundle"):
        Bundle.load(copy.path)


def test_tampered_weights_are_caught(copy: Bundle) -> None:
    path = copy.stage_file(1)
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda i: numpy_helper.to_array(i).size)
    w = numpy_helper.to_array(init).copy()
    w.reshape(-1)[:16] = 0  # 64 bytes of float32 weights zeroed: still a valid graph
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    with pytest.raises(BundleError, match=r"stage1.onnx does not match the SHA-256.*re-export"):
        Bundle.load(copy.path)


def test_a_truncated_graph_is_caught(copy: Bundle) -> None:
    data = copy.full_file().read_bytes()
    copy.full_file().write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="full.onnx does not match the SHA-256"):
        Bundle.load(copy.path)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda m: m.update(thresholds="0.5,0.5,0.5"), "thresholds is '0.5,0.5,0.5'"),
    (lambda m: m["thresholds"].update(values={"a": 1}), "thresholds.values"),
    (lambda m: m["input"].update(shape="1x28x28"), r"input.shape is '1x28x28'"),
    (lambda m: m["input"].update(shape=[None, "one", 28, 28]), "input.shape"),
    (lambda m: m["stages"][0].update(flops="many"), r"stages\[0\].flops"),
])
def test_wrong_types_are_bundle_errors(copy: Bundle, edit: Callable[[dict[str, Any]], None],
                                       match: str) -> None:
    _edit(copy, edit)
    with pytest.raises(BundleError, match=match):
        Bundle.load(copy.path)


@pytest.fixture()
def umask() -> Iterator[Callable[[int], None]]:
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755),
                                                              (0o027, 0o640, 0o750)])
def test_export_follows_the_umask(exported_bundle: Callable[..., Any], tmp_path: Path,
                                  umask: Callable[[int], None], mask: int, file_mode: int,
                                  dir_mode: int) -> None:
    umask(mask)
    net = exported_bundle("resnet").net
    # the TorchScript exporter: the modes come from the bundle writer, not the exporter
    b = dg.export(net, tmp_path / "m.dg", verify=False, exporter="torchscript")
    assert stat.S_IMODE(b.path.stat().st_mode) == dir_mode
    for f in b.path.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == file_mode, f
    b.set_thresholds([np.inf] * b.num_gates, "test")  # rewritten atomically: same mode
    assert stat.S_IMODE((b.path / "manifest.json").stat().st_mode) == file_mode


def test_a_bundle_without_digests_still_loads(copy: Bundle) -> None:
    """Bundles exported before digests were recorded (schema 1 without sha256)."""
    def drop(m: dict[str, Any]) -> None:
        for s in [*m["stages"], m["full"]]:
            s.pop("sha256")
    _edit(copy, drop)
    assert Bundle.load(copy.path).manifest.stages[0].sha256 is None


def test_the_manifest_records_no_local_paths(exported_bundle: Callable[..., Any],
                                            tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dgconvert.cli import main

    e = exported_bundle("resnet")
    ckpt = dg.save(e.net, tmp_path / "model.pt")
    np.savez(tmp_path / "verify.npz", x=e.pixels[:16])
    res = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(tmp_path / "m.dg"),
                                    "--data", str(tmp_path / "verify.npz"),
                                    "--exporter", "torchscript"])  # fmt: skip
    assert res.exit_code == 0, res.output
    text = (tmp_path / "m.dg" / "manifest.json").read_text()
    assert str(tmp_path) not in text and "/tmp" not in text
    source = Bundle.load(tmp_path / "m.dg").manifest.source
    assert source["checkpoint"] == "model.pt" and source["verified_on"] == "verify.npz"
    assert len(source["checkpoint_sha256"]) == 64
