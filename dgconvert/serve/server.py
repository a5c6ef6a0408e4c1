"""The Open Inference Protocol endpoints of one model, independent of the transport (no
Ray import): :meth:`OIPServer.handle` maps ``(method, path, headers, body)`` to a
:class:`Reply`. The Ray Serve deployments (``app.py``, ``split.py``) wrap it.

Endpoints: ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2`` (server
metadata), ``GET /v2/models/{name}[/versions/{v}]`` (model metadata), ``.../ready``,
``POST .../infer``, ``GET .../stats`` (rows and exits per stage since start) and
``GET|POST /v2/repository/index``.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from dgconvert.core.errors import DGConvertError, InputError
from dgconvert.core.exits import GatedResult
from dgconvert.core.version import __version__
from dgconvert.serve.protocol import (
    HEADER_LENGTH,
    JSON_TYPE,
    ModelSpec,
    ProtocolError,
    encode_infer_response,
    parse_infer_request,
)

log = logging.getLogger(__name__)

Infer = Callable[[np.ndarray], Awaitable[GatedResult]]


@dataclass
class Reply:
    """An HTTP reply: status, headers, body."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": JSON_TYPE})


class Metrics(Protocol):
    """Where a server reports what it served (Ray's metrics in ``app.py``)."""

    def request_done(self, rows: int, stage_rows: list[int], exits: list[int],
                     latency_ms: float) -> None: ...

    def request_failed(self, status: int) -> None: ...

    def in_flight(self, rows: int) -> None: ...


def _json(status: int, obj: Any) -> Reply:
    return Reply(status, json.dumps(obj).encode())


def error_reply(status: int, message: str, retry_after: int | None = None) -> Reply:
    """The OIP error body ``{"error": message}`` (with ``Retry-After`` when given)."""
    reply = _json(status, {"error": message})
    if retry_after is not None:
        reply.headers["retry-after"] = str(retry_after)
    return reply


def body_limit(input_shape: tuple[int, ...], max_rows: int) -> int:
    """The default bytes per request body: ``max_rows`` float32 images and 1 MiB."""
    return max_rows * int(np.prod(input_shape)) * 4 + (1 << 20)


def stage_rows(result: GatedResult, num_stages: int) -> list[int]:
    """Rows each stage processed for a result: those that reached it."""
    exits = result.exit_histogram(num_stages)
    return [int(v) for v in np.cumsum(exits[::-1])[::-1]]


