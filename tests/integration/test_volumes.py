"""The volume service against real Redis + SeaweedFS: lifecycle, fencing, snapshots, clones."""

from __future__ import annotations

import stat

import pytest

from chunkfs.errors import (
    Fenced,
    InvalidArgument,
    ReadOnly,
    SnapshotExists,
    SnapshotNotFound,
    VolumeExists,
    VolumeNotFound,
)
from chunkfs.fsck import check_namespace
from chunkfs.meta.redis_meta import VolumeMeta
from chunkfs.meta.schema import ROOT_INODE
from chunkfs.volumes import VolumeService

GiB = 1 << 30


def meta_of(svc: VolumeService, ns: str, epoch: str = "1", **kw: object) -> VolumeMeta:
    return VolumeMeta(svc.fast, ns, epoch=epoch, session="test", deadline=5, **kw)  # type: ignore[arg-type]


async def put_file(meta: VolumeMeta, parent: int, name: bytes, body: bytes) -> int:
    attr = await meta.create(parent, name, stat.S_IFREG | 0o644, 0, 0, inline=True)
    await meta.commit(attr.ino, size=len(body), inline=body)
    return attr.ino


async def read_inline(meta: VolumeMeta, parent: int, name: bytes) -> bytes:
    attr = await meta.lookup(parent, name)
    inline, _ = await meta.file_data(attr.ino)
    assert inline is not None
    return inline


async def test_lifecycle_create_list_resize_delete(svc: VolumeService) -> None:
    info = await svc.create_volume("pvc-a", 10 * GiB)
    assert (info.name, info.capacity, info.used_bytes, info.used_inodes) == ("pvc-a", 10 * GiB, 0, 1)
    await svc.create_volume("pvc-b", GiB)
    assert [v.name for v in await svc.list_volumes()] == ["pvc-a", "pvc-b"]
    assert (await svc.resize_volume("pvc-a", 20 * GiB)).capacity == 20 * GiB
    await svc.delete_volume("pvc-a")
    with pytest.raises(VolumeNotFound):
        await svc.get_volume("pvc-a")
    with pytest.raises(VolumeNotFound):
        await svc.delete_volume("pvc-a")
    assert [v.name for v in await svc.list_volumes()] == ["pvc-b"]


async def test_create_existing_name_reports_the_existing_volume(svc: VolumeService) -> None:
    await svc.create_volume("dup", GiB)
    with pytest.raises(VolumeExists) as err:
        await svc.create_volume("dup", 2 * GiB)
    assert err.value.existing.capacity == GiB


@pytest.mark.parametrize("name", ["", "has space", "../x", "a/b", "x" * 300, "-lead"])
async def test_bad_names_are_rejected_and_change_nothing(svc: VolumeService, name: str) -> None:
    with pytest.raises(InvalidArgument):
        await svc.create_volume(name, GiB)
    assert await svc.list_volumes() == []


@pytest.mark.parametrize("capacity", [0, -1])
async def test_bad_capacities_are_rejected(svc: VolumeService, capacity: int) -> None:
    with pytest.raises(InvalidArgument):
        await svc.create_volume("v", capacity)
    assert await svc.list_volumes() == []


async def test_cannot_shrink_below_used(svc: VolumeService) -> None:
    info = await svc.create_volume("v", GiB)
    await put_file(meta_of(svc, info.id), ROOT_INODE, b"f", b"x" * 1000)
    used = 1000 + len(b"f")  # the data and the entry's name
    assert (await svc.get_volume("v")).used_bytes == used
    with pytest.raises(InvalidArgument):
        await svc.resize_volume("v", used - 1)
    assert (await svc.get_volume("v")).capacity == GiB
    assert (await svc.resize_volume("v", used)).capacity == used


