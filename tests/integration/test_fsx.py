"""fsx: seeded random file operations on real mounts, checked step by step against a model.

The driver (``fsx.py``, its own process) generates and applies the operations; this
side mounts the volume, remounts it on a wiped cache when the driver asks (always at
the end), kills what hangs, and, when a sequence fails, shrinks it to a short op log
(replaying candidate subsequences on fresh mounts and caches) and prints that log with
the seed and a replay command.

  CI          a few fixed seeds per mount variant (``CASES``), about two minutes
  long mode   ``--fsx-long`` or CHUNKFS_FSX_LONG=1: random seeds for ``--fsx-minutes``
              (default 30), longer sequences with remounts in the middle
  replay      ``--fsx-replay=FILE`` runs an op log written by a failure (test_fsx_replay)

The variants push state transitions per byte with mount options (the block size is
fixed at 4 MiB): tiny inline thresholds, an 8 MiB write buffer, no or a small memory
cache (reads go to the disk cache), little readahead, a small disk cache (evictions).
"""

from __future__ import annotations

import json
import math
import os
import queue
import random
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import Cli, Mount, Mounter
from tests.integration.fsx import describe

FSX = Path(__file__).with_name("fsx.py")
STEP_TIMEOUT = 45.0  # no step of these small files may take this long: it hangs
HANG_REPLAY_TIMEOUT = 15.0  # replaying a known hang: waiting longer proves nothing more
IO_TIMEOUT = 20  # the mount's own deadline for S3/Redis, well below STEP_TIMEOUT


@dataclass(frozen=True)
class Variant:
    name: str
    options: str
    cache_size: str | None = None
    mounts: int = 1
    capacity: str = "4GiB"  # small: the volume fills up, and ENOSPC is part of the game


VARIANTS = {v.name: v for v in (
    # every read of a block goes to the disk cache (no memory cache), small buffers,
    # files above 4 KiB leave Redis for S3, a cache of four blocks
    Variant("tight", "inline=4KiB,buffer-size=8MiB,memory-cache=0,readahead=1,"
                     "kernel-readahead=128KiB", "16MiB"),
    # near the defaults
    Variant("roomy", "inline=16KiB,memory-cache=32MiB,readahead=4"),
    # a 1 MiB memory cache: small blocks stay in memory, full ones do not
    Variant("lean", "inline=1KiB,buffer-size=16MiB,memory-cache=1MiB,readahead=2", "24MiB"),
    # two mounts of one volume (two nodes): close-to-open between them
    Variant("two-mounts", "inline=4KiB,memory-cache=0,readahead=1", "16MiB", mounts=2),
    # a 12 MiB volume: writes may fail with ENOSPC (and change nothing); fsync, close and
    # truncates must not (space is checked at write time; freeing space always works)
    Variant("full", "inline=4KiB,memory-cache=1MiB", "16MiB", capacity="12MiB"),
)}

class KnownBug(AssertionError):
    """A seed or log failed exactly the way its open bug makes it fail (strict xfail)."""


# (seed, variant, steps, remount every N steps) run in CI: about a minute in all
CASE_BUGS: dict[str, tuple[str, str]] = {}  # case id -> (kind, text) of its open bug's failure


def _case(seed: int, variant: str, steps: int, remount_every: int, *,
          bug: tuple[str, str] | None = None, reason: str = "") -> Any:
    """A CI seed; ``bug``: the failure an open bug still causes (a strict xfail that
    only that failure satisfies; ``reason`` says which bug)."""
    case_id = f"{variant}-seed{seed}"
    marks = []
    if bug is not None:
        CASE_BUGS[case_id] = bug
        marks.append(pytest.mark.xfail(strict=True, raises=KnownBug, reason=reason))
    return pytest.param(seed, variant, steps, remount_every, id=case_id, marks=marks)


