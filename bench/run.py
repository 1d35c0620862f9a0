"""chunkfs vs JuiceFS, side by side, on the same Redis and the same SeaweedFS.

    python -m bench.run [--size 1GiB] [--small-files 5000] [--quick] [--out FILE.json]

Brings up Redis + SeaweedFS (chunkfs.localstack) in a temporary directory, creates a
chunkfs volume (Redis db 1) and formats a JuiceFS volume (Redis db 2, its own bucket),
mounts both with their default options, runs the same workloads on both (bench.workloads,
in child processes, plain POSIX I/O), prints a Markdown table of both figures and their
ratio (oriented so that > 1.0 means chunkfs is better), writes every detail as JSON, and
tears everything down, also on failure and Ctrl-C. Needs root (mounts, drop_caches).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.targets import (
    BenchError,
    ChunkfsTarget,
    JuiceFSTarget,
    Target,
    cpu_seconds,
    dir_bytes,
)
from bench.workloads import MiB, drop_caches

log = logging.getLogger("bench")
ROOT = Path(__file__).resolve().parents[1]


def parse_size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}
    t = text.strip().lower()
    num = t.rstrip("kmgib")
    unit = t[len(num) :]
    if unit not in units or not num:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 256MiB, 1GiB)")
    return int(float(num) * units[unit])


def human(n: int) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k}{unit}"
    return f"{n}B"


# --------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One line of the table: how to find each filesystem's figure in the results."""

    label: str
    unit: str
    key: str  # results["workloads"][key][fs] -> number
    higher_is_better: bool = True
    target: str = ""
    min_ratio: float | None = None
    agg: str = "best"  # over rounds: "best", or "max" (peak memory)


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


