"""What the benchmark runs and how it reports it: the workload names (``--workloads``),
their groups and dependencies, and the rows of the main table with their targets.

Targets are the stricter of DESIGN.md's "Numbers to beat" and issue 8's; ratios are
oriented so that > 1.0 means chunkfs is better (bench.report).
"""

from __future__ import annotations

from typing import Any

from bench.report import Row

# In the order they run within a round; first-byte runs once, after all rounds.
WORKLOADS = (
    "write", "raw-s3", "cold-read", "warm-read", "random-read", "small-files", "metadata",
    "git", "untar", "sqlite", "log-append", "wal-append", "page-overwrite", "first-byte",
)  # fmt: skip
GROUPS = {
    "all": WORKLOADS,
    "streaming": ("write", "raw-s3", "cold-read", "warm-read", "random-read"),
    "files": ("small-files", "metadata"),
    "apps": ("git", "untar"),
    "durable": ("sqlite", "log-append", "wal-append", "page-overwrite"),
}
NEEDS_BIG_FILE = ("cold-read", "warm-read", "random-read", "first-byte")
MiB = 1 << 20

# option -> (full run, --quick)
DEFAULTS: dict[str, tuple[int, int]] = {
    "size": (1 << 30, 256 * MiB),
    "small_files": (5000, 1000),
    "meta_dirs": (1000, 300),
    "random_reads": (3000, 1000),
    "app_files": (4700, 1000),
    "sqlite_commits": (500, 150),
    "log_appends": (2000, 500),
    "wal_appends": (1000, 300),
    "page_writes": (400, 150),
    "page_file_size": (256 * MiB, 64 * MiB),
    "rounds": (2, 1),
}


def apply_defaults(args: Any) -> None:
    """Fill every size option left unset (None) from DEFAULTS (full or --quick), then
    check them all; ValueError names the first bad one."""
    for name, (full, quick) in DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, quick if args.quick else full)
    for name in DEFAULTS:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("size", "page_file_size"):
        value = getattr(args, name)
        if value < 4 * MiB or value % MiB:
            raise ValueError(f"--{name.replace('_', '-')} must be a multiple of 1MiB and at least 4MiB")
    if args.page_writes >= args.page_file_size // 4096:
        raise ValueError("--page-writes must be fewer than the pages of --page-file-size")


def parse_workloads(text: str) -> list[str]:
    """A comma-separated list of workload and group names -> the workloads to run, in
    running order, with "write" added when a workload reads the big file it writes."""
    chosen: set[str] = set()
    for raw in text.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if name in GROUPS:
            chosen.update(GROUPS[name])
        elif name in WORKLOADS:
            chosen.add(name)
        else:
            known = ", ".join([*GROUPS, *WORKLOADS])
            raise ValueError(f"unknown workload {name!r} (known: {known})")
    if not chosen:
        raise ValueError("no workload chosen")
    if chosen.intersection(NEEDS_BIG_FILE):
        chosen.add("write")
    return [w for w in WORKLOADS if w in chosen]


def human(n: int) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k}{unit}"
    return f"{n}B"


def rows(args: Any) -> list[Row]:
    """The main table, in reading order (``args``: the parsed command line)."""
    n, m, f = args.small_files, args.meta_dirs, args.app_files
    ge = {"target": ">= 1.0x", "min_ratio": 1.0}
    small = {"target": ">= 1.5x", "min_ratio": 1.5}
    durable = {"target": ">= 1.5x", "min_ratio": 1.5}
    first_byte = {"higher_is_better": False, "target": "<= 0.5x JuiceFS (issue 8)", "min_ratio": 2.0}
    return [
        Row(f"sequential write {human(args.size)} + fsync", "MiB/s", "seq_write", **ge, cost="seq_write"),
        Row("sequential read, cold cache (new node)", "MiB/s", "seq_read_cold", target=">= 1.2x (issue 8)",
            min_ratio=1.2, cost="seq_read_cold"),
        Row("sequential read, warm cache", "MiB/s", "seq_read_warm", **ge, cost="seq_read_warm"),
        Row(f"random 4 KiB reads ({args.random_reads}, warm cache)", "IOPS", "rand_read_iops", **ge,
            cost="rand_read_iops"),
        Row("random 4 KiB read p99", "ms", "rand_read_p99", higher_is_better=False, target="chunkfs < 1 ms",
            max_chunkfs=1.0),
        Row(f"small files: create+write+close {n} x 4 KiB", "files/s", "small_create", **small,
            cost="small_create"),
        Row(f"small files: stat of {n} files (cold caches)", "ops/s", "small_stat", **small,
            cost="small_stat"),
        Row("small files: read", "files/s", "small_read", **small, cost="small_read"),
        Row("small files: delete", "ops/s", "small_delete", **small, cost="small_delete"),
        Row("small files: all four phases", "ops/s", "small_total", **small),
        Row(f"metadata: mkdir ({m} dirs)", "ops/s", "meta_mkdir"),
        Row("metadata: rename", "ops/s", "meta_rename"),
        Row("metadata: stat", "ops/s", "meta_stat"),
        Row("metadata: readdir", "ops/s", "meta_readdir"),
        Row("metadata: rmdir", "ops/s", "meta_rmdir"),
        Row("metadata: all five", "ops/s", "meta_total", **ge, cost="meta"),
        Row(f"git clone of a {f}-file repository (file://)", "s", "git_clone", higher_is_better=False, **ge,
            cost="git_clone"),
        Row("git status on the clone, cold caches", "s", "git_status", higher_is_better=False, **ge,
            cost="git_status"),
        Row("git status on the clone, warm", "s", "git_status_warm", higher_is_better=False),
        Row("rm -rf of the clone", "s", "git_remove", higher_is_better=False, **ge, cost="git_remove"),
        Row(f"tar -xf of {f} files, then syncfs", "s", "untar", higher_is_better=False, **ge, cost="untar"),
        Row(f"SQLite, rollback journal: {args.sqlite_commits} commits, 1 row each", "commits/s",
            "sqlite_delete", **ge, cost="sqlite_delete"),
        Row(f"SQLite, WAL mode: {args.sqlite_commits} commits, 1 row each", "commits/s", "sqlite_wal",
            **durable, cost="sqlite_wal"),
        Row(f"log append: {args.log_appends} x 120 B lines, fsync each", "appends/s", "log_append", **durable,
            cost="log_append"),
        Row(f"write-ahead log: {args.wal_appends} x 4 KiB appends, fdatasync each", "appends/s",
            "wal_append", **durable, cost="wal_append"),
        Row(f"database pages: {args.page_writes} random 4 KiB overwrites + fsync in a "
            f"{human(args.page_file_size)} file", "writes/s", "page_overwrite", **durable,
            cost="page_overwrite"),
        Row("first byte after staging a volume on a new node (chunkfs: forked from the node's zygote; "
            "JuiceFS: mount command)", "ms", "ttfb_staged_ms", **first_byte, cost="ttfb_staged_ms"),
        Row("first byte after mount on a new node (mount command, no zygote)", "ms", "ttfb_ms", **first_byte,
            cost="ttfb_ms"),
        Row("first byte after mount on a new node (foreground)", "ms", "ttfb_foreground_ms", **first_byte,
            cost="ttfb_foreground_ms"),
        Row("peak RSS of the mount process (max over all mounts)", "MiB", "peak_rss_mib",
            higher_is_better=False, target="<= JuiceFS", min_ratio=1.0, agg="max"),
        Row("peak RSS of the mount process during the write", "MiB", "rss_write_mib", higher_is_better=False,
            agg="max"),
    ]  # fmt: skip
