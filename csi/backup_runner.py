"""The controller backs every volume up by itself: each backend it serves, on a schedule.

Losing Redis loses at most the time since the last backup. Which backends, and that
one replica runs each whatever the number of replicas, is GC's machinery
(``csi/gc_runner.py``) with its own schedule key (``cfs{_gc}:bsched:<storage url>``).
A run backs up every volume of the backend in turn (``VolumeService.backup_volume``:
incremental, the newest ``keep`` backups kept); a volume whose backup is already in
progress (``chunkfs volume backup`` by hand) is skipped until the next run.

Metrics (``chunkfs_backup_*``, label ``storage``) are on the controller's metrics
endpoint; each volume's last backup is also in its Redis (``cfs{ID}:backup``), where
mounts and ``chunkfs volume info`` read it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import prometheus_client
from prometheus_client import Counter, Gauge

from chunkfs.backup import DEFAULT_KEEP
from chunkfs.errors import BackupBusy, VolumeNotFound
from chunkfs.logs import scrub
from csi.backends import Backend
from csi.gc_runner import GcRunner, Periodic, _Tracked

log = logging.getLogger("chunkfs.csi.backup")

BACKUP_SCHEDULE = "cfs{_gc}:bsched"


@dataclass(frozen=True)
class BackupSettings(Periodic):
    interval: float = 3600.0      # seconds between two backups of a backend's volumes; 0: off
    keep: int = DEFAULT_KEEP      # backups kept per volume
    dry_run: bool = False         # (the schedule's interface; backups have no dry run)


class BackupMetrics:
    def __init__(self, registry: prometheus_client.CollectorRegistry) -> None:
        labels = ["storage"]
        self.runs = Counter("chunkfs_backup_runs", "Backup runs (every volume of a backend) "
                            "by outcome (ok, error: some volume failed)", ["result", "storage"],
                            registry=registry)
        self.volumes = Counter("chunkfs_backup_volumes", "Volume backups made, by outcome "
                               "(ok, error, busy: one was in progress already)",
                               ["result", "storage"], registry=registry)
        self.written = Counter("chunkfs_backup_written_bytes", "Bytes of manifests and pages "
                               "the backups wrote", labels, registry=registry)
        self.last_success = Gauge("chunkfs_backup_last_success_timestamp_seconds", "When a "
                                  "run last backed up every volume", labels, registry=registry)
        self.last_seconds = Gauge("chunkfs_backup_last_run_seconds", "Time of the last run",
                                  labels, registry=registry)
        self.leader = Gauge("chunkfs_backup_leader", "1 when this replica backs the backend "
                            "up", labels, registry=registry)
        self.backends = Gauge("chunkfs_backup_backends", "Backends this controller backs up",
                              registry=registry)
        self.interval = Gauge("chunkfs_backup_interval_seconds", "Seconds between two backups "
                              "of a backend's volumes (0: automatic backups are off)",
                              registry=registry)
        self.keep = Gauge("chunkfs_backup_keep", "Backups kept per volume", registry=registry)


class BackupRunner(GcRunner):
    SCHEDULE = BACKUP_SCHEDULE

    def _announce_settings(self) -> None:
        self.metrics.interval.set(self.settings.interval if self.settings.enabled else 0)
        self.metrics.keep.set(self.settings.keep)

    def _describe(self, backend: Backend) -> str:
        return (f"backing up the volumes of {backend.describe()} every "
                f"{self.settings.interval:.0f}s, keeping {self.settings.keep}")

    async def _run(self, tracked: _Tracked) -> None:
        m, label = self.metrics, tracked.label
        tracked.runs += 1
        start = time.monotonic()
        failed = 0
        try:
            svc = await self._service(tracked)
            names = [v.name for v in await svc.list_volumes()]
        except Exception as exc:  # noqa: BLE001 - a metric and a log line; next run retries
            m.runs.labels(result="error", storage=label).inc()
            log.error("backup run of %s could not list volumes: %s", label,
                      scrub(f"{type(exc).__name__}: {exc}"))
            with contextlib.suppress(Exception):
                await self._claim(tracked, "retry")
            return
        for name in names:
            try:
                report = await svc.backup_volume(name, keep=self.settings.keep)
            except BackupBusy:
                m.volumes.labels(result="busy", storage=label).inc()
                continue
            except VolumeNotFound:
                continue  # deleted since the listing
            except Exception as exc:  # noqa: BLE001 - the other volumes still get theirs
                failed += 1
                m.volumes.labels(result="error", storage=label).inc()
                log.error("backup of volume %s on %s failed: %s", name, label,
                          scrub(f"{type(exc).__name__}: {exc}"),
                          extra={"fields": {"storage": label, "volume": name,
                                            "error": type(exc).__name__}})
                continue
            m.volumes.labels(result="ok", storage=label).inc()
            m.written.labels(label).inc(report.bytes_written)
            log.info("backed up volume %s", name, extra={"fields": {
                "storage": label, "volume": name, "url": report.url, "kind": report.kind,
                "inodes_read": report.captured, "files": report.files,
                "pages_written": report.pages_written, "pages": report.pages,
                "bytes_written": report.bytes_written, "expired": len(report.expired)}})
        m.last_seconds.labels(label).set(time.monotonic() - start)
        m.runs.labels(result="error" if failed else "ok", storage=label).inc()
        if not failed:
            m.last_success.labels(label).set(time.time())
        else:
            with contextlib.suppress(Exception):
                await self._claim(tracked, "retry")
