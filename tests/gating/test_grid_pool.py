"""``gridG`` gate pooling: cell means like numpy, refused where maps are not 2-D, exported
and run like torch (fp32 and int8, the int8 heads pooling the integer features), through
``gates fit --pool``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dgconvert as dg
from dgconvert import zoo
from dgconvert.cli import main
from dgconvert.convert.quantize import QuantizeSettings, quantize_bundle
from dgconvert.convert.verify import spread_thresholds
from dgconvert.core.gates import GRID_POOLS
from dgconvert.core.preprocess import prepare_images
from dgconvert.gating import GatedNetwork
from dgconvert.gating.heads import check_layout, feature_size, pool_features
from dgconvert.runtime import GatedRunner
from tests import models


def _cell_means(x: np.ndarray, grid: int) -> np.ndarray:
    """Reference: cells of ceil(H / grid) rows and columns, the last ones smaller."""
    n, c, h, w = x.shape
    kh, kw = -(-h // grid), -(-w // grid)
    rows = [(r, min(h, r + kh)) for r in range(0, h, kh)]
    cols = [(q, min(w, q + kw)) for q in range(0, w, kw)]
    out = np.empty((n, c, len(rows), len(cols)), np.float64)
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return out.reshape(n, -1)


@pytest.mark.parametrize("pool", GRID_POOLS)
@pytest.mark.parametrize("hw", [(28, 28), (14, 14), (7, 7), (5, 9), (1, 3)])
def test_grid_pool_averages_each_cell_like_numpy(pool: str, hw: tuple[int, int]) -> None:
    x = torch.randn(3, 5, *hw, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = pool_features(x, "nchw", pool)
    want = _cell_means(x.numpy(), int(pool.removeprefix("grid")))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    assert feature_size(tuple(x.shape), "nchw", pool) == got.shape[1]
    assert feature_size((3, 5, 28, 28), "nchw", pool) == 5 * int(pool[-1]) ** 2


def test_grid_pool_is_refused_where_maps_are_not_2d() -> None:
    with pytest.raises(ValueError, match="pool 'grid4' does not exist for tokens"):
        check_layout("tokens", "grid4")
    with pytest.raises(ValueError, match=r"shape \[2, 4, 8\].*Fix: pool 'mean'"):
        check_layout("nchw", "grid4", (2, 4, 8))
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="gate after 'encoder.layers.0'.*grid2"):
        GatedNetwork.from_backbone(models.tiny_vit().eval(), ["encoder.layers.0"],
                                   gate={"type": "dgate", "pool": "grid2"}, input_shape=[1, 28, 28])


def _grid_net(pool: str = "grid4") -> GatedNetwork:
    factory, kwargs, cuts = models.ARCHS["resnet"]
    torch.manual_seed(0)
    backbone = getattr(zoo, factory.split(":")[1])(**kwargs).eval()
    return GatedNetwork.from_backbone(
        backbone, cuts, gate={"type": "dgate", "pool": pool}, input_shape=[1, 28, 28],
        normalization=models.NORMALIZATION, arch={"factory": factory, "kwargs": kwargs}).eval()


@pytest.fixture(scope="module")
def grid_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[GatedNetwork, dg.Bundle, np.ndarray]:
    net = _grid_net()
    pixels = np.random.default_rng(0).integers(0, 256, (64, 1, 28, 28), dtype=np.uint8)
    x = torch.from_numpy(prepare_images(pixels, [1, 28, 28], models.NORMALIZATION))
    bundle = dg.export(net, tmp_path_factory.mktemp("grid") / "grid.dg", verify_input=x)
    return net, bundle, pixels


def test_grid_gates_export_and_run_like_torch(grid_bundle, tmp_path: Path) -> None:
    net, bundle, pixels = grid_bundle
    assert [g.spec()["pool"] for g in net.gates] == ["grid4"] * 3
    assert [s.gate.extra.get("pool") for s in bundle.manifest.stages[:-1]] == ["grid4"] * 3
    x = torch.from_numpy(prepare_images(pixels, [1, 28, 28], models.NORMALIZATION))
    t = spread_thresholds(net, x)
    ref = net.gated_forward(x, t, return_scores=True)
    with torch.no_grad():
        scores = net.all_exits(x).scores.numpy()
    ok = ~(np.abs(scores - np.asarray(t, np.float32)) < 1e-4).any(axis=1)
    with GatedRunner(bundle.path, backend="onnxruntime", thresholds=t) as runner:
        assert runner.backend.fast_paths_off() == []  # fused boundaries keep the NCHW copy
        for bs in (1, 5, 64):
            res = runner.predict(pixels[:bs])
            np.testing.assert_array_equal(res.labels[ok[:bs]], ref.labels[:bs][ok[:bs]])
            np.testing.assert_array_equal(res.exit_stage[ok[:bs]], ref.exit_stage[:bs][ok[:bs]])
    assert len(set(ref.exit_stage.tolist())) > 1
    import onnx

    ceil = []  # ceil_mode only where the cells do not tile the map (28: no; 14 and 7: yes)
    for k in range(3):
        graph = onnx.load(str(bundle.path / bundle.manifest.stages[k].file)).graph
        pool = next(n for n in graph.node if n.op_type == "AveragePool")
        ceil.append(next((a.i for a in pool.attribute if a.name == "ceil_mode"), 0))
    assert ceil == [0, 1, 1]
    info = CliRunner().invoke(main, ["info", str(bundle.path)])
    assert info.exit_code == 0 and info.output.count("pool grid4") == 3
    back = dg.load(dg.save(net, tmp_path / "grid.pt"))
    assert [g.spec() for g in back.gates] == [g.spec() for g in net.gates]


def test_int8_grid_heads_pool_the_integer_features(grid_bundle, tmp_path: Path) -> None:
    _, src, pixels = grid_bundle
    q, _ = quantize_bundle(src, tmp_path / "int8.dg", pixels, data="pixels",
                           settings=QuantizeSettings(calibration_images=32))
    with GatedRunner(q, backend="onnxruntime", fuse_boundaries=False, compose=False) as plain:
        rec = plain.collect(pixels)
    t = [float(np.median(rec.scores[:, k])) for k in range(q.num_gates)]
    with GatedRunner(q, backend="onnxruntime", thresholds=t, compose=False) as fast, \
            GatedRunner(q, backend="onnxruntime", thresholds=t, fuse_boundaries=False,
                        compose=False) as ref:
        assert f"{q.num_gates} heads pool int8" in fast.backend.describe()
        ops = [n.op_type for m in fast.backend._graphs for n in m.graph.node]
        assert "AveragePool" not in ops and ops.count("MatMulInteger") >= q.num_gates
        want = ref.predict(pixels)
        assert len(set(want.exit_stage.tolist())) > 1
        for bs in (1, 7, 64):
            got = fast.predict(pixels[:bs])
            np.testing.assert_array_equal(got.labels, want.labels[:bs])
            np.testing.assert_array_equal(got.exit_stage, want.exit_stage[:bs])
            np.testing.assert_allclose(got.scores, want.scores[:bs], rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("one_thread")
def test_gates_fit_pool_option(tiny_backbone: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.pt"
    res = CliRunner().invoke(main, ["gates", "fit", str(tiny_backbone), "--data",
                                    "fashion-mnist:train[:600]", "-o", str(out), "--epochs", "2",
                                    "--pool", "grid2"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    net = dg.load(out)
    assert [g.spec()["pool"] for g in net.gates] == ["grid2"] * 3
    assert [g.in_features for g in net.gates] == [4 * s for s in (8, 16, 24)]  # C x 2 x 2
    res = CliRunner().invoke(main, ["gates", "fit", str(tiny_backbone), "--data",
                                    "fashion-mnist:train[:600]", "-o", str(out), "--pool", "grid3"])
    assert res.exit_code != 0 and "grid3" in res.output
