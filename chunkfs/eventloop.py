"""The event loop a mount runs on: asyncio's own, or uvloop's.

A mount is bound by its CPU (Python, on cores it shares with the node's other work), and
a good part of that CPU is the event loop itself: one callback per FUSE request, per
Redis reply, per S3 response chunk. uvloop (libuv, in C) runs the same asyncio programs
with less of it; which one a mount uses is ``$CHUNKFS_EVENT_LOOP`` (``uvloop`` or
``asyncio``), the default being the one the benchmark measured better (docs/dev/chunkfs.md,
"Event loop"). Without uvloop installed, a mount falls back to asyncio and says so.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
ENV = "CHUNKFS_EVENT_LOOP"
CHOICES = ("uvloop", "asyncio")
DEFAULT = "uvloop"
log = logging.getLogger(__name__)


def chosen() -> str:
    """The loop ``$CHUNKFS_EVENT_LOOP`` asks for; ValueError names the choices."""
    value = os.environ.get(ENV, "").strip().lower() or DEFAULT
    if value not in CHOICES:
        raise ValueError(f"${ENV} must be one of {', '.join(CHOICES)}, not {value!r}")
    return value


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the chosen loop."""
    if chosen() == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed: the mount runs on asyncio's loop",
                        extra={"fields": {"env": ENV}})
        else:
            return uvloop.run(main)
    return asyncio.run(main)
