"""Stopping ``dgconvert serve`` cleanly whenever SIGTERM or SIGINT arrives.

:class:`StopSignals` is installed before Ray starts and never raises inside Ray's code:
a signal only records the request, which :func:`dgconvert.serve.app.run_server` checks
between start-up steps and while serving; a second signal while stopping is noted and
changes nothing (the drain is already bounded by ``--drain-timeout``). Ray's own SIGTERM
handlers (``ray.init`` installs two: one exits with the signal number mid-start-up, one
kills the node's processes and exits 1) are kept out while Ray starts
(:func:`ray_init_keeping_signals`), and so is its C++ failure-signal handler, which
takes SIGTERM too and leaves SIGTERM's default action behind at ``ray.shutdown``. After
``ray.shutdown`` the session's processes still alive — its process group (Ray makes its
driver a group leader) and its raylets' workers (each in a group of its own) — are killed
(:func:`reap_process_group`).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """SIGTERM/SIGINT handlers that set :attr:`requested` (no exception is raised)."""

    def __init__(self, echo: Callable[[str], Any] = print) -> None:
        self.requested = threading.Event()
        self.echo = echo
        self.count = 0
        self.stopping = False
        self._previous: dict[int, Any] = {}

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def reinstall(self) -> None:
        """Put the handlers back (after code that replaced them)."""
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                signal.signal(s, self._handle)

    def restore(self, ignore: bool = False) -> None:
        """Put the handlers from before :meth:`install` back (``ignore``: SIG_IGN instead)."""
        for s, h in self._previous.items():
            signal.signal(s, signal.SIG_IGN if ignore else h)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if self.stopping or self.requested.is_set():
            self.echo(f"{name} again: already stopping (bounded by --drain-timeout)")
        self.requested.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.requested.wait(timeout)


@contextlib.contextmanager
def ray_init_keeping_signals(stop: StopSignals) -> Iterator[None]:
    """While the block runs (``ray.init``), Ray's ``set_sigterm_handler`` does nothing,
    so a SIGTERM during start-up reaches :class:`StopSignals` instead of exiting from
    inside Ray's start-up (which aborted the process and left Ray's agents running)."""
    utils: Any = None
    constants: Any = None
    with contextlib.suppress(ImportError):
        import ray._private.ray_constants as constants
        import ray._private.utils as utils
    original = getattr(utils, "set_sigterm_handler", None)
    if original is not None:
        utils.set_sigterm_handler = lambda handler: None
    if constants is not None:
        # Ray's C++ failure-signal handler also takes SIGTERM, and ray.shutdown resets
        # SIGTERM to the default action, so a signal while the server stopped killed it
        # (exit 143). Kept out of this process only; faulthandler reports crashes instead.
        constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
        if not faulthandler.is_enabled():
            faulthandler.enable()
    try:
        yield
    finally:
        if original is not None:
            utils.set_sigterm_handler = original
        stop.reinstall()


def session_processes(pgid: int, raylets: set[int] = frozenset()) -> list[tuple[int, str]]:
    """``(pid, command)`` of the live processes but this one that belong to the Ray
    session of process group ``pgid``: the group's members (GCS, raylet, agents) and the
    workers of the ``raylets`` (each worker leads its own group, but its environment names
    its raylet as ``RAY_RAYLET_PID``). From ``/proc``; zombies left out."""
    out = []
    me = os.getpid()
    marks = {f"RAY_RAYLET_PID={r}".encode() for r in raylets}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            # the command is in parentheses and may hold spaces; fields follow it
            fields = stat[stat.rindex(")") + 2:].split()
            state, group = fields[0], int(fields[2])
            if state == "Z":
                continue
            if group != pgid:
                if not marks:
                    continue
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if not marks & set(f.read().split(b"\0")):
                        continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue
        out.append((int(entry), cmd or stat[stat.index("(") + 1:stat.rindex(")")]))
    return out


def raylets(pgid: int) -> set[int]:
    """The raylet processes of process group ``pgid`` (taken before Ray shuts down)."""
    return {pid for pid, cmd in session_processes(pgid) if "raylet" in cmd.split(" ")[0]}


def reap_process_group(raylet_pids: set[int], grace_s: float = 5.0
                       ) -> list[tuple[int, str]]:
    """After ``ray.shutdown``: wait up to ``grace_s`` for the rest of this process's
    group and the workers of ``raylet_pids`` to exit, then SIGKILL what is left; the
    processes killed. Does nothing unless this process leads its group (Ray's driver
    does; never a shell's or test runner's)."""
    pgid = os.getpgrp()
    if pgid != os.getpid():
        return []
    deadline = time.monotonic() + grace_s
    left = session_processes(pgid, raylet_pids)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = session_processes(pgid, raylet_pids)
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return left


def run_bounded(fn: Callable[[], Any], timeout_s: float) -> bool:
    """Run ``fn`` in a daemon thread for at most ``timeout_s``; whether it finished."""
    done = threading.Event()

    def target() -> None:
        try:
            fn()
        finally:
            done.set()

    threading.Thread(target=target, daemon=True, name="dgconvert-stop").start()
    return done.wait(timeout_s)


def is_ready(port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> bool:
    """Whether a server on ``host:port`` answers ``GET /v2/health/ready`` with 200."""
    import http.client

    try:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", "/v2/health/ready")
            return conn.getresponse().status == 200
        finally:
            conn.close()
    except OSError:
        return False
