"""The bytes written into one block since it was last frozen: disjoint, sorted intervals.

Writes never read the block's old content: what was not written stays whatever the
slices underneath say (``chunkfs.blocks.slices``). So a 4 KiB write into a 4 MiB block
buffers 4 KiB, and a sequential writer extends one interval in place.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator


class Sparse:
    __slots__ = ("starts", "bufs")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.bufs: list[bytearray] = []

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.bufs)

    @property
    def end(self) -> int:
        return self.starts[-1] + len(self.bufs[-1]) if self.starts else 0

    def intervals(self) -> Iterator[tuple[int, bytearray]]:
        return zip(self.starts, self.bufs, strict=True)

    def covers(self, start: int, stop: int) -> bool:
        """Is ``[start, stop)`` written entirely (one interval holds it)?"""
        i = bisect.bisect_right(self.starts, start) - 1
        return i >= 0 and self.starts[i] + len(self.bufs[i]) >= stop

    def write(self, pos: int, data: bytes | bytearray | memoryview) -> int:
        """Put ``data`` at ``pos``; returns how many bytes the buffer grew by."""
        end = pos + len(data)
        # the intervals this write touches or extends: from the last one starting at or
        # before ``pos`` (if it reaches ``pos``) to the last one starting at or before ``end``
        lo = bisect.bisect_right(self.starts, pos) - 1
        if lo < 0 or self.starts[lo] + len(self.bufs[lo]) < pos:
            lo += 1
        hi = bisect.bisect_right(self.starts, end)
        if lo == hi:  # touches nothing: a new interval
            self.starts.insert(lo, pos)
            self.bufs.insert(lo, bytearray(data))
            return len(data)
        first, last = self.starts[lo], self.starts[hi - 1] + len(self.bufs[hi - 1])
        before = sum(len(b) for b in self.bufs[lo:hi])
        if hi - lo == 1 and first <= pos:  # the common case: within or extending one interval
            buf = self.bufs[lo]
            if end > first + len(buf):
                buf.extend(bytes(end - first - len(buf)))
            buf[pos - first:end - first] = data
            return len(buf) - before
        start, stop = min(first, pos), max(last, end)
        merged = bytearray(stop - start)
        for s, b in zip(self.starts[lo:hi], self.bufs[lo:hi], strict=True):
            merged[s - start:s - start + len(b)] = b
        merged[pos - start:end - start] = data
        self.starts[lo:hi] = [start]
        self.bufs[lo:hi] = [merged]
        return len(merged) - before

    def overlay(self, out: bytearray, start: int, stop: int) -> list[tuple[int, int]]:
        """Copy what this buffer holds of ``[start, stop)`` into ``out`` (which maps
        ``start``); returns the parts of the range it does not hold."""
        uncovered, at = [], start
        i = max(0, bisect.bisect_right(self.starts, start) - 1)
        while i < len(self.starts) and at < stop:
            s, b = self.starts[i], self.bufs[i]
            e = s + len(b)
            if e <= at:
                i += 1
                continue
            if s >= stop:
                break
            if s > at:
                uncovered.append((at, s))
                at = s
            hi = min(e, stop)
            out[at - start:hi - start] = b[at - s:hi - s]
            at = hi
            i += 1
        if at < stop:
            uncovered.append((at, stop))
        return uncovered

    def trim(self, keep: int) -> int:
        """Cut everything at or past ``keep``; returns the bytes freed."""
        freed = 0
        while self.starts and self.starts[-1] >= keep:
            self.starts.pop()
            freed += len(self.bufs.pop())
        if self.starts and self.starts[-1] + len(self.bufs[-1]) > keep:
            cut = keep - self.starts[-1]
            freed += len(self.bufs[-1]) - cut
            del self.bufs[-1][cut:]
        return freed
