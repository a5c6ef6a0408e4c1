"""FP16 parity on the CPU: the FP16 stage graphs the build path hands TensorRT 11
(:func:`dgconvert.convert.tensorrt.prepare_graph` with the ``fp16`` plan) run on ONNX Runtime
CPU and agree with the FP32 graphs on real Fashion-MNIST test images.

The model is a small ResNet trained here for a few hundred steps, with its gates fitted in
closed form (ridge regression on pooled features), so labels and gate scores mean something:
agreement on a random network would say little. No GPU needed (not marked ``gpu``).
"""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np
import onnx
import pytest
import torch

import dgconvert as dg
from dgconvert import zoo
from dgconvert.convert.tensorrt import precision_plan, prepare_graph
from dgconvert.core.bundle import Bundle
from dgconvert.core.preprocess import normalize
from dgconvert.gating import GatedNetwork
from dgconvert.gating.heads import pool_features
from dgconvert.runtime import GatedRunner

NORM = {"scale": 255.0, "mean": [0.2860], "std": [0.3530]}
STEPS, BATCH = 200, 64
MIN_AGREEMENT = 0.995  # the model's labels: gated predictions and the final stage
# An intermediate gate's own argmax (gate 0 is ~55 % accurate, full of near-ties) only
# matters for the samples that exit there, which the gated-prediction check covers.
GATE_MIN_AGREEMENT = 0.99

pytestmark = pytest.mark.slow  # trains a backbone on 12,000 images (a minute or two)


