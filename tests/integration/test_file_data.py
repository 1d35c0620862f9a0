"""The file data layer (``chunkfs.blocks.file.FileData``) in-process, over the real Redis
and S3, without FUSE: its protocol (what a flush captures, ordering, retries after a
failed upload, several writers of one file, upkeep) tested directly and fast. Each
``Node`` is one mount's worth of state: its own session, cache, block store and budget.
"""

from __future__ import annotations

import asyncio
import random
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from chunkfs.blocks import file as file_mod
from chunkfs.blocks import slices
from chunkfs.blocks.budget import WriteBudget
from chunkfs.blocks.file import FileData
from chunkfs.blocks.store import BlockStore
from chunkfs.cache import BlockCache
from chunkfs.errors import ChunkfsError, StorageUnavailable
from chunkfs.meta.redis_meta import VolumeMeta
from chunkfs.meta.schema import ROOT_INODE, Keys
from chunkfs.volumes import VolumeService

BS = 4 << 20


@dataclass
class Node:
    meta: VolumeMeta
    blocks: BlockStore
    budget: WriteBudget

    def file(self, ino: int) -> FileData:
        return FileData(ino, self.meta, self.blocks, self.budget, block_size=BS,
                        inline_limit=4096)

    async def opened(self, ino: int) -> FileData:
        """A FileData as an open() on this node loads it: the committed size and map."""
        data = self.file(ino)
        await data.load((await self.meta.getattr(ino)).size)
        return data


Nodes = Callable[[], Awaitable[Node]]


@pytest.fixture
async def volume(svc: VolumeService) -> str:
    return (await svc.create_volume("v", 1 << 30)).id


@pytest.fixture
async def node(svc: VolumeService, volume: str, tmp_path: Path) -> AsyncIterator[Nodes]:
    made: list[Node] = []

    async def make() -> Node:
        n = len(made)
        cache = await BlockCache.open(str(tmp_path / f"cache{n}"), 1 << 30)
        meta = VolumeMeta(svc.fast, volume, epoch="", session=f"node{n}", deadline=10)  # type: ignore[attr-defined]
        await meta.heartbeat()
        made.append(Node(meta, BlockStore(svc.store, cache, meta, memory_limit=1 << 20),
                         WriteBudget(64 << 20, stall_timeout=10)))
        return made[-1]

    yield make
    for n in made:
        await n.blocks.drain()


async def new_file(n: Node, name: bytes = b"f") -> int:
    return (await n.meta.create(ROOT_INODE, name, stat.S_IFREG | 0o644, 0, 0, inline=True)).ino


def apply(model: bytearray, off: int, data: bytes) -> None:
    if len(model) < off + len(data):
        model.extend(bytes(off + len(data) - len(model)))
    model[off:off + len(data)] = data


async def read_all(data: FileData) -> bytes:
    return await data.read(0, data.size)


async def test_a_flush_commits_what_was_written_before_it_and_writes_during_it_wait_for_the_next(
        node: Nodes) -> None:
    a = await node()
    ino = await new_file(a)
    f = a.file(ino)
    await f.load(0)
    first = random.randbytes(BS + 1000)  # a full block (uploaded at once) and a bit more
    await f.write(0, first)
    flushing = asyncio.create_task(f.flush())
    await asyncio.sleep(0)  # the flush has frozen what it commits
    late = random.randbytes(3000)
    await f.write(len(first), late)
    await flushing
    other = await (await node()).opened(ino)
    assert await read_all(other) == first  # exactly the flush's, none of the late write
    await f.flush()
    other = await (await node()).opened(ino)
    assert await read_all(other) == first + late


