"""What a cluster relies on when nodes die or get cut off: nothing acknowledged is lost,
and a node whose writer lease moved away can never write again."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import signal
import time
from pathlib import Path

import pytest

from chunkfs.config import StorageConfig
from chunkfs.volumes import VolumeService
from tests.multinode.cluster import Cluster

pytestmark = pytest.mark.timeout(300)


def write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def acquire_writer(cluster: Cluster, volume: str, node: str) -> int:
    """What ControllerPublishVolume does: hand ``node`` the lease with a new epoch."""
    env = cluster.env()

    async def go() -> int:
        svc = await VolumeService.open(env["CHUNKFS_META"],
                                       StorageConfig.from_url(env["CHUNKFS_STORAGE"], env))
        try:
            return await svc.acquire_writer(volume, node)
        finally:
            await svc.close()

    return asyncio.run(go())


def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_dead_node_loses_nothing_it_acknowledged(cluster: Cluster, tmp_path: Path) -> None:
    cluster.chunkfs("volume", "create", "vol", "--capacity", "1GiB")
    mnt_a, mnt_b = tmp_path / "a", tmp_path / "b"
    cluster.mount("a", "vol", mnt_a)
    files = {f"f{i}": os.urandom(size) for i, size in enumerate((10, 5000, 300_000, 5_000_000))}
    (mnt_a / "dir").mkdir()
    for name, data in files.items():
        write_synced(mnt_a / "dir" / name, data)
    os.kill(cluster.mount_pid(mnt_a), signal.SIGKILL)  # node A dies
    # node B: another network, an empty cache
    cluster.mount("b", "vol", mnt_b)
    for name, data in files.items():
        got = (mnt_b / "dir" / name).read_bytes()
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest(), name
    assert cluster.chunkfs("fsck", "vol").returncode == 0


def test_a_partitioned_writer_is_fenced_after_its_lease_moves(cluster: Cluster,
                                                              tmp_path: Path) -> None:
    cluster.chunkfs("volume", "create", "rwo", "--capacity", "1GiB")
    mnt_a, mnt_b = tmp_path / "a", tmp_path / "b"
    epoch_a = acquire_writer(cluster, "rwo", "node-a")
    cluster.mount("a", "rwo", mnt_a, f"epoch={epoch_a},io-timeout=5")
    write_synced(mnt_a / "data", b"written by A while it held the lease")

    cluster.partition("a")  # A is cut off; the pod is rescheduled to B
    epoch_b = acquire_writer(cluster, "rwo", "node-b")
    assert epoch_b > epoch_a
    cluster.mount("b", "rwo", mnt_b, f"epoch={epoch_b}")
    assert (mnt_b / "data").read_bytes() == b"written by A while it held the lease"
    write_synced(mnt_b / "from-b", b"B owns the volume now")

    cluster.heal("a")  # A comes back and its stale writer tries to commit
    with pytest.raises(OSError) as err:
        write_synced(mnt_a / "data", b"stale write from A")
    assert err.value.errno == errno.EIO
    assert (mnt_b / "data").read_bytes() == b"written by A while it held the lease"
    assert sorted(p.name for p in mnt_b.iterdir()) == ["data", "from-b"]
    assert cluster.chunkfs("fsck", "rwo").returncode == 0


def test_a_short_partition_heals_without_remount(cluster: Cluster, tmp_path: Path) -> None:
    cluster.chunkfs("volume", "create", "v", "--capacity", "1GiB")
    mnt = tmp_path / "a"
    cluster.mount("a", "v", mnt, "io-timeout=60")
    data = os.urandom(2_000_000)
    fd = os.open(mnt / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, data)
    cluster.partition("a")
    healer = None
    try:
        import threading

        healer = threading.Timer(3.0, cluster.heal, args=("a",))
        healer.start()
        os.fsync(fd)  # waits out the partition instead of failing or losing the data
    finally:
        os.close(fd)
        if healer is not None:
            healer.join()
    cluster.mount("b", "v", tmp_path / "b")
    assert (tmp_path / "b" / "f").read_bytes() == data


def test_nodes_sharing_a_volume_see_each_others_closed_files(cluster: Cluster,
                                                           tmp_path: Path) -> None:
    cluster.chunkfs("volume", "create", "rwx", "--capacity", "1GiB")
    mnt_a, mnt_b = tmp_path / "a", tmp_path / "b"
    cluster.mount("a", "rwx", mnt_a, "attr-timeout=0.2,entry-timeout=0.2")
    cluster.mount("b", "rwx", mnt_b, "attr-timeout=0.2,entry-timeout=0.2")
    (mnt_a / "shared.txt").write_bytes(b"version 1")
    wait_for(lambda: (mnt_b / "shared.txt").exists(), what="A's file on B")
    assert (mnt_b / "shared.txt").read_bytes() == b"version 1"
    (mnt_b / "shared.txt").write_bytes(b"version 2 from B")
    wait_for(lambda: (mnt_a / "shared.txt").stat().st_size == len(b"version 2 from B"),
             what="B's update on A")
    assert (mnt_a / "shared.txt").read_bytes() == b"version 2 from B"
