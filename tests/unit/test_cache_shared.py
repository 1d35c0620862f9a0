"""One cache directory, one bound, several mount processes (issue 9 item 4).

Every test here runs real processes on a real directory: the shared SQLite index must
keep the directory within its bound and its accounting equal to what is on disk under
concurrent puts and evictions from several processes, after a SIGKILL at any moment,
and on a full filesystem (where the cache yields instead of failing).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chunkfs.cache import BlockCache, stored_size

# One worker process: random puts/gets of seeded blobs on the cache at argv[1].
WORKER = r"""
import asyncio, hashlib, json, os, random, sys
from chunkfs.cache import BlockCache

async def main(root, volume, limit, seed, rounds, cap):
    cache = await BlockCache.open(root, limit, volume=volume,
                                  volume_limit=cap or None)
    rng = random.Random(seed)
    blobs = [random.Random(i).randbytes(random.Random(i).randint(1000, 120_000))
             for i in range(40)]
    hits = 0
    for i in range(rounds):
        blob = rng.choice(blobs)
        d = hashlib.sha256(blob).hexdigest()
        if rng.random() < 0.6:
            await cache.put(d, blob)
        else:
            got = await cache.get(d, len(blob))
            assert got is None or got == blob
            hits += got is not None
        if i == 5:
            print("started", flush=True)
    await cache.close()
    print(json.dumps({"hits": hits, "volume": volume}), flush=True)

root, volume, limit, seed, rounds, cap = sys.argv[1:]
asyncio.run(main(root, volume, int(limit), int(seed), int(rounds), int(cap)))
"""


# A process that dies at a chosen step of the protocol (argv: root, step).
DIES_AT = r"""
import os, sys, time
from chunkfs.cacheindex import CacheIndex, DYING
root, step = sys.argv[1:]
ix = CacheIndex(root, "dead")
ix.open()
names = {"reserved": "a" * 64 + "_10", "renamed": "b" * 64 + "_10", "dying": "c" * 64 + "_10"}
name = names[step]
if step == "dying":  # a file it was evicting
    assert ix.reserve(name, 10, 1 << 20, None).value == "ok"
    os.makedirs(os.path.dirname(ix.path(name)), exist_ok=True)
    open(ix.path(name), "wb").write(b"x" * 10)
    ix.commit(name, 10)
    with ix._lock, ix._txn() as c:
        c.execute("UPDATE entries SET state = ?, owner = ? WHERE name = ?", (DYING, ix.token, name))
else:
    assert ix.reserve(name, 10, 1 << 20, None).value == "ok"
    tmp = ix.tmp_path(name)
    open(tmp, "wb").write(b"x" * 10)
    if step == "renamed":
        os.makedirs(os.path.dirname(ix.path(name)), exist_ok=True)
        os.rename(tmp, ix.path(name))
