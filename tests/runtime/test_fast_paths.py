"""Fast-path state is typed (:mod:`dgconvert.runtime.fast_paths`): what counts as "wanted
but off" is read from the state, and the visible texts are derived from it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dgconvert.runtime.base import Backend, StageOutput
from dgconvert.runtime.fast_paths import FastPath, PathState
from dgconvert.runtime.onnxruntime_backend import OnnxRuntimeBackend


def test_texts_are_derived_from_the_state() -> None:
    assert FastPath.on("chain", "one session").text == "one session"
    assert FastPath.by_choice("chain", "(compose=False)").text == "off (compose=False)"
    assert FastPath.by_choice("fused boundaries", "only for the CPU execution provider").text \
        == "off: only for the CPU execution provider"
    failed = FastPath.failed("chain", "ONNX Runtime refused the composed graph")
    assert failed.message == "chain off: ONNX Runtime refused the composed graph"
    assert failed.unwanted_off and not failed.is_on
    assert failed.named("fused boundaries").name == "fused boundaries"
    assert FastPath.by_choice("x").text == "off"


class _Paths(Backend):
    """A backend that only reports fast paths (the base class decides which are listed)."""

    name = "paths"

    def __init__(self, paths: list[FastPath]) -> None:
        self.paths = paths

    def run_stage(self, k: int, inputs: Any, keep: np.ndarray | None) -> StageOutput:
        raise NotImplementedError

    def run_full(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def fast_paths(self) -> list[FastPath]:
        return self.paths


def test_listed_by_state_whatever_the_words() -> None:
    """Words that used to mean "off on purpose" ("=False", "only for", "nothing to") no
    longer hide a failure, nor does a failure's wording make a choice look like one."""
    be = _Paths([FastPath.failed("chain", "x=False: nothing to do only for now"),
                 FastPath.by_choice("fused boundaries", "broke"),
                 FastPath.on("y", "on")])
    assert be.fast_paths_off() == ["chain off: x=False: nothing to do only for now"]


def test_onnxruntime_states(exported_bundle: Callable[..., Any]) -> None:
    bundle = exported_bundle("resnet").bundle
    be = OnnxRuntimeBackend(bundle, threads=1, compose=False, fuse_boundaries=False)
    states = {p.name: p.state for p in be.fast_paths()}
    assert states == {"fused boundaries": PathState.OFF_BY_CHOICE,
                      "chain": PathState.OFF_BY_CHOICE, "in-graph exits": PathState.OFF_BY_CHOICE}
    assert be.fast_paths_off() == []
    assert "fused boundaries off: disabled (fuse_boundaries=False); chain off (compose=False)" \
        in be.describe()
    on = OnnxRuntimeBackend(bundle, threads=1)
    assert [p.state for p in on.fast_paths()] == [PathState.ON] * 3
    assert on.composition == "one session" and on.fast_paths_off() == []
