"""What backing up a big volume with few changes costs: full, then incremental.

    python -m bench.backup_cost [--files 1000000] [--per-dir 1000] [--changed 0.001]

Starts its own redis-server and SeaweedFS (devstack.localstack) in a temporary directory
and writes a volume of ``--files`` small files (inline data, ``--per-dir`` to a
directory) straight into Redis, as a restore would (``import_namespace``: a million
CREATEs through the scripts would take most of the run). Then, through the real code
path (``VolumeService.backup_volume``): a first, full backup; a fraction ``--changed``
of the files rewritten through the metadata API (``VolumeMeta.commit``, the mount's own
call), scattered at random; an incremental backup; and one with nothing changed. For
each it reports the wall time, how long writers waited (the freeze), the inodes read
from Redis, the hash reads Redis executed, the pages and bytes written to S3, and the
manifest's size. A benchmark, not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = 1


def synthetic_doc(files: int, per_dir: int) -> dict[str, Any]:
    """A namespace document of ``files`` small files in directories of ``per_dir``."""
    now = str(time.time_ns())
    attr_dir = {"m": str(stat.S_IFDIR | 0o755), "u": "0", "g": "0", "s": "0", "a": now,
                "t": now, "c": now, "r": "0"}
    inodes: dict[str, Any] = {}
    dirs = (files + per_dir - 1) // per_dir
    ino = ROOT
    root_dir: dict[str, int] = {}
    for d in range(dirs):
        ino += 1
        dino = ino
        root_dir[f"d{d:05d}"] = dino
        entries: dict[str, int] = {}
        for i in range(min(per_dir, files - d * per_dir)):
            ino += 1
            body = f"file {d} {i}".encode()
            entries[f"f{i:05d}"] = ino
            inodes[str(ino)] = {"attr": {"m": str(stat.S_IFREG | 0o644), "u": "0", "g": "0",
                                         "n": "1", "s": str(len(body)), "a": now, "t": now,
                                         "c": now, "r": "0"},
                                "data": base64.b64encode(body).decode()}
        inodes[str(dino)] = {"attr": {**attr_dir, "n": "2", "p": str(ROOT)}, "dir": entries}
    inodes[str(ROOT)] = {"attr": {**attr_dir, "m": str(stat.S_IFDIR | 0o1777), "n": str(2 + dirs),
                                  "p": str(ROOT)}, "dir": root_dir}
    return {"format": 2, "settings": {"next_ino": str(ino + 1), "block_size": str(4 << 20)},
            "inodes": inodes}


async def reads(r: Any) -> int:
    stats = await r.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0))
               for c in ("hgetall", "copy", "hvals", "hmget", "smembers"))


async def measure(svc: Any, name: str, **kw: Any) -> dict[str, Any]:
    """One backup, with the time its writers waited."""
    from chunkfs.meta import namespace as nsops

    frozen: list[float] = []
    real_freeze, real_thaw = nsops.freeze, nsops.thaw
    began: dict[str, float] = {}

    async def freeze(r: Any, ns: str, token: str = "-") -> None:
        began.setdefault(token, time.monotonic())
        await real_freeze(r, ns, token)

    async def thaw(r: Any, ns: str, token: str = "-") -> None:
        await real_thaw(r, ns, token)
        frozen.append(time.monotonic() - began.pop(token))

    nsops.freeze, nsops.thaw = freeze, thaw  # type: ignore[assignment]
    try:
        before = await reads(svc.r)
        start = time.monotonic()
        report = await svc.backup_volume(name, **kw)
        seconds = time.monotonic() - start
        redis_reads = await reads(svc.r) - before
    finally:
        nsops.freeze, nsops.thaw = real_freeze, real_thaw  # type: ignore[assignment]
    manifest = sum([n async for k, n, _ in svc.store.list(report.key)])
    return {"kind": report.kind, "seconds": round(seconds, 2),
            "writers_waited_s": round(sum(frozen), 2), "inodes_read": report.captured,
            "redis_hash_reads": redis_reads, "pages": report.pages,
            "pages_written": report.pages_written, "bytes_written": report.bytes_written,
            "manifest_bytes": manifest, "files": report.files}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from chunkfs.config import StorageConfig
    from chunkfs.meta import namespace as nsops
    from chunkfs.meta.redis_meta import VolumeMeta, connect_fast
    from chunkfs.meta.schema import VOLUMES
    from chunkfs.volumes import VolumeService
    from devstack.localstack import start_redis, start_seaweedfs

    with tempfile.TemporaryDirectory(prefix="backup-cost-") as tmp:
        redis = start_redis(Path(tmp, "redis"), databases=1, die_with_parent=True)
        s3 = start_seaweedfs(Path(tmp, "s3"), die_with_parent=True)
        try:
            env = {**os.environ, **s3.env()}
            svc = await VolumeService.open(redis.url, StorageConfig.from_url(
                "s3://chunkfs/backup-cost", env))
            await svc.claim()
            t0 = time.monotonic()
            doc = synthetic_doc(args.files, args.per_dir)
            ns = nsops.new_namespace_id()
            await nsops.import_namespace(svc.r, ns, doc, {
                "name": "big", "kind": "volume", "capacity": 1 << 50, "created": time.time(),
                "max_inodes": args.files * 2, "source": ""})
            await svc.r.hset(VOLUMES, "big", ns)
            files = [int(i) for i, n in doc["inodes"].items() if "data" in n]
            del doc
            setup = round(time.monotonic() - t0, 1)
            results = {"files": args.files, "setup_s": setup}
            results["full"] = await measure(svc, "big")
            fast = connect_fast(redis.url)
            meta = VolumeMeta(fast, ns, epoch="1", session="bench", deadline=30)
            rng = random.Random(args.seed)
            changed = rng.sample(files, max(1, int(len(files) * args.changed)))
            for ino in changed:
                await meta.commit(ino, size=7, inline=b"changed")
            await fast.aclose()
            results["changed_files"] = len(changed)
            results["incremental"] = await measure(svc, "big")
            results["unchanged"] = await measure(svc, "big")
            await svc.close()
        finally:
            s3.stop(timeout=5)
            redis.stop(timeout=5)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", type=int, default=1_000_000)
    p.add_argument("--per-dir", type=int, default=1000)
    p.add_argument("--changed", type=float, default=0.001, help="fraction of files rewritten")
    p.add_argument("--seed", type=int, default=1)
    print(json.dumps(asyncio.run(run(p.parse_args())), indent=2))


if __name__ == "__main__":
    main()
