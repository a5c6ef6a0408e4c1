"""The state of a backend's fast paths, typed: decisions read :class:`FastPath` fields, the
messages users see are derived from them (never parsed back).

A fast path is ``on``; ``off_by_choice`` (the caller turned it off, or it does not apply
here: another execution provider, one stage, nothing to fuse); or ``off_because`` it was
wanted and could not be used (a failed self-check, a missing package), which the user is
told about (:meth:`Backend.fast_paths_off`, a logged warning, a visible line).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum


class PathState(Enum):
    ON = "on"
    OFF_BY_CHOICE = "off_by_choice"
    OFF_BECAUSE = "off_because"


@dataclass(frozen=True)
class FastPath:
    """One fast path: its ``name``, ``state`` and ``detail`` (on: what runs, e.g. ``one
    session``; off: why, or the option that turned it off, written ``(option=False)``)."""

    name: str
    state: PathState
    detail: str = ""

    @classmethod
    def on(cls, name: str, detail: str) -> FastPath:
        return cls(name, PathState.ON, detail)

    @classmethod
    def by_choice(cls, name: str, detail: str = "") -> FastPath:
        return cls(name, PathState.OFF_BY_CHOICE, detail)

    @classmethod
    def failed(cls, name: str, detail: str) -> FastPath:
        return cls(name, PathState.OFF_BECAUSE, detail)

    def named(self, name: str) -> FastPath:
        """The same state for another path (one reason that turns off several)."""
        return replace(self, name=name)

    @property
    def is_on(self) -> bool:
        return self.state is PathState.ON

    @property
    def unwanted_off(self) -> bool:
        """Wanted but off: the user must be told."""
        return self.state is PathState.OFF_BECAUSE

    @property
    def text(self) -> str:
        """The state as ``describe()`` shows it: ``one session``, ``off: <why>``, ``off
        (compose=False)``, ``off``."""
        if self.is_on:
            return self.detail
        if not self.detail:
            return "off"
        return f"off {self.detail}" if self.detail.startswith("(") else f"off: {self.detail}"

    @property
    def message(self) -> str:
        """``<name> <text>``, as :meth:`Backend.fast_paths_off` lists it."""
        return f"{self.name} {self.text}"
