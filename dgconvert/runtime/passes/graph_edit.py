"""Small edits of ONNX graphs shared by the graph passes."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
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


def attr(node: Any, name: str, default: Any = None) -> Any:
    """The value of ``node``'s attribute ``name``, or ``default`` when it has none."""
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def reads(node: Any) -> Iterator[str]:
    """The value names ``node`` reads, those of its subgraphs included."""
    yield from (v for v in node.input if v)
    for g in _subgraphs(node):
        for sub in g.node:
            yield from reads(sub)


def live_nodes(nodes: Sequence[Any], outputs: Sequence[str]) -> tuple[list[Any], set[str]]:
    """The nodes (in their order) that ``outputs`` depend on, and every name they read."""
    producer = {o: nd for nd in nodes for o in nd.output}
    todo, seen, used = list(outputs), set(), set()
    while todo:
        nd = producer.get(todo.pop())
        if nd is None or id(nd) in seen:
            continue
        seen.add(id(nd))
        names = list(reads(nd))
        used.update(names)
        todo.extend(names)
    return [nd for nd in nodes if id(nd) in seen], used


def _subgraphs(node: Any) -> Iterator[Any]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def prefix_names(graph: Any, prefix: str, keep: Collection[str] = ()) -> None:
    """Prefix every value, initializer and node name defined in ``graph`` and its subgraphs
    with ``prefix`` (in place), except the names in ``keep`` (values read from outside)."""
    names: dict[str, str] = {}

    def collect(g: Any) -> None:
        for v in (*g.input, *g.initializer, *g.value_info):
            names[v.name] = prefix + v.name
        for nd in g.node:
            names.update((o, prefix + o) for o in nd.output if o)
            for sub in _subgraphs(nd):
                collect(sub)

    def rename(g: Any) -> None:
        for v in (*g.input, *g.output, *g.initializer, *g.value_info):
            v.name = names.get(v.name, v.name)
        for nd in g.node:
            nd.input[:] = [names.get(v, v) for v in nd.input]
            nd.output[:] = [names.get(v, v) for v in nd.output]
            if nd.name:
                nd.name = prefix + nd.name
            for sub in _subgraphs(nd):
                rename(sub)

    collect(graph)
    for name in keep:
        names.pop(name, None)
    rename(graph)


def model_of(graph: Any, models: Sequence[Any], opsets: dict[str, int] | None = None) -> Any:
    """An ``onnx.ModelProto`` of ``graph`` composed from ``models``: their highest IR
    version and, per domain, their highest opset (at least ``opsets``)."""
    from onnx import helper

    versions = dict(opsets or {})
    for m in models:
        for o in m.opset_import:
            versions[o.domain] = max(versions.get(o.domain, 0), o.version)
    return helper.make_model(
        graph, ir_version=max(m.ir_version for m in models),
        opset_imports=[helper.make_opsetid(d, v) for d, v in versions.items()])
