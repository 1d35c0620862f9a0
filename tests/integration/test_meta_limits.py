"""One tenant cannot exhaust the Redis that every volume shares.

Metadata costs a volume's capacity like data does (entry names, symlink targets, xattr
names and values), inodes are limited per volume (df -i shows the limit), and no
metadata script's cost grows with something a pod controls (directory depth, directory
size, how much was written since the last GC).
"""

from __future__ import annotations

import errno
import os
import stat

import pytest

from chunkfs.errors import FsError, NoSpace
from chunkfs.fsck import check_namespace
from chunkfs.meta.redis_meta import VolumeMeta
from chunkfs.meta.schema import ROOT_INODE, inode_limit
from chunkfs.volumes import VolumeService
from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import Cli, Mounter, expect_errno

KiB, MiB = 1 << 10, 1 << 20


def meta_of(svc: VolumeService, ns: str) -> VolumeMeta:
    return VolumeMeta(svc.fast, ns, epoch="", session="t", deadline=10)  # type: ignore[attr-defined]


async def used(svc: VolumeService, name: str) -> int:
    return (await svc.get_volume(name)).used_bytes


async def test_names_symlink_targets_and_xattrs_cost_capacity_and_are_given_back(svc) -> None:
    info = await svc.create_volume("v", 64 * KiB)
    meta = meta_of(svc, info.id)
    d = await meta.create(ROOT_INODE, b"dir", stat.S_IFDIR | 0o755, 0, 0)
    assert await used(svc, "v") == 3
    link = await meta.create(d.ino, b"l", stat.S_IFLNK | 0o777, 0, 0, target=b"t" * 1000)
    assert await used(svc, "v") == 3 + 1 + 1000
    await meta.setxattr(link.ino, b"user.k", b"v" * 2000)
    assert await used(svc, "v") == 3 + 1 + 1000 + 6 + 2000
    await meta.rename(d.ino, b"l", ROOT_INODE, b"longer-name", 0, keep_if_open=False)
    assert await used(svc, "v") == 3 + 11 + 1000 + 6 + 2000
    assert await check_namespace(svc.r, info.id) == []
    # xattr values fill the 64 KiB volume: one past it is refused
    f = await meta.create(ROOT_INODE, b"f", stat.S_IFREG | 0o644, 0, 0, inline=True)
    for i in range(40):
        try:
            await meta.setxattr(f.ino, f"user.{i}".encode(), b"x" * 2000)
        except NoSpace:
            break
    else:
        pytest.fail("xattrs were stored past the volume's capacity")
    assert await used(svc, "v") <= 64 * KiB
    await meta.unlink(ROOT_INODE, b"f", is_dir=False, keep_if_open=False)
    await meta.unlink(ROOT_INODE, b"longer-name", is_dir=False, keep_if_open=False)
    await meta.unlink(ROOT_INODE, b"dir", is_dir=True, keep_if_open=False)
    assert await used(svc, "v") == 0
    assert await check_namespace(svc.r, info.id) == []


async def test_a_volume_holds_at_most_its_inode_limit(svc) -> None:
    info = await svc.create_volume("v", 1 << 30, max_inodes=20)
    assert info.max_inodes == 20
    meta = meta_of(svc, info.id)
    for i in range(19):  # the root is the first inode
        await meta.create(ROOT_INODE, f"f{i}".encode(), stat.S_IFREG | 0o644, 0, 0, inline=True)
    with pytest.raises(NoSpace):
        await meta.create(ROOT_INODE, b"one-too-many", stat.S_IFREG | 0o644, 0, 0)
    await meta.unlink(ROOT_INODE, b"f0", is_dir=False, keep_if_open=False)
    await meta.create(ROOT_INODE, b"fits-again", stat.S_IFREG | 0o644, 0, 0)
    default = await svc.create_volume("w", 1 << 30)
    assert default.max_inodes == inode_limit(1 << 30) == (1 << 30) // 4096


async def test_a_rename_walks_a_bounded_number_of_ancestors(svc) -> None:
    """A directory rename checks the destination is not inside the source; in a tree
    deeper than the walk's bound it is refused (ELOOP) instead of walking 50,000 levels
    inside one Redis call that every volume waits for."""
    info = await svc.create_volume("v", 1 << 30)
    meta = meta_of(svc, info.id)
    top = await meta.create(ROOT_INODE, b"top", stat.S_IFDIR | 0o755, 0, 0)
    parent = top.ino
    chain = []
    for i in range(1100):
        parent = (await meta.create(parent, f"d{i}".encode(), stat.S_IFDIR | 0o755, 0, 0)).ino
        chain.append(parent)
    await meta.create(ROOT_INODE, b"other", stat.S_IFDIR | 0o755, 0, 0)
    with pytest.raises(FsError) as err:  # into its own descendant, shallow enough to see it
        await meta.rename(ROOT_INODE, b"top", chain[10], b"x", 0, keep_if_open=False)
    assert err.value.errno == errno.EINVAL
    with pytest.raises(FsError) as err:  # the destination is deeper than the bound
        await meta.rename(ROOT_INODE, b"other", chain[-1], b"x", 0, keep_if_open=False)
    assert err.value.errno == errno.ELOOP
    await meta.rename(ROOT_INODE, b"other", chain[100], b"x", 0, keep_if_open=False)  # fine
    assert await check_namespace(svc.r, info.id) == []


async def test_a_directory_with_many_entries_lists_completely_and_in_order(svc) -> None:
    info = await svc.create_volume("v", 1 << 30)
    meta = meta_of(svc, info.id)
    d = await meta.create(ROOT_INODE, b"big", stat.S_IFDIR | 0o755, 0, 0)
    names = [f"n{i:05d}".encode() for i in range(3000)]
    pipe = svc.r.pipeline(transaction=False)  # fill it fast: only the listing is under test
    for i, name in enumerate(names):
        pipe.hset(meta.keys.dir(d.ino), name, 100000 + i)
    await pipe.execute()
    listed = await meta.readdir(d.ino)
    assert [name for name, _ in listed] == sorted(names)
    assert len({ino for _, ino in listed}) == 3000
    await svc.r.delete(meta.keys.dir(d.ino))  # the entries name no inode: fsck would say so


def test_df_shows_the_inode_limit_and_a_full_volume_refuses_new_files(
        mounter: Mounter, cli: Cli) -> None:
    cli.run("volume", "create", "small", "--capacity", "1GiB", "--max-inodes", "30")
    m = mounter.mount("small")
    st = os.statvfs(m.path)
    assert st.f_files == 30 and st.f_ffree == 29
    for i in range(29):
        (m / f"f{i}").write_bytes(b"x")
    expect_errno(errno.ENOSPC, (m / "more").write_bytes, b"x")
    expect_errno(errno.ENOSPC, os.mkdir, m / "dir")
    st = os.statvfs(m.path)
    assert st.f_ffree == 0
    os.unlink(m / "f0")
    os.mkdir(m / "dir")
    assert cli.info("small")["max_inodes"] == 30
