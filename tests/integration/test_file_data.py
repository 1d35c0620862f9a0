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
from chunkfs.blocks.file import FileData, ReadStream
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

    def file(self, ino: int, *, readahead_blocks: int = 0) -> FileData:
        return FileData(ino, self.meta, self.blocks, self.budget, block_size=BS,
                        inline_limit=4096, readahead_blocks=readahead_blocks)

    async def opened(self, ino: int, *, readahead_blocks: int = 0) -> FileData:
        """A FileData as an open() on this node loads it: the committed size and map."""
        data = self.file(ino, readahead_blocks=readahead_blocks)
        await data.load((await self.meta.getattr(ino)).size)
        return data


Nodes = Callable[..., Awaitable[Node]]


@pytest.fixture
async def volume(svc: VolumeService) -> str:
    return (await svc.create_volume("v", 1 << 30)).id


@pytest.fixture
async def node(svc: VolumeService, volume: str, tmp_path: Path) -> AsyncIterator[Nodes]:
    made: list[Node] = []

    async def make(memory: int = 1 << 20) -> Node:
        """A node whose block store keeps ``memory`` bytes of blocks in memory."""
        n = len(made)
        cache = await BlockCache.open(str(tmp_path / f"cache{n}"), 1 << 30)
        meta = VolumeMeta(svc.fast, volume, epoch="", session=f"node{n}", deadline=10)  # type: ignore[attr-defined]
        await meta.heartbeat()
        made.append(Node(meta, BlockStore(svc.store, cache, meta, memory_limit=memory),
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


async def test_a_reader_in_order_has_the_next_block_loading_before_it_reaches_it(
        node: Nodes) -> None:
    """FileData reads ahead by itself, from the reader's stream: the window grows with
    the bytes read in order (4x, at most ``readahead_blocks``), so the first bytes cost
    one GET and a reader 1 MiB into block 0 has block 1 on its way, not block 2; a read
    out of order starts nothing beyond its own block."""
    a = await node()
    ino = await new_file(a)
    f = await a.opened(ino)
    body = random.randbytes(3 * BS)
    await f.write(0, body)
    await f.flush()

    async def gets_of(n: Node, reads: Callable[[FileData], Awaitable[bytes]]) -> int:
        reader = await n.opened(ino, readahead_blocks=4)
        before = n.blocks.store.stats.requests.get("get", 0)
        got = await reads(reader)
        await n.blocks.drain()
        assert got
        return n.blocks.store.stats.requests.get("get", 0) - before

    async def first_mib_in_order(reader: FileData) -> bytes:
        stream, got, step = ReadStream(), bytearray(), 128 * 1024
        for off in range(0, 1 << 20, step):
            got += await reader.read(off, step, stream)
        assert bytes(got) == body[:1 << 20]
        return bytes(got)

    async def first_bytes(reader: FileData) -> bytes:
        got = bytes(await reader.read(0, 4096, ReadStream()))
        assert got == body[:4096]
        return got

    async def out_of_order(reader: FileData) -> bytes:
        stream = ReadStream()
        got = bytes(await reader.read(2 * BS + 100, 4096, stream))
        got += bytes(await reader.read(BS + 100, 4096, stream))
        assert got == body[2 * BS + 100:2 * BS + 4196] + body[BS + 100:BS + 4196]
        return got

    big = 4 * BS  # blocks read stay in memory: each GET counted is a block loaded once
    assert await gets_of(await node(big), first_bytes) == 1
    assert await gets_of(await node(big), first_mib_in_order) == 2  # block 0, block 1 ahead
    assert await gets_of(await node(big), out_of_order) == 2  # each read its own block only
    # without a stream (whole-file readers, upkeep) nothing is read ahead either
    plain = await (await node(big)).opened(ino, readahead_blocks=4)
    before = plain.blocks.store.stats.requests.get("get", 0)
    assert bytes(await plain.read(0, 4096)) == body[:4096]
    await plain.blocks.drain()
    assert plain.blocks.store.stats.requests.get("get", 0) - before == 1


async def test_the_file_accounts_for_what_it_buffers_and_what_its_commit_will_charge(
        node: Nodes, svc: VolumeService, volume: str) -> None:
    """What the mount's status and admission read from a file: bytes held in the write
    budget (``dirty_bytes``), the volume usage its commit will add (``uncommitted_growth``,
    ``growth_of`` for a write to come), and that a flush settles both."""
    a = await node()

    async def used() -> int:
        record = await a.meta.volume_state()
        assert record is not None
        return record.used

    ino = await new_file(a)
    f = await a.opened(ino)
    base = await used()
    await f.write(0, b"x" * 1000)  # inline: the body is the buffer
    assert (f.dirty_bytes, f.uncommitted_growth) == (1000, 1000)
    assert f.growth_of(500, 100) == 0 and f.growth_of(1000, 24) == 24
    await f.write(50_000, random.randbytes(100_000))  # past the inline limit: a block now
    assert f.dirty_bytes == a.budget.used == 101_000  # only the bytes written are held
    assert f.uncommitted_growth == 150_000  # the hole before the write counts (extent)
    assert f.growth_of(20_000, 1000) == 0 and f.growth_of(150_000, 1000) == 1000
    assert f.growth_of(BS, 10) == 10  # another block: its own extent
    await f.write(140_000, random.randbytes(20_000))
    assert f.dirty_bytes == 111_000 and f.uncommitted_growth == 160_000  # 10 KB overlap
    await f.flush()
    assert f.is_clean and f.dirty_bytes == 0 and a.budget.used == 0
    assert f.uncommitted_growth == 0
    assert await used() - base == 160_000
    await f.truncate(10_000)  # commits at once, frees at once
    assert f.is_clean and f.uncommitted_growth == 0
    # what remains reaches byte 1000; zeros past a block's last byte cost nothing
    assert await used() - base == 1000
    assert f.growth_of(5000, 10) == 4010  # until a write reaches into them


@pytest.mark.parametrize("cut", [0, 500, 1000, 10_000, 50_000, 50_500, 51_000, 120_000])
async def test_a_truncate_through_one_small_flush_keeps_its_bytes_before_the_cut(
        node: Nodes, cut: int) -> None:
    """One flush of small ranges of a block stores them inline as one id that several
    slices name; a truncation anywhere (inside a range, between them, before or past all
    of them) must keep every byte before the cut, and free the id's bytes only with its
    last slice."""
    a = await node()
    ino = await new_file(a)
    f = await a.opened(ino)
    ranges = [(0, random.randbytes(1000)), (50_000, random.randbytes(1000)),
              (100_000, random.randbytes(700))]
    model = bytearray()
    for off, data in ranges:  # past the inline limit: block slices, all in one generation
        await f.write(off, data)
        model[len(model):off] = bytes(off - len(model))
        model[off:off + len(data)] = data
    await f.flush()
    await f.truncate(cut)
    model = model[:cut] + bytes(max(0, cut - len(model)))
    reader = await (await node()).opened(ino)
    assert await read_all(reader) == bytes(model)
    if cut == 0:  # nothing names the id any more: its bytes are gone from Redis
        state = await a.meta.volume_state()
        assert state is not None and state.slicebytes == 0
