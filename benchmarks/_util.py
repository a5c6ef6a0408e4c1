"""Helpers shared by the benchmark scripts: defaults, result files with the machine header."""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dgconvert.bench import describe_machine, machine_info
from dgconvert.bench.machine import load_average

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
DEFAULT_BUNDLE = Path("out/reference.dg")
DEFAULT_MODEL = Path("out/gated.pt")
CALIBRATION_DATA = "fashion-mnist:train[50000:]"  # neither the backbone nor the gates saw it
TEST_DATA = "fashion-mnist:test"


def header(title: str, extra: list[str] | None = None) -> str:
    """Markdown header: title, command line, machine, load."""
    info = machine_info()
    lines = [
        f"# {title}",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])}`",
        f"- machine: {describe_machine(info)}",
        f"- load average (1, 5, 15 min) when written: {load_average()} — other processes on "
        "the same cores slow every system; ratios are taken within each round of passes",
        *(f"- {e}" for e in (extra or [])),
        "",
    ]
    return "\n".join(lines)


def write_results(stem: str, markdown: str, data: dict[str, Any], out: Path = RESULTS) -> None:
    """``results/<stem>.md`` and ``results/<stem>.json`` (strict JSON)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(markdown.rstrip() + "\n", encoding="utf-8")
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n",
                                      encoding="utf-8")
    print(f"wrote {out / stem}.md and .json", file=sys.stderr)


def require(path: Path, what: str) -> Path:
    if not path.exists():
        sys.exit(f"{what} {path} not found; expected the output of `make demo` "
                 f"(or pass its path). Fix: run `make demo` first.")
    return path


def interleaved_rounds(fs: dict[str, Callable[[], object]], rounds: int,
                       burst: int = 1) -> dict[str, list[float]]:
    """µs per call of each function, one value per round: the functions take turns, ``burst``
    calls each per round, after ``burst`` warm-up calls each."""
    for f in fs.values():
        for _ in range(burst):
            f()
    out: dict[str, list[float]] = {name: [] for name in fs}
    clock = time.perf_counter
    for _ in range(rounds):
        for name, f in fs.items():
            t0 = clock()
            for _ in range(burst):
                f()
            out[name].append((clock() - t0) / burst * 1e6)
    return out
