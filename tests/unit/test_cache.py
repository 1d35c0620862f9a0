"""The local block cache: verified, bounded, crash-safe, disposable."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from chunkfs.cache import BlockCache


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
