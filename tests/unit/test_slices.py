"""Slices and sparse write buffers against a byte-for-byte model (seeded random runs)."""

from __future__ import annotations

import random

import pytest

from chunkfs.blocks import slices as sl
from chunkfs.blocks.slices import Slice
from chunkfs.blocks.sparse import Sparse

BS = 64 * 1024


def render(slices: list[Slice], sources: dict[str, bytes], size: int = BS) -> bytes:
    """The block as the definition says: zeros, then every slice in order."""
    out = bytearray(size)
    for s in slices:
        src = bytes(s.length) if s.ref == sl.ZERO else sources[s.ref][s.off:s.off + s.length]
        out[s.pos:s.end] = src
    return bytes(out)


def random_slice(rng: random.Random, sources: dict[str, bytes], n: int) -> Slice:
    ref = f"{n:064x}_{BS}"
    sources[ref] = rng.randbytes(BS)
    pos = rng.randrange(BS)
    length = rng.randint(1, BS - pos)
    return Slice(rng.choice([ref, sl.ZERO]) if rng.random() < 0.1 else ref,
                 rng.randrange(BS - length + 1), length, pos)


@pytest.mark.parametrize("seed", range(40))
def test_append_trim_and_pieces_keep_what_the_block_reads(seed: int) -> None:
    rng = random.Random(seed)
    sources: dict[str, bytes] = {}
    block: list[Slice] = []
    n = 0
    for _ in range(30):
        before = render(block, sources)
        if rng.random() < 0.2:
            keep = rng.randrange(BS + 1)
            block = sl.trim(block, keep)
            assert render(block, sources) == before[:keep] + bytes(BS - keep)
            assert all(s.end <= keep for s in block)
            continue
        new = []
        for _ in range(rng.randint(1, 3)):
            n += 1
            new.append(random_slice(rng, sources, n))
        expected = render(block + new, sources)
        block = sl.append(block, new)
        assert render(block, sources) == expected  # pruning never changes what is read
        assert sl.parse(sl.encode(block)) == block
        a = rng.randrange(BS)
        b = rng.randint(a + 1, BS)
        assembled = bytearray(b - a)
        for s, lo, hi in sl.pieces(block, a, b):
            src = bytes(hi - lo) if s.ref == sl.ZERO else \
                sources[s.ref][s.off + lo - s.pos:s.off + hi - s.pos]
            assembled[lo - a:hi - a] = src
        assert bytes(assembled) == expected[a:b]
    assert sl.extent(block) == max((s.end for s in block), default=0)


def test_a_large_slice_drops_the_older_ones_it_covers_small_ones_are_appended() -> None:
    big = sl.PRUNE_MIN
    old = [Slice("a_9", 0, 10, 0), Slice("b_9", 0, 5, 20), Slice("c_9", 0, 10, big + 30)]
    assert sl.append(old, [Slice("d_9", 0, big, 0)]) == [Slice("c_9", 0, 10, big + 30),
                                                        Slice("d_9", 0, big, 0)]
    assert sl.append(old, [Slice("e_9", 0, 30, 0)]) == [*old, Slice("e_9", 0, 30, 0)]
    inline = [Slice("@x", 0, 5, 0)]
    assert sl.dropped(inline, sl.append(inline, [Slice("d_9", 0, big, 0)])) == inline


def test_the_encoding_carries_the_extent() -> None:
    block = [Slice("a_9", 0, 10, 100), Slice("@x", 0, 5, 20)]
    assert sl.encode(block) == "110|a_9:0:10:100;@x:0:5:20"
    assert sl.parse(sl.encode(block)) == block
    assert sl.encode([]) == ""


def test_legacy_entries_become_one_slice() -> None:
    assert sl.parse(sl.from_legacy("ab" * 32 + ":4194304:100")) == [
        Slice("ab" * 32 + "_4194304", 0, 100, 0)]


@pytest.mark.parametrize("seed", range(40))
def test_sparse_buffers_hold_exactly_what_was_written(seed: int) -> None:
    rng = random.Random(seed)
    sparse = Sparse()
    model = bytearray(BS)
    written = bytearray(BS)  # 1 where a byte was written
    for _ in range(60):
        if rng.random() < 0.1:
            keep = rng.randrange(BS + 1)
            freed = sparse.trim(keep)
            assert freed == sum(written[keep:])
            written[keep:] = bytes(BS - keep)
            model[keep:] = bytes(BS - keep)
        else:
            pos = rng.randrange(BS)
            if rng.random() < 0.5 and sparse.end < BS:  # appends, the common case
                pos = sparse.end
            data = rng.randbytes(rng.randint(1, min(4096, BS - pos)))
            grew = sparse.write(pos, data)
            fresh = len(data) - sum(written[pos:pos + len(data)])
            assert grew >= fresh  # a merge may pull in the gap between two intervals
            model[pos:pos + len(data)] = data
            written[pos:pos + len(data)] = b"\x01" * len(data)
        # intervals are disjoint, sorted, and hold the model's bytes
        prev_end = -1
        for s, b in sparse.intervals():
            assert s > prev_end and len(b) > 0
            prev_end = s + len(b)
            assert bytes(b) == bytes(model[s:s + len(b)])
        assert sparse.nbytes >= sum(written)
        a = rng.randrange(BS)
        b = rng.randint(a + 1, BS)
        out = bytearray(b - a)
        holes = sparse.overlay(out, a, b)
        for lo, hi in holes:
            assert not any(written[lo:hi]) or all(
                not (s <= lo < s + len(buf)) for s, buf in sparse.intervals())
        covered = bytearray(b - a)
        for lo, hi in holes:
            covered[lo - a:hi - a] = b"\x01" * (hi - lo)
        for i in range(a, b):
            if not covered[i - a]:
                assert out[i - a] == model[i]
