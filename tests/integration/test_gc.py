"""Garbage collection: unreferenced old blocks go, everything referenced or young stays."""

from __future__ import annotations

import os
import stat

from chunkfs.blocks.store import BlockStore
from chunkfs.cache import BlockCache
from chunkfs.gc import collect_garbage
from chunkfs.meta.redis_meta import VolumeMeta
from chunkfs.meta.schema import ROOT_INODE
from chunkfs.objstore import block_key
from chunkfs.volumes import VolumeService


async def write_file(svc: VolumeService, blocks: BlockStore, ns: str, name: bytes, body: bytes) -> str:
    meta = VolumeMeta(svc.fast, ns, epoch="1", session="t", deadline=5)
    attr = await meta.create(ROOT_INODE, name, stat.S_IFREG | 0o644, 0, 0)
    entry = await blocks.put(body)
    assert entry is not None
    await meta.commit(attr.ino, size=len(body), entries={0: entry})
    return block_key(entry.digest, entry.length)


async def keys(svc: VolumeService) -> set[str]:
    return {k async for k, _, _ in svc.store.list("blocks/")}


async def test_gc_deletes_only_unreferenced_blocks_past_the_grace(svc: VolumeService, tmp_path) -> None:
    blocks = BlockStore(svc.store, await BlockCache.open(str(tmp_path), 1 << 30), memory_limit=1 << 20)
    info = await svc.create_volume("v", 1 << 30)
    kept = await write_file(svc, blocks, info.id, b"kept", os.urandom(5000))
    doomed = await write_file(svc, blocks, info.id, b"doomed", os.urandom(5000))
    meta = VolumeMeta(svc.fast, info.id, epoch="1", session="t", deadline=5)
    await meta.unlink(ROOT_INODE, b"doomed", is_dir=False, keep_if_open=False)

    report = await collect_garbage(svc.r, svc.store, grace=3600)
    assert report.deleted == 0 and report.young == 1  # too young to be collected
    assert await keys(svc) == {kept, doomed}

    report = await collect_garbage(svc.r, svc.store, grace=0, dry_run=True)
    assert report.deleted == 1 and await keys(svc) == {kept, doomed}

    report = await collect_garbage(svc.r, svc.store, grace=0)
    assert report.deleted == 1
    assert await keys(svc) == {kept}
    await blocks.drain()


async def test_gc_keeps_blocks_of_snapshots_even_when_redis_lost_them(svc: VolumeService, tmp_path) -> None:
    blocks = BlockStore(svc.store, await BlockCache.open(str(tmp_path), 1 << 30), memory_limit=1 << 20)
    info = await svc.create_volume("v", 1 << 30)
    key = await write_file(svc, blocks, info.id, b"f", os.urandom(3000))
    await svc.create_snapshot("v", "snap")
    await svc.r.flushdb()
    report = await collect_garbage(svc.r, svc.store, grace=0)
    assert report.manifests == 1 and report.deleted == 0
    assert await keys(svc) == {key}
    await blocks.drain()
