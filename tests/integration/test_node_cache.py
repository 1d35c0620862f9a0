"""One cache per node, and warm starts (issue 9 items 4 and 5), through real mounts.

Several `chunkfs mount` processes share one cache directory and one bound; a clone's
blocks are warm already; a SIGKILLed mount's accounting is recovered; a full cache disk
never fails an application's reads or writes; and the blocks a volume's mounts read
most recently are prefetched when it is mounted on a node with an empty cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chunkfs.cache import BlockCache
from chunkfs.config import StorageConfig
from chunkfs.hotset import Prefetcher
from chunkfs.meta.redis_meta import connect
from chunkfs.meta.schema import VOLUMES, Keys
from chunkfs.objstore import ObjectStore, block_key
from tests.faultproxy import FaultProxy
from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import (
    Cli,
    MiB,
    Mount,
    Mounter,
    cache_block_files,
    file_sha256,
    make_env,
    rand_bytes,
    sha256,
    wait_until,
    write_file,
)


def block_bytes(cache_dir: Path) -> int:
    return sum(p.stat().st_size for p in cache_block_files(cache_dir))


def settled(mounts: list[Mount], cache_dir: Path) -> bool:
    """Every mount's status counts exactly what the directory holds."""
    on_disk = block_bytes(cache_dir)
    files = len(cache_block_files(cache_dir))
    docs = [m.status_direct()["cache"] for m in mounts]
    return all(d["bytes"] == on_disk and d["entries"] == files for d in docs)


def gets(m: Mount) -> int:
    return m.status_direct()["s3"]["requests"].get("get", 0)


def write_files(m: Mount, prefix: str, count: int, size: int = MiB) -> dict[str, bytes]:
    files = {f"{prefix}{i}": rand_bytes(size, f"{m.volume}-{prefix}{i}") for i in range(count)}
    for name, data in files.items():
        write_file(m / name, data)
    return files


