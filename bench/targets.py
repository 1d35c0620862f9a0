"""The two filesystems under test, behind one small interface.

A target formats/creates its filesystem on the shared Redis + SeaweedFS, mounts it (the
ordinary detached command, or in the foreground for the time-to-first-byte measurement),
finds the process that serves FUSE, records that process's peak RSS (VmHWM) at the end of
every mount session, and unmounts. Every process it starts is tracked by PID, and only
those PIDs are ever signalled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("bench")


class BenchError(RuntimeError):
    pass


def read_proc_status(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS of pid in KiB (empty if the process is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of pid (its threads included) in seconds; 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def is_mounted(mountpoint: str | Path) -> bool:
    """Both filesystems number their root inode 1; the parent is on another device."""
    mp = str(mountpoint)
    try:
        st = os.stat(mp)
        parent = os.stat(os.path.dirname(mp.rstrip("/")) or "/")
    except OSError:
        return False
    return st.st_ino == 1 and st.st_dev != parent.st_dev


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def processes_naming(mountpoint: str, word: str) -> list[int]:
    """PIDs whose command line contains ``word`` and has ``mountpoint`` as an argument."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        # JuiceFS rewrites its argv into one space-separated string (to hide secrets).
        args = " ".join(_cmdline(int(entry))).split()
        if args and any(word in a for a in args[:3]) and mountpoint in args:
            if pid_alive(int(entry)):
                found.append(int(entry))
    return found


@dataclass
class Session:
    """One mount process lifetime and its peak memory."""

    label: str
    pid: int
    extra_pids: list[int] = field(default_factory=list)
    vmhwm_kib: int | None = None
    extra_vmhwm_kib: int | None = None
    served: list[str] = field(default_factory=list)  # the workloads run on this mount


