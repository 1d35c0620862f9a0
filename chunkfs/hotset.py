"""Warm start: the blocks a volume's readers used most recently follow it to a new node.

A mount remembers the last ``limit`` block files its readers asked the cache for (hits
and misses: ``BlockCache.on_read``) and merges them, every ``publish_s`` seconds and at
unmount, into the volume's hot set in Redis (``cfs{ID}:hot``, a ZSET of block file
names "<sha256>_<size>" scored by the unix ms of their last read, trimmed to the
newest ``limit``; several mounts of an RWX volume merge into one set). When the volume
is mounted again (a rescheduled pod on another node), the ``Prefetcher`` reads the set
and fetches the blocks the local cache lacks, newest first, in the background:

- bounded: at most ``budget`` bytes, and never more than the cache's own bound allows
  (it puts into the cache like any fetch, so the cache's LRU and bound apply);
- lowest priority: one GET at a time while readers are active (a reader asked the cache
  for a block within the last ``quiet_s``, or the mount is younger than ten times that),
  ``concurrency`` GETs when they are idle; a block a reader asked for or brought in
  meanwhile is left to the reader (no second GET of it);
- verified: every fetched block is checked against its content hash before it enters
  the cache (the hot set is advisory: a name whose object is gone is skipped);
- cancellable: the mount cancels it at unmount; its progress is in ``status``
  (``warm``) and therefore in the node plugin's metrics.

Inline slices live in Redis and are never cached on disk: they are not in the hot set.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

from chunkfs.cache import BlockCache
from chunkfs.errors import NoSuchObject
from chunkfs.objstore import ObjectStore, block_key

log = logging.getLogger(__name__)

_NAME = re.compile(r"([0-9a-f]{64})_([0-9]+)")
PUBLISH_S = 30.0


def parse_name(name: str) -> tuple[str, int] | None:
    """(digest, size) of a block file name; None for anything else."""
    match = _NAME.fullmatch(name)
    return (match.group(1), int(match.group(2))) if match else None


class HotSet:
    """The block files this mount's readers asked for most recently (bounded)."""

    def __init__(self, key: str, limit: int = 1000) -> None:
        self.key = key
        self.limit = limit
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._fresh: set[str] = set()  # seen since the last publication
        self.published = 0
        self.last_publish: float | None = None

    def saw(self, name: str) -> None:
        """Called by the cache for every block a reader asked for (cheap: no I/O)."""
        if self.limit <= 0:
            return
        self._seen[name] = time.time()
        self._seen.move_to_end(name)
        self._fresh.add(name)
        if len(self._seen) > self.limit:
            old, _ = self._seen.popitem(last=False)
            self._fresh.discard(old)

    async def publish(self, client: Any) -> int:
        """Merge what was read since the last call into the volume's hot set."""
        fresh = [(name, self._seen[name]) for name in self._fresh if name in self._seen]
        if not fresh:
            return 0
        args: list[Any] = []
        for name, when in fresh:
            args += [int(when * 1000), name]
        await client.pipeline([("ZADD", self.key, *args),
                               ("ZREMRANGEBYRANK", self.key, 0, -(self.limit + 1))], write=True)
        self._fresh.clear()
        self.published += len(fresh)
        self.last_publish = time.time()
        return len(fresh)

    async def keep_publishing(self, client: Any, every: float = PUBLISH_S) -> None:
        """Publish periodically until cancelled (errors are logged, never raised)."""
        while True:
            await asyncio.sleep(every)
            await self.publish_quietly(client)

    async def publish_quietly(self, client: Any) -> None:
        try:
            await self.publish(client)
        except Exception as exc:  # advisory data: the next round tries again
            log.info("hot set not published", extra={"error": str(exc)})

    def as_dict(self) -> dict[str, Any]:
        return {"entries": len(self._seen), "limit": self.limit, "published": self.published,
                "last_publish": round(self.last_publish, 3) if self.last_publish else None}


async def read_hot_set(client: Any, key: str, limit: int) -> list[str]:
    """The volume's hot set, most recently read first (only well-formed names)."""
    raw = await client.execute("ZREVRANGE", key, 0, max(0, limit - 1))
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in raw or []]
    return [n for n in names if parse_name(n) is not None]


