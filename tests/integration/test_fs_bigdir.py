"""Directories with many entries: 100k made through the metadata layer, 2k through the mount."""

from __future__ import annotations

import asyncio
import os
import random
import stat
import time

from chunkfs.meta import redis_meta
from chunkfs.meta.redis_meta import VolumeMeta
from chunkfs.meta.schema import VOLUMES
from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import Mount

N_META = 100_000
N_MOUNT = 2_000


async def _bulk_create(meta_url: str, volume: str, parent: int, n: int, tasks: int = 64) -> None:
    admin = redis_meta.connect(meta_url)
    try:
        ns = (await admin.hget(VOLUMES, volume)).decode()
        epoch = (await admin.hget(f"cfs{{{ns}}}:vol", "epoch")).decode()
    finally:
        await admin.aclose()
    # the client a mount uses for VolumeMeta (the admin client where there is no other)
    client = getattr(redis_meta, "connect_fast", redis_meta.connect)(meta_url)
    try:
        meta = VolumeMeta(client, ns, epoch=epoch, session="bulk-test")

        async def worker(k: int) -> None:
            for i in range(k, n, tasks):
                await meta.create(parent, b"entry-%06d" % i, stat.S_IFREG | 0o644, 0, 0,
                                  inline=True)

        await asyncio.gather(*(worker(k) for k in range(tasks)))
    finally:
        await client.aclose()


def test_listing_100k_entries(mnt: Mount, meta_url: str) -> None:
    big = mnt / "big"
    big.mkdir()
    parent = big.stat().st_ino
    t0 = time.monotonic()
    asyncio.run(_bulk_create(meta_url, mnt.volume, parent, N_META))
    created = time.monotonic() - t0
    t0 = time.monotonic()
    names = os.listdir(big)
    listed = time.monotonic() - t0
    assert len(names) == N_META, f"listed {len(names)} of {N_META} entries"
    assert set(names) == {f"entry-{i:06d}" for i in range(N_META)}
    # entries made elsewhere are usable through the mount
    for i in random.Random(1).sample(range(N_META), 20):
        p = big / f"entry-{i:06d}"
        assert stat.S_ISREG(p.stat().st_mode)
        assert p.read_bytes() == b""
    (big / "entry-000007").write_bytes(b"seven")
    assert (big / "entry-000007").read_bytes() == b"seven"
    os.unlink(big / "entry-000008")
    with os.scandir(big) as it:
        count = sum(1 for e in it if e.is_file())  # d_type/stat through readdir
    assert count == N_META - 1
    assert big.stat().st_nlink == 2
    print(f"created {N_META} entries in {created:.1f}s, listed in {listed:.1f}s")


def test_2k_entries_through_the_mount(mnt: Mount) -> None:
    d = mnt / "d"
    d.mkdir()
    for i in range(N_MOUNT):
        with open(d / f"f{i:05d}", "wb") as f:
            if i % 100 == 0:
                f.write(b"x" * i)
    names = sorted(os.listdir(d))
    assert names == [f"f{i:05d}" for i in range(N_MOUNT)]
    assert (d / "f01900").stat().st_size == 1900
    for i in range(0, N_MOUNT, 2):
        os.unlink(d / f"f{i:05d}")
    assert len(os.listdir(d)) == N_MOUNT // 2
    for name in os.listdir(d):
        os.unlink(d / name)
    assert os.listdir(d) == []
    os.rmdir(d)
    assert not d.exists()
