"""Serving: a Ray Serve application speaking the Open Inference Protocol (v2, with the
binary tensor data extension), per-stage deployments (``--split-stages``) and a Ray Data
integration. ``ray`` is imported only when an application is built or a dataset is run;
:mod:`dgconvert.serve.protocol` and :mod:`dgconvert.serve.server` are pure Python + numpy.
"""

from __future__ import annotations

from dgconvert.serve.app import build_app, run_server, start
from dgconvert.serve.common import ServeOptions, ServeUnavailableError, model_name
from dgconvert.serve.protocol import ModelSpec, ProtocolError
from dgconvert.serve.server import OIPServer

__all__ = [
    "ModelSpec",
    "OIPServer",
    "ProtocolError",
    "ServeOptions",
    "ServeUnavailableError",
    "build_app",
    "model_name",
    "run_server",
    "start",
]
