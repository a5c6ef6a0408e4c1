"""The layers point one way (import-linter contracts in pyproject.toml): cli > serve > bench >
calibrate | train > convert > gating > zoo > runtime > data > core; no import cycles
between sibling packages or modules (imports inside functions included); core, runtime,
data and serve never import torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept() -> None:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is missing: pip install -e '.[dev]'"
    proc = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "BROKEN" not in proc.stdout and "Contracts: 3 kept, 0 broken" in proc.stdout
