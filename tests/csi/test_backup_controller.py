"""The controller backs volumes up by itself (csi/backup_runner.py): every volume of each
backend it serves, on a schedule, keeping the newest N; a backup restores into an empty
Redis; the runs show on the metrics endpoint; interval 0 turns it off."""

from __future__ import annotations

import os

from chunkfs import backup
from chunkfs.meta.schema import ROOT_INODE, Keys
from chunkfs.volumes import VolumeService

from .test_gc_controller import service_call, wait_for
from .test_lifecycle import MiB, Pod, attach, create_volume, detach, write_file

BACKUPS = ("--backup-interval", "1", "--backup-keep", "2", "--gc-interval", "0")


def backups(env: dict[str, str], volume: str) -> list[str]:
    async def ids(svc: VolumeService) -> list[str]:
        return await backup.backup_ids(svc.store, volume)
    return service_call(env, ids)


def test_the_controller_backs_every_volume_up_keeps_the_newest_and_they_restore(
        cluster, local_services) -> None:
    ctrl = cluster.start("ctrl", "controller", extra=BACKUPS)
    node = cluster.start("node-a", "node")
    create_volume(ctrl, "pvc-1")
    create_volume(ctrl, "pvc-2")
    pod = Pod(node, "pvc-1", attach(ctrl, "pvc-1", "node-a")).start()
    body = os.urandom(2 * MiB)
    write_file(pod.path("data"), body)
    storage = cluster.env["CHUNKFS_STORAGE"]

    def volumes_backed_up() -> float:
        return ctrl.metric("chunkfs_backup_volumes_total", storage=storage, result="ok")

    async def last(svc: VolumeService) -> dict | None:
        return (await svc.volume_details("pvc-1")).last_backup

    # a backup made after the file was written (the first ones may predate it)
    wait_for("a backup with the file", lambda: (r := service_call(cluster.env, last))
             and r["files"] == 2)
    made = volumes_backed_up()
    wait_for("three more runs", lambda: volumes_backed_up() >= made + 6)
    pod.stop()
    detach(ctrl, "pvc-1", "node-a")
    assert len(backups(cluster.env, "pvc-1")) == 2  # the newest two: older ones expired
    assert len(backups(cluster.env, "pvc-2")) == 2
    assert ctrl.metric("chunkfs_backup_leader", storage=storage) == 1
    assert ctrl.metric("chunkfs_backup_interval_seconds") == 1
    assert ctrl.metric("chunkfs_backup_keep") == 2
    assert ctrl.metric("chunkfs_backup_last_success_timestamp_seconds", storage=storage) > 0
    assert ctrl.metric("chunkfs_backup_runs_total", storage=storage, result="error") == 0
    ctrl.stop()  # no backup runs while its Redis is replaced
    record = service_call(cluster.env, last)  # the newest
    assert record["files"] == 2 and record["url"].endswith(
        f"/{backups(cluster.env, 'pvc-1')[-1]}/manifest.json.gz")

    redis = local_services.redis
    db = int(cluster.env["CHUNKFS_META"].rsplit("/", 1)[1]) % 255 + 1
    with redis.client(db=db) as client:
        client.flushdb()  # an empty database, standing in for a Redis that lost everything

    async def restore(svc: VolumeService) -> tuple[int, bytes | None]:
        info, checked = await svc.restore_volume(backup.split_manifest_url(record["url"])[1],
                                                 "pvc-back")
        return checked, await svc.r.hget(Keys(info.id).dir(ROOT_INODE), "data")

    checked, entry = service_call(cluster.env, restore, meta=redis.url_for_db(db))
    assert checked >= 1 and entry is not None
    with redis.client(db=db) as client:
        client.flushdb()


def test_backup_interval_zero_turns_automatic_backups_off(cluster) -> None:
    ctrl = cluster.start("ctrl", "controller", extra=("--backup-interval", "0",
                                                      "--gc-interval", "0"))
    create_volume(ctrl, "pvc-off")
    assert ctrl.metric("chunkfs_backup_interval_seconds") == 0
    assert ctrl.metric("chunkfs_backup_backends") == 0
    assert "automatic backups are off" in ctrl.log_path.read_text()
    assert backups(cluster.env, "pvc-off") == []
