"""chunkfs.spill: GC's sets bigger than memory. Whatever order records come in and however
many runs they spill into, they read back sorted, complete and in bounded memory; the joins
GC's sweep is made of are exact."""

from __future__ import annotations

import os
import random

import pytest

from chunkfs import spill


def keys(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [f"blocks/{rng.getrandbits(128):032x}_{rng.randrange(1, 1 << 22)}" for _ in range(n)]


async def filled(ws: spill.Workspace, name: str, records: list[spill.Record]) -> spill.Spill:
    s = ws.spill(name)
    await s.add(records)
    await s.seal()
    return s


async def test_records_come_back_sorted_whatever_the_order_and_the_number_of_runs(tmp_path) -> None:
    records = [(k, i) for i, k in enumerate(keys(5000))]
    random.Random(2).shuffle(records)
    with spill.Workspace(str(tmp_path), batch=100, fan_in=4) as ws:
        s = await filled(ws, "x", records)
        assert s.peak_buffered <= 100  # never more than one batch in memory
        # 50 runs written, merged in tiers of 4: never 4 runs of one tier left open
        assert s.runs <= 3 * 3
        assert list(s.records()) == sorted(records)
        assert s.added == 5000


async def test_tiered_merging_rewrites_each_record_a_logarithmic_number_of_times(
        tmp_path, monkeypatch) -> None:
    written = 0
    real = spill._RunWriter.write  # noqa: SLF001 - counting the records written to disk

    def counting(self, record):
        nonlocal written
        written += 1
        return real(self, record)

    monkeypatch.setattr(spill._RunWriter, "write", counting)  # noqa: SLF001
    with spill.Workspace(str(tmp_path), batch=10, fan_in=4) as ws:
        s = await filled(ws, "x", [(k, 0) for k in keys(2560)])  # 256 runs = 4 ** 4
        assert s.runs == 1
        # written once, then merged through 4 tiers: 5 writes per record (all-into-one
        # merging each time the fan-in is exceeded would write about 30 per record)
        assert written == 2560 * 5
        assert [k for k, _ in s.records()] == sorted(keys(2560))


async def test_a_workspace_is_private_and_leaves_nothing_behind(tmp_path) -> None:
    with spill.Workspace(str(tmp_path), batch=10) as ws:
        s = await filled(ws, "x", [(k, 0) for k in keys(100)])
        await filled(ws, "y", [(k, 0) for k in keys(10)])
        assert os.stat(ws.path).st_mode & 0o077 == 0
        both = ws.measure_disk()
        s.discard()  # a set no longer needed gives its disk back at once
        assert 0 < ws.measure_disk() < both and ws.peak_disk_bytes == both
        assert list(s.records()) == []
    assert os.listdir(tmp_path) == []


async def test_any_key_survives_the_file_format(tmp_path) -> None:
    """S3 keys may hold any character, newlines included; values are 64-bit."""
    odd = ["blocks/a\nb", "blocks/\t", "blocks/ä€😀", "blocks/", "blocks/a", "blocks/a\x00"]
    records = [(k, (1 << 64) - 1 - i) for i, k in enumerate(odd)]
    with spill.Workspace(str(tmp_path), batch=2) as ws:
        s = await filled(ws, "x", records)
        assert list(s.records()) == sorted(records)


async def test_batches_read_in_order_and_an_unsealed_spill_refuses_to_be_read(tmp_path) -> None:
    with spill.Workspace(str(tmp_path), batch=7) as ws:
        s = ws.spill("x")
        await s.add_keys(sorted(keys(50)), 3)
        if s._buffer:  # noqa: SLF001 - 50 is not a multiple of 7: some are still buffered
            with pytest.raises(RuntimeError, match="not sealed"):
                s.records()
        await s.seal()
        got = [r async for batch in s.batches(8) for r in batch]
        assert got == [(k, 3) for k in sorted(keys(50))]


async def test_a_writer_appends_a_run_in_key_order_only(tmp_path) -> None:
    with spill.Workspace(str(tmp_path)) as ws:
        s = ws.spill("x")
        with s.writer() as out:
            out.write(("a", 1))
            out.write(("b", 2))
            with pytest.raises(ValueError, match="key order"):
                out.write(("a", 3))
        assert list(s.records()) == [("a", 1), ("b", 2)] and s.added == 2


def test_distinct_combines_the_values_of_duplicates() -> None:
    records = [("a", 3), ("a", 1), ("b", 5), ("c", 2), ("c", 2)]
    assert list(spill.distinct(records)) == [("a", 1), ("b", 5), ("c", 2)]
    assert list(spill.distinct(records, max)) == [("a", 3), ("b", 5), ("c", 2)]
    assert list(spill.distinct([])) == []


def test_join_is_a_full_outer_join_of_sorted_streams() -> None:
    rng = random.Random(3)
    universe = keys(2000, seed=4)
    left = {k: rng.randrange(100) for k in universe if rng.random() < 0.6}
    right = {k: rng.randrange(100) for k in universe if rng.random() < 0.5}
    joined = list(spill.join(sorted(left.items()), sorted(right.items())))
    assert [k for k, _, _ in joined] == sorted(set(left) | set(right))
    assert all(lv == left.get(k) and rv == right.get(k) for k, lv, rv in joined)
    assert list(spill.join([], [("a", 1)])) == [("a", None, 1)]


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        spill.Workspace(batch=0)
    with pytest.raises(ValueError):
        spill.Workspace(fan_in=1)


async def test_a_set_spill_keeps_each_key_once_per_run_whatever_the_repeats(tmp_path) -> None:
    """Every snapshot of a volume marks the same blocks: a key marked a hundred times
    costs disk once per tier, not a hundred times."""
    universe = keys(200)
    with spill.Workspace(str(tmp_path), batch=100, fan_in=4) as ws:
        s = ws.spill("marks", min)
        for copy in range(100):
            await s.add_keys(universe, copy % 2)
        await s.seal()
        assert list(spill.distinct(s.records())) == sorted((k, 0) for k in universe)
        stored = len(list(s.records()))  # each run holds a key at most once
        assert stored <= 200 * s.runs and s.runs <= 3 * 3 and stored < 20_000 / 10
