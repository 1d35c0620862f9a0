"""The command line on bad input: one clear line on stderr, a non-zero status, no change.

Also: every subcommand has a working --help.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from chunkfs import cli as chunkfs_cli
from devstack.localstack import free_port
from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import (
    Cli,
    Mounter,
    assert_one_line_error,
    is_mounted,
    make_env,
)

SPEC_COMMANDS = {("volume", "create"), ("volume", "list"), ("volume", "info"), ("volume", "resize"),
                 ("volume", "delete"), ("mount",), ("umount",), ("status",)}


def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix]
    for action in parser._actions:  # noqa: SLF001 - argparse has no public walk
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in action.choices.items():
                found += _subcommands(sub, prefix + (name,))
    return found


def _run_all(cli: Cli, commands: list[list[str]], env: dict[str, str] | None = None,
             timeout: float = 120) -> list[subprocess.CompletedProcess[str]]:
    with ThreadPoolExecutor(max_workers=6) as pool:
        return list(pool.map(lambda args: cli.run(*args, check=False, env=env, timeout=timeout),
                             commands))


def _no_mount_process_for(path: Path) -> bool:
    needle = str(path).encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"chunkfs" in cmd and needle in cmd:
            return False
    return True


def _assert_untouched_mountpoint(mp: Path, entries: list[str] | None = None) -> None:
    if mp.is_dir():
        assert not is_mounted(mp), f"{mp} was mounted by a failed command"
        assert sorted(os.listdir(mp)) == sorted(entries or [])
    assert _no_mount_process_for(mp), f"a mount process for {mp} is still running"


# --------------------------------------------------------------------------- help


def test_help_for_every_subcommand(cli: Cli) -> None:
    commands = _subcommands(chunkfs_cli.build_parser())
    assert SPEC_COMMANDS <= set(commands), SPEC_COMMANDS - set(commands)
    results = _run_all(cli, [[*c, "--help"] for c in commands])
    for command, proc in zip(commands, results, strict=True):
        name = " ".join(("chunkfs", *command))
        assert proc.returncode == 0, f"{name} --help: {proc.returncode} {proc.stderr}"
        assert proc.stdout.startswith(f"usage: {name}"), f"{name} --help:\n{proc.stdout}"
        assert proc.stderr == ""
    # --help needs no backend configuration at all
    proc = subprocess.run(["chunkfs", "mount", "--help"], capture_output=True, text=True,
                          env=make_env({}), timeout=60)
    assert proc.returncode == 0 and "--cache-dir" in proc.stdout


# --------------------------------------------------------------------------- volumes


@pytest.mark.parametrize("capacity", ["10XB", "-5GiB", "abc", "", "1.5.5G", "0"])
def test_bad_capacity_strings(cli: Cli, capacity: str) -> None:
    proc = cli.run("volume", "create", "v", "--capacity", capacity, check=False)
    line = assert_one_line_error(proc)
    assert "capacity" in line.lower() or "size" in line.lower(), line
    assert cli.volume_names() == []


def test_bad_capacity_on_resize_changes_nothing(cli: Cli, volume: str) -> None:
    for capacity in ("10XB", "0", "-1GiB"):
        assert_one_line_error(cli.run("volume", "resize", volume, "--capacity", capacity,
                                      check=False))
    assert cli.info(volume)["capacity"] == 1 << 30


def test_missing_volume(cli: Cli, mounter: Mounter) -> None:
    mp, cache = mounter.new_dir("mp"), mounter.new_dir("cache")
    results = _run_all(cli, [["volume", "info", "nosuch"],
                             ["volume", "resize", "nosuch", "--capacity", "2GiB"],
                             ["volume", "delete", "nosuch"],
                             ["mount", "nosuch", str(mp), "--cache-dir", str(cache)]])
    for proc in results:
        assert_one_line_error(proc, "nosuch")
    assert "not found" in results[0].stderr
    _assert_untouched_mountpoint(mp)
    assert cli.volume_names() == []


def test_create_existing_volume_changes_nothing(cli: Cli, volume: str) -> None:
    proc = cli.run("volume", "create", volume, "--capacity", "5GiB", check=False)
    assert_one_line_error(proc, "exists")
    assert cli.info(volume)["capacity"] == 1 << 30


@pytest.mark.parametrize("name", ["bad/name", "a" * 300, "..", "with space", "ünï"])
def test_invalid_volume_names(cli: Cli, name: str) -> None:
    proc = cli.run("volume", "create", name, "--capacity", "1GiB", check=False)
    assert_one_line_error(proc, "name")
    assert cli.volume_names() == []


# --------------------------------------------------------------------------- backends


def test_missing_backend_configuration(cli: Cli) -> None:
    no_meta = {k: v for k, v in cli.env.items() if k != "CHUNKFS_META"}
    no_storage = {k: v for k, v in cli.env.items() if k != "CHUNKFS_STORAGE"}
    line = assert_one_line_error(cli.run("volume", "list", check=False, env=no_meta))
    assert "--meta" in line or "CHUNKFS_META" in line, line
    line = assert_one_line_error(cli.run("volume", "create", "v", "--capacity", "1GiB",
                                         check=False, env=no_storage))
    assert "--storage" in line or "CHUNKFS_STORAGE" in line, line
    # malformed URLs
    assert_one_line_error(cli.run("volume", "list", "--meta", "http://127.0.0.1:1/0",
                                  check=False), "meta")
    assert_one_line_error(cli.run("volume", "list", "--storage", "s3:/nobucket",
                                  check=False), "storage")
    assert cli.volume_names() == []


def test_unreachable_redis(cli: Cli, mounter: Mounter) -> None:
    port = free_port()
    env = dict(cli.env, CHUNKFS_META=f"redis://:hunter2-redis-pw@127.0.0.1:{port}/0")
    mp, cache = mounter.new_dir("mp"), mounter.new_dir("cache")
    t0 = time.monotonic()
    results = _run_all(cli, [["volume", "list"], ["volume", "create", "v", "--capacity", "1GiB"],
                             ["mount", "v", str(mp), "--cache-dir", str(cache)]], env=env)
    elapsed = time.monotonic() - t0
    for proc in results:
        line = assert_one_line_error(proc)
        assert "redis" in line.lower(), line
        assert "hunter2-redis-pw" not in proc.stderr + proc.stdout, "the password was printed"
    assert elapsed < 40, f"took {elapsed:.0f}s to report an unreachable Redis"
    _assert_untouched_mountpoint(mp)


def test_unreachable_s3(cli: Cli, mounter: Mounter, volume: str) -> None:
    env = dict(cli.env, AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
    mp, cache = mounter.new_dir("mp"), mounter.new_dir("cache")
    t0 = time.monotonic()
    proc = cli.run("mount", volume, str(mp), "--cache-dir", str(cache), check=False, env=env)
    elapsed = time.monotonic() - t0
    line = assert_one_line_error(proc)
    assert "s3" in line.lower(), line
    assert elapsed < 40, f"took {elapsed:.0f}s to report an unreachable S3"
    _assert_untouched_mountpoint(mp)


def test_wrong_s3_credentials(cli: Cli, mounter: Mounter, volume: str) -> None:
    env = dict(cli.env, AWS_SECRET_ACCESS_KEY="wrong-secret-value-xyz")
    mp, cache = mounter.new_dir("mp"), mounter.new_dir("cache")
    proc = cli.run("mount", volume, str(mp), "--cache-dir", str(cache), check=False, env=env)
    line = assert_one_line_error(proc)
    assert "s3" in line.lower(), line
    assert "wrong-secret-value-xyz" not in proc.stderr + proc.stdout
    _assert_untouched_mountpoint(mp)


# --------------------------------------------------------------------------- mount points


def test_bad_mountpoints(cli: Cli, mounter: Mounter, volume: str) -> None:
    base = mounter.new_dir("bad")
    missing = base / "missing"
    regular = base / "file"
    regular.write_bytes(b"not a dir")
    full = base / "full"
    full.mkdir()
    (full / "precious").write_bytes(b"keep me")
    cache = mounter.new_dir("cache")
    results = _run_all(cli, [["mount", volume, str(p), "--cache-dir", str(cache)]
                             for p in (missing, regular, full)])
    assert "exist" in assert_one_line_error(results[0], str(missing))
    assert "directory" in assert_one_line_error(results[1], str(regular))
    assert "empty" in assert_one_line_error(results[2], str(full))
    assert not missing.exists()
    assert regular.read_bytes() == b"not a dir"
    assert (full / "precious").read_bytes() == b"keep me"
    _assert_untouched_mountpoint(full, ["precious"])
    # mounting twice on the same mount point is refused; the first mount keeps working
    m = mounter.mount(volume)
    (m / "f").write_bytes(b"first")
    proc = cli.run("mount", volume, str(m.path), "--cache-dir", str(cache), check=False)
    assert_one_line_error(proc, str(m.path))
    assert (m / "f").read_bytes() == b"first"


@pytest.mark.parametrize("options, needle", [
    ("nosuchoption", "nosuchoption"),
    ("ro,bogus=1", "bogus"),
    ("io-timeout=soon", "io-timeout"),
    ("epoch=abc", "epoch"),
    ("buffer-size=lots", "buffer-size"),
])
def test_bad_mount_options(cli: Cli, mounter: Mounter, volume: str, options: str,
                           needle: str) -> None:
    mp, cache = mounter.new_dir("mp"), mounter.new_dir("cache")
    proc = cli.run("mount", volume, str(mp), "--cache-dir", str(cache), "-o", options,
                   check=False)
    assert_one_line_error(proc, needle)
    _assert_untouched_mountpoint(mp)


def test_an_unknown_event_loop_is_a_usage_error(cli: Cli, mounter: Mounter, volume: str) -> None:
    mp, cache = mounter.new_dir("mp"), mounter.new_dir("cache")
    proc = cli.run("mount", volume, str(mp), "--cache-dir", str(cache), check=False,
                   env=make_env(cli.env, CHUNKFS_EVENT_LOOP="tokio"))
    assert proc.returncode == 2
    assert_one_line_error(proc, "CHUNKFS_EVENT_LOOP", "uvloop, asyncio")
    _assert_untouched_mountpoint(mp)


def test_status_and_umount_of_something_not_mounted(cli: Cli, mounter: Mounter) -> None:
    d = mounter.new_dir("plain")
    results = _run_all(cli, [["status", str(d)], ["umount", str(d)],
                             ["status", str(d / "missing")], ["umount", str(d / "missing")]])
    for proc in results:
        assert_one_line_error(proc)
    assert "not a chunkfs mount" in results[0].stderr


def test_umount_after_the_volume_was_deleted(cli: Cli, mounter: Mounter, volume: str) -> None:
    """Deleting a mounted volume is either refused, or the mount can still be unmounted."""
    m = mounter.mount(volume)
    (m / "f").write_bytes(b"x")
    proc = cli.run("volume", "delete", volume, check=False)
    if proc.returncode != 0:  # refused while mounted: fine, if clear and harmless
        assert_one_line_error(proc, volume)
        assert (m / "f").read_bytes() == b"x"
        return
    proc = cli.run("umount", str(m.path), check=False, timeout=60)
    if proc.returncode != 0:
        mounter.kill(m)  # leave nothing behind
        pytest.fail(f"umount after the volume was deleted failed: {proc.stderr.strip()}")
    mounter.mounts.remove(m)
    assert not is_mounted(m.path)