CASES = [
    _case(1, "tight", 200, 0),
    _case(2, "roomy", 200, 0), _case(3, "lean", 200, 100), _case(4, "tight", 200, 100),
    _case(5, "two-mounts", 200, 0), _case(6, "two-mounts", 200, 100),
    _case(9, "full", 200, 0),
]


# Op logs fsx found and shrank, replayed as they are (then remounted on an empty cache).
# A bug that is not fixed yet is a strict xfail with its diagnosis: the day it is fixed,
# the XPASS says so. The seed in the id is where the log came from.
REGRESSIONS: list[Any] = [
    pytest.param("tight", [
        {"op": "open", "h": 0, "f": 2, "m": 0, "flags": ["append"]},
        {"op": "write", "h": 0, "off": 704512, "len": 4096, "seed": 586079294},
        {"op": "trunc", "h": None, "f": 2, "m": 0, "size": 3583222},
        {"op": "trunc", "h": 0, "size": 355174},
    ], None, id="item8-hole-past-valid-length-tight-seed1"),
    pytest.param("two-mounts", [
        {"op": "open", "h": 1, "f": 0, "m": 0, "flags": []},
        {"op": "close", "h": 1},
        {"op": "trunc", "h": None, "f": 0, "m": 1, "size": 749},
        {"op": "verify", "f": 0, "m": 0},
    ], None, id="stale-kernel-size-after-open-two-mounts-seed5"),
    pytest.param("tight", [
        {"op": "open", "h": 2, "f": 2, "m": 0, "flags": ["trunc", "direct"]},
        {"op": "open", "h": 3, "f": 1, "m": 0, "flags": []},
        {"op": "write", "h": 3, "off": 1441792, "len": 4513792, "seed": 881891629},
        {"op": "trunc", "h": None, "f": 2, "m": 0, "size": 13107200},
        {"op": "write", "h": 3, "off": 10875, "len": 766279, "seed": 575715635},
        {"op": "write", "h": 2, "off": 12338902, "len": 724992, "seed": 938072612},
    ], None, id="item4-write-buffer-deadlock-tight-seed200"),
    pytest.param("full", [
        {"op": "open", "h": 2, "f": 2, "m": 0, "flags": ["trunc"]},
        {"op": "write", "h": 2, "off": 4190208, "len": 61767, "seed": 435231834},
        {"op": "open", "h": 3, "f": 1, "m": 0, "flags": ["trunc"]},
        {"op": "write", "h": 2, "off": 11865013, "len": 39398, "seed": 43164408},
        {"op": "sync", "h": 2, "data": False},
        {"op": "write", "h": 3, "off": 6904905, "len": 2361923, "seed": 28310953},
        {"op": "sync", "h": 3, "data": False},
    ], None, id="item7-enospc-at-fsync-after-acknowledged-writes-full-seed4"),
]


@dataclass
class Result:
    ok: bool
    ops: list[dict[str, Any]] = field(default_factory=list)  # executed, the last one failed
    kind: str = ""
    msg: str = ""
    step: int = -1
    stderr: str = ""

    @property
    def signature(self) -> tuple[str, str]:
        """What a shrunk sequence must still do: fail the same way at the same kind of op."""
        last = self.ops[-1]["op"] if self.ops else ""
        return self.kind, last


