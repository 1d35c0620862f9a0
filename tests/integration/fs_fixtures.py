"""Fixtures and helpers for the filesystem / CLI / fault tests: real `chunkfs` mounts.

Import the fixtures into a test module (pytest finds fixtures, and the fixtures they
depend on, by name in the module's namespace); helpers are imported by name:

    from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures (see __all__)
    from tests.integration.fs_fixtures import MiB, Mounter, wait_until

  cli          function  Cli: runs the `chunkfs` command against this test's fresh backends
  volume       function  name of a fresh 1 GiB volume ("vol") on those backends
  mounter      function  Mounter: mount/umount/kill mounts; every mount is undone at teardown
  mnt          function  Mount of `volume` (default options, its own cache dir)
  shared_mnt   module    one Mount shared by a whole module (unique volume on Redis db 0)
  work         function  a fresh directory inside shared_mnt for one test
  mount_base   session   the 0755 directory under /tmp for mount points and cache dirs
  mount_logs   session   where mount logs go (kept in pytest's tmp dir for post-mortems)
  redis_proxy  function  FaultProxy in front of this test's Redis db (.url: a CHUNKFS_META)
  s3_proxy     function  FaultProxy in front of the S3 gateway (.url: an AWS_ENDPOINT_URL)
                         (tests/faultproxy.py: hold_replies, cut, drop, refuse, ...)

Helpers: wait_until (poll, never sleep blindly), start_bounded/run_bounded (a call that
may block in FUSE while a service is SIGSTOPped), assert_one_line_error, run_as (a
snippet as another user), rand_bytes/sha256/file_sha256, cache_block_files.

Every mount point lives under a 0755 directory in /tmp (not in pytest's 0700 tmp dirs)
so that unprivileged users can reach it. Teardown unmounts with `chunkfs umount`, and
falls back to SIGKILL + `fusermount3 -u -z` so that no test leaves a mount behind.

Self-checks (a test whose body passed still fails at teardown when they find something):
  - every volume of the test's backends: `chunkfs fsck NAME --objects` finds nothing
    (``cli`` teardown, after every mount is gone; also volumes mounted with another env
    at ``mounter`` teardown, and the shared volume at the end of its module), and every
    snapshot namespace passes the same check in-process;
  - no mount logged a warning, an error or a line that is not a JSON record (``mounter``
    teardown, per test in ``work`` for the shared mount): S3QL's checklogs habit.
  A test that provokes them on purpose says so, message by message, with a reason:
      @pytest.mark.mount_log_allows("block upload failed", "operation failed",
                                    reason="S3 is stopped on purpose")
      @pytest.mark.fsck_allows(r"object \\w+ is missing", reason="the test deletes it")
  (exact log messages, or the first line of a multi-line one such as asyncio's; fsck
  findings as regular expressions). Nothing else is ignored but KNOWN_DEFECTS, each a
  bug report with its reason.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from chunkfs.meta.schema import SNAPSHOTS, VOLUMES
from devstack.localstack import BUCKET, LocalStack
from tests.faultproxy import FaultProxy

__all__ = ["mount_base", "mount_logs", "cli", "volume", "mounter", "mnt", "shared_cli",
           "shared_mounter", "shared_volume", "shared_mnt", "work", "redis_proxy", "s3_proxy"]

SYSTEM_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
BINDIR = str(Path(sys.executable).parent)
GiB = 1 << 30
MiB = 1 << 20
KiB = 1 << 10


# --------------------------------------------------------------------------- helpers


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05,
               what: str | Callable[[], str] = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy; fail the test after ``timeout``
    (``what`` names the condition; a callable is asked at failure time)."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - polled conditions may fail transiently
            last_exc = exc
        if time.monotonic() > deadline:
            extra = f" (last error: {last_exc!r})" if last_exc else ""
            name = what() if callable(what) else what
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {name}{extra}")
        time.sleep(interval)


def rand_bytes(n: int, seed: int | str = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_file(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def pid_gone(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return text[text.rindex(")") + 2:].split()[0] in ("Z", "X")


def is_mounted(path: str | os.PathLike[str]) -> bool:
    target = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == target:
                return True
    return False


def lazy_unmount(path: str | os.PathLike[str]) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, check=False)


def tree_size(path: str | os.PathLike[str]) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def cache_block_files(cache_dir: str | os.PathLike[str]) -> list[Path]:
    """The block files of a cache dir (CACHE_DIR/blocks/<xx>/<sha256>_<len>)."""
    root = Path(cache_dir, "blocks")
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("*/*") if p.is_file())


def run_as(uid: int, gid: int, code: str, *args: str, timeout: float = 60,
           check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a stdlib-only Python snippet as another user (no supplementary groups)."""
    return subprocess.run([SYSTEM_PYTHON, "-c", code, *args], user=uid, group=gid,
                          extra_groups=[], capture_output=True, text=True, timeout=timeout,
                          check=check, cwd="/", env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})


