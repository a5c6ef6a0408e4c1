"""Replica loss between deployments: a call whose replica dies is retried once on a live
replica (inference is idempotent), else it becomes a 503 with ``Retry-After``. Used by
the ``--split-stages`` ingress for its calls to the stage deployments; the proxy-side
guard (``ingress.py``) does the same for requests whose ingress replica dies."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from dgconvert.serve.protocol import RETRY_AFTER_S, unavailable

T = TypeVar("T")


def replica_lost_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the replica went away": worth one retry elsewhere."""
    from ray import exceptions as rx
    from ray.serve import exceptions as sx

    return (rx.RayActorError, rx.WorkerCrashedError, rx.NodeDiedError,
            sx.ReplicaUnavailableError)


def capacity_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "no replica can take it now": a 503 at once."""
    from ray.serve import exceptions as sx

    return (sx.BackPressureError, sx.DeploymentUnavailableError)


async def retry_once(call: Callable[[], Awaitable[T]], what: str) -> T:
    """``await call()``; on replica loss once more (Serve routes the retry to a live
    replica), then a 503 :class:`ProtocolError` naming what was lost."""
    try:
        return await _capacity_checked(call, what)
    except replica_lost_errors():
        pass
    try:
        return await _capacity_checked(call, what)
    except replica_lost_errors() as exc:
        raise unavailable(f"the replica of {what} serving this request stopped "
                          f"({type(exc).__name__}), and so did the one it was retried on; "
                          f"Ray Serve is replacing them. Retry after {RETRY_AFTER_S} s") from None


async def _capacity_checked(call: Callable[[], Awaitable[T]], what: str) -> T:
    try:
        return await call()
    except capacity_errors() as exc:
        raise unavailable(f"{what} has no free replica ({type(exc).__name__}); retry after "
                          f"{RETRY_AFTER_S} s, or serve more --replicas") from None


class RetryingHandle:
    """A deployment handle whose ``handle.method.remote(...)`` calls retry once on
    replica loss (awaitable, as the handle's responses are)."""

    def __init__(self, handle: Any, what: str) -> None:
        self._handle = handle
        self._what = what

    def __getattr__(self, method: str) -> Any:
        handle, what = self._handle, self._what

        class _Method:
            @staticmethod
            def remote(*args: Any, **kwargs: Any) -> Awaitable[Any]:
                async def call() -> Any:
                    return await getattr(handle, method).remote(*args, **kwargs)

                return retry_once(call, what)

        return _Method()
