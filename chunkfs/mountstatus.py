"""What a mount's status adds for an operator, beyond the counters ``fs.py`` keeps.

* how long the oldest data not yet durable has been waiting (``dirty_age_s``): sampled
  once a second from the files that are not clean, so it is exact to about a second;
* who holds the volume's writer lease, at which epoch, and whether this mount's commits
  are accepted (``writes``: not read-only, not fenced, at the volume's current epoch);
* the metadata engine's last GC run (``cfs{_gc}:last``, read every ``GC_EVERY_S``);
* the volume's last backup (``cfs{ID}:backup``, read with the GC record): ``null``
  until one was made, else its id, url, finished, files, size_bytes, pages_written,
  bytes_written and ``age_s``.

The document stays shallow (the control socket's reader caps the depth at 8) and every
number in it becomes a node metric (``chunkfs_mount_<path>{volume}``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from chunkfs.backup import parse_record
from chunkfs.meta.redis_meta import VolumeMeta
from chunkfs.meta.resp import pairs_to_dict
from chunkfs.meta.schema import GcRun, VolumeRecord

log = logging.getLogger(__name__)

GC_EVERY_S = 30.0


class DirtyClock:
    """Since when each file has had data that is not durable yet."""

    def __init__(self) -> None:
        self._since: dict[int, float] = {}

    def sample(self, unflushed: dict[int, int], now: float | None = None) -> None:
        """``unflushed``: inode -> bytes not durable yet, of every file that is not clean."""
        now = time.time() if now is None else now
        self._since = {ino: self._since.get(ino, now) for ino in unflushed}

    def oldest(self, now: float | None = None) -> float:
        """Seconds the oldest of them has waited (0 when everything is durable)."""
        if not self._since:
            return 0.0
        now = time.time() if now is None else now
        return round(max(0.0, now - min(self._since.values())), 1)

    def files(self) -> int:
        return len(self._since)


class MountState:
    def __init__(self, meta: VolumeMeta) -> None:
        self.meta = meta
        self.dirty = DirtyClock()
        self.last_gc: GcRun | None = None
        self.last_backup: dict[str, Any] | None = None
        self._gc_read = 0.0

    async def refresh(self, unflushed: dict[int, int]) -> None:
        """Called about once a second by the mount's housekeeping loop."""
        self.dirty.sample(unflushed)
        now = time.monotonic()
        if now - self._gc_read < GC_EVERY_S and self._gc_read:
            return
        self._gc_read = now
        try:
            self.last_gc = await self.meta.gc_record()
        except Exception as exc:  # noqa: BLE001 - status only: the next round tries again
            log.warning("reading the last gc run failed", extra={"error": type(exc).__name__})
        try:
            raw = await self.meta.r.execute("HGETALL", self.meta.keys.backup)
            self.last_backup = parse_record(pairs_to_dict(raw))
        except Exception as exc:  # noqa: BLE001 - status only: the next round tries again
            log.warning("reading the last backup failed", extra={"error": type(exc).__name__})

    def document(self, volume: VolumeRecord, *, read_only: bool, fenced: bool) -> dict[str, Any]:
        epoch = volume.epoch
        return {
            "dirty_files": self.dirty.files(), "dirty_age_s": self.dirty.oldest(),
            "lease": {"holder": volume.writer,
                      "epoch": int(epoch) if epoch.isdigit() else 0,
                      "writes": not read_only and not fenced and epoch == self.meta.epoch},
            "last_gc": self._gc(),
            "last_backup": self._backup(),
        }

    def _gc(self) -> dict[str, Any] | None:
        run = self.last_gc
        if run is None:
            return None
        return {**run.as_dict(), "age_s": round(max(0.0, time.time() - run.finished), 1)}

    def _backup(self) -> dict[str, Any] | None:
        last = self.last_backup
        if last is None:
            return None
        return {**last, "age_s": round(max(0.0, time.time() - float(last["finished"])), 1)}
