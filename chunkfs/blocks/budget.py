"""A byte budget for write buffers, shared by every open file of a mount.

Writers wait when the budget is spent, which bounds the mount's memory however fast
applications write; a waiter can ask its file to start uploads so that waiting
always makes progress.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class WriteBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond = asyncio.Condition()

    async def acquire(self, n: int, on_pressure: Callable[[], None] | None = None) -> None:
        if n <= 0:
            return
        async with self._cond:
            while self.used > 0 and self.used + n > self.limit:
                if on_pressure is not None:
                    on_pressure()
                await self._cond.wait()
            self.used += n

    def release(self, n: int) -> None:
        if n <= 0:
            return
        self.used = max(0, self.used - n)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()
