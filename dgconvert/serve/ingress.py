"""The guard in front of every replica, run inside Ray Serve's HTTP proxy (uvicorn).

Ray Serve hands a request to a replica as soon as its headers arrive and the replica then
reads the body, so a slow upload holds one of the replica's ``max_ongoing_requests``
slots for as long as the client likes; and a replica that dies mid-request leaves the
proxy answering a plain-text ``500 Internal Server Error``. The guard, an ASGI middleware
of the proxy, fixes both before a replica is involved:

- the request head must arrive within ``header_timeout_s`` of the connection opening (or
  of the previous response on a kept-alive connection) and the body within
  ``body_timeout_s`` of the head, else ``408`` and the connection closes; the body is read
  here, in the proxy, so no replica slot waits on a client;
- a request that got no answer from Serve (its replica died) is sent once more — Serve
  routes it to a live replica — and answered ``503`` with ``Retry-After`` if that fails too;
- every other non-JSON error of the proxy (its own 404, 408, 503) is answered in the
  protocol's JSON ``{"error": …}``;
- once ``drain_file`` exists (``run_server`` creates it when it starts to stop), new
  requests get ``503`` with ``Retry-After`` while those in flight finish.

Ray Serve loads it through ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (its documented
hook for proxy middlewares; ``HTTPOptions.middlewares`` is removed), configured by the
environment variables of :func:`proxy_environment`, which must be set where the proxy
starts: :func:`dgconvert.serve.app.start_many` sets them before it starts a local Ray.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from dgconvert.serve.protocol import RETRY_AFTER_S

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

CALLBACK_VAR = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "dgconvert.serve.ingress.proxy_middlewares"
ENV_PREFIX = "DGCONVERT_SERVE_"
RETRIED_HEADER = b"x-dgconvert-retried"
DEFAULT_MAX_BODY = 64 << 20  # bytes, when no application's limit is known


@dataclass(frozen=True)
class GuardOptions:
    """The guard's limits (seconds, bytes; ``max_body`` None: the largest request body the
    served applications take, filled in by ``start_many``)."""

    body_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    max_body: int | None = None
    drain_file: str | None = None  # once this file exists, new requests get 503 (stopping)

    def __post_init__(self) -> None:
        if not (self.body_timeout_s > 0 and self.header_timeout_s > 0
                and (self.max_body is None or self.max_body > 0)):
            raise ValueError(f"body_timeout_s={self.body_timeout_s}, header_timeout_s="
                             f"{self.header_timeout_s}, max_body={self.max_body}; expected "
                             "each > 0")

    def environment(self) -> dict[str, str]:
        return {f"{ENV_PREFIX}BODY_TIMEOUT_S": repr(self.body_timeout_s),
                f"{ENV_PREFIX}HEADER_TIMEOUT_S": repr(self.header_timeout_s),
                f"{ENV_PREFIX}MAX_BODY": str(self.max_body or DEFAULT_MAX_BODY),
                f"{ENV_PREFIX}DRAIN_FILE": self.drain_file or ""}

    @classmethod
    def from_environment(cls, env: MutableMapping[str, str] | None = None) -> GuardOptions:
        env = os.environ if env is None else env
        d = cls()
        return cls(float(env.get(f"{ENV_PREFIX}BODY_TIMEOUT_S", d.body_timeout_s)),
                   float(env.get(f"{ENV_PREFIX}HEADER_TIMEOUT_S", d.header_timeout_s)),
                   int(env.get(f"{ENV_PREFIX}MAX_BODY", DEFAULT_MAX_BODY)),
                   env.get(f"{ENV_PREFIX}DRAIN_FILE") or None)


def proxy_environment(options: GuardOptions) -> dict[str, str]:
    """What the proxy's process needs in its environment to run the guard."""
    return {CALLBACK_VAR: CALLBACK, **options.environment()}


def guard_installed() -> bool:
    """Whether this process's environment (inherited by a local Ray) loads the guard."""
    return os.environ.get(CALLBACK_VAR) == CALLBACK


