"""Durability: what fsync/fdatasync/close acknowledged survives a crashed node, byte for byte,
and a crash never leaves a file torn between two versions."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import (
    KiB,
    MiB,
    Mounter,
    file_sha256,
    pid_gone,
    rand_bytes,
    sha256,
    wait_until,
)


def _write(path: Path, data: bytes, how: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        step = 128 * KiB if how == "small-writes" else 1 << 30
        for off in range(0, len(data), step):
            os.write(fd, view[off:off + step])
        if how in ("fsync", "small-writes"):
            os.fsync(fd)
        elif how == "fdatasync":
            os.fdatasync(fd)
    finally:
        os.close(fd)  # "close" itself must be durable too


def test_acknowledged_data_survives_sigkill_and_a_new_node(mounter: Mounter, volume: str) -> None:
    m = mounter.mount(volume)
    files = {
        "tiny": (rand_bytes(100, 1), "fsync"),
        "above-inline": (rand_bytes(20 * KiB, 2), "fsync"),
        "one-block": (rand_bytes(4 * MiB, 3), "fdatasync"),
        "dir/sub/multi-block": (rand_bytes(9 * MiB + 12345, 4), "fsync"),
        "many-small-writes": (rand_bytes(5 * MiB + 1, 5), "small-writes"),
        "closed-only": (rand_bytes(3 * MiB, 6), "close"),
        "zeros-and-data": (bytes(4 * MiB) + rand_bytes(1000, 7), "fsync"),
    }
    (m / "dir" / "sub").mkdir(parents=True)
    for name, (data, how) in files.items():
        _write(m / name, data, how)
    os.symlink("dir/sub/multi-block", m / "link")
    os.link(m / "tiny", m / "tiny-hardlink")
    os.chmod(m / "one-block", 0o600)
    # an overwrite in place of an existing file, then fsync
    with open(m / "one-block", "r+b") as f:
        f.seek(MiB)
        f.write(b"patched")
        f.flush()
        os.fsync(f.fileno())
    data = bytearray(files["one-block"][0])
    data[MiB:MiB + 7] = b"patched"
    files["one-block"] = (bytes(data), "fsync")

    old_cache = m.cache_dir
    mounter.kill(m)  # SIGKILL: no flush, no clean unmount
    shutil.rmtree(old_cache)  # the node is gone with its cache
    m2 = mounter.mount(volume, mountpoint=m.path, cache_dir=mounter.new_dir("newnode"))
    for name, (data, _) in files.items():
        assert (m2 / name).stat().st_size == len(data), name
        assert file_sha256(m2 / name) == sha256(data), f"{name}: content differs after the crash"
    assert os.readlink(m2 / "link") == "dir/sub/multi-block"
    assert (m2 / "tiny-hardlink").stat().st_nlink == 2
    assert stat.S_IMODE((m2 / "one-block").stat().st_mode) == 0o600
    st = m2.status()
    assert st["cache"]["hits"] == 0, "a new node cannot have a warm cache"


def test_crash_mid_rewrite_leaves_old_or_new_never_torn(mounter: Mounter, volume: str) -> None:
    m = mounter.mount(volume)
    size = 10 * MiB + 77
    versions = {sha256(rand_bytes(size, f"v{i}")): i for i in range(4)}
    # a: rewritten in place, crash after half of the new version was written (no fsync)
    # b: rewritten in place, crash while its fsync is uploading
    for name in ("a", "b"):
        _write(m / name, rand_bytes(size, "v0"), "fsync")
        with open(m / name, "r+b") as f:
            f.write(rand_bytes(size, "v1"))
            f.flush()
            os.fsync(f.fileno())
    fa = open(m / "a", "r+b", buffering=0)  # noqa: SIM115 - left open across the crash
    fa.write(rand_bytes(size, "v2")[:6 * MiB])
    fb = open(m / "b", "r+b", buffering=0)  # noqa: SIM115
    fb.write(rand_bytes(size, "v2"))
    fsync_result: list[BaseException | None] = []

    def do_fsync() -> None:
        try:
            os.fsync(fb.fileno())
            fsync_result.append(None)
        except BaseException as exc:  # noqa: BLE001
            fsync_result.append(exc)

    t = threading.Thread(target=do_fsync, daemon=True)
    t.start()
    time.sleep(0.05)  # let the fsync start uploading
    os.kill(m.pid, signal.SIGKILL)
    wait_until(lambda: pid_gone(m.pid), 10, what="the mount process to die")
    t.join(30)
    for f in (fa, fb):
        try:
            f.close()
        except OSError:
            pass
    mounter.kill(m)
    m2 = mounter.mount(volume, mountpoint=m.path, cache_dir=mounter.new_dir("newnode"))
    got_a = versions.get(file_sha256(m2 / "a"))
    got_b = versions.get(file_sha256(m2 / "b"))
    assert got_a == 1, f"a: expected the last fsynced version v1, got {got_a} (None = torn)"
    assert got_b in (1, 2), f"b: expected v1 or v2, got {got_b} (None = torn)"
    if fsync_result and fsync_result[0] is None:
        assert got_b == 2, "b's fsync returned success but its data was lost"
    # the crashed files are usable again
    with open(m2 / "a", "r+b") as f:
        f.write(b"again")
        f.flush()
        os.fsync(f.fileno())
    assert (m2 / "a").read_bytes()[:5] == b"again"


def test_umount_flushes_files_still_open_with_unsynced_data(mounter: Mounter, volume: str) -> None:
    """`chunkfs umount` (and SIGTERM, which it sends) stores everything written so far,
    even for files that are still open and were never synced or closed."""
    m = mounter.mount(volume)
    # the writer is another process that keeps its files open: this process must not
    # hold them, since any fork+exec here would close inherited fds, and a close flushes
    code = (
        "import os,random,sys\n"
        "a=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT, 0o644)\n"
        "os.write(a, random.Random('open-at-umount').randbytes(6*1024*1024+5))\n"
        "b=os.open(sys.argv[2], os.O_WRONLY|os.O_CREAT, 0o644)\n"
        "os.write(b, b'tiny and unsynced')\n"
        "print('written', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", code, str(m / "open"), str(m / "small")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "written"
        st = m.status_direct()
        assert st["dirty_bytes"] >= 2 * MiB, json.dumps(st)
        mounter.umount(m)
    finally:
        writer.kill()
        writer.wait()
    m = mounter.mount(volume, mountpoint=m.path, cache_dir=mounter.new_dir("newnode"))
    assert file_sha256(m / "open") == sha256(rand_bytes(6 * MiB + 5, "open-at-umount"))
    assert (m / "small").read_bytes() == b"tiny and unsynced"
