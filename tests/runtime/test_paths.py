"""The path a batch takes by its size: the choice's rule, where it comes from (measured at
load, the bundle's tuned entry, the default), and that every path gives the same results."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dgconvert.core.errors import BundleError, DGConvertError
from dgconvert.runtime import GatedPool, GatedRunner
from dgconvert.runtime.paths import CHAIN, MANIFEST_KEY, MARGIN, SINGLE, STAGES, PathChoice


def test_choice_rule() -> None:
    c = PathChoice(single=True, chain_min_batch=4)
    assert [c.path(n, True, True) for n in (1, 2, 3, 4, 64)] == [SINGLE, STAGES, STAGES,
                                                                  CHAIN, CHAIN]
    assert c.path(1, False, True) == STAGES and c.path(8, True, False) == STAGES
    assert PathChoice(single=False, chain_min_batch=2).path(1, True, True) == STAGES


def test_manifest_entry() -> None:
    assert PathChoice.from_manifest({}, "m") is None
    c = PathChoice.from_manifest({MANIFEST_KEY: {"single": False, "chain_min_batch": 8,
                                                 "source": "bench --tune, 2 threads"}}, "m")
    assert (c.single, c.chain_min_batch) == (False, 8) and c.source.startswith("tuned")
    for bad in ({"single": 1, "chain_min_batch": 8}, {"single": True, "chain_min_batch": 1},
                [1, 2]):
        with pytest.raises(BundleError, match="bench MODEL.dg --tune"):
            PathChoice.from_manifest({MANIFEST_KEY: bad}, "m")


@pytest.fixture(scope="module")
def tiny(exported_bundle: Callable[..., Any]) -> Any:
    return exported_bundle("resnet")


def test_measured_at_load(tiny: Any) -> None:
    r = GatedRunner(tiny.bundle, backend="onnxruntime", threads=1)
    p = r.paths
    assert p.source == "measured at load" and r.stats == [0] * tiny.bundle.num_stages
    assert set(p.timings[SINGLE]) == {1} and 1 in p.timings[STAGES]
    assert p.single == (p.timings[SINGLE][1] <= p.timings[STAGES][1] * (1 + MARGIN))
    assert p.chain_min_batch in p.timings[CHAIN] or p.chain_min_batch == 32
    assert GatedRunner(tiny.bundle, backend="onnxruntime", compose=False).paths.source == \
        "default"  # nothing to choose from
    with pytest.raises(DGConvertError, match="paths='fast'"):
        GatedRunner(tiny.bundle, backend="onnxruntime", paths="fast")


def test_tuned_entry_is_read_and_every_path_agrees(tiny: Any, tmp_path: Path) -> None:
    from dgconvert.bench.tune import tune_paths

    bundle = tiny.copy_to(tmp_path)
    choice = tune_paths(bundle, tiny.pixels, "onnxruntime", {"threads": 1}, calls=3)
    assert bundle.manifest.extra[MANIFEST_KEY]["chain_min_batch"] == choice.chain_min_batch
    r = GatedRunner(bundle.path, backend="onnxruntime", threads=1)
    assert (r.paths.single, r.paths.chain_min_batch) == (choice.single, choice.chain_min_batch)
    assert r.paths.source.startswith("tuned: bench --tune, 1 threads")
    px = tiny.pixels[:24]
    rec = r.collect(px)
    r.thresholds = [float(v) for v in np.median(rec.scores, axis=0)]
    results = {}
    for name, p in (("stages", PathChoice(False, 10_000)), ("chain", PathChoice(False, 2)),
                    ("if+chain", PathChoice(True, 2))):
        r.paths = p
        results[name] = (r.predict(px), [r.predict(px[i:i + 1]) for i in range(4)])
    for name in ("chain", "if+chain"):
        for a, b in zip([results[name][0], *results[name][1]],
                        [results["stages"][0], *results["stages"][1]], strict=True):
            np.testing.assert_array_equal(a.labels, b.labels)
            np.testing.assert_array_equal(a.exit_stage, b.exit_stage)
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("paths", [PathChoice(True, 2), PathChoice(False, 10_000)])
def test_pool_takes_the_same_paths(tiny: Any, paths: PathChoice) -> None:
    """Stage-0 batches the runner would send down one call run in one call in the pool
    too (the stage batches it ran are still recorded per stage); results equal."""
    px = tiny.pixels[:20]
    ref = GatedRunner(tiny.bundle, backend="onnxruntime", compose=False).predict(px)
    with GatedPool(tiny.bundle, max_batch=8, max_delay_ms=50, backend="onnxruntime",
                   paths=paths) as pool:
        one = pool.predict(px[:1])
        many = pool.predict(px)
        assert sum(pool.batch_sizes) == sum(pool.stats)
    assert one.labels[0] == ref.labels[0] and one.exit_stage[0] == ref.exit_stage[0]
    np.testing.assert_array_equal(many.labels, ref.labels)
    np.testing.assert_array_equal(many.exit_stage, ref.exit_stage)


def _spins(session: Any) -> tuple[str, ...]:
    so = session.get_session_options()
    out = []
    for entry in ("session.intra_op.allow_spinning", "session.force_spinning_stop"):
        try:
            out.append(so.get_session_config_entry(entry))
        except RuntimeError:  # not set
            out.append("")
    return tuple(out)


def test_spinning_policy_per_path(tiny: Any) -> None:
    """By default the stage sessions do not spin; batch 1 and the chain share one session,
    which spins like a default session, as does the chain with every gate off; a one-call
    session that is not the only one (``full.onnx``; the chain without the If graph) spins
    within a run. ``spinning`` alone sets every session; ``alone_spinning`` the one-call
    sessions only; bad values are refused."""
    from dgconvert.runtime.onnxruntime_backend import OnnxRuntimeBackend, spinning_policy

    assert spinning_policy(None, None) == (False, "run")
    assert spinning_policy("run", None) == ("run", "run")
    assert spinning_policy(True, False) == (True, False)
    with pytest.raises(DGConvertError, match="not a thread-pool setting"):
        spinning_policy(None, "fast")
    on, run, off = ("1", ""), ("1", "1"), ("0", "")
    for kwargs, stages, one, full in (({}, off, on, run), ({"spinning": False}, off, off, off),
                                      ({"alone_spinning": True}, off, on, on),
                                      ({"alone_spinning": "run"}, off, run, run),
                                      ({"in_graph_exits": False}, off, run, run)):
        be = OnnxRuntimeBackend(tiny.bundle, threads=2, **kwargs)
        try:
            assert {_spins(s) for s in be.sessions} == {stages}, kwargs
            assert be.chain_session is not None
            merged = "in_graph_exits" not in kwargs
            assert be.one_session == merged, kwargs
            if merged:
                assert be.in_graph_exits.full.session is be.chain_session.session
            assert _spins(be.chain_session.session) == one, kwargs
            assert _spins(be.full_session) == full, kwargs
            # every gate off: the one session every call takes spins like a default one
            # unless an option was given
            every_off = be._chain_variant(frozenset(range(tiny.bundle.num_gates)))
            assert every_off.session is not be.chain_session.session
            want = on if not kwargs or "in_graph_exits" in kwargs else one
            assert _spins(every_off.session) == want, kwargs
            assert be.spins_after_run(True) == (want == on), kwargs
            assert be.spins_after_run(False) == (one == on), kwargs
            assert ("spinning off" in be.describe()) == (stages == off)
            assert ("in the chain's session" in be.describe()) == merged
        finally:
            be.close()
