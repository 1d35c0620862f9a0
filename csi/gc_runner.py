"""The controller collects garbage by itself: every backend it serves, on a schedule.

Which backends: the default one (the plugin's environment) from the start, and every
backend a StorageClass Secret named in a CSI call this process served (``ServiceCache``
reports each backend it resolves). Secret backends live in memory only: credentials are
never written anywhere, so a controller that restarts knows a Secret backend again only
when a call names it. The calls that make garbage in bulk (DeleteVolume, DeleteSnapshot)
carry the Secret, so a deleted PVC's backend is always known to the replica that deleted
it; a Secret backend that only sees file deletions inside mounts and no controller call
since the restart is not collected until one comes (``chunkfs gc`` runs it by hand).

One runner per backend, whatever the number of replicas: the sidecars elect their own
leaders, so any replica may be the one that served a backend's calls. Each backend's
schedule is a small lease in its own Redis (``cfs{_gc}:sched:<storage url>``, one
script, ``_SCHEDULE``): the replica holding it renews it every tick and is the only one
that starts runs there, when ``next`` is due; another replica takes over once it has not
been renewed for ``HOLD_TICKS`` ticks. GC's own lease (``chunkfs.gc_lease``) still makes
a run exclusive per metadata engine, also against a ``chunkfs gc`` by hand.

Metrics (``chunkfs_gc_*``, label ``storage``: the backend's s3:// URL, no secrets) are
on the controller's metrics endpoint; each run's outcome is also in the engine's Redis
(``cfs{_gc}:last``), where mounts and ``chunkfs volume info`` read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import prometheus_client
from prometheus_client import Counter, Gauge, Histogram

from chunkfs.config import redact_url
from chunkfs.gc import GcRefused, collect_garbage
from chunkfs.logs import scrub
from chunkfs.meta import scripts
from chunkfs.meta.schema import GC_SCHEDULE, lua
from csi.backends import Backend

log = logging.getLogger("chunkfs.csi.gc")

HOLD_TICKS = 3          # a schedule not renewed for this many ticks passes to another replica
MAX_BACKENDS = 256      # Secret backends tracked at most (each is a StorageClass's Secret)
RETRY_S = 300.0         # after a failed or refused run, the next try (at most the interval)

_SCHEDULE = lua(scripts.PRELUDE + r"""
local now = now_ms()
local st = redis.call('HMGET', KEYS[1], S.owner, S.held, S.next)
local owner, held, due = st[1], tonumber(st[2] or '0'), tonumber(st[3] or '0')
local mine = owner == ARGV[1]
if ARGV[2] == 'release' then
  if mine then redis.call('HDEL', KEYS[1], S.owner, S.held) end
  return {0, due}
end
if owner and not mine and held > now then return {0, due} end
redis.call('HSET', KEYS[1], S.owner, ARGV[1], S.held, I(now + tonumber(ARGV[4])))
if ARGV[2] == 'retry' then
  redis.call('HSET', KEYS[1], S.next, I(now + tonumber(ARGV[3])))
  return {1, now + tonumber(ARGV[3])}
end
if due > now then return {1, due} end
redis.call('HSET', KEYS[1], S.next, I(now + tonumber(ARGV[3])))
return {2, now + tonumber(ARGV[3])}
""")
OTHER, MINE, RUN = 0, 1, 2


class Periodic:
    """A job run every ``interval`` seconds per backend (0: off), by the leader only."""

    interval: float

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    @property
    def tick(self) -> float:
        """How often each backend's schedule is checked (and its claim renewed)."""
        return min(30.0, max(0.2, self.interval / 4))


@dataclass(frozen=True)
class GcSettings(Periodic):
    interval: float = 3600.0      # seconds between two runs of one backend; 0: off
    grace: float = 3600.0
    session_grace: float = 600.0
    dry_run: bool = False
    work_dir: str | None = None