class Harness:
    """Runs the driver against fresh mounts of one volume; remounts when it asks."""

    def __init__(self, mounter: Mounter, cli: Cli, variant: Variant, work: Path, *,
                 volume: str = "fsx") -> None:
        self.mounter = mounter
        self.cli = cli
        self.variant = variant
        self.work = work
        self.base = volume
        self.volume = ""
        self.runs = 0
        self.step_timeout = STEP_TIMEOUT

    def _mount(self) -> Mount:
        opts = f"{self.variant.options},io-timeout={IO_TIMEOUT}"
        return self.mounter.mount(self.volume, options=opts, cache_size=self.variant.cache_size)

    def run(self, *, seed: int = 0, count: int = 0, ops: list[dict[str, Any]] | None = None,
            remount_every: int = 0, keep_volume: bool = True) -> Result:
        """One run on a volume of its own (a replay must not see what an earlier one
        left, nor its used bytes); ``keep_volume``: leave it for the teardown's fsck."""
        self.runs += 1
        tag = f"run{self.runs}"
        self.volume = self.cli.create_volume(f"{self.base}-{self.runs}", self.variant.capacity)
        spec = {"dir": tag, "model": str(self.work / tag / "model"), "files": 3, "slots": 4,
                "seed": seed, "count": count, "ops": ops, "remount_every": remount_every,
                "final_remount": ops is None, "enospc": self.variant.capacity != "4GiB"}
        mounts = [self._mount() for _ in range(self.variant.mounts)]
        try:
            return self._drive(spec, mounts)
        finally:
            for m in mounts:
                if m in self.mounter.mounts:
                    self.mounter.umount(m)
                shutil.rmtree(m.cache_dir, ignore_errors=True)
            if not keep_volume:
                self.cli.run("volume", "delete", self.volume, check=False)

    def _drive(self, spec: dict[str, Any], mounts: list[Mount]) -> Result:
        spec["mounts"] = [str(m.path) for m in mounts]
        spec_file = self.work / f"{spec['dir']}.json"
        spec_file.parent.mkdir(parents=True, exist_ok=True)
        spec_file.write_text(json.dumps(spec))
        proc = subprocess.Popen([sys.executable, str(FSX), str(spec_file)], cwd="/",
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdin is not None
        events: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump_lines, args=(proc.stdout, events), daemon=True).start()
        result = Result(ok=False)
        try:
            while True:
                try:
                    line = events.get(timeout=self.step_timeout)
                except queue.Empty:
                    op = describe(result.ops[-1]) if result.ops else "start"
                    result.kind = "hang"
                    result.msg = f"step still blocked after {self.step_timeout:.0f}s: {op}"
                    for m in list(mounts):  # a dead mount ends the blocked syscall (ENOTCONN)
                        if m in self.mounter.mounts:
                            self.mounter.kill(m)
                    return result
                if line is None:  # the driver died without a verdict
                    code = proc.wait(30)
                    result.kind = "crash"
                    result.msg = f"driver exited with status {code}" + (
                        " (SIGBUS: an mmap access hit an I/O error)" if code == -7 else "")
                    return result
                ev = json.loads(line)
                if ev["ev"] == "step":
                    result.ops.append(ev["op"])
                    result.step = ev["i"]
                elif ev["ev"] == "remount":
                    try:
                        mounts[:] = [self._remount_wiped(m) for m in mounts]
                    except (AssertionError, subprocess.SubprocessError) as exc:
                        result.kind, result.msg = "remount", f"remount failed: {exc}"
                        return result
                    proc.stdin.write("go\n")
                    proc.stdin.flush()
                elif ev["ev"] == "fail":
                    result.kind, result.msg = ev["kind"], ev["msg"]
                    return result
                elif ev["ev"] == "done":
                    result.ok = True
                    return result
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(60)
            result.stderr = proc.stderr.read() if proc.stderr else ""

    def _remount_wiped(self, m: Mount) -> Mount:
        """Unmount, throw the cache away, mount on an empty cache dir (a new node)."""
        old_cache = m.cache_dir
        new = self.mounter.remount(m, cache_dir=self.mounter.new_dir("cache"),
                                   options=m.options, cache_size=self.variant.cache_size)
        shutil.rmtree(old_cache, ignore_errors=True)
        return new


def _pump_lines(stream: Any, events: queue.Queue[str | None]) -> None:
    for line in stream:
        events.put(line)
    events.put(None)


# --------------------------------------------------------------------------- shrinking


