"""The proxy guard without Ray: the inner ASGI app stands in for Serve's proxy (the
guard is under test). A pass that ends with no response (the replica died) is sent once
more, then answered 503 JSON with Retry-After; the proxy's plain-text errors become
JSON; a body slower than the deadline gets 408 and never reaches the inner app. The
split-stages retry of a stage call: once on replica loss, then 503."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from dgconvert.serve.ingress import GuardOptions, IngressGuard
from dgconvert.serve.protocol import ProtocolError

SCOPE = {"type": "http", "method": "POST", "path": "/v2/models/m/infer", "headers": []}


def _run(guard: IngressGuard, chunks: list[tuple[bytes, float]]) -> tuple[int, dict, Any]:
    """Send ``chunks`` (body part, delay before it) through ``guard``; status, headers,
    JSON body."""
    sent: list[dict[str, Any]] = []
    parts = list(chunks)

    async def receive() -> dict[str, Any]:
        if not parts:
            await asyncio.sleep(3600)  # the client waits for its answer
        body, delay = parts.pop(0)
        await asyncio.sleep(delay)
        return {"type": "http.request", "body": body, "more_body": bool(parts)}

    async def send(m: dict[str, Any]) -> None:
        sent.append(m)

    asyncio.run(guard(dict(SCOPE), receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, json.loads(body)


class Inner:
    """A stand-in for Serve's proxy: ``script`` says what each pass does."""

    def __init__(self, *script: str) -> None:
        self.script = list(script)
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        m = await receive()
        self.bodies.append(m["body"])
        what = self.script.pop(0)
        if what == "dies":  # the replica died: Serve returns without a response
            return
        if what == "raises":
            raise RuntimeError("ActorDiedError: the actor died unexpectedly")
        status, ctype, body = {
            "ok": (200, b"application/json", b'{"outputs": []}'),
            "plain408": (408, b"text/plain", b"Request 1 timed out after 5s."),
            "plain500": (500, b"text/plain; charset=utf-8", b"Internal Server Error"),
            "json500": (500, b"application/json", b'{"error": "internal error: bug"}'),
        }[what]
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype)]})
        await send({"type": "http.response.body", "body": body})


@pytest.mark.parametrize("first", ["dies", "raises", "plain500"])
def test_a_lost_replica_is_retried_once_with_the_same_body(first: str) -> None:
    inner = Inner(first, "ok")
    status, headers, obj = _run(IngressGuard(inner), [(b'{"in', 0), (b'puts": []}', 0)])
    assert status == 200 and obj == {"outputs": []} and headers["x-dgconvert-retried"] == "1"
    assert inner.bodies == [b'{"inputs": []}'] * 2


def test_two_lost_replicas_answer_503_json_with_retry_after() -> None:
    status, headers, obj = _run(IngressGuard(Inner("dies", "raises")), [(b"{}", 0)])
    assert status == 503 and headers["retry-after"] == "1"
    assert "retried" in obj["error"] and "Retry after 1 s" in obj["error"]


def test_the_proxys_plain_text_errors_become_json_and_real_bugs_pass() -> None:
    status, _, obj = _run(IngressGuard(Inner("plain408")), [(b"{}", 0)])
    assert status == 408 and "timed out" in obj["error"]
    status, _, obj = _run(IngressGuard(Inner("json500")), [(b"{}", 0)])
    assert status == 500 and obj["error"] == "internal error: bug"  # not retried, not hidden


def test_a_slow_body_gets_408_and_never_reaches_a_replica() -> None:
    inner = Inner("ok")
    guard = IngressGuard(inner, GuardOptions(body_timeout_s=0.2, header_timeout_s=1))
    status, headers, obj = _run(guard, [(b"{", 0), (b"}", 5)])
    assert status == 408 and headers["connection"] == "close"
    assert "--body-timeout" in obj["error"] and inner.bodies == []


def test_an_oversized_body_is_refused_before_a_replica() -> None:
    inner = Inner("ok")
    guard = IngressGuard(inner, GuardOptions(max_body=10))
    status, _, obj = _run(guard, [(b"x" * 8, 0), (b"x" * 8, 0)])
    assert status == 400 and "exceeds 10 bytes" in obj["error"] and inner.bodies == []


def test_split_stage_calls_retry_once_then_503() -> None:
    pytest.importorskip("ray")
    from ray.exceptions import ActorDiedError

    from dgconvert.serve.faults import RetryingHandle

    class Handle:
        def __init__(self, fails: int) -> None:
            self.fails, self.calls = fails, 0
            self.run = self

        async def remote(self, x: int) -> int:
            self.calls += 1
            if self.calls <= self.fails:
                raise ActorDiedError()
            return 2 * x

    h = Handle(1)
    assert asyncio.run(RetryingHandle(h, "stage 0").run.remote(4)) == 8 and h.calls == 2
    with pytest.raises(ProtocolError, match="stage 1 serving this request stopped") as e:
        asyncio.run(RetryingHandle(Handle(2), "stage 1").run.remote(4))
    assert e.value.status == 503 and e.value.retry_after == 1


def test_once_the_drain_file_exists_new_requests_get_503(tmp_path: Any) -> None:
    flag = tmp_path / "draining"
    inner = Inner("ok", "ok")
    guard = IngressGuard(inner, GuardOptions(drain_file=str(flag)))
    assert _run(guard, [(b"{}", 0)])[0] == 200
    flag.touch()
    status, headers, obj = _run(guard, [(b"{}", 0)])
    assert status == 503 and headers["retry-after"] == "1" and "stopping" in obj["error"]
    assert len(inner.bodies) == 1
