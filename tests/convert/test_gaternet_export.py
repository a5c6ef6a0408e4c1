"""GaterNet bundles: exported, pruned, verified sample by sample, run torch-free."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dgconvert as dg
from dgconvert.cli import main
from dgconvert.convert.gaternet import verify_gaternet_bundle
from dgconvert.core.bundle import Bundle
from dgconvert.core.errors import ExportVerificationError
from dgconvert.gating.gaternet import filter_gate_counts, force_off
from tests.gating.test_gaternet import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gaternet_bundle(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    net = tiny()
    rng = np.random.default_rng(0)
    calib = (rng.random((96, 1, 28, 28)) * 255).astype(np.uint8)
    verify = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("gn") / "gn.dg"
    bundle = dg.export(net, path, verify_input=verify, prune_images=calib, prune_source="calib",
                       exporter="dynamo", prune_multiple=1)  # every always-off filter
    return net, bundle, calib, verify


def test_manifest_records_kinds_pruning_and_flops(gaternet_bundle) -> None:  # type: ignore[no-untyped-def]
    net, bundle, calib, _ = gaternet_bundle
    m = bundle.manifest
    assert m.num_stages == 1 and m.num_gates == 0 and m.thresholds.values == []
    gn = m.gaternet
    assert gn is not None and gn.samples == len(calib) and gn.data == "calib"
    counts = filter_gate_counts(net, calib)
    assert gn.totals()["always_off"] == int((counts == 0).sum()) > 0
    assert gn.totals()["always_on"] == int((counts == len(calib)).sum())
    assert sum(lay.filters for lay in gn.layers) == net.num_filter_gates
    assert 0 < gn.pruned_share <= gn.totals()["always_off"] / net.num_filter_gates
    assert gn.flops_pruned < gn.flops_masked and m.stages[0].flops == gn.flops_pruned
    # schema compatible: re-read, unknown keys kept
    raw = json.loads((bundle.path / "manifest.json").read_text())
    raw["gaternet"]["future"] = 1
    assert type(m).parse(raw).to_dict()["gaternet"]["future"] == 1


def test_runtime_matches_torch_at_every_batch_size(gaternet_bundle) -> None:  # type: ignore[no-untyped-def]
    net, bundle, calib, verify = gaternet_bundle
    from dgconvert.core.preprocess import normalize

    x = torch.from_numpy(normalize(calib, net.normalization))
    with torch.no_grad():
        ref = net(x).argmax(1).numpy()  # the unpruned GaterNet: equal on calibration data
    for batch in (1, 7, 64):
        runner = dg.runtime.GatedRunner(bundle.path, backend="onnxruntime", max_batch=batch)
        res = runner.predict(calib)
        assert np.array_equal(res.labels, ref) and (res.exit_stage == 0).all()
    # one stage: no chain to compose, and that is no fast path turned off
    assert runner.backend.fast_paths_off() == [] and "nothing to chain" in runner.backend.describe()


def test_pruned_bundle_equals_masked_model_on_new_inputs(gaternet_bundle) -> None:  # type: ignore[no-untyped-def]
    net, bundle, calib, _ = gaternet_bundle
    off = filter_gate_counts(net, calib) == 0
    masked = force_off(net, off)
    y = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(7)) * 1.5
    with torch.no_grad():
        ref = masked(y).numpy()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundle.path / "full.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": y.numpy()})[0]
    assert np.abs(got - ref).max() < 1e-4 and np.array_equal(got.argmax(1), ref.argmax(1))


def test_verification_catches_a_wrong_graph(gaternet_bundle) -> None:  # type: ignore[no-untyped-def]
    net, bundle, _, verify = gaternet_bundle
    other = tiny(seed=3)
    with pytest.raises(ExportVerificationError):
        verify_gaternet_bundle(other, other, Bundle.load(bundle.path), verify)


def test_info_shows_kinds_and_plots(gaternet_bundle, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, bundle, _, _ = gaternet_bundle
    out = CliRunner().invoke(main, ["info", str(bundle.path), "--plot", str(tmp_path / "k.png")])
    assert out.exit_code == 0, out.output
    assert "always off" in out.output and "MFLOPs/image" in out.output
    assert (tmp_path / "k.png").stat().st_size > 1000


def test_gaternet_with_dgates_exports_verifies_and_exits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from dgconvert.data import Dataset
    from dgconvert.gating.gaternet import prune_always_off
    from dgconvert.gating.gaternet_exits import PackedGate, fit_gaternet_exits

    net = tiny()
    rng = np.random.default_rng(2)
    imgs = (rng.random((200, 1, 28, 28)) * 255).astype(np.uint8)
    ds = Dataset(imgs, rng.integers(0, 10, 200).astype(np.int64), source="random")
    pruned = prune_always_off(net, filter_gate_counts(net, imgs) == 0).net
    res = fit_gaternet_exits(pruned, ds, ["layer1", "layer2"], epochs=1, holdout=0.3)
    g = res.net
    assert g.num_gates == 2 and all(isinstance(h, PackedGate) for h in g.gates)
    x = torch.randn(24, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(g(x), pruned(x))  # staging changes nothing
    bundle = dg.export(g, tmp_path / "gd.dg", verify_input=x, exporter="torchscript")
    assert bundle.num_stages == 3 and bundle.manifest.stages[0].gate.extra["packed"]
    with torch.no_grad():
        scores = g.all_exits(x).scores.numpy()
    t = [float(np.quantile(scores[:, k], 0.5)) for k in range(2)]
    ref_labels, ref_stage = g.gated_forward(x, t)
    for batch in (1, 7, 64):
        out = dg.runtime.GatedRunner(bundle.path, backend="onnxruntime", thresholds=t,
                                     max_batch=batch).predict(x.numpy())
        assert np.array_equal(out.exit_stage, ref_stage.numpy())
        assert np.array_equal(out.labels, ref_labels.numpy())


def test_cli_gaternet_exits_prunes_fits_and_exports(tmp_path) -> None:  # type: ignore[no-untyped-def]
    net = tiny()
    ckpt = dg.save(net, tmp_path / "gn.pt")
    rng = np.random.default_rng(4)
    imgs = (rng.random((120, 1, 28, 28)) * 255).astype(np.uint8)
    data = tmp_path / "d.npz"
    np.savez(data, x=imgs, y=rng.integers(0, 10, 120).astype(np.int64))
    out = tmp_path / "gd.dg"
    args = ["gates", "gaternet-exits", str(ckpt), "--data", str(data), "-o", str(out),
            "--prune-data", str(data), "--prune-multiple", "1", "--cut", "layer1,layer2",
            "--epochs", "1",
            "--verify-data", str(data), "--verify-samples", "16", "--exporter", "torchscript"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    removed = int((filter_gate_counts(net, imgs) == 0).sum())
    assert f"pruned {removed} of {net.num_filter_gates} gated filters ({removed} off" in res.output
    assert removed > 0
    bundle = Bundle.load(out)
    assert bundle.num_stages == 3 and bundle.num_gates == 2
    res = CliRunner().invoke(main, args)  # exists, no --force
    assert res.exit_code != 0 and "--force" in res.output
    res = CliRunner().invoke(main, ["gates", "gaternet-exits", str(ckpt), "--data", str(data),
                                    "-o", str(tmp_path / "x.dg"), "--epochs", "0"])
    assert res.exit_code != 0 and "--epochs 0" in res.output
