"""What one metadata round trip of the hot path costs: getattr and lookup on standalone Redis.

    python -m bench.meta_rtt [--ops 20000] [--rounds 5] [--concurrency 1,32]

Starts its own redis-server (devstack.localstack) in a temporary directory, creates one
namespace with a file in its root, then times ``VolumeMeta.getattr`` (one HMGET) and
``VolumeMeta.lookup`` (one EVALSHA) through the hot-path client (chunkfs.meta.resp):
one caller at a time (latency per operation) and many callers at once (pipelined, cost
per operation). Prints the best round of each, in microseconds per operation. A
benchmark, not a test: compare figures of one run (or of runs back to back) only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import stat
import tempfile
import time

from chunkfs.meta import namespace as nsops
from chunkfs.meta.redis_meta import VolumeMeta, connect, connect_fast
from chunkfs.meta.schema import ROOT_INODE
from devstack.localstack import start_redis


async def _time(op, ops: int, concurrency: int) -> float:
    per_worker = ops // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            await op()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.perf_counter() - start) / (per_worker * concurrency) * 1e6


async def run(url: str, ops: int, rounds: int, levels: list[int]) -> dict[str, float]:
    admin = connect(url)
    await nsops.init_namespace(admin, "bench", {"name": "b", "kind": "volume",
                                                "capacity": 1 << 30, "block_size": 4 << 20})
    await admin.aclose()
    client = connect_fast(url)
    meta = VolumeMeta(client, "bench", epoch="", session="s")
    attr = await meta.create(ROOT_INODE, b"file", stat.S_IFREG | 0o644, 0, 0)
    results: dict[str, float] = {}
    ops_by_name = {"getattr": lambda: meta.getattr(attr.ino),
                   "lookup": lambda: meta.lookup(ROOT_INODE, b"file")}
    for name, op in ops_by_name.items():
        for level in levels:
            await _time(op, min(ops, 2000), level)  # warm up
            best = min([await _time(op, ops, level) for _ in range(rounds)])
            results[f"{name} x{level} us/op"] = round(best, 1)
    await client.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", default="1,32")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        redis = start_redis(tmp, databases=1)
        try:
            results = asyncio.run(run(redis.url, args.ops, args.rounds, levels))
        finally:
            redis.stop(timeout=5)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
