"""The warm-start benchmark's arithmetic (bench/warmstart.py): windows, ratios, latency."""

from __future__ import annotations

from bench.warmstart import summarise


def test_hit_ratios_per_window_come_from_the_sampled_counters() -> None:
    timeline = [{"t": 5.0, "reads": 50, "hits": 0, "misses": 10, "gets": 10},
                {"t": 15.0, "reads": 150, "hits": 30, "misses": 20, "gets": 20}]
    raw = {"latencies": [(0.5, 0.050), (1.0, 0.001), (12.0, 0.002), (30.0, 0.001)],
           "timeline": timeline, "hits": 130, "misses": 20, "gets": 20,
           "warm": {"state": "off"}}
    out = summarise(raw, 60.0)
    assert out["hit_ratio_by_window"] == {"0-5s": 0.0, "5-15s": 0.75, "15-60s": 1.0}
    assert out["hit_ratio"] == round(130 / 150, 4)
    assert out["reads"] == 4 and out["slow_reads"] == 1
    assert out["p99_ms_first_10s"] == 50.0 and out["max_ms"] == 50.0
    assert out["s3_gets"] == 20


def test_a_short_window_reports_only_the_windows_it_covers() -> None:
    raw = {"latencies": [(0.1, 0.001)], "timeline": [], "hits": 3, "misses": 1, "gets": 1,
           "warm": {"state": "done", "prefetched": 2, "prefetched_bytes": 8, "planned": 2,
                    "seconds": 0.5}}
    out = summarise(raw, 10.0)
    # (no sample yet: a window counts from the last sample at or before its start)
    assert out["hit_ratio_by_window"] == {"0-5s": None, "5-10s": 0.75}
    assert out["prefetch"]["prefetched"] == 2
