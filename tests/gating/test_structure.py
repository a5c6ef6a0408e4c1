"""Shape of the torch side: no function in ``dgconvert/gating`` is 80 lines or longer, and
no module reads the free-form ``meta`` dict of a network (``net.family`` / ``net.config``
/ ``net.fit_record`` are the typed record)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "dgconvert"
LIMIT = 80


def function_lengths(root: Path) -> list[tuple[int, str]]:
    """``(lines, "path:line name")`` of every function and method under ``root``."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                where = f"{path.relative_to(root.parent)}:{node.lineno} {node.name}"
                out.append((node.end_lineno - node.lineno + 1, where))  # type: ignore[operator]
    return sorted(out, reverse=True)


def test_largest_function_in_gating_is_under_80_lines() -> None:
    lengths = function_lengths(PACKAGE / "gating")
    assert lengths, "no functions found: wrong path?"
    too_long = [f"{where} ({n} lines)" for n, where in lengths if n >= LIMIT]
    assert not too_long, f"functions of {LIMIT}+ lines: {too_long}; split them"


def test_the_length_check_sees_long_functions(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT))
    (pkg / "m.py").write_text(f"def long():\n{body}\n\n\ndef short():\n    return 1\n")
    (n, where), (m, _) = function_lengths(pkg)
    assert n == LIMIT + 1 and where.endswith("long") and m == 2


def test_no_module_reads_a_networks_meta_dict() -> None:
    pattern = re.compile(r"\b(net|gnet|new|obj|self|n)\.meta\b(?!\s*\()")
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and "def meta" not in line:
                hits.append(f"{path.relative_to(PACKAGE.parent)}:{i}: {line.strip()}")
    # fx nodes have a .meta of their own (cut.py reads node stacks from it): not ours
    hits = [h for h in hits if "nn_module_stack" not in h]
    assert not hits, "read the typed record (family / config / fit_record):\n" + "\n".join(hits)