async def test_writers_of_one_file_on_two_nodes_keep_each_others_bytes(node: Nodes) -> None:
    a, b = await node(), await node()
    ino = await new_file(a)
    base = random.randbytes(2 * BS)
    fa = await a.opened(ino)
    await fa.write(0, base)
    await fa.flush()
    fa, fb = await a.opened(ino), await b.opened(ino)
    model = bytearray(base)
    rng = random.Random(7)
    for step in range(40):  # interleaved small writes of both nodes, never the same bytes
        writer, lo = (fa, 0) if step % 2 == 0 else (fb, BS // 2)
        off = rng.randrange(lo, lo + BS // 2 - 5000) + (BS if rng.random() < 0.5 else 0)
        data = rng.randbytes(rng.randrange(1, 5000))
        await writer.write(off, data)
        apply(model, off, data)
        if rng.random() < 0.3:
            await writer.flush()
    await asyncio.gather(fa.flush(), fb.flush())
    reader = await (await node()).opened(ino)
    assert await read_all(reader) == bytes(model)


async def test_a_failed_upload_keeps_the_bytes_and_the_next_flush_commits_them(
        node: Nodes, monkeypatch: pytest.MonkeyPatch) -> None:
    a = await node()
    ino = await new_file(a)
    f = await a.opened(ino)
    real = a.blocks.put
    failures = [1, 1]

    async def flaky(body: bytes | bytearray, **kw: object) -> object:
        if failures:
            failures.pop()
            raise StorageUnavailable("S3 is down (injected)")
        return await real(body, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(a.blocks, "put", flaky)
    body = random.randbytes(BS + 300_000)
    await f.write(0, body)
    with pytest.raises(ChunkfsError):
        await f.flush()
    assert not f.is_clean
    # nothing of the failed flush is visible, and it may be retried as often as needed
    assert (await a.meta.getattr(ino)).size == 0
    for _ in range(3):
        try:
            await f.flush()
            break
        except ChunkfsError:
            continue
    assert f.is_clean
    reader = await (await node()).opened(ino)
    assert await read_all(reader) == body


async def test_small_fsyncs_are_stored_inline_and_upkeep_moves_them_to_one_object(
        node: Nodes, svc: VolumeService, volume: str) -> None:
    a = await node()
    ino = await new_file(a)
    f = await a.opened(ino)
    model = bytearray()
    await f.write(0, bytes(8192))  # past the inline limit: block slices from here on
    apply(model, 0, bytes(8192))
    rng = random.Random(3)
    for _ in range(file_mod.MOVE_COUNT + 5):  # a log: small appends, each made durable
        line = rng.randbytes(rng.randrange(50, 300))
        await f.write(len(model), line)
        apply(model, len(model), line)
        await f.flush()
    await f.settled()
    f.look_after(move_all=True)  # what the last close does
    await f.settled()
    k = Keys(volume)
    raw = await svc.r.hget(k.blocks(ino), "0")
    view = slices.parse(raw)
    assert not [s for s in view if s.inline], "inline slices remain after upkeep"
    assert await svc.r.hlen(k.slices(ino)) == 0  # their bytes left Redis
    reader = await (await node()).opened(ino)
    assert await read_all(reader) == bytes(model)


async def test_upkeep_racing_a_write_of_another_node_never_loses_it(
        node: Nodes, svc: VolumeService) -> None:
    a, b = await node(), await node()
    ino = await new_file(a)
    fa = await a.opened(ino)
    model = bytearray(bytes(8192))
    await fa.write(0, bytes(8192))
    await fa.flush()
    rng = random.Random(11)
    for _ in range(file_mod.MOVE_COUNT):  # enough inline slices for a move
        off, data = rng.randrange(0, 8000), rng.randbytes(100)
        await fa.write(off, data)
        apply(model, off, data)
        await fa.flush()
    fb = await b.opened(ino)
    await fb.write(9000, b"B" * 500)  # b commits between a's upkeep read and its commit
    apply(model, 9000, b"B" * 500)
    real = a.meta.commit

    async def commit_after_b(*args: object, **kw: object) -> None:
        if kw.get("keep_times"):
            await fb.flush()
        return await real(*args, **kw)  # type: ignore[arg-type]

    a.meta.commit = commit_after_b  # type: ignore[method-assign]
    fa.look_after(move_all=True)
    await fa.settled()
    reader = await (await node()).opened(ino)
    assert await read_all(reader) == bytes(model)


async def test_truncate_down_and_up_reads_zeros_past_the_cut(node: Nodes) -> None:
    a = await node()
    ino = await new_file(a)
    f = await a.opened(ino)
    body = random.randbytes(BS + 500_000)
    await f.write(0, body)
    await f.flush()
    await f.truncate(1_000_000)
    await f.truncate(BS + 100)
    reader = await (await node()).opened(ino)
    assert reader.size == BS + 100
    assert await read_all(reader) == body[:1_000_000] + bytes(BS + 100 - 1_000_000)


async def test_a_read_racing_its_own_files_upkeep_reads_the_moved_bytes(node: Nodes) -> None:
    """A read picks inline slices from the view; before it fetches their bytes, the
    file's upkeep moves them to an object (freeing them in Redis) and updates the same
    view: the read must read again, not fail with EIO."""
    a = await node()
    ino = await new_file(a)
    f = await a.opened(ino)
    model = bytearray(bytes(8192))
    await f.write(0, bytes(8192))
    await f.flush()
    for i in range(5):
        line = random.randbytes(200)
        await f.write(8192 + 200 * i, line)
        apply(model, 8192 + 200 * i, line)
        await f.flush()
    f.inline_bytes.clear()  # as after a remount: the bytes must come from Redis
    real = a.meta.inline_slices
    raced: list[bool] = []

    async def upkeep_first(*args: object, **kw: object) -> dict[str, bytes]:
        if not raced:
            raced.append(True)
            f.look_after(move_all=True)
            await f.settled()
        return await real(*args, **kw)  # type: ignore[arg-type]

    a.meta.inline_slices = upkeep_first  # type: ignore[method-assign]
    assert await read_all(f) == bytes(model)
    assert raced


async def test_the_flush_after_an_outage_stores_what_background_uploads_failed_to(
        node: Nodes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory pressure uploads in the background; S3 fails them; S3 comes back: the next
    fsync stores everything and succeeds (an fsync EIO is fatal to databases: it must
    report only what this flush could not store)."""
    a = await node()
    ino = await new_file(a)
    f = await a.opened(ino)
    real = a.blocks.put
    down = [True]

    async def outage(body: bytes | bytearray, **kw: object) -> object:
        if down[0]:
            raise StorageUnavailable("S3 is down (injected)")
        return await real(body, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(a.blocks, "put", outage)
    body = random.randbytes(BS + 100_000)
    await f.write(0, body)
    assert f.start_upload(1) > 0  # memory pressure: block 1 goes now, and fails
    await asyncio.gather(*list(f.tasks), return_exceptions=True)
    assert f.errors
    down[0] = False
    await f.flush()  # not the stale failure: everything is stored now
    reader = await (await node()).opened(ino)
    assert await read_all(reader) == body
