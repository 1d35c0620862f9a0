"""Background upkeep of a file's slices (``FileData._rewrite``) never holds up its commits.

A log or a database WAL appends and fsyncs without pause; its upkeep moves the inline
slices of those commits to one S3 object, or merges fragmented blocks, in the background.
Its upload must not run under the file's lock: the next fsync would wait for a PUT of
bytes that are durable already (every ~30th SQLite WAL commit did, the p99). These tests
hold the upkeep's upload open and check what the file does meanwhile and after: commits
go through, the rewrite lands under them, a block cut meanwhile gives its upload back,
and uncommitted bytes never enter a merged object.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from chunkfs.blocks import file as file_mod
from chunkfs.blocks import slices
from chunkfs.blocks.file import FileData
from chunkfs.meta.schema import Keys
from chunkfs.volumes import VolumeService
from tests.integration.test_file_data import Node, Nodes, apply, new_file, node, read_all, volume

__all__ = ["node", "volume"]  # the fixtures


class HeldPuts:
    """Every upload of ``n``'s block store after ``hold()`` waits until ``release()``."""

    def __init__(self, n: Node, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = n.blocks.put
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = asyncio.Event()
        monkeypatch.setattr(n.blocks, "put", self.put)

    async def put(self, body: bytes | bytearray, **kw: object) -> object:
        if not self.gate.is_set():
            self.waiting.set()
            await self.gate.wait()
        return await self.real(body, **kw)  # type: ignore[arg-type]

    def hold(self) -> None:
        self.gate.clear()
        self.waiting.clear()

    def release(self) -> None:
        self.gate.set()


async def small_commits(f: FileData, model: bytearray, n: int, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(n):
        line = rng.randbytes(rng.randrange(50, 300))
        await f.write(len(model), line)
        apply(model, len(model), line)
        await f.flush()


async def pending(svc: VolumeService, volume: str) -> dict[bytes, bytes]:
    return await svc.r.hgetall(Keys(volume).pending)


async def test_a_commit_goes_through_while_the_upkeep_uploads_and_the_move_lands_under_it(
        node: Nodes, svc: VolumeService, volume: str, monkeypatch: pytest.MonkeyPatch) -> None:
    a = await node()
    puts = HeldPuts(a, monkeypatch)
    ino = await new_file(a)
    f = await a.opened(ino)
    model = bytearray(bytes(8192))
    await f.write(0, bytes(8192))  # past the inline limit: block slices from here on
    await small_commits(f, model, 10, seed=1)
    puts.hold()
    assert f.look_after(move_all=True)  # what the last close does: move them all
    await asyncio.wait_for(puts.waiting.wait(), 30)  # the upkeep's upload is held
    commits = a.meta.stats.as_dict()["by_op"].get("commit", 0)
    await asyncio.wait_for(small_commits(f, model, 3, seed=2), 30)  # not behind the PUT
    assert a.meta.stats.as_dict()["by_op"]["commit"] == commits + 3, "one round trip per fsync"
    puts.release()
    await f.settled()
    raw = await svc.r.hget(Keys(volume).blocks(ino), "0")
    view = slices.parse(raw)
    moved = [s for s in view if not s.inline and s.ref != slices.ZERO]
    assert len(slices.objects(moved)) == 1, "the ten moved slices name one object"
    assert [s.inline for s in view][-3:] == [True] * 3, "the three later commits stay on top"
    assert await svc.r.hlen(Keys(volume).slices(ino)) == 3, "only their bytes are left in Redis"
    assert f.committed[0] == view
    assert await read_all(await (await node()).opened(ino)) == bytes(model)
    assert await read_all(f) == bytes(model)
    assert await pending(svc, volume) == {}, "the move's upload is settled by its commit"


async def test_a_block_cut_while_its_upkeep_uploads_gives_the_upload_back(
        node: Nodes, svc: VolumeService, volume: str, monkeypatch: pytest.MonkeyPatch) -> None:
    a = await node()
    puts = HeldPuts(a, monkeypatch)
    ino = await new_file(a)
    f = await a.opened(ino)
    model = bytearray(bytes(8192))
    await f.write(0, bytes(8192))
    await small_commits(f, model, 10, seed=3)
    puts.hold()
    assert f.look_after(move_all=True)
    await asyncio.wait_for(puts.waiting.wait(), 30)
    await asyncio.wait_for(f.truncate(9000), 30)  # cuts slices the upkeep read: its rewrite no longer applies
    del model[9000:]
    puts.release()
    await f.settled()
    assert await pending(svc, volume) == {}, "the unused upload went back to GC"
    assert await read_all(await (await node()).opened(ino)) == bytes(model)
    assert await read_all(f) == bytes(model)


async def test_a_merge_racing_writes_takes_only_committed_bytes(
        node: Nodes, svc: VolumeService, volume: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes arriving while a merge uploads (no longer under the file's lock) are not
    committed: the merged object must hold the committed bytes only (what another node
    reads), and the writes land on top with the next flush."""
    monkeypatch.setattr(file_mod, "MOVE_COUNT", 1 << 30)  # no moves: merges only
    monkeypatch.setattr(file_mod, "MOVE_BYTES", 1 << 40)
    monkeypatch.setattr(file_mod, "COMPACT_SLICES", 8)
    a = await node()
    puts = HeldPuts(a, monkeypatch)
    ino = await new_file(a)
    f = await a.opened(ino)
    model = bytearray(bytes(8192))
    await f.write(0, bytes(8192))
    await f.flush()
    rng = random.Random(5)
    for i in range(9):  # small overwrites in place: nine slices, one over the bound
        off, data = rng.randrange(0, 8000), rng.randbytes(150)
        await f.write(off, data)
        apply(model, off, data)
        if i == 8:
            puts.hold()  # the merge this commit starts
        await f.flush()
    await asyncio.wait_for(puts.waiting.wait(), 30)  # the merge's upload is held
    committed = bytes(model)
    await f.write(100, b"U" * 4000)  # not committed while the merge runs
    apply(model, 100, b"U" * 4000)
    puts.release()
    await f.settled()
    view = f.committed[0]
    assert len(view) < 9, "the merge landed"
    assert await read_all(await (await node()).opened(ino)) == committed
    assert await read_all(f) == bytes(model)
    await f.flush()
    assert await read_all(await (await node()).opened(ino)) == bytes(model)
    assert await pending(svc, volume) == {}
