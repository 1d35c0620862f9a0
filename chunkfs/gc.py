"""Garbage collection of block objects: a mark and sweep that cannot race a writer.

Blocks are shared between files, volumes, snapshots and clones (content addressing
deduplicates them), so nothing is deleted when a file goes away; this sweep deletes
the objects that nothing can reference any more. "Nothing" is exact, whatever the
grace period: the block maps of every namespace, every snapshot and backup manifest
(``chunkfs.backup``), and every upload a mount registered and has not committed yet
(``pending``), or committed
after this run began (``settled``). The protocol, and why each step sits where it
does, is ``docs/dev/gc.md``; in short:

1. list the objects older than the grace period (the candidates);
2. per namespace, read its protected uploads, then its block maps; repeat for
   namespaces created meanwhile (clones, snapshots), until none is new;
3. read every snapshot and backup manifest (a backup's pages too);
4. publish the candidates nothing protects as ``doomed`` and bump the generation:
   an upload of a doomed object from now on waits until this run is over;
5. read every namespace's protected uploads again: what was registered before step 4
   took effect is spared;
6. delete, while holding the GC lease; clear ``doomed``.

One run at a time per metadata engine (a lease in Redis, ``chunkfs.gc_lease``), only
on a storage prefix that belongs to this engine (``chunkfs.claim``). On Redis Cluster
every primary is scanned for namespaces, the run's start is the earliest of the shards'
clocks (each shard stamps settlements with its own), and a run that sees the slot
layout change (a reshard) deletes nothing.

Memory stays bounded whatever the bucket holds: the candidates, the marks and the
doomed objects are ``chunkfs.spill`` sets (sorted runs in a private temporary directory,
merged), the sweep is a merge of two sorted streams, and every Redis read goes in
bounded steps (SSCAN, HSCAN, pipelines of a few hundred block maps). A run records its
outcome in ``cfs{_gc}:last`` (``GcRun``), which mounts and ``volume info`` show.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from chunkfs import backup, spill
from chunkfs.blocks import slices
from chunkfs.claim import claim_storage, read_marker
from chunkfs.errors import NoSuchObject, StorageClaimed
from chunkfs.gc_lease import GcRefused, Lease, check_layout, gc_lease
from chunkfs.meta import scripts, topology
from chunkfs.meta.schema import GC_DOOMED, GC_LAST, GcRun, Keys
from chunkfs.objstore import ObjectStore, block_key

__all__ = ["GcRefused", "GcReport", "collect_garbage", "gc_lease", "last_run"]

log = logging.getLogger(__name__)

SESSION_GRACE_S = 600.0        # a session silent this long past its expiry is declared dead
TOMBSTONE_KEEP_MS = 30 * 24 * 3600 * 1000
_BATCH = 1000
_MAPS_PER_ROUND = 500          # block maps asked for per pipelined round trip ...
_ENTRIES_PER_ROUND = 10_000    # ... holding at most this many entries; a bigger map: HSCAN
REFERENCED, PROTECTED = 0, 1   # what marked a key (both: referenced)

# progress(phase, done, total or None): list, mark, manifests, sweep, publish, reprieve, delete
Progress = Callable[[str, int, "int | None"], None]


def _quiet(phase: str, done: int, total: int | None) -> None:
    pass


@dataclass
class GcReport:
    namespaces: int = 0
    manifests: int = 0
    referenced: int = 0     # distinct objects named by block maps and manifests
    protected: int = 0      # distinct objects only uploads in flight (or since the start) name
    objects: int = 0
    young: int = 0
    reprieved: int = 0      # doomed, then spared: an upload registered them meanwhile
    deleted: int = 0
    deleted_bytes: int = 0
    kept_bytes: int = 0
    seconds: float = 0.0
    spill_bytes: int = 0    # the most local disk the run's sorted sets took at once


async def all_namespaces(r: aioredis.Redis) -> list[str]:
    """Every namespace of the database, on every primary of a cluster."""
    found = []
    async for key in topology.scan_keys(r, "cfs{*}:vol"):
        text = key.decode()
        found.append(text[text.index("{") + 1:text.index("}")])
    return found


async def _block_map_values(r: aioredis.Redis, k: Keys) -> AsyncIterator[list[bytes]]:
    """The entries of every block map of a namespace, a bounded list at a time: the
    inode index in SSCAN steps, the maps of a few hundred inodes per round trip, and a
    map too big for one round in HSCAN steps. Each entry is read at some moment of the
    scan; what a commit changes meanwhile is protected by its settlement (gc.md)."""
    inos: list[int] = []
    async for ino in r.sscan_iter(k.idx, count=1000):
        inos.append(int(ino))
        if len(inos) >= _MAPS_PER_ROUND:
            async for values in _maps_of(r, k, inos):
                yield values
            inos = []
    async for values in _maps_of(r, k, inos):
        yield values


async def _maps_of(r: aioredis.Redis, k: Keys, inos: list[int]) -> AsyncIterator[list[bytes]]:
    if not inos:
        return
    pipe = r.pipeline(transaction=False)
    for ino in inos:
        pipe.hlen(k.blocks(ino))
    group: list[int] = []
    entries = 0
    for ino, n in zip(inos, await pipe.execute(), strict=True):
        if n > _ENTRIES_PER_ROUND:
            values: list[bytes] = []
            async for _, raw in r.hscan_iter(k.blocks(ino), count=1000):
                values.append(raw)
                if len(values) >= _ENTRIES_PER_ROUND:
                    yield values
                    values = []
            yield values
            continue
        if entries + n > _ENTRIES_PER_ROUND and group:
            yield await _hvals(r, k, group)
            group, entries = [], 0
        if n:
            group.append(ino)
            entries += n
    if group:
        yield await _hvals(r, k, group)


async def _hvals(r: aioredis.Redis, k: Keys, inos: list[int]) -> list[bytes]:
    pipe = r.pipeline(transaction=False)
    for ino in inos:
        pipe.hvals(k.blocks(ino))
    return [raw for values in await pipe.execute() for raw in values]


async def referenced_blocks(r: aioredis.Redis, ns: str, marks: spill.Spill) -> int:
    """Mark the object of every block map entry of ``ns``; returns how many entries.
    The one place that turns block map values into object keys."""
    count = 0
    async for values in _block_map_values(r, Keys(ns)):
        refs = [block_key(d, n) for raw in values for d, n in slices.object_refs(raw)]
        await marks.add_keys(refs, REFERENCED)
        count += len(values)
    return count


async def protected_uploads(r: aioredis.Redis, ns: str, run_start_ms: int, marks: spill.Spill,
                            *, session_grace: float, prune: bool) -> int:
    """Mark the objects of uploads that ``ns``'s block maps may reference later, or
    referenced only since ``run_start_ms``; returns how many. With ``prune``, forgets
    what no longer needs protection and declares dead the sessions silent for longer
    than their expiry plus ``session_grace``. Scans in bounded steps: no call's cost
    grows with the volume, and only ``pending`` (uploads not committed yet) is held."""
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
    live = [key for _, key, session in pending if session not in dead]
    await marks.add_keys(live, PROTECTED)
    count = len(live)
    stale = [field for field, _, session in pending if session in dead]
    recent: list[str] = []
    settled_old: list[bytes] = []
    async for key, ms in r.hscan_iter(k.settled, count=1000):
        if int(ms) >= run_start_ms:
            recent.append(key.decode())
            if len(recent) >= _BATCH:
                await marks.add_keys(recent, PROTECTED)
                count, recent = count + len(recent), []
        elif prune:
            settled_old.append(key)
            if len(settled_old) >= _BATCH:
                await r.hdel(k.settled, *settled_old)
                settled_old = []
    await marks.add_keys(recent, PROTECTED)
    count += len(recent)
    if prune:
        if settled_old:
            await r.hdel(k.settled, *settled_old)
        for start in range(0, len(stale), _BATCH):
            await r.hdel(k.pending, *stale[start:start + _BATCH])
        old_tombstones = [s for s, v in sessions.items() if v.startswith("dead:")
                          and int(v[5:]) + TOMBSTONE_KEEP_MS < now]
        if old_tombstones:
            await r.hdel(k.sessions, *old_tombstones)
    return count


async def manifest_blocks(store: ObjectStore, marks: spill.Spill) -> int:
    """Mark every block of every snapshot and backup manifest; returns how many
    manifests. (A snapshot manifest is one document, read whole; a backup's pages are
    read one at a time, each once per run however many backups share it.)"""
    count = 0
    seen_pages: set[str] = set()
    for top in (backup.SNAPSHOTS_DIR, backup.BACKUPS_DIR):
        keys = [key async for key, _, _ in store.list(top) if backup.is_manifest_key(key)]
        for key in keys:
            try:
                refs = await backup.manifest_refs(store, key, seen_pages)
            except NoSuchObject:  # deleted since the listing (its snapshot, or retention)
                continue
            except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:
                # it protects blocks nobody can name any more
                raise GcRefused(f"manifest {key} is unreadable ({type(exc).__name__}: {exc}); "
                                "refusing to delete anything until it is repaired or "
                                "removed") from exc
            count += 1
            await marks.add_keys(refs, REFERENCED)
    return count


async def _list_candidates(store: ObjectStore, cutoff: float, candidates: spill.Spill,
                           report: GcReport, progress: Progress) -> None:
    batch: list[spill.Record] = []
    async for key, size, mtime in store.list("blocks/"):
        report.objects += 1
        if mtime > cutoff:
            report.young += 1
            report.kept_bytes += size
        else:
            batch.append((key, size))
            if len(batch) >= _BATCH:
                await candidates.add(batch)
                batch = []
                progress("list", report.objects, None)
    await candidates.add(batch)
    await candidates.seal()
    progress("list", report.objects, report.objects)


async def _mark(r: aioredis.Redis, run_start_ms: int, report: GcReport, marks: spill.Spill, *,
                session_grace: float, prune: bool, progress: Progress) -> None:
    """Everything the namespaces reference or protect, namespaces created meanwhile too."""
    seen: set[str] = set()
    while new := [ns for ns in await all_namespaces(r) if ns not in seen]:
        for ns in new:
            await protected_uploads(r, ns, run_start_ms, marks, session_grace=session_grace,
                                    prune=prune)
            await referenced_blocks(r, ns, marks)
            seen.add(ns)
            progress("mark", len(seen), None)
    report.namespaces = len(seen)
    progress("mark", len(seen), len(seen))


@dataclass
class _Tally:
    count: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.count += 1
        self.bytes += size


def _sweep(candidates: spill.Spill, marks: spill.Spill, doomed: spill.Spill,
           report: GcReport) -> _Tally:
    """The candidates nothing marked, written to ``doomed`` (blocking: in a thread)."""
    found = _Tally()
    with doomed.writer() as out:
        for key, size, mark in spill.join(spill.distinct(candidates.records(), max),
                                          spill.distinct(marks.records(), min)):
            if mark == REFERENCED:
                report.referenced += 1
            elif mark == PROTECTED:
                report.protected += 1
            if size is None:
                continue
            if mark is None:
                out.write((key, size))
                found.add(size)
            else:
                report.kept_bytes += size
    return found


def _split(doomed: spill.Spill, protected: spill.Spill, final: spill.Spill,
           spared: spill.Spill) -> tuple[_Tally, _Tally]:
    """The doomed objects an upload protects now go to ``spared``, the others to
    ``final`` (blocking: in a thread)."""
    kept, gone = _Tally(), _Tally()
    with final.writer() as out, spared.writer() as saved:
        for key, size, mark in spill.join(doomed.records(), spill.distinct(protected.records())):
            if size is None:
                continue
            if mark is None:
                out.write((key, size))
                gone.add(size)
            else:
                saved.write((key, size))
                kept.add(size)
    return gone, kept


async def _publish_doomed(r: aioredis.Redis, lease: Lease, doomed: spill.Spill,
                          progress: Progress = _quiet, total: int | None = None) -> None:
    await r.delete(GC_DOOMED)
    await lease.bump_generation()
    done = 0
    async for batch in doomed.batches(_BATCH):
        await r.sadd(GC_DOOMED, *[key for key, _ in batch])
        done += len(batch)
        progress("publish", done, total)


async def _reprieve(r: aioredis.Redis, doomed: spill.Spill, run_start_ms: int,
                    ws: spill.Workspace, *, session_grace: float,
                    progress: Progress = _quiet) -> tuple[spill.Spill, _Tally, _Tally]:
    """Spare what an upload registered while the doomed set was being published:
    returns what is left to delete (a spill), its tally, and the tally of the spared."""
    protected = ws.spill("reprieve", min)
    namespaces = await all_namespaces(r)
    for i, ns in enumerate(namespaces, 1):
        await protected_uploads(r, ns, run_start_ms, protected, session_grace=session_grace,
                                prune=True)
        progress("reprieve", i, len(namespaces))
    await protected.seal()
    final, spared = ws.spill("delete"), ws.spill("spared")
    gone, kept = await asyncio.to_thread(_split, doomed, protected, final, spared)
    ws.measure_disk()
    doomed.discard()
    protected.discard()
    async for batch in spared.batches(_BATCH):
        await r.srem(GC_DOOMED, *[key for key, _ in batch])
    return final, gone, kept


async def _delete(store: ObjectStore, lease: Lease, final: spill.Spill, total: int,
                  progress: Progress) -> None:
    done = 0
    progress("delete", 0, total)
    async for batch in final.batches(_BATCH):
        await lease.check()
        await store.delete_many([key for key, _ in batch])
        done += len(batch)
        progress("delete", done, total)


async def collect_garbage(r: aioredis.Redis, store: ObjectStore, *, grace: float = 3600.0,
                          dry_run: bool = False, session_grace: float = SESSION_GRACE_S,
                          work_dir: str | None = None, progress: Progress | None = None,
                          spill_batch: int = spill.BATCH) -> GcReport:
    """One GC run (docs/dev/gc.md). ``work_dir`` holds the run's sorted sets (at most
    about 300 bytes per object; default: the system's temporary directory);
    ``progress`` is told each phase's advance; the outcome is recorded in Redis."""
    if grace < 0 or session_grace < 0:
        raise ValueError("grace periods must not be negative")
    shape = await check_layout(r, None)
    engine = await claim_storage(r, store)
    report = GcReport()
    began, started = time.monotonic(), time.time()
    with spill.Workspace(work_dir, batch=spill_batch) as ws:
        async with gc_lease(r) as lease:
            try:
                await _run(r, store, lease, ws, report, shape=shape, engine=engine, grace=grace,
                           dry_run=dry_run, session_grace=session_grace,
                           progress=progress or _quiet)
            except Exception as exc:
                report.seconds = time.monotonic() - began
                await _record(r, report, started=started, dry_run=dry_run, error=exc)
                raise
            report.seconds = time.monotonic() - began
            await _record(r, report, started=started, dry_run=dry_run, error=None)
    log.info("gc done", extra={**vars(report), "dry_run": dry_run})
    return report


