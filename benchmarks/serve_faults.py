"""``dgconvert serve`` under faults, on 127.0.0.1, every request loop bounded.

Trials (one server with ``--replicas 2 --threads 1`` for the first four, a fresh server
for each SIGTERM trial):

- **malformed flood**: malformed requests of every kind that once answered 500 (shapes
  that wrap ``np.prod``, dimensions past int64, JSON nested 50,000-100,000 deep, bad
  ``Inference-Header-Content-Length``, bytes after the JSON, garbage), then a valid one;
- **overload**: many clients of ``--max-rows``-image requests at once (503 + Retry-After
  expected, bounded memory);
- **slow uploads**: 300 connections that send their body one byte a second while 4
  normal clients are timed, against the same clients' latency just before;
- **replica kill**: one of the two replicas SIGKILLed under 6 clients (every answer
  retried or 503 JSON; recovery = until two replicas run again);
- **SIGTERM** 4 s after launch, the moment ready answers, and while serving.

Every answer is checked: 200s against ``GatedRunner.predict`` (label and exit stage of
every row not within 1e-4 of a threshold), errors for a JSON ``{"error": ...}`` body.
Raw HTTP (``http.client``, sockets) so that every status and content type is seen.

    .venv/bin/python benchmarks/serve_faults.py [--bundle out/reference.dg]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from _util import DEFAULT_BUNDLE, ROOT, header

from dgconvert.core.bundle import Bundle
from dgconvert.runtime import GatedRunner
from dgconvert.serve.lifecycle import is_ready, raylets, session_processes
from dgconvert.serve.protocol import HEADER_LENGTH, decode_infer_response, encode_infer_request

REPO = ROOT.parent


# -- the server ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``dgconvert serve`` in a session of its own."""

    def __init__(self, bundle: Path, *args: str) -> None:
        self.port = free_port()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dgconvert", "serve", str(bundle), "--port", str(self.port),
             "--threads", "1", *args], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.raylets: set[int] = set()

    def ready(self) -> bool:
        return is_ready(self.port)

    def wait_ready(self, timeout: float = 180) -> float:
        deadline = time.monotonic() + timeout
        while not self.ready():
            self.raylets |= raylets(self.proc.pid)
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {self.proc.stdout.read()}")
            time.sleep(0.2)
        self.raylets |= raylets(self.proc.pid)
        return time.monotonic() - self.t0

    def processes(self, prefix: str) -> list[int]:
        return [pid for pid, cmd in session_processes(self.proc.pid, self.raylets)
                if cmd.startswith(prefix)]

    def rss_mb(self, prefix: str) -> float:
        total = 0
        for pid in self.processes(prefix):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return round(total / 1024, 1)

    def stop(self, timeout: float = 120) -> dict[str, Any]:
        self.raylets |= raylets(self.proc.pid)
        t = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        took = time.monotonic() - t
        left = session_processes(self.proc.pid, self.raylets)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", self.port))
                free = True
            except OSError:
                free = False
        for pid, _ in left:  # the benchmark leaves nothing either way
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return {"rc": self.proc.returncode, "exit_s": round(took, 1), "left": len(left),
                "left_cmds": sorted({c.split()[0] for _, c in left}), "port_free": free}


# -- requests and checking -------------------------------------------------------------------
class Checker:
    """Reference predictions and the verdict on each answer."""

    def __init__(self, bundle: Bundle, pixels: np.ndarray, name: str) -> None:
        self.pixels, self.name = pixels, name
        runner = GatedRunner(bundle, backend="onnxruntime")
        self.ref = runner.predict(pixels)
        rec = GatedRunner(bundle, backend="onnxruntime", compose=False).collect(pixels)
        t = np.asarray(runner.exit_thresholds[:rec.num_gates], np.float32)
        self.near = (np.abs(rec.scores - t) < 1e-4).any(axis=1)
        self.lock = threading.Lock()

    def request(self, rows: np.ndarray) -> tuple[bytes, dict[str, str]]:
        return encode_infer_request([("images", self.pixels[rows])])

    def correct(self, rows: np.ndarray, body: bytes, headers: Any) -> bool:
        out = decode_infer_response(body, headers.get(HEADER_LENGTH))
        ok = ~self.near[rows]
        return bool(np.array_equal(out["label"][ok], self.ref.labels[rows][ok]) and
                    np.array_equal(out["exit_stage"][ok], self.ref.exit_stage[rows][ok]))


