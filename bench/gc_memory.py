"""Peak memory of one GC run over a big bucket: synthetic objects through the real code path.

    python -m bench.gc_memory [--synthetic 1000000] [--real 20000] [--referenced 0.5]
                              [--baseline-rev REV]

Starts its own redis-server and SeaweedFS (devstack.localstack) in a temporary directory,
creates one volume and gives it block maps that reference a fraction of the objects, then
runs ``chunkfs.gc.collect_garbage`` in a fresh interpreter and reports its peak RSS
(VmHWM), its RSS just before the run, the run's time and report.

A million PUTs take too long on a development machine, so the bucket is partly synthetic:
``--synthetic N`` objects exist only in the listing GC reads (``SyntheticBucket`` merges
them, in S3's key order, into the real ListObjectsV2 pages of ``blocks/``) and in the
block maps in Redis; GC's ``DeleteObjects`` calls drop them and pass real keys on. Every
other step (the lease, Redis scans, the spills, publishing doomed keys to Redis, the
reprieve, deleting real objects) is the real one. ``--real M`` objects are PUT for real.

``--baseline-rev`` also measures ``chunkfs/gc.py`` as it was at a git revision (the
in-memory implementation before the streamed one, for instance), on the same data.
A benchmark, not a test: the figures depend on the machine; compare runs of one session.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

SYN_LEN = 4_194_301          # the length every synthetic object claims (real ones are tiny)
ENTRIES_PER_INODE = 1000
OLD = time.time() - 7 * 86400


def synthetic_digest(i: int, n: int) -> str:
    """The i-th of n synthetic digests: spread over the key space, in key order."""
    return f"{(i + 1) * ((16 ** 64 - 1) // (n + 1)):064x}"


def referenced(i: int, fraction: float) -> bool:
    return (i * 7919) % 1000 < fraction * 1000


def real_body(i: int) -> bytes:
    return f"gc-memory real object {i}".encode()


# --------------------------------------------------------------------------- the child


class SyntheticBucket:
    """An ObjectStore whose ``blocks/`` listing also holds ``n`` synthetic objects."""

    def __init__(self, store: Any, n: int) -> None:
        self.store = store
        self.n = n
        self.dropped = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def list(self, prefix: str = "") -> AsyncIterator[tuple[str, int, float]]:
        if prefix != "blocks/" or not self.n:
            async for item in self.store.list(prefix):
                yield item
            return
        from chunkfs.objstore import block_key

        real = self.store.list(prefix)
        nxt = await anext(real, None)
        for i in range(self.n):
            key = block_key(synthetic_digest(i, self.n), SYN_LEN)
            while nxt is not None and nxt[0] < key:
                yield nxt
                nxt = await anext(real, None)
            yield key, SYN_LEN, OLD
        while nxt is not None:
            yield nxt
            nxt = await anext(real, None)

    async def delete_many(self, keys: list[str]) -> None:
        real = [k for k in keys if not k.endswith(f"_{SYN_LEN}")]
        self.dropped += len(keys) - len(real)
        if real:
            await self.store.delete_many(real)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


async def child(args: argparse.Namespace) -> dict[str, Any]:
    from chunkfs.config import StorageConfig
    from chunkfs.volumes import VolumeService

    if args.gc_module:
        spec = importlib.util.spec_from_file_location("gc_under_test", args.gc_module)
        assert spec is not None and spec.loader is not None
        gc = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = gc  # dataclasses look their module up
        spec.loader.exec_module(gc)
    else:
        from chunkfs import gc
    svc = await VolumeService.open(args.meta, StorageConfig.from_url(args.storage, os.environ))
    bucket = SyntheticBucket(svc.store, args.synthetic)
    await svc.ping()
    before = _status_kib("VmRSS")
    start = time.monotonic()
    kwargs = {"work_dir": args.work_dir} if not args.gc_module else {}
    report = await gc.collect_garbage(svc.r, bucket, grace=0, **kwargs)
    seconds = time.monotonic() - start
    await svc.close()
    return {"rss_before_kib": before, "peak_rss_kib": _status_kib("VmHWM"),
            "seconds": round(seconds, 1), "synthetic_dropped": bucket.dropped,
            "report": vars(report)}


# --------------------------------------------------------------------------- the parent


async def populate(svc: Any, args: argparse.Namespace) -> dict[str, int]:
    """One volume whose block maps reference a fraction of the synthetic and real objects."""
    from chunkfs.blocks import slices
    from chunkfs.meta.schema import Keys

    info = await svc.create_volume("v", 1 << 60)
    k = Keys(info.id)
    expected = {"referenced": 0, "garbage": 0}
    ino, pipe, entries = 1000, svc.r.pipeline(transaction=False), 0

    async def entry(digest: str, length: int) -> None:
        nonlocal ino, pipe, entries
        if entries % ENTRIES_PER_INODE == 0:
            ino += 1
            pipe.sadd(k.idx, ino)
        whole = slices.Slice(slices.object_ref(digest, length), 0, length, 0)  # one object, block-long
        pipe.hset(k.blocks(ino), str(entries % ENTRIES_PER_INODE), slices.encode([whole]))
        entries += 1
        if entries % 10_000 == 0:
            await pipe.execute()
            pipe = svc.r.pipeline(transaction=False)

    for i in range(args.synthetic):
        if referenced(i, args.referenced):
            await entry(synthetic_digest(i, args.synthetic), SYN_LEN)
            expected["referenced"] += 1
        else:
            expected["garbage"] += 1
    for i in range(args.real):
        body = real_body(i)
        if referenced(i, args.referenced):
            await entry(hashlib.sha256(body).hexdigest(), len(body))
            expected["referenced"] += 1
        else:
            expected["garbage"] += 1
    await pipe.execute()
    await put_real(svc, args.real, only_garbage=False, fraction=args.referenced)
    expected["real_referenced"] = sum(referenced(i, args.referenced) for i in range(args.real))
    return expected


async def put_real(svc: Any, n: int, *, only_garbage: bool, fraction: float) -> None:
    from chunkfs.objstore import block_key

    todo = [i for i in range(n) if not (only_garbage and referenced(i, fraction))]
    sem = asyncio.Semaphore(32)

    async def put(i: int) -> None:
        body = real_body(i)
        async with sem:
            await svc.store.put(block_key(hashlib.sha256(body).hexdigest(), len(body)), body)

    for start in range(0, len(todo), 2000):
        await asyncio.gather(*(put(i) for i in todo[start:start + 2000]))


async def count_real(svc: Any) -> int:
    return sum([1 async for _ in svc.store.list("blocks/")])


def run_child(args: argparse.Namespace, env: dict[str, str], meta: str, storage: str,
              gc_module: str | None) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.gc_memory", "--child", "--meta", meta, "--storage",
            storage, "--synthetic", str(args.synthetic), "--work-dir", args.work_dir]
    if gc_module:
        argv += ["--gc-module", gc_module]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"gc child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


async def parent(args: argparse.Namespace) -> list[dict[str, Any]]:
    from chunkfs.config import StorageConfig
    from chunkfs.volumes import VolumeService
    from devstack.localstack import start_redis, start_seaweedfs

    results = []
    with tempfile.TemporaryDirectory(prefix="gc-memory-") as tmp:
        redis = start_redis(Path(tmp, "redis"), databases=1, die_with_parent=True)
        s3 = start_seaweedfs(Path(tmp, "s3"), die_with_parent=True)
        try:
            env = {**os.environ, **s3.env()}
            storage = "s3://chunkfs/gc-memory"
            args.work_dir = args.work_dir or str(Path(tmp, "work"))
            os.makedirs(args.work_dir, exist_ok=True)
            svc = await VolumeService.open(redis.url, StorageConfig.from_url(storage, env))
            t0 = time.monotonic()
            expected = await populate(svc, args)
            setup_s = round(time.monotonic() - t0, 1)
            impls: list[tuple[str, str | None]] = [("streamed (this tree)", None)]
            if args.baseline_rev:
                impls.append((f"chunkfs/gc.py at {args.baseline_rev}", args.baseline_file))
            for name, module in impls:
                await put_real(svc, args.real, only_garbage=True, fraction=args.referenced)
                await asyncio.sleep(1.1)  # S3 times have whole seconds: grace 0 sees them all
                result = await asyncio.to_thread(run_child, args, env, redis.url, storage, module)
                report = result["report"]
                left = await count_real(svc)
                result.update(
                    implementation=name, synthetic=args.synthetic, real=args.real,
                    setup_s=setup_s, expected_deleted=expected["garbage"],
                    exact=report["deleted"] == expected["garbage"]
                    and left == expected["real_referenced"],
                    peak_mib=round(result["peak_rss_kib"] / 1024, 1),
                    growth_mib=round((result["peak_rss_kib"] - result["rss_before_kib"]) / 1024, 1))
                results.append(result)
            await svc.close()
        finally:
            s3.stop(timeout=5)
            redis.stop(timeout=5)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--synthetic", type=int, default=1_000_000)
    p.add_argument("--real", type=int, default=20_000)
    p.add_argument("--referenced", type=float, default=0.5,
                   help="fraction of the objects that block maps reference")
    p.add_argument("--baseline-rev", help="also measure chunkfs/gc.py of this git revision")
    p.add_argument("--work-dir", default="", help="GC's spill directory (default: a temp dir)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--meta", help=argparse.SUPPRESS)
    p.add_argument("--storage", help=argparse.SUPPRESS)
    p.add_argument("--gc-module", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child(args))))
        return
    with tempfile.NamedTemporaryFile("w", suffix=".py") as baseline:
        if args.baseline_rev:
            baseline.write(subprocess.run(["git", "show", f"{args.baseline_rev}:chunkfs/gc.py"],
                                          check=True, capture_output=True, text=True).stdout)
            baseline.flush()
        args.baseline_file = baseline.name
        results = asyncio.run(parent(args))
    for result in results:
        print(json.dumps({k: result[k] for k in (
            "implementation", "synthetic", "real", "peak_mib", "growth_mib", "seconds",
            "exact", "expected_deleted")} | {"deleted": result["report"]["deleted"],
                                             "spill_bytes": result["report"].get("spill_bytes")}))


if __name__ == "__main__":
    main()
