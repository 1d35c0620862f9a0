"""Crash points for the tests of what survives a crash at a given instant.

``CHUNKFS_CRASH_AT=<point>`` in a mount's environment makes the mount process exit at
once (as SIGKILL would) the first time it reaches that point. Nothing else reads it; a
production mount never sets it. The points (where the data path calls ``crash_point``):

    before-commit       a flush stored its generations (uploads done), its commit is not sent
    before-upkeep-commit  a slice move or compaction uploaded its object, not committed
"""

from __future__ import annotations

import os

_AT = os.environ.get("CHUNKFS_CRASH_AT", "")


def crash_point(name: str) -> None:
    if _AT == name:
        os._exit(137)
