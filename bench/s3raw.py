"""Raw S3 throughput of the endpoint under test: parallel PUTs, then parallel GETs, of
4 MiB objects (the block size of both filesystems), with aiobotocore (the client chunkfs
uses). This is the ceiling that a filesystem's sequential write and cold read are
compared with.

    python -m bench.s3raw '{"bucket": ..., "prefix": ..., "size": ..., "concurrency": 16}'

runs in a child process (AWS_* from the environment) and prints one JSON document.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from bench.workloads import MiB, Pattern, drop_caches

OBJECT_SIZE = 4 * MiB


async def _run(
    bucket: str, prefix: str, size: int, concurrency: int, seed: int, salt: int, drop: bool
) -> dict[str, Any]:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    count = max(1, size // OBJECT_SIZE)
    pat = Pattern(seed, salt)
    # SeaweedFS does not deduplicate, so 16 distinct bodies cycled are as good as `count`.
    bodies = [b"".join(bytes(pat.chunk(4 * k + j)) for j in range(4)) for k in range(16)]
    keys = [f"{prefix}/obj-{i:06d}" for i in range(count)]
    session = get_session()
    config = AioConfig(
        max_pool_connections=concurrency * 2,
        s3={"addressing_style": "path"},
        retries={"max_attempts": 3, "mode": "standard"},
    )
    async with session.create_client(
        "s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"],
        region_name=os.environ.get("AWS_REGION", "us-east-1"), config=config,
    ) as s3:  # fmt: skip
        sem = asyncio.Semaphore(concurrency)

        async def put(i: int) -> None:
            async with sem:
                await s3.put_object(Bucket=bucket, Key=keys[i], Body=bodies[i % len(bodies)])

        got = 0

        async def get(i: int) -> None:
            nonlocal got
            async with sem:
                resp = await s3.get_object(Bucket=bucket, Key=keys[i])
                async with resp["Body"] as stream:
                    data = await stream.read()
                got += len(data)

        # Warm the connection pool (so that the measurement is not of TCP handshakes).
        await asyncio.gather(*(s3.head_bucket(Bucket=bucket) for _ in range(concurrency)))
        t0 = time.perf_counter()
        await asyncio.gather(*(put(i) for i in range(count)))
        put_s = time.perf_counter() - t0
        if drop:
            drop_caches()
        t0 = time.perf_counter()
        await asyncio.gather(*(get(i) for i in range(count)))
        get_s = time.perf_counter() - t0
        if got != count * OBJECT_SIZE:
            raise RuntimeError(f"raw GET returned {got} bytes, expected {count * OBJECT_SIZE}")
        for i in range(0, count, 1000):  # clean up (untimed) to keep SeaweedFS small
            await s3.delete_objects(
                Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]}
            )
    mib = count * OBJECT_SIZE / MiB
    return {
        "objects": count,
        "object_size": OBJECT_SIZE,
        "concurrency": concurrency,
        "put_s": put_s,
        "put_mib_s": mib / put_s,
        "get_s": get_s,
        "get_mib_s": mib / get_s,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    result = asyncio.run(
        _run(
            spec["bucket"],
            spec["prefix"],
            int(spec["size"]),
            int(spec.get("concurrency", 16)),
            int(spec.get("seed", 1)),
            int(spec.get("salt", 1)),
            bool(spec.get("drop", True)),
        )
    )
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