def shrink(harness: Harness, failed: Result, budget: float) -> tuple[Result, int]:
    """Delta debugging: drop chunks of the op log while a replay still fails the same
    way (on fresh mounts, so that no state of an earlier replay helps)."""
    deadline = time.monotonic() + budget
    best = failed
    replays = 0
    if failed.kind == "hang":
        harness.step_timeout = min(harness.step_timeout, HANG_REPLAY_TIMEOUT)

    def attempt(ops: list[dict[str, Any]]) -> Result | None:
        nonlocal replays
        replays += 1
        result = harness.run(ops=ops, keep_volume=False)
        return result if not result.ok and result.signature == failed.signature else None

    n = 2
    while len(best.ops) >= 2 and time.monotonic() < deadline:
        ops = best.ops
        size = math.ceil(len(ops) / n)
        for start in range(0, len(ops), size):
            if time.monotonic() >= deadline:
                break
            candidate = ops[:start] + ops[start + size:]
            found = attempt(candidate) if candidate else None
            if found is not None:
                best = found
                n = max(n - 1, 2)
                break
        else:
            if n >= len(ops):
                break
            n = min(2 * n, len(ops))
    return best, replays


def report(variant: Variant, failed: Result, shrunk: Result, replays: int, seconds: float,
           log_dir: Path, *, seed: int | None) -> str:
    name = f"fsx-{variant.name}-{seed if seed is not None else 'replay'}.json"
    path = log_dir / name
    path.write_text(json.dumps({"variant": variant.name, "seed": seed, "ops": shrunk.ops},
                               indent=1))
    lines = [
        f"fsx found a bug: seed {seed}, variant {variant.name!r} "
        f"(-o {variant.options}, --cache-size {variant.cache_size or 'default'}, "
        f"{variant.mounts} mount(s))",
        f"failure at step {failed.step} of the seeded run: [{failed.kind}] {failed.msg}",
    ]
    if shrunk is not failed:
        lines.append(f"after shrinking: [{shrunk.kind}] {shrunk.msg}")
    lines.append(f"minimal op log ({len(shrunk.ops)} of {len(failed.ops)} steps, {replays} replays "
                 f"on fresh mounts in {seconds:.0f}s):")
    lines += [f"  {i:3d}  {describe(op)}" for i, op in enumerate(shrunk.ops)]
    lines.append(f"replay: pytest tests/integration/test_fsx.py -k replay --fsx-replay={path}")
    lines.append("ops: " + json.dumps(shrunk.ops))
    if shrunk.stderr.strip():
        lines.append("driver stderr: " + shrunk.stderr.strip()[-2000:])
    return "\n".join(lines)


def run_case(harness: Harness, seed: int, count: int, log_dir: Path, *, shrink_budget: float,
             remount_every: int = 0) -> str | None:
    """Run one seed; on failure, shrink it and return the report (None: it passed)."""
    result = harness.run(seed=seed, count=count, remount_every=remount_every)
    if result.ok:
        return None
    started = time.monotonic()
    shrunk, replays = shrink(harness, result, shrink_budget) if shrink_budget > 0 else (result, 0)
    return report(harness.variant, result, shrunk, replays, time.monotonic() - started,
                  log_dir, seed=seed)


# --------------------------------------------------------------------------- the tests


def _long_mode(config: pytest.Config) -> bool:
    return bool(config.getoption("--fsx-long") or os.environ.get("CHUNKFS_FSX_LONG"))


@pytest.mark.parametrize(("seed", "variant", "steps", "remount_every"), CASES)
def test_fsx_seed_matches_the_model(seed: int, variant: str, steps: int, remount_every: int,
                                    mounter: Mounter, cli: Cli, tmp_path: Path,
                                    mount_logs: Path, request: pytest.FixtureRequest) -> None:
    """A seeded sequence of file operations reads back exactly what a local twin file
    holds, after every step and after a remount on an empty cache."""
    harness = Harness(mounter, cli, VARIANTS[variant], tmp_path)
    bug = CASE_BUGS.get(request.node.callspec.id)
    if bug is not None and bug[0] == "hang":
        harness.step_timeout = HANG_REPLAY_TIMEOUT  # the known hang: no need to wait longer
    result = harness.run(seed=seed, count=steps, remount_every=remount_every)
    if result.ok:
        return
    if bug is not None and result.kind == bug[0] and bug[1] in result.msg:
        raise KnownBug(report(harness.variant, result, result, 0, 0, mount_logs, seed=seed))
    started = time.monotonic()
    shrunk, replays = shrink(harness, result, 150)
    pytest.fail(report(harness.variant, result, shrunk, replays, time.monotonic() - started,
                       mount_logs, seed=seed), pytrace=False)


