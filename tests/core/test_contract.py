"""The stage-graph contract is spelled out once: every graph-handling module takes the
names from dgconvert.core.contract, and exported graphs carry exactly those names."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest

from dgconvert.core.contract import CONTRACT

PACKAGE = Path(__file__).resolve().parents[2] / "dgconvert"
NAMES = {CONTRACT.images, CONTRACT.x, CONTRACT.keep, CONTRACT.features, CONTRACT.score,
         CONTRACT.label, CONTRACT.logits, CONTRACT.gate_logits}
# the layers that build, rewrite and run stage graphs
GRAPH_LAYERS = ("runtime", "convert")


# constants that spell a contract name by coincidence, by the name they are assigned to
COINCIDENCES = {"_DIM_SEP"}  # ModelOpt's "NxCxHxW" dimension separator


def _literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    allowed = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
               and any(isinstance(t, ast.Name) and t.id in COINCIDENCES for t in node.targets)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in NAMES
            and id(n) not in allowed]


@pytest.mark.parametrize("layer", GRAPH_LAYERS)
def test_io_names_are_not_retyped(layer: str) -> None:
    found = [f"{p.relative_to(PACKAGE.parent)}:{line}: {value!r}"
             for p in sorted((PACKAGE / layer).rglob("*.py")) for line, value in _literals(p)]
    assert not found, "use dgconvert.core.contract.CONTRACT instead of:\n" + "\n".join(found)


def test_contract_describes_every_stage() -> None:
    io = [CONTRACT.stage(k, 4) for k in range(4)]
    assert io[0].inputs == ("images",) and io[2].inputs == ("x", "keep")
    assert io[0].outputs == ("features", "score", "label", "gate_logits")
    assert io[3].outputs == ("logits", "label", "score") and io[3].last
    assert io[1].fetched == ("features", "score", "label") and io[3].fetched == ("score", "label")
    with pytest.raises(IndexError):
        CONTRACT.stage(4, 4)


def test_exported_graphs_follow_the_contract(exported_bundle: Callable[..., Any]) -> None:
    bundle = exported_bundle("resnet").bundle
    n = bundle.num_stages
    for k in range(n):
        g = onnx.load(str(bundle.stage_file(k))).graph
        assert tuple(i.name for i in g.input) == CONTRACT.inputs(k)
        assert tuple(o.name for o in g.output) == CONTRACT.outputs(k, n)
        info = bundle.manifest.stages[k]
        assert tuple(t.name for t in info.outputs) == CONTRACT.outputs(k, n)
        if k:  # stage k >= 1 gathers its rows of x first: x feeds nothing but that Gather
            users = [nd for nd in g.node if CONTRACT.x in nd.input]
            assert [nd.op_type for nd in users] == ["Gather"] and users[0].input[0] == CONTRACT.x
