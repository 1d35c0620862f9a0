"""Metadata mutations retried after a lost reply return their first outcome, exactly once.

The reply of a Lua script can be lost after Redis ran it (a connection cut, a watchdog
giving up on a slow reply); the client then runs the same request again. Each case
below runs a real mutation on the real Redis, drops its reply as a broken connection
would, and checks that the retry reports what the first run did and changed nothing
more. Through a real mount and a real TCP proxy, see test_faults_redis.py.
"""

from __future__ import annotations

import asyncio
import errno
import stat
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from chunkfs.errors import Fenced, FsError, VolumeFrozen
from chunkfs.fsck import check_namespace
from chunkfs.meta import namespace as nsops
from chunkfs.meta import redis_meta
from chunkfs.meta.redis_meta import VolumeMeta
from chunkfs.meta.resp import RespClient
from chunkfs.meta.schema import ROOT_INODE, Keys
from chunkfs.volumes import VolumeService

GiB = 1 << 30


class ReplyLosingClient:
    """The real hot-path client, except that it can lose the reply of its next script
    after Redis has run it (what a cut connection does)."""

    def __init__(self, real: RespClient) -> None:
        self.real = real
        self.lose = 0
        self.down_since = None

    async def evalsha(self, script: str, keys: list[Any], args: list[Any], **kw: Any) -> Any:
        result = await self.real.evalsha(script, keys, args, **kw)
        if self.lose:
            self.lose -= 1
            raise RedisConnectionError("connection lost before the reply arrived")
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.fixture
async def vol(svc: VolumeService) -> tuple[VolumeMeta, ReplyLosingClient, str]:
    info = await svc.create_volume("v", GiB)
    client = ReplyLosingClient(svc.fast)  # type: ignore[attr-defined]
    meta = VolumeMeta(client, info.id, epoch="", session="s", deadline=10)  # type: ignore[arg-type]
    return meta, client, info.id


async def test_mkdir_with_a_lost_reply_creates_one_directory_and_succeeds(svc, vol) -> None:
    meta, client, ns = vol
    client.lose = 1
    attr = await meta.create(ROOT_INODE, b"d", stat.S_IFDIR | 0o755, 0, 0)
    assert await meta.readdir(ROOT_INODE) == [(b"d", attr.ino)]
    assert (await meta.lookup(ROOT_INODE, b"d")).ino == attr.ino
    assert await check_namespace(svc.r, ns) == []


async def test_unlink_and_rename_with_lost_replies_report_their_first_outcome(svc, vol) -> None:
    meta, client, ns = vol
    a = await meta.create(ROOT_INODE, b"a", stat.S_IFREG | 0o644, 0, 0, inline=True)
    b = await meta.create(ROOT_INODE, b"b", stat.S_IFREG | 0o644, 0, 0, inline=True)
    client.lose = 1
    assert await meta.rename(ROOT_INODE, b"a", ROOT_INODE, b"b", 0, keep_if_open=True) == (b.ino, 0)
    client.lose = 1
    assert await meta.unlink(ROOT_INODE, b"b", is_dir=False, keep_if_open=True) == (a.ino, 0)
    assert await meta.readdir(ROOT_INODE) == []
    # both inodes are orphans of this session now, none was destroyed twice or leaked
    orphans = {int(i) for i in await svc.r.hkeys(Keys(ns).orphans)}
    assert orphans == {a.ino, b.ino}
    for ino in orphans:
        client.lose = 1
        await meta.purge(ino)
    assert await check_namespace(svc.r, ns) == []
    assert int((await svc.get_volume("v")).used_inodes) == 1


async def test_link_xattrs_truncate_and_commit_survive_lost_replies(svc, vol) -> None:
    meta, client, ns = vol
    f = await meta.create(ROOT_INODE, b"f", stat.S_IFREG | 0o644, 0, 0, inline=True)
    client.lose = 1
    await meta.commit(f.ino, size=5, inline=b"hello")
    client.lose = 1
    await meta.link(f.ino, ROOT_INODE, b"g")
    assert (await meta.getattr(f.ino)).nlink == 2
    client.lose = 1
    await meta.setxattr(f.ino, b"user.k", b"v", 1)  # XATTR_CREATE: a rerun would be EEXIST
    client.lose = 1
    await meta.removexattr(f.ino, b"user.k")  # a rerun would be ENODATA
    client.lose = 1
    await meta.truncate(f.ino, 2, 4 << 20)
    client.lose = 1
    await meta.setattr(f.ino, {"m": stat.S_IFREG | 0o600})
    assert (await meta.file_data(f.ino))[0] == b"he"
    assert await meta.listxattr(f.ino) == []
    assert (await svc.get_volume("v")).used_bytes == 2 + len(b"f") + len(b"g")  # data + names
    assert await check_namespace(svc.r, ns) == []


async def test_a_request_that_really_failed_is_not_remembered(svc, vol) -> None:
    meta, client, _ = vol
    await meta.create(ROOT_INODE, b"x", stat.S_IFREG | 0o644, 0, 0)
    with pytest.raises(FsError) as err:
        await meta.create(ROOT_INODE, b"x", stat.S_IFREG | 0o644, 0, 0)
    assert err.value.errno == errno.EEXIST


async def test_a_fenced_mount_cannot_purge_inodes(svc, vol) -> None:
    meta, _, ns = vol
    epoch = await svc.acquire_writer("v", "node-a")
    writer = VolumeMeta(svc.fast, ns, epoch=str(epoch), session="old", deadline=5)  # type: ignore[attr-defined]
    f = await writer.create(ROOT_INODE, b"f", stat.S_IFREG | 0o644, 0, 0, inline=True)
    await writer.unlink(ROOT_INODE, b"f", is_dir=False, keep_if_open=True)
    await svc.acquire_writer("v", "node-b")  # the lease moves on: `writer` is fenced
    with pytest.raises(Fenced):
        await writer.purge(f.ino)
    assert await svc.r.exists(Keys(ns).inode(f.ino))


async def test_a_writer_waits_out_a_snapshot_freeze_and_reports_one_that_never_ends(
        svc, vol, monkeypatch) -> None:
    meta, _, ns = vol
    await nsops.freeze(svc.r, ns)
    waiting = asyncio.create_task(meta.create(ROOT_INODE, b"during", stat.S_IFREG | 0o644, 0, 0))
    await asyncio.sleep(0.5)
    assert not waiting.done()
    await nsops.thaw(svc.r, ns)
    await asyncio.wait_for(waiting, 10)  # went through once thawed, no error
    monkeypatch.setattr(redis_meta, "_FROZEN_WAIT", 0.5)
    await nsops.freeze(svc.r, ns)
    with pytest.raises(VolumeFrozen, match="snapshot"):
        await meta.create(ROOT_INODE, b"never", stat.S_IFREG | 0o644, 0, 0)
    await nsops.thaw(svc.r, ns)
