"""The mount's registry of open files (``chunkfs.openfiles.OpenFiles``) in-process, over
the real Redis and S3, without FUSE: its invariants (one FileData per inode, close-to-open
reloads, orphans purged exactly once when the last handle and the last kernel reference
go, versions, lookups, capacity admission, fencing) tested directly. Each ``Mount`` is one
mount's worth of state: its own session, cache, block store, budget, volume state.
"""

from __future__ import annotations

import asyncio
import errno
import random
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from chunkfs.blocks.budget import WriteBudget
from chunkfs.blocks.store import BlockStore
from chunkfs.cache import BlockCache
from chunkfs.errors import Fenced, FsError, NoSpace
from chunkfs.meta.redis_meta import VolumeMeta
from chunkfs.meta.schema import ROOT_INODE
from chunkfs.openfiles import OpenFiles
from chunkfs.volume_state import VolumeState
from chunkfs.volumes import VolumeService

BS = 4 << 20


@dataclass
class Mount:
    meta: VolumeMeta
    files: OpenFiles
    budget: WriteBudget
    changed: list[int]  # inodes the registry told the metadata cache to forget
    redis: Any  # redis-py, for looking at what the volume holds

    def purges(self) -> int:
        return self.meta.stats.by_op.get("purge", 0)

    def loads(self) -> int:
        return self.meta.stats.by_op.get("open", 0)


Mounts = Callable[..., Awaitable[Mount]]


@pytest.fixture
async def mount(svc: VolumeService, tmp_path: Path) -> AsyncIterator[Mounts]:
    made: list[tuple[Mount, BlockStore]] = []
    volumes: dict[int, str] = {}

    async def make(capacity: int = 1 << 30) -> Mount:
        if capacity not in volumes:
            volumes[capacity] = (await svc.create_volume(f"v{len(volumes)}", capacity)).id
        n = len(made)
        cache = await BlockCache.open(str(tmp_path / f"cache{n}"), 1 << 30)
        meta = VolumeMeta(svc.fast, volumes[capacity], epoch="", session=f"mount{n}",  # type: ignore[attr-defined]
                          deadline=10)
        await meta.heartbeat()
        record = await meta.volume_state()
        assert record is not None
        blocks = BlockStore(svc.store, cache, meta, memory_limit=1 << 20)
        changed: list[int] = []
        files = OpenFiles(meta, blocks, VolumeState(meta, record), block_size=BS,
                          inline_limit=4096, readahead_blocks=4, changed=changed.append)
        budget = WriteBudget(64 << 20, stall_timeout=10)
        files.attach_budget(budget)
        made.append((Mount(meta, files, budget, changed, svc.r), blocks))
        return made[-1][0]

    yield make
    for m, blocks in made:
        await m.files.flush_all()
        await blocks.drain()


async def new_file(m: Mount, name: bytes = b"f") -> int:
    return (await m.meta.create(ROOT_INODE, name, stat.S_IFREG | 0o644, 0, 0, inline=True)).ino


async def orphans(m: Mount) -> set[int]:
    return {int(i) for i in await m.redis.hkeys(m.meta.keys.orphans)}


async def test_opens_that_race_share_one_load_and_a_clean_file_is_read_afresh(
        mount: Mounts) -> None:
    a, b = await mount(), await mount()
    ino = await new_file(a)
    loads = a.loads()
    (fh1, h1, attr1), (fh2, h2, attr2) = await asyncio.gather(a.files.open(ino),
                                                              a.files.open(ino))
    assert h1.data is h2.data and fh1 != fh2
    assert a.loads() - loads == 1  # one round trip for both
    assert [attr1 is None, attr2 is None].count(True) == 1  # the second shared the first's
    await a.files.release(fh1)
    assert a.files.is_loaded(ino)  # one handle still open
    await a.files.release(fh2)
    assert not a.files.is_loaded(ino) and len(a.files) == 0  # clean and closed: dropped
    # another mount writes; the next open here sees it (close-to-open)
    fh, h, _ = await b.files.open(ino)
    await h.data.write(0, b"new bytes")
    await b.files.release(fh)
    fh, h, attr = await a.files.open(ino)
    assert attr is not None and attr.size == 9 and h.data.size == 9
    assert bytes(await h.data.read(0, 9, h.stream)) == b"new bytes"
    await a.files.release(fh)


