"""GC's memory does not grow with the bucket: a run over a hundred thousand objects (fed
through GC's own listing, as bench/gc_memory.py does with a million) allocates a small
fraction of what holding their keys in a set would, and still decides exactly."""

from __future__ import annotations

import tracemalloc

import pytest

from bench.gc_memory import SYN_LEN, SyntheticBucket, synthetic_digest
from chunkfs import gc
from chunkfs.blocks import slices
from chunkfs.gc import collect_garbage
from chunkfs.meta.schema import Keys

N = 100_000


@pytest.mark.fsck_allows(r"inode \d+ is indexed but has no attributes", r"volume records \d+ inodes",
                         reason="synthetic block maps of inodes that have no attributes nor count")
async def test_a_run_over_many_objects_allocates_far_less_than_their_keys(svc, monkeypatch) -> None:
    # small bounds (a spill batch, a round of block map entries): what is left to measure
    # is whatever grows with the number of objects, and nothing may
    monkeypatch.setattr(gc, "_ENTRIES_PER_ROUND", 2000)
    info = await svc.create_volume("v", 1 << 60)
    k = Keys(info.id)
    pipe, referenced = svc.r.pipeline(transaction=False), 0
    for i in range(0, N, 2):  # every other object is referenced, 1000 entries per file
        ino = 10 + i // 2000
        pipe.sadd(k.idx, ino)
        digest = synthetic_digest(i, N)
        whole = slices.Slice(slices.object_ref(digest, SYN_LEN), 0, SYN_LEN, 0)
        pipe.hset(k.blocks(ino), str(i // 2 % 1000), slices.encode([whole]))
        referenced += 1
        if referenced % 5000 == 0:
            await pipe.execute()
            pipe = svc.r.pipeline(transaction=False)
    await pipe.execute()
    bucket = SyntheticBucket(svc.store, N)

    keys_alone = sum(len(synthetic_digest(i, N)) + 30 + 49 for i in range(N))  # str + header
    tracemalloc.start()
    try:
        report = await collect_garbage(svc.r, bucket, grace=0, spill_batch=2000)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.objects == N and report.referenced == N // 2
    assert report.deleted == N // 2 == bucket.dropped
    assert peak < keys_alone / 5, f"peak {peak / 2**20:.1f} MiB, the keys alone {keys_alone / 2**20:.1f} MiB"
