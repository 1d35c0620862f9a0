"""Sorted sets of object keys that spill to local disk, so that GC's memory stays bounded.

A GC run compares sets as big as the bucket: every object listed (with its size), every
object that a block map, a manifest or an upload names. Held in a Python set or dict a
key costs about 200 bytes, so a bucket of ten million objects would need gigabytes of
controller memory. Here a set is a ``Spill``: records are buffered up to ``batch``,
each full buffer is sorted and written as a *run* to a private temporary directory, and
reading merges the runs (k-way, ``heapq.merge``). Whatever the set holds, its memory is
one buffer plus one read buffer per run. Runs are merged in tiers: ``fan_in`` runs of one
tier become one run of the next, so each record is rewritten about log_fan_in(n / batch)
times and at most ``fan_in - 1`` runs per tier are open at once. Disk use is about 100
bytes per record.

A record is ``(key, value)``: an object key and an int (a size, or what marked the key).
A spill made with ``combine`` is a set: each run it writes holds a key once, so a key
marked by every snapshot of a volume costs disk once per tier, not once per mark.
Keys compare as Python strings, by code point, which is the order of their UTF-8 bytes
and so S3 ListObjectsV2's order: a listing arrives sorted, its buffers sort in linear
time and its runs follow each other. Nothing here depends on that.

A run file, private to one process and deleted with its ``Workspace``:
``u16 key length | key (UTF-8) | u64 value`` (big-endian), repeated, in key order.
Sorting, writing and merging are blocking file work: the async methods run them in a
worker thread, never on the event loop; the plain iterators (``records``, ``join``) are
for code that already runs in one.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import os
import shutil
import struct
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import BinaryIO

Record = tuple[str, int]

BATCH = 50_000       # records buffered in memory before they are written as a run
FAN_IN = 32          # runs merged at once; more are first merged into one
_READ_BUFFER = 128 * 1024
_HEAD = struct.Struct(">H")
_VALUE = struct.Struct(">Q")


class Workspace:
    """A private temporary directory for the spills of one GC run, removed at the end."""

    def __init__(self, parent: str | None = None, *, batch: int = BATCH,
                 fan_in: int = FAN_IN) -> None:
        if batch < 1 or fan_in < 2:
            raise ValueError("a spill needs batch >= 1 and fan_in >= 2")
        self.parent = parent
        self.batch = batch
        self.fan_in = fan_in
        self.path = ""
        self.peak_disk_bytes = 0
        self._spills: list[Spill] = []

    def __enter__(self) -> Workspace:
        self.path = tempfile.mkdtemp(prefix="chunkfs-gc-", dir=self.parent)  # mode 0700
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def spill(self, name: str, combine: Callable[[int, int], int] | None = None) -> Spill:
        """A new spill; with ``combine``, a set: duplicate keys are collapsed (their values
        combined) whenever a run is written, so repeats cost no disk."""
        spill = Spill(os.path.join(self.path, name), self.batch, self.fan_in, combine)
        self._spills.append(spill)
        return spill

    def measure_disk(self) -> int:
        """What the spills take on disk now; ``peak_disk_bytes``: the most measured."""
        now = sum(s.disk_bytes() for s in self._spills)
        self.peak_disk_bytes = max(self.peak_disk_bytes, now)
        return now


class Spill:
    """A multiset of records, added in any order, read back sorted by key."""

    def __init__(self, stem: str, batch: int, fan_in: int,
                 combine: Callable[[int, int], int] | None = None) -> None:
        self.stem = stem
        self.batch = batch
        self.fan_in = fan_in
        self.combine = combine
        self.added = 0
        self.peak_buffered = 0   # the most records ever held in memory at once
        self._buffer: list[Record] = []
        self._runs: list[str] = []
        self._tiers: dict[str, int] = {}  # run -> tier (0: written from a buffer)
        self._bounds: dict[str, tuple[str, str]] = {}  # run -> its first and last key
        self._names = itertools.count()

    @property
    def runs(self) -> int:
        return len(self._runs)

    async def add(self, records: Iterable[Record]) -> None:
        for record in records:
            self._buffer.append(record)
            if len(self._buffer) >= self.batch:
                await self._flush()
        self.peak_buffered = max(self.peak_buffered, len(self._buffer))

    async def add_keys(self, keys: Iterable[str], value: int = 0) -> None:
        await self.add((key, value) for key in keys)

    async def seal(self) -> None:
        """Write what is still buffered: after this, ``records`` sees everything."""
        if self._buffer:
            await self._flush()

    async def _flush(self) -> None:
        buffer, self._buffer = self._buffer, []
        self.added += len(buffer)
        self.peak_buffered = max(self.peak_buffered, len(buffer))
        path = self._path()
        bounds = await asyncio.to_thread(_write_sorted, path, buffer, self.combine)
        self._add_run(path, 0, bounds)
        await asyncio.to_thread(self._compact)

    def _path(self) -> str:
        return f"{self.stem}.{next(self._names)}"

    def _add_run(self, path: str, tier: int, bounds: tuple[str, str] | None = None) -> None:
        self._runs.append(path)
        self._tiers[path] = tier
        if bounds is not None:
            self._bounds[path] = bounds

    def _compact(self) -> None:
        """While some tier has ``fan_in`` runs, merge them into one run of the next tier."""
        while True:
            tiers: dict[int, list[str]] = {}
            for path in self._runs:
                tiers.setdefault(self._tiers[path], []).append(path)
            full = [(tier, runs) for tier, runs in tiers.items() if len(runs) >= self.fan_in]
            if not full:
                return
            tier, runs = min(full)
            merged = self._path()
            records = self._merge(runs)
            with _RunWriter(merged) as out:
                for record in distinct(records, self.combine) if self.combine else records:
                    out.write(record)
            for path in runs:
                os.unlink(path)
                self._runs.remove(path)
                del self._tiers[path]
                self._bounds.pop(path, None)
            self._add_run(merged, tier + 1, out.bounds())

    def _merge(self, paths: list[str]) -> Iterator[Record]:
        """The records of ``paths`` in key order: runs whose key ranges follow each other
        (a sorted listing's) are read one after the other, others through a heap."""
        if all(p in self._bounds for p in paths):
            ordered = sorted(paths, key=lambda p: self._bounds[p])
            if all(self._bounds[a][1] <= self._bounds[b][0]
                   for a, b in itertools.pairwise(ordered)):
                return itertools.chain.from_iterable(_read(p) for p in ordered)
        if len(paths) == 1:
            return _read(paths[0])
        return heapq.merge(*(_read(p) for p in paths))

    def records(self) -> Iterator[Record]:
        """Every sealed record in key order, duplicates included (blocking: in a thread)."""
        if self._buffer:
            raise RuntimeError("records() of a spill that is not sealed")
        return self._merge(self._runs)

    def writer(self) -> _RunWriter:
        """Append records that come in key order straight into one new run (blocking)."""
        path = self._path()
        self._add_run(path, 0)
        return _RunWriter(path, self)

    async def batches(self, size: int = 1000) -> AsyncIterator[list[Record]]:
        """The sealed records in key order, ``size`` at a time, read in a worker thread."""
        it = self.records()
        try:
            while batch := await asyncio.to_thread(lambda: list(itertools.islice(it, size))):
                yield batch
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                await asyncio.to_thread(close)

    def discard(self) -> None:
        """Delete the runs now (disk space back before the workspace ends)."""
        for path in self._runs:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._runs, self._tiers, self._bounds, self._buffer = [], {}, {}, []

    def disk_bytes(self) -> int:
        total = 0
        for path in self._runs:
            with contextlib.suppress(FileNotFoundError):
                total += os.path.getsize(path)
        return total


class _RunWriter:
    def __init__(self, path: str, spill: Spill | None = None) -> None:
        self.path = path
        self.spill = spill
        self.count = 0
        self.first: str | None = None
        self.last: str | None = None
        self._pending = bytearray()
        self._file: BinaryIO = open(path, "wb", buffering=0)  # noqa: SIM115 - closed in __exit__

    def write(self, record: Record) -> None:
        key, value = record
        if self.last is not None and key < self.last:
            raise ValueError("records written to a run must come in key order")
        data = key.encode()
        self._pending += _HEAD.pack(len(data))
        self._pending += data
        self._pending += _VALUE.pack(value)
        if len(self._pending) >= _READ_BUFFER:
            self._file.write(self._pending)
            self._pending.clear()
        if self.first is None:
            self.first = key
        self.last = key
        self.count += 1

    def bounds(self) -> tuple[str, str] | None:
        return None if self.first is None or self.last is None else (self.first, self.last)

    def __enter__(self) -> _RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._pending:
                self._file.write(self._pending)
        finally:
            self._file.close()
        if self.spill is not None:
            self.spill.added += self.count
            bounds = self.bounds()
            if bounds is not None:
                self.spill._bounds[self.path] = bounds  # noqa: SLF001 - its own spill


def _write_sorted(path: str, records: list[Record],
                  combine: Callable[[int, int], int] | None = None) -> tuple[str, str] | None:
    records.sort()
    with _RunWriter(path) as out:
        for record in distinct(records, combine) if combine else records:
            out.write(record)
    return out.bounds()


def _read(path: str) -> Iterator[Record]:
    """A run's records, parsed a buffer (``_READ_BUFFER``) at a time."""
    head, value_at = _HEAD.unpack_from, _VALUE.unpack_from
    with open(path, "rb", buffering=0) as f:
        buf = b""
        while chunk := f.read(_READ_BUFFER):
            buf = buf + chunk if buf else chunk
            pos, end = 0, len(buf)
            while pos + 2 <= end:
                (length,) = head(buf, pos)
                stop = pos + 10 + length
                if stop > end:
                    break
                yield buf[pos + 2:pos + 2 + length].decode(), value_at(buf, pos + 2 + length)[0]
                pos = stop
            buf = buf[pos:]
        if buf:
            raise ValueError(f"{path}: a truncated record at its end")


def distinct(records: Iterable[Record], combine: Callable[[int, int], int] = min,
             ) -> Iterator[Record]:
    """Sorted records with each key once, the values of its duplicates ``combine``d."""
    key: str | None = None
    value = 0
    for k, v in records:
        if k == key:
            value = combine(value, v)
            continue
        if key is not None:
            yield key, value
        key, value = k, v
    if key is not None:
        yield key, value


def join(left: Iterable[Record], right: Iterable[Record],
         ) -> Iterator[tuple[str, int | None, int | None]]:
    """Full outer join of two sorted streams of distinct keys: ``(key, left value or
    None, right value or None)`` for every key of either, in key order."""
    lit, rit = iter(left), iter(right)
    lrec, rrec = next(lit, None), next(rit, None)
    while lrec is not None or rrec is not None:
        if rrec is None or (lrec is not None and lrec[0] < rrec[0]):
            assert lrec is not None
            yield lrec[0], lrec[1], None
            lrec = next(lit, None)
        elif lrec is None or rrec[0] < lrec[0]:
            yield rrec[0], None, rrec[1]
            rrec = next(rit, None)
        else:
            yield lrec[0], lrec[1], rrec[1]
            lrec, rrec = next(lit, None), next(rit, None)
