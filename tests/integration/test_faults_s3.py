"""S3 unreachable (the weed process SIGSTOPped): fsync fails with EIO after the io-timeout,
no acknowledged data is lost, and the mount recovers by itself once S3 is back."""

from __future__ import annotations

import errno
import os

import pytest

from devstack.localstack import LocalStack
from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import (
    MiB,
    Mounter,
    file_sha256,
    rand_bytes,
    run_bounded,
    sha256,
    write_file,
)

IO_TIMEOUT = 5
SLACK = 5  # how much longer than io-timeout an operation may take to fail


S3_STOPPED = pytest.mark.mount_log_allows(
    "block upload failed", "operation failed",
    reason="S3 is stopped on purpose: uploads fail, fsync/close report EIO and the mount logs why")


@S3_STOPPED
def test_fsync_fails_with_eio_while_s3_is_stopped_and_recovers(
        mounter: Mounter, volume: str, local_services: LocalStack) -> None:
    s3 = local_services.s3
    assert s3 is not None
    m = mounter.mount(volume, options=f"io-timeout={IO_TIMEOUT}")
    base = rand_bytes(6 * MiB, "base")
    write_file(m / "f", base)
    expected = bytearray(base)
    fd = os.open(m / "f", os.O_RDWR)
    try:
        new = rand_bytes(3 * MiB + 100, "new")
        os.pwrite(fd, new, MiB)  # acknowledged, not yet durable
        expected[MiB:MiB + len(new)] = new
        s3.pause()
        try:
            out = run_bounded(lambda: os.fsync(fd), IO_TIMEOUT + SLACK + 5)
            if not out.hung:
                # the acknowledged data is still there, and the file still takes writes
                assert os.pread(fd, len(new), MiB) == new
                os.pwrite(fd, b"written during the outage", 0)
                expected[0:25] = b"written during the outage"
                # reads of committed, cached data keep working
                assert os.pread(fd, 100, 5 * MiB) == base[5 * MiB:5 * MiB + 100]
                st = m.status_direct()
                assert st["errors"] >= 1 and st["dirty_bytes"] > 0, st
        finally:
            s3.resume()
        out.wait(60)
        assert not out.hung, (
            f"fsync still blocked {out.elapsed:.0f}s after S3 stopped (io-timeout={IO_TIMEOUT})")
        assert isinstance(out.error, OSError) and out.error.errno == errno.EIO, (
            f"fsync with S3 stopped: expected EIO, got {out.error!r}")
        assert IO_TIMEOUT - 1 <= out.elapsed <= IO_TIMEOUT + SLACK, (
            f"fsync failed after {out.elapsed:.1f}s with io-timeout={IO_TIMEOUT}")
        os.fsync(fd)  # S3 is back: no remount needed
    finally:
        os.close(fd)
    assert file_sha256(m / "f") == sha256(bytes(expected))
    write_file(m / "after", b"after the outage" * 10000)
    m = mounter.remount(m, cache_dir=mounter.new_dir("cache"))
    assert file_sha256(m / "f") == sha256(bytes(expected)), "acknowledged data was lost"
    assert (m / "after").read_bytes() == b"after the outage" * 10000


@S3_STOPPED
def test_close_while_s3_is_stopped_keeps_data_for_a_later_fsync(
        mounter: Mounter, volume: str, local_services: LocalStack) -> None:
    """close() reports EIO when the data cannot be stored; the mount keeps it and a later
    sync of the same file (or the unmount) stores it once S3 is back."""
    s3 = local_services.s3
    assert s3 is not None
    m = mounter.mount(volume, options=f"io-timeout={IO_TIMEOUT}")
    data = rand_bytes(2 * MiB, "close")
    fd = os.open(m / "g", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, data)
    s3.pause()
    try:
        out = run_bounded(lambda: os.close(fd), IO_TIMEOUT + SLACK + 5)
    finally:
        s3.resume()
    out.wait(60)
    assert not out.hung, (
        f"close still blocked {out.elapsed:.0f}s after S3 stopped (io-timeout={IO_TIMEOUT})")
    assert isinstance(out.error, OSError) and out.error.errno == errno.EIO, out.error
    assert out.elapsed <= IO_TIMEOUT + SLACK, f"close took {out.elapsed:.1f}s"
    # the data is still buffered, unless the release that follows close() already stored it
    # (S3 is back by now): either way nothing was dropped
    status = m.status()
    assert status["dirty_bytes"] >= len(data) or status["errors"] >= 1
    # unmount (flushes everything) and look from a new node
    m = mounter.remount(m, cache_dir=mounter.new_dir("cache"))
    assert file_sha256(m / "g") == sha256(data)
