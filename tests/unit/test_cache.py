"""The local block cache: verified, bounded, crash-safe, disposable."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

import chunkfs.cache
from chunkfs.cache import BlockCache, stored_size


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_put_get_and_warm_reopen(tmp_path: Path) -> None:
    cache = await BlockCache.open(str(tmp_path), 1 << 20)
    data = os.urandom(1000)
    await cache.put(digest(data), data)
    assert await cache.get(digest(data), 1000) == data
    reopened = await BlockCache.open(str(tmp_path), 1 << 20)  # a plugin restart: still warm
    assert await reopened.get(digest(data), 1000) == data
    assert reopened.stats.hits == 1


async def test_corrupt_file_is_a_miss_and_is_removed(tmp_path: Path) -> None:
    cache = await BlockCache.open(str(tmp_path), 1 << 20)
    data = os.urandom(4096)
    await cache.put(digest(data), data)
    (path,) = [p for p in tmp_path.joinpath("blocks").rglob("*") if p.is_file()]
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert await cache.get(digest(data), 4096) is None
    assert cache.stats.corrupt == 1 and not path.exists()


async def test_bounded_in_bytes_lru(tmp_path: Path) -> None:
    cache = await BlockCache.open(str(tmp_path), 10_000)
    blobs = [os.urandom(3000) for _ in range(5)]
    for blob in blobs[:3]:
        await cache.put(digest(blob), blob)
    assert await cache.get(digest(blobs[0]), 3000) is not None  # now most recently used
    for blob in blobs[3:]:
        await cache.put(digest(blob), blob)
    assert cache.used <= 10_000
    files = sum(1 for p in tmp_path.joinpath("blocks").rglob("*") if p.is_file())
    assert files == 3
    assert await cache.get(digest(blobs[0]), 3000) == blobs[0]
    assert await cache.get(digest(blobs[1]), 3000) is None


async def test_cache_dir_wiped_while_in_use(tmp_path: Path) -> None:
    import shutil

    cache = await BlockCache.open(str(tmp_path / "c"), 1 << 20)
    a, b = os.urandom(100), os.urandom(100)
    await cache.put(digest(a), a)
    shutil.rmtree(tmp_path / "c")
    assert await cache.get(digest(a), 100) is None  # a miss, not an error
    await cache.put(digest(b), b)
    assert await cache.get(digest(b), 100) == b


async def test_leftover_temporary_files_are_removed(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp" / "half-written").write_bytes(b"x" * 10)
    await BlockCache.open(str(tmp_path), 1 << 20)
    assert list((tmp_path / "tmp").iterdir()) == []


async def test_range_reads_verify_only_the_chunks_they_touch(tmp_path: Path) -> None:
    cache = await BlockCache.open(str(tmp_path), 1 << 24)
    data = os.urandom(300_000)
    await cache.put(digest(data), data)
    assert await cache.read_range(digest(data), len(data), 70_000, 4096) == data[70_000:74_096]
    assert await cache.read_range(digest(data), len(data), 299_000, 4096) == data[299_000:]
    (path,) = [p for p in tmp_path.joinpath("blocks").rglob("*") if p.is_file()]
    raw = bytearray(path.read_bytes())
    raw[200_000] ^= 0x01  # corrupt the fourth 64 KiB chunk
    path.write_bytes(bytes(raw))
    # an untouched chunk still verifies; the damaged one is caught and the file dropped
    assert await cache.read_range(digest(data), len(data), 0, 100) == data[:100]
    assert await cache.read_range(digest(data), len(data), 199_000, 2000) is None
    assert cache.stats.corrupt == 1 and not path.exists()
    assert await cache.get(digest(data), len(data)) is None


# --------------------------------------------------------------------------- damage (issue 8)
# Every load checks the file's size and the CRC of every chunk it returns, against the
# trailer (chunkfs/cache.py): each way a file can be damaged is a miss, never bad bytes,
# and the file is deleted (and uncounted), whether a reader loads the whole block or a
# range of it. The block is 3 chunks and a short one, so the last chunk and its trailer
# entry (the file's last 4 bytes) are damaged too.

CHUNK = 64 * 1024
LENGTH = 3 * CHUNK + 5000
RANGE = (3 * CHUNK - 4096, 8192)  # a range read that straddles chunks 2 and 3
DATA_AT = {"first": 10, "straddled": 2 * CHUNK + 50, "last": LENGTH - 1}
TRAILER_AT = {"first": LENGTH, "straddled": LENGTH + 8, "last": LENGTH + 15}


def flip(at: int):  # noqa: ANN201 - a file transform
    def damage(raw: bytearray) -> bytearray:
        raw[at] ^= 0x40
        return raw
    return damage


DAMAGE = {
    # what a crash mid-write, a truncation or a full disk leaves behind
    "empty": lambda raw: bytearray(),
    "truncated into the trailer": lambda raw: raw[:-1],
    "truncated into the data": lambda raw: raw[:LENGTH - 100],
    "no trailer": lambda raw: raw[:LENGTH],
    "one byte too long": lambda raw: raw + b"\0",
    "zero-filled": lambda raw: bytearray(len(raw)),
    "zero-filled trailer": lambda raw: raw[:LENGTH] + bytes(len(raw) - LENGTH),
    # bit rot, in the data and in the trailer (the trailer is never trusted alone)
    **{f"flipped data byte ({where})": flip(at) for where, at in DATA_AT.items()},
    **{f"flipped trailer byte ({where})": flip(at) for where, at in TRAILER_AT.items()},
    "trailer entries swapped": lambda raw: (raw[:LENGTH + 8] + raw[LENGTH + 12:LENGTH + 16]
                                            + raw[LENGTH + 8:LENGTH + 12]),
}
# damage that a range read of RANGE does not touch (it reads and checks chunks 2 and 3
# only): still caught by a whole-block load
UNSEEN_BY_RANGE = {"flipped data byte (first)", "flipped trailer byte (first)"}


async def damaged_cache(tmp_path: Path, damage, *,  # noqa: ANN001
                        direct_io: bool = True) -> tuple[BlockCache, bytes, Path]:
    cache = await BlockCache.open(str(tmp_path), 1 << 24, direct_io=direct_io)
    data = os.urandom(LENGTH)
    await cache.put(digest(data), data)
    (path,) = [p for p in tmp_path.joinpath("blocks").rglob("*") if p.is_file()]
    raw = bytearray(path.read_bytes())
    assert len(raw) == LENGTH + 16
    damaged = damage(bytearray(raw))
    assert damaged != raw
    path.write_bytes(bytes(damaged))
    return cache, data, path


async def assert_dropped(cache: BlockCache, data: bytes, root: Path) -> None:
    assert cache.stats.corrupt == 1 and disk_truth(root) == {}  # the file is gone
    assert cache.entries() == {} and cache.used == 0  # uncounted with it
    # a miss, so the block comes from S3 again and is cached again, whole
    assert await cache.get(digest(data), len(data)) is None
    assert await cache.put(digest(data), data)
    assert await cache.get(digest(data), len(data)) == data
    assert_exact(cache, root)


@pytest.mark.parametrize("direct_io", [True, False], ids=["direct", "buffered"])
@pytest.mark.parametrize("kind", sorted(DAMAGE))
async def test_a_damaged_file_is_a_miss_for_a_whole_block_load_and_is_removed(
        tmp_path: Path, kind: str, direct_io: bool) -> None:
    cache, data, path = await damaged_cache(tmp_path, DAMAGE[kind], direct_io=direct_io)
    assert await cache.get(digest(data), len(data)) is None
    assert cache.stats.misses == 1 and cache.stats.hits == 0
    await assert_dropped(cache, data, tmp_path)


@pytest.mark.parametrize("kind", sorted(set(DAMAGE) - UNSEEN_BY_RANGE))
async def test_a_damaged_file_is_a_miss_for_a_range_read_and_is_removed(
        tmp_path: Path, kind: str) -> None:
    cache, data, path = await damaged_cache(tmp_path, DAMAGE[kind])
    assert await cache.read_range(digest(data), len(data), *RANGE) is None
    assert cache.stats.hits == 0
    await assert_dropped(cache, data, tmp_path)


@pytest.mark.parametrize("kind", sorted(UNSEEN_BY_RANGE))
async def test_a_range_read_returns_good_chunks_of_a_file_damaged_elsewhere(
        tmp_path: Path, kind: str) -> None:
    cache, data, path = await damaged_cache(tmp_path, DAMAGE[kind])
    start, size = RANGE
    assert await cache.read_range(digest(data), len(data), start, size) == data[start:start + size]
    assert cache.stats.corrupt == 0 and path.exists()
    assert await cache.get(digest(data), len(data)) is None  # the whole block: caught
    await assert_dropped(cache, data, tmp_path)


async def test_a_symlink_in_place_of_a_block_file_is_not_followed(tmp_path: Path) -> None:
    """The cache writes regular files only: a link under a block's name (put there by
    hand) is corrupt, even if it points at a good copy of the block."""
    cache, data, path = await damaged_cache(tmp_path, lambda raw: raw + b"x")
    good = tmp_path / "elsewhere"
    good.write_bytes(path.read_bytes()[:-1])
    path.unlink()
    path.symlink_to(good)
    assert await cache.read_range(digest(data), len(data), 0, 10) is None
    assert cache.stats.corrupt == 1 and not path.is_symlink() and good.exists()
    assert cache.entries() == {}


@pytest.mark.parametrize("direct_io", [True, False], ids=["direct", "buffered"])
async def test_loads_of_every_length_verify_and_return_the_block(tmp_path: Path, direct_io: bool) -> None:
    """Whole-block loads at chunk and 4 KiB boundaries (the trailer's entry count and
    offsets, the direct write's aligned head and buffered tail), written and read with
    direct I/O or without, and read back by the other kind of cache (the file format
    is the same)."""
    cache = await BlockCache.open(str(tmp_path), 1 << 26, direct_io=direct_io)
    other = await BlockCache.open(str(tmp_path), 1 << 26, direct_io=not direct_io)
    blobs = [os.urandom(n) for n in (0, 1, 4092, 4096, CHUNK - 4, CHUNK - 1, CHUNK, CHUNK + 1,
                                     64 * CHUNK, 64 * CHUNK + 4096)]
    for data in blobs:
        await cache.put(digest(data), data)
        assert await cache.get(digest(data), len(data)) == data, len(data)
        assert await other.get(digest(data), len(data)) == data, len(data)
        assert await cache.read_range(digest(data), len(data), 1, 4096) == data[1:4097]
    assert cache.stats.corrupt == 0 and other.stats.corrupt == 0
    assert cache.direct_io is direct_io  # the filesystem took direct I/O
    assert_exact(cache, tmp_path)
    for path in tmp_path.joinpath("blocks").rglob("*_*"):
        d, _, n = path.name.partition("_")
        assert path.stat().st_size == stored_size(int(n))


def page_cached(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "-o", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.strip())


def drop_cached(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs fincore (util-linux)")
async def test_whole_blocks_are_written_and_loaded_past_the_page_cache(tmp_path: Path) -> None:
    """A block is in the memory cache and the reader's page cache already: a copy in
    the page cache of its cache file only costs the kernel pages. At most the last
    partial 4 KiB (the trailer) goes through it."""
    cache = await BlockCache.open(str(tmp_path), 1 << 26)
    data = os.urandom(4 << 20)
    await cache.put(digest(data), data)
    (path,) = [p for p in tmp_path.joinpath("blocks").rglob("*") if p.is_file()]
    assert page_cached(path) <= 4096
    drop_cached(path)
    assert await cache.get(digest(data), len(data)) == data
    assert page_cached(path) <= 4096


async def test_a_filesystem_that_refuses_direct_io_gets_buffered_io(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Direct I/O the kernel refuses (EINVAL: here a 256-byte alignment on a disk of
    512-byte sectors) turns it off for the directory: the block is written, and loads
    are read, buffered, nothing is lost or corrupt."""
    if int(Path("/sys/block").joinpath(_disk_of(tmp_path), "queue", "logical_block_size")
           .read_text()) <= 256:
        pytest.skip("the disk takes 256-byte direct I/O")
    monkeypatch.setattr(chunkfs.cache, "ALIGN", 256)
    cache = await BlockCache.open(str(tmp_path), 1 << 26)
    write = os.urandom(3 * 256 + 10)  # + 4 bytes of trailer: a 768-byte direct head
    assert await cache.put(digest(write), write)
    assert not cache.direct_io
    assert await cache.get(digest(write), len(write)) == write
    # a load: 596 bytes of file, a direct read of 768 (3 x 256) is refused
    load = os.urandom(592)
    await cache.put(digest(load), load)
    cache.direct_io = True
    assert await cache.get(digest(load), len(load)) == load
    assert not cache.direct_io
    assert cache.stats.corrupt == 0 and cache.stats.errors == 0
    assert_exact(cache, tmp_path)


def _disk_of(path: Path) -> str:
    """The block device under ``path`` (sysfs name), e.g. vda for vda1."""
    dev = os.stat(path).st_dev
    link = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not link.exists():
        pytest.skip("not on a block device")
    resolved = link.resolve()
    return (resolved if resolved.joinpath("queue").exists() else resolved.parent).name


# --------------------------------------------------------------------------- ranges (issue 6 item 8)


async def test_range_reads_of_every_shape_return_the_bytes_or_nothing_never_fail(tmp_path: Path) -> None:
    """A range may start past the cached object's bytes (a hole past a block's valid
    length) or be empty: that is no bytes, never a negative read size or an error."""
    cache = await BlockCache.open(str(tmp_path), 1 << 24)
    chunk = 64 * 1024
    for length in (1, chunk - 1, chunk, chunk + 1, 3 * chunk + 5):
        data = os.urandom(length)
        await cache.put(digest(data), data)
        points = sorted({0, 1, chunk - 1, chunk, chunk + 1, length - 1, length, length + 1,
                         2 * length, 300 * 1024, 2 << 20})
        for start in points:
            for size in (0, 1, 4096, chunk, length, 4 << 20):
                got = await cache.read_range(digest(data), length, start, size)
                assert got == data[start:start + size], (length, start, size)
    assert cache.stats.corrupt == 0


async def test_range_read_arguments_are_validated(tmp_path: Path) -> None:
    cache = await BlockCache.open(str(tmp_path), 1 << 20)
    data = os.urandom(1000)
    await cache.put(digest(data), data)
    for start, size in ((-1, 10), (0, -1)):
        with pytest.raises(ValueError):
            await cache.read_range(digest(data), 1000, start, size)
    for bad in ("../../etc/passwd", "ab", digest(data).upper(), ""):
        with pytest.raises(ValueError):
            await cache.read_range(bad, 1000, 0, 10)
        with pytest.raises(ValueError):
            await cache.get(bad, 1000)
        with pytest.raises(ValueError):
            await cache.put(bad, data)
    with pytest.raises(ValueError):
        await cache.get(digest(data), -1)


# --------------------------------------------------------------------------- accounting (item 9)


def disk_truth(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in root.joinpath("blocks").rglob("*") if p.is_file()}


def assert_exact(cache: BlockCache, root: Path) -> None:
    """What the cache believes is what the directory holds, byte for byte."""
    truth = disk_truth(root)
    index = cache.entries()
    assert index == truth, f"index {sorted(index)} vs disk {sorted(truth)}"
    assert cache.used == sum(truth.values())
    assert cache.used <= cache.limit


async def test_concurrent_puts_of_one_block_count_it_once(tmp_path: Path) -> None:
    cache = await BlockCache.open(str(tmp_path), 1 << 24)
    data = os.urandom(300_000)
    results = await asyncio.gather(*(cache.put(digest(data), data) for _ in range(8)))
    assert any(results)
    assert_exact(cache, tmp_path)
    assert len(disk_truth(tmp_path)) == 1
    assert cache.stats.writes == 1


async def test_accounting_stays_exact_under_interleaved_puts_gets_and_evictions(tmp_path: Path) -> None:
    """Puts (often of the same blocks), gets, range reads and evictions in random
    interleavings on a real directory: afterwards index == disk, used == bytes on disk."""
    blobs = [os.urandom(random.Random(i).randint(1, 200_000)) for i in range(12)]
    for seed in range(6):
        rng = random.Random(seed)
        root = tmp_path / f"c{seed}"
        cache = await BlockCache.open(str(root), 700_000)
        calls = []
        for _ in range(60):
            blob = rng.choice(blobs)
            pick = rng.random()
            if pick < 0.6:
                calls.append(cache.put(digest(blob), blob))
            elif pick < 0.8:
                calls.append(cache.get(digest(blob), len(blob)))
            else:
                calls.append(cache.read_range(digest(blob), len(blob), rng.randrange(len(blob)), 4096))
        rng.shuffle(calls)
        await asyncio.gather(*calls)
        assert_exact(cache, root)
        # and what it holds reads back
        for name in cache.entries():
            d, _, n = name.partition("_")
            assert await cache.get(d, int(n)) is not None


async def test_wiped_cache_dir_is_rescanned_and_accounting_is_exact(tmp_path: Path) -> None:
    import shutil

    cache = await BlockCache.open(str(tmp_path / "c"), 1 << 24)
    old = [os.urandom(100_000) for _ in range(3)]
    for blob in old:
        await cache.put(digest(blob), blob)
    shutil.rmtree(tmp_path / "c")  # an operator (or the CSI plugin) deletes the cache
    new = os.urandom(50_000)
    await asyncio.gather(cache.put(digest(new), new), cache.put(digest(new), new))
    await cache.drain()
    assert_exact(cache, tmp_path / "c")
    assert list(cache.entries()) == [f"{digest(new)}_{len(new)}"]
    # an old block can be cached again (the stale index entry would have refused it)
    assert await cache.put(digest(old[0]), old[0])
    assert_exact(cache, tmp_path / "c")


async def test_rescan_rebuilds_from_what_is_on_disk(tmp_path: Path) -> None:
    cache = await BlockCache.open(str(tmp_path), 1 << 24)
    blobs = [os.urandom(10_000 + i) for i in range(4)]
    for blob in blobs:
        await cache.put(digest(blob), blob)
    victim = next(p for p in tmp_path.joinpath("blocks").rglob("*") if p.is_file())
    victim.unlink()  # files deleted behind the cache's back
    await cache.rescan()
    assert_exact(cache, tmp_path)
    assert len(cache.entries()) == 3


# --------------------------------------------------------------------------- bounded offers


async def test_offer_refuses_when_too_many_writes_are_pending(tmp_path: Path) -> None:
    """The fetch path offers every block it fetched: a slow cache disk must make the
    cache refuse (the block is simply not cached), not hold one more block in memory."""
    cache = await BlockCache.open(str(tmp_path), 1 << 26, max_pending=2, max_pending_bytes=1 << 30)
    blobs = [os.urandom(100_000) for _ in range(10)]
    accepted = [cache.offer(digest(b), b) for b in blobs]  # no await: nothing has run yet
    assert accepted == [True, True] + [False] * 8
    assert cache.pending_writes == 2
    await cache.drain()
    assert cache.pending_writes == 0 and cache.pending_bytes == 0
    assert len(cache.entries()) == 2 and cache.stats.skipped == 8
    assert_exact(cache, tmp_path)
    # once the writes are done, offers are taken again
    assert cache.offer(digest(blobs[5]), blobs[5])
    await cache.drain()
    assert len(cache.entries()) == 3


async def test_offer_is_bounded_in_bytes_and_skips_what_is_cached_or_in_flight(tmp_path: Path) -> None:
    cache = await BlockCache.open(str(tmp_path), 1 << 26, max_pending=100, max_pending_bytes=250_000)
    blobs = [os.urandom(100_000) for _ in range(4)]
    assert cache.offer(digest(blobs[0]), blobs[0])
    assert not cache.offer(digest(blobs[0]), blobs[0])  # already on its way
    assert cache.offer(digest(blobs[1]), blobs[1])
    assert not cache.offer(digest(blobs[2]), blobs[2])  # would exceed 250 kB in flight
    assert cache.pending_bytes <= 250_000
    await cache.drain()
    assert not cache.offer(digest(blobs[0]), blobs[0])  # cached already
    assert_exact(cache, tmp_path)


async def test_the_cache_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    os.chmod(root, 0o755)  # as an operator's hostPath may come
    old = os.umask(0)  # whatever the umask
    try:
        cache = await BlockCache.open(str(root), 1 << 20)
        data = os.urandom(5000)
        await cache.put(digest(data), data)
    finally:
        os.umask(old)
    assert root.stat().st_mode & 0o777 == 0o700
    found = list(root.rglob("*"))
    assert any(p.is_file() for p in found)
    for path in found:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
