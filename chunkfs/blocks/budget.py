"""A byte budget for write buffers, shared by every open file of a mount.

Writers wait when the budget is spent, which bounds the mount's memory however fast
applications write. Waiting always makes progress: a waiter asks the mount to upload
dirty blocks of any file (``relieve``), and every finished upload gives its bytes back.
A wait during which nothing is given back for ``stall_timeout`` seconds (the object
store takes no uploads) fails instead of hanging the writer in the kernel forever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from chunkfs.errors import StorageUnavailable


class WriteBudget:
    def __init__(self, limit: int, *, stall_timeout: float = 60.0) -> None:
        self.limit = limit
        self.used = 0
        self.stall_timeout = stall_timeout
        self.relieve: Callable[[int], None] | None = None  # start uploads of about n bytes
        self._released = 0  # bytes given back so far: tells a waiter that uploads progress
        self._cond = asyncio.Condition()

    async def acquire(self, n: int) -> None:
        if n <= 0:
            return
        async with self._cond:
            seen, since = self._released, time.monotonic()
            while self.used > 0 and self.used + n > self.limit:
                if self.relieve is not None:
                    self.relieve(self.used + n - self.limit)
                if self._released != seen:
                    seen, since = self._released, time.monotonic()
                left = since + self.stall_timeout - time.monotonic()
                if left <= 0:
                    raise StorageUnavailable(
                        f"write buffers ({self.limit} bytes) stayed full for "
                        f"{self.stall_timeout:.0f}s: uploads to the object store make no progress")
                try:
                    await asyncio.wait_for(self._cond.wait(), left)
                except TimeoutError:
                    continue
            self.used += n

    def release(self, n: int) -> None:
        if n <= 0:
            return
        self.used = max(0, self.used - n)
        self._released += n
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()
