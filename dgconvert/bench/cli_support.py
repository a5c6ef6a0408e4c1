"""Small decisions the ``bench`` command delegates here (kept out of the CLI module)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from dgconvert.core.bundle import Bundle, file_sha256


def pick_torch_model(bundle: Bundle, model: Path | None, no_torch: bool) -> tuple[Path | None, str]:
    """The checkpoint for the PyTorch systems and a note saying why (or why none)."""
    if no_torch:
        return None, ""
    has_torch = importlib.util.find_spec("torch") is not None
    if model is not None:
        return model, ""
    src = bundle.manifest.source.get("checkpoint")
    if not src:
        return None, ("note: no --model given and the bundle names no source checkpoint; "
                      "the PyTorch systems are skipped")
    path = bundle.path.parent / Path(src).name  # recorded by name, next to the bundle
    if not path.is_file():
        return None, (f"note: the bundle's source checkpoint {Path(src).name} is not next to "
                      "the bundle; PyTorch systems skipped (pass --model)")
    digest = bundle.manifest.source.get("checkpoint_sha256")
    if digest and file_sha256(path) != digest:
        return None, (f"note: {path} is not the checkpoint the bundle was exported from "
                      "(SHA-256 differs); PyTorch systems skipped (pass --model)")
    if not has_torch:
        return None, "note: PyTorch is not installed; the PyTorch systems are skipped"
    return path, f"note: PyTorch systems use the bundle's source checkpoint {path}"