class OIPServer:
    """The OIP endpoints of one model; ``infer(images)`` runs it (uint8 or float32 images).

    ``full``: the model runs ungated (rows and exits are then counted at the last stage).
    ``max_rows``: images per request; ``max_body``: bytes per request body. ``runtime``:
    how the model runs (the backend's ``describe()``), shown by ``.../stats``.
    """

    def __init__(self, spec: ModelSpec, infer: Infer, *, max_rows: int = 1024,
                 max_body: int | None = None, full: bool = False,
                 metrics: Metrics | None = None, runtime: str | None = None) -> None:
        self.spec = spec
        self.runtime = runtime
        self.infer = infer
        self.max_rows = max_rows
        self.max_body = max_body or body_limit(spec.input_shape, max_rows)
        self.full = full
        self.metrics = metrics
        self.rows_per_stage = [0] * spec.num_stages
        self.exits_per_stage = [0] * spec.num_stages
        self.requests = self.failures = 0
        self._in_flight = 0

    # -- routing ---------------------------------------------------------------------------
    async def handle(self, method: str, path: str, headers: Mapping[str, str],
                     body: bytes) -> Reply:
        """Answer one HTTP request (never raises: errors become 4xx/5xx replies)."""
        try:
            reply = await self._route(method.upper(), path, headers, body)
        except ProtocolError as exc:
            reply = error_reply(exc.status, str(exc), exc.retry_after)
        except (InputError, DGConvertError) as exc:
            reply = error_reply(400, str(exc))
        except Exception as exc:  # noqa: BLE001 - the server keeps serving
            log.exception("serve: %s %s failed", method, path)
            reply = error_reply(500, f"internal error: {type(exc).__name__}: {exc}")
        if reply.status >= 400:
            self.failures += 1
            if self.metrics is not None:
                self.metrics.request_failed(reply.status)
        return reply

    async def _route(self, method: str, path: str, headers: Mapping[str, str],
                     body: bytes) -> Reply:
        parts = [p for p in path.split("/") if p]
        if not parts or parts[0] != "v2":
            raise ProtocolError(f"no endpoint {path!r}; this server speaks the Open Inference "
                                "Protocol under /v2 (e.g. /v2/health/ready, "
                                f"/v2/models/{self.spec.name}/infer)", status=404)
        rest = parts[1:]
        if not rest:
            self._method(method, path, "GET")
            return _json(200, {"name": "dgconvert", "version": __version__,
                               "extensions": ["binary_tensor_data", "model_repository"]})
        if rest[0] == "health" and len(rest) == 2 and rest[1] in ("live", "ready"):
            self._method(method, path, "GET")
            return _json(200, {rest[1]: True})
        if rest == ["repository", "index"]:
            self._method(method, path, "GET", "POST")
            return _json(200, [self.spec.index_entry()])
        if rest[0] == "models" and len(rest) >= 2:
            self._model(rest[1])
            tail = rest[2:]
            if len(tail) >= 2 and tail[0] == "versions":
                if tail[1] != self.spec.version:
                    raise ProtocolError(f"model {self.spec.name!r} has no version {tail[1]!r}; "
                                        f"it serves version {self.spec.version!r}", status=404)
                tail = tail[2:]
            if not tail:
                self._method(method, path, "GET")
                return _json(200, self.spec.metadata())
            if tail == ["ready"]:
                self._method(method, path, "GET")
                return _json(200, {"name": self.spec.name, "ready": True})
            if tail == ["stats"]:
                self._method(method, path, "GET")
                return _json(200, self.stats())
            if tail == ["infer"]:
                self._method(method, path, "POST")
                return await self._infer(headers, body)
        raise ProtocolError(f"no endpoint {method} {path!r}; expected /v2/health/live|ready, "
                            f"/v2/repository/index or /v2/models/{self.spec.name}"
                            "[/ready|/infer|/stats]", status=404)

    @staticmethod
    def _method(method: str, path: str, *allowed: str) -> None:
        if method not in allowed:
            raise ProtocolError(f"{method} {path}: this endpoint takes {' or '.join(allowed)}",
                                status=405)

    def _model(self, name: str) -> None:
        if name != self.spec.name:
            raise ProtocolError(f"unknown model {name!r}; this server serves "
                                f"{self.spec.name!r} (see /v2/repository/index)", status=404)

    def stats(self) -> dict[str, Any]:
        """Requests, rows and exits per stage since the server started."""
        return {"model_stats": [{
            "name": self.spec.name, "version": self.spec.version,
            "inference_count": sum(self.exits_per_stage), "requests": self.requests,
            "failures": self.failures, "full": self.full,
            "rows_per_stage": list(self.rows_per_stage),
            "exits_per_stage": list(self.exits_per_stage),
            **({"runtime": self.runtime} if self.runtime else {}),
        }]}

    # -- inference ---------------------------------------------------------------------------
    async def _infer(self, headers: Mapping[str, str], body: bytes) -> Reply:
        t0 = time.perf_counter()
        if len(body) > self.max_body:
            raise ProtocolError(f"the request body has {len(body)} bytes; this server takes at "
                                f"most {self.max_body}. Fix: split the batch")
        body = _decode(body, _header(headers, "content-encoding"), self.max_body)
        per = int(np.prod(self.spec.input_shape))
        req = parse_infer_request(body, _header(headers, HEADER_LENGTH),
                                  max_elements=self.max_rows * per)
        images = self.spec.images(req, self.max_rows)
        self.spec.check_outputs(req)
        n = len(images)
        self._in_flight += n
        if self.metrics is not None:
            self.metrics.in_flight(self._in_flight)
        try:
            result = await self.infer(images)
        finally:
            self._in_flight -= n
        outs = self.spec.outputs(req, result)
        payload, out_headers = encode_infer_response(
            self.spec.name, self.spec.version, outs,
            {name: req.wants_binary(name) for name, _ in outs}, req.id)
        self._count(result, n, 1e3 * (time.perf_counter() - t0))
        return Reply(200, payload, out_headers)

    def _count(self, result: GatedResult, n: int, latency_ms: float) -> None:
        k = self.spec.num_stages
        exits = [int(v) for v in result.exit_histogram(k)] if n else [0] * k
        rows = [0] * (k - 1) + [n] if self.full else stage_rows(result, k) if n else [0] * k
        self.requests += 1
        for i in range(k):
            self.rows_per_stage[i] += rows[i]
            self.exits_per_stage[i] += exits[i]
        if self.metrics is not None:
            self.metrics.in_flight(self._in_flight)
            self.metrics.request_done(n, rows, exits, latency_ms)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        value = headers.get(name.lower())
    return value


def _decode(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body after its Content-Encoding (gzip, deflate), at most ``limit`` bytes."""
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise ProtocolError(f"Content-Encoding {encoding!r} is not supported; expected gzip, "
                            "deflate or none")
    try:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ProtocolError(f"the body is not valid {encoding} ({exc}); expected "
                            "Content-Encoding to match the body") from None
    if len(out) > limit:
        raise ProtocolError(f"the decompressed body exceeds {limit} bytes; this server takes "
                            "at most that. Fix: split the batch")
    return out
