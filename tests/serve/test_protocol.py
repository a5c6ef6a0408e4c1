"""The Open Inference Protocol layer without Ray: request parsing (JSON and the binary
tensor extension) and response encoding round-trip; malformed requests raise
ProtocolError naming what was wrong; the transport-free server routes and counts; the
per-stage replica plan follows the loads."""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
import pytest

from dgconvert.core.exits import GatedResult
from dgconvert.serve.protocol import (
    HEADER_LENGTH,
    ModelSpec,
    ProtocolError,
    decode_infer_response,
    encode_infer_request,
    encode_infer_response,
    parse_infer_request,
)
from dgconvert.serve.server import OIPServer, stage_rows
from dgconvert.serve.split import exit_thresholds, plan_replicas

SPEC = ModelSpec("m", (1, 4, 4), num_stages=3)


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_request_round_trip(binary: bool, dtype: type) -> None:
    x = (np.arange(2 * 16).reshape(2, 1, 4, 4) % 251).astype(dtype)
    body, headers = encode_infer_request([("images", x)], binary=binary, outputs=["score"],
                                         binary_outputs=False, request_id="r1")
    req = parse_infer_request(body, headers.get(HEADER_LENGTH))
    got = SPEC.images(req)
    assert got.dtype == dtype and got.shape == x.shape
    np.testing.assert_array_equal(got, x)
    assert req.outputs == ["score"] and not req.wants_binary("score") and req.id == "r1"


def test_response_binary_and_json_outputs() -> None:
    res = GatedResult(np.array([3, 1]), np.array([0, 2]), np.array([0.5, np.nan], np.float32))
    req = parse_infer_request(json.dumps({
        "inputs": [{"name": "images", "datatype": "UINT8", "shape": [0, 1, 4, 4], "data": []}],
        "outputs": [{"name": "score", "parameters": {"binary_data": True}},
                    {"name": "label"}]}).encode())
    outs = SPEC.outputs(req, res)
    body, headers = encode_infer_response("m", "1", outs,
                                          {n: req.wants_binary(n) for n, _ in outs}, "id7")
    head = json.loads(body[:int(headers[HEADER_LENGTH])])
    assert [o["name"] for o in head["outputs"]] == ["score", "label"]
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 8
    assert head["outputs"][1]["data"] == [3, 1] and head["id"] == "id7"
    dec = decode_infer_response(body, headers[HEADER_LENGTH])
    np.testing.assert_array_equal(dec["score"], res.scores)
    assert dec["label"].dtype == np.int64


def _bad(body: bytes, header: str | None = None, spec: ModelSpec = SPEC) -> str:
    with pytest.raises(ProtocolError) as info:
        req = parse_infer_request(body, header, max_elements=64)
        spec.images(req, max_rows=4)
        spec.check_outputs(req)
    assert info.value.status == 400
    return str(info.value)


def _req(**tensor: object) -> bytes:
    t = {"name": "images", "datatype": "UINT8", "shape": [1, 1, 4, 4], "data": [0] * 16}
    t.update(tensor)
    return json.dumps({"inputs": [t]}).encode()


def test_malformed_requests_say_what_and_why() -> None:
    assert "not valid JSON" in _bad(b"{nope")
    assert "inputs" in _bad(b'{"inputs": []}')
    assert "model 'm' takes one input 'images'" in _bad(_req(name="pixels"))
    assert "datatype INT32" in _bad(_req(datatype="INT32"))
    assert "expected [N, 1, 4, 4]" in _bad(_req(shape=[1, 4, 4], data=[0] * 16))
    assert "holds 3 values" in _bad(_req(data=[1, 2, 3]))
    assert "outside uint8" in _bad(_req(data=[300] * 16))
    assert "datatype 'FLOAT'" in _bad(_req(datatype="FLOAT"))
    assert "at most 64" in _bad(_req(shape=[5, 1, 4, 4], data=[0] * 80))
    assert "at most 4 per request" in _bad(_req(shape=[4 + 1, 1, 2, 2], data=[0] * 20),
                                           spec=ModelSpec("m", (1, 2, 2), 3))
    assert "NaN" in _bad(_req(datatype="FP32", data=[float("nan")] * 16))
    body = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8",
                                   "shape": [1, 1, 4, 4],
                                   "parameters": {"binary_data_size": 16}}]}).encode()
    assert "needs the Inference-Header-Content-Length" in _bad(body + bytes(16))
    assert "binary part, which has 10" in _bad(body + bytes(10), str(len(body)))
    assert "carries 20 binary bytes" in _bad(body + bytes(20), str(len(body)))
    assert "body has" in _bad(body + bytes(16), "99999")
    assert "non-negative integer" in _bad(body, "abc")
    assert "outputs ['logits']" in _bad(json.dumps({
        "inputs": json.loads(_req())["inputs"], "outputs": [{"name": "logits"}]}).encode())


def test_server_routes_counts_and_keeps_serving() -> None:
    def infer(images: np.ndarray) -> asyncio.Future:
        n = len(images)
        res = GatedResult(np.arange(n), np.arange(n) % 3, np.ones(n, np.float32))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(res)
        return fut

    server = OIPServer(SPEC, infer, max_rows=8)

    def call(method: str, path: str, body: bytes = b"", headers: dict | None = None):
        return asyncio.run(server.handle(method, path, headers or {}, body))

    assert call("GET", "/v2/health/ready").status == 200
    assert json.loads(call("GET", "/v2/models/m").body)["inputs"][0]["shape"] == [-1, 1, 4, 4]
    assert json.loads(call("POST", "/v2/repository/index").body)[0]["name"] == "m"
    assert call("GET", "/v2/models/other").status == 404
    assert call("GET", "/v2/models/m/infer").status == 405
    assert call("POST", "/v2/models/m/infer", b"[1]").status == 400
    x = np.zeros((5, 1, 4, 4), np.uint8)
    body, headers = encode_infer_request([("images", x)])
    reply = call("POST", "/v2/models/m/versions/1/infer", body, headers)
    assert reply.status == 200
    out = decode_infer_response(reply.body, reply.headers[HEADER_LENGTH])
    np.testing.assert_array_equal(out["exit_stage"], [0, 1, 2, 0, 1])
    stats = json.loads(call("GET", "/v2/models/m/stats").body)["model_stats"][0]
    assert stats["rows_per_stage"] == [5, 3, 1] and stats["exits_per_stage"] == [2, 2, 1]
    assert stats["requests"] == 1 and stats["failures"] == 3


def test_stage_rows_and_replica_plan() -> None:
    res = GatedResult(np.zeros(6, np.int64), np.array([0, 0, 1, 2, 2, 2]),
                      np.zeros(6, np.float32))
    assert stage_rows(res, 3) == [6, 4, 3]
    assert plan_replicas([1.0, 1.0, 1.0], 1) == [1, 1, 1]
    assert plan_replicas([4.0, 2.0, 1.0, 1.0], 12) == [5, 3, 2, 2]
    assert sum(plan_replicas([0.3, 0.2, 0.1], 7)) == 7
    t = exit_thresholds([1.0, float("inf")])
    assert t[0] == 1.0 and np.isnan(t[1])


def test_missing_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from dgconvert.serve.common import ServeUnavailableError, require_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ServeUnavailableError, match=r"dgconvert\[serve\]"):
        require_ray()
