"""Export to a staged bundle and run it: parity with gated_forward, compaction, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import dgconvert as dg
from dgconvert.convert.verify import spread_thresholds, verify_bundle
from dgconvert.core.bundle import Bundle
from dgconvert.core.errors import BundleError, ExportVerificationError, InputError
from dgconvert.core.preprocess import normalize
from dgconvert.runtime import GatedRunner
from tests.models import ARCHS, NORMALIZATION, build


def _images(n: int, fashion: bool) -> np.ndarray:
    """Real Fashion-MNIST pixels when installed, else random pixels (uint8 [n,1,28,28])."""
    if fashion:
        return dg.load_dataset(f"fashion-mnist:test[:{n}]").images
    return np.random.default_rng(0).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


@pytest.fixture(scope="module")
def exported(exported_bundle: Callable[..., Any], fashion_available: bool) -> dict:
    out: dict[str, Any] = {}
    for name in ARCHS:
        e = exported_bundle(name)
        out[name] = (e.net, e.bundle)
    pixels = _images(200, fashion_available)
    out["pixels"] = pixels
    out["x"] = torch.from_numpy(normalize(pixels, NORMALIZATION))
    return out


# how the ONNX Runtime backend runs the stages: one composed session over the fused graphs
# (default), one over the contract graphs, or one session per stage
MODES = {
    "chain": {},
    "chain-contract-graphs": {"fuse_boundaries": False, "compose": True},
    "stage-sessions": {"compose": False},
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("batch", [1, 7, 64, 200])
def test_runtime_matches_gated_forward(exported: dict, name: str, batch: int, mode: str) -> None:
    net, bundle = exported[name]
    x = exported["x"][:batch]
    t = spread_thresholds(net, exported["x"])
    ref = net.gated_forward(x, t, return_scores=True)
    with torch.no_grad():
        scores = net.all_exits(x).scores.numpy()
    ties = (np.abs(scores - np.asarray(t, np.float32)) < 1e-4).any(axis=1)
    runner = GatedRunner(bundle.path, backend="onnxruntime", thresholds=t, max_batch=64,
                         **MODES[mode])
    assert (runner.backend.chain() is not None) == (mode != "stage-sessions")
    res = runner.predict(x.numpy())
    ok = ~ties
    np.testing.assert_array_equal(res.labels[ok], ref.labels[ok])
    np.testing.assert_array_equal(res.exit_stage[ok], ref.exit_stage[ok])
    np.testing.assert_allclose(res.scores[ok], ref.scores[ok], rtol=1e-3, atol=1e-4)
    # compaction: stage k processed exactly the samples that had not exited before it
    reached = [int((res.exit_stage >= k).sum()) for k in range(bundle.num_stages)]
    assert runner.stats == reached
    if batch == 200:  # thresholds chosen so samples exit at every gate
        assert (np.bincount(res.exit_stage, minlength=bundle.num_stages) > 0).all()
        assert reached[0] > reached[-1]


def test_uint8_pixels_equal_normalized_floats(exported: dict) -> None:
    net, bundle = exported["resnet"]
    runner = GatedRunner(bundle, backend="onnxruntime", thresholds=spread_thresholds(net, exported["x"]))
    a = runner.predict(exported["pixels"][:50])
    b = runner.predict(exported["x"][:50].numpy())
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.exit_stage, b.exit_stage)


def test_stage_skipped_when_nobody_reaches_it(exported: dict) -> None:
    _, bundle = exported["resnet"]
    runner = GatedRunner(bundle, backend="onnxruntime", thresholds=[-1e9, 0, 0])
    res = runner.predict(exported["x"][:20].numpy())
    assert (res.exit_stage == 0).all()
    assert runner.stats == [20, 0, 0, 0]


def test_collect_returns_every_gate(exported: dict) -> None:
    net, bundle = exported["densenet"]
    x = exported["x"][:30]
    rec = GatedRunner(bundle, backend="onnxruntime", max_batch=8).collect(x.numpy())
    with torch.no_grad():
        ref = net.all_exits(x)
    np.testing.assert_allclose(rec.scores, ref.scores.numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(rec.final_labels, ref.final_logits.argmax(1).numpy())


def test_manifest_records_flops_and_io(exported: dict) -> None:
    net, bundle = exported["resnet"]
    m = bundle.manifest
    assert [s.file for s in m.stages] == [f"stage{k}.onnx" for k in range(4)]
    assert m.stages[1].inputs[1].name == "keep"
    assert m.stages[-1].outputs[0].name == "logits"
    costs = bundle.exit_costs()
    assert all(a < b for a, b in zip(costs, costs[1:], strict=False))
    # stage FLOPs add up to the full model (gates excluded)
    assert abs(sum(bundle.stage_flops) - bundle.full_flops) / bundle.full_flops < 0.01
    assert all(g > 0 for g in bundle.gate_flops)


def test_verification_reports_every_mismatch(exported: dict) -> None:
    net, bundle = exported["resnet"]
    broken = build("resnet")
    with torch.no_grad():
        broken.gates[0].linear.weight.add_(1.0)  # stage 0's gate
        broken.stages[2].get_submodule("layer3")[0].conv1[0].weight.mul_(1.5)  # stage 2's body
    with pytest.raises(ExportVerificationError) as err:
        verify_bundle(broken, bundle, exported["x"][:32])
    text = str(err.value)
    assert "stage 0 score" in text and "stage 2" in text and "full.onnx" in text
    assert len(err.value.mismatches) >= 4


def test_export_is_atomic_and_never_clobbers(tmp_path: Path, exported: dict) -> None:
    net, _ = exported["two_path"]
    out = tmp_path / "m.dg"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--force"):
        dg.export(net, out)
    assert (out / "precious.txt").read_text() == "keep me"
    # a failing verification leaves no bundle and no temporary directory behind
    bad = tmp_path / "bad.dg"
    with pytest.raises(ExportVerificationError):
        dg.export(net, bad, atol=-1.0, rtol=0.0)  # impossible tolerance
    assert not bad.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.dg"]


def test_export_checks_near_chance_accuracy_as_the_cli_does(tmp_path: Path,
                                                             exported: dict) -> None:
    from dgconvert.gating.fit import NearChanceError

    net, _ = exported["resnet"]
    x = exported["x"][:100]
    with torch.no_grad():
        right = net(x).argmax(1).numpy()
    wrong = (right + 1) % net.num_classes  # the model's own labels shifted: 0 % accuracy
    out = tmp_path / "m.dg"
    with pytest.raises(NearChanceError, match=r"scores 0\.0 % top-1 on shifted"):
        dg.export(net, out, verify_input=x, verify_labels=wrong, data_name="shifted")
    assert not out.exists()  # checked before anything is written
    seen: list[float] = []
    dg.export(net, out, verify_input=x, verify_labels=right, on_accuracy=seen.append)
    assert seen == [1.0] and Bundle.load(out).num_stages == net.num_gates + 1


# -- bad input ------------------------------------------------------------------------


@pytest.fixture()
def runner(exported: dict) -> GatedRunner:
    return GatedRunner(exported["resnet"][1], backend="onnxruntime")


def test_wrong_shape(runner: GatedRunner) -> None:
    with pytest.raises(InputError, match=r"shape \(4, 3, 28, 28\), expected \[N, 1, 28, 28\]"):
        runner.predict(np.zeros((4, 3, 28, 28), np.float32))


def test_wrong_dtype(runner: GatedRunner) -> None:
    with pytest.raises(InputError, match="dtype int32, expected float32"):
        runner.predict(np.zeros((2, 1, 28, 28), np.int32))


def test_nan_rows_are_reported(runner: GatedRunner) -> None:
    x = np.zeros((5, 1, 28, 28), np.float32)
    x[3, 0, 1, 1] = np.nan
    x[4, 0, 0, 0] = np.inf
    with pytest.raises(InputError, match=r"2 image\(s\) contain NaN or Inf \(rows \[3, 4\]"):
        runner.predict(x)


def test_empty_batch(runner: GatedRunner) -> None:
    res = runner.predict(np.zeros((0, 1, 28, 28), np.float32))
    assert res.labels.shape == (0,) and res.exit_stage.shape == (0,)
    assert runner.stats == [0, 0, 0, 0]


def test_grayscale_without_channel_axis(runner: GatedRunner, exported: dict) -> None:
    a = runner.predict(exported["pixels"][:4, 0])
    b = runner.predict(exported["pixels"][:4])
    np.testing.assert_array_equal(a.labels, b.labels)


def test_thresholds_count(exported: dict) -> None:
    with pytest.raises(InputError, match="got 2 thresholds .* expected 3"):
        GatedRunner(exported["resnet"][1], backend="onnxruntime", thresholds=[1, 2])


def _copy_bundle(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bundle_from_another_version(tmp_path: Path, exported: dict) -> None:
    path = _copy_bundle(exported["resnet"][1].path, tmp_path / "old.dg")
    m = json.loads((path / "manifest.json").read_text())
    m["schema_version"] = 99
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="schema_version 99.*reads version 1.*re-export"):
        Bundle.load(path)


def test_bundle_missing_stage_and_corrupt_manifest(tmp_path: Path, exported: dict) -> None:
    path = _copy_bundle(exported["resnet"][1].path, tmp_path / "b.dg")
    (path / "stage2.onnx").unlink()
    with pytest.raises(BundleError, match=r"missing \['stage2.onnx'\]"):
        Bundle.load(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.load(path)
    with pytest.raises(BundleError, match="not a dgconvert bundle"):
        Bundle.load(tmp_path)


def test_runtime_imports_and_runs_without_torch(tmp_path: Path, exported: dict) -> None:
    """The runtime in a process where `import torch` fails."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    np.save(tmp_path / "x.npy", exported["pixels"][:16])
    code = (
        "import numpy as np, sys\n"
        "try:\n    import torch\n    sys.exit('torch imported')\nexcept ImportError:\n    pass\n"
        "import dgconvert.runtime as rt\n"
        f"r = rt.GatedRunner({str(exported['resnet'][1].path)!r})\n"
        f"res = r.predict(np.load({str(tmp_path / 'x.npy')!r}))\n"
        "assert 'torch' not in sys.modules\n"
        "print(res.labels.tolist(), r.stats)\n"
    )
    env = {"PYTHONPATH": str(blocker), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    labels = json.loads(proc.stdout.split("] [")[0] + "]")
    ref = GatedRunner(exported["resnet"][1], backend="onnxruntime").predict(exported["pixels"][:16])
    assert labels == ref.labels.tolist()
