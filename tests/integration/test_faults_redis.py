"""Redis unreachable (SIGSTOPped): operations fail with EIO after the io-timeout, and the
mount works again once Redis is back, without a remount. Uses a Redis of its own so that
pausing it disturbs no other test."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.localstack import RedisService, start_redis
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
    "reading the last gc run failed",
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
