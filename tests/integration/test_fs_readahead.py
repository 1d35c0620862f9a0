"""The kernel's readahead on a chunkfs mount: set once the kernel's INIT was answered.

The kernel sets a FUSE mount's readahead from the answer to its INIT, so a value written
before is lost; every mount then streams in 128 KiB requests, eight times as many FUSE
round trips (and Python requests) per byte as with 1 MiB ones.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import MiB, Mount, Mounter, rand_bytes, wait_until, write_file


def bdi_readahead_kb(m: Mount) -> int:
    with open("/proc/self/mountinfo") as f:
        device = next(line.split()[2] for line in f if line.split()[4] == str(m.path))
    with open(f"/sys/class/bdi/{device}/read_ahead_kb") as f:
        return int(f.read())


def test_the_configured_readahead_holds_after_the_mount_is_ready(mnt: Mount) -> None:
    wait_until(lambda: bdi_readahead_kb(mnt) == 4096, 10, what="read_ahead_kb 4096")


def test_a_streaming_reader_reaches_the_mount_in_large_requests(mnt: Mount) -> None:
    data = rand_bytes(16 * MiB, "stream")
    write_file(Path(mnt) / "f", data)
    wait_until(lambda: bdi_readahead_kb(mnt) == 4096, 10, what="read_ahead_kb 4096")
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1")
    before = mnt.status()["fuse"]["reads"]
    fd = os.open(Path(mnt) / "f", os.O_RDONLY)
    try:
        got = b"".join(iter(lambda: os.read(fd, MiB), b""))
    finally:
        os.close(fd)
    reads = mnt.status()["fuse"]["reads"] - before
    assert got == data
    assert reads <= 16 * 2, f"{reads} FUSE reads for 16 MiB: requests of 128 KiB"


def test_kernel_readahead_option_is_applied(mounter: Mounter, volume: str) -> None:
    m = mounter.mount(volume, options="kernel-readahead=1MiB")
    wait_until(lambda: bdi_readahead_kb(m) == 1024, 10, what="read_ahead_kb 1024")
