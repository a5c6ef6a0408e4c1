"""How the backends' self-checks judge a rewritten graph against the plain one: equal up to
what float reassociation produces, relative to the scale of the output."""

from __future__ import annotations

import numpy as np

#: Largest difference accepted, relative to the output's largest magnitude (at least 1).
#: Reordered float32 sums differ by ~1e-6 of that scale; a wrong rewrite by ~1.
SCALE_TOLERANCE = 1e-4


def close_to_reference(reference: np.ndarray, got: np.ndarray, name: str = "output") -> str:
    """``""`` when ``got`` equals ``reference`` up to float noise, else what differs.

    Integer outputs (labels) must be equal; float outputs may differ by
    ``SCALE_TOLERANCE * max(1, max |reference|)`` per element.
    """
    reference, got = np.asarray(reference), np.asarray(got)
    if reference.shape != got.shape:
        return f"has shape {got.shape}, expected {reference.shape}"
    if reference.size == 0:
        return ""
    if reference.dtype.kind in "iub":
        bad = int(np.count_nonzero(reference != got))
        return f"differs in {bad} of {reference.size} values" if bad else ""
    ref = reference.astype(np.float64)
    with np.errstate(invalid="ignore"):  # inf - inf where both are inf: checked below
        diff = np.abs(got.astype(np.float64) - ref)
    finite = np.isfinite(ref)
    if not np.array_equal(finite, np.isfinite(got)) or not np.array_equal(
            ref[~finite], got[~finite].astype(np.float64), equal_nan=True):
        return "differs in its non-finite values"
    scale = max(1.0, float(np.abs(ref[finite]).max(initial=0.0)))
    worst = float(diff[finite].max(initial=0.0))
    if worst > SCALE_TOLERANCE * scale:
        return (f"differs by up to {worst:.3g} (allowed {SCALE_TOLERANCE:g} x scale {scale:.3g} "
                f"of {name})")
    return ""
