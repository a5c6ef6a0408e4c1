"""The benchmark plumbing (arithmetic, results, JSON, table, plot, CLI) on a tiny bundle,
and the runtime speed work it measures (fused boundaries, the batch-1 path). No timings
are asserted: only what must hold whatever the machine's speed."""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dgconvert as dg
from dgconvert.bench import BenchConfig, BenchError, run_benchmark
from dgconvert.bench.measurements import FULL_DEFAULT, Measurements
from dgconvert.bench.memory import PeakMemory
from dgconvert.bench.report import build_results, prefix_ideal_seconds, render_paper_table
from dgconvert.bench.stats import (
    cost_share_flops,
    cost_share_time,
    efficiency,
    histogram_from_rows,
    ideal_time,
    paired_ratios,
    rows_from_histogram,
    summarize,
)
from dgconvert.bench.systems import System
from dgconvert.core.bundle import Bundle
from dgconvert.core.errors import DGConvertError, InputError
from dgconvert.core.exits import GatedResult
from dgconvert.core.manifest import (
    FullInfo,
    GateInfo,
    InputInfo,
    Manifest,
    StageInfo,
    ThresholdInfo,
)
from dgconvert.core.preprocess import prepare_images
from dgconvert.runtime import GatedRunner
from dgconvert.runtime.onnxruntime_backend import BlockedFeatures, OnnxRuntimeBackend

RESULT_KEYS = {"system", "batch_size", "ms_per_image", "images_per_s", "accuracy", "efficiency"}


# -- arithmetic ------------------------------------------------------------------------------
def test_summarize_known_values() -> None:
    s = summarize([4.0, 1.0, 3.0, 2.0, 10.0])
    assert (s.median, s.min, s.max, s.n) == (3.0, 1.0, 10.0, 5)
    assert (s.q1, s.q3) == (2.0, 4.0)
    assert s.relative == pytest.approx((10 - 1) / (2 * 3))
    assert s.scaled(2.0).median == 6.0 and s.scaled(2.0).n == 5
    with pytest.raises(BenchError, match="--repeats"):
        summarize([])


def test_histograms_and_rows_round_trip() -> None:
    assert rows_from_histogram([5, 3, 0, 2]) == [10, 5, 2, 2]
    assert histogram_from_rows([10, 5, 2, 2]) == [5, 3, 0, 2]
    with pytest.raises(BenchError, match="non-increasing"):
        histogram_from_rows([4, 6, 1])


def test_cost_shares_efficiency_on_known_inputs() -> None:
    # 2 samples exit at 10 FLOPs, 1 at 20, 1 at 40 (the full model costs 40)
    assert cost_share_flops([2, 1, 1], [10, 20, 40], 40) == pytest.approx(80 / 160)
    # 4 rows reach stage 0 (1 s/image alone), 2 reach stage 1 (2 s), 1 reaches stage 2 (3 s)
    assert cost_share_time([4, 2, 1], [1.0, 2.0, 3.0]) == pytest.approx((4 + 4 + 3) / (4 * 6))
    assert cost_share_time([4, 4, 4], [1.0, 2.0, 3.0]) == pytest.approx(1.0)  # nobody exits
    assert ideal_time(10.0, 0.5) == 5.0
    assert efficiency(10.0, 0.5, 6.0) == pytest.approx(5 / 6)
    assert efficiency(10.0, 0.5, 5.0) == pytest.approx(1.0)
    r = paired_ratios([10.0, 20.0, 30.0], [5.0, 5.0, 10.0])
    assert (r.median, r.min, r.max) == (3.0, 2.0, 4.0)
    with pytest.raises(BenchError):
        cost_share_flops([1, 1], [10, 20, 40], 40)
    with pytest.raises(BenchError):
        cost_share_time([2, 1], [1.0])
    with pytest.raises(DGConvertError):
        efficiency(1.0, 1.0, 0.0)


# -- results from synthetic measurements ---------------------------------------------------
class _Fake(System):
    def __init__(self, id: str, kind: str, framework: str, reference: str | None) -> None:
        self.id, self.label, self.kind = id, id, kind
        self.framework, self.reference = framework, reference
        self.thresholds = [0.5, math.inf] if kind == "gated" else None

    def predict(self, images: np.ndarray) -> GatedResult:  # pragma: no cover - not called
        raise AssertionError


