"""The benchmark workloads: plain POSIX I/O (os.*), the same code for every filesystem.

Each workload runs in its own child process so that the orchestrator's threads, event
loops and S3 clients never share a core's time slice with the measured loop:

    python -m bench.workloads '{"op": "seqwrite", "path": ..., "size": ..., ...}'

(the application workloads, bench.apps, run the same way).

prints one JSON document (the result) on stdout. Only the measured loop is timed; data
generation, verification set-up and cache dropping are outside the timed region.

Data: a 64 MiB buffer of pseudo-random bytes from ``random.Random(seed)`` (incompressible,
reproducible by the reader so that it can verify what it reads). Each 1 MiB chunk ``i``
of a large file is that buffer's chunk ``i % 64`` with its first 16 bytes replaced by
``(salt, i)``; each 4 KiB small file ``i`` is a 4 KiB slice with the same header. So no
two 4 MiB blocks (and no two small files) are identical and a deduplicating filesystem
gets no free ride.
"""

from __future__ import annotations

import json
import os
import random
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

MiB = 1 << 20
KiB = 1 << 10
BASE_SIZE = 64 * MiB
HEADER = struct.Struct("<QQ")  # (salt, index)
CHECK_TAIL = 256  # bytes at the end of every 1 MiB chunk verified by sequential reads


def drop_caches() -> None:
    """Write back dirty pages, then drop the page cache, dentries and inodes (root only)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


class Pattern:
    """The reproducible, non-repeating content of the benchmark files."""

    def __init__(self, seed: int, salt: int) -> None:
        self.base = bytearray(random.Random(seed).randbytes(BASE_SIZE))
        self.view = memoryview(self.base)
        self.salt = salt

    def header(self, index: int) -> bytes:
        return HEADER.pack(self.salt, index)

    def chunk(self, index: int) -> memoryview:
        """1 MiB chunk ``index`` of a large file (valid until chunk index+64 is built)."""
        off = (index % (BASE_SIZE // MiB)) * MiB
        HEADER.pack_into(self.base, off, self.salt, index)
        return self.view[off : off + MiB]

    def expect(self, offset: int, length: int) -> bytes:
        """The bytes of a large file at [offset, offset+length) within one 1 MiB chunk."""
        index, r = divmod(offset, MiB)
        assert r + length <= MiB
        return bytes(self.chunk(index)[r : r + length])

    def small(self, index: int, size: int = 4 * KiB) -> memoryview:
        """Content of small file ``index`` (``size`` bytes)."""
        off = (index * size) % BASE_SIZE
        HEADER.pack_into(self.base, off, self.salt, index)
        return self.view[off : off + size]


def write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _read_full(fd: int, buf: bytearray) -> int:
    """Fill buf from fd; returns the number of bytes read (short only at EOF)."""
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = os.readv(fd, [view[got:]])
        if n == 0:
            break
        got += n
    return got


def _rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


# --------------------------------------------------------------------------- large file


def seqwrite(path: str, size: int, seed: int, salt: int, **_: Any) -> dict[str, Any]:
    """Write ``size`` bytes in 1 MiB write() calls, fsync, close; MiB/s over all three."""
    pat = Pattern(seed, salt)
    chunks = size // MiB
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(chunks):
            write_all(fd, pat.chunk(i))
        t1 = time.perf_counter()
        os.fsync(fd)
        t2 = time.perf_counter()
    finally:
        os.close(fd)
    t3 = time.perf_counter()
    total = t3 - t0
    return {
        "bytes": chunks * MiB, "seconds": total, "mib_s": _rate(chunks, total),
        "write_s": t1 - t0, "fsync_s": t2 - t1, "close_s": t3 - t2,
    }  # fmt: skip


def seqread(path: str, size: int, seed: int, salt: int, **_: Any) -> dict[str, Any]:
    """Read the file in 1 MiB read() calls; verifies each chunk's header and tail."""
    pat = Pattern(seed, salt)
    chunks = size // MiB
    # Expected tails, built before timing (the header is checked against (salt, i)).
    tails = [bytes(pat.view[o + MiB - CHECK_TAIL : o + MiB]) for o in range(0, BASE_SIZE, MiB)]
    buf = bytearray(MiB)
    bad: list[int] = []
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        first_byte_s = None
        for i in range(chunks):
            n = _read_full(fd, buf)
            if first_byte_s is None:
                first_byte_s = time.perf_counter() - t0
            if n != MiB:
                raise RuntimeError(f"short read at chunk {i}: {n} bytes")
            if HEADER.unpack_from(buf, 0) != (salt, i) or buf[-CHECK_TAIL:] != tails[i % 64]:
                bad.append(i)
    finally:
        os.close(fd)
    total = time.perf_counter() - t0
    if bad:
        raise RuntimeError(f"{len(bad)} chunks read back wrong (first: chunk {bad[0]})")
    return {
        "bytes": chunks * MiB,
        "seconds": total,
        "mib_s": _rate(chunks, total),
        "first_chunk_s": first_byte_s,
        "verified": True,
    }