@dataclass
class WarmStats:
    state: str = "idle"       # idle | running | done | cancelled | failed | off
    listed: int = 0           # names in the hot set
    cached: int = 0           # of them already in the local cache when it started
    planned: int = 0          # blocks it meant to fetch (within the byte budget)
    planned_bytes: int = 0
    prefetched: int = 0       # blocks fetched and cached
    prefetched_bytes: int = 0
    skipped: int = 0          # brought in by a reader meanwhile, or not cacheable
    failed: int = 0           # gone from the store, corrupt, or a failed GET
    budget: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["progress"] = round(self.prefetched_bytes / self.planned_bytes, 4) \
            if self.planned_bytes else (1.0 if self.state == "done" else 0.0)
        return doc


class Prefetcher:
    """Fetches the hot set's blocks that the local cache lacks (see the module doc)."""

    def __init__(self, cache: BlockCache, store: ObjectStore, *, budget: int,
                 concurrency: int = 4, quiet_s: float = 0.05) -> None:
        self.cache = cache
        self.store = store
        self.concurrency = max(1, concurrency)
        self.quiet_s = quiet_s
        self.stats = WarmStats(budget=budget)
        self.started = time.monotonic()
        self.startup_s = 10 * quiet_s  # a new mount's first reads come first, too
        self._asked: set[str] = set()  # names readers asked for: they fetch those themselves

    async def run(self, names: list[str]) -> None:
        """Prefetch ``names`` (most recent first) within the budget; cancellable."""
        start = time.monotonic()
        self.stats.state = "running"
        self.stats.listed = len(names)
        try:
            held = await self.cache.contains(names) if names else set()
            self.stats.cached = len(held)
            todo: list[tuple[str, str, int]] = []
            for name in names:
                parsed = parse_name(name)
                if name in held or parsed is None:
                    continue
                if self.stats.planned_bytes + parsed[1] > self.stats.budget:
                    break
                todo.append((name, *parsed))
                self.stats.planned += 1
                self.stats.planned_bytes += parsed[1]
            await self._fetch_all(todo)
            self.stats.state = "done"
        except asyncio.CancelledError:
            self.stats.state = "cancelled"
            raise
        except Exception as exc:
            self.stats.state = "failed"
            log.warning("warm start prefetch failed", extra={"error": str(exc)})
        finally:
            self.stats.seconds = round(time.monotonic() - start, 3)
            log.info("warm start prefetch " + self.stats.state,
                     extra={k: v for k, v in self.stats.as_dict().items() if k != "state"})

    def saw(self, name: str) -> None:
        """A reader asked the cache for this block (``BlockCache.on_read``): it loads it
        itself, so the prefetch leaves it out instead of fetching it a second time."""
        if self.stats.state == "running":
            self._asked.add(name)

    def _readers_busy(self) -> bool:
        now = time.monotonic()
        return now - self.cache.last_foreground < self.quiet_s or now - self.started < self.startup_s

    async def _fetch_all(self, todo: list[tuple[str, str, int]]) -> None:
        """One GET in flight while readers are active, ``concurrency`` while idle."""
        pending: set[asyncio.Task[None]] = set()
        try:
            for item in todo:
                while len(pending) >= (1 if self._readers_busy() else self.concurrency):
                    _, pending = await asyncio.wait(pending, timeout=self.quiet_s,
                                                    return_when=asyncio.FIRST_COMPLETED)
                pending.add(asyncio.create_task(self._prefetch_one(*item)))
            await asyncio.gather(*pending)
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _prefetch_one(self, name: str, digest: str, size: int) -> None:
        if name in self._asked or await self.cache.contains([name]):
            self.stats.skipped += 1  # a reader brought it in meanwhile
            return
        try:
            data = await self.store.get(block_key(digest, size))
        except NoSuchObject:
            self.stats.failed += 1  # deleted since it was read (the hot set is advisory)
            return
        except Exception as exc:
            self.stats.failed += 1
            log.info("warm start: a block could not be fetched", extra={"error": str(exc)})
            return
        if len(data) != size or await asyncio.to_thread(_sha256, data) != digest:
            self.stats.failed += 1
            return
        if await self.cache.put(digest, data):
            self.stats.prefetched += 1
            self.stats.prefetched_bytes += size
        else:
            self.stats.skipped += 1


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel a prefetch (unmount) and wait for it to stop."""
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
