"""The local block cache: verified, bounded, warm across remounts, safe to delete."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

import pytest

from devstack.localstack import BUCKET
from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import (
    Cli,
    MiB,
    Mounter,
    cache_block_files,
    file_sha256,
    rand_bytes,
    sha256,
    tree_size,
    wait_until,
    write_file,
)


def _block_file_ok(p: Path) -> bool:
    """A cache file <sha256>_<length> starts with the block's bytes (a checksum trailer
    may follow them)."""
    digest, _, length = p.name.partition("_")
    data = p.read_bytes()
    n = int(length)
    return len(data) >= n and hashlib.sha256(data[:n]).hexdigest() == digest


@pytest.mark.mount_log_allows("corrupt cache block removed",
                              reason="the test corrupts cache files; the mount must say so")
def test_corrupt_cache_file_is_detected_and_refetched(mounter: Mounter, volume: str) -> None:
    m = mounter.mount(volume)
    files = {f"f{i}": rand_bytes(5 * MiB, f"c{i}") for i in range(2)}
    for name, data in files.items():
        write_file(m / name, data)
    cache = m.cache_dir
    m = mounter.remount(m)  # same cache dir: warm, and nothing left in memory
    blocks = cache_block_files(cache)
    assert len(blocks) == 4, f"expected the 4 written blocks in the cache, found {blocks}"
    # flip bytes inside two blocks (same length), truncate a third
    for p in blocks[:2]:
        with open(p, "r+b") as f:
            f.seek(1000)
            chunk = f.read(16)
            f.seek(1000)
            f.write(bytes(b ^ 0xFF for b in chunk))
    with open(blocks[2], "r+b") as f:
        f.truncate(100)
    for name, data in files.items():
        assert file_sha256(m / name) == sha256(data), f"{name}: bad bytes from a corrupt cache"
    st = m.status()
    assert st["cache"]["corrupt"] >= 3, st["cache"]
    assert st["s3"]["requests"].get("get", 0) >= 3, st["s3"]
    # the corrupt files were replaced by good copies
    def state() -> str:
        return ", ".join(f"{p.name[:8]}..{p.name[-9:]}:{'ok' if _block_file_ok(p) else 'BAD'}"
                         for p in cache_block_files(cache))

    wait_until(lambda: len(cache_block_files(cache)) == 4
               and all(_block_file_ok(p) for p in cache_block_files(cache)), 10,
               what=lambda: f"the cache to hold 4 verified blocks again (has: {state()})")


@pytest.mark.mount_log_allows("operation failed",
                              reason="the test corrupts the S3 object: the read fails with EIO")
def test_corrupt_object_in_s3_is_an_error_not_bad_bytes(mounter: Mounter, cli: Cli, volume: str,
                                                        s3_client) -> None:
    m = mounter.mount(volume)
    write_file(m / "f", rand_bytes(2 * MiB, "obj"))
    mounter.umount(m)
    prefix = cli.env["CHUNKFS_STORAGE"].removeprefix(f"s3://{BUCKET}/") + "/blocks/"
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]]
    assert len(keys) == 1
    s3_client.put_object(Bucket=BUCKET, Key=keys[0], Body=rand_bytes(2 * MiB, "garbage"))
    m = mounter.mount(volume, mountpoint=m.path)  # a new node: empty cache
    with pytest.raises(OSError) as err, open(m / "f", "rb") as f:
        f.read()
    assert err.value.errno == errno.EIO
    assert cache_block_files(m.cache_dir) == [], "a corrupt object must not enter the cache"


def test_cache_bounded_by_cache_size(mounter: Mounter, volume: str) -> None:
    m = mounter.mount(volume, cache_size="3MiB")
    files = {f"f{i}": rand_bytes(MiB, f"b{i}") for i in range(10)}
    for name, data in files.items():
        write_file(m / name, data)
    for name, data in files.items():
        assert file_sha256(m / name) == sha256(data)
    st = m.status()["cache"]
    assert st["limit"] == 3 * MiB
    assert st["bytes"] <= 3 * MiB, st
    assert st["evictions"] >= 7, st
    wait_until(lambda: tree_size(m.cache_dir / "blocks") <= 3 * MiB, 10,
               what=f"the cache dir to shrink to 3 MiB (is {tree_size(m.cache_dir / 'blocks')})")
    assert len(cache_block_files(m.cache_dir)) >= 2, "the cache should keep the recent blocks"
    # a restart with a smaller bound trims what is already there
    m = mounter.remount(m, cache_size="1MiB")
    assert tree_size(m.cache_dir / "blocks") <= MiB
    assert file_sha256(m / "f3") == sha256(files["f3"])


def test_warm_remount_reads_from_the_cache(mounter: Mounter, volume: str) -> None:
    m = mounter.mount(volume)
    files = {f"f{i}": rand_bytes(2 * MiB + i, f"w{i}") for i in range(3)}
    for name, data in files.items():
        write_file(m / name, data)
    m = mounter.remount(m)  # same cache dir
    gets_at_mount = m.status()["s3"]["requests"].get("get", 0)  # the storage marker
    for name, data in files.items():
        assert file_sha256(m / name) == sha256(data)
    st = m.status()
    assert st["cache"]["hits"] >= 3, st["cache"]
    assert st["cache"]["misses"] == 0, st["cache"]
    assert st["s3"]["requests"].get("get", 0) == gets_at_mount, f"a warm read went to S3: {st['s3']}"


@pytest.mark.mount_log_allows("cache write failed",
                              reason="the test deletes the cache dir again and again while "
                                     "the mount writes into it: a block may not get cached")
def test_cache_dir_deleted_while_mounted(mounter: Mounter, volume: str) -> None:
    m = mounter.mount(volume)
    a, b = rand_bytes(5 * MiB, "a"), rand_bytes(5 * MiB, "b")
    write_file(m / "a", a)

    def wiped() -> bool:  # the mount may be adding a block file meanwhile: retry
        shutil.rmtree(m.cache_dir, ignore_errors=True)
        return not m.cache_dir.exists()

    wait_until(wiped, 10, what="the cache dir to be deleted")
    assert file_sha256(m / "a") == sha256(a)  # from S3
    write_file(m / "b", b)
    assert file_sha256(m / "b") == sha256(b)
    with open(m / "a", "r+b") as f:
        f.write(b"still writable")
        f.flush()
        os.fsync(f.fileno())
    st = m.status()
    assert st["errors"] == 0, st.get("last_error")
    # the cache refills, and a remount (warm or cold) sees everything
    wait_until(lambda: len(cache_block_files(m.cache_dir)) >= 2, 10, what="the cache to refill")
    m = mounter.remount(m)
    assert file_sha256(m / "a") == sha256(b"still writable" + a[14:])
    assert file_sha256(m / "b") == sha256(b)


def test_cache_accounting_matches_the_disk_after_a_wipe(mounter: Mounter, volume: str) -> None:
    """The cache's byte count is what its directory holds, also after the directory was
    deleted under a running mount (issue 6 item 9: it drifted until the cache believed
    it was full while holding nothing)."""
    m = mounter.mount(volume, options="memory-cache=0")
    files = {f"f{i}": rand_bytes(MiB + i, f"acct{i}") for i in range(3)}
    for name, data in files.items():
        write_file(m / name, data)

    def accounted() -> bool:
        cache = m.status_direct()["cache"]
        blocks = cache_block_files(m.cache_dir)
        return cache["bytes"] == tree_size(m.cache_dir / "blocks") and cache["entries"] == len(blocks)

    wait_until(lambda: accounted() and len(cache_block_files(m.cache_dir)) == 3, 10,
               what=lambda: f"3 cached blocks, counted exactly: {m.status_direct()['cache']}")
    shutil.rmtree(m.cache_dir)
    write_file(m / "after", rand_bytes(MiB, "after"))  # finds the directory gone
    # f0 is read again (refetched, cached again); f1 and f2 are not: their old entries
    # must not count any more
    assert file_sha256(m / "f0") == sha256(files["f0"])
    wait_until(lambda: accounted() and len(cache_block_files(m.cache_dir)) == 2, 10,
               what=lambda: (f"the cache to count what its directory holds: "
                             f"{m.status_direct()['cache']} vs {tree_size(m.cache_dir / 'blocks')} "
                             f"bytes in {len(cache_block_files(m.cache_dir))} files"))
    assert m.status_direct()["cache"]["rescans"] >= 1
