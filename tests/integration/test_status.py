"""What an operator reads: `chunkfs status` of a mount (dirty data and its age, the writer
lease, the engine's last GC, the last backup, S3 and Redis latencies and errors) and
`chunkfs volume info` (size, files, snapshots, clones, backups, last GC)."""

from __future__ import annotations

import json
import os

import pytest

from chunkfs.control import MAX_DEPTH, MAX_REPLY, _depth
from chunkfs.gc import collect_garbage
from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import Cli, Mounter, wait_until


@pytest.mark.mount_log_allows("writer lease revoked: fencing this mount",
                              reason="the test moves the lease to see the status show it")
def test_status_shows_dirty_age_lease_last_gc_latencies_and_no_backup_yet(
        cli: Cli, mounter: Mounter, volume: str) -> None:
    cli.call(lambda svc: collect_garbage(svc.r, svc.store, grace=3600))
    m = mounter.mount(volume)
    st = wait_until(lambda: (s := m.status_direct())["last_gc"] and s, what="the last gc")
    assert st["last_gc"]["ok"] and st["last_gc"]["objects"] == 0 and st["last_gc"]["age_s"] >= 0
    assert st["last_backup"] is None
    assert st["lease"] == {"holder": "", "epoch": int(cli.info(volume)["epoch"]), "writes": True}
    assert st["dirty_files"] == 0 and st["dirty_age_s"] == 0

    with open(m.path / "f", "wb", buffering=0) as f:
        f.write(os.urandom(100_000))  # in the mount's buffers: not durable until fsync
        st = wait_until(lambda: (s := m.status_direct())["dirty_age_s"] >= 1.5 and s,
                        what="dirty data to age")
        assert st["dirty_files"] == 1 and st["dirty_bytes"] == 100_000
        os.fsync(f.fileno())
        wait_until(lambda: m.status_direct()["dirty_files"] == 0, what="the file to be clean")
    assert m.status_direct()["dirty_age_s"] == 0

    st = m.status_direct()
    for backend in ("s3", "redis"):
        lat = st[backend]["latency"]
        assert lat["le_ms"]["inf"] > 0 and lat["max_ms"] >= lat["recent_ms"] > 0, backend
        assert lat["last_error"] == "" and st[backend]["errors"] == 0
    assert _depth(st) <= MAX_DEPTH and len(json.dumps(st)) < MAX_REPLY // 8

    # the lease moves to another node: the mount is fenced and says who holds it now
    epoch = cli.call(lambda svc: svc.acquire_writer(volume, "node-b"))
    st = wait_until(lambda: (s := m.status_direct())["lease"]["holder"] and s, what="the lease")
    assert st["lease"] == {"holder": "node-b", "epoch": epoch, "writes": False} and st["fenced"]
    text = cli.run("status", str(m.path)).stdout
    assert "writer lease:  node-b, epoch" in text and "this mount does not write" in text
    assert "last gc:" in text and ", ok: deleted 0 of 0 objects" in text
    assert "last backup:   never" in text and "dirty bytes:   0 in 0 files" in text
    assert "recent" in text.split("s3:", 1)[1].splitlines()[0]


def test_volume_info_shows_size_files_snapshots_clones_backups_and_last_gc(
        cli: Cli, mounter: Mounter, volume: str) -> None:
    m = mounter.mount(volume)
    (m.path / "d").mkdir()
    (m.path / "d" / "f").write_bytes(os.urandom(30_000))
    mounter.umount(m)
    cli.run("snapshot", "create", volume, "s1")
    cli.run("volume", "create", "c1", "--capacity", "1GiB", "--from-volume", volume)
    cli.run("volume", "create", "c2", "--capacity", "1GiB", "--from-snapshot", "s1")
    info = cli.info(volume)
    assert info["snapshots"] == ["s1"] and info["clones"] == ["c1"]
    assert info["backups"] == [] and info["last_backup"] is None and info["last_gc"] is None
    assert info["files"] == 3 and info["used_bytes"] >= 30_000  # root, d, d/f
    assert cli.info("c2")["clones"] == [] and cli.info("c2")["source"] == "snapshot:s1"
    cli.call(lambda svc: collect_garbage(svc.r, svc.store, grace=3600))
    info = cli.info(volume)
    assert info["last_gc"]["ok"] and info["last_gc"]["deleted"] == 0
    text = cli.run("volume", "info", volume).stdout
    for line in ("snapshots:  s1", "clones:     c1", "backups:    0 (-)", "files:      3 inodes",
                 "last backup: never", "last gc:    "):
        assert line in text, text
    url = cli.run("volume", "backup", volume).stdout.strip().splitlines()[-1]
    info = cli.info(volume)
    assert len(info["backups"]) == 1 and url.endswith(f"/{info['backups'][0]}/manifest.json.gz")
    assert info["last_backup"]["url"] == url and info["last_backup"]["files"] == 3
    text = cli.run("volume", "info", volume).stdout
    assert f"backups:    1 ({info['backups'][0]})" in text and url in text, text
