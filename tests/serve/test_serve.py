"""`dgconvert serve` end to end over HTTP on 127.0.0.1 with tritonclient: health,
metadata, repository index; binary and JSON requests give GatedRunner.predict's results
sample by sample; concurrent clients; bad requests get 400/404 with the reason and the
server keeps serving; --split-stages gives the same results."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import threading
import time
import urllib.request
from typing import Any

import numpy as np
import pytest

tritonclient_http = pytest.importorskip("tritonclient.http")


def _client(server: str, prefix: str = "") -> Any:
    return tritonclient_http.InferenceServerClient(server + prefix, network_timeout=60)


def _infer(client: Any, name: str, x: np.ndarray, binary: bool = True,
           outputs: list[str] | None = None) -> Any:
    inp = tritonclient_http.InferInput("images", list(x.shape), "UINT8" if x.dtype == np.uint8
                                       else "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    req = None if outputs is None else [tritonclient_http.InferRequestedOutput(o, binary_data=binary)
                                        for o in outputs]
    return client.infer(name, [inp], outputs=req)


def _check(case: dict[str, Any], rows: np.ndarray, res: Any) -> None:
    ok = ~case["near"][rows]
    ref = case["ref"]
    np.testing.assert_array_equal(res.as_numpy("label")[ok], ref.labels[rows][ok])
    np.testing.assert_array_equal(res.as_numpy("exit_stage")[ok], ref.exit_stage[rows][ok])
    np.testing.assert_allclose(res.as_numpy("score")[ok], ref.scores[rows][ok], rtol=1e-4,
                               atol=1e-5)


def test_health_metadata_and_index(server: str, case: dict[str, Any]) -> None:
    c = _client(server)
    name = case["name"]
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(name)
    meta = c.get_model_metadata(name)
    assert meta["name"] == name
    assert meta["inputs"][0]["name"] == "images"
    assert meta["inputs"][0]["shape"] == [-1, 1, 28, 28]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
        "label": "INT64", "exit_stage": "INT64", "score": "FP32"}
    assert c.get_model_repository_index() == [{"name": name, "version": "1", "state": "READY"}]
    assert "binary_tensor_data" in c.get_server_metadata()["extensions"]


def test_binary_and_json_requests_equal_the_runner(server: str, case: dict[str, Any]) -> None:
    c, px, name = _client(server), case["pixels"], case["name"]
    at = 0
    for i, size in enumerate([1, 3, 8, 1, 5, 16]):
        rows = np.arange(at, at + size) % len(px)
        at += size
        x = px[rows]
        if i % 3 == 2:  # float32 input: the runner's own normalization, sent as FP32
            from dgconvert.core.preprocess import prepare_images

            x = prepare_images(x, [1, 28, 28], case["bundle"].normalization)
        res = _infer(c, name, x, binary=i % 2 == 0)
        _check(case, rows, res)
    # a subset of the outputs, in the order asked, as JSON
    res = _infer(c, name, px[:4], binary=False, outputs=["exit_stage", "label"])
    assert [o["name"] for o in res.get_response()["outputs"]] == ["exit_stage", "label"]
    assert res.as_numpy("score") is None
    np.testing.assert_array_equal(res.as_numpy("label")[~case["near"][:4]],
                                  case["ref"].labels[:4][~case["near"][:4]])


def test_concurrent_clients_and_stats(server: str, case: dict[str, Any]) -> None:
    px, name = case["pixels"], case["name"]
    before = json.loads(_get(server, f"/v2/models/{name}/stats")[1])["model_stats"][0]
    errors: list[BaseException] = []
    sent = [0] * 4

    def client(i: int) -> None:
        c = _client(server)  # one client per thread: tritonclient is not thread-safe
        rng = np.random.default_rng(i)
        try:
            for _ in range(6):
                rows = rng.choice(len(px), size=int(rng.integers(1, 4)), replace=False)
                _check(case, rows, _infer(c, name, px[rows]))
                sent[i] += len(rows)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors and not any(th.is_alive() for th in threads)
    after = json.loads(_get(server, f"/v2/models/{name}/stats")[1])["model_stats"][0]
    rows = np.subtract(after["rows_per_stage"], before["rows_per_stage"])
    assert rows[0] == sum(sent) and all(np.diff(rows) <= 0)
    assert sum(after["exits_per_stage"]) - sum(before["exits_per_stage"]) == sum(sent)
    # the replica's sessions run on one shared pool of --threads (ServeOptions default)
    assert "one shared pool of 1 threads" in after["runtime"], after


def _post(server: str, path: str, body: bytes, headers: dict[str, str] | None = None
          ) -> tuple[int, str]:
    host, port = server.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", path, body=body, headers=headers or {})
    resp = conn.getresponse()
    out = resp.status, resp.read().decode(errors="replace")
    conn.close()
    return out


def _get(server: str, path: str) -> tuple[int, str]:
    host, port = server.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path)
    resp = conn.getresponse()
    out = resp.status, resp.read().decode(errors="replace")
    conn.close()
    return out


def test_bad_requests_get_400_and_the_server_keeps_serving(server: str,
                                                          case: dict[str, Any]) -> None:
    name = case["name"]
    url = f"/v2/models/{name}/infer"

    def tensor(**kw: Any) -> bytes:
        t = {"name": "images", "datatype": "UINT8", "shape": [1, 1, 28, 28],
             "data": [0] * 784}
        t.update(kw)
        return json.dumps({"inputs": [t]}).encode()

    head = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8",
                                   "shape": [1, 1, 28, 28],
                                   "parameters": {"binary_data_size": 5}}]}).encode()
    bad = {
        "not valid JSON": (url, b"{", {}),
        "takes one input 'images'": (url, tensor(name="x"), {}),
        "expected [N, 1, 28, 28]": (url, tensor(shape=[1, 28, 28, 1]), {}),
        "datatype INT64": (url, tensor(datatype="INT64", data=[0] * 784), {}),
        "Inference-Header-Content-Length is 9999": (url, tensor(),
                                                    {"Inference-Header-Content-Length": "9999"}),
        "binary_data_size 5": (url, head + bytes(5),
                               {"Inference-Header-Content-Length": str(len(head))}),
        "split the batch": (url, tensor(shape=[65, 1, 28, 28], data=[0] * 65 * 784), {}),
    }
    for expect, (path, body, headers) in bad.items():
        status, text = _post(server, path, body, headers)
        assert status == 400, (expect, status, text)
        assert expect in json.loads(text)["error"], (expect, text)
    status, text = _post(server, "/v2/models/nope/infer", tensor())
    assert status == 404 and "unknown model 'nope'" in json.loads(text)["error"]
    with pytest.raises(tritonclient_http.InferenceServerException, match="unknown model"):
        _infer(_client(server), "nope", case["pixels"][:1])
    # still serving
    _check(case, np.arange(2), _infer(_client(server), name, case["pixels"][:2]))


def test_split_stages_equal_the_runner(server: str, case: dict[str, Any]) -> None:
    c, px, name = _client(server, "/split"), case["pixels"], case["name"]
    assert c.is_server_ready() and c.get_model_metadata(name)["name"] == name
    at = 0
    for i, size in enumerate([1, 8, 24]):
        rows = np.arange(at, at + size) % len(px)
        at += size
        _check(case, rows, _infer(c, name, px[rows], binary=i != 1))
    status, text = _post(server, f"/split/v2/models/{name}/infer", b"{")
    assert status == 400 and "not valid JSON" in text


def test_metrics_reach_rays_prometheus_exporter(server: str, case: dict[str, Any],
                                                metrics_port: int) -> None:
    name = case["name"]
    _infer(_client(server), name, case["pixels"][:8])
    want = ("ray_dgconvert_stage_rows_total", "ray_dgconvert_stage_exits_total",
            "ray_dgconvert_requests_total", "ray_dgconvert_queue_rows",
            "ray_dgconvert_batch_size_count", "ray_dgconvert_latency_ms_count")
    stages = case["bundle"].num_stages

    def stage_rows(seen: dict) -> list[float]:
        return [seen.get(("ray_dgconvert_stage_rows_total", str(k)), 0.0) for k in range(stages)]

    # Each replica's counters reach the exporter on its own report interval, so a scrape
    # may hold part of the 8 rows: wait until all of them have arrived.
    deadline, seen = time.monotonic() + 40, {}
    while time.monotonic() < deadline:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        seen = {}
        for line in text.splitlines():
            m = re.match(r"(ray_dgconvert_\w+)\{(.*)\} (\S+)$", line)
            if m and f'model="{name}"' in m.group(2):
                stage = re.search(r'stage="(\d+)"', m.group(2))
                key = (m.group(1), stage.group(1) if stage else None)
                seen[key] = seen.get(key, 0.0) + float(m.group(3))
        if all(any(k[0] == w for k in seen) for w in want) and stage_rows(seen)[0] >= 8:
            break
        time.sleep(0.5)
    assert all(any(k[0] == w for k in seen) for w in want), sorted(seen)
    rows = stage_rows(seen)
    assert rows[0] >= 8 and rows == sorted(rows, reverse=True)  # fewer rows deeper


def _raw(server: str, data: bytes, wait: float) -> tuple[float, bytes]:
    """Send ``data`` on a fresh connection and return (seconds to the answer, answer)."""
    import socket

    host, port = server.split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(data)
        t0 = time.monotonic()
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return time.monotonic() - t0, b"".join(chunks)


def test_slow_uploads_get_408_and_do_not_hold_up_others(server: str,
                                                        case: dict[str, Any]) -> None:
    """The guard in the proxy (4 s deadlines in conftest): a body or head that stalls
    is answered 408 JSON and closed, and a normal client is answered meanwhile."""
    name = case["name"]
    slow_body = (f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: x\r\n"
                 "Content-Length: 1000\r\n\r\n{\"inputs\"").encode()
    answers: dict[str, tuple[float, bytes]] = {}
    threads = [threading.Thread(target=lambda k=k, d=d: answers.__setitem__(k, _raw(server, d, 30)))
               for k, d in [("body", slow_body), ("head", b"GET /v2/health/re")]]
    for th in threads:
        th.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    _check(case, np.arange(3), _infer(_client(server), name, case["pixels"][:3]))
    assert time.monotonic() - t0 < 3  # answered while both stalled connections wait
    for th in threads:
        th.join(30)
    for what, flag in [("body", "--body-timeout"), ("head", "--header-timeout")]:
        took, raw = answers[what]
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower(), raw
        assert flag in json.loads(body)["error"] and 3 < took < 15, (what, took)
