"""What the benchmark's command line selects and sizes (bench.plan, bench.run's parser)."""

from __future__ import annotations

import argparse

import pytest

from bench import plan
from bench.run import build_parser, parse_size

MiB = 1 << 20


def test_groups_expand_and_workloads_run_in_a_fixed_order():
    durable = ["sqlite", "log-append", "wal-append", "page-overwrite"]
    assert plan.parse_workloads("durable,git") == ["git", *durable]
    assert plan.parse_workloads("all") == list(plan.WORKLOADS)


def test_reading_the_big_file_brings_the_write_that_creates_it():
    assert plan.parse_workloads("cold-read") == ["write", "cold-read"]
    assert plan.parse_workloads("first-byte, sqlite") == ["write", "sqlite", "first-byte"]


@pytest.mark.parametrize("text", ["gitt", "sqlite,nope", "", " , "])
def test_unknown_or_no_workloads_are_refused(text):
    with pytest.raises(ValueError):
        plan.parse_workloads(text)


def test_the_parser_refuses_an_unknown_workload_with_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--workloads", "bogus"])
    assert exc.value.code == 2
    assert "unknown workload 'bogus'" in capsys.readouterr().err


def _args(*argv: str) -> argparse.Namespace:
    args = build_parser().parse_args(list(argv))
    plan.apply_defaults(args)
    return args


def test_quick_and_full_defaults_and_explicit_values_win():
    full, quick = _args(), _args("--quick")
    for name, (f, q) in plan.DEFAULTS.items():
        assert getattr(full, name) == f and getattr(quick, name) == q
    assert quick.page_file_size < full.page_file_size and quick.app_files < full.app_files
    assert _args("--quick", "--app-files", "123").app_files == 123
    assert _args("--page-file-size", "32MiB").page_file_size == 32 * MiB


@pytest.mark.parametrize(
    "argv",
    [["--page-file-size", "3MiB"], ["--size", "5000000"], ["--sqlite-commits", "0"],
     ["--page-file-size", "4MiB", "--page-writes", "1024"]],
)  # fmt: skip
def test_bad_sizes_are_refused(argv):
    with pytest.raises(ValueError):
        _args(*argv)


def test_sizes_parse_with_binary_units():
    assert parse_size("256MiB") == 256 * MiB
    assert parse_size("1g") == 1 << 30
    assert parse_size("4096") == 4096
    for bad in ("12 parsecs", "inf", "nan", "-1MiB", "MiB"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)


def test_every_row_has_its_own_key_and_every_cost_row_a_workload():
    rows = plan.rows(_args("--quick"))
    keys = [r.key for r in rows]
    assert len(keys) == len(set(keys))
    # each application workload is in the table with a target and a cost line
    for key in ("git_clone", "git_status", "git_remove", "untar", "sqlite_delete", "sqlite_wal",
                "log_append", "wal_append", "page_overwrite"):  # fmt: skip
        row = next(r for r in rows if r.key == key)
        assert row.min_ratio is not None and row.cost == key
    assert any("stat of 1000 files" in r.label for r in rows)
    assert any(r.key == "peak_rss_mib" and r.agg == "max" for r in rows)