async def test_writer_lease_fences_the_previous_writer(svc: VolumeService) -> None:
    info = await svc.create_volume("rwo", GiB)
    epoch_a = await svc.acquire_writer("rwo", "node-a")
    assert await svc.acquire_writer("rwo", "node-a") == epoch_a  # idempotent for the holder
    writer_a = meta_of(svc, info.id, str(epoch_a))
    await put_file(writer_a, ROOT_INODE, b"from-a", b"a")
    epoch_b = await svc.acquire_writer("rwo", "node-b")
    assert epoch_b > epoch_a
    assert (await svc.get_volume("rwo")).writer == "node-b"
    with pytest.raises(Fenced):
        await writer_a.create(ROOT_INODE, b"late", stat.S_IFREG | 0o644, 0, 0)
    with pytest.raises(Fenced):
        await writer_a.commit((await writer_a.lookup(ROOT_INODE, b"from-a")).ino, size=1, inline=b"A")
    writer_b = meta_of(svc, info.id, str(epoch_b))
    assert await read_inline(writer_b, ROOT_INODE, b"from-a") == b"a"
    await svc.release_writer("rwo", "node-a")  # not the holder: nothing changes
    assert (await svc.get_volume("rwo")).epoch == epoch_b
    await svc.release_writer("rwo", "node-b")
    after = await svc.get_volume("rwo")
    assert after.writer is None and after.epoch > epoch_b
    with pytest.raises(Fenced):
        await writer_b.create(ROOT_INODE, b"after-release", stat.S_IFREG | 0o644, 0, 0)


async def test_snapshot_is_a_frozen_metadata_copy(svc: VolumeService) -> None:
    info = await svc.create_volume("src", GiB)
    meta = meta_of(svc, info.id)
    d = await meta.create(ROOT_INODE, b"dir", stat.S_IFDIR | 0o755, 0, 0)
    await put_file(meta, d.ino, b"f", b"version-1")
    requests_before = sum(svc.store.stats.requests.values())
    snap = await svc.create_snapshot("src", "snap-1")
    # only the manifest is written: no block is read or copied, whatever the volume holds
    assert sum(svc.store.stats.requests.values()) - requests_before == 1
    # its size is what it holds: 9 bytes of data, and the names "dir" and "f"
    assert snap.ready_to_use and snap.source_volume == "src" and snap.size_bytes == 9 + 3 + 1
    await meta.commit((await meta.lookup(d.ino, b"f")).ino, size=9, inline=b"version-2")
    clone = await svc.create_volume("clone", GiB, source_snapshot="snap-1")
    assert clone.source == "snapshot:snap-1"
    cmeta = meta_of(svc, clone.id)
    cdir = await cmeta.lookup(ROOT_INODE, b"dir")
    assert await read_inline(cmeta, cdir.ino, b"f") == b"version-1"
    assert await read_inline(meta, d.ino, b"f") == b"version-2"
    # the clone is independent of its source
    await put_file(cmeta, ROOT_INODE, b"only-in-clone", b"x")
    with pytest.raises(Exception):  # noqa: B017 - FsError(ENOENT)
        await meta.lookup(ROOT_INODE, b"only-in-clone")
    for ns in (info.id, clone.id, snap.id):
        assert await check_namespace(svc.r, ns) == []


async def test_snapshot_namespace_is_read_only(svc: VolumeService) -> None:
    await svc.create_volume("src", GiB)
    snap = await svc.create_snapshot("src", "s")
    with pytest.raises(ReadOnly):
        await meta_of(svc, snap.id).create(ROOT_INODE, b"x", stat.S_IFREG | 0o644, 0, 0)


async def test_snapshot_names_are_unique_and_deletable(svc: VolumeService) -> None:
    await svc.create_volume("src", GiB)
    await svc.create_snapshot("src", "s")
    with pytest.raises(SnapshotExists):
        await svc.create_snapshot("src", "s")
    with pytest.raises(VolumeNotFound):
        await svc.create_snapshot("missing", "s2")
    assert [s.name for s in await svc.list_snapshots(source_volume="src")] == ["s"]
    await svc.delete_snapshot("s")
    with pytest.raises(SnapshotNotFound):
        await svc.get_snapshot("s")
    with pytest.raises(SnapshotNotFound):
        await svc.delete_snapshot("s")
    with pytest.raises(SnapshotNotFound):
        await svc.create_volume("c", GiB, source_snapshot="s")


