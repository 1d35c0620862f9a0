"""Writes cost what they write: small durable writes, logs, page overwrites, two writers
of one block, and crashes between upload, commit and the background upkeep of slices.

Everything through real mounts over real Redis and SeaweedFS; S3 traffic is read from
the mount's own counters (``status['s3']``), what Redis holds from the volume record.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal

import pytest

from chunkfs.blocks.file import COMPACT_SLICES
from chunkfs.meta.schema import Keys
from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import (
    Cli,
    KiB,
    MiB,
    Mount,
    Mounter,
    file_sha256,
    pid_gone,
    rand_bytes,
    sha256,
    wait_until,
    write_file,
)


def s3_out(m: Mount) -> int:
    return int(m.status_direct()["s3"]["bytes_out"])


def vol_field(cli: Cli, volume: str, field: str) -> int:
    info = cli.info(volume)

    async def get(svc):
        return await svc.r.hget(Keys(info["id"]).vol, field)

    return int(cli.call(get) or 0)


def fsck_clean(cli: Cli, name: str) -> None:
    out = cli.run("fsck", name, "--objects", check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_4k_fsync_in_a_large_file_uploads_kilobytes_not_megabytes(mnt: Mount, cli: Cli,
                                                                     volume: str) -> None:
    big = rand_bytes(16 * MiB, "big")
    write_file(mnt / "db", big)
    expected = bytearray(big)
    rng = random.Random(7)
    fd = os.open(mnt / "db", os.O_RDWR)
    try:
        before = s3_out(mnt)
        for i in range(50):
            off = rng.randrange(0, len(big) - 4 * KiB)
            page = rand_bytes(4 * KiB, i)
            os.pwrite(fd, page, off)
            expected[off:off + 4 * KiB] = page
            os.fsync(fd)
        sent = s3_out(mnt) - before
    finally:
        os.close(fd)
    # 50 durable 4 KiB writes: the old design re-uploaded a 4 MiB block for each (200 MiB)
    assert sent <= 2 * MiB, f"{sent} bytes uploaded for 200 KiB of durable writes"
    assert file_sha256(mnt / "db") == sha256(bytes(expected))
    fsck_clean(cli, volume)


def test_a_log_fsynced_line_by_line_costs_its_size_and_moves_to_s3_at_close(
        mounter: Mounter, cli: Cli, volume: str) -> None:
    m = mounter.mount(volume)
    lines = [f"{i:08d} {'x' * 110}\n".encode() for i in range(1500)]
    with open(m / "app.log", "ab") as f:
        before = s3_out(m)
        for line in lines:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        sent_while_open = s3_out(m) - before
        assert vol_field(cli, volume, "slicebytes") > 0, "small fsyncs are kept in Redis"
    body = b"".join(lines)
    # each fsync stored only its line: no re-upload of the growing tail (quadratic before);
    # moving lines to S3 and merging them costs a small multiple of the log
    assert sent_while_open <= 3 * len(body), sent_while_open
    wait_until(lambda: vol_field(cli, volume, "slicebytes") == 0, 30,
               what="the log's small writes to move from Redis to S3 after its close")
    assert (m / "app.log").read_bytes() == body
    fsck_clean(cli, volume)
    m = mounter.remount(m, cache_dir=mounter.new_dir("cache"))
    assert (m / "app.log").read_bytes() == body


def test_many_small_overwrites_of_one_block_keep_its_slice_list_short(
        mnt: Mount, cli: Cli, volume: str) -> None:
    base = rand_bytes(4 * MiB, "one block")
    write_file(mnt / "f", base)
    expected = bytearray(base)
    rng = random.Random(3)
    fd = os.open(mnt / "f", os.O_RDWR)
    try:
        for i in range(400):
            off = rng.randrange(0, len(base) - 4 * KiB)
            page = rand_bytes(4 * KiB, f"o{i}")
            os.pwrite(fd, page, off)
            expected[off:off + 4 * KiB] = page
            os.fsync(fd)
    finally:
        os.close(fd)
    info = cli.info(volume)

    async def block_map(svc):
        ino = (await svc.r.hget(Keys(info["id"]).dir(1), b"f"))
        return await svc.r.hget(Keys(info["id"]).blocks(int(ino)), 0)

    wait_until(lambda: cli.call(block_map).count(b";") < COMPACT_SLICES, 30,
               what="the block's slices to be merged")
    assert file_sha256(mnt / "f") == sha256(bytes(expected))
    fsck_clean(cli, volume)


def test_two_mounts_writing_different_ranges_of_one_block_keep_both(
        mounter: Mounter, volume: str, cli: Cli) -> None:
    """RWX: the last commit no longer wins the whole block."""
    a, b = mounter.mount(volume), mounter.mount(volume)
    write_file(a / "shared", bytes(1 * MiB))
    fa = os.open(a / "shared", os.O_RDWR)
    fb = os.open(b / "shared", os.O_RDWR)
    try:
        for i in range(20):
            os.pwrite(fa, b"A" * 1000, i * 40000)          # node A's ranges
            os.pwrite(fb, b"B" * 1000, i * 40000 + 20000)  # node B's, same 4 MiB block
            if i % 5 == 4:
                os.fsync(fa)
                os.fsync(fb)
        os.fsync(fa)
        os.fsync(fb)
    finally:
        os.close(fa)
        os.close(fb)
    c = mounter.mount(volume)
    data = (c / "shared").read_bytes()
    for i in range(20):
        assert data[i * 40000:i * 40000 + 1000] == b"A" * 1000, i
        assert data[i * 40000 + 20000:i * 40000 + 21000] == b"B" * 1000, i
    fsck_clean(cli, volume)


@pytest.mark.parametrize("point", ["before-commit", "before-upkeep-commit"])
def test_a_crash_between_upload_and_commit_keeps_every_acknowledged_byte(
        mounter: Mounter, cli: Cli, volume: str, point: str) -> None:
    """before-commit: a flush stored its generations and dies before committing them: its
    close was never acknowledged, the file has its old content. before-upkeep-commit: a
    file fsynced in small pieces (inline slices) is closed; the move of its slices to S3
    dies before its commit: every fsynced byte is still there."""
    m = mounter.mount(volume, env={**cli.env, "CHUNKFS_CRASH_AT": point})
    body = rand_bytes(6 * MiB + 123, "acked")
    fd = os.open(m / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    expected = b""
    try:
        if point == "before-commit":
            os.write(fd, body)
            with contextlib.suppress(OSError):
                os.fsync(fd)  # the mount dies in it: nothing was acknowledged
        else:  # small fsyncs: inline slices, fewer than a move before the close needs
            body = body[:200 * KiB + 123]
            for i in range(0, len(body), 8 * KiB):
                os.write(fd, body[i:i + 8 * KiB])
                os.fsync(fd)
            expected = body
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)  # the last close starts the move of the inline slices: it dies
    wait_until(lambda: pid_gone(m.pid), 30, what="the mount process to crash")
    mounter.kill(m)
    fresh = mounter.mount(volume, cache_dir=mounter.new_dir("cache"))
    assert file_sha256(fresh / "f") == sha256(expected)
    fsck_clean(cli, volume)


def test_a_killed_mount_loses_only_what_it_never_acknowledged(mounter: Mounter, cli: Cli,
                                                              volume: str) -> None:
    m = mounter.mount(volume)
    durable = bytearray()
    fd = os.open(m / "wal", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for i in range(300):
            rec = rand_bytes(4 * KiB, f"r{i}")
            os.write(fd, rec)
            os.fsync(fd)
            durable += rec
        os.write(fd, b"tail never fsynced")
        os.kill(m.pid, signal.SIGKILL)
        wait_until(lambda: pid_gone(m.pid), 10, what="the mount to die")
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    mounter.kill(m)
    fresh = mounter.mount(volume, cache_dir=mounter.new_dir("cache"))
    data = (fresh / "wal").read_bytes()
    assert data[:len(durable)] == bytes(durable)
    assert len(data) in (len(durable), len(durable) + len(b"tail never fsynced"))
    fsck_clean(cli, volume)


def test_a_read_only_mount_reads_inline_slices_and_leaves_their_upkeep_to_writers(
        mounter: Mounter, cli: Cli, volume: str) -> None:
    """Small fsynced writes are committed as inline slices, moved to S3 later by the
    writer's upkeep. A read-only mount (a snapshot, a read-only publish) that meets them
    reads them in place: it uploads nothing and logs no failed upkeep (it cannot commit)."""
    m = mounter.mount(volume)
    base = rand_bytes(2 * MiB, "ro-base")
    write_file(m / "db", base)
    expected = bytearray(base)
    fd = os.open(m / "db", os.O_RDWR)
    try:
        for i in range(3):
            page = rand_bytes(4 * KiB, f"ro-page{i}")
            os.pwrite(fd, page, 100 * KiB * (i + 1))
            expected[100 * KiB * (i + 1):100 * KiB * (i + 1) + len(page)] = page
            os.fsync(fd)  # inline slices, committed: the last close would move them
        os.kill(m.pid, signal.SIGKILL)
        wait_until(lambda: pid_gone(m.pid), 10, what="the mount to die")
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    mounter.kill(m)
    inline = vol_field(cli, volume, "slicebytes")
    assert inline > 0, "the test needs inline slices"
    ro = mounter.mount(volume, cache_dir=mounter.new_dir("cache"), options="ro")
    assert file_sha256(ro / "db") == sha256(bytes(expected))
    assert s3_out(ro) == 0, "a read-only mount uploaded blocks"
    mounter.umount(ro)
    assert vol_field(cli, volume, "slicebytes") == inline
    fsck_clean(cli, volume)