async def _run(r: aioredis.Redis, store: ObjectStore, lease: Lease, ws: spill.Workspace,
               report: GcReport, *, shape: tuple[tuple[str, str], ...] | None, engine: str,
               grace: float, dry_run: bool, session_grace: float, progress: Progress) -> None:
    # every shard stamps settlements with its own clock: the earliest of them, read
    # after the lease began, is at or before "now" on each (docs/dev/gc.md)
    run_start = min(lease.started_ms, await topology.earliest_clock_ms(r))
    candidates, marks, doomed = ws.spill("candidates"), ws.spill("marks", min), ws.spill("doomed")
    await _list_candidates(store, time.time() - grace, candidates, report, progress)
    await _mark(r, run_start, report, marks, session_grace=session_grace, prune=not dry_run,
                progress=progress)
    report.manifests = await manifest_blocks(store, marks)
    await marks.seal()
    progress("manifests", report.manifests, report.manifests)
    found = await asyncio.to_thread(_sweep, candidates, marks, doomed, report)
    progress("sweep", report.objects, report.objects)
    ws.measure_disk()
    candidates.discard()
    marks.discard()
    if found.count and not dry_run:
        await _publish_doomed(r, lease, doomed, progress, found.count)
        final, found, spared = await _reprieve(r, doomed, run_start, ws,
                                               session_grace=session_grace, progress=progress)
        report.reprieved = spared.count
        report.kept_bytes += spared.bytes
        await check_layout(r, shape)
        if await read_marker(store) != engine:
            raise StorageClaimed("the storage prefix changed hands during garbage collection")
        await _delete(store, lease, final, found.count, progress)
    report.deleted = found.count
    report.deleted_bytes = found.bytes
    ws.measure_disk()
    report.spill_bytes = ws.peak_disk_bytes


async def _record(r: aioredis.Redis, report: GcReport, *, started: float, dry_run: bool,
                  error: BaseException | None) -> None:
    """Write the run's outcome to ``cfs{_gc}:last`` (best effort: the run is over)."""
    now = time.time()
    record = GcRun(started=started, finished=now, seconds=report.seconds, ok=error is None,
                   dry_run=dry_run, objects=report.objects,
                   deleted=report.deleted if error is None else 0,
                   deleted_bytes=report.deleted_bytes if error is None else 0,
                   error="" if error is None else f"{type(error).__name__}: {error}"[:500],
                   success=now if error is None else None)
    try:
        await r.hset(GC_LAST, mapping=record.fields())
    except Exception as exc:  # noqa: BLE001 - the run's outcome stands; its record is lost
        log.warning("could not record the gc run", extra={"error": type(exc).__name__})


async def last_run(r: aioredis.Redis) -> GcRun | None:
    """The last recorded GC run of the engine behind ``r`` (None: none yet)."""
    return GcRun.parse(await r.hgetall(GC_LAST))

