"""One meaning for the final stage's score: a sample leaving at the final stage carries the
final classifier's max softmax probability on every path (runner at batch 1, stage by stage
at batch N, the one-session chain, every gate off, the pool, the pool's full model) and in
the torch reference, sample by sample."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from dgconvert.core.gates import exit_head_score
from dgconvert.core.preprocess import prepare_images
from dgconvert.runtime import GatedPool, GatedRunner
from tests.models import NORMALIZATION


@pytest.fixture(scope="module")
def case(exported_bundle: Callable[..., Any]) -> dict[str, Any]:
    e = exported_bundle("resnet")
    pixels = np.random.default_rng(5).integers(0, 256, (48, 1, 28, 28), dtype=np.uint8)
    x = torch.from_numpy(prepare_images(pixels, [1, 28, 28], NORMALIZATION))
    with torch.no_grad():
        out = e.net.all_exits(x)
        final = exit_head_score(out.final_logits.numpy(), None, "max-softmax")
    scores = out.scores.numpy()
    t = [float(np.quantile(scores[:, k], 0.8)) for k in range(scores.shape[1])]
    return {"net": e.net, "bundle": e.bundle, "pixels": pixels, "x": x, "t": t,
            "final": final.astype(np.float32)}


def _paths(case: dict[str, Any], t: list[float]) -> dict[str, Any]:
    b, px = case["bundle"], case["pixels"]
    out = {
        "batch 1": GatedRunner(b, backend="onnxruntime", thresholds=t, max_batch=1,
                               compose=False).predict(px),
        "batch N": GatedRunner(b, backend="onnxruntime", thresholds=t,
                               compose=False).predict(px),
        "chain": GatedRunner(b, backend="onnxruntime", thresholds=t).predict(px),
        "torch": case["net"].gated_forward(case["x"], t, return_scores=True),
    }
    with GatedPool(b, backend="onnxruntime", thresholds=t, max_delay_ms=0) as pool:
        out["pool"] = pool.predict(px)
    return out


@pytest.mark.parametrize("gates", ["on", "off"])
def test_final_stage_score_is_max_softmax_on_every_path(case: dict[str, Any], gates: str) -> None:
    t = case["t"] if gates == "on" else [np.inf] * len(case["t"])
    last = case["bundle"].num_stages - 1
    results = _paths(case, t)
    ref = results["torch"]
    at_final = ref.exit_stage == last
    assert at_final.sum() >= 5 and (gates == "off" or (~at_final).sum() >= 5)
    np.testing.assert_allclose(ref.scores[at_final], case["final"][at_final], rtol=1e-5)
    for name, res in results.items():
        assert not np.isnan(res.scores).any(), name
        np.testing.assert_array_equal(res.exit_stage, ref.exit_stage, err_msg=name)
        np.testing.assert_allclose(res.scores, ref.scores, rtol=1e-4, atol=1e-5, err_msg=name)


def test_the_pools_full_model_scores_max_softmax(case: dict[str, Any]) -> None:
    with GatedPool(case["bundle"], backend="onnxruntime", full=True, max_delay_ms=0) as pool:
        res = pool.predict(case["pixels"])
    assert (res.exit_stage == case["bundle"].num_stages - 1).all()
    np.testing.assert_allclose(res.scores, case["final"], rtol=1e-4, atol=1e-5)
