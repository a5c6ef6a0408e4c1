"""The stop handlers of ``dgconvert serve`` stay in place through Ray's start and
shutdown, and after the stop a late signal cannot kill the exiting process; a replica's
process-wide setup (the shared thread pool). Each case runs in a fresh interpreter (Ray's
driver state, signal dispositions and ONNX Runtime's pool are per process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


CAUGHT = """
def caught(signum):
    for line in open("/proc/self/status"):
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
"""


def _run(code: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CAUGHT + textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)




def test_sigterm_is_still_ours_after_ray_init_and_shutdown() -> None:
    pytest.importorskip("ray")
    # Ray's C++ failure-signal handler, if installed in the driver, takes SIGTERM and
    # ray.shutdown leaves SIGTERM's default action behind: a stopping server then died
    # with exit 143 on the next SIGTERM.
    r = _run("""
        import signal
        from dgconvert.serve.app import init_ray
        from dgconvert.serve.lifecycle import StopSignals
        stop = StopSignals().install()
        ray = init_ray(stop=stop, num_cpus=1)
        after_init = caught(signal.SIGTERM), signal.getsignal(signal.SIGTERM) == stop._handle
        ray.shutdown()
        print("RESULT", after_init, caught(signal.SIGTERM))
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RESULT (True, True) True" in r.stdout, r.stdout + r.stderr[-3000:]


def test_restore_puts_back_the_previous_handlers_or_ignores() -> None:
    r = _run("""
        import os, signal, time
        from dgconvert.serve.lifecycle import StopSignals
        def mine(signum, frame):
            print("MINE", signum)
        signal.signal(signal.SIGINT, mine)
        stop = StopSignals(echo=lambda m: print("ECHO", m)).install()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        print("REQUESTED", stop.requested.is_set(), stop.count)
        stop.restore()
        print("RESTORED", signal.getsignal(signal.SIGINT) is mine,
              signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
        stop = StopSignals().install()
        stop.restore(ignore=True)
        print("IGNORED", signal.getsignal(signal.SIGTERM) == signal.SIG_IGN,
              signal.getsignal(signal.SIGINT) == signal.SIG_IGN)
        os.kill(os.getpid(), signal.SIGTERM)  # ignored: the process goes on and exits 0
        time.sleep(0.1)
        print("ALIVE")
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "REQUESTED True 1" in out and "RESTORED True True" in out, out
    assert "IGNORED True True" in out and "ALIVE" in out, out


def test_serve_options_share_the_pool_and_name_the_way_out() -> None:
    """``ServeOptions.use_thread_pool`` (what each replica calls first) shares one pool of
    ``threads``; a pool that cannot be had names ``--thread-pool per-session``."""
    r = _run("""
        from dgconvert.runtime import shared_threads
        from dgconvert.serve.common import ServeOptions
        ServeOptions(thread_pool="per-session").use_thread_pool()
        print("PER-SESSION", shared_threads())
        ServeOptions(threads=2).use_thread_pool()
        print("SHARED", shared_threads())
        try:
            ServeOptions(threads=1).use_thread_pool()
        except Exception as exc:
            print("REFUSED", type(exc).__name__, exc)
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "PER-SESSION None" in r.stdout and "SHARED 2" in r.stdout, r.stdout
    assert "REFUSED BackendOptionError" in r.stdout and "--thread-pool per-session" in r.stdout
