"""The bundle commands end to end on an exported bundle: info, predict."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from click.testing import CliRunner

from dgconvert.cli import main


def test_info_describes_every_stage(exported_bundle: Callable[..., Any]) -> None:
    b = exported_bundle("resnet").bundle
    res = CliRunner().invoke(main, ["info", str(b.path)])
    assert res.exit_code == 0, res.output
    assert f"bundle {b.path} (schema 1" in res.output
    for k in range(b.num_stages):
        assert f"stage{k}.onnx" in res.output
    assert "dgate (score max" in res.output and "engines: none" in res.output


def test_predict_prints_accuracy_histogram_and_writes_json(
        exported_bundle: Callable[..., Any], tmp_path: Path) -> None:
    e = exported_bundle("resnet")
    y = np.arange(len(e.pixels)) % 10
    np.savez(tmp_path / "d.npz", x=e.pixels, y=y)
    res = CliRunner().invoke(main, ["predict", str(e.bundle.path), "--data",
                                    str(tmp_path / "d.npz"), "--backend", "onnxruntime",
                                    "-o", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    assert "backend: onnxruntime" in res.output and "accuracy:" in res.output
    assert "exit histogram" in res.output and "warning: fast path off" not in res.output
    assert (tmp_path / "p.json").is_file()
