"""The benchmark's arithmetic: which way a ratio points, when a target counts as met,
which round is reported, and what the cost tables add up (bench.report)."""

from __future__ import annotations

import pytest

from bench import report
from bench.report import Row

RATE = Row("rate", "ops/s", "rate", target=">= 1.5x", min_ratio=1.5, cost="rate")
TIME = Row("time", "s", "time", higher_is_better=False, target=">= 1.0x", min_ratio=1.0, cost="time")
LATENCY = Row("p99", "ms", "p99", higher_is_better=False, target="chunkfs < 1 ms", max_chunkfs=1.0)
MEMORY = Row("rss", "MiB", "rss", higher_is_better=False, min_ratio=1.0, agg="max")


def test_a_ratio_above_one_always_means_chunkfs_is_better():
    assert report.ratio(RATE, 300, 100) == pytest.approx(3.0)  # chunkfs does 3x the ops/s
    assert report.ratio(TIME, 2.0, 8.0) == pytest.approx(4.0)  # chunkfs takes a quarter of the time
    assert report.ratio(TIME, 8.0, 2.0) == pytest.approx(0.25)


@pytest.mark.parametrize(("c", "j"), [(None, 1.0), (1.0, None), (0.0, 1.0), (1.0, 0.0)])
def test_no_ratio_without_both_figures(c, j):
    assert report.ratio(RATE, c, j) is None


def test_a_target_is_met_at_its_ratio_and_not_below():
    assert report.verdict(RATE, 150, 1.5) == "yes"
    assert report.verdict(RATE, 149, 1.49) == "**no**"
    assert report.verdict(RATE, 150, None) == ""  # JuiceFS not measured: no verdict


def test_an_absolute_bound_judges_chunkfs_figure_alone():
    assert report.verdict(LATENCY, 0.9, 0.1) == "yes"  # worse than JuiceFS, but under 1 ms
    assert report.verdict(LATENCY, 1.2, 9.0) == "**no**"


def test_a_row_without_target_has_no_verdict():
    assert report.verdict(Row("x", "u", "x"), 1.0, 5.0) == ""


def test_the_best_round_is_reported_except_for_peak_memory_where_the_worst_is():
    samples = {
        "rate": {"chunkfs": [100, 300, 200]},
        "time": {"chunkfs": [3.0, 1.0, 2.0]},
        "rss": {"chunkfs": [200, 500, 300]},
        "unlisted": {"juicefs": [1, 7]},
        "empty": {"juicefs": []},
    }
    out = report.aggregate([RATE, TIME, MEMORY], samples)
    assert out["rate"]["chunkfs"] == 300
    assert out["time"]["chunkfs"] == 1.0
    assert out["rss"]["chunkfs"] == 500
    assert out["unlisted"]["juicefs"] == 7
    assert "empty" not in out


def test_main_table_lines_and_records_agree():
    results = {"workloads": {"rate": {"chunkfs": 120.0, "juicefs": 100.0}, "time": {"chunkfs": 2.0}}}
    text, records = report.main_table([RATE, TIME], results)
    lines = text.splitlines()
    assert lines[2] == "| rate | ops/s | 120 | 100 | 1.20x | >= 1.5x | **no** |"
    assert lines[3] == "| time | s | 2.00 | — | — | >= 1.0x |  |"
    assert records[0]["ratio"] == pytest.approx(1.2) and records[0]["met"] == "**no**"
    assert records[1]["ratio"] is None