def _fake_bundle(tmp_path: Path) -> Bundle:
    stages = [StageInfo(k, f"stage{k}.onnx", [], [], f,
                        None if k == 2 else GateInfo("dgate", "max", 0))
              for k, f in enumerate([10, 10, 20])]
    return Bundle(tmp_path, Manifest(InputInfo("images", [None, 1, 2, 2]), 2, stages,
                                     FullInfo("full.onnx", 40), ThresholdInfo([0.5, 0.5])))


def test_prefix_ideal_arithmetic() -> None:
    """Each image pays its prefix: 2 exit at 0 (1 ms), 1 at 1 (2 ms), 1 at the end (4 ms)."""
    m = Measurements()
    m.images = {"prefixes": {4: 4}}
    m.prefix_seconds = {4: [[0.004, 0.008, 0.016], [0.008, 0.016, 0.032]]}  # 1/2/4, 2/4/8 ms
    ideal = prefix_ideal_seconds(m, 4, [4, 2, 1])
    assert ideal == pytest.approx([2 * 0.001 + 0.002 + 0.004, 2 * 0.002 + 0.004 + 0.008])
    assert prefix_ideal_seconds(m, 8, [8, 8, 8]) is None  # no prefixes timed at that size


def test_build_results_arithmetic(tmp_path: Path) -> None:
    b = _fake_bundle(tmp_path)  # exit costs 10, 20, 40
    systems = [_Fake("full", "full", "onnx", None), _Fake("gated", "gated", "onnx", "full"),
               _Fake("torch-full", "full", "torch", None),
               _Fake("torch-masked", "gated", "torch", "torch-full")]
    n = 4
    m = Measurements()
    m.seconds = {"full": {n: [0.8, 0.4, 0.4]}, "gated": {n: [0.2, 0.4, 0.2]},
                 "torch-full": {n: [1.0, 1.0, 1.0]}, "torch-masked": {n: [2.0, 2.0, 2.0]}}
    m.images = {s: {n: n} for s in [*m.seconds, "stages"]}
    m.rows = {"full": {n: [4, 4, 4]}, "gated": {n: [4, 2, 1]}, "torch-full": {n: [4, 4, 4]},
              "torch-masked": {n: [4, 4, 4]}}
    m.stage_seconds = {n: [[0.004, 0.004, 0.008]] * 3}  # 1, 1, 2 ms/image alone
    exits = np.array([0, 0, 1, 2])  # 2 exit at gate 0, 1 at gate 1, 1 at the end
    no_scores = np.full(4, np.nan, np.float32)
    full = GatedResult(np.array([0, 1, 1, 0]), np.full(4, 2), no_scores)
    gated = GatedResult(np.array([0, 1, 0, 0]), exits, no_scores)
    preds = {"full": full, "gated": gated, "torch-full": full, "torch-masked": gated}
    labels = np.array([0, 1, 1, 1])
    res = {r.system: r for r in build_results(b, systems, m, preds, labels)}
    g = res["gated"]
    assert g.accuracy == 0.5 and res["full"].accuracy == 0.75
    assert g.exit_histogram == [2, 1, 1] and g.rows_per_stage == [4, 2, 1]
    assert g.cost_share_flops == pytest.approx((2 * 10 + 20 + 40) / (4 * 40))
    share_t = (4 * 1 + 2 * 1 + 1 * 2) / (4 * 4)
    assert g.cost_share_time == pytest.approx(share_t)
    assert g.ms.median == pytest.approx(0.2 / 4 * 1e3)
    assert g.images_per_s == pytest.approx(4 / 0.2)
    assert g.ideal_ms_per_image == pytest.approx(0.4 / 4 * 1e3 * share_t)
    # paired per repeat: (0.8, 0.4, 0.4) * share / (0.2, 0.4, 0.2)
    assert g.efficiency.median == pytest.approx(np.median(np.array([4.0, 1.0, 2.0]) * share_t))
    assert g.speedup.median == pytest.approx(2.0) and g.speedup.max == pytest.approx(4.0)
    assert g.gflops_per_image == pytest.approx(80 / 4 / 1e9)
    assert res["full"].efficiency is None and res["full"].speedup is None
    tm = res["torch-masked"]  # masked: pays every stage whatever the exits
    assert tm.gflops_per_image == pytest.approx(40 / 1e9) and tm.speedup.median == 0.5
    assert tm.efficiency.median == pytest.approx(1.0 * share_t / 2.0)
    row = g.to_dict()
    assert RESULT_KEYS <= set(row) and row["efficiency"] == g.efficiency.median
    assert row["thresholds"] == [0.5, None]  # JSON has no inf
    table = render_paper_table(list(res.values())[:2])
    assert "| original (full model) |" in table and "(0.5, inf)" in table and "-50.0 %" in table
    default = dataclasses.replace(res["full"], system=FULL_DEFAULT)  # the other full model
    assert "| full model, default ONNX Runtime session |" in render_paper_table([default])


