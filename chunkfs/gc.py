"""Garbage collection of block objects: a mark and sweep that cannot race a writer.

Blocks are shared between files, volumes, snapshots and clones (content addressing
deduplicates them), so nothing is deleted when a file goes away; this sweep deletes
the objects that nothing can reference any more. "Nothing" is exact, whatever the
grace period: the block maps of every namespace, every snapshot manifest, and every
upload a mount registered and has not committed yet (``pending``), or committed
after this run began (``settled``). The protocol, and why each step sits where it
does, is ``docs/dev/gc.md``; in short:

1. list the objects older than the grace period (the candidates);
2. per namespace, read its protected uploads, then its block maps; repeat for
   namespaces created meanwhile (clones, snapshots), until none is new;
3. read every snapshot manifest;
4. publish the candidates nothing protects as ``doomed`` and bump the generation:
   an upload of a doomed object from now on waits until this run is over;
5. read every namespace's protected uploads again: what was registered before step 4
   took effect is spared;
6. delete, while holding the GC lease; clear ``doomed``.

One run at a time per metadata engine (a lease in Redis), only on a storage prefix
that belongs to this engine (``chunkfs.claim``). On Redis Cluster every primary is
scanned for namespaces, the run's start is the earliest of the shards' clocks (each
shard stamps settlements with its own), and a run that sees the slot layout change
(a reshard) deletes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import redis.asyncio as aioredis

from chunkfs.blocks import slices
from chunkfs.claim import claim_storage, read_marker
from chunkfs.errors import ChunkfsError, NoSuchObject, StorageClaimed
from chunkfs.meta import namespace as nsops
from chunkfs.meta import scripts, topology
from chunkfs.meta.schema import GC_DOOMED, GC_STATE, Keys
from chunkfs.objstore import ObjectStore, block_key

log = logging.getLogger(__name__)

LEASE_MS = 10 * 60 * 1000      # a run renews it at least every LEASE_RENEW_S
LEASE_RENEW_S = 30.0
SESSION_GRACE_S = 600.0        # a session silent this long past its expiry is declared dead
TOMBSTONE_KEEP_MS = 30 * 24 * 3600 * 1000
_BATCH = 1000


class GcRefused(ChunkfsError):
    """GC cannot run safely now (another run holds the lease, a cluster reshard, ...)."""


@dataclass
class GcReport:
    namespaces: int = 0
    manifests: int = 0
    referenced: int = 0     # distinct objects named by block maps and manifests
    protected: int = 0      # distinct objects of uploads not committed before this run
    objects: int = 0
    young: int = 0
    reprieved: int = 0      # doomed, then spared: an upload registered them meanwhile
    deleted: int = 0
    deleted_bytes: int = 0
    kept_bytes: int = 0


_LEASE = scripts.PRELUDE + r"""
local now = now_ms()
local st = redis.call('HMGET', KEYS[1], 'owner', 'lease')
local mine = st[1] == ARGV[1]
if ARGV[2] == 'acquire' then
  if st[1] and not mine and tonumber(st[2] or '0') > now then return {0, st[1], st[2]} end
  redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'lease', I(now + tonumber(ARGV[3])),
             'started', I(now))
  return {1, ARGV[1], I(now)}
end
if not mine then return {0, st[1] or '', st[2] or '0'} end
if ARGV[2] == 'renew' then
  redis.call('HSET', KEYS[1], 'lease', I(now + tonumber(ARGV[3])))
elseif ARGV[2] == 'doom' then
  redis.call('HINCRBY', KEYS[1], 'gen', 1)
else
  redis.call('HSET', KEYS[1], 'lease', '0')
  redis.call('DEL', KEYS[2])
