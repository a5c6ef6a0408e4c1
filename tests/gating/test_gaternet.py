"""GaterNet on the torch side: Improved SemHash, gated layers, exact pruning, fitting."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import dgconvert as dg
from dgconvert.core.errors import CheckpointError
from dgconvert.core.gates import FilterGateLayer, filter_gate_kinds, format_filter_gates
from dgconvert.data import Dataset
from dgconvert.gating.flops import count_flops
from dgconvert.gating.gaternet import (
    GaterNet,
    GaterNetError,
    ImprovedSemHash,
    default_gated_layers,
    filter_gate_counts,
    fit_gaternet,
    force_off,
    gate_flops,
    prune_always_off,
    saturating_sigmoid,
)
from dgconvert.zoo import resnet

pytestmark = pytest.mark.usefixtures("one_thread")
ARCH = {"factory": "dgconvert.zoo:resnet", "kwargs": {"widths": [8, 16, 16, 32]}}
GATER = {"factory": "dgconvert.zoo:resnet", "kwargs": {"widths": [4, 4, 8, 8]}}


def tiny(seed: int = 0, spread: float = 3.0) -> GaterNet:
    """A random GaterNet whose gate biases are spread so that some gates are off."""
    torch.manual_seed(seed)
    bb = resnet(**ARCH["kwargs"])
    for m in bb.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    net = GaterNet.build(bb.eval(), None, GATER, input_shape=[1, 28, 28], num_classes=10,
                         arch=ARCH, normalization={"scale": 255.0, "mean": [0.286], "std": [0.353]})
    with torch.no_grad():
        net.gater.fc2.bias.normal_(0.0, spread)
    return net.eval()


def test_saturating_sigmoid_and_semhash_eval_are_hard() -> None:
    x = torch.tensor([-10.0, -0.01, 0.0, 0.01, 10.0])
    assert saturating_sigmoid(x).tolist()[0] == 0.0 and saturating_sigmoid(x).tolist()[-1] == 1.0
    sh = ImprovedSemHash().eval()
    assert sh(x[None]).tolist() == [[0.0, 0.0, 0.0, 1.0, 1.0]]  # no noise, 1(g' > 0)


def test_semhash_training_mixes_soft_and_hard_with_soft_gradient() -> None:
    torch.manual_seed(0)
    sh = ImprovedSemHash().train()
    logits = torch.zeros(400, 6, requires_grad=True)
    g = sh(logits)
    rows_hard = ((g == 0) | (g == 1)).all(1)
    # about half the samples use the hard gates (soft rows are almost never exactly 0/1)
    assert 0.35 < rows_hard.float().mean().item() < 0.65
    g.sum().backward()
    assert logits.grad is not None and (logits.grad[rows_hard] != 0).any()  # straight-through
    assert (logits.grad >= 0).all()  # the gradient of the saturating sigmoid


def test_gated_layers_multiply_channels_per_sample() -> None:
    net = tiny()
    assert [lay.name for lay in net.layers] == default_gated_layers(net.body) == [
        f"layer{i}.0.conv1" for i in range(1, 5)]
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ones = net.body(x, torch.ones(3, net.num_filter_gates))
        plain = resnet(**ARCH["kwargs"])
        plain.load_state_dict({k: v for k, v in net.body.state_dict().items()}, strict=False)
        assert torch.allclose(ones, plain.eval()(x), atol=1e-5)  # all on == the backbone
        g = net.hard_gates(x)
        assert set(g.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(net(x), net.body(x, g))


def test_unknown_gated_layer_is_a_clear_error() -> None:
    with pytest.raises(GaterNetError, match="not modules"):
        GaterNet.build(resnet(), ["layer9.conv"], GATER, input_shape=[1, 28, 28], num_classes=10)


def test_gate_kinds() -> None:
    assert filter_gate_kinds(np.array([5, 0, 3]), 5).tolist() == [0, 1, 2]
    lay = FilterGateLayer.from_counts("l", np.array([5, 0, 3, 0]), 5, pruned=2)
    assert (lay.always_on, lay.always_off, lay.input_dependent, lay.pruned) == (1, 2, 1, 2)
    assert "always off 50.0 %" in format_filter_gates([lay])


def test_pruned_equals_masked_and_removes_flops() -> None:
    net = tiny()
    x = torch.randn(64, 1, 28, 28)
    counts = filter_gate_counts(net, x.numpy())
    off = counts == 0
    assert 0 < off.sum() < net.num_filter_gates
    masked, pruned = force_off(net, off), prune_always_off(net, off)
    with torch.no_grad():
        assert torch.equal(masked(x), net(x))  # on the calibration samples: the GaterNet
        diff = (pruned.net(x) - masked(x)).abs().max().item()
        y = torch.randn(64, 1, 28, 28) * 2  # other inputs: equal to the masked model
        diff2 = (pruned.net(y) - masked(y)).abs().max().item()
    assert diff < 1e-5 and diff2 < 1e-5
    assert not pruned.notes and pruned.removed.sum() >= off.sum() - len(net.layers)
    before, after = count_flops(masked, x[:1]), count_flops(pruned.net, x[:1])
    assert after < before
    conv = pruned.net.body.get_submodule("layer2.0.conv1.0")
    kept = int((~off[8:24]).sum()) or 1
    assert conv.out_channels == kept and pruned.net.body.get_submodule("layer2.0.conv2.0").in_channels == kept


def test_pruning_keeps_channel_multiples() -> None:
    """Pruned layers keep a multiple of ``multiple`` channels (ONNX Runtime's blocked layout);
    the off filters that stay are still off for every input: outputs equal the masked model."""
    net = tiny()
    x = torch.randn(64, 1, 28, 28)
    off = filter_gate_counts(net, x.numpy()) == 0
    exact, rounded = prune_always_off(net, off), prune_always_off(net, off, 4)
    assert not (rounded.removed & ~off).any() and rounded.removed.sum() < exact.removed.sum()
    start = 0
    for lay in net.layers:
        sl = slice(start, start + lay.filters)
        start += lay.filters
        kept = lay.filters - int(rounded.removed[sl].sum())
        assert kept % 4 == 0 or kept == lay.filters
        assert kept - (lay.filters - int(exact.removed[sl].sum())) < 4
    y = torch.randn(32, 1, 28, 28) * 2
    with torch.no_grad():
        assert (rounded.net(y) - force_off(net, off)(y)).abs().max().item() < 1e-5
    with pytest.raises(GaterNetError, match="multiple=0"):
        prune_always_off(net, off, 0)


def test_gate_flops_are_what_pruning_saves() -> None:
    net = tiny()
    w = gate_flops(net)
    assert w.shape == (net.num_filter_gates,) and (w > 0).all()
    assert w[0] > w[-1]  # a layer-1 filter (28x28 maps) costs more than a layer-4 one
    off = np.zeros(net.num_filter_gates, bool)
    off[[0, 3, 9, 30, 40, 41]] = True  # some filters of every layer, none emptied
    one = torch.zeros(1, 1, 28, 28)
    saved = count_flops(net, one) - count_flops(prune_always_off(net, off).net, one)
    assert saved == pytest.approx(w[off].sum())


def test_checkpoint_roundtrip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    net = tiny()
    dg.save(net, tmp_path / "g.pt")
    back = dg.load(tmp_path / "g.pt")
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(back(x), net(x))
    pruned = prune_always_off(net, np.ones(net.num_filter_gates, bool)).net
    with pytest.raises(CheckpointError, match="pruned"):
        dg.save(pruned, tmp_path / "p.pt")


def _random_data(n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset((rng.random((n, 1, 28, 28)) * 255).astype(np.uint8),
                   rng.integers(0, 10, n).astype(np.int64), source="random")


def _fit(ds: Dataset, **options: Any) -> Any:
    torch.manual_seed(0)
    return fit_gaternet(resnet(**ARCH["kwargs"]), ds, gater=GATER, epochs=1, arch=ARCH,
                        normalization={"scale": 255.0}, progress=False, check_accuracy=False,
                        **options)


def test_fit_runs_and_reports() -> None:
    ds = _random_data(300, 0)
    res = _fit(ds, gater_epochs=1, settle_epochs=1, batch_size=100, sparsity=1.0,
               target_rate=None, holdout=0.2)
    assert res.accuracy is not None and res.backbone_accuracy is not None
    assert sum(lay.filters for lay in res.layers) == res.net.num_filter_gates
    assert res.net.fit_record["options"]["sparsity"] == 1.0
    assert "always on" in res.table()
    with pytest.raises(GaterNetError, match="epochs"):
        fit_gaternet(resnet(), ds, epochs=0, progress=False)


def test_fit_with_target_rate_fixes_rare_gates_off() -> None:
    ds = _random_data(200, 1)
    res = _fit(ds, gater_epochs=0, settle_epochs=0, batch_size=50, lr=0.5, sparsity=50.0,
               target_rate=0.3, rate_weights="flops", off_below=0.5, holdout=0.25)
    fixed = res.losses["fixed_off"]
    assert 0 < fixed < res.net.num_filter_gates
    assert sum(lay.always_off for lay in res.layers) >= fixed  # forced off: off for every input
    assert res.net.fit_record["options"]["target_rate"] == 0.3
    for bad in ({"target_rate": 0.0}, {"target_rate": 1.5}, {"off_below": 1.0},
                {"rate_weights": "bytes"}):
        with pytest.raises(GaterNetError, match=next(iter(bad))):
            fit_gaternet(resnet(), ds, progress=False, **bad)  # type: ignore[arg-type]


def test_cli_gaternet_bad_options_are_clear(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from click.testing import CliRunner

    from dgconvert.cli import main

    bb = tmp_path / "bb.pt"
    torch.save({}, bb)
    out = CliRunner().invoke(main, ["gates", "gaternet", str(bb), "--data", "x", "-o",
                                    str(tmp_path / "g.pt"), "--gater-kwargs", "{}"])
    assert out.exit_code != 0 and "--gater-kwargs needs --gater" in out.output
    out = CliRunner().invoke(main, ["gates", "gaternet", str(bb), "--data", "x", "-o",
                                    str(tmp_path / "g.pt"), "--target-rate", "1.5"])
    assert out.exit_code != 0 and "--target-rate" in out.output and "0<=x<=1" in out.output
