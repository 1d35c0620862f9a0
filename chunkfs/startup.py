"""Connecting a new mount to its backends: everything at once, and timed.

Before a mount can serve its first read it needs the S3 client (CPU: botocore builds it
from its JSON models), Redis (the durability check, the volume's record, this engine's
identity), the storage prefix's claim marker (one S3 GET, ``chunkfs.claim``) and the
local cache's index (the node's shared index of the cache directory; a scan of the
directory only when no other mount uses it). None of these waits for another,
so they run concurrently and the mount waits for the slowest of them instead of their
sum. Only then come the steps that need their results: claiming a prefix nobody has
claimed yet (rare, and only once the volume is known to exist) and this mount's first
session heartbeat. Housekeeping that the first read does not need (reaping orphans of
dead mounts) runs after the mount is ready (``chunkfs.mount``).

The marker GET doubles as the check that the bucket answers with these credentials (a
separate "ping" request would only repeat it). Failures keep their meaning: the first
part to fail cancels the others and its error is the mount's error.

``Timeline`` records when each step finished, in milliseconds since the mount started,
plus how old the process was then (its imports); the mount logs it with ``mounted``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chunkfs.cache import BlockCache
from chunkfs.claim import claim_storage, read_marker
from chunkfs.errors import VolumeNotFound
from chunkfs.meta import durability, redis_url
from chunkfs.meta.redis_meta import VolumeMeta, connect, connect_fast, with_retries
from chunkfs.meta.schema import ENGINE, VOLUMES, Keys, VolumeRecord
from chunkfs.objstore import ObjectStore

if TYPE_CHECKING:
    from chunkfs.mount import MountConfig

REDIS_DEADLINE = 10.0    # seconds a startup Redis step retries a lost connection
STORAGE_DEADLINE = 15.0  # seconds the marker GET retries an unreachable S3 (at most io-timeout)
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_age() -> float:
    """Seconds since this process started (its start time from /proc, to 1/CLK_TCK)."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / _CLK_TCK
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, IndexError, ValueError):
        return 0.0


@dataclass
class Timeline:
    """Milliseconds from the start of the mount to each step of its startup."""

    start: float = field(default_factory=time.monotonic)
    process_age_ms: float = field(default_factory=lambda: round(process_age() * 1000, 1))
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, step: str) -> None:
        self.marks[step] = round((time.monotonic() - self.start) * 1000, 1)

    def as_dict(self) -> dict[str, Any]:
        return {"process_age_at_start": self.process_age_ms, **self.marks}


@dataclass
class Backends:
    """What a mount's filesystem is built from, connected and checked."""

    store: ObjectStore
    meta: VolumeMeta
    cache: BlockCache
    state: VolumeRecord
    durable: durability.Durability


@dataclass
class _Volume:
    keys: Keys
    state: VolumeRecord
    durable: durability.Durability
    engine: str | None


async def connect_backends(cfg: MountConfig, stack: contextlib.AsyncExitStack,
                           clock: Timeline) -> Backends:
    """Connect and check everything a mount needs; closers are pushed onto ``stack``."""
    admin = connect(cfg.meta_url)
    try:
        volume, cache, (store, marker) = await together(
            _volume(cfg, admin, clock), _cache(cfg, clock), _storage(cfg, stack, clock))
        if volume.engine is None or volume.engine != marker:
            # a prefix nobody claimed yet (claimed now), or a refusal that says whose it is
            await with_retries(lambda: claim_storage(admin, store), deadline=REDIS_DEADLINE)
            clock.mark("storage claimed")
    finally:
        await admin.aclose()
    client = connect_fast(cfg.meta_url, timeout=min(10.0, cfg.io_timeout))
    stack.push_async_callback(client.aclose)
    epoch = cfg.epoch if cfg.epoch is not None else volume.state.epoch or "1"
    meta = VolumeMeta(client, volume.keys.ns, epoch=epoch, session=secrets.token_hex(6),
                      read_only=cfg.read_only or volume.state.kind == "snapshot",
                      deadline=cfg.io_timeout)
    await meta.heartbeat()  # registers the session (a no-op read-only): writes need it
    clock.mark("session")
    return Backends(store, meta, cache, volume.state, volume.durable)


async def _volume(cfg: MountConfig, admin: Any, clock: Timeline) -> _Volume:
    # the durability check comes first: a plain URL to a cluster node is refused before
    # the volume lookup meets a MOVED
    durable, engine = await asyncio.gather(
        with_retries(lambda: durability.check(admin, redis_url.parse(cfg.meta_url)),
                     deadline=REDIS_DEADLINE),
        with_retries(lambda: admin.get(ENGINE), deadline=REDIS_DEADLINE),
        return_exceptions=True)
    for result in (durable, engine):
        if isinstance(result, BaseException):
            raise result
    assert isinstance(durable, durability.Durability)
    durability.log_report(durable)
    clock.mark("redis checked")
    ns = await with_retries(lambda: admin.hget(VOLUMES, cfg.volume), deadline=REDIS_DEADLINE)
    if ns is None:
        raise VolumeNotFound(f"volume {cfg.volume!r} not found")
    keys = Keys(ns.decode())
    raw = await with_retries(lambda: admin.hgetall(keys.vol), deadline=REDIS_DEADLINE)
    clock.mark("volume")
    return _Volume(keys, VolumeRecord.parse(raw), durable,
                   engine.decode() if isinstance(engine, bytes) else None)


async def _cache(cfg: MountConfig, clock: Timeline) -> BlockCache:
    cache = await BlockCache.open(cfg.cache_dir, cfg.cache_size, volume=cfg.volume,
                                  volume_limit=cfg.volume_cache)
    clock.mark("cache scanned")
    return cache


async def _storage(cfg: MountConfig, stack: contextlib.AsyncExitStack,
                   clock: Timeline) -> tuple[ObjectStore, str | None]:
    store = await ObjectStore.create(cfg.storage, deadline=cfg.io_timeout)
    stack.push_async_callback(store.close)
    clock.mark("s3 client")
    marker = await read_marker(store, deadline=min(cfg.io_timeout, STORAGE_DEADLINE))
    clock.mark("storage marker")
    return store, marker


async def together(*steps: Awaitable[Any]) -> list[Any]:
    """Run ``steps`` concurrently; the first to fail cancels the others and its error is
    raised (steps failing at the same moment: the first in argument order)."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