end
return {1, ARGV[1], I(now)}
"""


class Lease:
    """This run's hold on the engine's GC lease, renewed in the background."""

    def __init__(self, r: aioredis.Redis) -> None:
        self.r = r
        self.owner = secrets.token_hex(8)
        self.lost: str | None = None
        self.started_ms = 0

    async def _call(self, action: str) -> list[bytes]:
        return await self.r.eval(_LEASE, 2, GC_STATE, GC_DOOMED, self.owner, action, LEASE_MS)

    async def acquire(self) -> None:
        ok, owner, value = await self._call("acquire")
        if not int(ok):
            raise GcRefused(f"another garbage collection ({owner.decode()}) holds the lease "
                            "of this metadata engine; try again when it is done")
        self.started_ms = int(value)

    async def renew_forever(self) -> None:
        while True:
            await asyncio.sleep(LEASE_RENEW_S)
            try:
                ok, owner, _ = await self._call("renew")
            except Exception as exc:  # noqa: BLE001 - check() reports it before any delete
                self.lost = f"renewing the GC lease failed: {type(exc).__name__}"
                continue
            if not int(ok):
                self.lost = f"the GC lease was taken over by {owner.decode()}"
                return
            self.lost = None

    async def check(self) -> None:
        """Before deleting anything: the lease must still be ours (renewed just now)."""
        ok, owner, _ = await self._call("renew")
        if not int(ok) or self.lost:
            raise GcRefused(self.lost or f"the GC lease was taken over by {owner.decode()}")

    async def bump_generation(self) -> None:
        await self._call("doom")

    async def release(self) -> None:
        await self._call("release")


@contextlib.asynccontextmanager
async def gc_lease(r: aioredis.Redis) -> AsyncIterator[Lease]:
    lease = Lease(r)
    await lease.acquire()
    renewer = asyncio.create_task(lease.renew_forever())
    try:
        yield lease
    finally:
        renewer.cancel()
        with contextlib.suppress(Exception):
            await lease.release()


async def check_layout(r: aioredis.Redis, before: tuple[tuple[str, str], ...] | None,
                       ) -> tuple[tuple[str, str], ...] | None:
    """The cluster's slot layout now; refuses while slots migrate, or when it is not
    ``before`` any more (a key scan during a reshard can miss keys that move)."""
    now = await topology.layout(r)
    if topology.migrating(now):
        raise GcRefused("Redis Cluster slots are being migrated: garbage collection waits "
                        "until the reshard is done (run it again then)")
    if before is not None and now != before:
        raise GcRefused("the Redis Cluster layout changed during garbage collection; "
                        "nothing was deleted (run it again)")
    return now


async def all_namespaces(r: aioredis.Redis) -> list[str]:
    """Every namespace of the database, on every primary of a cluster."""
    found = []
    async for key in topology.scan_keys(r, "cfs{*}:vol"):
        text = key.decode()
        found.append(text[text.index("{") + 1:text.index("}")])
    return found


async def referenced_blocks(r: aioredis.Redis, ns: str) -> set[str]:
    k = Keys(ns)
    inos = [int(i) for i in await r.smembers(k.idx)]
    refs: set[str] = set()
    for start in range(0, len(inos), 2000):
        pipe = r.pipeline(transaction=False)
        for ino in inos[start:start + 2000]:
            pipe.hvals(k.blocks(ino))
        for values in await pipe.execute():
            for raw in values:
                refs.update(block_key(d, n) for d, n in slices.object_refs(raw))
    return refs


async def protected_uploads(r: aioredis.Redis, ns: str, run_start_ms: int, *,
                            session_grace: float, prune: bool) -> set[str]:
    """Objects of uploads that ``ns``'s block maps may reference later, or referenced
    only since ``run_start_ms``. With ``prune``, forgets what no longer needs protection
    and declares dead the sessions silent for longer than their expiry plus
    ``session_grace``. Scans in bounded steps: no call's cost grows with the volume."""
    k = Keys(ns)
    grace_ms = int(session_grace * 1000)
    pending: list[tuple[bytes, str, str]] = []  # field, object key, session
    async for field, _ in r.hscan_iter(k.pending, count=1000):
        key, _, session = field.decode().rpartition(" ")
        pending.append((field, key, session))
    sessions = {s.decode(): v.decode() for s, v in (await r.hgetall(k.sessions)).items()}
    now = await topology.server_ms(r, k.sessions)  # the clock that stamped the sessions
    dead: set[str] = set()
    for session in {session for _, _, session in pending}:
        value = sessions.get(session)
        silent = value is None or value.startswith("dead:") or int(value) + grace_ms <= now
        if not silent:
            continue
        if prune and not await r.eval(scripts.TOMBSTONE, 1, k.sessions, session, grace_ms):
            continue  # renewed since we looked: alive
        dead.add(session)
    live = {key for _, key, session in pending if session not in dead}
    stale = [field for field, _, session in pending if session in dead]
    settled_old: list[bytes] = []
    async for key, ms in r.hscan_iter(k.settled, count=1000):
        if int(ms) >= run_start_ms:
            live.add(key.decode())
        else:
            settled_old.append(key)
    if prune:
        for start in range(0, len(stale), _BATCH):
            await r.hdel(k.pending, *stale[start:start + _BATCH])
        for start in range(0, len(settled_old), _BATCH):
            await r.hdel(k.settled, *settled_old[start:start + _BATCH])
        old_tombstones = [s for s, v in sessions.items() if v.startswith("dead:")
                          and int(v[5:]) + TOMBSTONE_KEEP_MS < now]
        if old_tombstones:
            await r.hdel(k.sessions, *old_tombstones)
    return live


