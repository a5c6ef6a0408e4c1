"""Feature layouts (NCHW, NHWC, tokens), automatic cut points and the exporter fallback:
export, verify and run each layout against torch, sample by sample."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dgconvert as dg
from dgconvert.cli import main
from dgconvert.convert.onnx_export import StageExportError, export_onnx
from dgconvert.convert.verify import spread_thresholds
from dgconvert.core.errors import CutError
from dgconvert.gating import GatedNetwork, make_gate
from dgconvert.gating.cut import cut_points, pick_cuts
from dgconvert.gating.fit import NearChanceError, check_backbone_accuracy
from dgconvert.gating.network import detect_layout
from dgconvert.runtime import GatedRunner
from tests import models

SHAPE = [1, 28, 28]
LAYOUT_MODELS = {
    "tokens": (models.tiny_vit, ["encoder.layers.0", "encoder.layers.2"]),
    "nhwc": (models.tiny_swin, ["features.1", "features.3"]),
    "nchw": (models.tiny_convnext, ["features.1", "features.2"]),
}


def _net(kind: str, gate: str = "dgate", **kw: object) -> GatedNetwork:
    factory, cuts = LAYOUT_MODELS[kind]
    torch.manual_seed(0)
    backbone = factory().eval()
    return GatedNetwork.from_backbone(backbone, kw.pop("cuts", cuts), gate=gate,  # type: ignore[arg-type]
                                      input_shape=SHAPE, **kw).eval()  # fmt: skip


@pytest.mark.parametrize("kind", list(LAYOUT_MODELS))
def test_layout_is_detected_and_pooled_as_the_model_pools(kind: str) -> None:
    net = _net(kind)
    x = torch.randn(3, *SHAPE)
    f = net.stages[0](x)
    gate = net.gates[0]
    assert gate.layout == kind and gate.spec()["layout"] == kind
    pools = {"tokens": lambda: f[:, 0], "nhwc": lambda: f.mean(dim=(1, 2)),
             "nchw": lambda: f.mean(dim=(2, 3))}  # fmt: skip
    want = pools[kind]()
    assert gate.in_features == want.shape[1]
    torch.testing.assert_close(gate.pool(f), want)
    torch.testing.assert_close(gate.pool(want), want)  # pooled vectors pass through (fit)


def test_token_pool_default_and_choice() -> None:
    assert _net("tokens").gates[0].pool_kind == "cls"  # the model has a class token
    net = _net("tokens", token_pool="mean")
    f = net.stages[0](torch.randn(2, *SHAPE))
    torch.testing.assert_close(net.gates[0].pool(f), f.mean(dim=1))
    with pytest.raises(ValueError, match="pool"):
        make_gate({"type": "dgate", "layout": "tokens", "pool": "max"}, 4, 3)


def test_detect_layout_rules() -> None:
    assert detect_layout([2, 16, 7, 7]) == "nchw"
    assert detect_layout([2, 7, 7, 16]) == "nhwc"
    assert detect_layout([2, 17, 16]) == "tokens"
    assert detect_layout([2, 16]) == "vector"
    # ambiguous 8x8x8: the axes that grow with the input are the spatial ones
    assert detect_layout([2, 8, 8, 8], lambda: (1, 16, 16, 8)) == "nhwc"
    assert detect_layout([2, 8, 8, 8], lambda: (1, 8, 16, 16)) == "nchw"
    with pytest.raises(ValueError, match="do not fit layout"):
        _net("tokens", layout="nhwc")


# one gate type per layout keeps this in CI time; every layout x gate type runs in
# benchmarks/conformance.py. tokens: cuts=3 from a 2-sample example (the keep sizes the
# exporter sees must never collapse to 1), automatic cut points.
EXPORT_CASES = {"tokens": ("dgate", 3), "nhwc": ("softmax", None), "nchw": ("confidence", None)}


@pytest.mark.parametrize("kind", list(EXPORT_CASES))
def test_layout_exports_verifies_and_runs_like_torch(tmp_path, kind: str) -> None:
    gate, cuts = EXPORT_CASES[kind]
    net = _net(kind, gate, **({"cuts": cuts} if cuts else {}))
    x = torch.randn(48, *SHAPE, generator=torch.Generator().manual_seed(1))
    bundle = dg.export(net, tmp_path / "m.dg", example_input=x[:2], verify_input=x)
    recorded = [s.gate for s in bundle.manifest.stages[:-1]]
    assert [r.extra["layout"] for r in recorded] == [g.layout for g in net.gates]
    assert kind in [g.layout for g in net.gates]  # (auto cuts may add an NCHW stem cut)
    assert all(r.flops > 0 for r in recorded)
    t = spread_thresholds(net, x)
    ref = net.gated_forward(x, t, return_scores=True)
    with torch.no_grad():
        scores = net.all_exits(x).scores.numpy()
    ok = ~(np.abs(scores - np.asarray(t, np.float32)) < 1e-4).any(axis=1)
    res = GatedRunner(bundle.path, backend="onnxruntime", thresholds=t, max_batch=16).predict(x.numpy())
    np.testing.assert_array_equal(res.labels[ok], ref.labels[ok])
    np.testing.assert_array_equal(res.exit_stage[ok], ref.exit_stage[ok])
    assert (np.bincount(res.exit_stage, minlength=bundle.num_stages) > 0).all()  # every gate
    back = dg.load(_saved(net, tmp_path, kind))
    assert back.cuts == net.cuts
    assert [g.spec() for g in back.gates] == [g.spec() for g in net.gates]


def _saved(net: GatedNetwork, tmp_path, kind: str):
    net.config.arch = {"factory": f"tests.models:{LAYOUT_MODELS[kind][0].__name__}", "kwargs": {}}
    return dg.save(net, tmp_path / "gated.pt")


def test_cuts_k_picks_points_at_about_equal_flops() -> None:
    backbone = models.tiny_vit().eval()
    points, total = cut_points(backbone, torch.zeros(1, *SHAPE))
    assert total > 0 and [p.share for p in points] == sorted(p.share for p in points)
    assert "encoder.layers.1" in [p.name for p in points]  # nested modules are cut points
    net = GatedNetwork.from_backbone(backbone, 2, input_shape=SHAPE)
    shares = {p.name: p.share for p in points}
    got = [shares[c] for c in net.cuts]
    best = [p.share for p in pick_cuts(points, 2)]
    assert got == best and abs(got[0] - 1 / 3) < 0.2 and abs(got[1] - 2 / 3) < 0.2
    net = GatedNetwork.from_backbone(backbone, 1, input_shape=SHAPE, shares=[0.75])
    assert abs(shares[net.cuts[0]] - 0.75) <= min(abs(s - 0.75) for s in shares.values()) + 1e-9
    with pytest.raises(CutError, match="shares"):
        GatedNetwork.from_backbone(backbone, 2, input_shape=SHAPE, shares=[0.6, 0.3])
    with pytest.raises(CutError, match="fewer cuts"):
        GatedNetwork.from_backbone(backbone, 9, input_shape=SHAPE)


def test_cuts_command_lists_points_and_the_auto_pick(tmp_path) -> None:
    out = tmp_path / "cuts.json"
    res = CliRunner().invoke(main, ["cuts", "tests.models:tiny_swin", "--input-shape", "1,28,28",
                                    "--auto", "2", "--json", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "features.3" in res.output and "nhwc" in res.output and "auto:2 picks" in res.output
    import json

    rows = json.loads(out.read_text())["cut_points"]
    assert rows[0]["share"] < rows[-1]["share"] and rows[-1]["shape"] == [2, 2, 32]
    res = CliRunner().invoke(main, ["cuts", "tests.models:tiny_swin"])
    assert res.exit_code != 0 and "--input-shape" in res.output


def test_near_chance_backbone_is_refused_with_the_fix() -> None:
    y = np.arange(100) % 10
    logits = np.eye(10)[(y + 1) % 10]  # always wrong: 0 %
    with pytest.raises(NearChanceError) as err:
        check_backbone_accuracy(logits, y, normalization=None, source="fashion-mnist:train")
    msg = str(err.value)
    assert "0.0 %" in msg and "10.0 %" in msg and "--normalization" in msg
    assert "--allow-near-chance" in msg
    good = np.eye(10)[np.where(np.arange(100) < 60, y, (y + 1) % 10)]  # 60 %
    assert check_backbone_accuracy(good, y, normalization=None) == pytest.approx(0.6)
    # 19 % on 10 balanced classes (the case reported in issue 11) is near chance
    weak = np.eye(10)[np.where(np.arange(100) < 19, y, (y + 1) % 10)]
    with pytest.raises(NearChanceError):
        check_backbone_accuracy(weak, y, normalization=None)


class _NoDynamo(torch.nn.Module):
    """Data-dependent control flow: torch.export refuses it; TorchScript traces one branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.abs().sum()) >= 0:  # always true, but torch.export cannot know
            return x * 2 + 1
        return x


