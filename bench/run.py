"""chunkfs vs JuiceFS, side by side, on the same Redis and the same SeaweedFS.

    python -m bench.run [--quick] [--workloads all] [--size 1GiB] [--out FILE.json]

Brings up Redis + SeaweedFS (devstack.localstack) in a temporary directory and a counting
S3 proxy in front of SeaweedFS (bench.s3proxy), creates a chunkfs volume (Redis db 1) and
formats a JuiceFS volume (Redis db 2, its own bucket), mounts both with their default
options, each reaching S3 through its own proxy port, runs the same workloads on both
(bench.workloads and bench.apps, in child processes: plain POSIX I/O, git, tar, SQLite),
prints a Markdown table of both figures and their ratio (oriented so that > 1.0 means
chunkfs is better) and of what each workload cost (CPU seconds, S3 requests and bytes),
writes every detail as JSON, and tears everything down, also on failure and Ctrl-C.
Needs root (mounts, drop_caches).
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
from pathlib import Path
from typing import Any

from bench import plan, report
from bench.plan import human
from bench.s3proxy import ProxyProcess, diff_counters
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
    try:
        value = float(num) * units[unit]
    except (KeyError, ValueError):
        value = -1.0
    if not 0 <= value < 1 << 62:  # also NaN and inf
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 256MiB, 1GiB)")
    return int(value)


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
                "chunkfs_mount_options": args.chunkfs_options, "workloads": args.workloads,
                "app_files": args.app_files, "sqlite_commits": args.sqlite_commits,
                "log_appends": args.log_appends, "wal_appends": args.wal_appends,
                "page_writes": args.page_writes, "page_file_size": args.page_file_size,
                "s3_proxy": not args.no_s3_proxy,
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
        self.proxy: ProxyProcess | None = None
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
        """The reported figure of each key (bench.report.aggregate: the best round, the
        worst for peak memory), and the best raw S3 figures."""
        self.results["workloads"] = report.aggregate(self.rows(), self.samples)
        self.results["samples"] = self.samples
        raws = self.results.get("raw_s3_rounds") or []
        if raws:
            passes = [r.get("get_passes", {}) for r in raws]
            direct = [p["direct"]["get_mib_s"] for p in passes if "direct" in p]
            self.results["raw_s3"] = {
                "put_mib_s": max(r["put_mib_s"] for r in raws),
                "get_mib_s": max(r["get_mib_s"] for r in raws),
                "direct_get_mib_s": max(direct) if direct else None,
                "via": " through the counting proxy" if self.proxy is not None else "",
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
        Redis, the workload itself and the S3 proxy used meanwhile (``cpu``), the S3
        requests and bytes of t's mount meanwhile (``s3``; requests still in flight when
        the workload ends count too), and the load average."""
        if not t.mounted:
            raise BenchError(f"{t.name} is not mounted")
        if t.current is not None:
            what = spec["op"] + (f" {spec['phase']}" if "phase" in spec else "")
            t.current.served.append(f"{what} (round {self.round + 1})")
        s3_before = self.proxy.counters() if self.proxy else None
        before = self._cpu(t)
        res = self.child("bench.workloads", spec, timeout=timeout)
        if self.proxy is not None:
            res["s3"] = diff_counters(s3_before or {}, self.proxy.quiesce(t.name), t.name)
        after = self._cpu(t)
        res["cpu"] = {k: round(after[k] - before[k], 3) for k in before}
        res["loadavg"] = os.getloadavg()[0]
        return res

    def _cpu(self, t: Target) -> dict[str, float]:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = {
            "mount": t.cpu(),
            "seaweedfs": cpu_seconds(self.stack.s3.pid),
            "redis": cpu_seconds(self.stack.redis.pid),
            "client": children.ru_utime + children.ru_stime,
        }
        if self.proxy is not None:
            out["proxy"] = cpu_seconds(self.proxy.pid)
        return out

    def settle_s3(self, t: Target) -> None:
        """After untimed work on t (set-up, clean-up): let its trailing S3 requests end
        before the next workload starts counting."""
        if self.proxy is not None:
            self.proxy.quiesce(t.name)

    def remove(self, t: Target, *paths: Path) -> None:
        """Delete what a workload left on t (untimed, outside every measured window)."""
        for p in paths:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif os.path.lexists(p):
                p.unlink()
        self.settle_s3(t)

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
        from devstack.localstack import LocalStack

        self.work = Path(self.args.workdir or tempfile.mkdtemp(prefix="chunkfs-bench-"))
        self.work.mkdir(parents=True, exist_ok=True)
        log.info("work directory %s", self.work)
        self.stack = LocalStack(self.work / "stack", die_with_parent=True)
        self.stack.up()
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL_S3"}
        self.base_env = {**env, "PATH": path, "PYTHONPATH": str(ROOT), **self.stack.s3.env()}
        endpoint = {"chunkfs": self.stack.s3.endpoint, "juicefs": self.stack.s3.endpoint}
        if not self.args.no_s3_proxy:
            self.proxy = ProxyProcess(
                f"{self.stack.s3.host}:{self.stack.s3.port}", ["chunkfs", "juicefs", "raw"],
                self.work / "s3proxy.log", env=self.base_env, cwd=ROOT,
            )  # fmt: skip
            self.proxy.start()
            endpoint = {name: self.proxy.url(name) for name in endpoint}
            log.info("S3 counting proxy pid %d: %s", self.proxy.pid, self.proxy.ports)
        chunk_env = {
            **self.base_env,
            **self.stack.env(prefix="bench", db=1),
            "AWS_ENDPOINT_URL": endpoint["chunkfs"],
        }
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
            f"{endpoint['juicefs']}/jfsbench",
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
        if self.proxy is not None:
            try:
                self.proxy.stop()
            except Exception as e:  # noqa: BLE001
                self.error("stopping the S3 proxy", e)
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

    @property
    def raw_endpoint(self) -> str:
        """Where the raw S3 measurements go: through the proxy when the mounts do."""
        return self.proxy.url("raw") if self.proxy is not None else self.stack.s3.endpoint

    def run_raw_s3(self) -> None:
        """aiobotocore PUT and GET of --size bytes: GETs through the counting proxy (the
        path the mounts take, so the ceiling a cold read is compared with) and directly."""

        def go() -> None:
            gets = {"direct": self.stack.s3.endpoint}
            if self.proxy is not None:
                gets = {"proxy": self.raw_endpoint, **gets}
            res = self.child("bench.s3raw", {
                "bucket": "chunkfs", "prefix": "rawbench", "size": self.size,
                "concurrency": self.args.s3_concurrency, "seed": self.seed,
                "salt": 99 + self.round, "get_endpoints": gets,
            }, env={**self.base_env, "AWS_ENDPOINT_URL": self.raw_endpoint},
               timeout=self.io_timeout)  # fmt: skip
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
                 f"{self.raw_endpoint}/objbench"],
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

    def run_warm_and_random(self, do_warm: bool = True, do_rand: bool = True) -> None:
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

            if do_warm:
                self.step(f"warm read{self.tag} [{t.name}]", warm)
            if do_rand:
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

    # ---------------------------------------------------------------- applications
    @property
    def scratch(self) -> Path:
        """Local-disk directory of the source tree, its repository and its archive."""
        assert self.work is not None
        return self.work / "scratch"

    def app_dir(self, t: Target) -> Path:
        return t.mountpoint / "apps" / f"round-{self.round}"

    def run_prepare_apps(self) -> bool:
        """Build the source tree, a bare repository of it and a tar of it, on local disk."""

        def go() -> None:
            spec = {"op": "apps_prepare", "scratch": str(self.scratch), "files": self.args.app_files,
                    "seed": self.seed}  # fmt: skip
            self.results["apps_source"] = self.child("bench.workloads", spec, timeout=900)

        return self.step("prepare repository + archive", go)

    @property
    def app_timeout(self) -> float:
        return max(600.0, self.args.app_files / 5)

    def run_git(self) -> None:
        """git clone, git status (cold, then warm), rm -rf: each phase its own window."""
        for t in self.order(3):

            def go(t: Target = t) -> None:
                self.ensure_mounted(t, "git")
                dest = self.app_dir(t) / "clone"
                spec = {"op": "git", "scratch": str(self.scratch), "dest": str(dest)}
                drop_caches()
                res = self.workload(t, {**spec, "phase": "clone"}, timeout=self.app_timeout)
                self.put("git_clone", t.name, res["clone"]["seconds"], res)
                self.child("bench.workloads", {**spec, "phase": "verify"}, timeout=self.app_timeout)
                self.settle_s3(t)
                res = self.workload(t, {**spec, "phase": "status"}, timeout=self.app_timeout)
                self.put("git_status", t.name, res["status_cold"]["seconds"], res)
                self.put("git_status_warm", t.name, res["status_warm"]["seconds"])
                res = self.workload(t, {**spec, "phase": "remove"}, timeout=self.app_timeout)
                self.put("git_remove", t.name, res["remove"]["seconds"], res)

            self.step(f"git clone/status/rm{self.tag} [{t.name}]", go)

    def run_untar(self) -> None:
        for t in self.order(4):

            def go(t: Target = t) -> None:
                self.ensure_mounted(t, "untar")
                dest = self.app_dir(t) / "untar"
                spec = {"op": "untar", "scratch": str(self.scratch), "dest": str(dest)}
                drop_caches()
                res = self.workload(t, {**spec, "phase": "extract"}, timeout=self.app_timeout)
                self.put("untar", t.name, res["seconds"], res)
                self.child("bench.workloads", {**spec, "phase": "verify"}, timeout=self.app_timeout)
                self.remove(t, dest)

            self.step(f"tar -xf + syncfs{self.tag} [{t.name}]", go)

    def run_sqlite(self) -> None:
        for k, mode in enumerate(("delete", "wal")):
            for t in self.order(5 + k):

                def go(t: Target = t, mode: str = mode) -> None:
                    self.ensure_mounted(t, "sqlite")
                    d = self.app_dir(t)
                    d.mkdir(parents=True, exist_ok=True)
                    db = d / f"{mode}.sqlite"
                    spec = {"op": "sqlite", "path": str(db), "mode": mode, "n": self.args.sqlite_commits,
                            "seed": self.seed}  # fmt: skip
                    res = self.workload(t, spec, timeout=self.app_timeout)
                    self.put(f"sqlite_{mode}", t.name, res["ops_s"], res)
                    self.remove(t, *(Path(f"{db}{x}") for x in ("", "-journal", "-wal", "-shm")))

                self.step(f"sqlite {mode}{self.tag} [{t.name}]", go)

    def run_append(self, key: str, n: int, record: int, sync: str, k: int) -> None:
        for t in self.order(k):

            def go(t: Target = t) -> None:
                self.ensure_mounted(t, key)
                d = self.app_dir(t)
                d.mkdir(parents=True, exist_ok=True)
                path = d / f"{key}.log"
                spec = {"op": "append", "path": str(path), "n": n, "record": record, "sync": sync,
                        "seed": self.seed, "salt": self.round}  # fmt: skip
                res = self.workload(t, spec, timeout=self.app_timeout)
                self.put(key, t.name, res["ops_s"], res)
                self.remove(t, path)

            self.step(f"{key.replace('_', ' ')}{self.tag} [{t.name}]", go)

    def run_pages(self) -> None:
        for t in self.order(9):

            def go(t: Target = t) -> None:
                self.ensure_mounted(t, "pages")
                d = self.app_dir(t)
                d.mkdir(parents=True, exist_ok=True)
                path = d / "pages.db"
                spec = {"op": "pages", "path": str(path), "size": self.args.page_file_size,
                        "n": self.args.page_writes, "seed": self.seed, "salt": 500 + self.round}  # fmt: skip
                timeout = max(self.app_timeout, self.args.page_file_size / MiB)
                res = self.workload(t, {**spec, "phase": "fill"}, timeout=timeout)
                self.results["details"].setdefault("page_fill", {}).setdefault(t.name, []).append(res)
                res = self.workload(t, {**spec, "phase": "overwrite"}, timeout=timeout)
                self.put("page_overwrite", t.name, res["ops_s"], res)
                self.remove(t, path)

            self.step(f"page overwrites{self.tag} [{t.name}]", go)

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
        ordinary detached mount command (which returns once the mount is ready). Each run
        also records the mount process's CPU seconds from its start to the first byte
        and the S3 requests made meanwhile."""
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        chunk = next((t for t in self.targets if isinstance(t, ChunkfsTarget)), None)
        if chunk is not None:
            self.step("start chunkfs zygote", lambda: self.results["details"].setdefault(
                "zygote", {}).update(warm_up_s=chunk.start_zygote()))
        for rep in range(self.args.ttfb_runs):
            self.round = rep
            for t in self.order(0):
                staged = ("staged",) if t is chunk and chunk.zygote is not None else ()
                for mode in ("foreground", "detached", *staged):

                    def go(t: Target = t, mode: str = mode) -> None:
                        if t.mounted:
                            t.umount()
                        t.new_cache_dir()
                        drop_caches()
                        t.phase = f"ttfb {mode}"
                        s3_before = self.proxy.counters() if self.proxy else None
                        if isinstance(t, ChunkfsTarget):
                            t.use_zygote = mode == "staged"
                        t0 = time.perf_counter()
                        mount_s = t.mount_foreground() if mode == "foreground" else t.mount()
                        total = self._first_byte(t) - t0
                        if isinstance(t, ChunkfsTarget):
                            t.use_zygote = False
                        run: dict[str, Any] = {
                            "mounted_ms": mount_s * 1000,
                            "first_byte_ms": total * 1000,
                            "cpu": {"mount": t.cpu()},
                            "loadavg": os.getloadavg()[0],
                        }
                        if self.proxy is not None:
                            run["s3"] = diff_counters(s3_before or {}, self.proxy.counters(), t.name)
                        if t.current is not None:
                            t.current.served.append("first byte")
                        runs.setdefault((mode, t.name), []).append(run)
                        if mode == "foreground":
                            t.umount()

                    self.step(f"first byte, {mode} #{rep + 1} [{t.name}]", go)
        if chunk is not None:
            self.step("stop chunkfs zygote", chunk.stop_zygote)
        keys = {"foreground": "ttfb_foreground_ms", "detached": "ttfb_ms", "staged": "ttfb_staged_ms"}
        for (mode, name), values in runs.items():
            # staging on a node: chunkfs forks the node's zygote, JuiceFS runs its mount command
            staged = ["ttfb_staged_ms"] if mode == "detached" and name != "chunkfs" else []
            for key in [keys[mode], *staged]:
                self.put(key, name, statistics.median(v["first_byte_ms"] for v in values))
                self.results["details"].setdefault(key, {})[name] = values
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
        chosen = set(self.args.workloads)
        self.setup()
        apps_ready = bool(chosen & {"git", "untar"}) and self.run_prepare_apps()
        for rnd in range(self.args.rounds):
            self.round = self.big_round = rnd
            if "write" in chosen:
                self.run_write()
                if rnd == 0:
                    self.run_snapshot("one-big-file", 1, f"volume with 1 file of {human(self.size)}")
            if "raw-s3" in chosen:
                self.run_raw_s3()
                if rnd == 0:
                    self.run_objbench()
            if "cold-read" in chosen:
                self.run_cold_read()
            if chosen & {"warm-read", "random-read"}:
                self.run_warm_and_random(do_warm="warm-read" in chosen, do_rand="random-read" in chosen)
            if "small-files" in chosen:
                self.run_small_files()
            if "metadata" in chosen:
                self.run_meta()
            if apps_ready and "git" in chosen:
                self.run_git()
            if apps_ready and "untar" in chosen:
                self.run_untar()
            if "sqlite" in chosen:
                self.run_sqlite()
            if "log-append" in chosen:
                self.run_append("log_append", self.args.log_appends, 120, "fsync", 7)
            if "wal-append" in chosen:
                self.run_append("wal_append", self.args.wal_appends, 4096, "fdatasync", 8)
            if "page-overwrite" in chosen:
                self.run_pages()
        if "first-byte" in chosen:
            self.run_ttfb()
        self.finish()

    # ---------------------------------------------------------------- report
    def rows(self) -> list[report.Row]:
        return plan.rows(self.args)

    def shown_rows(self) -> list[report.Row]:
        """The rows that have a figure for at least one filesystem."""
        w = self.results["workloads"]
        return [r for r in self.rows() if w.get(r.key)]

    def table(self) -> str:
        text, records = report.main_table(self.shown_rows(), self.results)
        self.results["table"] = records
        return text

    def cost_tables(self) -> str:
        rows = self.rows()
        d = self.results["details"]
        return report.cost_table(rows, d) + "\n\n" + report.services_table(rows, d)

    def describe_run(self) -> str:
        text = (
            f"{human(self.size)} file, {self.args.small_files} small files, "
            f"{self.args.meta_dirs} dirs, {self.args.app_files}-file repository, "
            f"best of {self.args.rounds} round(s), {os.cpu_count()} CPUs"
        )
        loads = report.load_range(self.results["details"])
        if loads:
            text += f", 1-min load average during workloads {loads[0]:.1f}-{loads[1]:.1f}"
        if self.proxy is None:
            text += ", S3 not counted (--no-s3-proxy)"
        return text

    def write_json(self, path: Path) -> None:
        self.results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.results["elapsed_s"] = time.monotonic() - self.t_start
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.results, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------- main


def byte_compile() -> None:
    """Compile chunkfs's modules as an installed package has them (pip does, the image
    does): a development tree run with PYTHONDONTWRITEBYTECODE would otherwise make every
    chunkfs command and mount compile its own source, a cost no deployment pays."""
    import compileall

    import chunkfs

    compileall.compile_dir(os.path.dirname(chunkfs.__file__), quiet=1)


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


def _workloads(text: str) -> list[str]:
    try:
        return plan.parse_workloads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = plan.DEFAULTS

    def sized(flag: str, what: str, kind: Callable[[str], Any] = int) -> None:
        full, quick = d[flag.lstrip("-").replace("-", "_")]
        if kind is parse_size:
            full, quick = human(full), human(quick)
        p.add_argument(flag, type=kind, default=None, help=f"{what} (default {full}; --quick: {quick})")

    p.add_argument(
        "--workloads",
        type=_workloads,
        default=list(plan.WORKLOADS),
        help="comma-separated workloads and groups to run (default all): "
        + ", ".join([*plan.GROUPS, *plan.WORKLOADS]),
    )
    sized("--size", "size of the sequential file", parse_size)
    sized("--small-files", "number of 4 KiB files")
    sized("--meta-dirs", "directories for the metadata workload")
    sized("--random-reads", "random 4 KiB reads")
    sized("--app-files", "files of the repository (git) and of the archive (untar)")
    sized("--sqlite-commits", "SQLite transactions per journal mode")
    sized("--log-appends", "120 B appends + fsync of the log workload")
    sized("--wal-appends", "4 KiB appends + fdatasync of the write-ahead log workload")
    sized("--page-writes", "random 4 KiB page overwrites + fsync")
    sized("--page-file-size", "size of the file the pages are overwritten in", parse_size)
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
    sized("--rounds", "run every workload this many times, interleaved, and report the best")
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
    p.add_argument(
        "--no-s3-proxy",
        action="store_true",
        help="connect the mounts straight to SeaweedFS: no S3 request counts, no proxy hop",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.only = args.only or ["chunkfs", "juicefs"]
    try:
        plan.apply_defaults(args)
    except ValueError as e:
        raise SystemExit(f"bench: {e}") from None
    out = args.out or ROOT / "bench" / "results" / time.strftime("%Y%m%d-%H%M%S.json")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    preflight(args.only)
    byte_compile()

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
    costs = bench.cost_tables()
    bench.write_json(out)
    print(f"\n## chunkfs vs JuiceFS ({bench.describe_run()})\n")
    print(
        "ratio = chunkfs/JuiceFS for rates, JuiceFS/chunkfs for times and memory: "
        "> 1.0 means chunkfs is better.\n"
    )
    print(table)
    print("\n" + costs)
    if bench.results["errors"]:
        print("\nerrors:\n" + "\n".join(f"- {e}" for e in bench.results["errors"]))
    print(f"\nJSON results: {out}")
    if interrupted:
        return 130
    return 1 if bench.results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