def stderr_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """A failed command: non-zero status, exactly one line on stderr, no traceback,
    mentioning every needle (case-insensitive)."""
    lines = stderr_lines(proc)
    assert proc.returncode != 0, f"expected failure, got 0; stdout={proc.stdout!r}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr}"
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# --------------------------------------------------------------------------- the CLI


@dataclass
class Cli:
    env: dict[str, str]

    def run(self, *args: str, check: bool = True, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["chunkfs", *args], env=env or self.env, capture_output=True,
                              text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"chunkfs {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def create_volume(self, name: str, capacity: str = "1GiB") -> str:
        self.run("volume", "create", name, "--capacity", capacity)
        return name

    def info(self, name: str) -> dict[str, Any]:
        return json.loads(self.run("volume", "info", name, "--json").stdout)

    def used(self, name: str) -> int:
        return int(self.info(name)["used_bytes"])

    def volume_names(self) -> list[str]:
        return [v["name"] for v in json.loads(self.run("volume", "list", "--json").stdout)]

    def call(self, action: Callable[[Any], Any]) -> Any:
        """Run ``action(VolumeService)`` (a coroutine function) in this process. Use it
        instead of ``run`` while the test holds files open with unsynced data: a `chunkfs`
        subprocess closes its inherited copies of our FUSE fds at exec, and each close
        flushes (commits) the file."""
        import asyncio

        from chunkfs.config import backend_from_env
        from chunkfs.volumes import VolumeService

        async def go() -> Any:
            meta, storage = backend_from_env(None, None, self.env)
            svc = await VolumeService.open(meta, storage)
            try:
                return await action(svc)
            finally:
                await svc.close()

        return asyncio.run(go())


def make_env(base: dict[str, str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CHUNKFS_"))}
    env.update(base)
    env.update(extra)
    env["PATH"] = os.pathsep.join(p for p in (BINDIR, env.get("PATH", "")) if p)
    return env


# --------------------------------------------------------------------------- mounts


@dataclass
class Mount:
    volume: str
    path: Path
    cache_dir: Path
    pid: int
    log_file: Path
    cli: Cli
    options: str | None = None

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, other: str) -> Path:
        return self.path / other

    def status(self) -> dict[str, Any]:
        """`chunkfs status --json`. Careful: running a subprocess closes (in the child) every
        fd this process inherited to it, and each close of a FUSE fd sends a FLUSH: while the
        test holds files open with unsynced data, use ``status_direct``."""
        return json.loads(self.cli.run("status", str(self.path), "--json").stdout)

    def status_direct(self) -> dict[str, Any]:
        """The status document read straight from the mount (no subprocess)."""
        with open(self.path / ".chunkfs.status", "rb") as f:
            return json.loads(f.read())


@dataclass
class Mounter:
    cli: Cli
    base: Path
    log_dir: Path | None = None
    mounts: list[Mount] = field(default_factory=list)
    # every mount this Mounter saw (also those a test registered itself): the self-checks
    history: list[Mount] = field(default_factory=list)
    _n: int = 0

    def _seen(self, m: Mount) -> None:
        if all(m is not h for h in self.history):
            self.history.append(m)

    def new_dir(self, kind: str) -> Path:
        self._n += 1
        path = self.base / f"{kind}{self._n}-{uuid.uuid4().hex[:6]}"
        path.mkdir(mode=0o755)
        path.chmod(0o755)
        return path

    def mount(self, volume: str, *, mountpoint: Path | None = None, cache_dir: Path | None = None,
              options: str | None = None, cache_size: str | None = None,
              env: dict[str, str] | None = None, timeout: float = 120,
              flags: tuple[str, ...] = ()) -> Mount:
        mp = mountpoint or self.new_dir("mp")
        cache = cache_dir or self.new_dir("cache")
        log_file = (self.log_dir or self.base) / f"mount-{mp.name}.log"
        args = ["mount", volume, str(mp), "--cache-dir", str(cache), "--log-file", str(log_file),
                *flags]
        if cache_size:
            args += ["--cache-size", cache_size]
        if options:
            args += ["-o", options]
        self.cli.run(*args, env=env, timeout=timeout)
        assert os.stat(mp).st_ino == 1, "mount returned before the mount was ready"
        pid = int(json.loads((mp / ".chunkfs.status").read_bytes())["pid"])
        m = Mount(volume, mp, cache, pid, log_file, Cli(env) if env else self.cli, options)
        self.mounts.append(m)
        self._seen(m)
        return m

    def umount(self, m: Mount, timeout: float = 120) -> None:
        self._seen(m)
        self.cli.run("umount", str(m.path), "--timeout", str(timeout), timeout=timeout + 10)
        wait_until(lambda: pid_gone(m.pid), 30, what=f"mount process {m.pid} to exit")
        assert not is_mounted(m.path)
        self.mounts.remove(m)

    def remount(self, m: Mount, *, cache_dir: Path | None = None, options: str | None = None,
                **kw: Any) -> Mount:
        self.umount(m)
        return self.mount(m.volume, mountpoint=m.path, cache_dir=cache_dir or m.cache_dir,
                          options=options if options is not None else m.options, **kw)

    def kill(self, m: Mount) -> None:
        """SIGKILL the mount process (a crashed node) and clear the dead mount."""
        self._seen(m)
        with contextlib.suppress(ProcessLookupError):
            os.kill(m.pid, signal.SIGKILL)
        wait_until(lambda: pid_gone(m.pid), 30, what=f"mount process {m.pid} to die")
        lazy_unmount(m.path)
        wait_until(lambda: not is_mounted(m.path), 10, what=f"{m.path} to be unmounted")
        self.mounts.remove(m)

    def cleanup(self) -> list[str]:
        problems = []
        for m in self.mounts:
            self._seen(m)
        for m in reversed(list(self.mounts)):
            with contextlib.suppress(Exception):
                os.kill(m.pid, signal.SIGCONT)
            try:
                proc = self.cli.run("umount", str(m.path), "--timeout", "60", check=False,
                                    timeout=75)
                if proc.returncode != 0:
                    problems.append(f"umount {m.path}: {proc.stderr.strip()}")
                else:
                    deadline = time.monotonic() + 20
                    while not pid_gone(m.pid) and time.monotonic() < deadline:
                        time.sleep(0.05)
            except subprocess.TimeoutExpired:
                problems.append(f"umount {m.path} timed out")
            if not pid_gone(m.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(m.pid, signal.SIGKILL)
            if is_mounted(m.path):
                lazy_unmount(m.path)
            self.mounts.remove(m)
        return problems


@pytest.fixture(scope="session")
def mount_base() -> Iterator[Path]:
    """A 0755 directory under /tmp for mount points and cache dirs (reachable by any user)."""
    base = Path(tempfile.mkdtemp(prefix="chunkfs-it-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    for entry in base.iterdir():
        if entry.is_dir() and is_mounted(entry):
            lazy_unmount(entry)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def mount_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mount logs are kept here (pytest keeps the last runs' tmp dirs) for post-mortems."""
    return tmp_path_factory.mktemp("mount-logs")


@pytest.fixture
def cli(backend_env: dict[str, str], request: pytest.FixtureRequest) -> Iterator[Cli]:
    c = Cli(dict(backend_env))
    yield c
    if body_passed(request.node):  # every mount is gone by now (mounter depends on cli)
        fail_on(fsck_problems(c, request.node), "fsck of the test's volumes")


@pytest.fixture
def volume(cli: Cli) -> str:
    return cli.create_volume("vol", "1GiB")


@pytest.fixture
def mounter(cli: Cli, mount_base: Path, mount_logs: Path,
            request: pytest.FixtureRequest) -> Iterator[Mounter]:
    m = Mounter(cli, mount_base, mount_logs)
    try:
        yield m
    finally:
        problems = m.cleanup()
        if problems:
            pytest.fail("mount teardown: " + "; ".join(problems), pytrace=False)
    if body_passed(request.node):
        allowed = allow_list(request.node, "mount_log_allows")
        logs = {h.log_file: h for h in m.history}
        found = [line for path in logs for line in log_problems(path, 0, allowed)[0]]
        fail_on(found, "unexpected mount log lines", hint=LOG_HINT)
        # volumes mounted with backends of their own (the cli teardown checks its own)
        others = {(tuple(sorted(h.cli.env.items())), h.volume) for h in m.history
                  if h.cli.env != cli.env}
        fail_on([p for env, name in sorted(others)
                 for p in fsck_problems(Cli(dict(env)), request.node, names=[name])],
                "fsck of the volumes mounted with their own backends")


@pytest.fixture
def mnt(mounter: Mounter, volume: str) -> Mount:
    return mounter.mount(volume)


# --------------------------------------------------------------------------- fault proxies


@pytest.fixture
def redis_proxy(meta_url: str) -> Iterator[FaultProxy]:
    """A fault proxy in front of this test's Redis database; ``redis_proxy.url`` is the
    CHUNKFS_META to give a mount or the CLI (``make_env(s3_env, CHUNKFS_META=...)``)."""
    with FaultProxy(meta_url) as proxy:
        yield proxy


@pytest.fixture
def s3_proxy(s3_env: dict[str, str]) -> Iterator[FaultProxy]:
    """A fault proxy in front of the S3 gateway; ``s3_proxy.url`` is the AWS_ENDPOINT_URL."""
    with FaultProxy(s3_env["AWS_ENDPOINT_URL"]) as proxy:
        yield proxy


# --------------------------------------------------------------------------- a shared mount


@pytest.fixture(scope="module")
def shared_cli(local_services: LocalStack, redis_url: str, request: pytest.FixtureRequest) -> Cli:
    """A Cli on Redis db 0 (shared; volume names are unique) and a unique S3 prefix."""
    assert local_services.s3 is not None
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.module.__name__.rsplit(".", 1)[-1])
    env = make_env(local_services.s3.env(), CHUNKFS_META=redis_url,
                   CHUNKFS_STORAGE=f"s3://{BUCKET}/t/{name}-{uuid.uuid4().hex[:8]}")
    return Cli(env)


@pytest.fixture(scope="module")
def shared_mounter(shared_cli: Cli, mount_base: Path, mount_logs: Path) -> Iterator[Mounter]:
    m = Mounter(shared_cli, mount_base, mount_logs)
    try:
        yield m
    finally:
        m.cleanup()


@pytest.fixture(scope="module")
def shared_volume(shared_cli: Cli) -> Iterator[str]:
    name = f"shared-{uuid.uuid4().hex[:10]}"
    shared_cli.create_volume(name, "20GiB")
    yield name
    shared_cli.run("volume", "delete", name, check=False)


@pytest.fixture(scope="module")
def shared_mnt(shared_mounter: Mounter, shared_volume: str,
               request: pytest.FixtureRequest) -> Iterator[Mount]:
    m = shared_mounter.mount(shared_volume)
    m.checked = 0  # type: ignore[attr-defined] - log offset the last ``work`` test checked
    yield m
    shared_mounter.cleanup()  # before shared_volume is deleted
    # the module's tests passed or failed on their own; what is left: the unmount's log
    # lines and the volume as they all left it
    allowed = allow_list(request.node, "mount_log_allows")
    found = log_problems(m.log_file, m.checked, allowed)[0]  # type: ignore[attr-defined]
    fail_on(found, f"unexpected log lines of the shared mount of {request.node.name}",
            hint=LOG_HINT)
    fail_on(fsck_problems(shared_mounter.cli, request.node, names=[shared_volume]),
            f"fsck of the shared volume of {request.node.name}")


@pytest.fixture
def work(shared_mnt: Mount, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory on the shared mount; at teardown, the mount's log lines written
    during the test are checked like a private mount's."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:100]
    path = shared_mnt.path / name
    path.mkdir()
    start = shared_mnt.log_file.stat().st_size if shared_mnt.log_file.exists() else 0
    yield path
    found, end = log_problems(shared_mnt.log_file, start, allow_list(request.node, "mount_log_allows"))
    shared_mnt.checked = end  # type: ignore[attr-defined]
    if body_passed(request.node):
        fail_on(found, "unexpected lines in the shared mount's log during this test", hint=LOG_HINT)


# --------------------------------------------------------------------------- self-checks

CHECKED_LEVELS = frozenset({"warning", "error", "critical"})
LOG_HINT = ("a test that provokes these on purpose allows them explicitly: "
            '@pytest.mark.mount_log_allows("<msg>", ..., reason="why")')
FSCK_HINT = ('a test that breaks a volume on purpose allows the findings explicitly: '
             '@pytest.mark.fsck_allows(r"<regex>", ..., reason="why")')


def body_passed(node: pytest.Item) -> bool:
    """True if the test body ran and passed (self-checks add nothing to a failure, an
    xfail or a skip; tests/conftest.py records the reports)."""
    reports = getattr(node, "chunkfs_reports", {})
    call = reports.get("call")
    return call is not None and call.passed and not hasattr(call, "wasxfail")


# What every test allows, with the reason
ALWAYS_ALLOWED: dict[str, dict[str, str]] = {"mount_log_allows": {
    "redis durability": "the tests' Redis runs with appendfsync everysec on purpose (speed); "
                        "the warning itself is tested in test_redis_shapes.py"}}


def allow_list(node: Any, marker: str) -> dict[str, str]:
    """What ``@pytest.mark.<marker>(*entries, reason=...)`` allows (entry -> reason); a
    test's marks, its class's and its module's all count. Every mark needs a reason."""
    allowed: dict[str, str] = dict(ALWAYS_ALLOWED.get(marker, {}))
    for mark in node.iter_markers(marker):
        reason = str(mark.kwargs.get("reason", "")).strip()
        if not reason or not mark.args:
            pytest.fail(f"@pytest.mark.{marker} needs entries and reason='why' "
                        f"({node.nodeid})", pytrace=False)
        for entry in mark.args:
            allowed[str(entry)] = reason
    return allowed


def _log_line(doc: dict[str, Any]) -> str:
    extra = {k: v for k, v in doc.items() if k not in ("time", "level", "logger", "msg")}
    # a traceback says most at its end
    text = " ".join(f"{k}={str(v)[-600:] if k == 'exception' else str(v)[:400]}"
                    for k, v in extra.items())
    return f"{doc.get('level')} {doc.get('logger')}: {doc.get('msg')!r} {text}".rstrip()


# Defects outside the tests' reach that every mount may log, each matched by its exact
# message and a piece of its traceback, with the reason it is not a test failure. Keep
# this list short: an entry is a bug report, to be removed with the fix.
# Defects outside the tests' reach that any mount may log: message -> (text the record's
# exception must contain, the diagnosis). Every entry is a bug report; none is open.
KNOWN_DEFECTS: dict[str, tuple[str, str]] = {}


def _known_defect(doc: dict[str, Any]) -> bool:
    known = KNOWN_DEFECTS.get(str(doc.get("msg")))
    return known is not None and known[0] in str(doc.get("exception", ""))


def log_problems(path: Path, start: int, allowed: dict[str, str]) -> tuple[list[str], int]:
    """Lines of a mount log from byte ``start`` that are warnings or worse (unless their
    message is allowed) or not JSON records at all (tracebacks, stray prints); and the
    offset where the complete lines end."""
    if not path.exists():
        return [], start
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read()
    complete = raw[:raw.rfind(b"\n") + 1]
    problems = []
    for line in complete.decode(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            problems.append(f"{path.name}: not a log record: {line[:400]}")
            continue
        if not isinstance(doc, dict):
            problems.append(f"{path.name}: not a log record: {line[:400]}")
        elif (doc.get("level") in CHECKED_LEVELS and not _known_defect(doc)
              and not {str(doc.get("msg")), str(doc.get("msg")).split("\n", 1)[0]} & allowed.keys()):
            problems.append(f"{path.name}: {_log_line(doc)}")
    return problems, start + len(complete)


def fsck_problems(cli: Cli, node: Any, names: list[str] | None = None) -> list[str]:
    """`chunkfs fsck NAME --objects` for each volume (default: every volume in the
    backend) and the same check of every snapshot namespace, minus allowed findings."""
    allowed = [re.compile(p) for p in allow_list(node, "fsck_allows")]
    meta = cli.env.get("CHUNKFS_META", "")
    volumes, snapshots = _namespaces(meta)
    problems = []
    for name in (names if names is not None else sorted(volumes)):
        if name not in volumes:
            continue  # deleted by the test
        proc = cli.run("fsck", name, "--objects", check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip() and
                 not ln.endswith("problem(s) found")]
        if proc.returncode != 0 and not lines:
            lines = [f"fsck failed ({proc.returncode}): {proc.stderr.strip()}"]
        problems += [f"volume {name}: {ln}" for ln in lines
                     if not any(p.search(ln) for p in allowed)]
    if names is None and snapshots:
        problems += [p for p in _check_snapshots(cli.env, snapshots)
                     if not any(a.search(p) for a in allowed)]
    return problems


def _namespaces(meta_url: str) -> tuple[dict[str, str], dict[str, str]]:
    """The volume and snapshot registries, through chunkfs's own admin client (every
    URL shape: standalone, TLS, Sentinel, Cluster)."""
    import asyncio

    from chunkfs.meta.redis_meta import connect

    async def read() -> tuple[dict[str, str], dict[str, str]]:
        client = connect(meta_url)
        try:
            decode = lambda h: {k.decode(): v.decode() for k, v in h.items()}  # noqa: E731
            return decode(await client.hgetall(VOLUMES)), decode(await client.hgetall(SNAPSHOTS))
        finally:
            await client.aclose()

    return asyncio.run(read())


def _check_snapshots(env: dict[str, str], snapshots: dict[str, str]) -> list[str]:
    """Snapshots have no `chunkfs fsck NAME`: the same check, run in-process."""
    import asyncio

    from chunkfs.config import StorageConfig
    from chunkfs.fsck import check_namespace
    from chunkfs.volumes import VolumeService

    async def run() -> list[str]:
        svc = await VolumeService.open(env["CHUNKFS_META"],
                                       StorageConfig.from_url(env["CHUNKFS_STORAGE"], env))
        try:
            return [f"snapshot {name}: {line}" for name, ns in sorted(snapshots.items())
                    for line in await check_namespace(svc.r, ns, svc.store)]
        finally:
            await svc.close()

    return asyncio.run(run())


def fail_on(problems: list[str], what: str, hint: str = FSCK_HINT) -> None:
    if problems:
        shown = "\n  ".join(problems[:40])
        more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
        pytest.fail(f"{what}: {len(problems)} problem(s):\n  {shown}{more}\n({hint})",
                    pytrace=False)


@dataclass
class Outcome:
    """What a call started by ``start_bounded`` did: its error (None: it returned), how
    long it took, and whether it was still blocked when ``settle``'s limit passed."""

    error: BaseException | None = None
    elapsed: float = 0.0
    hung: bool = False
    started: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)

    def settle(self, limit: float) -> Outcome:
        """Wait until ``limit`` seconds after the start; mark the call hung if it is still
        blocked then."""
        if not self.done.wait(max(0.0, self.started + limit - time.monotonic())):
            self.hung = True
            self.elapsed = time.monotonic() - self.started
        return self

    def wait(self, timeout: float) -> bool:
        return self.done.wait(timeout)


def start_bounded(fn: Callable[[], Any]) -> Outcome:
    """Run ``fn`` in a daemon thread. A call blocked in a FUSE request cannot be
    interrupted: the caller must undo what blocks it (SIGCONT a service) if it hangs."""
    out = Outcome()

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            out.error = exc
        finally:
            if not out.hung:
                out.elapsed = time.monotonic() - out.started
            out.done.set()

    threading.Thread(target=target, daemon=True).start()
    return out


def run_bounded(fn: Callable[[], Any], limit: float) -> Outcome:
    """``start_bounded(fn).settle(limit)``."""
    return start_bounded(fn).settle(limit)


def expect_errno(err: int, fn: Callable[..., Any], *args: Any, **kw: Any) -> OSError:
    with pytest.raises(OSError) as info:
        fn(*args, **kw)
    assert info.value.errno == err, (
        f"expected {errno.errorcode[err]}, got {errno.errorcode.get(info.value.errno)}: {info.value}")
    return info.value