async def manifest_blocks(store: ObjectStore) -> tuple[int, set[str]]:
    refs: set[str] = set()
    count = 0
    async for key, _, _ in store.list("snapshots/"):
        if not key.endswith("manifest.json.gz"):
            continue
        try:
            doc = nsops.decode_manifest(await store.get(key))
        except NoSuchObject:  # its snapshot was deleted since the listing (namespace first)
            continue
        except (OSError, EOFError, ValueError) as exc:  # gzip or JSON: it protects unknown blocks
            raise GcRefused(f"snapshot manifest {key} is unreadable ({type(exc).__name__}); "
                            "refusing to delete anything until it is repaired or removed") from exc
        count += 1
        for node in doc["inodes"].values():
            for raw in node.get("blocks", {}).values():
                if doc.get("format") == 1:
                    raw = slices.from_legacy(raw)
                refs.update(block_key(d, n) for d, n in slices.object_refs(raw))
    return count, refs


async def _mark(r: aioredis.Redis, run_start_ms: int, report: GcReport, *,
                session_grace: float, prune: bool) -> set[str]:
    """Everything the namespaces reference or protect, namespaces created meanwhile too."""
    live: set[str] = set()
    seen: set[str] = set()
    while new := [ns for ns in await all_namespaces(r) if ns not in seen]:
        for ns in new:
            protected = await protected_uploads(r, ns, run_start_ms, session_grace=session_grace,
                                                prune=prune)
            report.protected += len(protected - live)
            live |= protected
            live |= await referenced_blocks(r, ns)
            seen.add(ns)
    report.namespaces = len(seen)
    return live


async def _publish_doomed(r: aioredis.Redis, lease: Lease, doomed: Iterable[str]) -> None:
    await r.delete(GC_DOOMED)
    await lease.bump_generation()
    batch: list[str] = []
    for key in doomed:
        batch.append(key)
        if len(batch) >= _BATCH:
            await r.sadd(GC_DOOMED, *batch)
            batch = []
    if batch:
        await r.sadd(GC_DOOMED, *batch)


async def _reprieve(r: aioredis.Redis, doomed: set[str], run_start_ms: int, *,
                    session_grace: float) -> int:
    """Spare what an upload registered while the doomed set was being published."""
    spared: set[str] = set()
    for ns in await all_namespaces(r):
        spared |= doomed & await protected_uploads(r, ns, run_start_ms,
                                                   session_grace=session_grace, prune=True)
    if spared:
        doomed -= spared
        await r.srem(GC_DOOMED, *spared)
    return len(spared)


async def collect_garbage(r: aioredis.Redis, store: ObjectStore, *, grace: float = 3600.0,
                          dry_run: bool = False,
                          session_grace: float = SESSION_GRACE_S) -> GcReport:
    if grace < 0 or session_grace < 0:
        raise ValueError("grace periods must not be negative")
    shape = await check_layout(r, None)
    engine = await claim_storage(r, store)
    report = GcReport()
    async with gc_lease(r) as lease:
        # every shard stamps settlements with its own clock: the earliest of them, read
        # after the lease began, is at or before "now" on each (docs/dev/gc.md)
        run_start = min(lease.started_ms, await topology.earliest_clock_ms(r))
        cutoff = time.time() - grace
        candidates: dict[str, int] = {}
        async for key, size, mtime in store.list("blocks/"):
            report.objects += 1
            if mtime > cutoff:
                report.young += 1
                report.kept_bytes += size
            else:
                candidates[key] = size
        live = await _mark(r, run_start, report, session_grace=session_grace, prune=not dry_run)
        report.manifests, manifest_refs = await manifest_blocks(store)
        live |= manifest_refs
        report.referenced = len(live)
        doomed = {key for key in candidates if key not in live}
        if doomed and not dry_run:
            await _publish_doomed(r, lease, doomed)
            report.reprieved = await _reprieve(r, doomed, run_start, session_grace=session_grace)
            await check_layout(r, shape)
            if await read_marker(store) != engine:
                raise StorageClaimed("the storage prefix changed hands during garbage collection")
            keys = sorted(doomed)
            for start in range(0, len(keys), _BATCH):
                await lease.check()
                await store.delete_many(keys[start:start + _BATCH])
        report.deleted = len(doomed)
        report.deleted_bytes = sum(candidates[k] for k in doomed)
        report.kept_bytes += sum(size for key, size in candidates.items() if key not in doomed)
    log.info("gc done", extra={**vars(report), "dry_run": dry_run})
    return report
