"""The volume's live state as one mount knows it: capacity, usage, writer epoch, fenced.

One object owns it, and one task (``run``) keeps it current: the volume's hash read
every second (a live resize, a revoked writer lease), the session renewed every 20 s.
The filesystem reads it for admission (ENOSPC before buffering, EIO once fenced) and
for the status, and changes it only through its methods (``refused``: a script turned
this mount's epoch or session down). Usage is what Redis said at the last read plus
what this mount's own commits added since (``VolumeMeta.charged``), so a mount never
admits bytes its own recent commits already spent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from chunkfs.errors import Fenced, SessionExpired
from chunkfs.meta.redis_meta import VolumeMeta
from chunkfs.meta.schema import VolumeRecord

log = logging.getLogger(__name__)

REFRESH_S = 1.0
HEARTBEAT_EVERY = 20  # refreshes between session renewals


class VolumeState:
    def __init__(self, meta: VolumeMeta, record: VolumeRecord) -> None:
        self.meta = meta
        self.record = record  # the volume's hash as last read
        self.fenced = False

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def capacity(self) -> int:
        return self.record.capacity

    @property
    def used(self) -> int:
        """Bytes in use: the last read, plus our commits since."""
        return self.record.used + self.meta.charged

    def check_writable(self) -> None:
        """Raise ``Fenced`` once this mount may no longer change the volume."""
        if self.fenced:
            raise Fenced("writer lease revoked: this node may no longer write the volume")

    def refused(self) -> None:
        """A script refused this mount's epoch or session: fenced from now on (the
        refused operation reports the error itself)."""
        self.fenced = True

    def fence(self, why: str, **extra: Any) -> None:
        """From now on this mount changes nothing (its lease or session is gone)."""
        if not self.fenced:
            log.error(why, extra=extra)
        self.fenced = True

    async def refresh_usage(self) -> VolumeRecord:
        """Capacity and usage from Redis now (near the limit, before admitting a write)."""
        state = await self.meta.volume_state()
        if state is None:  # the volume's record is gone: keep what we knew
            return self.record
        self.record = replace(self.record, capacity=state.capacity, used=state.used)
        return state

    async def refresh(self) -> None:
        """The whole record; fences the mount when another writer holds the lease now."""
        state = await self.meta.volume_state()
        if state is None:
            return
        self.record = state
        if not self.meta.read_only and state.epoch != self.meta.epoch:
            self.fence("writer lease revoked: fencing this mount", epoch=self.meta.epoch,
                       current=state.epoch)

    async def run(self, tick: Callable[[], Awaitable[None]],
                  on_dead: Callable[[str], None]) -> None:
        """Until cancelled: ``tick`` (the status's clocks) and a refresh every second, the
        session renewed every ``HEARTBEAT_EVERY``; ``on_dead`` hears why the session was
        declared dead (the mount is fenced then)."""
        beats = 0
        while True:
            await asyncio.sleep(REFRESH_S)
            beats += 1
            await tick()
            if beats % HEARTBEAT_EVERY == 0 and not self.fenced:
                try:
                    await self.meta.heartbeat()
                except SessionExpired as exc:
                    self.fence("session declared dead: fencing this mount", error=str(exc))
                    on_dead(f"heartbeat: {exc}")
                except Exception as exc:
                    log.warning("session heartbeat failed", extra={"error": str(exc)})
            try:
                await self.refresh()
            except Exception as exc:  # keep serving; the next operation will report it
                log.warning("volume refresh failed", extra={"error": str(exc)})