class GcMetrics:
    def __init__(self, registry: prometheus_client.CollectorRegistry) -> None:
        labels = ["storage"]
        self.runs = Counter("chunkfs_gc_runs", "GC runs started by this controller, by outcome "
                            "(ok, error, refused: another run held the engine's lease or a "
                            "reshard was under way)", ["result", "storage"], registry=registry)
        self.deleted = Counter("chunkfs_gc_deleted_objects", "Block objects GC deleted",
                               labels, registry=registry)
        self.deleted_bytes = Counter("chunkfs_gc_deleted_bytes", "Bytes of the block objects "
                                     "GC deleted", labels, registry=registry)
        self.garbage = Gauge("chunkfs_gc_last_run_garbage_objects", "Objects the last run "
                             "deleted (in dry-run mode: would have deleted)", labels,
                             registry=registry)
        self.garbage_bytes = Gauge("chunkfs_gc_last_run_garbage_bytes", "Bytes of those",
                                   labels, registry=registry)
        self.objects = Gauge("chunkfs_gc_last_run_objects", "Block objects the last run listed",
                             labels, registry=registry)
        self.duration = Histogram(
            "chunkfs_gc_run_duration_seconds", "Time of a GC run", labels, registry=registry,
            buckets=(1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 21600, 86400))
        self.last_run = Gauge("chunkfs_gc_last_run_timestamp_seconds", "When the last run "
                              "ended", labels, registry=registry)
        self.last_success = Gauge("chunkfs_gc_last_success_timestamp_seconds", "When a run "
                                  "last ended well", labels, registry=registry)
        self.last_error = Gauge("chunkfs_gc_last_error_timestamp_seconds", "When a run last "
                                "failed", labels, registry=registry)
        self.last_error_info = Gauge("chunkfs_gc_last_error_info", "1 for the type of the "
                                     "last run's error (none when it ended well)",
                                     ["error", "storage"], registry=registry)
        self.leader = Gauge("chunkfs_gc_leader", "1 when this replica runs GC for the backend",
                            labels, registry=registry)
        self.backends = Gauge("chunkfs_gc_backends", "Backends this controller collects",
                              registry=registry)
        self.interval = Gauge("chunkfs_gc_interval_seconds", "Seconds between two runs of "
                              "a backend (0: automatic GC is off)", registry=registry)
        self.dry_run = Gauge("chunkfs_gc_dry_run", "1 when runs only report what they would "
                             "delete", registry=registry)


@dataclass
class _Tracked:
    backend: Backend
    label: str
    svc: Any = None
    reopen: bool = False  # newer credentials arrived: open a new service before the next run
    loop: asyncio.Task[None] | None = None
    run: asyncio.Task[None] | None = None
    error_type: str = ""
    leader: bool = False
    runs: int = 0


Opener = Callable[[str, Any], Awaitable[Any]]


