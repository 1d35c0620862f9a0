"""pyfuse3 on asyncio, without its shutdown race.

pyfuse3's asyncio shim (``pyfuse3.asyncio``) completes a worker's /dev/fuse read future
from two sides without checking either: the event loop's reader callback sets its result
when the fd is readable, and ``notify_closing`` (from ``pyfuse3.close()`` or the SIGTERM
handler ``pyfuse3.terminate()``) sets an exception on it at unmount. When both happen in
one loop iteration the second raises InvalidStateError, which asyncio logs as an
unexpected error of the mount (and it can abort ``terminate()`` half-way). These
replacements complete a future only once; everything else stays pyfuse3's.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pyfuse3.asyncio as shim

# pyfuse3's own, kept for the test that shows the race is real
PYFUSE3_WAIT_READABLE, PYFUSE3_NOTIFY_CLOSING = shim.wait_readable, shim.notify_closing


def enable() -> None:
    """``pyfuse3.asyncio.enable()``, with the race-free readiness functions."""
    shim.enable()
    shim.wait_readable = wait_readable  # type: ignore[assignment]
    shim.notify_closing = notify_closing  # type: ignore[assignment]


async def wait_readable(fd: Any) -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()
    waiting = shim._read_futures[fd]
    waiting.add(future)

    def ready() -> None:
        if not future.done():
            future.set_result(None)

    try:
        loop.add_reader(fd, ready)
        future.add_done_callback(lambda _: loop.remove_reader(fd))
        await future
    finally:
        waiting.discard(future)
        if not waiting:
            shim._read_futures.pop(fd, None)


def notify_closing(fd: Any) -> None:
    for future in list(shim._read_futures.get(fd, ())):
        if not future.done():
            future.set_exception(shim.ClosedResourceError())


__all__ = ["enable", "notify_closing", "wait_readable"]
