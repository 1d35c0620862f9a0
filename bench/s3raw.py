"""Raw S3 throughput of the endpoint under test: parallel PUTs, then parallel GETs, of
4 MiB objects (the block size of both filesystems), with aiobotocore (the client chunkfs
uses). This is the ceiling that a filesystem's sequential write and cold read are
compared with.

    python -m bench.s3raw '{"bucket": ..., "prefix": ..., "size": ..., "concurrency": 16,
                            "processes": 1, "get_endpoints": {"proxy": URL, "direct": URL}}'

runs in a child process (AWS_* from the environment) and prints one JSON document.
``get_endpoints`` reads the same objects once through each endpoint: bench.run GETs
through the counting proxy that the mounts use (the comparable ceiling) and directly
(what the proxy costs).

One Python process may top out below what SeaweedFS serves (botocore's per-request
overhead and the GIL): ``processes`` > 1 spreads the GETs over forked workers that start
together on a barrier (the figure is the total bytes over the wall time from the first
worker's start to the last one's end). On 2 cores that did not help, so the default is
1 process, like a chunkfs mount. ``bench.run`` also runs ``juicefs objbench`` (a Go
client) once as a second, client-independent reference.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import sys
import time
from typing import Any

from bench.workloads import MiB, Pattern, drop_caches

OBJECT_SIZE = 4 * MiB


def _client(concurrency: int, endpoint: str | None = None) -> Any:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    config = AioConfig(
        max_pool_connections=concurrency * 2,
        s3={"addressing_style": "path"},
        retries={"max_attempts": 3, "mode": "standard"},
        # as chunkfs.objstore configures it: it verifies blocks by their content hash
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return get_session().create_client(
        "s3", endpoint_url=endpoint or os.environ["AWS_ENDPOINT_URL"],
        region_name=os.environ.get("AWS_REGION", "us-east-1"), config=config,
    )  # fmt: skip


async def _put_all(bucket: str, keys: list[str], bodies: list[bytes], concurrency: int) -> float:
    async with _client(concurrency) as s3:
        sem = asyncio.Semaphore(concurrency)

        async def put(i: int) -> None:
            async with sem:
                await s3.put_object(Bucket=bucket, Key=keys[i], Body=bodies[i % len(bodies)])

        # Warm the connection pool (so that the measurement is not of TCP handshakes).
        await asyncio.gather(*(s3.head_bucket(Bucket=bucket) for _ in range(concurrency)))
        t0 = time.perf_counter()
        await asyncio.gather(*(put(i) for i in range(len(keys))))
        return time.perf_counter() - t0


async def _get_all(
    bucket: str, keys: list[str], concurrency: int, barrier: Any, endpoint: str | None = None
) -> tuple[float, float, int]:
    async with _client(concurrency, endpoint) as s3:
        sem = asyncio.Semaphore(concurrency)
        got = 0

        async def get(key: str) -> None:
            nonlocal got
            async with sem:
                resp = await s3.get_object(Bucket=bucket, Key=key)
                async with resp["Body"] as stream:
                    data = await stream.read()
                got += len(data)

        await asyncio.gather(*(s3.head_bucket(Bucket=bucket) for _ in range(concurrency)))
        if barrier is not None:
            barrier.wait()
        t0 = time.monotonic()
        await asyncio.gather(*(get(k) for k in keys))
        return t0, time.monotonic(), got


def _get_worker(args: tuple[str, list[str], int, Any, str | None]) -> tuple[float, float, int]:
    bucket, keys, concurrency, barrier, endpoint = args
    return asyncio.run(_get_all(bucket, keys, concurrency, barrier, endpoint))


_BARRIER: Any = None


def _init(barrier: Any) -> None:
    global _BARRIER
    _BARRIER = barrier


def _pool_get(args: tuple[str, list[str], int, str | None]) -> tuple[float, float, int]:
    bucket, keys, concurrency, endpoint = args
    return _get_worker((bucket, keys, concurrency, _BARRIER, endpoint))


async def _delete_all(bucket: str, keys: list[str]) -> None:
    async with _client(4) as s3:
        for i in range(0, len(keys), 1000):
            await s3.delete_objects(
                Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]}
            )


def _get_pass(bucket: str, keys: list[str], concurrency: int, processes: int,
              endpoint: str | None) -> tuple[float, int]:  # fmt: skip
    """One timed GET of every key: (seconds from the first start to the last end, bytes)."""
    processes = max(1, min(processes, len(keys)))
    if processes == 1:
        t0, t1, got = _get_worker((bucket, keys, concurrency, None, endpoint))
        return t1 - t0, got
    slices = [keys[i::processes] for i in range(processes)]
    per_proc = max(1, concurrency // processes)
    ctx = multiprocessing.get_context("fork")  # no event loop is running here
    barrier = ctx.Barrier(processes)
    with ctx.Pool(processes, initializer=_init, initargs=(barrier,)) as pool:
        results = pool.map(_pool_get, [(bucket, s, per_proc, endpoint) for s in slices], chunksize=1)
    return max(r[1] for r in results) - min(r[0] for r in results), sum(r[2] for r in results)


def run(bucket: str, prefix: str, size: int, concurrency: int = 16, processes: int = 1,
        seed: int = 1, salt: int = 1, drop: bool = True,
        get_endpoints: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """PUT ``size`` bytes as 4 MiB objects through $AWS_ENDPOINT_URL, then GET them all,
    once per entry of ``get_endpoints`` (name -> URL; default: the PUT endpoint only),
    the page cache dropped before each pass. The first pass is ``get_mib_s``."""
    count = max(1, size // OBJECT_SIZE)
    pat = Pattern(seed, salt)
    # SeaweedFS does not deduplicate, so 16 distinct bodies cycled are as good as `count`.
    bodies = [b"".join(bytes(pat.chunk(4 * k + j)) for j in range(4)) for k in range(16)]
    keys = [f"{prefix}/obj-{i:06d}" for i in range(count)]
    put_s = asyncio.run(_put_all(bucket, keys, bodies, concurrency))
    del bodies
    mib = count * OBJECT_SIZE / MiB
    passes: dict[str, dict[str, float]] = {}
    for name, endpoint in (get_endpoints or {"default": None}).items():
        if drop:
            drop_caches()
        get_s, got = _get_pass(bucket, keys, concurrency, processes, endpoint)
        if got != count * OBJECT_SIZE:
            raise RuntimeError(f"raw GET ({name}) returned {got} bytes, expected {count * OBJECT_SIZE}")
        passes[name] = {"get_s": get_s, "get_mib_s": mib / get_s}
    asyncio.run(_delete_all(bucket, keys))  # untimed, keeps SeaweedFS small
    first = next(iter(passes.values()))
    return {
        "objects": count, "object_size": OBJECT_SIZE, "concurrency": concurrency,
        "get_processes": processes, "put_s": put_s, "put_mib_s": mib / put_s,
        "get_s": first["get_s"], "get_mib_s": first["get_mib_s"], "get_passes": passes,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    result = run(
        spec["bucket"], spec["prefix"], int(spec["size"]),
        concurrency=int(spec.get("concurrency", 16)), processes=int(spec.get("processes", 1)),
        seed=int(spec.get("seed", 1)), salt=int(spec.get("salt", 1)),
        drop=bool(spec.get("drop", True)), get_endpoints=spec.get("get_endpoints"),
    )  # fmt: skip
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
