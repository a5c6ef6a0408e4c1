"""GatedPool: survivors of many requests re-batched between stages; results equal
GatedRunner.predict sample by sample; every request completes under concurrency; close()
with pending requests; backpressure."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import wait
from typing import Any

import numpy as np
import pytest

from dgconvert.core.exits import exit_points
from dgconvert.runtime import GatedPool, GatedRunner, PoolClosedError, PoolFullError


@pytest.fixture(scope="module")
def setup(exported_bundle: Callable[..., Any]) -> dict[str, Any]:
    b = exported_bundle("resnet").bundle
    pixels = np.random.default_rng(3).integers(0, 256, (240, 1, 28, 28), dtype=np.uint8)
    rec = GatedRunner(b, backend="onnxruntime", compose=False).collect(pixels)
    t = [float(np.quantile(rec.scores[:, k], 0.55)) for k in range(rec.num_gates)]
    ref = GatedRunner(b, backend="onnxruntime", thresholds=t).predict(pixels)
    near = (np.abs(rec.scores - np.asarray(t, np.float32)) < 1e-4).any(axis=1)
    return {"bundle": b, "pixels": pixels, "t": t, "ref": ref, "near": near, "rec": rec}


def _check(setup: dict[str, Any], rows: np.ndarray, res: Any) -> None:
    ok = ~setup["near"][rows]  # float noise of another batch composition cannot flip these
    np.testing.assert_array_equal(res.labels[ok], setup["ref"].labels[rows][ok])
    np.testing.assert_array_equal(res.exit_stage[ok], setup["ref"].exit_stage[rows][ok])


@pytest.mark.parametrize("options", [{}, {"compose": False, "fuse_boundaries": False}])
def test_many_small_requests_equal_the_runner(setup: dict[str, Any], options: dict) -> None:
    px = setup["pixels"]
    with GatedPool(setup["bundle"], max_batch=32, max_delay_ms=5, backend="onnxruntime",
                   thresholds=setup["t"], **options) as pool:
        sizes = np.random.default_rng(0).integers(1, 9, size=60)
        starts = np.concatenate([[0], np.cumsum(sizes)])[:-1] % len(px)
        reqs = [(np.arange(s, s + n) % len(px)) for s, n in zip(starts, sizes, strict=True)]
        futures = [pool.submit(px[r]) for r in reqs]
        for r, f in zip(reqs, futures, strict=True):
            _check(setup, r, f.result(timeout=60))
        total = int(sizes.sum())
        stage_rows = pool.stats
        batches = pool.batch_sizes
        head, at = pool.batch_sizes_since(0)
        tail, again = pool.batch_sizes_since(at - 3)
    assert head == batches and at == len(batches) and sum(batches) == sum(stage_rows)
    assert tail == batches[-3:] and again == at  # an incremental reader gets only what is new
    assert stage_rows[0] == total
    # re-batching: stages ran on batches made of several requests' rows
    assert max(batches) > max(sizes)
    assert stage_rows[1:] == sorted(stage_rows[1:], reverse=True)


def test_client_threads_all_complete(setup: dict[str, Any]) -> None:
    px = setup["pixels"]
    errors: list[BaseException] = []
    with GatedPool(setup["bundle"], max_batch=16, max_delay_ms=1, backend="onnxruntime",
                   thresholds=setup["t"]) as pool:
        def client(seed: int) -> None:
            rng = np.random.default_rng(seed)
            try:
                for _ in range(25):
                    rows = rng.choice(len(px), size=int(rng.integers(1, 4)), replace=False)
                    _check(setup, rows, pool.predict(px[rows], timeout=60))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
    assert not errors and not any(th.is_alive() for th in threads)


def test_an_idle_pool_does_not_hold_a_lone_request_for_the_delay(
        setup: dict[str, Any]) -> None:
    """With nothing else queued the worker runs a request at once (the delay is a minute);
    with ``wait_when_idle`` it waits for the delay, and close() then finishes it."""
    px = setup["pixels"]
    with GatedPool(setup["bundle"], max_batch=64, max_delay_ms=60_000, backend="onnxruntime",
                   thresholds=setup["t"]) as pool:
        for i in (0, 3, 7):
            _check(setup, np.arange(i, i + 3), pool.predict(px[i:i + 3], timeout=30))
    pool = GatedPool(setup["bundle"], max_batch=64, max_delay_ms=60_000, wait_when_idle=True,
                     backend="onnxruntime", thresholds=setup["t"])
    fut = pool.submit(px[:3])
    time.sleep(0.5)
    assert not fut.done()
    pool.close()
    _check(setup, np.arange(3), fut.result(timeout=0))


def test_close_finishes_pending_requests(setup: dict[str, Any]) -> None:
    px = setup["pixels"]
    pool = GatedPool(setup["bundle"], max_batch=64, max_delay_ms=10_000, wait_when_idle=True,
                     backend="onnxruntime", thresholds=setup["t"])
    futures = [pool.submit(px[i:i + 3]) for i in range(0, 30, 3)]  # below max_batch: waiting
    pool.close()
    assert all(f.done() for f in futures)
    for i, f in zip(range(0, 30, 3), futures, strict=True):
        _check(setup, np.arange(i, i + 3), f.result())
    with pytest.raises(PoolClosedError, match="closed"):
        pool.submit(px[:1])


def test_close_with_cancel_fails_pending_requests_clearly(setup: dict[str, Any]) -> None:
    px = setup["pixels"]
    pool = GatedPool(setup["bundle"], max_batch=64, max_delay_ms=10_000, wait_when_idle=True,
                     backend="onnxruntime", thresholds=setup["t"])
    futures = [pool.submit(px[i:i + 2]) for i in range(0, 10, 2)]
    pool.close(cancel=True)
    done, not_done = wait(futures, timeout=30)
    assert not not_done
    for f in futures:
        with pytest.raises(PoolClosedError, match="cancel=True"):
            f.result()


def test_backpressure(setup: dict[str, Any]) -> None:
    px = setup["pixels"]
    pool = GatedPool(setup["bundle"], max_batch=64, max_delay_ms=10_000, wait_when_idle=True,
                     max_pending=8, backend="onnxruntime", thresholds=setup["t"])
    try:
        pool.submit(px[:6])
        t0 = time.monotonic()
        with pytest.raises(PoolFullError, match="max_pending 8"):
            pool.submit(px[6:10], timeout=0.2)
        assert time.monotonic() - t0 >= 0.2
        with pytest.raises(ValueError, match="exceeds the pool's max_pending"):
            pool.submit(px[:9])
    finally:
        pool.close()


def test_full_mode_batches_the_ungated_model(setup: dict[str, Any]) -> None:
    px = setup["pixels"]
    with GatedPool(setup["bundle"], max_batch=32, max_delay_ms=2, full=True,
                   backend="onnxruntime") as pool:
        futures = [pool.submit(px[i:i + 4]) for i in range(0, 40, 4)]
        res = [f.result(timeout=60) for f in futures]
        assert pool.stats[0] == 40
    rec = setup["rec"]
    for i, r in zip(range(0, 40, 4), res, strict=True):
        np.testing.assert_array_equal(r.labels, rec.final_labels[i:i + 4])
        assert (r.exit_stage == setup["bundle"].num_gates).all()


def test_empty_and_bad_requests(setup: dict[str, Any]) -> None:
    from dgconvert.core.errors import InputError

    with GatedPool(setup["bundle"], backend="onnxruntime") as pool:
        assert len(pool.predict(np.zeros((0, 1, 28, 28), np.uint8))) == 0
        with pytest.raises(InputError, match="expected \\[N, 1, 28, 28\\]"):
            pool.submit(np.zeros((2, 3, 28, 28), np.uint8))


def test_exit_thresholds_off_gate_is_nan(setup: dict[str, Any]) -> None:
    r = GatedRunner(setup["bundle"], backend="onnxruntime", thresholds=[np.inf, 1.0, -np.inf])
    t = r.exit_thresholds
    assert np.isnan(t[0]) and t[1] == 1.0 and t[2] == -np.inf
    scores = np.array([[np.inf, 0.0, 0.0]], np.float32)
    assert exit_points(scores, np.asarray(r.thresholds, np.float32)).tolist() == [2]
