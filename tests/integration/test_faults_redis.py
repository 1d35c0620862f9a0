"""Redis faults seen through a real mount.

Redis unreachable (SIGSTOPped): operations fail with EIO after the io-timeout, and the
mount works again once Redis is back, without a remount (a Redis of its own, so that
pausing it disturbs no other test). Replies lost after Redis ran a mutation (held by the
fault proxy until the mount's watchdog gives up and retries): every operation reports
its first outcome, exactly once (the in-process cases are in test_meta_retries.py)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from chunkfs.meta.schema import VOLUMES, Keys
from devstack.localstack import RedisService, start_redis
from tests.faultproxy import FaultProxy
from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import (
    Cli,
    MiB,
    Mounter,
    file_sha256,
    make_env,
    rand_bytes,
    sha256,
    start_bounded,
    wait_until,
    write_file,
)

IO_TIMEOUT = 5
SLACK = 5


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisService]:
    svc = start_redis(tmp_path / "redis", databases=2, die_with_parent=True)
    try:
        yield svc
    finally:
        if svc.alive():
            svc.resume()
        svc.stop(timeout=5)


@pytest.mark.mount_log_allows(
    "operation failed", "volume refresh failed", "redis retry", "session heartbeat failed",
    "reading the last gc run failed", "reading the last backup failed",
    reason="Redis is stopped on purpose: operations fail with EIO and the mount logs why")
def test_redis_stopped_operations_fail_with_eio_then_recover(
        private_redis: RedisService, mounter: Mounter, s3_env: dict[str, str]) -> None:
    # (private_redis first: torn down after the mounter, it outlives every mount)
    env = make_env(s3_env, CHUNKFS_META=private_redis.url)
    Cli(env).create_volume("vol", "1GiB")
    m = mounter.mount("vol", env=env, options=f"io-timeout={IO_TIMEOUT}")
    base = rand_bytes(2 * MiB, "base")
    write_file(m / "f", base)
    (m / "dir").mkdir()
    fd = os.open(m / "f", os.O_RDWR)
    try:
        os.pwrite(fd, b"acknowledged before the outage", 100)
        private_redis.pause()
        try:
            ops = {
                "create": start_bounded(lambda: write_file(m / "new", b"x", fsync=False)),
                "fsync": start_bounded(lambda: os.fsync(fd)),
                "lookup": start_bounded(lambda: os.stat(m / "dir" / "never-seen")),
                "mkdir": start_bounded(lambda: os.mkdir(m / "newdir")),
            }
            for out in ops.values():
                out.settle(IO_TIMEOUT + SLACK + 5)
        finally:
            private_redis.resume()
        for out in ops.values():
            out.wait(60)
        hung = {name: f"{o.elapsed:.0f}s" for name, o in ops.items() if o.hung}
        assert not hung, f"still blocked after Redis stopped (io-timeout={IO_TIMEOUT}): {hung}"
        wrong = {name: repr(o.error) for name, o in ops.items()
                 if not (isinstance(o.error, OSError) and o.error.errno == errno.EIO)}
        assert not wrong, f"expected EIO with Redis stopped: {wrong}"
        slow = {name: f"{o.elapsed:.1f}s" for name, o in ops.items()
                if o.elapsed > IO_TIMEOUT + SLACK}
        # Redis is back: the same mount works again
        os.fsync(fd)
    finally:
        os.close(fd)
    write_file(m / "new", b"created after the outage")
    os.mkdir(m / "newdir")
    expected = bytearray(base)
    expected[100:130] = b"acknowledged before the outage"
    assert file_sha256(m / "f") == sha256(bytes(expected))
    m = mounter.remount(m, cache_dir=mounter.new_dir("cache"), env=env)
    assert file_sha256(m / "f") == sha256(bytes(expected)), "acknowledged data was lost"
    assert (m / "new").read_bytes() == b"created after the outage"
    assert (m / "newdir").is_dir()
    assert not slow, f"took longer than io-timeout={IO_TIMEOUT} (+{SLACK}s): {slow}"


# the mount's client gives up on a reply after min(10 s, io-timeout) and retries until
# io-timeout: a long io-timeout makes the watchdog's retry, not an EIO, end the hold
LOST_REPLY_IO_TIMEOUT = 60


def _lose_the_reply(proxy: FaultProxy, needles: tuple[bytes, ...], op, what: str) -> None:
    """Run ``op`` (a syscall on the mount) while the reply of the one Redis request that
    holds every needle is held past the mount's watchdog; return once ``op`` returned.
    The request runs in Redis; its reply never reaches the mount (the watchdog drops the
    connection first); the mount retries the same request on a new connection."""
    before = proxy.stats()["connections"]
    proxy.hold_replies_after(LOST_REPLY_IO_TIMEOUT, *needles)
    out = start_bounded(op)
    try:
        assert proxy.wait_triggered(20), f"{what}: its Redis request was never sent"
        assert proxy.wait_held(20), f"{what}: Redis ran it but no reply was held"
        wait_until(lambda: proxy.stats()["connections"] > before, timeout=40,
                   what=f"{what}: the mount's watchdog to give up on the reply and reconnect")
        assert not out.done.is_set(), f"{what} returned while its reply was held"
    finally:
        proxy.release()  # the retry's replies (and the handshake's) flow again
    assert out.wait(LOST_REPLY_IO_TIMEOUT), f"{what} still blocked after the hold ended"
    assert out.error is None, f"{what} after a lost reply: {out.error!r}"


@pytest.mark.mount_log_allows(
    "redis retry", reason="the proxy holds a reply past the watchdog: the request is retried")
def test_mutations_whose_replies_are_lost_report_their_first_outcome_through_a_mount(
        redis_proxy: FaultProxy, meta_url: str, mounter: Mounter, s3_env: dict[str, str]) -> None:
    """The issue's repro (a proxy holding Redis replies for longer than the watchdog):
    mkdir must not fail with EEXIST, rename and unlink not with ENOENT after their first
    run succeeded, and an unlinked open file must be purged at its close, not left as
    an orphan. Each mutation is the one whose reply is held (the lookups before it get
    theirs), chosen by its name and its reply key, which only mutations carry."""
    # (redis_proxy first: torn down after the mounter, it outlives every mount)
    env = make_env(s3_env, CHUNKFS_META=redis_proxy.url)
    cli = Cli(env)
    cli.create_volume("vol", "1GiB")
    direct = redis.Redis.from_url(meta_url)
    keys = Keys(direct.hget(VOLUMES, "vol").decode())
    mutation = keys.reply("").encode()  # the request key every mutating script carries
    m = mounter.mount("vol", env=env, options=f"io-timeout={LOST_REPLY_IO_TIMEOUT}")
    write_file(m / "src-file", b"renamed once")
    write_file(m / "old-target", b"replaced")
    write_file(m / "doomed-file", b"unlinked while open")

    _lose_the_reply(redis_proxy, (mutation, b"made-once"),
                    lambda: os.mkdir(m / "made-once"), "mkdir")
    _lose_the_reply(redis_proxy, (mutation, b"src-file", b"old-target"),
                    lambda: os.rename(m / "src-file", m / "old-target"), "rename")
    fd = os.open(m / "doomed-file", os.O_RDONLY)
    try:
        doomed = os.fstat(fd).st_ino
        _lose_the_reply(redis_proxy, (mutation, b"doomed-file"),
                        lambda: os.unlink(m / "doomed-file"), "unlink")
        assert os.pread(fd, 100, 0) == b"unlinked while open"
    finally:
        os.close(fd)

    assert sorted(e for e in os.listdir(m.path) if not e.startswith(".")) == [
        "made-once", "old-target"]
    assert (m / "made-once").is_dir()
    assert (m / "old-target").read_bytes() == b"renamed once"
    mounter.umount(m)
    assert cli.run("fsck", "vol", "--objects", check=False).returncode == 0
    assert direct.hkeys(keys.orphans) == [], "an unlinked file outlived its last close"
    assert not direct.exists(keys.inode(doomed)), "the unlinked inode was never purged"
    direct.close()