def read_all(m: Mount, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert file_sha256(m / name) == sha256(data), name


def test_mounts_of_two_volumes_share_one_bound_and_count_exactly(
        mounter: Mounter, cli: Cli) -> None:
    cli.create_volume("a")
    cli.create_volume("b")
    cache = mounter.new_dir("cache")
    a = mounter.mount("a", cache_dir=cache, cache_size="6MiB", options="memory-cache=0")
    b = mounter.mount("b", cache_dir=cache, cache_size="6MiB", options="memory-cache=0")
    files_a = write_files(a, "fa", 5)
    files_b = write_files(b, "fb", 5)
    for _ in range(2):  # reads from both, evicting each other's blocks
        read_all(a, files_a)
        read_all(b, files_b)
    def shares_add_up() -> bool:  # (each mount refreshes its view every second)
        sa, sb = a.status_direct()["cache"], b.status_direct()["cache"]
        return sa["volume_bytes"] + sb["volume_bytes"] == sa["bytes"] == sb["bytes"]

    wait_until(lambda: settled([a, b], cache) and shares_add_up(), 15,
               what=lambda: f"both mounts to count the directory's {block_bytes(cache)} bytes: "
                            f"{a.status_direct()['cache']} / {b.status_direct()['cache']}")
    assert block_bytes(cache) <= 6 * MiB
    read_all(a, write_files(a, "fc", 2))  # a's share grows again (new blocks, evicting b's)
    wait_until(lambda: a.status_direct()["cache"]["volume_bytes"] >= 2 * MiB and shares_add_up(),
               15, what=lambda: f"a's share to grow: {a.status_direct()['cache']}")
    sa, sb = a.status_direct()["cache"], b.status_direct()["cache"]
    assert sa["evictions"] + sb["evictions"] >= 4


def test_a_clones_first_read_of_shared_blocks_hits_the_cache(mounter: Mounter, cli: Cli) -> None:
    cli.create_volume("src")
    cache = mounter.new_dir("cache")
    src = mounter.mount("src", cache_dir=cache, options="memory-cache=0")
    files = write_files(src, "f", 3, 2 * MiB)
    read_all(src, files)
    cli.run("volume", "create", "clone", "--capacity", "1GiB", "--from-volume", "src")
    clone = mounter.mount("clone", cache_dir=cache, options="memory-cache=0,hot-set=0")
    at_mount = gets(clone)
    read_all(clone, files)
    st = clone.status_direct()
    assert gets(clone) == at_mount, f"the clone fetched shared blocks from S3: {st['s3']}"
    assert st["cache"]["hits"] >= 3 and st["cache"]["misses"] == 0, st["cache"]


def test_a_sigkilled_mount_leaves_the_accounting_recoverable(mounter: Mounter, cli: Cli) -> None:
    cli.create_volume("a")
    cli.create_volume("b")
    cache = mounter.new_dir("cache")
    a = mounter.mount("a", cache_dir=cache, cache_size="4MiB", options="memory-cache=0")
    files = write_files(a, "f", 6)
    b = mounter.mount("b", cache_dir=cache, cache_size="4MiB", options="memory-cache=0")
    reader = subprocess.Popen(["sh", "-c", f"while :; do cat {a.path}/f* >/dev/null; done"])
    try:
        wait_until(lambda: a.status_direct()["cache"]["misses"] >= 6, 20,
                   what="the reader to go through the cache")
        mounter.kill(a)  # somewhere in a read, a fetch or a cache write
    finally:
        reader.kill()
        reader.wait()
    # the survivor recovers the dead mount's rows by itself (its upkeep)
    read_all(b, write_files(b, "g", 2))
    wait_until(lambda: settled([b], cache) and not list((cache / "tmp").iterdir()), 30,
               what=lambda: f"the survivor to count {block_bytes(cache)} bytes exactly: "
                            f"{b.status_direct()['cache']}")
    assert block_bytes(cache) <= 4 * MiB
    # and a new mount of the killed volume on the same directory finds it exact and warm
    a = mounter.mount("a", cache_dir=cache, cache_size="4MiB")
    read_all(a, dict(list(files.items())[-2:]))
    wait_until(lambda: settled([a, b], cache), 15, what="both mounts to agree with the disk")


@pytest.fixture
def tiny_cache_fs(mounter: Mounter) -> Iterator[Path]:
    """A 3 MiB tmpfs for the cache: full long before the cache's 1 GiB bound."""
    path = mounter.new_dir("tinycache")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_cache_disk_never_fails_application_writes_or_reads(
        mounter: Mounter, volume: str, tiny_cache_fs: Path) -> None:
    m = mounter.mount(volume, cache_dir=tiny_cache_fs, cache_size="1GiB",
                      options="memory-cache=0")
    files = write_files(m, "f", 8)  # 8 MiB through a 3 MiB disk
    read_all(m, files)
    m = mounter.remount(m)  # and once more, reading into the full disk
    read_all(m, files)
    st = m.status_direct()
    assert st["errors"] == 0, st
    assert st["cache"]["nospace"] + mounter.mounts[0].status_direct()["cache"]["evictions"] > 0
    wait_until(lambda: settled([m], tiny_cache_fs), 15,
               what=lambda: f"exact counts on the full disk: {m.status_direct()['cache']}")


# --------------------------------------------------------------------------- warm start


def hot_set(cli: Cli, volume: str) -> list[bytes]:
    async def read() -> list[bytes]:
        r = connect(cli.env["CHUNKFS_META"])
        try:
            ns = (await r.hget(VOLUMES, volume)).decode()
            return await r.zrange(Keys(ns).hot, 0, -1)
        finally:
            await r.aclose()

    return asyncio.run(read())


def hot_set_key(cli: Cli, volume: str) -> str:
    async def read() -> str:
        r = connect(cli.env["CHUNKFS_META"])
        try:
            return Keys((await r.hget(VOLUMES, volume)).decode()).hot
        finally:
            await r.aclose()

    return asyncio.run(read())


async def key_exists(cli: Cli, key: str) -> bool:
    r = connect(cli.env["CHUNKFS_META"])
    try:
        return bool(await r.exists(key))
    finally:
        await r.aclose()


def test_the_hot_set_is_recorded_and_prefetched_by_the_next_mount(
        mounter: Mounter, volume: str, cli: Cli) -> None:
    m = mounter.mount(volume, options="memory-cache=0")
    files = write_files(m, "f", 4)
    cold = write_files(m, "cold", 2)
    m = mounter.remount(m, cache_dir=mounter.new_dir("cache"))  # a node that never read it
    read_all(m, files)  # what the pod reads: the hot set
    mounter.umount(m)  # publishes it
    assert len(hot_set(cli, volume)) == 4

    m = mounter.mount(volume, mountpoint=m.path, options="memory-cache=0")  # a new node
    wait_until(lambda: m.status_direct()["warm"]["state"] == "done", 30,
               what=lambda: f"the prefetch to finish: {m.status_direct()['warm']}")
    warm = m.status_direct()["warm"]
    assert warm["prefetched"] == 4 and warm["prefetched_bytes"] == 4 * MiB, warm
    assert warm["progress"] == 1.0 and warm["listed"] == 4
    before = gets(m)
    read_all(m, files)
    st = m.status_direct()
    assert gets(m) == before, f"reads after the prefetch went to S3: {st['s3']}"
    assert st["cache"]["hits"] >= 4 and st["cache"]["misses"] == 0, st["cache"]
    read_all(m, cold)  # what was not hot was not prefetched
    assert m.status_direct()["cache"]["misses"] >= 2 and gets(m) >= before + 2
    # the hot set is part of the volume: deleted with it
    mounter.umount(m)
    hot_key = hot_set_key(cli, volume)
    cli.run("volume", "delete", volume)
    assert not asyncio.run(key_exists(cli, hot_key))


def test_the_hot_set_and_the_prefetch_are_bounded(mounter: Mounter, volume: str,
                                                   cli: Cli) -> None:
    m = mounter.mount(volume, options="memory-cache=0,hot-set=3")
    files = write_files(m, "f", 6)
    m = mounter.remount(m, cache_dir=mounter.new_dir("cache"))
    read_all(m, files)
    mounter.umount(m)
    assert len(hot_set(cli, volume)) == 3  # the newest three
    m = mounter.mount(volume, mountpoint=m.path, options="memory-cache=0,prefetch=2MiB")
    wait_until(lambda: m.status_direct()["warm"]["state"] == "done", 30,
               what=lambda: f"the prefetch to finish: {m.status_direct()['warm']}")
    warm = m.status_direct()["warm"]
    assert warm["listed"] == 3 and warm["prefetched"] == 2, warm
    assert warm["prefetched_bytes"] <= 2 * MiB
    # the newest reads were prefetched first
    newest = sorted(files)[-2:]
    before = gets(m)
    read_all(m, {n: files[n] for n in newest})
    assert gets(m) == before


def test_a_prefetch_is_cancelled_promptly(s3_env: dict[str, str], tmp_path: Path) -> None:
    """A prefetch waiting on a slow store ends as soon as it is cancelled (unmount)."""
    async def run() -> None:
        with FaultProxy(s3_env["AWS_ENDPOINT_URL"]) as proxy:
            env = {**s3_env, "AWS_ENDPOINT_URL": proxy.url}
            store = await ObjectStore.create(StorageConfig.from_url(env["CHUNKFS_STORAGE"], env))
            cache = await BlockCache.open(str(tmp_path / "c"), 64 * MiB, volume="v")
            try:
                names = []
                for i in range(4):
                    data = rand_bytes(100_000, f"p{i}")
                    await store.put(block_key(sha256(data), len(data)), data)
                    names.append(f"{sha256(data)}_{len(data)}")
                proxy.hold_replies(60)
                warm = Prefetcher(cache, store, budget=64 * MiB)
                task = asyncio.create_task(warm.run(names))
                await asyncio.to_thread(proxy.wait_held, 10)
                assert warm.stats.state == "running"
                started = time.monotonic()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                assert time.monotonic() - started < 5
                assert warm.stats.state == "cancelled" and warm.stats.prefetched == 0
                proxy.release()
            finally:
                await cache.close()
                await store.close()

    asyncio.run(run())


def test_unmount_cancels_a_running_prefetch(s3_proxy: FaultProxy, mounter: Mounter,
                                            volume: str, cli: Cli,
                                            s3_env: dict[str, str]) -> None:
    m = mounter.mount(volume, options="memory-cache=0")
    files = write_files(m, "f", 24)
    m = mounter.remount(m, cache_dir=mounter.new_dir("cache"))
    read_all(m, files)
    mounter.umount(m)
    # (s3_proxy is set up before mounter: it outlives the self-checks that use its env)
    env = make_env(s3_env, CHUNKFS_META=cli.env["CHUNKFS_META"], AWS_ENDPOINT_URL=s3_proxy.url)
    m = mounter.mount(volume, mountpoint=m.path, env=env, options="memory-cache=0")
    s3_proxy.hold_replies(120)  # every GET the prefetch still makes now waits
    warm = m.status_direct()["warm"]
    assert warm["state"] in ("idle", "running"), f"finished before the hold: {warm}"
    assert s3_proxy.wait_held(10)
    started = time.monotonic()
    mounter.umount(m, timeout=60)
    assert time.monotonic() - started < 30  # not the 120 s of the held replies
    s3_proxy.release()
    assert "warm start prefetch cancelled" in m.log_file.read_text()
