"""`dgconvert serve` stopped by SIGTERM at any moment — while Ray starts, the moment it
is ready, while it serves (with requests in flight), and a second SIGTERM while it
stops: exit status 0, every request in flight answered, later ones refused (never a
hang), no process of its Ray session left, the port free. Each case starts a real Ray
(about 10-20 s here)."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dgconvert.serve.lifecycle import is_ready, raylets, session_processes
from dgconvert.serve.protocol import encode_infer_request

pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """``dgconvert serve BUNDLE`` in a session of its own (its process group)."""

    def __init__(self, bundle: Path) -> None:
        self.port = _free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dgconvert", "serve", str(bundle), "--port", str(self.port),
             "--threads", "1", "--drain-timeout", "10"], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.raylets: set[int] = set()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not is_ready(self.port):
            self.raylets |= raylets(self.proc.pid)
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()
            time.sleep(0.2)

    def stop(self, signals: int = 1, timeout: float = 90, every_s: float = 0.5) -> float:
        self.raylets |= raylets(self.proc.pid)
        t = time.monotonic()
        self.signalled_alive = 0  # signals sent while the process still ran
        for _ in range(signals):
            if self.proc.poll() is not None:
                break
            self.signalled_alive += 1
            self.proc.send_signal(signal.SIGTERM)
            time.sleep(every_s)
        self.proc.wait(timeout)
        return time.monotonic() - t

    def output(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stdout.read() if self.proc.stdout else ""

    def check_clean_exit(self) -> str:
        out = self.output()
        assert self.proc.returncode == 0, out
        left = session_processes(self.proc.pid, self.raylets)
        assert not left, (left, out)
        with socket.socket() as s:  # the port is free again (for a server: TIME_WAIT ok)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", self.port))
            s.listen()
        return out


@pytest.fixture(scope="module")
def bundle(exported_bundle: Callable[..., Any]) -> Path:
    return exported_bundle("resnet").bundle.path


def test_sigterm_during_ray_start_up_exits_0_and_leaves_nothing(bundle: Path) -> None:
    s = Served(bundle)
    time.sleep(2.5)  # Ray is starting (it takes ~3-10 s here)
    assert s.proc.poll() is None
    # then a SIGTERM every 0.25 s until it has exited: they land while Ray starts, while
    # it stops (after ray.shutdown Ray had left SIGTERM's default action behind) and while
    # Python tears down (where Python resets its handlers): each once killed it (exit 143)
    s.stop(signals=240, every_s=0.25)
    out = s.check_clean_exit()
    assert "stopping" in out and s.signalled_alive >= 2, (s.signalled_alive, out)
    assert "SIGTERM received" not in out, out  # Ray's failure-signal handler stayed out


def test_sigterm_the_moment_it_is_ready(bundle: Path) -> None:
    s = Served(bundle)
    s.wait_ready()
    took = s.stop()
    s.check_clean_exit()
    assert took < 10 + 30  # the drain timeout and Ray's shutdown


def test_sigterm_while_serving_answers_every_request_in_flight(bundle: Path) -> None:
    s = Served(bundle)
    s.wait_ready()
    body, headers = encode_infer_request([("images", np.zeros((8, 1, 28, 28), np.uint8))])
    log: list[tuple[float, float, Any]] = []  # (sent, answered, status or error name)
    done = threading.Event()

    def client() -> None:
        while not done.is_set():
            t = time.monotonic()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
                conn.request("POST", "/v2/models/resnet-dgate/infer", body, headers)
                r = conn.getresponse()
                r.read()
                log.append((t, time.monotonic(), r.status))
                conn.close()
            except (OSError, http.client.HTTPException) as exc:
                # logged, so that a request in flight before the signal cannot go missing;
                # after it, an answer cut short when Serve's proxy goes (IncompleteRead of
                # the drain 503) counts like a reset
                log.append((t, time.monotonic(), type(exc).__name__))
                time.sleep(0.05)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for th in threads:
        th.start()
    time.sleep(2)
    signalled = time.monotonic()
    s.stop()
    done.set()
    for th in threads:
        th.join(35)
    s.check_clean_exit()
    before = [st for t, _, st in log if t < signalled - 0.05]
    assert before and all(st == 200 for st in before), before  # in flight: answered
    after = [st for t, _, st in log if t > signalled + 0.05]
    assert all(st in (200, 404, 503) or isinstance(st, str) for st in after), after
    assert not any(st == "TimeoutError" for _, _, st in log)  # refused, never hung
