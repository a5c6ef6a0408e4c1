"""The registry of network families: one module per family, one registry line each.

``family(name)`` / ``family_of(net)`` / ``family_names()``; see :mod:`.base` for what a
family provides and ``docs/internals.md`` (Network families) for how to add one.
"""

from dgconvert.gating.families.base import (
    Checkpoint,
    Family,
    ManifestRecord,
    Prune,
    References,
    checkpoint_family,
    family,
    family_names,
    family_of,
    register_family,
)
from dgconvert.gating.families.cut_backbone import CutBackbone
from dgconvert.gating.families.gaternet import GaterNetFamily
from dgconvert.gating.families.gaternet_exits import GaterNetExits
from dgconvert.gating.families.multi_exit import MultiExit
from dgconvert.gating.families.plain import Plain

register_family(CutBackbone())
register_family(MultiExit())
register_family(GaterNetFamily())
register_family(GaterNetExits())
register_family(Plain())

__all__ = [
    "Checkpoint",
    "Family",
    "ManifestRecord",
    "Prune",
    "References",
    "checkpoint_family",
    "family",
    "family_names",
    "family_of",
    "register_family",
]