def test_exporter_falls_back_and_logs(tmp_path, caplog) -> None:
    mod = _NoDynamo()
    with caplog.at_level(logging.WARNING, logger="dgconvert.convert.onnx_export"):
        used = export_onnx(mod, (torch.randn(4, 3),), tmp_path / "m.onnx", ["images"], ["y"])
    assert used == "torchscript"
    assert "dynamo failed" in caplog.text
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((7, 3)).astype(np.float32)
    (y,) = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"images": x})
    np.testing.assert_allclose(y, x * 2 + 1, rtol=1e-6)


def test_both_exporters_failing_names_the_stage_and_what_to_try(tmp_path) -> None:
    def never(path) -> None:
        raise ValueError("rows differ")

    with pytest.raises(StageExportError) as err:
        export_onnx(torch.nn.ReLU(), (torch.randn(4, 3),), tmp_path / "m.onnx", ["images"],
                    ["y"], check=never, what="stage 1 (backbone from after 'a' to 'b')")  # fmt: skip
    msg = str(err.value)
    assert "stage 1" in msg and "dynamo:" in msg and "torchscript:" in msg
    assert "rows differ" in msg and "--exporter" in msg and "dgconvert cuts" in msg


class _Partition(torch.nn.Module):
    """[N, C, H, W] -> [4N, C, H/2, W/2]: windows folded into dim 0 (as MaxViT, Swin)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        x = x.reshape(n, c, 2, h // 2, 2, w // 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n * 4, c, h // 2, w // 2)


class _Departition(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, c, h, w = x.shape
        x = x.reshape(m // 4, 2, 2, c, h, w).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(m // 4, c, 2 * h, 2 * w)


class _Windowed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.partition = _Partition()
        self.local = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.departition = _Departition()
        self.block = torch.nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.departition(self.local(self.partition(self.stem(x))))
        return self.head(self.block(x).mean(dim=(2, 3)))


def test_values_without_the_batch_in_dim_0_are_no_cut_points() -> None:
    points, _ = cut_points(_Windowed().eval(), torch.zeros(1, *SHAPE))
    names = [p.name for p in points]
    assert "stem" in names and "departition" in names and "block" in names
    assert "partition" not in names and "local" not in names  # rows are windows there


@pytest.mark.parametrize("kind", ["tokens", "nhwc"])
def test_fit_gates_pools_by_layout(kind: str) -> None:
    """Gate fitting caches each gate's pooled vector (class token, NHWC mean) and trains the
    same heads on it; a backbone at chance (random weights) needs the explicit override."""
    from dgconvert.data import Dataset
    from dgconvert.gating.fit import extract_features, fit_gates

    rng = np.random.default_rng(0)
    ds = Dataset(rng.standard_normal((120, *SHAPE)).astype(np.float32),
                 rng.integers(0, 10, 120).astype(np.int64), source="random")  # fmt: skip
    factory, cuts = LAYOUT_MODELS[kind]
    torch.manual_seed(0)
    with pytest.raises(NearChanceError):
        fit_gates(factory().eval(), ds, cuts, epochs=1, progress=False)
    result = fit_gates(factory().eval(), ds, cuts, epochs=2, progress=False, check_accuracy=False)
    net = result.net
    assert [g.layout for g in net.gates] == [kind, kind]
    feats = extract_features(net, ds.images[:5], None)
    x = torch.from_numpy(ds.images[:5])
    with torch.no_grad():
        f0 = net.stages[0](x)
        want = f0[:, 0] if kind == "tokens" else f0.mean(dim=(1, 2))
        torch.testing.assert_close(feats.pooled[0], want)
        s, lab, _ = net.gates[0](f0)  # the fitted head on raw features == on pooled ones
        s2, lab2, _ = net.gates[0](feats.pooled[0])
    torch.testing.assert_close(s, s2)
    assert torch.equal(lab, lab2) and torch.isfinite(s).all()
    assert result.options["layouts"] == [kind, kind]


class _WithOptionalArgs(torch.nn.Module):
    """forward(x, attn_mask=None, is_causal=False) as timm's ViTs: the options are traced as
    their defaults, not as inputs crossing every cut."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU())
        self.b = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3), torch.nn.ReLU())
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:  # fmt: skip
        assert attn_mask is None and not is_causal
        return self.head(self.b(self.a(x)).mean(dim=(2, 3)))


def test_optional_forward_arguments_are_constants() -> None:
    model = _WithOptionalArgs().eval()
    net = GatedNetwork.from_backbone(model, ["a"], input_shape=SHAPE)
    x = torch.randn(3, *SHAPE)
    torch.testing.assert_close(net(x), model(x))
    assert GatedNetwork.from_backbone(model, 1, input_shape=SHAPE).cuts == ["a"]
