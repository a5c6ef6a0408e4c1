"""Property tests of the transport-free handler: whatever headers and body a client
sends, the answer is a status from the protocol's table with a JSON body (``{"error": …}``
for every error) — never a 500, never an exception. Targeted strategies cover what once
answered 500: dimensions that wrap ``np.prod`` ([2**40, 2**40], [2**62, 4]), dimensions
past int64 (10**30), JSON nested far deeper than the parser's recursion limit."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgconvert.core.exits import GatedResult
from dgconvert.serve.protocol import HEADER_LENGTH, MAX_DEPTH, ModelSpec, json_depth
from dgconvert.serve.server import OIPServer

SPEC = ModelSpec("m", (1, 2, 2), num_stages=2)
ALLOWED = {200, 400, 404, 405, 503}
PATHS = ["/v2/models/m/infer", "/v2/models/m/versions/1/infer", "/v2/models/x/infer",
         "/v2", "/v2/health/ready", "/v2/models/m", "/nope", "/v2/models/m/stats"]


async def _model(images: np.ndarray) -> GatedResult:
    n = len(images)
    flat = images.reshape(n, -1).astype(np.float64)
    return GatedResult(np.argmax(flat, axis=1) if n else np.zeros(0, np.int64),
                       np.zeros(n, np.int64), np.ones(n, np.float32))


SERVER = OIPServer(SPEC, _model, max_rows=8)


def _answer(method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
    reply = asyncio.run(SERVER.handle(method, path, headers, body))
    assert reply.status in ALLOWED, (reply.status, reply.body[:300])
    if reply.headers.get("content-type") == "application/json":
        obj = json.loads(reply.body)
    else:  # binary outputs: the JSON header's length is given
        obj = json.loads(reply.body[:int(reply.headers[HEADER_LENGTH])])
    if reply.status >= 400:
        assert isinstance(obj, dict) and isinstance(obj.get("error"), str) and obj["error"]
    if reply.status == 503:
        assert reply.headers.get("retry-after", "").isdigit()
    return reply.status, obj


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=20)
dims = st.one_of(st.integers(-2, 6), st.sampled_from([2**31, 2**40, 2**62, 2**63, 2**64,
                                                      10**30]), st.just(True), st.floats())
header_values = st.one_of(st.none(), st.text(max_size=12), st.integers(-5, 10**6).map(str),
                          st.sampled_from(["1_0", " 3 ", "\u0661\u0662", "9" * 5000]))


@st.composite
def tensors(draw: Any) -> dict[str, Any]:
    t: dict[str, Any] = {
        "name": draw(st.sampled_from(["images", "x", 7, None])),
        "datatype": draw(st.sampled_from(["UINT8", "FP32", "INT64", "BYTES", "FP16", 3, None])),
        "shape": draw(st.one_of(st.lists(dims, max_size=5), json_values)),
    }
    kind = draw(st.sampled_from(["data", "binary", "none", "junk"]))
    if kind == "data":
        t["data"] = draw(st.one_of(
            st.lists(st.one_of(st.integers(-300, 300), st.floats(), st.just(10**30)),
                     max_size=12), json_values))
    elif kind == "binary":
        t["parameters"] = {"binary_data_size": draw(st.one_of(st.integers(-1, 64), dims,
                                                              json_values))}
    elif kind == "junk":
        t["parameters"] = draw(json_values)
    return t


@st.composite
def requests(draw: Any) -> tuple[dict[str, str], bytes]:
    obj: dict[str, Any] = {"inputs": draw(st.one_of(st.lists(tensors(), max_size=3),
                                                    json_values))}
    if draw(st.booleans()):
        obj["outputs"] = draw(st.one_of(
            st.lists(st.fixed_dictionaries({"name": st.sampled_from(["label", "score", "z"])},
                                           optional={"parameters": json_values}), max_size=3),
            json_values))
    if draw(st.booleans()):
        obj["parameters"] = draw(json_values)
    if draw(st.booleans()):
        obj["id"] = draw(json_values)
    head = json.dumps(obj).encode()
    tail = draw(st.binary(max_size=40))
    headers: dict[str, str] = {}
    length = draw(st.sampled_from(["exact", "random", "none"]))
    if length == "exact":
        headers[HEADER_LENGTH] = str(len(head))
    elif length == "random":
        value = draw(header_values)
        if value is not None:
            headers[HEADER_LENGTH] = value
    if draw(st.integers(0, 5)) == 0:
        headers["content-encoding"] = draw(st.sampled_from(["gzip", "deflate", "br", ""]))
    return headers, head + (tail if length != "none" else b"")


FUZZ = settings(max_examples=250, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(requests(), st.sampled_from(PATHS[:3]))
def test_structured_requests_never_get_a_500(req: tuple[dict[str, str], bytes],
                                             path: str) -> None:
    headers, body = req
    _answer("POST", path, headers, body)


@FUZZ
@given(st.sampled_from(["GET", "POST", "PUT", "get", ""]), st.sampled_from(PATHS),
       st.dictionaries(st.sampled_from([HEADER_LENGTH, "content-encoding", "x"]),
                       st.text(max_size=10), max_size=3),
       st.binary(max_size=200))
def test_arbitrary_bytes_never_get_a_500(method: str, path: str, headers: dict[str, str],
                                         body: bytes) -> None:
    _answer(method, path, headers, body)


def test_shapes_that_wrapped_np_prod_are_refused_with_400() -> None:
    url = "/v2/models/m/infer"
    for shape, extra in [([2**40, 2**40], {"parameters": {"binary_data_size": 0}}),
                         ([2**62, 4], {"data": []}), ([10**30], {"data": []}),
                         ([2**32, 2**32, 0, 1], {"data": []}), ([1] * 200, {"data": [1]})]:
        head = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8",
                                       "shape": shape, **extra}]}).encode()
        status, obj = _answer("POST", url, {HEADER_LENGTH: str(len(head))}, head)
        assert status == 400 and ("elements" in obj["error"] or "dimensions" in obj["error"]
                                  or "shape" in obj["error"]), obj


def test_deep_json_is_refused_with_400_naming_the_bound() -> None:
    for depth in (MAX_DEPTH + 1, 50_000, 100_000):
        body = b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}"
        status, obj = _answer("POST", "/v2/models/m/infer", {}, body)
        assert status == 400 and f"at most {MAX_DEPTH}" in obj["error"], obj
    ok = b'{"a": "' + b"[" * 1000 + b'", "b": [[1]]}'  # brackets in a string do not nest
    assert json_depth(ok) == 3


def test_a_valid_request_still_answers_200() -> None:
    body = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8",
                                   "shape": [2, 1, 2, 2], "data": [[0, 9, 1, 2],
                                                                   [5, 0, 0, 1]]}]}).encode()
    status, obj = _answer("POST", "/v2/models/m/infer", {}, body)
    assert status == 200
    assert {o["name"]: o["data"] for o in obj["outputs"]}["label"] == [1, 0]
