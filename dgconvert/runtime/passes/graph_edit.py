"""Small edits of ONNX graphs shared by the graph passes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any


def remove_gather(nodes: Any, x: str) -> str | None:
    """Remove the one ``Gather`` of ``x`` from ``nodes`` (a list or a graph's ``node``
    field, edited in place); its readers read ``x`` instead. Returns None, or why it could
    not."""
    gathers = [nd for nd in nodes if nd.op_type == "Gather" and nd.input[0] == x]
    if len(gathers) != 1:
        return f"{len(gathers)} Gather nodes read {x!r}; expected the contract's one"
    gathered = gathers[0].output[0]
    nodes.remove(gathers[0])
    for nd in nodes:
        nd.input[:] = [x if v == gathered else v for v in nd.input]
    return None


def _reads(node: Any) -> Iterator[str]:
    """The value names ``node`` reads, those of its subgraphs included."""
    yield from (v for v in node.input if v)
    for attr in node.attribute:
        for g in (attr.g, *attr.graphs):
            for sub in g.node:
                yield from _reads(sub)


def live_nodes(nodes: Sequence[Any], outputs: Sequence[str]) -> tuple[list[Any], set[str]]:
    """The nodes (in their order) that ``outputs`` depend on, and every name they read."""
    producer = {o: nd for nd in nodes for o in nd.output}
    todo, seen, used = list(outputs), set(), set()
    while todo:
        nd = producer.get(todo.pop())
        if nd is None or id(nd) in seen:
            continue
        seen.add(id(nd))
        reads = list(_reads(nd))
        used.update(reads)
        todo.extend(reads)
    return [nd for nd in nodes if id(nd) in seen], used