def test_cold_read_is_judged_against_half_the_raw_get_throughput():
    results = {
        "workloads": {"seq_read_cold": {"chunkfs": 210.0, "juicefs": 90.0}},
        "raw_s3": {"get_mib_s": 400.0, "put_mib_s": 100.0, "direct_get_mib_s": 500.0,
                   "via": " through the counting proxy"},
    }  # fmt: skip
    text, records = report.main_table([], results)
    rec = next(r for r in records if r["key"] == "cold_pct_raw_get")
    assert rec["chunkfs"] == pytest.approx(52.5) and rec["juicefs"] == pytest.approx(22.5)
    assert rec["met"].startswith("yes") and "80%: no" in rec["met"]
    assert "| raw S3 GET with chunkfs's client (aiobotocore) through the counting proxy; direct: 500" in text
    results["workloads"]["seq_read_cold"]["chunkfs"] = 190.0
    _, records = report.main_table([], results)
    assert next(r for r in records if r["key"] == "cold_pct_raw_get")["met"].startswith("**no**")


def _round(mount: float, get: int, put: int, head: int = 0, sent: int = 0, received: int = 0) -> dict:
    by_op = {"GET": {"requests": get, "bytes_sent": 0, "bytes_received": received, "errors": 0},
             "PUT": {"requests": put, "bytes_sent": sent, "bytes_received": 0, "errors": 0}}
    if head:
        by_op["HEAD"] = {"requests": head, "bytes_sent": 0, "bytes_received": 0, "errors": 1}
    total = {"requests": get + put + head, "bytes_sent": sent, "bytes_received": received,
             "errors": int(bool(head))}
    return {"cpu": {"mount": mount, "seaweedfs": 1.0}, "s3": {"total": total, "by_op": by_op}}  # fmt: skip


def test_costs_are_means_per_round_with_missing_classes_counted_as_zero():
    cost = report.mean_cost([_round(1.0, 10, 2, head=4), _round(3.0, 20, 4), {"no": "cost"}])
    assert cost is not None
    assert cost["rounds"] == 2
    assert cost["cpu"]["mount"] == pytest.approx(2.0)
    assert cost["s3"]["total"]["requests"] == pytest.approx(20.0)
    assert cost["s3"]["by_op"]["HEAD"]["requests"] == pytest.approx(2.0)
    assert report.mean_cost([{"loadavg": 1.0}]) is None
    assert report.mean_cost(None) is None


def test_cost_table_splits_requests_and_marks_chunkfs_making_more_than_juicefs():
    details = {
        "rate": {"chunkfs": [_round(1.5, 30, 10, head=2, sent=3 << 20, received=8 << 20)],
                 "juicefs": [_round(0.5, 5, 20)]},
        "time": {"chunkfs": [_round(1.0, 1, 1)], "juicefs": [_round(1.0, 1, 1)]},
    }  # fmt: skip
    lines = report.cost_table([RATE, TIME, LATENCY], details).splitlines()
    assert len(lines) == 4  # header, separator, the two rows with a cost key
    want = "| rate | 1.50 / 0.50 | **42** / 25 | 30 / 10 / 2 | 5 / 20 / 0 | 3.00 / 8.00 | 0.00 / 0.00 |"
    assert lines[2] == want
    assert "| **2** / 2 |" not in lines[3] and "| 2 / 2 |" in lines[3]


def test_services_table_shows_each_process_for_both():
    details = {
        "rate": {"chunkfs": [_round(1.0, 1, 1)], "juicefs": [_round(2.0, 1, 1)]},
        "time": {"chunkfs": [{"cpu": {"mount": 1.0}}]},  # the mount's own CPU only: no line
    }
    lines = report.services_table([RATE, TIME], details).splitlines()
    assert lines[2:] == ["| rate | 1.00 / 1.00 | — / — | — / — | — / — |"]


def test_counts_print_whole_unless_a_mean_is_fractional():
    assert report.fmt_count(1234.0) == "1,234"
    assert report.fmt_count(16.5) == "16.5"
    assert report.fmt_count(None) == "—"


def test_load_range_covers_every_recorded_round():
    details = {"a": {"chunkfs": [{"loadavg": 2.5}, {"loadavg": 0.5}]}, "b": {"juicefs": [{"loadavg": 4.0}]},
               "setup": {"chunkfs": {"format_s": 1.0}}}  # fmt: skip
    assert report.load_range(details) == (0.5, 4.0)
    assert report.load_range({}) is None
