"""The figures a mount's status is made of: latencies (mean, recent, max, cumulative
bounds, last error), the age of data not yet durable, and the GC run record."""

from __future__ import annotations

from chunkfs.latency import BOUNDS_MS, Latency
from chunkfs.meta.schema import GcRun
from chunkfs.mountstatus import DirtyClock


def test_latency_counts_every_request_under_its_bound_cumulatively() -> None:
    lat = Latency()
    for ms, at in ((0.5, 0), (3, 1), (3, 2), (70, 3), (9000, 4)):
        lat.observe(ms / 1000, now=at)
    doc = lat.as_dict()
    assert doc["le_ms"] == {"1": 1, "5": 3, "10": 3, "50": 3, "100": 4, "500": 4, "1000": 4,
                            "5000": 4, "inf": 5}
    assert list(doc["le_ms"])[:-1] == [str(b) for b in BOUNDS_MS]
    assert doc["max_ms"] == 9000 and doc["avg_ms"] == round((0.5 + 6 + 70 + 9000) / 5, 3)


def test_the_recent_mean_follows_a_slow_minute_that_the_mean_since_start_hides() -> None:
    lat = Latency()
    for i in range(10_000):  # a day of fast requests
        lat.observe(0.001, now=i * 8.0)
    for i in range(60):  # then a slow minute
        lat.observe(0.2, now=80_000 + i)
    doc = lat.as_dict()
    assert doc["avg_ms"] < 3
    assert doc["recent_ms"] > 100


def test_a_burst_within_one_instant_still_moves_the_recent_mean() -> None:
    lat = Latency()
    lat.observe(0.001, now=0)
    for _ in range(500):
        lat.observe(0.1, now=0)
    assert lat.as_dict()["recent_ms"] > 90


def test_the_last_error_is_kept_short_and_stamped() -> None:
    lat = Latency()
    assert lat.as_dict()["last_error"] == "" and lat.as_dict()["last_error_at"] == 0
    lat.error("put: " + "x" * 500)
    doc = lat.as_dict()
    assert doc["last_error"].startswith("put: x") and len(doc["last_error"]) == 200
    assert doc["last_error_at"] > 0


def test_dirty_age_is_the_oldest_file_still_not_durable() -> None:
    clock = DirtyClock()
    assert clock.oldest(now=0) == 0 and clock.files() == 0
    clock.sample({5: 100}, now=10)
    clock.sample({5: 200, 7: 1}, now=12)  # 5 is still dirty: its age runs on
    assert clock.oldest(now=15) == 5 and clock.files() == 2
    clock.sample({7: 1}, now=16)  # 5 became durable
    assert clock.oldest(now=16) == 4
    clock.sample({}, now=17)
    assert clock.oldest(now=20) == 0
    clock.sample({5: 1}, now=30)  # dirty again: a new age, not the old one
    assert clock.oldest(now=31) == 1


def test_a_gc_run_record_round_trips_and_an_empty_hash_is_no_run() -> None:
    run = GcRun(started=1.5, finished=3.25, seconds=1.75, ok=False, dry_run=True, objects=10,
                deleted=0, deleted_bytes=0, error="GcRefused: busy", success=None)
    raw = {k.encode(): str(v).encode() for k, v in run.fields().items()}
    assert GcRun.parse(raw) == run and b"success" not in raw
    ok = GcRun(**{**run.as_dict(), "ok": True, "error": "", "success": 3.25})
    assert GcRun.parse({k.encode(): str(v).encode() for k, v in ok.fields().items()}) == ok
    assert GcRun.parse({}) is None
