"""Ray Data on the session's local Ray: GatedPredictor in Dataset.map_batches, and
`dgconvert predict --ray`, give GatedRunner.predict's results sample by sample."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from click.testing import CliRunner

from dgconvert.cli import main
from dgconvert.serve.ray_data import GatedPredictor


def test_map_batches_equals_the_runner(ray_local: Any, case: dict[str, Any]) -> None:
    import ray.data

    px, ref, ok = case["pixels"], case["ref"], ~case["near"]
    ds = ray.data.from_items([{"image": im, "id": i} for i, im in enumerate(px)])
    out = ds.map_batches(GatedPredictor, batch_size=32, batch_format="numpy", concurrency=1,
                         num_cpus=0.25,
                         fn_constructor_kwargs={"bundle": str(case["bundle"].path),
                                                "thresholds": case["t"]}).take_all()
    assert len(out) == len(px)
    ids = np.array([r["id"] for r in out])
    labels = np.array([r["label"] for r in out])
    stages = np.array([r["exit_stage"] for r in out])
    np.testing.assert_array_equal(labels[ok[ids]], ref.labels[ids][ok[ids]])
    np.testing.assert_array_equal(stages[ok[ids]], ref.exit_stage[ids][ok[ids]])
    np.testing.assert_array_equal(np.stack([r["image"] for r in out]), px[ids])


def test_predict_ray_cli_equals_the_runner(ray_local: Any, case: dict[str, Any],
                                           tmp_path: Path) -> None:
    data = tmp_path / "images.npz"
    np.savez(data, x=case["pixels"][:, 0])
    out = tmp_path / "pred.npz"
    t = ",".join(repr(v) for v in case["t"])
    res = CliRunner().invoke(main, ["predict", str(case["bundle"].path), "--data", str(data),
                                    "--thresholds", t, "--ray", "--ray-workers", "1",
                                    "--batch-size", "40", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "rows processed per stage" in res.output
    got, ref, ok = np.load(out), case["ref"], ~case["near"]
    np.testing.assert_array_equal(got["labels"][ok], ref.labels[ok])  # input order kept
    np.testing.assert_array_equal(got["exit_stage"][ok], ref.exit_stage[ok])