class Target:
    name = "?"
    label = "?"

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.work = work
        self.env = env
        self.mountpoint = work / "mnt"
        self.logs = work / "logs"
        self.cache_root = work / "cache"
        self.cache_dir = self.cache_root / "c0"
        self.sessions: list[Session] = []
        self.current: Session | None = None
        self.phase = "setup"
        self._foreground: subprocess.Popen[bytes] | None = None
        self._cache_gen = 0
        for d in (self.mountpoint, self.logs, self.cache_root):
            d.mkdir(parents=True, exist_ok=True)

    # -- subclass interface
    def setup(self) -> None:
        raise NotImplementedError

    def mount_args(self, cache_dir: Path, foreground: bool) -> list[str]:
        raise NotImplementedError

    def umount_args(self) -> list[str]:
        raise NotImplementedError

    def find_pids(self) -> tuple[int, list[int]]:
        """(the FUSE-serving pid, other pids of this mount such as a supervisor)."""
        raise NotImplementedError

    # -- common
    def run(self, args: list[str], timeout: float = 300.0, check: bool = True) -> str:
        proc = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise BenchError(
                f"{self.name}: {' '.join(args[:3])} failed ({proc.returncode}): " + " | ".join(tail)
            )
        return proc.stdout

    @property
    def mounted(self) -> bool:
        return self.current is not None

    def new_cache_dir(self) -> Path:
        """A fresh, empty cache directory (a new node); the old one is deleted."""
        old = self.cache_dir
        self._cache_gen += 1
        self.cache_dir = self.cache_root / f"c{self._cache_gen}"
        shutil.rmtree(old, ignore_errors=True)
        self.cache_dir.mkdir(parents=True)
        return self.cache_dir

    def _start_session(self) -> None:
        pid, extra = self.find_pids()
        self.current = Session(label=self.phase, pid=pid, extra_pids=extra)

    def mount(self) -> float:
        """The ordinary (detached) mount command; returns its wall time."""
        if self.mounted:
            raise BenchError(f"{self.name} is already mounted")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        self.run(self.mount_args(self.cache_dir, foreground=False), timeout=120)
        elapsed = time.perf_counter() - t0
        if not is_mounted(self.mountpoint):
            raise BenchError(f"{self.name}: mount command returned but {self.mountpoint} is not mounted")
        self._start_session()
        return elapsed

    def mount_foreground(self, timeout: float = 60.0) -> float:
        """Start the mount in the foreground; return once the mountpoint is live
        (seconds since the command was started)."""
        if self.mounted:
            raise BenchError(f"{self.name} is already mounted")
        logf = open(self.logs / f"foreground-{self._cache_gen}.log", "ab")  # noqa: SIM115
        t0 = time.perf_counter()
        with logf:
            self._foreground = subprocess.Popen(
                self.mount_args(self.cache_dir, foreground=True), env=self.env,
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True)  # fmt: skip
        deadline = t0 + timeout
        while not is_mounted(self.mountpoint):
            if self._foreground.poll() is not None:
                raise BenchError(f"{self.name}: foreground mount exited with {self._foreground.returncode}")
            if time.perf_counter() > deadline:
                raise BenchError(f"{self.name}: not mounted after {timeout:.0f}s")
            time.sleep(0.002)
        elapsed = time.perf_counter() - t0
        self._start_session()
        return elapsed

    def record_peak(self) -> None:
        s = self.current
        if s is None:
            return
        s.vmhwm_kib = read_proc_status(s.pid).get("VmHWM", s.vmhwm_kib)
        for p in s.extra_pids:
            hwm = read_proc_status(p).get("VmHWM")
            if hwm is not None:
                s.extra_vmhwm_kib = max(s.extra_vmhwm_kib or 0, hwm)

    def umount(self, timeout: float = 300.0) -> float:
        """Record the session's peak RSS, unmount (flushes), wait for the process(es) to
        exit; returns the wall time."""
        s = self.current
        if s is None:
            return 0.0
        self.record_peak()
        t0 = time.perf_counter()
        self.run(self.umount_args(), timeout=timeout)
        if not wait_gone([s.pid, *s.extra_pids], timeout):
            raise BenchError(f"{self.name}: mount process {s.pid} still running after umount")
        if self._foreground is not None:
            self._foreground.wait(timeout=10)
            self._foreground = None
        elapsed = time.perf_counter() - t0
        self.sessions.append(s)
        self.current = None
        return elapsed

    def force_cleanup(self) -> None:
        """Best effort on failure: unmount, lazily if need be, and kill our processes."""
        s = self.current
        if s is not None:
            self.record_peak()
            with contextlib.suppress(Exception):
                self.run(self.umount_args(), timeout=120, check=False)
            pids = [s.pid, *s.extra_pids]
            if not wait_gone(pids, 30):
                for p in pids:
                    with contextlib.suppress(OSError):
                        if pid_alive(p):
                            log.warning("killing %s mount process %d", self.name, p)
                            os.kill(p, signal.SIGKILL)
                wait_gone(pids, 10)
            self.sessions.append(s)
            self.current = None
        if self._foreground is not None:
            with contextlib.suppress(Exception):
                if self._foreground.poll() is None:
                    self._foreground.kill()
                self._foreground.wait(timeout=10)
            self._foreground = None
        if os.path.ismount(self.mountpoint):
            subprocess.run(
                ["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True, check=False
            )

    def cpu(self) -> float:
        """CPU seconds used so far by this mount's process(es)."""
        s = self.current
        if s is None:
            return 0.0
        return sum(cpu_seconds(p) for p in [s.pid, *s.extra_pids])

    def peak(self) -> tuple[int | None, str | None]:
        """(max VmHWM over all sessions in KiB, the session label where it happened)."""
        best: tuple[int | None, str | None] = (None, None)
        for s in self.sessions + ([self.current] if self.current else []):
            if s.vmhwm_kib is not None and (best[0] is None or s.vmhwm_kib > best[0]):
                best = (s.vmhwm_kib, s.label)
        return best

    def status(self) -> dict[str, Any] | None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"sessions": [vars(s) for s in self.sessions]}