def proxy_middlewares() -> list[Any]:
    """Ray Serve's proxy callback: the guard as a starlette middleware, and the header
    deadline on uvicorn's connections (this runs in the proxy's process)."""
    from starlette.middleware import Middleware

    options = GuardOptions.from_environment()
    install_header_deadline(options.header_timeout_s)
    return [Middleware(IngressGuard, options=options)]


def _json_error(status: int, message: str, extra: dict[str, str] | None = None
                ) -> tuple[Message, Message]:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    return ({"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body, "more_body": False})


async def _send_error(send: Send, status: int, message: str,
                      extra: dict[str, str] | None = None) -> None:
    for m in _json_error(status, message, extra):
        await send(m)


class _BodyTooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body (raises on disconnect or past ``limit`` bytes)."""
    chunks, size = [], 0
    while True:
        m = await receive()
        if m["type"] == "http.disconnect":
            raise _Disconnected
        chunk = m.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
        if not m.get("more_body", False):
            return b"".join(chunks)


class IngressGuard:
    """ASGI middleware: body deadline, one retry on replica loss, JSON errors."""

    def __init__(self, app: App, options: GuardOptions | None = None) -> None:
        self.app = app
        self.options = options or GuardOptions()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        o = self.options
        if o.drain_file and os.path.exists(o.drain_file):
            await _send_error(send, 503, "the server is stopping (draining the requests in "
                              f"flight); retry after {RETRY_AFTER_S} s, on another instance",
                              {"retry-after": str(RETRY_AFTER_S), "connection": "close"})
            return
        limit = o.max_body or DEFAULT_MAX_BODY
        try:
            body = await asyncio.wait_for(read_body(receive, limit), o.body_timeout_s)
        except TimeoutError:
            await _send_error(send, 408, f"the request body did not arrive within "
                              f"{o.body_timeout_s:g} s (--body-timeout). Fix: send the body "
                              "at once, or raise --body-timeout", {"connection": "close"})
            return
        except _BodyTooLarge:
            await _send_error(send, 400, f"the request body exceeds {limit} bytes, the "
                              "most this server takes. Fix: split the batch into smaller "
                              "requests", {"connection": "close"})
            return
        except _Disconnected:
            return
        for attempt in (1, 2):
            outcome = await self._forward(scope, body, receive, send, retried=attempt == 2)
            if outcome.done or outcome.disconnected:
                return
            if outcome.status is not None and outcome.status != 500:
                await _send_error(send, outcome.status, _proxy_message(outcome),
                                  _retry_header(outcome.status))
                return
            if attempt == 2:
                await _send_error(send, 503, "the replica serving this request stopped and "
                                  "so did the one it was retried on; Ray Serve is replacing "
                                  f"them. Retry after {RETRY_AFTER_S} s",
                                  {"retry-after": str(RETRY_AFTER_S)})

    async def _forward(self, scope: Scope, body: bytes, receive: Receive, send: Send,
                       retried: bool = False) -> _Outcome:
        """One pass through Serve; non-JSON errors are held back, not sent. The answer
        to a retried pass carries ``x-dgconvert-retried: 1``."""
        out = _Outcome()
        given = False

        async def replay() -> Message:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            m = await receive()
            if m["type"] == "http.disconnect":
                out.disconnected = True
            return m

        async def watch(m: Message) -> None:
            if m["type"] == "http.response.start":
                headers = {k.lower(): v for k, v in m.get("headers", [])}
                ctype = headers.get(b"content-type", b"")
                if m["status"] >= 400 and not ctype.startswith(b"application/json"):
                    out.status, out.held = m["status"], []
                    return
                out.done = True
                if retried:
                    m = {**m, "headers": [*m.get("headers", []), (RETRIED_HEADER, b"1")]}
            if out.held is not None:
                out.held.append(bytes(m.get("body", b"")))
                return
            await send(m)

        copy = dict(scope)
        copy["headers"] = list(scope.get("headers", []))
        try:
            await self.app(copy, replay, watch)
        except Exception:  # noqa: BLE001 - Serve failed this pass: retried or answered 503
            if out.done:
                raise
        return out


@dataclass
class _Outcome:
    done: bool = False  # a response went to the client
    disconnected: bool = False
    status: int | None = None  # a held non-JSON error
    held: list[bytes] | None = None


def _proxy_message(outcome: _Outcome) -> str:
    text = b"".join(outcome.held or []).decode(errors="replace").strip()[:300]
    fix = {404: "Fix: see /v2/repository/index for the served models and their routes",
           408: "Fix: retry; raise the request timeout if the model needs longer",
           503: f"Fix: retry after {RETRY_AFTER_S} s, or serve more --replicas"}
    return f"{text or 'error'} ({fix.get(outcome.status or 0, 'from the Ray Serve proxy')})"


def _retry_header(status: int) -> dict[str, str] | None:
    return {"retry-after": str(RETRY_AFTER_S)} if status in (429, 503) else None


# -- the header deadline (uvicorn has none) -------------------------------------------------
def install_header_deadline(timeout_s: float) -> None:
    """Close connections whose request head does not arrive within ``timeout_s`` of the
    connection opening or of the previous response (408, then close), on uvicorn's
    httptools and h11 protocols. Idempotent."""
    from uvicorn.protocols.http import h11_impl

    protocols: list[type] = [h11_impl.H11Protocol]
    try:
        from uvicorn.protocols.http import httptools_impl

        protocols.append(httptools_impl.HttpToolsProtocol)
    except ImportError:  # httptools not installed: uvicorn uses h11
        pass
    for cls in protocols:
        _patch(cls, timeout_s)


def _patch(cls: type, timeout_s: float) -> None:
    """The deadline runs from the connection opening, and on a kept-alive connection from
    the first byte of the next head (uvicorn's keep-alive timeout bounds the idle time
    before it and is cancelled by that byte). A stalled partial head gets 408; a
    connection that never sent a byte is closed without one."""
    if getattr(cls, "_dgconvert_header_deadline", None) is not None:
        cls._dgconvert_header_deadline = timeout_s
        return
    cls._dgconvert_header_deadline = timeout_s
    made, received = cls.connection_made, cls.data_received

    def arm(self: Any, got_bytes: bool) -> None:
        seen = self._dg_heads = getattr(self, "_dg_heads", 0)
        self._dg_bytes = got_bytes

        def expire() -> None:
            self._dg_timer = None
            if self._dg_heads != seen or not _head_pending(self) or \
                    self.transport.is_closing():
                return
            if self._dg_bytes:
                start, end = _json_error(408, f"the request head did not arrive within "
                                         f"{cls._dgconvert_header_deadline:g} s "
                                         "(--header-timeout)", {"connection": "close"})
                head = [b"HTTP/1.1 408 Request Timeout\r\n"]
                head += [k + b": " + v + b"\r\n" for k, v in start["headers"]]
                self.transport.write(b"".join(head) + b"\r\n" + end["body"])
            self.transport.close()

        self._dg_timer = self.loop.call_later(cls._dgconvert_header_deadline, expire)

    def connection_made(self: Any, transport: Any) -> None:
        made(self, transport)
        arm(self, got_bytes=False)

    def data_received(self: Any, data: bytes) -> None:
        if getattr(self, "_dg_timer", None) is None:
            if _head_pending(self):  # the first byte of a head on a kept-alive connection
                arm(self, got_bytes=True)
        else:
            self._dg_bytes = True
        received(self, data)

    cls.connection_made = connection_made
    cls.data_received = data_received
    if hasattr(cls, "on_headers_complete"):  # httptools: count heads as they complete
        headers_complete = cls.on_headers_complete

        def on_headers_complete(self: Any) -> None:
            self._dg_heads = getattr(self, "_dg_heads", 0) + 1
            timer = getattr(self, "_dg_timer", None)
            if timer is not None:
                timer.cancel()
                self._dg_timer = None
            headers_complete(self)

        cls.on_headers_complete = on_headers_complete


def _head_pending(proto: Any) -> bool:
    """No request is being served on the connection (its head has not arrived)."""
    cycle = getattr(proto, "cycle", None)
    if cycle is not None and not cycle.response_complete:
        return False
    conn = getattr(proto, "conn", None)  # h11: the peer is still IDLE until a full head
    if conn is not None:
        import h11

        return conn.their_state in (h11.IDLE, h11.DONE)
    return True