def randread(
    path: str, size: int, seed: int, salt: int, count: int, rseed: int = 7, io_size: int = 4 * KiB, **_: Any
) -> dict[str, Any]:
    """``count`` pread()s of 4 KiB at random 4 KiB-aligned offsets; IOPS and latencies."""
    pat = Pattern(seed, salt)
    rng = random.Random(rseed)
    offsets = [rng.randrange(size // io_size) * io_size for _ in range(count)]
    expected = [pat.expect(o, io_size) for o in offsets]
    lat = [0] * count
    fd = os.open(path, os.O_RDONLY)
    try:
        clock = time.perf_counter_ns
        t0 = clock()
        for k, off in enumerate(offsets):
            s = clock()
            data = os.pread(fd, io_size, off)
            lat[k] = clock() - s
            if data != expected[k]:
                raise RuntimeError(f"wrong data at offset {off}")
        total = (clock() - t0) / 1e9
    finally:
        os.close(fd)
    lat.sort()
    return {
        "ops": count, "seconds": total, "iops": _rate(count, total),
        "p50_ms": lat[count // 2] / 1e6, "p99_ms": lat[min(count - 1, int(count * 0.99))] / 1e6,
        "max_ms": lat[-1] / 1e6, "verified": True,
    }  # fmt: skip


# --------------------------------------------------------------------------- small files


def _names(directory: str, n: int) -> list[str]:
    return [os.path.join(directory, f"f{i:06d}") for i in range(n)]


def timed(n: int, fn: Callable[[], None]) -> dict[str, Any]:
    t0 = time.perf_counter()
    fn()
    total = time.perf_counter() - t0
    return {"ops": n, "seconds": total, "ops_s": _rate(n, total)}


def small(
    phase: str, directory: str, n: int, seed: int, salt: int, size: int = 4 * KiB, **_: Any
) -> dict[str, Any]:
    """One phase over ``n`` small files: create (open O_CREAT|O_EXCL, write, close), stat,
    read (open, read, close; verified) or delete (unlink)."""
    names = _names(directory, n)
    if phase == "create":
        os.makedirs(directory, exist_ok=True)
        pat = Pattern(seed, salt)

        def run() -> None:
            for i, p in enumerate(names):
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    write_all(fd, pat.small(i, size))
                finally:
                    os.close(fd)

        return timed(n, run)
    if phase == "stat":

        def run() -> None:
            for p in names:
                if os.stat(p).st_size != size:
                    raise RuntimeError(f"{p}: wrong size")

        return timed(n, run)
    if phase == "read":
        pat = Pattern(seed, salt)
        expected = [bytes(pat.small(i, size)) for i in range(n)]

        def run() -> None:
            for i, p in enumerate(names):
                fd = os.open(p, os.O_RDONLY)
                try:
                    data = os.read(fd, size + 1)
                finally:
                    os.close(fd)
                if data != expected[i]:
                    raise RuntimeError(f"{p}: wrong content")

        return timed(n, run)
    if phase == "delete":

        def run() -> None:
            for p in names:
                os.unlink(p)

        res = timed(n, run)
        os.rmdir(directory)
        return res
    raise ValueError(f"unknown small-file phase {phase!r}")


# --------------------------------------------------------------------------- metadata


def meta(directory: str, n: int, drop: bool = True, **_: Any) -> dict[str, Any]:
    """mkdir n dirs, rename each, stat each, readdir each (and the parent once), rmdir
    each; ops/s per phase and overall. Caches are dropped (untimed) before stat/readdir
    so that they reach the filesystem instead of the kernel's dentry/attr caches."""
    os.makedirs(directory, exist_ok=True)
    a = [os.path.join(directory, f"d{i:06d}") for i in range(n)]
    b = [os.path.join(directory, f"r{i:06d}") for i in range(n)]
    out: dict[str, Any] = {}

    def mkdir() -> None:
        for p in a:
            os.mkdir(p)

    def rename() -> None:
        for src, dst in zip(a, b, strict=True):
            os.rename(src, dst)

    def stat() -> None:
        for p in b:
            os.stat(p)

    def readdir() -> None:
        for p in b:
            if os.listdir(p):
                raise RuntimeError(f"{p} is not empty")

    def rmdir() -> None:
        for p in b:
            os.rmdir(p)

    out["mkdir"] = timed(n, mkdir)
    out["rename"] = timed(n, rename)
    if drop:
        drop_caches()
    out["stat"] = timed(n, stat)
    if drop:
        drop_caches()
    out["readdir"] = timed(n, readdir)
    t0 = time.perf_counter()
    listing = os.listdir(directory)
    out["list_parent"] = {"entries": len(listing), "seconds": time.perf_counter() - t0}
    if sorted(listing) != [os.path.basename(p) for p in b]:
        raise RuntimeError(f"listing of {directory} is wrong ({len(listing)} entries)")
    out["rmdir"] = timed(n, rmdir)
    os.rmdir(directory)
    ops = sum(out[k]["ops"] for k in ("mkdir", "rename", "stat", "readdir", "rmdir"))
    secs = sum(out[k]["seconds"] for k in ("mkdir", "rename", "stat", "readdir", "rmdir"))
    out["total"] = {"ops": ops, "seconds": secs, "ops_s": _rate(ops, secs)}
    return out


OPS: dict[str, Callable[..., dict[str, Any]]] = {
    "seqwrite": seqwrite,
    "seqread": seqread,
    "randread": randread,
    "small": small,
    "meta": meta,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.workloads '<json spec>'", file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    op = spec.pop("op")
    from bench.apps import OPS as APP_OPS  # apps builds on this module's helpers

    ops = {**OPS, **APP_OPS}
    if op not in ops:
        print(f"unknown workload {op!r} (known: {', '.join(sorted(ops))})", file=sys.stderr)
        return 2
    result = ops[op](**spec)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
