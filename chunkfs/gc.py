"""Garbage collection of block objects (mark and sweep).

Blocks are shared between files, volumes, snapshots and clones (content addressing
deduplicates them), so nothing is deleted when a file goes away; this sweep deletes
the objects that no namespace and no snapshot manifest references any more. An
object younger than the grace period is never deleted, so an upload whose commit
has not happened yet can never lose its block. Namespaces are found by scanning for
their ``vol`` keys, so a clone being imported (not yet registered) is protected too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from chunkfs.meta import namespace as nsops
from chunkfs.meta.schema import BlockEntry, Keys
from chunkfs.objstore import ObjectStore, block_key

log = logging.getLogger(__name__)


@dataclass
class GcReport:
    namespaces: int = 0
    manifests: int = 0
    referenced: int = 0
    objects: int = 0
    young: int = 0
    deleted: int = 0
    deleted_bytes: int = 0
    kept_bytes: int = 0


async def all_namespaces(r: aioredis.Redis) -> list[str]:
    found = []
    async for key in r.scan_iter(match="cfs{*}:vol", count=1000):
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
                entry = BlockEntry.parse(raw)
                refs.add(block_key(entry.digest, entry.length))
    return refs


async def collect_garbage(r: aioredis.Redis, store: ObjectStore, *, grace: float = 3600.0,
                          dry_run: bool = False) -> GcReport:
    report = GcReport()
    live: set[str] = set()
    for ns in await all_namespaces(r):
        live |= await referenced_blocks(r, ns)
        report.namespaces += 1
    async for key, _, _ in store.list("snapshots/"):
        if not key.endswith("manifest.json.gz"):
            continue
        doc = nsops.decode_manifest(await store.get(key))
        report.manifests += 1
        for node in doc["inodes"].values():
            for raw in node.get("blocks", {}).values():
                entry = BlockEntry.parse(raw)
                live.add(block_key(entry.digest, entry.length))
    report.referenced = len(live)
    cutoff = time.time() - grace
    doomed: list[str] = []
    async for key, size, mtime in store.list("blocks/"):
        report.objects += 1
        if key in live:
            report.kept_bytes += size
        elif mtime > cutoff:
            report.young += 1
            report.kept_bytes += size
        else:
            doomed.append(key)
            report.deleted_bytes += size
    report.deleted = len(doomed)
    if doomed and not dry_run:
        await store.delete_many(doomed)
    log.info("gc done", extra=vars(report))
    return report