def _train_backbone(x: torch.Tensor, y: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(0)
    model = zoo.resnet(widths=[8, 16, 16, 16])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(STEPS):
        idx = torch.randint(0, len(x), (BATCH,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _fit_gates(net: GatedNetwork, x: torch.Tensor, y: torch.Tensor) -> None:
    """Least-squares fit of each gate's linear layer to one-hot targets (a d-gate-like head)."""
    target = torch.nn.functional.one_hot(y, net.num_classes).double() * 2 - 1
    with torch.no_grad():
        h = x
        for k, gate in enumerate(net.gates):
            h = net.stages[k](h)
            z = pool_features(h).double()
            a = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)
            w = torch.linalg.solve(a.T @ a + 1e-3 * torch.eye(a.shape[1], dtype=z.dtype), a.T @ target)
            gate.linear.weight.copy_(w[:-1].T.float())
            gate.linear.bias.copy_(w[-1].float())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, fashion_available: bool) -> dict[str, Any]:
    if not fashion_available:
        pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
    train = dg.load_dataset("fashion-mnist:train[:12000]")
    test = dg.load_dataset("fashion-mnist:test[:2000]")
    x = torch.from_numpy(normalize(train.images, NORM))
    y = torch.from_numpy(train.labels)
    backbone = _train_backbone(x, y)
    net = GatedNetwork.from_backbone(backbone, ["layer1", "layer2", "layer3"], gate="dgate",
                                     input_shape=[1, 28, 28], normalization=NORM).eval()
    _fit_gates(net, x[:4000], y[:4000])
    root = tmp_path_factory.mktemp("fp16")
    bundle = dg.export(net, root / "fp32.dg", verify=False)
    # the same bundle with every stage graph replaced by the FP16 graph of the build path
    fp16 = root / "fp16.dg"
    shutil.copytree(bundle.path, fp16)
    plan = precision_plan(11, "fp16")
    for k in range(bundle.num_stages):
        (fp16 / bundle.manifest.stages[k].file).write_bytes(prepare_graph(bundle.stage_file(k), plan))
    (fp16 / "full.onnx").write_bytes(prepare_graph(bundle.full_file(), plan))
    rewritten = Bundle.load(fp16, check_digests=False)
    rewritten.record_digests()  # the graphs were replaced on purpose
    return {"fp32": bundle, "fp16": Bundle.load(fp16), "images": test.images, "labels": test.labels}


def test_fp16_graphs_are_fp16(trained: dict[str, Any]) -> None:
    b = trained["fp16"]
    for k in range(b.num_stages):
        m = onnx.load(str(b.stage_file(k)))
        inits = {t.name: t.data_type for t in m.graph.initializer}
        conv_w = [n.input[1] for n in m.graph.node if n.op_type == "Conv"]
        assert conv_w and all(inits[w] == onnx.TensorProto.FLOAT16 for w in conv_w)
        io = {v.name: v.type.tensor_type.elem_type for v in [*m.graph.input, *m.graph.output]}
        assert io["score"] == onnx.TensorProto.FLOAT and io["label"] == onnx.TensorProto.INT64
        assert io.get("images", onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT
        if k > 0:
            assert io["x"] == onnx.TensorProto.FLOAT16 and io["keep"] == onnx.TensorProto.INT64
    def weight_bytes(bundle: Bundle) -> int:
        return sum(len(t.raw_data) for k in range(bundle.num_stages)
                   for t in onnx.load(str(bundle.stage_file(k))).graph.initializer)

    assert weight_bytes(b) < 0.6 * weight_bytes(trained["fp32"])  # stored in half precision


def test_fp16_stage_labels_agree_with_fp32(trained: dict[str, Any]) -> None:
    pixels, y = trained["images"], trained["labels"]
    r32 = GatedRunner(trained["fp32"], backend="onnxruntime").collect(pixels)
    r16 = GatedRunner(trained["fp16"], backend="onnxruntime").collect(pixels)
    acc = (r32.final_labels == y).mean()
    assert acc > 0.65, f"the reference model is not trained (accuracy {acc:.3f})"
    for k in range(r32.labels.shape[1]):
        agree = (r16.labels[:, k] == r32.labels[:, k]).mean()
        assert agree >= GATE_MIN_AGREEMENT, f"gate {k}: FP16 labels agree on {agree:.4f} of samples"
        np.testing.assert_allclose(r16.scores[:, k], r32.scores[:, k], rtol=0.02, atol=0.02)
    assert (r16.final_labels == r32.final_labels).mean() >= MIN_AGREEMENT
    assert abs((r16.final_labels == y).mean() - acc) < 0.005


def test_fp16_gated_predictions_agree_with_fp32(trained: dict[str, Any]) -> None:
    pixels, y = trained["images"], trained["labels"]
    rec = GatedRunner(trained["fp32"], backend="onnxruntime").collect(pixels)
    t = [float(np.quantile(rec.scores[:, k], 0.6)) for k in range(rec.scores.shape[1])]
    p32 = GatedRunner(trained["fp32"], backend="onnxruntime", thresholds=t).predict(pixels)
    p16 = GatedRunner(trained["fp16"], backend="onnxruntime", thresholds=t).predict(pixels)
    assert len(set(p32.exit_stage.tolist())) == len(t) + 1  # every exit is used
    assert (p16.labels == p32.labels).mean() >= MIN_AGREEMENT
    assert (p16.exit_stage == p32.exit_stage).mean() >= 0.99  # only near-threshold samples move
    assert abs((p16.labels == y).mean() - (p32.labels == y).mean()) < 0.005
    full32 = GatedRunner(trained["fp32"], backend="onnxruntime").full_logits(pixels).argmax(1)
    full16 = GatedRunner(trained["fp16"], backend="onnxruntime").full_logits(pixels).argmax(1)
    assert (full16 == full32).mean() >= MIN_AGREEMENT


def test_fp16_bundle_keeps_its_contract(trained: dict[str, Any]) -> None:
    """The converted graphs still take any N and M: one row, and M != N with repeats."""
    b = trained["fp16"]
    runner = GatedRunner(b, backend="onnxruntime")
    one = runner.predict(trained["images"][:1])
    assert one.labels.shape == (1,)
    be = runner.backend
    out = be.run_stage(0, runner.prepare(trained["images"][:5]), None)
    assert out.features.dtype == np.float16
    nxt = be.run_stage(1, out.features, np.array([4, 4, 0], np.int64))
    assert nxt.score.dtype == np.float32 and nxt.label.shape == (3,)
    assert nxt.label[0] == nxt.label[1]