class GcRunner:
    """Runs GC on each tracked backend, one replica per backend. ``csi/backup_runner.py``
    reuses the schedule for backups (another schedule key, another ``_run``)."""

    SCHEDULE = GC_SCHEDULE

    def __init__(self, settings: Any, metrics: Any, *,
                 opener: Opener | None = None, replica: str | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.replica = replica or f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"
        self._opener = opener
        self._tracked: dict[tuple[str, str], _Tracked] = {}
        self._started = False
        self._warned_full = False
        self._announce_settings()

    def _announce_settings(self) -> None:
        self.metrics.interval.set(self.settings.interval if self.settings.enabled else 0)
        self.metrics.dry_run.set(1 if self.settings.dry_run else 0)

    def _describe(self, backend: Backend) -> str:
        return (f"collecting garbage of {backend.describe()} every "
                f"{self.settings.interval:.0f}s{' (dry run)' if self.settings.dry_run else ''}")

    # --- which backends ---------------------------------------------------------------

    def track(self, backend: Backend) -> None:
        """A backend this process served: collect it from now on (idempotent, cheap).
        One backend is one Redis database and storage prefix: credentials that change
        (a rotated Secret) replace the old ones for the next run."""
        if not self.settings.enabled:
            return
        key = (redact_url(backend.meta_url), backend.storage.url)
        known = self._tracked.get(key)
        if known is not None:
            if known.backend != backend:
                known.backend, known.reopen = backend, True
            return
        if len(self._tracked) >= MAX_BACKENDS:
            if not self._warned_full:
                log.warning("not collecting more than %d backends", MAX_BACKENDS)
                self._warned_full = True
            return
        tracked = _Tracked(backend, backend.storage.url)
        self._tracked[key] = tracked
        self.metrics.backends.set(len(self._tracked))
        log.info("%s", self._describe(backend))
        if self._started:
            tracked.loop = asyncio.create_task(self._schedule(tracked))

    def start(self) -> None:
        self._started = True
        for tracked in self._tracked.values():
            if tracked.loop is None or tracked.loop.done():
                tracked.loop = asyncio.create_task(self._schedule(tracked))

    async def stop(self) -> None:
        """Stop scheduling, cancel runs in progress (each releases its GC lease), and hand
        every schedule this replica holds to the others right away."""
        self._started = False
        tasks = [t for tr in self._tracked.values() for t in (tr.loop, tr.run) if t]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        for tracked in self._tracked.values():
            if tracked.svc is None:
                continue
            with contextlib.suppress(Exception):
                if tracked.leader:
                    await asyncio.wait_for(self._claim(tracked, "release"), 2)
                await tracked.svc.close()
            tracked.svc = None

    def status(self) -> list[dict[str, Any]]:
        """For tests and logs: what each tracked backend is doing."""
        return [{"storage": t.label, "leader": t.leader, "runs": t.runs,
                 "running": t.run is not None and not t.run.done()}
                for t in self._tracked.values()]

    # --- the schedule ----------------------------------------------------------------

    async def _service(self, tracked: _Tracked) -> Any:
        if tracked.reopen and (tracked.run is None or tracked.run.done()):
            tracked.reopen = False
            old, tracked.svc = tracked.svc, None
            if old is not None:
                with contextlib.suppress(Exception):
                    await old.close()
        if tracked.svc is None:
            opener = self._opener
            if opener is None:
                from chunkfs.volumes import VolumeService

                opener = VolumeService.open
            tracked.svc = await opener(tracked.backend.meta_url, tracked.backend.storage)
        return tracked.svc

    async def _claim(self, tracked: _Tracked, action: str = "tick") -> int:
        svc = await self._service(tracked)
        s = self.settings
        hold_ms = int(s.tick * HOLD_TICKS * 1000)
        after_ms = int((s.interval if action == "tick" else min(s.interval, RETRY_S)) * 1000)
        verdict, _ = await svc.r.eval(_SCHEDULE, 1, f"{self.SCHEDULE}:{tracked.label}",
                                      self.replica, action, after_ms, hold_ms)
        return int(verdict)

    async def _schedule(self, tracked: _Tracked) -> None:
        while True:
            try:
                verdict = await self._claim(tracked)
            except Exception as exc:  # noqa: BLE001 - Redis down: try again next tick
                verdict = OTHER
                log.warning("schedule %s of %s unreachable: %s", self.SCHEDULE,
                            tracked.label, type(exc).__name__)
            tracked.leader = verdict != OTHER
            self.metrics.leader.labels(tracked.label).set(1 if tracked.leader else 0)
            if verdict == RUN and (tracked.run is None or tracked.run.done()):
                tracked.run = asyncio.create_task(self._run(tracked))
            await asyncio.sleep(self.settings.tick)

    async def _run(self, tracked: _Tracked) -> None:
        s, m, label = self.settings, self.metrics, tracked.label
        tracked.runs += 1
        start = time.monotonic()
        try:
            svc = await self._service(tracked)
            report = await collect_garbage(svc.r, svc.store, grace=s.grace, dry_run=s.dry_run,
                                           session_grace=s.session_grace, work_dir=s.work_dir)
        except Exception as exc:  # noqa: BLE001 - every failure is a metric and a log line
            refused = isinstance(exc, GcRefused)
            m.runs.labels(result="refused" if refused else "error", storage=label).inc()
            self._failed(tracked, exc, time.monotonic() - start)
            with contextlib.suppress(Exception):
                await self._claim(tracked, "retry")
            return
        m.runs.labels(result="ok", storage=label).inc()
        m.duration.labels(label).observe(report.seconds)
        if not s.dry_run:
            m.deleted.labels(label).inc(report.deleted)
            m.deleted_bytes.labels(label).inc(report.deleted_bytes)
        m.garbage.labels(label).set(report.deleted)
        m.garbage_bytes.labels(label).set(report.deleted_bytes)
        m.objects.labels(label).set(report.objects)
        now = time.time()
        m.last_run.labels(label).set(now)
        m.last_success.labels(label).set(now)
        if tracked.error_type:
            m.last_error_info.remove(tracked.error_type, label)
            tracked.error_type = ""
        log.info("gc run of %s done", label, extra={"fields": {
            "storage": label, "dry_run": s.dry_run, "objects": report.objects,
            "deleted": report.deleted, "deleted_bytes": report.deleted_bytes,
            "reprieved": report.reprieved, "seconds": round(report.seconds, 2)}})

    def _failed(self, tracked: _Tracked, exc: Exception, seconds: float) -> None:
        m, label = self.metrics, tracked.label
        now = time.time()
        m.duration.labels(label).observe(seconds)
        m.last_run.labels(label).set(now)
        m.last_error.labels(label).set(now)
        if tracked.error_type:
            m.last_error_info.remove(tracked.error_type, label)
        tracked.error_type = type(exc).__name__
        m.last_error_info.labels(error=tracked.error_type, storage=label).set(1)
        level = logging.INFO if isinstance(exc, GcRefused) else logging.ERROR
        log.log(level, "gc run of %s did not complete: %s", label,
                scrub(f"{type(exc).__name__}: {exc}"),
                extra={"fields": {"storage": label, "error": type(exc).__name__}})
