"""Typed errors. Every error dgconvert raises on bad input subclasses :class:`DGConvertError`
and says what it received, what it expected, and how to fix it."""

from __future__ import annotations


class DGConvertError(Exception):
    """Base class of all dgconvert errors."""


class InputError(DGConvertError, ValueError):
    """Images handed to the runtime do not fit the bundle (shape, dtype, NaN/Inf, batch)."""


class BundleError(DGConvertError, ValueError):
    """A bundle is missing, corrupt, or from an incompatible version."""


class CheckpointError(DGConvertError, ValueError):
    """A checkpoint cannot be loaded safely or does not describe a network."""


class GateKindError(DGConvertError, ValueError):
    """A gate kind or score kind is unknown, or not one the asked-for use supports."""


class CutError(DGConvertError, ValueError):
    """A backbone cannot be cut where asked (unknown module, multi-tensor cut, order)."""


class BackendUnavailableError(DGConvertError, RuntimeError):
    """A requested backend (TensorRT, CUDA, onnxruntime-gpu) is not installed or usable."""


class BackendOptionError(BackendUnavailableError, ValueError):
    """A backend option has a value the backend does not know."""


class ExportVerificationError(DGConvertError, AssertionError):
    """Exported graphs disagree with the PyTorch reference; lists every mismatch."""

    def __init__(self, mismatches: list[str]) -> None:
        self.mismatches = list(mismatches)
        lines = "\n  ".join(self.mismatches)
        super().__init__(
            f"{len(self.mismatches)} mismatch(es) between the exported ONNX stages and "
            f"PyTorch:\n  {lines}\nFix: check the model for ops whose ONNX export differs "
            "(e.g. training-mode BatchNorm/Dropout: call model.eval()), or loosen --atol/--rtol "
            "if the differences are float noise."
        )


class DataError(DGConvertError, ValueError):
    """A data set spec cannot be resolved, or its files are missing, corrupt or inconsistent."""


class CalibrationError(DGConvertError, ValueError):
    """Calibration inputs do not fit together, or the asked-for target cannot be met."""


class BenchError(DGConvertError, ValueError):
    """A benchmark cannot run as configured (batch sizes, data, model, systems)."""
