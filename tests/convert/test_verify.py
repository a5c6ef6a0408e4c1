"""Verification's float-noise allowance and stages ONNX Runtime cannot run on empty batches."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dgconvert.convert.verify import Float64Noise, VerificationReport, compare_outputs
from dgconvert.core.bundle import Bundle
from dgconvert.runtime import GatedRunner
from dgconvert.runtime.onnxruntime_backend import OnnxRuntimeBackend


def _deep_mlp() -> tuple[torch.nn.Module, torch.Tensor]:
    """Forty wide layers with growing activations: float32 drifts visibly from float64."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(40):
        lin = torch.nn.Linear(256, 256)
        torch.nn.init.normal_(lin.weight, std=1.2 / 16)
        layers += [lin, torch.nn.Tanh()]
    layers.append(torch.nn.Linear(256, 10))
    return torch.nn.Sequential(*layers).eval(), torch.randn(32, 256) * 30


def test_float64_noise_is_torchs_own_float32_deviation() -> None:
    model, x = _deep_mlp()
    (noise,) = Float64Noise(model, [x])()
    with torch.no_grad():
        expected = (model(x).double() - model.double()(x.double())).abs().max().item()
    assert noise == pytest.approx(expected, rel=1e-9)
    assert noise > 0  # a float32 computation this deep is not exact


def test_a_difference_within_twice_the_float_noise_passes_and_a_larger_one_fails() -> None:
    ref = np.linspace(-10, 10, 40, dtype=np.float32).reshape(4, 10)
    noise = 2e-3  # torch's own deviation from float64, as Float64Noise would measure it
    close = ref.copy()
    close[1, 9] += 3e-3  # beyond atol + rtol|ref| = 1e-4 + 1e-3 * 0.26, within + 2 * noise
    far = ref.copy()
    far[1, 9] += 2e-2

    def mismatches(got: np.ndarray, with_noise: bool) -> list[str]:
        report = VerificationReport()
        compare_outputs(report, "full.onnx", ["logits"], [got], [ref], 1e-4, 1e-3,
                 (lambda: [noise]) if with_noise else None)  # fmt: skip
        return report.mismatches

    assert mismatches(close, with_noise=False)  # the fixed tolerance alone rejects it
    assert mismatches(close, with_noise=True) == []
    (msg,) = mismatches(far, with_noise=True)
    assert "float32 noise vs float64: 0.002" in msg and "max abs diff 0.02" in msg


def test_labels_get_no_noise_allowance() -> None:
    logits = np.array([[0.0, 5.0], [5.0, 0.0]], np.float32)
    report = VerificationReport()
    compare_outputs(report, "stage 0", ["logits", "label"], [logits, np.array([1, 1])],
             [logits, np.array([1, 0])], 1e-4, 1e-3, lambda: [1.0, 0.0])  # fmt: skip
    assert len(report.mismatches) == 1 and "label: 1/2 rows differ" in report.mismatches[0]


def test_a_stage_marked_empty_unsafe_is_never_run_empty(
        exported_bundle: Callable[..., Any], tmp_path: Path) -> None:  # fmt: skip
    e = exported_bundle("resnet")
    bundle = e.copy_to(tmp_path)
    bundle.update_manifest(lambda m: setattr(m.stages[2], "empty_batch", False))
    bundle = Bundle.load(bundle.path)
    assert [s.empty_batch for s in bundle.manifest.stages] == [True, True, False, True]
    assert '"empty_batch": false' in (bundle.path / "manifest.json").read_text()

    backend = OnnxRuntimeBackend(bundle)
    assert backend.chain() is None and "empty batch" in backend.composition
    assert any(p.startswith("chain off:") for p in backend.fast_paths_off())
    # everybody exits at gate 0: stages 1.. get no row and are not run at all
    runner = GatedRunner(bundle, backend=backend, thresholds=[-np.inf, 0.0, 0.0])
    res = runner.predict(e.pixels)
    assert (res.exit_stage == 0).all() and runner.stats[1:] == [0, 0, 0]
    # and at spread thresholds the results equal the untouched bundle's (composed chain)
    t = GatedRunner(e.bundle).collect(e.pixels).scores.mean(axis=0).tolist()
    a = GatedRunner(bundle, backend=backend, thresholds=t).predict(e.pixels)
    b = GatedRunner(e.bundle, thresholds=t).predict(e.pixels)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.exit_stage, b.exit_stage)


class _EinsumAttention(torch.nn.Module):
    """Attention within 2x2 windows written as MaxViT writes it: a 5-D ``einsum``, which
    ONNX Runtime 1.32's Einsum kernel dies on (SIGFPE) when the batch is empty."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = torch.nn.Conv2d(dim, 3 * dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = (t.reshape(n, 1, c, h * w // 4, 4).transpose(2, 4)
                   for t in self.qkv(x).chunk(3, dim=1))  # [N, 1, 4, windows, C]
        att = torch.einsum("bghid,bghjd->bghij", q, k).softmax(-1)
        out = torch.einsum("bghij,bghjd->bghid", att, v)
        return x + out.transpose(2, 4).reshape(n, c, h, w)


class _EinsumNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.block = _EinsumAttention(8)
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                        torch.nn.Linear(8, 10))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))


def test_export_records_a_stage_that_crashes_on_an_empty_batch(tmp_path: Path) -> None:
    import dgconvert as dg
    from dgconvert.gating import GatedNetwork

    torch.manual_seed(0)
    x = torch.randn(24, 1, 16, 16)
    net = GatedNetwork.from_backbone(_EinsumNet().eval(), ["stem", "block"], gate="dgate",
                                     example_input=x[:2]).eval()  # fmt: skip
    bundle = dg.export(net, tmp_path / "einsum.dg", verify_input=x)  # verified, M = 0 left out
    assert [s.empty_batch for s in bundle.manifest.stages] == [True, False, True]
    backend = OnnxRuntimeBackend(bundle)
    assert "stage(s) [1] on an empty batch" in backend.composition
    with torch.no_grad():
        t = [float(np.median(s)) for s in net.all_exits(x).scores.numpy().T]
        ref = net.gated_forward(x, t, return_scores=True)
    res = GatedRunner(bundle, backend=backend, thresholds=t).predict(x.numpy())
    np.testing.assert_array_equal(res.labels, np.asarray(ref.labels))
    np.testing.assert_array_equal(res.exit_stage, np.asarray(ref.exit_stage))


def test_info_names_the_stages_that_must_not_run_empty(
        exported_bundle: Callable[..., Any], tmp_path: Path) -> None:  # fmt: skip
    from dgconvert.cli.info import describe_bundle

    bundle = exported_bundle("resnet").copy_to(tmp_path)
    assert "empty batches" not in describe_bundle(bundle.path)
    bundle.update_manifest(lambda m: setattr(m.stages[1], "empty_batch", False))
    assert "dies on empty batches of stage(s) [1]" in describe_bundle(bundle.path)