# -- the harness end to end on a tiny bundle ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory,
         exported_bundle: Callable[..., Any]) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("bench")
    e = exported_bundle("resnet")
    net, bundle = e.net, e.bundle
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(40, 1, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=40).astype(np.int64)
    rec = GatedRunner(bundle, backend="onnxruntime").collect(pixels)
    # thresholds at which samples leave at every exit
    t = [float(np.quantile(rec.scores[:, k], 0.6)) for k in range(rec.scores.shape[1])]
    ckpt = dg.save(net, root / "tiny.pt")
    return {"net": net, "bundle": bundle, "pixels": pixels, "labels": labels, "t": t,
            "ckpt": ckpt, "root": root}


def test_run_benchmark_report(tiny: dict[str, Any], tmp_path: Path) -> None:
    cfg = BenchConfig(batch_sizes=[4, 1, 64], repeats=2, warmup=0, samples=8, torch_samples=4,
                      progress=False)
    rep = run_benchmark(tiny["bundle"], tiny["pixels"], tiny["labels"], config=cfg,
                        backend="onnxruntime", threads=1, thresholds=tiny["t"],
                        model=tiny["net"], data_name="random")
    assert rep.skipped_batch_sizes == [64] and rep.batch_sizes == [1, 4]
    systems = ["full", "gated", "full-default", "gated-shared", "torch-full", "torch-masked"]
    assert [(r.system, r.batch_size) for r in rep.results] == [
        (s, b) for b in (1, 4) for s in systems]
    d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))  # strict JSON
    assert d["format"] == "dgconvert-bench" and d["schema_version"] == 1
    assert all(RESULT_KEYS <= set(r) for r in d["results"])
    by = {(r["system"], r["batch_size"]): r for r in d["results"]}
    ref = GatedRunner(tiny["bundle"], backend="onnxruntime", thresholds=tiny["t"]).predict(
        tiny["pixels"])
    gated = by[("gated", 4)]
    assert gated["exit_histogram"] == np.bincount(ref.exit_stage, minlength=4).tolist()
    assert all(c > 0 for c in gated["exit_histogram"])  # every exit used
    assert gated["accuracy"] == pytest.approx(float((ref.labels == tiny["labels"]).mean()))
    assert by[("torch-masked", 4)]["exit_histogram"] == gated["exit_histogram"]
    assert by[("torch-masked", 4)]["accuracy"] == gated["accuracy"]
    assert gated["rows_per_stage"] == rows_from_histogram(
        np.bincount(ref.exit_stage[:8], minlength=4))
    assert by[("torch-full", 1)]["images"] == 4 and gated["images"] == 8
    # the shared-pool runner in its own process: same exits, rows and accuracy; its memory
    # is not this process's, so none is reported
    shared = by[("gated-shared", 4)]
    for key in ("exit_histogram", "accuracy", "rows_per_stage", "images"):
        assert shared[key] == gated[key], key
    assert shared["peak_rss_mb"] is None and shared["speedup_vs_default_session"] > 0
    for r in d["results"]:
        assert r["ms_per_image"] > 0 and r["images_per_s"] == pytest.approx(
            r["images"] / (r["images"] * r["ms_per_image"] / 1e3), rel=0.5)
        if r["kind"] == "gated":
            assert 0 < r["cost_share_flops"] < 1 and r["efficiency"] > 0
            assert r["ideal_ms_per_image"] == pytest.approx(
                by[(r["reference"], r["batch_size"])]["ms_per_image"] * r["cost_share_time"])
        else:
            assert r["efficiency"] is None and r["exit_histogram"][-1] == 40
    assert [s["batch_size"] for s in d["stages"]] == [1, 4]
    assert all(len(s["stage_ms_per_image"]) == 4 for s in d["stages"])
    # the physical limit: prefixes grow with the exit point, the last one is the full model
    for s in d["stages"]:
        pre = s["prefix_ms_per_image"]
        assert len(pre) == 4 and all(v > 0 for v in pre)
    assert gated["ideal_prefix_ms_per_image"] > 0 and gated["efficiency_prefix"] > 0
    assert gated["speedup_vs_default_session"] > 0
    assert d["machine"]["usable_cores"] >= 1 and "onnxruntime" in d["machine"]["libraries"]
    md = rep.markdown()
    assert md.count("| gated |") == 2 and "### batch size 4" in md and "efficiency" in md
    png = rep.plot(tmp_path / "out" / "bench.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_benchmark_operating_points_and_errors(tiny: dict[str, Any]) -> None:
    cfg = BenchConfig(batch_sizes=[8], repeats=1, warmup=0, samples=16, progress=False)
    rep = run_benchmark(tiny["bundle"], tiny["pixels"], tiny["labels"], config=cfg,
                        backend="onnxruntime", operating_points={"none": [math.inf] * 3})
    none = rep.result("gated[none]", 8)
    assert none.exit_histogram == [0, 0, 0, 40] and none.cost_share_flops > 1.0  # gates cost
    assert "| gated[none] | (inf, inf, inf) |" in rep.paper_table(8)
    with pytest.raises(BenchError, match="at least one full batch"):
        run_benchmark(tiny["bundle"], tiny["pixels"], config=BenchConfig(
            batch_sizes=[64], samples=16, progress=False), backend="onnxruntime")
    with pytest.raises(BenchError, match="one per image"):
        run_benchmark(tiny["bundle"], tiny["pixels"], tiny["labels"][:3], config=cfg)
    with pytest.raises(BenchError, match="repeats"):
        BenchConfig(repeats=0).check(10)


def test_cli_bench_writes_json_and_plot(tiny: dict[str, Any]) -> None:
    from dgconvert.cli import main

    root = tiny["root"]
    npz = root / "data.npz"
    np.savez(npz, x=tiny["pixels"][:, 0], y=tiny["labels"])
    threads_before = torch.get_num_threads()
    other = "1" if threads_before != 1 else "2"  # the run uses another thread count
    out = CliRunner().invoke(main, [
        "bench", str(tiny["bundle"].path), "--data", str(npz), "--batch-size", "2,8",
        "--backend", "onnxruntime", "--threads", other, "--repeats", "1", "--warmup", "0",
        "--samples", "8", "--model", str(tiny["ckpt"]), "--torch-samples", "2",
        "--json", str(root / "b.json"), "--plot", str(root / "b.png"), "--no-progress"])
    assert out.exit_code == 0, out.output
    assert torch.get_num_threads() == threads_before  # the process-wide setting is put back
    assert "| torch-masked |" in out.output and "### batch size 8" in out.output
    d = json.loads((root / "b.json").read_text())
    assert {r["system"] for r in d["results"]} == {"full", "gated", "full-default", "torch-full",
                                                   "torch-masked", "gated-shared"}
    assert (root / "b.png").read_bytes()[:4] == b"\x89PNG"
    bad = CliRunner().invoke(main, ["bench", str(tiny["bundle"].path), "--data", str(npz),
                                    "--batch-size", "0", "--no-torch"])
    assert bad.exit_code != 0 and "positive integers" in bad.output
    big = CliRunner().invoke(main, ["bench", str(tiny["bundle"].path), "--data", str(npz),
                                    "--batch-size", "64", "--no-torch", "--no-progress"])
    assert big.exit_code != 0 and "at least one full batch" in big.output


def test_cli_bench_staging_overhead(tiny: dict[str, Any]) -> None:
    """--staging-overhead adds the runner with every gate off: every row reaches the last
    stage, accuracy equals the full model's, and its speed-up is reported like any row;
    --spinning sets the backend's thread spinning."""
    from dgconvert.cli import main

    root = tiny["root"]
    npz = root / "data2.npz"
    np.savez(npz, x=tiny["pixels"][:, 0], y=tiny["labels"])
    out = CliRunner().invoke(main, [
        "bench", str(tiny["bundle"].path), "--data", str(npz), "--batch-size", "4",
        "--backend", "onnxruntime", "--threads", "1", "--repeats", "1", "--warmup", "0",
        "--samples", "8", "--no-torch", "--staging-overhead", "--json", str(root / "s.json"),
        "--spinning", "run", "--no-shared-pool", "--no-progress"])
    assert out.exit_code == 0, out.output
    assert "gated[nobody exits]" in out.output
    assert "spinning within runs" in out.output  # --spinning reached every ORT session
    rows = {r["system"]: r for r in json.loads((root / "s.json").read_text())["results"]}
    assert set(rows) == {"full", "gated", "full-default", "gated[nobody exits]"}
    off = rows["gated[nobody exits]"]
    # nobody exits: the limit is the full model itself
    assert off["ideal_prefix_ms_per_image"] > 0
    k = tiny["bundle"].num_stages
    assert off["exit_histogram"][:k - 1] == [0] * (k - 1) and off["exit_histogram"][-1] > 0
    assert off["accuracy"] == rows["full"]["accuracy"]
    assert off["speedup"] > 0


def test_peak_memory_sees_an_allocation() -> None:
    mem = PeakMemory()
    before = mem.start()
    # 64 MiB of fresh anonymous pages, each touched (a numpy array may reuse memory the
    # allocator already holds resident from an earlier test: then RSS does not grow)
    block = mmap.mmap(-1, 64 * 2**20)
    block.write(b"\1" * len(block))
    peak = mem.peak()
    block.close()
    assert peak > 0
    if mem.method == "vmhwm-reset" and before is not None:
        assert peak - before >= 60 * 2**20


# -- the runtime speed work -------------------------------------------------------------------
def test_fused_boundaries_match_the_contract_graphs(tiny: dict[str, Any]) -> None:
    b, x = tiny["bundle"], tiny["pixels"]
    fused = OnnxRuntimeBackend(b, threads=1)
    plain = OnnxRuntimeBackend(b, threads=1, fuse_boundaries=False)
    assert "nchwc" in fused.describe() and "off" in plain.describe()
    pf = GatedRunner(b, backend=fused, thresholds=tiny["t"]).predict(x)
    pp = GatedRunner(b, backend=plain, thresholds=tiny["t"]).predict(x)
    np.testing.assert_array_equal(pf.labels, pp.labels)
    np.testing.assert_array_equal(pf.exit_stage, pp.exit_stage)
    np.testing.assert_allclose(pf.scores, pp.scores, rtol=1e-5, atol=1e-6)
    xf = prepare_images(x[:5], b.input_shape, b.normalization)
    o, q = fused.run_stage(0, xf, None), plain.run_stage(0, xf, None)
    keep = np.array([4, 4, 0], np.int64)  # repeated, unordered
    blocked = []
    for k in range(1, b.num_stages):
        assert isinstance(q.features, np.ndarray) and o.features.shape == q.features.shape
        np.testing.assert_allclose(np.asarray(o.features), q.features, rtol=1e-5, atol=1e-6)
        if isinstance(o.features, BlockedFeatures):  # fused boundary
            blocked.append(k - 1)
            np.testing.assert_allclose(o.features.to_host(), q.features, rtol=1e-5, atol=1e-6)
            mixed = fused.run_stage(k, q.features, keep)  # NCHW in: the contract graph runs
            np.testing.assert_allclose(mixed.score, plain.run_stage(k, q.features, keep).score,
                                       rtol=1e-5, atol=1e-6)
            with pytest.raises(InputError, match=f"features of stage {k - 1}"):
                fused.run_stage(k + 1 if k + 1 < b.num_stages else k - 1, o.features, keep)
        o, q = fused.run_stage(k, o.features, keep), plain.run_stage(k, q.features, keep)
        np.testing.assert_allclose(o.score, q.score, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(o.label, q.label)
        keep = np.array([2, 0, 1], np.int64)
    assert blocked and f"{len(blocked)} of {b.num_gates} boundaries" in fused.describe()
    with pytest.raises(DGConvertError, match="fuse_boundaries=True"):  # not the CPU EP alone
        OnnxRuntimeBackend(b, threads=1, fuse_boundaries=True,
                           providers=["CPUExecutionProvider", "CPUExecutionProvider"])


def test_batch_one_path_matches_batched_predictions(tiny: dict[str, Any]) -> None:
    r = GatedRunner(tiny["bundle"], backend="onnxruntime", thresholds=tiny["t"])
    x = tiny["pixels"]
    whole = r.predict(x)
    r.reset_stats()
    ones = [r.predict(x[i:i + 1]) for i in range(len(x))]
    np.testing.assert_array_equal(np.concatenate([o.labels for o in ones]), whole.labels)
    np.testing.assert_array_equal(np.concatenate([o.exit_stage for o in ones]),
                                  whole.exit_stage)
    np.testing.assert_array_equal(np.concatenate([o.scores for o in ones]), whole.scores)
    assert r.stats == rows_from_histogram(np.bincount(whole.exit_stage, minlength=4))
    # the uint8 fast path normalizes to the very same bits as prepare_images
    np.testing.assert_array_equal(r.prepare(x), prepare_images(
        x, r.bundle.input_shape, r.bundle.normalization))


def test_thread_pool_settings() -> None:
    from dgconvert.core.errors import BackendOptionError
    from dgconvert.runtime.onnxruntime_backend import session_options

    off, run, on = (session_options(1, s) for s in (False, "run", True))
    assert off.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert run.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert run.get_session_config_entry("session.force_spinning_stop") == "1"
    assert on.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert off.intra_op_num_threads == 1 and off.inter_op_num_threads == 1
    with pytest.raises(BackendOptionError, match="expected False, 'run' or True"):
        session_options(1, "always")


def test_cli_bench_tune_writes_the_path_choice(tiny: dict[str, Any], tmp_path: Path) -> None:
    """--tune measures the runtime paths and stores them in the manifest; the benchmark
    (and every later runner) uses the stored choice."""
    import shutil

    from dgconvert.cli import main
    from dgconvert.core.bundle import Bundle
    from dgconvert.runtime.paths import MANIFEST_KEY

    path = tmp_path / "m.dg"
    shutil.copytree(tiny["bundle"].path, path)
    npz = tmp_path / "d.npz"
    np.savez(npz, x=tiny["pixels"][:, 0], y=tiny["labels"])
    out = CliRunner().invoke(main, [
        "bench", str(path), "--data", str(npz), "--batch-size", "1,4", "--backend",
        "onnxruntime", "--threads", "1", "--repeats", "1", "--warmup", "0", "--samples", "8",
        "--no-torch", "--tune", "--no-progress"])
    assert out.exit_code == 0, out.output
    entry = Bundle.load(path).manifest.extra[MANIFEST_KEY]
    assert "tuned runtime paths, written to" in out.output
    assert f"chain from batch {entry['chain_min_batch']} (tuned: bench --tune, 1 threads" in \
        out.output
    assert GatedRunner(path, backend="onnxruntime").paths.chain_min_batch == \
        entry["chain_min_batch"]


def test_limit_takes_the_faster_spinning(tiny: dict[str, Any]) -> None:
    """Each prefix of the limit is timed with spinning on and off (and the backend's setting
    when that is neither), one prefix session on every batch before the next; the fastest
    counts."""
    from dgconvert.bench.systems import PrefixProbe

    r = GatedRunner(tiny["bundle"], backend="onnxruntime", threads=1, paths="default")
    probe = PrefixProbe(r, 1, False)
    assert probe.settings == [True, False] and PrefixProbe(r, 1, True).settings == [True, False]
    assert PrefixProbe(r, 1, "run").settings == [True, False, "run"]
    probe.reset()
    probe.run_all([tiny["pixels"][:4], tiny["pixels"][4:8]], settle_s=0.01)
    assert len(probe.seconds) == tiny["bundle"].num_stages
    for k, v in enumerate(probe.seconds):
        assert 0 < v == min(s[k] for s in probe._by_setting)


def test_shared_pool_system_equals_the_runner_sample_by_sample(tiny: dict[str, Any]) -> None:
    """The gated runner on a shared pool in its own process gives the in-process runner's
    labels, exits and scores, and counts the rows each stage ran in its timed pass."""
    from dgconvert.bench.shared_process import SharedPoolGated

    ref_runner = GatedRunner(tiny["bundle"], backend="onnxruntime", thresholds=tiny["t"])
    system = SharedPoolGated(str(tiny["bundle"].path), tiny["t"], threads=1, max_batch=64,
                             options={"threads": 1, "spinning": False})
    try:
        assert "one shared pool of 1 threads" in system.describe
        for n in (1, 3, 40):
            x = tiny["pixels"][:n]
            got, ref = system.predict(x), ref_runner.predict(x)
            np.testing.assert_array_equal(got.labels, ref.labels)
            np.testing.assert_array_equal(got.exit_stage, ref.exit_stage)
            np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-5, atol=1e-6)
        batches = [tiny["pixels"][i:i + 4] for i in range(0, 40, 4)]
        ref_runner.reset_stats()
        for xb in batches:
            ref_runner.predict(xb)
        system.reset_rows()
        assert system.timed_pass(batches) > 0
        assert system.rows_per_stage(40, 4) == ref_runner.stats
    finally:
        system.close()
    assert not system._proc.is_alive()
    with pytest.raises(BenchError, match="gated-shared process failed") as exc:
        SharedPoolGated(str(tiny["bundle"].path), [1.0], threads=1)  # 1 threshold for 3 gates
    assert "expected 3" in str(exc.value)