async def test_volume_restores_from_the_s3_manifest_after_redis_loss(svc: VolumeService) -> None:
    info = await svc.create_volume("src", GiB)
    meta = meta_of(svc, info.id)
    await put_file(meta, ROOT_INODE, b"precious", b"survives redis")
    await meta.setxattr((await meta.lookup(ROOT_INODE, b"precious")).ino, b"user.k", b"v")
    await svc.create_snapshot("src", "backup")
    await svc.r.flushdb()  # Redis is lost
    assert await svc.list_volumes() == []
    restored = await svc.create_volume("restored", GiB, source_snapshot="backup")
    rmeta = meta_of(svc, restored.id)
    assert await read_inline(rmeta, ROOT_INODE, b"precious") == b"survives redis"
    assert await rmeta.getxattr((await rmeta.lookup(ROOT_INODE, b"precious")).ino, b"user.k") == b"v"
    assert await check_namespace(svc.r, restored.id) == []


async def test_clone_of_a_live_volume_and_capacity_check(svc: VolumeService) -> None:
    info = await svc.create_volume("src", GiB)
    await put_file(meta_of(svc, info.id), ROOT_INODE, b"f", b"y" * 100)
    with pytest.raises(InvalidArgument):
        await svc.create_volume("small", 50, source_volume="src")
    assert [v.name for v in await svc.list_volumes()] == ["src"]
    clone = await svc.create_volume("copy", GiB, source_volume="src")
    assert await read_inline(meta_of(svc, clone.id), ROOT_INODE, b"f") == b"y" * 100
    assert clone.used_bytes == 100 + len(b"f")  # the data and the entry's name


async def test_taking_a_held_lease_without_stealing_is_refused(svc: VolumeService) -> None:
    from chunkfs.errors import LeaseHeld

    await svc.create_volume("rwo", GiB)
    epoch = await svc.acquire_writer("rwo", "node-a", steal=False)
    assert await svc.acquire_writer("rwo", "node-a", steal=False) == epoch
    with pytest.raises(LeaseHeld) as err:
        await svc.acquire_writer("rwo", "node-b", steal=False)
    assert err.value.holder == "node-a"
    assert (await svc.get_volume("rwo")).epoch == epoch  # nothing changed


async def test_a_snapshot_whose_manifest_upload_failed_is_finished_by_the_retry(svc: VolumeService) -> None:
    """The external-snapshotter retries CreateSnapshot until it is ready: the retry must
    finish the snapshot (manifest in S3, ready), not report "not ready" forever."""
    import dataclasses

    from chunkfs.errors import StorageUnavailable
    from chunkfs.objstore import ObjectStore
    from chunkfs.volumes import manifest_key

    info = await svc.create_volume("src", GiB)
    await put_file(meta_of(svc, info.id), ROOT_INODE, b"f", b"in the snapshot")
    good = svc.store
    dead = await ObjectStore.create(dataclasses.replace(good.config, endpoint="http://127.0.0.1:9"),
                                    deadline=1.0)
    svc.store = dead
    try:
        with pytest.raises(StorageUnavailable):
            await svc.create_snapshot("src", "snap")
    finally:
        svc.store = good
        await dead.close()
    assert not (await svc.get_snapshot("snap")).ready_to_use
    assert not await good.exists(manifest_key("snap"))
    done = await svc.create_snapshot("src", "snap")  # the retry
    assert done.ready_to_use and await good.exists(manifest_key("snap"))
    with pytest.raises(SnapshotExists):  # a finished snapshot is not made twice
        await svc.create_snapshot("src", "snap")
