"""The exit rule lives in one place, :class:`dgconvert.core.exits.ExitRule`: its semantics
(off gates, NaN and infinite scores, the vectorised rule, rows reaching each stage) and a
scan of the package source for any other module comparing a score to a threshold."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from dgconvert.core.errors import InputError
from dgconvert.core.exits import ExitRule

PACKAGE = Path(__file__).resolve().parents[2] / "dgconvert"
OWNER = PACKAGE / "core" / "exits.py"
_ORDER = (ast.GtE, ast.Gt, ast.Lt, ast.LtE)


def _names(node: ast.AST) -> set[str]:
    """Identifiers an operand reads (not through calls: ``len(thresholds)`` is a count)."""
    out: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id.lower())
        elif isinstance(n, ast.Attribute):
            out.add(n.attr.lower())
    return out


def threshold_comparisons(source: str) -> list[str]:
    """Ordering comparisons in ``source`` that read a threshold (a name with ``thresh`` or
    ``exit_at``), or a score against a bare ``t`` / ``t[k]``."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Compare) and any(isinstance(o, _ORDER) for o in node.ops)):
            continue
        sides = [_names(s) for s in (node.left, *node.comparators) if not isinstance(s, ast.Call)]
        reads_threshold = any("thresh" in x or "exit_at" in x for n in sides for x in n)
        score_vs_t = (any("score" in x for n in sides for x in n)
                      and any("t" in n and n <= {"t", "k"} for n in sides))
        if reads_threshold or score_vs_t:
            hits.append(f"line {node.lineno}: {ast.unparse(node)}")
    return hits


def test_the_scan_finds_what_it_looks_for() -> None:
    assert threshold_comparisons("exits = out.score >= t[k - 1]")
    assert threshold_comparisons("cont = ~(s >= self.exit_at[self.k])")
    assert threshold_comparisons("ok = scores < thresholds")
    assert threshold_comparisons("hit = scores[:, k] >= t")
    assert not threshold_comparisons("ok = len(thresholds) < k")
    assert not threshold_comparisons("ok = rank <= idx")


def test_no_module_but_core_exits_compares_a_score_to_a_threshold() -> None:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path != OWNER and (hits := threshold_comparisons(path.read_text())):
            found[str(path.relative_to(PACKAGE.parent))] = hits
    assert not found, (f"score/threshold comparisons outside dgconvert/core/exits.py: {found}; "
                       "use ExitRule (exits / split / points) instead")


def test_off_gates_nan_and_infinite_scores() -> None:
    rule = ExitRule.from_thresholds([np.inf, 0.5, -np.inf])
    assert rule.off == frozenset({0}) and not rule.never_exits and rule.num_gates == 3
    s = np.array([np.inf, np.nan, 0.5, 0.4999, -np.inf], np.float32)
    assert rule.exits(0, s).tolist() == [False] * 5  # off: even +inf never exits
    assert rule.exits(1, s).tolist() == [True, False, True, False, False]  # ties exit
    assert rule.exits(2, s).tolist() == [True, False, True, True, True]  # NaN never exits
    assert bool(rule.exits(1, np.float32(0.7))) and not rule.exits(0, np.float32(np.inf))
    assert not rule.exits(2, np.float32(np.nan))
    assert rule.thresholds == (np.inf, 0.5, -np.inf)
    assert np.isnan(rule.exit_at[0]) and rule.exit_at.dtype == np.float32
    assert not rule.exit_at.flags.writeable
    assert ExitRule.from_thresholds([np.inf, np.inf]).never_exits
    assert ExitRule.from_thresholds([]).never_exits


def test_split_gives_the_exit_mask_and_the_next_keep() -> None:
    rule = ExitRule.from_thresholds([0.5])
    exits, keep = rule.split(0, np.array([0.9, 0.1, np.nan, 0.5], np.float32))
    assert exits.tolist() == [True, False, False, True]
    assert keep.tolist() == [1, 2] and keep.dtype == np.int64
    exits, keep = rule.split(0, np.zeros(0, np.float32))
    assert exits.shape == keep.shape == (0,)


def test_points_is_the_first_gate_that_exits() -> None:
    rule = ExitRule.from_thresholds([np.inf, 1.0, 0.0])
    scores = np.array([[np.inf, 0.0, -1.0],  # off gate, then none: final stage
                       [9.0, 1.0, 5.0],  # the tie at gate 1 exits
                       [9.0, np.nan, 0.0],  # NaN at gate 1, exits at 2
                       [np.nan, np.nan, np.nan]], np.float32)
    assert rule.points(scores).tolist() == [3, 1, 2, 3]
    assert rule.points(scores).dtype == np.int64
    # the vectorised rule and the per-gate one agree sample by sample
    rng = np.random.default_rng(0)
    s = rng.standard_normal((200, 3)).astype(np.float32)
    s[rng.random(s.shape) < 0.1] = np.nan
    walked = np.full(len(s), 3)
    for k in reversed(range(3)):
        walked[rule.exits(k, s[:, k])] = k
    np.testing.assert_array_equal(rule.points(s), walked)


def test_nan_thresholds_are_refused() -> None:
    with pytest.raises(InputError, match="NaN; use inf to disable a gate"):
        ExitRule.from_thresholds([1.0, np.nan])


def test_precision_follows_dtype() -> None:
    s = np.array([[0.1 - 1e-10]])  # just below 0.1, but the same float32 number as 0.1
    assert ExitRule.from_thresholds([0.1]).points(s.astype(np.float32)).tolist() == [0]
    assert ExitRule.from_thresholds([0.1], np.float64).points(s).tolist() == [1]


def test_of_accepts_a_rule_or_thresholds() -> None:
    rule = ExitRule.from_thresholds([1.0])
    assert ExitRule.of(rule) is rule
    assert ExitRule.of(np.array([np.inf], np.float32)).never_exits


@pytest.mark.parametrize("exits", [[5, 3, 0, 2], [0, 0, 7], [1], []])
def test_reach_counts(exits: list[int]) -> None:
    reach = ExitRule.reach(np.asarray(exits, np.int64))
    assert reach.tolist() == [sum(exits[k:]) for k in range(len(exits))]
    if exits:  # the first stage sees everything; each exit leaves once
        assert reach[0] == sum(exits)
        assert (reach - np.append(reach[1:], 0)).tolist() == exits


def test_reach_shares() -> None:
    f = [0.5, 0.25, 0.125, 0.125]
    np.testing.assert_allclose(ExitRule.reach(f, total=1.0), [1.0, 0.5, 0.25, 0.125])
    np.testing.assert_allclose(ExitRule.reach(f), [1.0, 0.5, 0.25, 0.125])