print("ready", flush=True)
time.sleep(60)
"""


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def disk_truth(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in root.joinpath("blocks").rglob("*") if p.is_file()}


def tmp_files(root: Path) -> list[Path]:
    return list(root.joinpath("tmp").iterdir())


def worker(root: Path, volume: str, limit: int, seed: int, rounds: int,
           cap: int = 0) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(root), volume, str(limit), str(seed), str(rounds),
         str(cap)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).parents[2])


def finish(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


async def assert_exact(root: Path, limit: int) -> BlockCache:
    """Open the directory as a new mount would and check index == disk, within bound."""
    cache = await BlockCache.open(str(root), limit, volume="checker")
    truth = disk_truth(root)
    assert cache.entries() == truth
    assert cache.used == sum(truth.values()) <= limit
    assert sum(cache.index.volumes().values()) == cache.used
    assert tmp_files(root) == []
    return cache


async def test_mounts_of_several_volumes_share_one_bound_and_account_exactly(tmp_path: Path) -> None:
    limit = 1_000_000
    procs = [worker(tmp_path, f"vol{i}", limit, seed=i, rounds=150) for i in range(3)]
    results = [finish(p) for p in procs]
    assert sum(int(r["hits"]) for r in results) > 0  # they did share blocks
    # the index was exact while nobody reconciled it: read it before a new opener does
    import sqlite3

    truth = disk_truth(tmp_path)
    with sqlite3.connect(tmp_path / "index.db") as db:
        rows = dict(db.execute("SELECT name, size FROM entries"))
        total, n = db.execute("SELECT bytes, n FROM totals").fetchone()
        per_volume = dict(db.execute("SELECT volume, bytes FROM volumes"))
    assert rows == truth
    assert total == sum(truth.values()) <= limit and n == len(truth)
    assert sum(per_volume.values()) == total and set(per_volume) <= {"vol0", "vol1", "vol2"}
    await (await assert_exact(tmp_path, limit)).close()


async def test_a_block_cached_by_one_volume_is_a_hit_for_another(tmp_path: Path) -> None:
    """Content addressing: a clone's blocks are the source's files, warm already."""
    a = await BlockCache.open(str(tmp_path), 1 << 22, volume="source")
    b = await BlockCache.open(str(tmp_path), 1 << 22, volume="clone")
    data = os.urandom(50_000)
    assert await a.put(digest(data), data)
    assert await b.get(digest(data), len(data)) == data
    assert b.stats.hits == 1
    assert not await b.put(digest(data), data) or len(disk_truth(tmp_path)) == 1
    await b.flush_uses()  # the use moves the file's occupancy to the clone: counted once
    assert a.index.volumes() == {"clone": stored_size(len(data))}
    await a.close()
    await b.close()


async def test_a_sigkilled_mount_leaves_accounting_recoverable(tmp_path: Path) -> None:
    limit = 800_000
    survivor = await BlockCache.open(str(tmp_path), limit, volume="survivor")
    for seed in range(6):
        proc = worker(tmp_path, "victim", limit, seed=seed, rounds=100_000)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started"
        await asyncio.sleep(random.Random(seed).uniform(0.05, 0.4))  # somewhere in a put
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # a live mount recovers the dead one's reservations without reopening anything
        await asyncio.to_thread(survivor.index.recover)
        truth = disk_truth(tmp_path)
        assert survivor.entries() == truth, f"seed {seed}"
        assert survivor.used == sum(truth.values()) <= limit
        assert tmp_files(tmp_path) == []
        # and it goes on caching within the bound
        blob = os.urandom(30_000 + seed)
        assert await survivor.put(digest(blob), blob)
        assert survivor.used <= limit
    await survivor.close()
    await (await assert_exact(tmp_path, limit)).close()


@pytest.mark.parametrize("step", ["reserved", "renamed", "dying"])
async def test_a_mount_killed_at_each_step_of_a_put_or_eviction_is_recovered(
        tmp_path: Path, step: str) -> None:
    """Killed with bytes reserved and a temporary file written (released, removed), after
    its rename (the file is adopted, warm), or while evicting (the file goes)."""
    survivor = await BlockCache.open(str(tmp_path), 1 << 20, volume="survivor")
    proc = subprocess.Popen(  # noqa: ASYNC220 - a process to kill, not to await
        [sys.executable, "-c", DIES_AT, str(tmp_path), step],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    await survivor.flush_uses()
    assert survivor.used == 10  # the dead process's row still counts...
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert await asyncio.to_thread(survivor.index.recover) == 1  # ...until it is recovered
    truth = disk_truth(tmp_path)
    assert survivor.entries() == truth and survivor.used == sum(truth.values())
    assert tmp_files(tmp_path) == []
    assert (len(truth) == 1) == (step == "renamed")
    assert [p.name for p in (tmp_path / "owners").iterdir()] == [survivor.index.token]
    await survivor.close()


async def test_a_volume_limit_bounds_one_volume_inside_the_node_bound(tmp_path: Path) -> None:
    small = await BlockCache.open(str(tmp_path), 1 << 24, volume="small", volume_limit=200_000)
    big = await BlockCache.open(str(tmp_path), 1 << 24, volume="big")
    for _ in range(10):
        blob = os.urandom(50_000)
        await small.put(digest(blob), blob)
        blob = os.urandom(50_000)
        await big.put(digest(blob), blob)
    assert small.summary()["volume_bytes"] <= 200_000
    assert big.summary()["volume_bytes"] == 10 * stored_size(50_000)
    await small.close()
    await big.close()
    await (await assert_exact(tmp_path, 1 << 24)).close()


async def test_a_restart_is_warm_and_a_smaller_bound_shrinks_the_directory(tmp_path: Path) -> None:
    cache = await BlockCache.open(str(tmp_path), 1 << 22, volume="v")
    blobs = [os.urandom(100_000) for _ in range(8)]
    for blob in blobs:
        await cache.put(digest(blob), blob)
    await cache.get(digest(blobs[0]), len(blobs[0]))  # most recently used
    await cache.close()
    again = await BlockCache.open(str(tmp_path), 3 * stored_size(100_000), volume="v")
    assert again.used <= 3 * stored_size(100_000)
    assert await again.get(digest(blobs[0]), len(blobs[0])) == blobs[0]  # the LRU survived
    assert await again.get(digest(blobs[1]), len(blobs[1])) is None
    await again.close()


@pytest.fixture
def tiny_fs(tmp_path: Path):
    """A 1 MiB tmpfs: a cache disk that is full long before the cache's bound."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = tmp_path / "tiny"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_a_full_disk_makes_the_cache_yield_never_fail(tiny_fs: Path) -> None:
    limit = 64 << 20  # far above what the filesystem holds
    a = await BlockCache.open(str(tiny_fs / "c"), limit, volume="a")
    b = await BlockCache.open(str(tiny_fs / "c"), limit, volume="b")
    blobs = [os.urandom(150_000) for _ in range(20)]
    for i, blob in enumerate(blobs):
        cache = a if i % 2 else b
        await cache.put(digest(blob), blob)  # never raises
        assert cache.offer(digest(blob), blob) in (True, False)
    await a.drain()
    await b.drain()
    assert a.stats.nospace + b.stats.nospace > 0, (a.summary(), b.summary())
    # what it kept reads back verified, what it did not is a miss, nothing is an error
    kept = 0
    for blob in blobs:
        got = await a.get(digest(blob), len(blob))
        assert got is None or got == blob
        kept += got is not None
    assert kept >= 2
    # and it is still exact
    await asyncio.to_thread(a.index.recover)
    truth = disk_truth(tiny_fs / "c")
    assert a.entries() == truth and a.used == sum(truth.values())
    await a.close()
    await b.close()