class ChunkfsTarget(Target):
    name = "chunkfs"
    label = "chunkfs"
    volume = "bench"

    def __init__(
        self,
        work: Path,
        env: dict[str, str],
        capacity: str,
        mount_options: str | None = None,
        cache_size: str | None = None,
    ) -> None:
        super().__init__(work, env)
        self.capacity = capacity
        self.mount_options = mount_options
        self.cache_size = cache_size
        # the mounts' control sockets and the zygote's socket: a root-only directory of ours
        self.run_dir = work / "run"
        self.run_dir.mkdir(mode=0o700, exist_ok=True)
        self.run_dir.chmod(0o700)
        self.env = {**env, "CHUNKFS_RUN_DIR": str(self.run_dir)}
        self.zygote: subprocess.Popen[bytes] | None = None
        self.use_zygote = False  # `chunkfs mount` hands the mount to the zygote (if running)

    def start_zygote(self, timeout: float = 60.0) -> float:
        """Start `chunkfs zygote`, as the node plugin keeps one; return once it answers
        (seconds it took to warm up)."""
        from chunkfs import zygote

        logf = open(self.logs / "zygote.log", "ab")  # noqa: SIM115
        t0 = time.perf_counter()
        with logf:
            self.zygote = subprocess.Popen(
                ["chunkfs", "zygote", "--run-dir", str(self.run_dir), "--lifeline"], env=self.env,
                stdin=subprocess.PIPE, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True)  # fmt: skip
        while True:
            answer = zygote.ping(str(self.run_dir), timeout=1.0)
            if answer is not None and answer.get("pid") == self.zygote.pid:
                return time.perf_counter() - t0
            if self.zygote.poll() is not None:
                raise BenchError(f"chunkfs zygote exited with {self.zygote.returncode}")
            if time.perf_counter() - t0 > timeout:
                raise BenchError(f"chunkfs zygote not ready after {timeout:.0f}s")
            time.sleep(0.05)

    def stop_zygote(self) -> None:
        proc, self.zygote = self.zygote, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # our own child, by its PID
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def force_cleanup(self) -> None:
        super().force_cleanup()
        self.stop_zygote()

    def setup(self) -> None:
        self.run(["chunkfs", "volume", "create", self.volume, "--capacity", self.capacity])

    def mount_args(self, cache_dir: Path, foreground: bool) -> list[str]:
        args = [
            "chunkfs",
            "mount",
            self.volume,
            str(self.mountpoint),
            "--cache-dir",
            str(cache_dir),
            "--log-file",
            str(self.logs / "mount.log"),
        ]
        if self.cache_size:
            args += ["--cache-size", self.cache_size]
        if self.mount_options:
            args += ["-o", self.mount_options]
        if foreground:
            args.append("--foreground")
        elif not self.use_zygote:
            args.append("--no-zygote")
        return args

    def umount_args(self) -> list[str]:
        return ["chunkfs", "umount", str(self.mountpoint)]

    def status(self) -> dict[str, Any] | None:
        try:
            with open(self.mountpoint / ".chunkfs.status", "rb") as f:
                return json.loads(f.read())
        except (OSError, ValueError):
            return None

    def find_pids(self) -> tuple[int, list[int]]:
        st = self.status()
        if st and st.get("pid"):
            return int(st["pid"]), []
        pids = processes_naming(str(self.mountpoint), "python")
        if len(pids) != 1:
            raise BenchError(f"chunkfs: cannot identify the mount process ({pids})")
        return pids[0], []

    def snapshot(self, name: str) -> float:
        t0 = time.perf_counter()
        self.run(["chunkfs", "snapshot", "create", self.volume, name], timeout=600)
        return time.perf_counter() - t0


class JuiceFSTarget(Target):
    name = "juicefs"
    label = "JuiceFS"
    volume = "jfsbench"

    def __init__(self, work: Path, env: dict[str, str], meta_url: str, bucket_url: str) -> None:
        super().__init__(work, env)
        self.meta_url = meta_url
        self.bucket_url = bucket_url

    def setup(self) -> None:
        # Keys from the environment (ACCESS_KEY / SECRET_KEY), not the command line.
        self.run(
            ["juicefs", "format", "--storage", "s3", "--bucket", self.bucket_url, self.meta_url, self.volume]
        )

    def mount_args(self, cache_dir: Path, foreground: bool) -> list[str]:
        # Default options, except: no usage report (no network here) and logs in our dir.
        args = ["juicefs", "mount", "--no-usage-report", "--cache-dir", str(cache_dir)]
        if not foreground:
            args += ["-d", "--log", str(self.logs / "mount.log")]
        return args + [self.meta_url, str(self.mountpoint)]

    def umount_args(self) -> list[str]:
        return ["juicefs", "umount", str(self.mountpoint)]

    def find_pids(self) -> tuple[int, list[int]]:
        pids: list[int] = []
        for _ in range(50):
            pids = processes_naming(str(self.mountpoint), "juicefs")
            if pids:
                break
            time.sleep(0.05)
        if not pids:
            raise BenchError("juicefs: cannot find the mount process")
        # `juicefs mount -d` runs a supervisor whose child serves FUSE: the deepest one.
        children = [p for p in pids if _ppid(p) in pids]
        server = children[0] if children else pids[0]
        return server, [p for p in pids if p != server]
