"""The first minute of reads after a reschedule, with and without the warm-start hot set.

    sudo .venv/bin/python -m bench.warmstart [--files 64] [--hot 32] [--file-size 4MiB]
                                             [--duration 60] [--think-ms 10] [--seed 1]
                                             [--out FILE.json]

A chunkfs-only comparison (JuiceFS has no hot set to compare with): what a pod sees in
the first minute after it was rescheduled to a node whose cache is empty.

1. Starts its own Redis and SeaweedFS (``devstack.localstack``) in a temporary directory,
   creates a volume and writes ``--files`` files of ``--file-size`` (seeded random bytes).
2. "The old node": mounts the volume on an empty cache and runs the application for
   ``--duration`` seconds; it reads only the ``--hot`` hot files (4 KiB preads at random
   offsets, ``--think-ms`` apart). Its mount records the hot set; unmounting publishes it.
3. "The new node", twice, each time on a fresh, empty cache directory with the page
   cache dropped: once with ``-o prefetch=0`` (without the hot set: a cold cache), once
   with the default options (the mount prefetches the hot set in the background while
   the application already runs). The same application runs for ``--duration`` seconds.

Reported per case: reads done, reads slower than 10 ms (they waited for S3), the cache
hit ratio (the mount's own counters: block
loads served by the disk cache vs fetched from S3) over the whole window and over its
first 5 s, 5-15 s and 15-60 s, p50/p99/max read latency over the first 10 s and over
the window, S3 GETs of the mount during the window (the prefetch's own GETs included),
and when the prefetch finished. The JSON (``--out``) has the per-second timeline.

A benchmark, not a test: compare the two cases of one run, never figures across
machines or runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from chunkfs.config import format_size, parse_size

BUCKETS = ((0, 5), (5, 15), (15, 60))
SLOW_S = 0.010  # a 4 KiB read slower than this waited for S3 (loopback S3: ~20-60 ms a block)


def run(argv: list[str], env: dict[str, str], timeout: float = 300) -> str:
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} failed: {out.stderr[-2000:]}")
    return out.stdout


class Node:
    """A mount of the volume on a cache directory of its own (one "node")."""

    def __init__(self, work: Path, name: str, env: dict[str, str], chunkfs: str) -> None:
        self.mp = work / f"mp-{name}"
        self.cache = work / f"cache-{name}"
        self.log = work / f"mount-{name}.log"
        self.env = env
        self.chunkfs = chunkfs
        self.mp.mkdir()

    def mount(self, volume: str, options: str | None) -> None:
        argv = [self.chunkfs, "mount", volume, str(self.mp), "--cache-dir", str(self.cache),
                "--log-file", str(self.log)]
        if options:
            argv += ["-o", options]
        run(argv, self.env)

    def status(self) -> dict[str, Any]:
        return json.loads((self.mp / ".chunkfs.status").read_bytes())

    def umount(self) -> None:
        run([self.chunkfs, "umount", str(self.mp)], self.env)


def drop_page_cache() -> None:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        print("(could not drop the page cache: run as root for fair figures)", file=sys.stderr)


def write_files(mp: Path, count: int, size: int, seed: int) -> list[str]:
    names = []
    for i in range(count):
        rng = random.Random(f"{seed}-{i}")
        name = f"f{i:03d}"
        with open(mp / name, "wb") as f:
            f.write(rng.randbytes(size))
            os.fsync(f.fileno())
        names.append(name)
    return names


def application(node: Node, hot: list[str], size: int, duration: float, think: float,
                seed: int) -> dict[str, Any]:
    """Random 4 KiB preads of the hot files for ``duration`` seconds; samples the mount's
    cache and S3 counters every second."""
    rng = random.Random(seed)
    fds = {name: os.open(node.mp / name, os.O_RDONLY) for name in hot}
    first = node.status()
    base_hits, base_misses = first["cache"]["hits"], first["cache"]["misses"]
    base_gets = first["s3"]["requests"].get("get", 0)
    latencies: list[tuple[float, float]] = []  # (seconds since start, latency)
    timeline: list[dict[str, Any]] = []
    start = time.monotonic()
    next_sample = 1.0
    try:
        while (now := time.monotonic() - start) < duration:
            name = rng.choice(hot)
            offset = rng.randrange(size // 4096) * 4096
            t0 = time.monotonic()
            os.pread(fds[name], 4096, offset)
            latencies.append((now, time.monotonic() - t0))
            if now >= next_sample:
                st = node.status()
                timeline.append({"t": round(now, 2), "reads": len(latencies),
                                 "hits": st["cache"]["hits"] - base_hits,
                                 "misses": st["cache"]["misses"] - base_misses,
                                 "gets": st["s3"]["requests"].get("get", 0) - base_gets,
                                 "warm": st.get("warm", {}).get("state"),
                                 "prefetched": st.get("warm", {}).get("prefetched", 0)})
                next_sample += 1.0
            if think:
                time.sleep(think)
    finally:
        for fd in fds.values():
            os.close(fd)
    end = node.status()
    return {"latencies": latencies, "timeline": timeline, "warm": end.get("warm"),
            "hits": end["cache"]["hits"] - base_hits,
            "misses": end["cache"]["misses"] - base_misses,
            "gets": end["s3"]["requests"].get("get", 0) - base_gets}


def ratio(hits: int, misses: int) -> float | None:
    return round(hits / (hits + misses), 4) if hits + misses else None


def summarise(raw: dict[str, Any], duration: float) -> dict[str, Any]:
    lat = raw["latencies"]
    early = [x for t, x in lat if t < 10] or [0.0]
    every = [x for _, x in lat] or [0.0]

    def pct(values: list[float], q: float) -> float:
        return round(sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000, 2)

    buckets = {}
    points = [{"t": 0.0, "hits": 0, "misses": 0}, *raw["timeline"],
              {"t": duration, "hits": raw["hits"], "misses": raw["misses"]}]
    for lo, hi in BUCKETS:
        if lo >= duration:
            continue
        hi = min(hi, duration)
        a = max((p for p in points if p["t"] <= lo), key=lambda p: p["t"])
        b = max((p for p in points if p["t"] <= hi), key=lambda p: p["t"])
        buckets[f"{lo}-{hi:g}s"] = ratio(b["hits"] - a["hits"], b["misses"] - a["misses"])
    warm = raw.get("warm") or {}
    done_at = next((p["t"] for p in raw["timeline"] if p.get("warm") == "done"), None)
    slow = sum(1 for _, x in lat if x > SLOW_S)
    return {"reads": len(lat), "slow_reads": slow,
            "hit_ratio": ratio(raw["hits"], raw["misses"]),
            "hit_ratio_by_window": buckets, "hits": raw["hits"], "misses": raw["misses"],
            "s3_gets": raw["gets"], "p50_ms_first_10s": pct(early, 0.5),
            "p99_ms_first_10s": pct(early, 0.99), "p50_ms": pct(every, 0.5),
            "p99_ms": pct(every, 0.99), "max_ms": round(max(every) * 1000, 2),
            "mean_ms": round(statistics.fmean(every) * 1000, 3),
            "prefetch": {k: warm.get(k) for k in ("state", "prefetched", "prefetched_bytes",
                                                  "planned", "seconds")},
            "prefetch_done_by_s": done_at, "timeline": raw["timeline"]}


def print_table(results: dict[str, dict[str, Any]]) -> None:
    cols = list(results)
    rows = [("reads in the window", lambda r: str(r["reads"])),
            (f"reads slower than {SLOW_S * 1000:.0f} ms (waited for S3)",
             lambda r: str(r["slow_reads"])),
            ("cache hit ratio, whole window", lambda r: f"{r['hit_ratio']}")]
    for window in next(iter(results.values()))["hit_ratio_by_window"]:
        rows.append((f"cache hit ratio, {window}",
                     lambda r, w=window: f"{r['hit_ratio_by_window'][w]}"))
    rows += [("read p50 / p99 ms, first 10 s",
              lambda r: f"{r['p50_ms_first_10s']} / {r['p99_ms_first_10s']}"),
             ("read p50 / p99 / max ms, window",
              lambda r: f"{r['p50_ms']} / {r['p99_ms']} / {r['max_ms']}"),
             ("S3 GETs of the mount (prefetch included)", lambda r: str(r["s3_gets"])),
             ("prefetched blocks (bytes)",
              lambda r: f"{r['prefetch']['prefetched'] or 0} "
                        f"({format_size(r['prefetch']['prefetched_bytes'] or 0)})"),
             ("prefetch took", lambda r: f"{r['prefetch']['seconds']} s"
              if r["prefetch"]["state"] == "done" else str(r["prefetch"]["state"]))]
    width = max(len(label) for label, _ in rows)
    print(f"{'':{width}}  " + "  ".join(f"{c:>26}" for c in cols))
    for label, cell in rows:
        print(f"{label:{width}}  " + "  ".join(f"{cell(results[c]):>26}" for c in cols))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", type=int, default=64)
    p.add_argument("--hot", type=int, default=32,
                   help="files the application reads (default: 128 MiB, twice the mount's "
                        "memory cache, so the disk cache matters)")
    p.add_argument("--file-size", type=parse_size, default=parse_size("4MiB"))
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--think-ms", type=float, default=10.0,
                   help="pause between two reads of the application")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", help="write the results (with per-second timelines) as JSON")
    args = p.parse_args()
    from devstack.localstack import BUCKET, start_redis, start_seaweedfs

    chunkfs = str(Path(sys.executable).with_name("chunkfs"))
    with tempfile.TemporaryDirectory(prefix="warmstart-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        redis = start_redis(work / "redis", databases=2, die_with_parent=True)
        s3 = start_seaweedfs(work / "s3", die_with_parent=True)
        nodes: list[Node] = []
        try:
            env = {**os.environ, **s3.env(), "CHUNKFS_META": redis.url,
                   "CHUNKFS_STORAGE": f"s3://{BUCKET}/warmstart"}
            env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
            run([chunkfs, "volume", "create", "ws", "--capacity", "100GiB"], env)
            writer = Node(work, "writer", env, chunkfs)
            nodes.append(writer)
            writer.mount("ws", None)
            names = write_files(writer.mp, args.files, args.file_size, args.seed)
            writer.umount()
            hot = random.Random(args.seed).sample(names, min(args.hot, len(names)))
            think = args.think_ms / 1000
            old = Node(work, "old", env, chunkfs)
            nodes.append(old)
            drop_page_cache()
            old.mount("ws", None)
            application(old, hot, args.file_size, args.duration, think, args.seed)
            old.umount()  # publishes the hot set
            results: dict[str, dict[str, Any]] = {}
            for case, options in (("without hot set (prefetch=0)", "prefetch=0"),
                                  ("with hot set", None)):
                node = Node(work, f"new{len(results)}", env, chunkfs)
                nodes.append(node)
                drop_page_cache()
                node.mount("ws", options)
                raw = application(node, hot, args.file_size, args.duration, think,
                                  args.seed + 1)
                node.umount()
                results[case] = summarise(raw, args.duration)
                print(f"{case}: done", file=sys.stderr)
        finally:
            for node in nodes:
                subprocess.run([chunkfs, "umount", str(node.mp)], env=env, capture_output=True,
                               check=False)
            s3.stop(timeout=5)
            redis.stop(timeout=5)
    print(f"{args.files} files of {format_size(args.file_size)}, the application reads "
          f"{len(hot)} of them ({format_size(len(hot) * args.file_size)}) with 4 KiB preads, "
          f"{args.think_ms} ms apart, for {args.duration:.0f} s after the mount\n")
    print_table(results)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