@pytest.mark.timeout(0)
def test_fsx_long(mounter: Mounter, cli: Cli, tmp_path: Path, mount_logs: Path,
                  request: pytest.FixtureRequest) -> None:
    """The long mode: random seeds over every variant until the time is up."""
    config = request.config
    if not _long_mode(config):
        pytest.skip("long mode: --fsx-long or CHUNKFS_FSX_LONG=1")
    minutes = config.getoption("--fsx-minutes") or float(os.environ.get("CHUNKFS_FSX_MINUTES", 30))
    seed = config.getoption("--fsx-seed")
    seed = seed if seed is not None else random.SystemRandom().randrange(1 << 20)
    keep_going = config.getoption("--fsx-keep-going")
    names = (config.getoption("--fsx-variants") or ",".join(VARIANTS)).split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        pytest.fail(f"unknown fsx variants {unknown}; known: {sorted(VARIANTS)}", pytrace=False)
    deadline = time.monotonic() + 60 * minutes
    done, failures = 0, []
    while time.monotonic() < deadline:
        variant = VARIANTS[names[seed % len(names)]]
        harness = Harness(mounter, cli, variant, tmp_path / f"s{seed}", volume=f"fsx{seed}")
        print(f"fsx long: seed {seed} variant {variant.name}", flush=True)
        failure = run_case(harness, seed, 1000, mount_logs, shrink_budget=900, remount_every=300)
        if failure:
            print(failure, flush=True)
            failures.append(failure)
            if not keep_going:
                break
        done += 1
        seed += 1
    print(f"fsx long: {done} seeds run, {len(failures)} failed", flush=True)
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)


@pytest.mark.parametrize(("variant", "ops", "bug"), REGRESSIONS)
def test_fsx_regression_log_matches_the_model(variant: str, ops: list[dict[str, Any]],
                                              bug: tuple[str, str] | None, mounter: Mounter,
                                              cli: Cli, tmp_path: Path, mount_logs: Path) -> None:
    """An op log that once failed reads back exactly like the model, then after a remount.
    ``bug``: (kind, text) of the failure an open bug still causes (see REGRESSIONS)."""
    harness = Harness(mounter, cli, VARIANTS[variant], tmp_path)
    harness.step_timeout = HANG_REPLAY_TIMEOUT
    result = harness.run(ops=[*ops, {"op": "remount"}])
    if result.ok:
        return
    text = report(harness.variant, result, result, 0, 0, mount_logs, seed=None)
    if bug is not None and result.kind == bug[0] and bug[1] in result.msg:
        raise KnownBug(text)
    pytest.fail(text, pytrace=False)


def test_fsx_replay(mounter: Mounter, cli: Cli, tmp_path: Path, mount_logs: Path,
                    request: pytest.FixtureRequest) -> None:
    """Replays the op log of a failure (``--fsx-replay=FILE``)."""
    path = request.config.getoption("--fsx-replay")
    if not path:
        pytest.skip("needs --fsx-replay=FILE (printed by a failing fsx run)")
    doc = json.loads(Path(path).read_text())
    variant = VARIANTS[doc["variant"]]
    harness = Harness(mounter, cli, variant, tmp_path)
    result = harness.run(ops=doc["ops"])
    if not result.ok:
        pytest.fail(report(variant, result, result, 0, 0, mount_logs, seed=doc.get("seed")),
                    pytrace=False)