async def test_a_file_with_unflushed_writes_stays_loaded_and_is_not_reloaded(
        mount: Mounts) -> None:
    a = await mount()
    ino = await new_file(a)
    fh, h, _ = await a.files.open(ino)
    await h.data.write(0, random.randbytes(100_000))
    assert a.files.unflushed() == {ino: 100_000} and a.files.dirty_bytes() == 100_000
    assert a.files.uncommitted_growth() == 100_000
    assert a.files.size(ino, 0) == 100_000  # what getattr answers: the local size
    fh2, h2, attr = await a.files.open(ino)
    assert attr is None and h2.data is h.data  # not re-read: it holds our writes
    await a.files.flush(fh2)
    assert a.files.unflushed() == {} and ino in a.changed
    await a.files.release(fh2)
    await a.files.release(fh)
    assert len(a.files) == 0 and a.files.size(ino, 7) == 7


async def test_an_unlinked_file_is_purged_once_when_its_last_handle_and_lookup_are_gone(
        mount: Mounts) -> None:
    a = await mount()
    ino = await new_file(a)
    fh, h, _ = await a.files.open(ino)
    await h.data.write(0, b"still readable")
    await a.files.flush(fh)
    a.files.looked_up(ino)
    a.files.looked_up(ino)
    _, left = await a.meta.unlink(ROOT_INODE, b"f", is_dir=False, keep_if_open=True)
    assert left == 0
    await a.files.unlinked(ino)
    assert await orphans(a) == {ino}
    assert bytes(await h.data.read(0, 14, h.stream)) == b"still readable"  # POSIX: open
    await a.files.release(fh)
    assert a.purges() == 0  # the kernel still refers to it
    await a.files.forget(ino, 1)
    assert a.purges() == 0
    await a.files.forget(ino, 1)  # the last reference: purged now
    assert a.purges() == 1 and await orphans(a) == set()
    with pytest.raises(FsError) as err:
        await a.meta.getattr(ino)
    assert err.value.errno == errno.ENOENT
    await a.files.forget(ino, 1)  # stray triggers purge nothing more
    await a.files.purge_orphans()
    assert a.purges() == 1


async def test_a_close_and_the_unmount_racing_purge_an_orphan_once(mount: Mounts) -> None:
    """The orphan leaves the registry before its purge is sent: a second trigger while
    the purge is in flight (here the unmount's) finds nothing to purge."""
    a = await mount()
    ino = await new_file(a)
    fh, h, _ = await a.files.open(ino)
    await h.data.write(0, random.randbytes(200_000))
    await a.files.flush(fh)
    await a.meta.unlink(ROOT_INODE, b"f", is_dir=False, keep_if_open=True)
    await a.files.unlinked(ino)
    assert a.purges() == 0
    # the last close sends the purge; meanwhile the unmount and a forget let go of it too
    await asyncio.gather(a.files.release(fh), a.files.purge_orphans(), a.files.forget(ino, 1))
    assert a.purges() == 1 and await orphans(a) == set()
    assert len(a.files) == 0 and a.budget.used == 0


async def test_an_orphan_nobody_refers_to_is_purged_at_once(mount: Mounts) -> None:
    a = await mount()
    ino = await new_file(a)
    await a.meta.unlink(ROOT_INODE, b"f", is_dir=False, keep_if_open=True)
    await a.files.unlinked(ino)
    assert a.purges() == 1 and await orphans(a) == set()


async def test_versions_keep_the_page_cache_only_while_the_file_is_unchanged_here(
        mount: Mounts) -> None:
    a = await mount()
    ino = await new_file(a)
    v1 = (1, 10)
    assert not a.files.same_version(ino, v1)  # first open: nothing cached yet
    assert a.files.same_version(ino, v1)
    assert not a.files.same_version(ino, (2, 10))  # another node changed it
    fh, h, _ = await a.files.open(ino)
    await h.data.write(0, b"x")
    await a.files.flush(fh)  # a change through this mount forgets the version
    assert not a.files.same_version(ino, (2, 10))
    a.files.forget_version(ino)  # O_TRUNC
    assert not a.files.same_version(ino, (2, 10))
    assert a.files.same_version(ino, (2, 10))
    await a.files.release(fh)
    await a.meta.unlink(ROOT_INODE, b"f", is_dir=False, keep_if_open=True)
    await a.files.unlinked(ino)  # its last link: the version goes with it
    assert not a.files.same_version(ino, (2, 10))


