"""``export_onnx`` decides "every exporter's graph differs from torch" (a verification
failure) from typed records of each exporter's failure, not from their messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dgconvert.convert.onnx_export import StageExportError, export_onnx
from dgconvert.core.errors import ExportVerificationError


class _Doubles(nn.Module):
    def __init__(self, fail_under_export: bool = False) -> None:
        super().__init__()
        self.fail_under_export = fail_under_export

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_under_export and torch.compiler.is_exporting():  # only torch.export
            raise RuntimeError("the exported graph differs from torch (a raise, not a graph)")
        return x * 2


def _mismatch(path: Path) -> None:
    raise ExportVerificationError([f"{path.name}: y max abs diff 1"])


def test_every_graph_differing_is_a_verification_error(tmp_path: Path) -> None:
    with pytest.raises(ExportVerificationError) as err:
        export_onnx(_Doubles(), (torch.zeros(2, 3),), tmp_path / "m.onnx", ["x"], ["y"],
                    check=_mismatch)
    assert len(err.value.mismatches) == 2  # one per exporter


def test_an_exporter_that_raised_makes_it_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(StageExportError) as err:
        export_onnx(_Doubles(fail_under_export=True), (torch.zeros(2, 3),),
                    tmp_path / "m.onnx", ["x"], ["y"], check=_mismatch)
    assert err.value.reasons["dynamo"].startswith("export raised")
    assert err.value.reasons["torchscript"].startswith("the exported graph differs from torch")