# --------------------------------------------------------------------------- bench


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size: int = args.size
        self.seed = int.from_bytes(secrets.token_bytes(4), "little")
        self.results: dict[str, Any] = {
            "config": {
                "size": self.size, "small_files": args.small_files, "meta_dirs": args.meta_dirs,
                "random_reads": args.random_reads, "quick": args.quick, "rounds": args.rounds,
                "chunkfs_mount_options": args.chunkfs_options,
            },
            "host": {"cpus": os.cpu_count(), "kernel": platform.release(),
                     "python": platform.python_version(), "loadavg_start": os.getloadavg()},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "workloads": {}, "details": {}, "snapshot": {}, "errors": [],
        }  # fmt: skip
        self.targets: list[Target] = []
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.round = 0
        self.big_round = 0  # the round whose big file is the latest one written
        self.stack: Any = None
        self.work: Path | None = None
        self.t_start = time.monotonic()

    # ---------------------------------------------------------------- plumbing
    def put(self, key: str, fs: str, value: float | None, detail: Any = None) -> None:
        """Record one sample (a figure per round); ``finalize`` picks the reported one."""
        if value is not None:
            self.samples.setdefault(key, {}).setdefault(fs, []).append(value)
        if detail is not None:
            self.results["details"].setdefault(key, {}).setdefault(fs, []).append(detail)

    def finalize(self) -> None:
        """Best sample per figure (external load only ever makes a figure worse), except
        for peak memory, where the worst one counts."""
        rows = {r.key: r for r in self.rows()}
        out = self.results["workloads"]
        for key, per_fs in self.samples.items():
            row = rows.get(key)
            for fs, values in per_fs.items():
                if row is not None and row.agg == "max":
                    out.setdefault(key, {})[fs] = max(values)
                elif row is None or row.higher_is_better:
                    out.setdefault(key, {})[fs] = max(values)
                else:
                    out.setdefault(key, {})[fs] = min(values)
        self.results["samples"] = self.samples
        raws = self.results.get("raw_s3_rounds") or []
        if raws:
            self.results["raw_s3"] = {
                "put_mib_s": max(r["put_mib_s"] for r in raws),
                "get_mib_s": max(r["get_mib_s"] for r in raws),
            }

    def error(self, where: str, exc: BaseException) -> None:
        msg = f"{where}: {type(exc).__name__}: {exc}"
        log.error("%s", msg)
        self.results["errors"].append(msg)

    def step(self, where: str, fn: Callable[[], None]) -> bool:
        t0 = time.monotonic()
        try:
            fn()
        except (BenchError, RuntimeError, OSError, subprocess.SubprocessError, ValueError) as e:
            self.error(where, e)
            return False
        log.info(
            "%-28s done in %5.1fs (total %4.0fs)",
            where,
            time.monotonic() - t0,
            time.monotonic() - self.t_start,
        )
        return True

    def child(
        self, module: str, spec: dict[str, Any], env: dict[str, str] | None = None, timeout: float = 600
    ) -> dict[str, Any]:
        """Run ``python -m module '<spec>'`` and return its JSON result."""
        proc = subprocess.run(
            [sys.executable, "-m", module, json.dumps(spec)], cwd=ROOT, env=env or self.base_env,
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            raise BenchError(f"{module} {spec.get('op', '')}: {tail[0]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def workload(self, t: Target, spec: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
        """Run one workload on t; adds the CPU seconds that the mount process, SeaweedFS,
        Redis and the workload itself used meanwhile (``cpu``), and the load average."""
        if not t.mounted:
            raise BenchError(f"{t.name} is not mounted")
        if t.current is not None:
            what = spec["op"] + (f" {spec['phase']}" if "phase" in spec else "")
            t.current.served.append(f"{what} (round {self.round + 1})")
        before = self._cpu(t)
        res = self.child("bench.workloads", spec, timeout=timeout)
        after = self._cpu(t)
        res["cpu"] = {k: round(after[k] - before[k], 3) for k in before}
        res["loadavg"] = os.getloadavg()[0]
        return res

    def _cpu(self, t: Target) -> dict[str, float]:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {
            "mount": t.cpu(),
            "seaweedfs": cpu_seconds(self.stack.s3.pid),
            "redis": cpu_seconds(self.stack.redis.pid),
            "client": children.ru_utime + children.ru_stime,
        }

    def order(self, k: int) -> list[Target]:
        """Alternate which filesystem goes first from one workload (and round) to the next."""
        k += self.round
        return list(self.targets) if k % 2 == 0 else list(reversed(self.targets))

    def ensure_mounted(self, t: Target, phase: str) -> None:
        if not t.mounted:
            t.phase = phase
            t.mount()

    def remount(self, t: Target, phase: str, *, fresh_cache: bool) -> None:
        if t.mounted:
            t.umount()
        if fresh_cache:
            t.new_cache_dir()
        drop_caches()
        t.phase = phase
        t.mount()

    @property
    def io_timeout(self) -> float:
        return max(300.0, self.size / MiB / 2)

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        from chunkfs.localstack import LocalStack

        self.work = Path(self.args.workdir or tempfile.mkdtemp(prefix="chunkfs-bench-"))
        self.work.mkdir(parents=True, exist_ok=True)
        log.info("work directory %s", self.work)
        self.stack = LocalStack(self.work / "stack", die_with_parent=True)
        self.stack.up()
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.base_env = {**os.environ, "PATH": path, "PYTHONPATH": str(ROOT), **self.stack.s3.env()}
        chunk_env = {**self.base_env, **self.stack.env(prefix="bench", db=1)}
        jfs_env = {
            **self.base_env,
            "ACCESS_KEY": self.stack.s3.access_key,
            "SECRET_KEY": self.stack.s3.secret_key,
        }
        capacity = human(max(20 << 30, (self.args.rounds + 2) * self.size))
        chunk = ChunkfsTarget(
            self.work / "chunkfs",
            chunk_env,
            capacity,
            mount_options=self.args.chunkfs_options,
            cache_size=self.args.cache_size,
        )
        jfs = JuiceFSTarget(
            self.work / "juicefs",
            jfs_env,
            self.stack.redis.url_for_db(2),
            f"{self.stack.s3.endpoint}/jfsbench",
        )
        self.targets = [t for t in (chunk, jfs) if t.name in self.args.only]
        for t in self.targets:
            t0 = time.perf_counter()
            t.setup()
            self.results["details"].setdefault("setup", {})[t.name] = {"format_s": time.perf_counter() - t0}
            t.phase = "write"
            t.mount()

    def teardown(self) -> None:
        for t in self.targets:
            try:
                t.force_cleanup()
            except Exception as e:  # noqa: BLE001 - keep tearing down
                self.error(f"cleanup {t.name}", e)
        if self.stack is not None:
            try:
                self.stack.down(timeout=20)
            except Exception as e:  # noqa: BLE001
                self.error("stopping local services", e)
        if self.work is not None and not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        elif self.work is not None:
            log.info("kept %s", self.work)

    # ---------------------------------------------------------------- workloads
    @property
    def big_file(self) -> str:
        """The sequential file of the current round: a new file each round (an overwrite
        of an existing file is a different workload, with different costs)."""
        return f"seq/big-{self.big_round}.bin"

    def seq_spec(self, t: Target, op: str, **extra: Any) -> dict[str, Any]:
        return {
            "op": op,
            "path": str(t.mountpoint / self.big_file),
            "size": self.size,
            "seed": self.seed,
            "salt": 1 + self.big_round,
            **extra,
        }

    def run_write(self) -> None:
        for t in self.order(0):

            def go(t: Target = t) -> None:
                if self.round > 0:  # a fresh mount process, so that its peak RSS is the write's
                    self.remount(t, "write", fresh_cache=False)
                os.makedirs(t.mountpoint / "seq", exist_ok=True)
                res = self.workload(t, self.seq_spec(t, "seqwrite"), timeout=self.io_timeout)
                self.put("seq_write", t.name, res["mib_s"], res)
                t.record_peak()
                if t.current is not None and t.current.vmhwm_kib:
                    self.put("rss_write_mib", t.name, t.current.vmhwm_kib / 1024)
                st = t.status()
                if st is not None:
                    self.results["details"].setdefault("status_after_write", {})[t.name] = st

            self.step(f"seq write{self.tag} [{t.name}]", go)
            time.sleep(1)

    def run_raw_s3(self) -> None:
        def go() -> None:
            res = self.child("bench.s3raw", {
                "bucket": "chunkfs", "prefix": "rawbench", "size": self.size,
                "concurrency": self.args.s3_concurrency, "seed": self.seed,
                "salt": 99 + self.round,
            }, timeout=self.io_timeout)  # fmt: skip
            self.results.setdefault("raw_s3_rounds", []).append(res)

        self.step(f"raw S3 PUT/GET{self.tag}", go)

    def run_objbench(self) -> None:
        """`juicefs objbench` (a Go S3 client) on the same endpoint: a raw PUT/GET reference
        that no Python client overhead caps."""
        if shutil.which("juicefs", path=self.base_env["PATH"]) is None:
            return

        def go() -> None:
            env = {**self.base_env, "ACCESS_KEY": self.stack.s3.access_key,
                   "SECRET_KEY": self.stack.s3.secret_key}  # fmt: skip
            size_mib = max(64, self.size // MiB)
            proc = subprocess.run(
                ["juicefs", "objbench", "--storage", "s3", "--skip-functional-tests",
                 "--big-object-size", f"{size_mib}M", "--small-objects", "10", "-p", "10",
                 f"{self.stack.s3.endpoint}/objbench"],
                env=env, capture_output=True, text=True, timeout=self.io_timeout,
            )  # fmt: skip
            out = proc.stdout + proc.stderr
            found = dict(re.findall(r"(upload|download) objects\s*\|\s*([\d.]+) MiB/s", out))
            if "download" not in found:
                raise BenchError(f"juicefs objbench: no figures (exit {proc.returncode})")
            self.results["objbench"] = {
                "put_mib_s": float(found["upload"]),
                "get_mib_s": float(found["download"]),
                "threads": 10,
            }

        self.step("raw S3 (juicefs objbench)", go)

    def run_snapshot(self, label: str, files: int, what: str) -> None:
        chunk = next((t for t in self.targets if isinstance(t, ChunkfsTarget)), None)
        if chunk is None:
            return

        def go() -> None:
            cli_s = chunk.snapshot(f"bench-{label}-cli")
            api_s = asyncio.run(self._snapshot_api(chunk, f"bench-{label}-api"))
            self.results["snapshot"][label] = {"what": what, "files": files, "cli_s": cli_s, "api_s": api_s}

        self.step(f"snapshot ({label})", go)

    @staticmethod
    async def _snapshot_api(chunk: ChunkfsTarget, name: str) -> float:
        from chunkfs.config import backend_from_env
        from chunkfs.volumes import VolumeService

        meta, storage = backend_from_env(None, None, chunk.env)
        svc = await VolumeService.open(meta, storage)
        try:
            t0 = time.perf_counter()
            await svc.create_snapshot(chunk.volume, name)
            return time.perf_counter() - t0
        finally:
            await svc.close()

    def _settle_cache(self, t: Target, limit: float = 60.0) -> int:
        """Wait until the cache directory stops growing (asynchronous cache fills)."""
        last, stable_since, deadline = -1, time.monotonic(), time.monotonic() + limit
        while time.monotonic() < deadline:
            now = dir_bytes(t.cache_dir)
            if now != last:
                last, stable_since = now, time.monotonic()
            elif time.monotonic() - stable_since >= 2.0:
                break
            time.sleep(0.25)
        return last

    def run_cold_read(self) -> None:
        for t in self.order(1):

            def go(t: Target = t) -> None:
                self.remount(t, "cold read", fresh_cache=True)
                drop_caches()
                res = self.workload(t, self.seq_spec(t, "seqread"), timeout=self.io_timeout)
                res["cache_bytes_after"] = self._settle_cache(t)
                self.put("seq_read_cold", t.name, res["mib_s"], res)
                st = t.status()
                if st is not None:
                    self.results["details"].setdefault("status_after_cold_read", {})[t.name] = st

            self.step(f"cold read{self.tag} [{t.name}]", go)

    def run_warm_and_random(self) -> None:
        for t in self.order(2):

            def warm(t: Target = t) -> None:
                self.remount(t, "warm read", fresh_cache=False)
                drop_caches()
                res = self.workload(t, self.seq_spec(t, "seqread"), timeout=self.io_timeout)
                self.put("seq_read_warm", t.name, res["mib_s"], res)

            def rand(t: Target = t) -> None:
                self.ensure_mounted(t, "random read")
                drop_caches()
                res = self.workload(
                    t, self.seq_spec(t, "randread", count=self.args.random_reads), timeout=self.io_timeout
                )
                self.put("rand_read_iops", t.name, res["iops"], res)
                self.put("rand_read_p99", t.name, res["p99_ms"])

            self.step(f"warm read{self.tag} [{t.name}]", warm)
            self.step(f"random 4KiB reads{self.tag} [{t.name}]", rand)

    def run_small_files(self) -> None:
        n = self.args.small_files
        total: dict[str, list[float]] = {}
        for k, phase in enumerate(("create", "stat", "read", "delete")):
            for t in self.order(k):

                def go(t: Target = t, phase: str = phase) -> None:
                    self.ensure_mounted(t, "small files")
                    drop_caches()
                    spec = {
                        "op": "small",
                        "phase": phase,
                        "directory": str(t.mountpoint / "small"),
                        "n": n,
                        "seed": self.seed,
                        "salt": 1000 + self.round,
                    }
                    res = self.workload(t, spec, timeout=max(300.0, n / 5))
                    self.put(f"small_{phase}", t.name, res["ops_s"], res)
                    acc = total.setdefault(t.name, [0, 0.0])
                    acc[0] += res["ops"]
                    acc[1] += res["seconds"]

                self.step(f"small files {phase}{self.tag} [{t.name}]", go)
            if phase == "create" and self.round == 0:
                self.run_snapshot(
                    "small-files",
                    n + 1,
                    f"volume with {n + 1} files ({n} x 4 KiB + the {human(self.size)} file)",
                )
        for name, (ops, secs) in total.items():
            if ops == 4 * n:
                self.put("small_total", name, ops / secs)

    def run_meta(self) -> None:
        for t in self.order(1):

            def go(t: Target = t) -> None:
                self.ensure_mounted(t, "metadata")
                drop_caches()
                spec = {"op": "meta", "directory": str(t.mountpoint / "meta"), "n": self.args.meta_dirs}
                res = self.workload(t, spec, timeout=max(300.0, self.args.meta_dirs / 2))
                for phase in ("mkdir", "rename", "stat", "readdir", "rmdir", "total"):
                    self.put(f"meta_{phase}", t.name, res[phase]["ops_s"])
                self.results["details"].setdefault("meta", {}).setdefault(t.name, []).append(res)

            self.step(f"metadata ops{self.tag} [{t.name}]", go)

    def _first_byte(self, t: Target) -> float:
        fd = os.open(t.mountpoint / self.big_file, os.O_RDONLY)
        try:
            if len(os.read(fd, 1)) != 1:
                raise BenchError(f"{t.name}: empty read of {self.big_file}")
        finally:
            os.close(fd)
        return time.perf_counter()

    def run_ttfb(self) -> None:
        """Mount on a "new node" (fresh cache dir, page cache dropped) and read the first
        byte of the big file; the time from starting the mount command. Median of
        --ttfb-runs, both in the foreground (until the mountpoint is live) and with the
        ordinary detached mount command (which returns once the mount is ready)."""
        runs: dict[tuple[str, str], list[dict[str, float]]] = {}
        for rep in range(self.args.ttfb_runs):
            self.round = rep
            for t in self.order(0):
                for mode in ("foreground", "detached"):

                    def go(t: Target = t, mode: str = mode) -> None:
                        if t.mounted:
                            t.umount()
                        t.new_cache_dir()
                        drop_caches()
                        t.phase = f"ttfb {mode}"
                        t0 = time.perf_counter()
                        mount_s = t.mount_foreground() if mode == "foreground" else t.mount()
                        total = self._first_byte(t) - t0
                        if t.current is not None:
                            t.current.served.append("first byte")
                        runs.setdefault((mode, t.name), []).append(
                            {"mounted_ms": mount_s * 1000, "first_byte_ms": total * 1000}
                        )
                        if mode == "foreground":
                            t.umount()

                    self.step(f"first byte, {mode} #{rep + 1} [{t.name}]", go)
        for (mode, name), values in runs.items():
            key = "ttfb_foreground_ms" if mode == "foreground" else "ttfb_ms"
            self.put(key, name, statistics.median(v["first_byte_ms"] for v in values), values)
        self.round = 0

    def finish(self) -> None:
        for t in self.targets:
            with contextlib.suppress(Exception):
                t.record_peak()
            if t.mounted:
                self.step(f"umount [{t.name}]", t.umount)
            hwm, label = t.peak()
            self.put("peak_rss_mib", t.name, hwm / 1024 if hwm else None, {"session": label, **t.describe()})

    @property
    def tag(self) -> str:
        return f" (round {self.round + 1})" if self.args.rounds > 1 else ""

    def run(self) -> None:
        self.setup()
        for rnd in range(self.args.rounds):
            self.round = self.big_round = rnd
            self.run_write()
            if rnd == 0:
                self.run_snapshot("one-big-file", 1, f"volume with 1 file of {human(self.size)}")
            self.run_raw_s3()
            if rnd == 0:
                self.run_objbench()
            self.run_cold_read()
            self.run_warm_and_random()
            self.run_small_files()
            self.run_meta()
        self.run_ttfb()
        self.finish()

    # ---------------------------------------------------------------- report
    def rows(self) -> list[Row]:
        n = self.args.small_files
        m = self.args.meta_dirs
        return [
            Row(
                f"sequential write {human(self.size)} + fsync",
                "MiB/s",
                "seq_write",
                target=">= 1.0x",
                min_ratio=1.0,
            ),
            Row(
                "sequential read, cold cache (new node)",
                "MiB/s",
                "seq_read_cold",
                target=">= 1.0x",
                min_ratio=1.0,
            ),
            Row("sequential read, warm cache", "MiB/s", "seq_read_warm", target=">= 1.0x", min_ratio=1.0),
            Row(f"random 4 KiB reads ({self.args.random_reads}, warm cache)", "IOPS", "rand_read_iops"),
            Row("random 4 KiB read p99", "ms", "rand_read_p99", higher_is_better=False),
            Row(
                f"small files: create+write+close {n} x 4 KiB",
                "files/s",
                "small_create",
                target=">= 1.5x",
                min_ratio=1.5,
            ),
            Row("small files: stat", "ops/s", "small_stat", target=">= 1.5x", min_ratio=1.5),
            Row("small files: read", "files/s", "small_read", target=">= 1.5x", min_ratio=1.5),
            Row("small files: delete", "ops/s", "small_delete", target=">= 1.5x", min_ratio=1.5),
            Row("small files: all four phases", "ops/s", "small_total", target=">= 1.5x", min_ratio=1.5),
            Row(f"metadata: mkdir ({m} dirs)", "ops/s", "meta_mkdir"),
            Row("metadata: rename", "ops/s", "meta_rename"),
            Row("metadata: stat", "ops/s", "meta_stat"),
            Row("metadata: readdir", "ops/s", "meta_readdir"),
            Row("metadata: rmdir", "ops/s", "meta_rmdir"),
            Row("metadata: all five", "ops/s", "meta_total", target=">= 1.0x", min_ratio=1.0),
            Row(
                "first byte after mount on a new node (mount command)",
                "ms",
                "ttfb_ms",
                higher_is_better=False,
                target="<= JuiceFS",
                min_ratio=1.0,
            ),
            Row(
                "first byte after mount on a new node (foreground)",
                "ms",
                "ttfb_foreground_ms",
                higher_is_better=False,
                target="<= JuiceFS",
                min_ratio=1.0,
            ),
            Row(
                "peak RSS of the mount process (max over all mounts)",
                "MiB",
                "peak_rss_mib",
                higher_is_better=False,
                target="<= JuiceFS",
                min_ratio=1.0,
                agg="max",
            ),
            Row(
                "peak RSS of the mount process during the write",
                "MiB",
                "rss_write_mib",
                higher_is_better=False,
                agg="max",
            ),
        ]

    def table(self) -> str:
        w = self.results["workloads"]
        lines = [
            "| workload | unit | chunkfs | JuiceFS | ratio | target | met |",
            "| --- | --- | ---: | ---: | ---: | --- | --- |",
        ]
        rows_out = []
        for r in self.rows():
            c = w.get(r.key, {}).get("chunkfs")
            j = w.get(r.key, {}).get("juicefs")
            ratio = None
            if c and j:
                ratio = c / j if r.higher_is_better else j / c
            met = (
                "" if r.min_ratio is None or ratio is None else ("yes" if ratio >= r.min_ratio else "**no**")
            )
            rows_out.append(
                {
                    "workload": r.label,
                    "unit": r.unit,
                    "chunkfs": c,
                    "juicefs": j,
                    "ratio": ratio,
                    "target": r.target,
                    "met": met,
                }
            )
            lines.append(
                f"| {r.label} | {r.unit} | {_fmt(c)} | {_fmt(j)} | "
                f"{'—' if ratio is None else f'{ratio:.2f}x'} | {r.target} | {met} |"
            )
        raw = self.results.get("raw_s3")
        if raw:
            cold = w.get("seq_read_cold", {})
            pct = {k: 100 * v / raw["get_mib_s"] for k, v in cold.items() if v}
            c, j = pct.get("chunkfs"), pct.get("juicefs")
            met = "" if c is None else ("yes" if c >= 80 else "**no**")
            lines.append(
                f"| cold read as % of raw S3 GET, aiobotocore ({raw['get_mib_s']:.0f} MiB/s) | % | "
                f"{_fmt(c)} | {_fmt(j)} | — | chunkfs >= 80% | {met} |"
            )
            rows_out.append(
                {
                    "workload": "cold read as % of raw S3 GET",
                    "unit": "%",
                    "chunkfs": c,
                    "juicefs": j,
                    "target": ">= 80%",
                    "met": met,
                }
            )
            ob = self.results.get("objbench")
            if ob:
                pct = {k: 100 * v / ob["get_mib_s"] for k, v in cold.items() if v}
                lines.append(
                    f"| cold read as % of raw S3 GET, Go client ({ob['get_mib_s']:.0f} MiB/s, "
                    f"juicefs objbench) | % | {_fmt(pct.get('chunkfs'))} | "
                    f"{_fmt(pct.get('juicefs'))} | — | (reference) | |"
                )
            wr = w.get("seq_write", {})
            pct_w = {k: 100 * v / raw["put_mib_s"] for k, v in wr.items() if v}
            lines.append(
                f"| write as % of raw S3 PUT ({raw['put_mib_s']:.0f} MiB/s) | % | "
                f"{_fmt(pct_w.get('chunkfs'))} | {_fmt(pct_w.get('juicefs'))} | — | "
                "(reference) | |"
            )
        for s in self.results["snapshot"].values():
            met = "yes" if s["api_s"] < 1.0 else "**no**"
            lines.append(
                f"| chunkfs snapshot create: {s['what']} | ms | "
                f"{_fmt(s['api_s'] * 1000)} (CLI {_fmt(s['cli_s'] * 1000)}) | — | — | "
                f"< 1 s for 10k files | {met} |"
            )
        self.results["table"] = rows_out
        return "\n".join(lines)

    CPU_ROWS = (
        ("sequential write", "seq_write"),
        ("cold read", "seq_read_cold"),
        ("warm read", "seq_read_warm"),
        ("random 4 KiB reads", "rand_read_iops"),
        ("small files: create", "small_create"),
        ("small files: stat", "small_stat"),
        ("small files: read", "small_read"),
        ("small files: delete", "small_delete"),
        ("metadata ops", "meta"),
    )

    def cpu_table(self) -> str:
        """CPU seconds spent per workload by each mount process and by the shared
        services while serving it: load-independent evidence of where time goes."""
        d = self.results["details"]
        lines = [
            "| CPU seconds (mean per round) | chunkfs mount | JuiceFS mount | SeaweedFS (c / j) "
            "| Redis (c / j) | client (c / j) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]

        def mean_cpu(key: str, fs: str) -> dict[str, float] | None:
            rounds = [r["cpu"] for r in d.get(key, {}).get(fs) or [] if r.get("cpu")]
            if not rounds:
                return None
            return {k: statistics.fmean(r[k] for r in rounds) for k in rounds[0]}

        for label, key in self.CPU_ROWS:
            c = mean_cpu(key, "chunkfs")
            j = mean_cpu(key, "juicefs")
            if not c and not j:
                continue
            c, j = c or {}, j or {}

            def pair(k: str, c: dict[str, float] = c, j: dict[str, float] = j) -> str:
                return f"{_fmt(c.get(k))} / {_fmt(j.get(k))}"

            lines.append(
                f"| {label} | {_fmt(c.get('mount'))} | {_fmt(j.get('mount'))} | "
                f"{pair('seaweedfs')} | {pair('redis')} | {pair('client')} |"
            )
        return "\n".join(lines)

    def describe_run(self) -> str:
        loads = [
            r["loadavg"]
            for per in self.results["details"].values()
            if isinstance(per, dict)
            for v in per.values()
            if isinstance(v, list)
            for r in v
            if isinstance(r, dict) and r.get("loadavg") is not None
        ]
        text = (
            f"{human(self.size)} file, {self.args.small_files} small files, "
            f"{self.args.meta_dirs} dirs, best of {self.args.rounds} round(s), "
            f"{os.cpu_count()} CPUs"
        )
        if loads:
            text += f", 1-min load average during workloads {min(loads):.1f}-{max(loads):.1f}"
        return text

    def write_json(self, path: Path) -> None:
        self.results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.results["elapsed_s"] = time.monotonic() - self.t_start
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.results, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------- main


def preflight(only: Iterable[str]) -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (FUSE mounts, /proc/sys/vm/drop_caches)")
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing")
    bindir = str(Path(sys.executable).parent)
    path = os.pathsep.join([bindir, os.environ.get("PATH", "")])
    needed = ["redis-server", "weed", "fusermount3"]
    needed += ["chunkfs"] if "chunkfs" in only else []
    needed += ["juicefs"] if "juicefs" in only else []
    for binary in needed:
        if shutil.which(binary, path=path) is None:
            problems.append(f"{binary} not found")
    if problems:
        raise SystemExit("bench: " + "; ".join(problems))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--size",
        type=parse_size,
        default=None,
        help="size of the sequential file (default 1GiB; --quick: 256MiB)",
    )
    p.add_argument(
        "--small-files", type=int, default=None, help="number of 4 KiB files (default 5000; --quick: 1000)"
    )
    p.add_argument(
        "--meta-dirs",
        type=int,
        default=None,
        help="directories for the metadata workload (default 1000; --quick: 300)",
    )
    p.add_argument(
        "--random-reads", type=int, default=None, help="random 4 KiB reads (default 3000; --quick: 1000)"
    )
    p.add_argument("--quick", action="store_true", help="a fast smoke run with small sizes")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON results file (default bench/results/<time>.json)"
    )
    p.add_argument(
        "--workdir",
        help="directory for services, caches and mountpoints "
        "(default: a new temporary directory, deleted afterwards)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--only",
        choices=["chunkfs", "juicefs"],
        action="append",
        help="run one filesystem only (repeatable; default both)",
    )
    p.add_argument(
        "--chunkfs-options",
        default=None,
        help="extra chunkfs mount -o options (default: none, i.e. defaults)",
    )
    p.add_argument("--cache-size", default=None, help="chunkfs --cache-size (default: its own)")
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="run every workload this many times, interleaved, and report the best (default 2; --quick: 1)",
    )
    p.add_argument(
        "--ttfb-runs",
        type=int,
        default=3,
        help="repetitions of the first-byte measurement (median; default 3)",
    )
    p.add_argument(
        "--s3-concurrency",
        type=int,
        default=16,
        help="parallel requests of the raw S3 measurement (default 16)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quick = args.quick
    args.size = args.size or (256 * MiB if quick else 1 << 30)
    args.small_files = args.small_files or (1000 if quick else 5000)
    args.meta_dirs = args.meta_dirs or (300 if quick else 1000)
    args.random_reads = args.random_reads or (1000 if quick else 3000)
    args.only = args.only or ["chunkfs", "juicefs"]
    args.rounds = args.rounds or (1 if quick else 2)
    if args.size < 4 * MiB or args.size % MiB:
        raise SystemExit("bench: --size must be a multiple of 1MiB and at least 4MiB")
    out = args.out or ROOT / "bench" / "results" / time.strftime("%Y%m%d-%H%M%S.json")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    preflight(args.only)

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    bench = Bench(args)
    interrupted = False
    try:
        bench.run()
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted; tearing down")
    except Exception as e:  # noqa: BLE001 - report, then tear down
        bench.error("bench", e)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.teardown()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    bench.finalize()
    table = bench.table()
    cpu = bench.cpu_table()
    bench.write_json(out)
    print(f"\n## chunkfs vs JuiceFS ({bench.describe_run()})\n")
    print(
        "ratio = chunkfs/JuiceFS for rates, JuiceFS/chunkfs for times and memory: "
        "> 1.0 means chunkfs is better.\n"
    )
    print(table)
    print("\n" + cpu)
    if bench.results["errors"]:
        print("\nerrors:\n" + "\n".join(f"- {e}" for e in bench.results["errors"]))
    print(f"\nJSON results: {out}")
    if interrupted:
        return 130
    return 1 if bench.results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