class Tally:
    """Answers of one trial: sent, correct, by status, non-JSON errors, hangs, latencies."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent = self.correct = self.wrong = self.non_json = self.hangs = 0
        self.status: Counter[str] = Counter()
        self.latency_ms: list[float] = []
        self.retry_after_missing = self.retried = 0
        self.events: list[tuple[float, str]] = []  # (when sent, status)

    def add(self, status: str, latency_ms: float | None = None, correct: bool | None = None,
            json_ok: bool = True, retry_after: bool = True, sent_at: float = 0.0,
            retried: bool = False) -> None:
        with self.lock:
            self.sent += 1
            self.retried += retried
            self.events.append((sent_at, status))
            self.status[status] += 1
            if latency_ms is not None:
                self.latency_ms.append(latency_ms)
            if correct is True:
                self.correct += 1
            elif correct is False:
                self.wrong += 1
            if not json_ok:
                self.non_json += 1
            if status == "timeout":
                self.hangs += 1
            if status == "503" and not retry_after:
                self.retry_after_missing += 1

    def row(self) -> dict[str, Any]:
        lat = sorted(self.latency_ms)
        return {"sent": self.sent, "correct": self.correct, "wrong": self.wrong,
                "by_status": dict(sorted(self.status.items())), "non_json": self.non_json,
                "hangs": self.hangs, "503_without_retry_after": self.retry_after_missing,
                "retried_by_the_guard": self.retried,
                "p50_ms": round(statistics.median(lat), 1) if lat else None,
                "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None}


def post(port: int, path: str, body: bytes, headers: dict[str, str], tally: Tally,
         check: Any = None, timeout: float = 30) -> None:
    """One request on a fresh connection, recorded in ``tally``."""
    t, at = time.perf_counter(), time.monotonic()
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request("POST", path, body, headers)
        r = c.getresponse()
        data = r.read()
        c.close()
    except TimeoutError:
        tally.add("timeout", sent_at=at)
        return
    except (OSError, http.client.HTTPException) as exc:
        tally.add(type(exc).__name__, sent_at=at)
        time.sleep(0.05)
        return
    ms = 1e3 * (time.perf_counter() - t)
    ctype = r.getheader("content-type", "")
    retried = r.getheader("x-dgconvert-retried") == "1"
    if r.status == 200:
        tally.add("200", ms, correct=check(data, r.headers) if check else None, sent_at=at,
                  retried=retried)
        return
    try:
        json_ok = isinstance(json.loads(data).get("error"), str)
    except (ValueError, AttributeError):
        json_ok = False
    tally.add(str(r.status), ms, json_ok=json_ok and ctype.startswith("application/json"),
              retry_after=bool(r.getheader("retry-after")), sent_at=at, retried=retried)


def clients(n: int, seconds: float, work: Any) -> None:
    """``n`` threads calling ``work(i)`` until ``seconds`` pass (bounded loops)."""
    end = time.monotonic() + seconds

    def loop(i: int) -> None:
        while time.monotonic() < end:
            work(i)

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(seconds + 60)


def normal_work(server: Server, chk: Checker, tally: Tally, rows_per: int = 8) -> Any:
    path = f"/v2/models/{chk.name}/infer"
    rngs: dict[int, np.random.Generator] = {}

    def work(i: int) -> None:
        rng = rngs.setdefault(i, np.random.default_rng(i))
        rows = rng.choice(len(chk.pixels), rows_per, replace=False)
        body, headers = chk.request(rows)
        post(server.port, path, body, headers, tally,
             lambda data, h: chk.correct(rows, data, h))

    return work


# -- the trials ------------------------------------------------------------------------------
def malformed_bodies(name: str) -> list[tuple[bytes, dict[str, str]]]:
    def t(**kw: Any) -> bytes:
        return json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", **kw}]}).encode()

    out: list[tuple[bytes, dict[str, str]]] = []
    for shape in ([2**40, 2**40], [2**62, 4], [10**30], [2**63, 1, 28, 28], [-1, 1, 28, 28],
                  [1] * 100, "x", [1.5]):
        out.append((t(shape=shape, data=[]), {}))
        head = t(shape=shape, parameters={"binary_data_size": 0})
        out.append((head, {HEADER_LENGTH: str(len(head))}))
    for depth in (65, 1000, 50_000, 100_000):
        out.append((b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}", {}))
    ok = t(shape=[1, 1, 28, 28], data=[0] * 784)
    for value in ("-1", "9" * 5000, "1e3", "\u0661".encode(), str(len(ok) + 1)):
        out.append((ok, {HEADER_LENGTH: value}))
    out += [(ok + b"\x00\x01", {}), (b"\xff\xfe", {}), (b"[]", {}), (b"", {}),
            (t(shape=[1, 1, 28, 28], data=[10**30] * 784), {}),
            (ok, {"content-encoding": "gzip"}),
            (t(shape=[2000, 1, 28, 28], data=[]), {})]
    return out


def trial_malformed(server: Server, chk: Checker, rounds: int) -> dict[str, Any]:
    bodies = malformed_bodies(chk.name)
    tally = Tally()
    path = f"/v2/models/{chk.name}/infer"
    jobs = [b for _ in range(rounds) for b in bodies]
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not jobs:
                    return
                body, headers = jobs.pop()
            post(server.port, path, body, headers, tally)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    after = Tally()
    normal_work(server, chk, after)(0)
    r = tally.row()
    r["valid_after"] = after.row()["by_status"]
    r["valid_after_correct"] = after.correct
    return r


def trial_overload(server: Server, chk: Checker, n_clients: int, seconds: float,
                   rows: int) -> dict[str, Any]:
    tally = Tally()
    before = server.rss_mb("ray::ServeReplica")
    path = f"/v2/models/{chk.name}/infer"
    idx = np.arange(rows) % len(chk.pixels)
    body, headers = chk.request(idx)
    peak = [before]

    def sample() -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            peak[0] = max(peak[0], server.rss_mb("ray::ServeReplica"))
            time.sleep(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    clients(n_clients, seconds, lambda i: post(server.port, path, body, headers, tally,
                                               lambda d, h: chk.correct(idx, d, h), 60))
    th.join()
    return {**tally.row(), "replica_rss_mb_before": before, "replica_rss_mb_peak": peak[0]}


def trial_slow_uploads(server: Server, chk: Checker, n_slow: int, seconds: float
                       ) -> dict[str, Any]:
    base = Tally()
    clients(4, 6, normal_work(server, chk, base))
    proxy_before = server.rss_mb("ray::ProxyActor")
    sel = selectors.DefaultSelector()
    head = (f"POST /v2/models/{chk.name}/infer HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n").encode()
    conns = []
    for _ in range(n_slow):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.sendall(head)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        conns.append(s)
    answers: Counter[str] = Counter()
    stop = threading.Event()
    t0 = time.monotonic()
    closed_at: list[float] = []

    def trickle() -> None:  # one byte a second on every open slow connection
        while not stop.is_set():
            for key, _ in sel.select(timeout=0):
                s = key.fileobj
                with contextlib.suppress(OSError):
                    data = s.recv(4096)
                    answers[data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/")
                            else "closed"] += 1
                    closed_at.append(time.monotonic() - t0)
                sel.unregister(s)
                s.close()
            for key in list(sel.get_map().values()):
                with contextlib.suppress(OSError):
                    key.fileobj.send(b" ")
            stop.wait(1.0)

    th = threading.Thread(target=trickle, daemon=True)
    th.start()
    during = Tally()
    time.sleep(1)
    clients(4, seconds, normal_work(server, chk, during))
    proxy_peak = server.rss_mb("ray::ProxyActor")
    stop.set()
    th.join(10)
    still_open = len(sel.get_map())
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    return {"slow_connections": n_slow, "slow_answers": dict(answers),
            "slow_closed_by_s": round(max(closed_at), 1) if closed_at else None,
            "slow_still_open_at_end": still_open,
            "normal_before": base.row(), "normal_during": during.row(),
            "proxy_rss_mb_before": proxy_before, "proxy_rss_mb_during": proxy_peak}


def trial_replica_kill(server: Server, chk: Checker, seconds: float) -> dict[str, Any]:
    tally = Tally()
    info: dict[str, Any] = {}

    def killer() -> None:
        time.sleep(3)
        pids = server.processes("ray::ServeReplica")
        info["replicas_before"] = len(pids)
        os.kill(pids[0], signal.SIGKILL)
        t = time.monotonic()
        while time.monotonic() - t < 90:
            alive = [p for p in server.processes("ray::ServeReplica") if p != pids[0]]
            if len(alive) >= len(pids) and server.ready():
                info["recovery_s"] = round(time.monotonic() - t, 1)
                return
            time.sleep(0.2)
        info["recovery_s"] = None

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    clients(6, seconds, normal_work(server, chk, tally))
    th.join(100)
    return {**tally.row(), **info}


def trial_sigterm(bundle: Path, chk: Checker, when: str) -> dict[str, Any]:
    server = Server(bundle, "--drain-timeout", "10")
    tally = Tally()
    serving = False
    if when == "4 s after launch":
        time.sleep(4)
        ready_at = None
    else:
        ready_at = round(server.wait_ready(), 1)
    if when == "while serving":
        end = threading.Event()
        work = normal_work(server, chk, tally)

        def loop(i: int) -> None:
            while not end.is_set():
                work(i)

        threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(4)]
        for th in threads:
            th.start()
        time.sleep(3)
        signalled = time.monotonic()
        res = server.stop()
        end.set()
        for th in threads:
            th.join(40)
        serving = True
    else:
        res = server.stop()
    row = {"when": when, "ready_after_s": ready_at, **res}
    if serving:
        row["requests"] = tally.row()
        row["before_signal"] = dict(Counter(s for t, s in tally.events if t < signalled))
        row["after_signal"] = dict(Counter(s for t, s in tally.events if t >= signalled))
    return row


def table(rows: list[list[Any]], head: list[str]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join("" if v is None else str(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def status_text(d: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in d.items()) or "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE,
                    help="served bundle (default out/reference.dg; if missing, the test "
                    "model of tests/models.py with random weights is exported)")
    ap.add_argument("--seconds", type=float, default=12, help="length of the load trials")
    ap.add_argument("--slow", type=int, default=300, help="slow upload connections")
    ap.add_argument("--overload-clients", type=int, default=48)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="serve_faults_"))
    bundle_note = str(args.bundle)
    if not args.bundle.exists():
        sys.path.insert(0, str(REPO))
        import torch

        import dgconvert as dg
        from dgconvert.core.preprocess import prepare_images
        from tests.models import NORMALIZATION, build

        torch.manual_seed(0)
        px = np.random.default_rng(0).integers(0, 256, (64, 1, 28, 28), dtype=np.uint8)
        x = torch.from_numpy(prepare_images(px, [1, 28, 28], NORMALIZATION))
        args.bundle = dg.export(build("resnet", "dgate"), tmp / "faults.dg",
                                verify_input=x).path
        bundle_note = (f"{DEFAULT_BUNDLE} not built here: the test model (tests/models.py, "
                       "ResNet, d-gates, random weights) exported to a temporary bundle")
    bundle = Bundle.load(args.bundle)
    name = args.bundle.name.removesuffix(".dg")
    try:
        from dgconvert.data import load_dataset

        pixels = load_dataset("fashion-mnist:test[:512]").images
    except Exception:  # noqa: BLE001 - no data set here: random pixels
        pixels = np.random.default_rng(1).integers(0, 256, (512, 1, 28, 28), dtype=np.uint8)
    chk = Checker(bundle, pixels, name)

    results: dict[str, Any] = {}
    server = Server(args.bundle, "--replicas", "2", "--body-timeout", "10",
                    "--header-timeout", "10")
    results["ready_s"] = round(server.wait_ready(), 1)
    try:
        print("malformed flood", file=sys.stderr)
        results["malformed"] = trial_malformed(server, chk, rounds=10)
        print("overload", file=sys.stderr)
        results["overload"] = trial_overload(server, chk, args.overload_clients,
                                             args.seconds, 1024)
        print("slow uploads", file=sys.stderr)
        results["slow"] = trial_slow_uploads(server, chk, args.slow, args.seconds + 8)
        print("replica kill", file=sys.stderr)
        results["kill"] = trial_replica_kill(server, chk, args.seconds)
    finally:
        results["shared_server_stop"] = server.stop()
    results["sigterm"] = []
    for when in ("4 s after launch", "ready", "while serving"):
        print(f"SIGTERM {when}", file=sys.stderr)
        results["sigterm"].append(trial_sigterm(args.bundle, chk, when))
    write(results, bundle_note, args)


def write(r: dict[str, Any], bundle_note: str, args: argparse.Namespace) -> None:
    m, o, s, k = r["malformed"], r["overload"], r["slow"], r["kill"]
    lines = [header("Serving under faults (`dgconvert serve`)", [
        f"bundle: {bundle_note}",
        "server: `--replicas 2 --threads 1 --body-timeout 10 --header-timeout 10` (Ray "
        f"start + deploy took {r['ready_s']} s); 127.0.0.1; raw HTTP clients",
        "one run; the machine's 2 cores were shared with other engineers' jobs (load above)"]),
        "## Trials", "",
        table([
            ["malformed flood", m["sent"], "-", status_text(m["by_status"]), m["non_json"],
             m["hangs"], "-", f"valid request after: {status_text(m['valid_after'])}"],
            [f"overload ({args.overload_clients} clients x 1024 images)", o["sent"], o["correct"],
             status_text(o["by_status"]), o["non_json"], o["hangs"], "-",
             f"replica RSS {o['replica_rss_mb_before']} -> peak {o['replica_rss_mb_peak']} MB; "
             f"503 without Retry-After: {o['503_without_retry_after']}"],
            [f"normal clients during {s['slow_connections']} slow uploads",
             s["normal_during"]["sent"], s["normal_during"]["correct"],
             status_text(s["normal_during"]["by_status"]), s["normal_during"]["non_json"],
             s["normal_during"]["hangs"], "-",
             f"p50/p99 {s['normal_during']['p50_ms']}/{s['normal_during']['p99_ms']} ms vs "
             f"{s['normal_before']['p50_ms']}/{s['normal_before']['p99_ms']} ms just before; "
             f"proxy RSS {s['proxy_rss_mb_before']} -> {s['proxy_rss_mb_during']} MB"],
            ["replica kill (1 of 2, 6 clients)", k["sent"], k["correct"],
             status_text(k["by_status"]), k["non_json"], k["hangs"], k.get("recovery_s"),
             f"wrong answers: {k['wrong']}; answers retried by the guard: "
             f"{k['retried_by_the_guard']}"],
        ], ["trial", "requests", "answered correctly", "by status", "non-JSON errors", "hangs",
            "recovery s", "notes"]), "",
        f"Slow uploads: answers on the {s['slow_connections']} slow connections "
        f"{status_text(s['slow_answers'])} (all closed by {s['slow_closed_by_s']} s; "
        f"{s['slow_still_open_at_end']} still open at the end).", "",
        "## SIGTERM", "",
        table([[t["when"], t["ready_after_s"], t["rc"], t["exit_s"], t["left"],
                t["port_free"], status_text(t.get("before_signal", {})),
                status_text(t.get("after_signal", {})),
                t["requests"]["correct"] if "requests" in t else "-"]
               for t in r["sigterm"]],
              ["signal", "ready after s", "rc", "exit after signal s", "Ray processes left",
               "port free", "requests sent before the signal", "sent after it",
               "answered correctly"]), "",
        "Errors are all JSON `{\"error\": ...}`; `non-JSON errors` counts any that were not. "
        "`hangs`: requests with no answer within 30 s (60 s under overload).",
    ]
    out = ROOT / "results" / "serve_faults.md"
    out.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    print(json.dumps(r, indent=1, default=str))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