async def test_index_work_never_runs_on_the_event_loop(tmp_path: Path) -> None:
    """A put while another process holds the index's write lock waits in the index
    thread: the event loop goes on ticking."""
    import sqlite3

    cache = await BlockCache.open(str(tmp_path), 1 << 22, volume="v")
    holder = sqlite3.connect(tmp_path / "index.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    blob = os.urandom(10_000)
    put = asyncio.ensure_future(cache.put(digest(blob), blob))
    ticks = 0
    started = time.monotonic()
    while time.monotonic() - started < 0.5:
        await asyncio.sleep(0.01)
        ticks += 1
    assert not put.done() and ticks >= 10
    holder.execute("COMMIT")
    holder.close()
    assert await put
    await cache.close()


async def test_an_unusable_cache_directory_gives_a_mount_without_a_cache(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"not a directory")
    cache = await BlockCache.open(str(tmp_path / "file" / "cache"), 1 << 20, volume="v")
    assert cache.disabled
    data = os.urandom(1000)
    assert not await cache.put(digest(data), data)
    assert not cache.offer(digest(data), data)
    assert await cache.get(digest(data), len(data)) is None
    assert await cache.read_range(digest(data), len(data), 0, 10) is None
    assert await cache.contains([f"{digest(data)}_1000"]) == set()
    assert cache.summary()["disabled"]
    await cache.close()


@pytest.mark.filterwarnings("ignore")
async def test_a_corrupt_index_is_rebuilt_from_the_directory(tmp_path: Path) -> None:
    cache = await BlockCache.open(str(tmp_path), 1 << 22, volume="v")
    blobs = [os.urandom(20_000) for _ in range(3)]
    for blob in blobs:
        await cache.put(digest(blob), blob)
    await cache.close()
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"index.db{suffix}").unlink(missing_ok=True)
    (tmp_path / "index.db").write_bytes(b"this is not a database" * 100)
    again = await BlockCache.open(str(tmp_path), 1 << 22, volume="v")
    assert not again.disabled
    assert again.entries() == disk_truth(tmp_path) and len(again.entries()) == 3
    assert await again.get(digest(blobs[0]), len(blobs[0])) == blobs[0]
    await again.close()