async def test_what_the_kernel_was_told_goes_with_its_last_lookup_reference(
        mount: Mounts) -> None:
    a = await mount()
    ino = await new_file(a)
    for _ in range(3):
        a.files.looked_up(ino)
    a.files.told_kernel(ino, (5, 6))
    assert a.files.kernel_has(ino, (5, 6)) and not a.files.kernel_has(ino, (5, 7))
    await a.files.forget(ino, 2)
    assert a.files.kernel_has(ino, (5, 6))
    await a.files.forget(ino, 1)
    assert not a.files.kernel_has(ino, (5, 6))
    assert a.purges() == 0  # not an orphan: forgetting it removes nothing


async def test_writes_are_refused_before_buffering_what_the_volume_cannot_hold(
        mount: Mounts) -> None:
    """Admission counts the last known usage, every file's uncommitted growth on this
    mount, and the write's own growth (a hole before it included)."""
    a = await mount(capacity=4 << 20)
    one, two = await new_file(a, b"one"), await new_file(a, b"two")
    record = await a.meta.volume_state()
    assert record is not None
    names = record.used  # metadata costs space too: the two names
    fh1, h1, _ = await a.files.open(one)
    fh2, h2, _ = await a.files.open(two)
    await h1.data.write(0, random.randbytes(3 << 20))  # not committed: still counted
    with pytest.raises(NoSpace):
        await h2.data.write(0, random.randbytes(2 << 20))
    assert h2.data.is_clean and a.files.dirty_bytes() == 3 << 20  # nothing buffered
    with pytest.raises(NoSpace):  # a small write far out charges the hole before it
        await h2.data.write(2 << 20, b"x")
    await h2.data.write(0, random.randbytes(512 << 10))  # what fits is admitted
    await a.files.flush(fh1)
    await a.files.flush(fh2)
    with pytest.raises(NoSpace):  # committed now: counted in the usage
        await h2.data.write(1 << 20, b"y")
    await a.files.truncate(one, 0)  # freeing works on a full volume
    await h2.data.write(1 << 20, random.randbytes(2 << 20))
    await a.files.release(fh1)
    await a.files.release(fh2)
    record = await a.meta.volume_state()
    assert record is not None and record.used - names == 3 << 20


async def test_a_fenced_mount_commits_nothing_more_and_frees_what_it_held(mount: Mounts) -> None:
    a = await mount()
    ino = await new_file(a)
    fh, h, _ = await a.files.open(ino)
    await h.data.write(0, random.randbytes(300_000))
    a.files.state.fence("test: the lease moved on")
    with pytest.raises(Fenced):
        await a.files.flush(fh)
    await a.files.release(fh)  # the last close: its buffers and uploads are given back
    assert len(a.files) == 0 and a.budget.used == 0
    assert (await a.meta.getattr(ino)).size == 0  # nothing of it was committed


async def test_a_truncate_of_a_file_nobody_has_open_commits_at_once(mount: Mounts) -> None:
    a, b = await mount(), await mount()
    ino = await new_file(a)
    fh, h, _ = await a.files.open(ino)
    await h.data.write(0, random.randbytes(100_000))
    await a.files.release(fh)
    await b.files.truncate(ino, 50_000)
    assert len(b.files) == 0  # clean and unopened: not kept
    assert (await a.meta.getattr(ino)).size == 50_000
    await b.files.truncate(ino, 5 * BS)  # extending: zeros, nothing stored
    fh, h, attr = await a.files.open(ino)
    assert attr is not None and attr.size == 5 * BS
    assert bytes(await h.data.read(4 * BS, 100, h.stream)) == bytes(100)
    await a.files.release(fh)
