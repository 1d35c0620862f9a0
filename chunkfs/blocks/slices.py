"""Slices: what a block map entry is since writes cost what they write.

A block (``block_size`` bytes of a file) is a list of slices, oldest first. A slice
says "these ``length`` bytes, from offset ``off`` of this source, sit at ``pos`` in the
block"; the block reads as zeros overlaid with every slice in order, newer ones on top.
A source is either an immutable, content-addressed object in S3 (``<sha256>_<size>``),
or, for small durable writes, an inline slice whose bytes live in Redis beside the
block map (``@<id>``, in ``cfs{ID}:y<ino>``) until a background move puts them in S3.

So a flush uploads (or stores inline) only the bytes written since the last flush and
appends their slices, a full block written sequentially is one slice of one object
(shared by content address between files, clones and snapshots), and concurrent
writers on several nodes append on top of each other instead of replacing the block.

A block's *extent* is the end of its furthest slice: what it charges to the volume
(holes before it included, as the valid length of a block always did).

Encoding (``chunkfs.meta.schema`` documents the key): the block's extent, ``|``, then
the slices joined by ``;``, each ``ref:off:length:pos`` (the extent up front lets the
COMMIT script append without reading the list). The Lua scripts (``chunkfs.meta.scripts``) implement the same
operations on the same encoding; ``tests/integration/test_slices_lua.py`` checks that
both agree on random lists.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

INLINE_PREFIX = "@"
ZERO = "0"  # the ref of a zero slice: reads as zeros, stores nothing
PRUNE_MIN = 64 * 1024  # an appended slice this large drops the older slices it covers


@dataclass(frozen=True, slots=True)
class Slice:
    ref: str      # "<sha256 hex>_<object size>" or "@<inline id>"
    off: int      # where the slice's bytes start in its source
    length: int
    pos: int      # where they go in the block

    @property
    def end(self) -> int:
        return self.pos + self.length

    @property
    def inline(self) -> bool:
        return self.ref.startswith(INLINE_PREFIX)

    @property
    def inline_id(self) -> str:
        return self.ref[1:]

    @property
    def digest(self) -> str:
        return split_object_ref(self.ref)[0]

    @property
    def object_size(self) -> int:
        return split_object_ref(self.ref)[1]

    def encode(self) -> str:
        return f"{self.ref}:{self.off}:{self.length}:{self.pos}"

    @classmethod
    def parse(cls, text: str) -> Slice:
        ref, off, length, pos = text.rsplit(":", 3)
        return cls(ref, int(off), int(length), int(pos))

    def clipped(self, keep: int) -> Slice | None:
        """This slice cut at ``keep`` bytes from the block's start (None: nothing left)."""
        if self.pos >= keep or self.length <= 0:
            return None
        if self.end <= keep:
            return self
        return Slice(self.ref, self.off, keep - self.pos, self.pos)


def object_ref(digest: str, size: int) -> str:
    return f"{digest}_{size}"


def split_object_ref(ref: str) -> tuple[str, int]:
    """(digest, object size) of an object ref; ValueError when it is none."""
    digest, _, size = ref.rpartition("_")
    return digest, int(size)


def parse(value: bytes | str | None) -> list[Slice]:
    if not value:
        return []
    text = value.decode() if isinstance(value, bytes) else value
    text = text.partition("|")[2] if "|" in text else text
    return [Slice.parse(part) for part in text.split(";") if part]


def encode(slices: Iterable[Slice]) -> str:
    slices = list(slices)
    if not slices:
        return ""
    return f"{extent(slices)}|" + ";".join(s.encode() for s in slices)


def extent(slices: Iterable[Slice]) -> int:
    return max((s.end for s in slices if s.length > 0), default=0)


def append(old: list[Slice], new: list[Slice]) -> list[Slice]:
    """``new`` on top of ``old``. A new slice of PRUNE_MIN bytes or more drops every older
    slice it covers entirely (it can never be read again); small ones are just appended,
    so that committing them costs what they are (merges clean up later). The Lua
    ``append_slices`` does exactly the same."""
    added = [s for s in new if s.length > 0]
    big = [n for n in added if n.length >= PRUNE_MIN]
    kept = [s for s in old if not any(n.pos <= s.pos and s.end <= n.end for n in big)]
    return kept + added


def trim(slices: list[Slice], keep: int) -> list[Slice]:
    """The block cut at ``keep`` bytes (a truncation through it)."""
    out = []
    for s in slices:
        c = s.clipped(keep)
        if c is not None:
            out.append(c)
    return out


def dropped(before: list[Slice], after: list[Slice]) -> list[Slice]:
    """Inline slices of ``before`` that ``after`` no longer references at all."""
    still = {s.ref for s in after}
    return [s for s in before if s.inline and s.ref not in still]


def objects(slices: Iterable[Slice]) -> set[str]:
    """The object refs of a list (neither inline nor zero slices)."""
    return {s.ref for s in slices if not s.inline and s.ref != ZERO}


def object_refs(value: bytes | str | None) -> Iterator[tuple[str, int]]:
    """(digest, size) of every object an encoded list names (what GC must keep)."""
    for ref in objects(parse(value)):
        yield split_object_ref(ref)


def from_legacy(entry: str) -> str:
    """A block entry of manifest format 1 ("<sha256>:<object size>:<valid length>", one
    object from the block's start) as a slice list."""
    digest, size, valid = entry.split(":")
    return encode([Slice(object_ref(digest, int(size)), 0, int(valid), 0)])


def pieces(slices: list[Slice], start: int, stop: int) -> Iterator[tuple[Slice, int, int]]:
    """The parts of ``[start, stop)`` each slice supplies, as ``(slice, from, to)`` block
    offsets, newest first, never overlapping: what a read must fetch, and nothing a newer
    slice hides."""
    uncovered = [(start, stop)]
    for s in reversed(slices):
        if not uncovered:
            return
        rest = []
        for a, b in uncovered:
            lo, hi = max(a, s.pos), min(b, s.end)
            if lo >= hi:
                rest.append((a, b))
                continue
            yield s, lo, hi
            if a < lo:
                rest.append((a, lo))
            if hi < b:
                rest.append((hi, b))
        uncovered = rest
