"""The controller collects garbage by itself (csi/gc_runner.py): a deleted PVC's bytes go
back to the bucket except what a snapshot still shares, one replica runs each backend
whatever the number of replicas, Secret backends are collected once a call names them
(also after a restart), and the runs show on the metrics endpoint."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Callable

from chunkfs.blocks import slices
from chunkfs.config import StorageConfig
from chunkfs.meta.schema import Keys
from chunkfs.objstore import block_key
from chunkfs.volumes import VolumeService
from csi.backends import resolve
from csi.gc_runner import GcMetrics, GcRunner, GcSettings
from csi.v1 import csi_pb2

from .conftest import backend_secrets
from .test_lifecycle import CAP, MiB, Pod, attach, create_volume, detach, write_file

GC = ("--gc-interval", "1", "--gc-grace", "0")


def wait_for(what: str, check: Callable[[], object], timeout: float = 60.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def service_call(env: dict[str, str], action, meta: str | None = None, storage: str | None = None):
    async def go():
        svc = await VolumeService.open(meta or env["CHUNKFS_META"],
                                       StorageConfig.from_url(storage or env["CHUNKFS_STORAGE"], env))
        try:
            return await action(svc)
        finally:
            await svc.close()
    return asyncio.run(go())


async def _objects(svc: VolumeService) -> set[str]:
    return {k async for k, _, _ in svc.store.list("blocks/")}


async def _referenced_by(svc: VolumeService, ns: str) -> set[str]:
    k, found = Keys(ns), set()
    for ino in await svc.r.smembers(k.idx):
        for raw in await svc.r.hvals(k.blocks(int(ino))):
            found.update(block_key(d, n) for d, n in slices.object_refs(raw))
    return found


def put_garbage(env: dict[str, str], n: int, **where: str) -> set[str]:
    async def put(svc: VolumeService) -> set[str]:
        keys = set()
        for i in range(n):
            body = f"garbage {i} {os.urandom(8).hex()}".encode()
            key = block_key(hashlib.sha256(body).hexdigest(), len(body))
            await svc.store.put(key, body)
            keys.add(key)
        return keys
    return service_call(env, put, **where)


def objects(env: dict[str, str], **where: str) -> set[str]:
    return service_call(env, _objects, **where)


def test_a_deleted_pvc_returns_its_bytes_by_itself_except_what_its_snapshot_shares(cluster) -> None:
    ctrl = cluster.start("ctrl", "controller", extra=GC)
    node = cluster.start("node-a", "node")
    create_volume(ctrl, "pvc-1")
    pod = Pod(node, "pvc-1", attach(ctrl, "pvc-1", "node-a")).start()
    write_file(pod.path("a"), os.urandom(5 * MiB))
    write_file(pod.path("small"), os.urandom(20_000))
    ctrl.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(source_volume_id="pvc-1",
                                                                 name="snap-1"))
    write_file(pod.path("after"), os.urandom(2 * MiB))  # in the volume only
    os.unlink(pod.path("small"))  # the snapshot keeps it
    pod.stop()
    detach(ctrl, "pvc-1", "node-a")

    async def snapshot_blocks(svc: VolumeService) -> set[str]:
        ns = (await svc.get_snapshot("snap-1")).id
        return await _referenced_by(svc, ns)

    kept = service_call(cluster.env, snapshot_blocks)
    everything = objects(cluster.env)
    # a's two blocks at least (the small file's bytes may still be inline slices in Redis)
    assert len(kept) >= 2 and everything > kept
    ctrl.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="pvc-1"))
    wait_for("only the snapshot's blocks", lambda: objects(cluster.env) == kept)
    ctrl.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id="snap-1"))
    wait_for("an empty blocks/", lambda: objects(cluster.env) == set())
    storage = cluster.env["CHUNKFS_STORAGE"]
    # at least what was listed: upkeep may have moved small files' inline slices to
    # objects of their own since (collected too)
    wait_for("the metrics", lambda: ctrl.metric("chunkfs_gc_deleted_objects_total",
                                                storage=storage) >= len(everything))
    assert ctrl.metric("chunkfs_gc_deleted_bytes_total", storage=storage) >= 7 * MiB
    assert ctrl.metric("chunkfs_gc_last_success_timestamp_seconds", storage=storage) > 0
    assert ctrl.metric("chunkfs_gc_runs_total", storage=storage, result="ok") >= 2
    assert ctrl.metric("chunkfs_gc_leader", storage=storage) == 1
    assert ctrl.metric("chunkfs_gc_run_duration_seconds_count", storage=storage) >= 2
    assert ctrl.metric("chunkfs_gc_interval_seconds") == 1


def test_replicas_run_each_backend_once_per_interval_and_hand_over_when_one_stops(cluster) -> None:
    storage = cluster.env["CHUNKFS_STORAGE"]
    gc2 = ("--gc-interval", "2", "--gc-grace", "0")
    started = time.monotonic()
    a = cluster.start("ctrl-a", "controller", extra=gc2)
    b = cluster.start("ctrl-b", "controller", extra=gc2)

    def runs() -> float:
        return sum(p.metric("chunkfs_gc_runs_total", storage=storage, result=r)
                   for p in (a, b) for r in ("ok", "error", "refused"))

    wait_for("two runs", lambda: runs() >= 2)
    time.sleep(3)
    elapsed = time.monotonic() - started
    leaders = [p for p in (a, b) if p.metric("chunkfs_gc_leader", storage=storage) == 1]
    assert len(leaders) == 1
    assert runs() <= elapsed / 2 + 1, "two replicas both ran GC on the same schedule"
    assert sum(p.metric("chunkfs_gc_runs_total", storage=storage, result="ok")
               for p in (a, b)) == runs()
    leader, other = (a, b) if leaders[0] is a else (b, a)
    leader.stop()  # a graceful stop hands the schedule over at once
    garbage = put_garbage(cluster.env, 3)
    time.sleep(1.1)  # old enough for --gc-grace 0
    wait_for("the other replica's run", lambda: not garbage & objects(cluster.env))
    assert other.metric("chunkfs_gc_leader", storage=storage) == 1


def test_a_secret_backend_is_collected_after_a_restart_once_a_call_names_it(
        cluster, local_services) -> None:
    redis = local_services.redis
    db = int(cluster.env["CHUNKFS_META"].rsplit("/", 1)[1]) % 255 + 1
    with redis.client(db=db) as client:
        client.flushdb()
    where = {"meta": redis.url_for_db(db), "storage": cluster.env["CHUNKFS_STORAGE"] + "-secret"}
    secrets = backend_secrets(cluster.env, meta_url=where["meta"], storage=where["storage"])
    ctrl = cluster.start("ctrl", "controller", extra=GC)
    request = csi_pb2.CreateVolumeRequest(
        name="pvc-s", volume_capabilities=[CAP], secrets=secrets,
        capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB))
    ctrl.controller.CreateVolume(request)
    garbage = put_garbage(cluster.env, 2, **where)
    time.sleep(1.1)
    wait_for("the Secret backend's garbage to go", lambda: not objects(cluster.env, **where))
    assert ctrl.metric("chunkfs_gc_backends") == 2

    ctrl.restart()  # the Secret was in memory only
    garbage = put_garbage(cluster.env, 2, **where)
    default = put_garbage(cluster.env, 2)
    time.sleep(1.1)
    wait_for("the default backend's garbage to go", lambda: not default & objects(cluster.env))
    time.sleep(2)  # two more intervals: the Secret backend is still unknown
    assert garbage <= objects(cluster.env, **where)
    assert ctrl.metric("chunkfs_gc_backends") == 1
    ctrl.controller.CreateVolume(request)  # a repeat: names the Secret again
    wait_for("the Secret backend's garbage to go", lambda: not objects(cluster.env, **where))
    assert ctrl.metric("chunkfs_gc_backends") == 2
    ctrl.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="pvc-s", secrets=secrets))
    with redis.client(db=db) as client:
        client.flushdb()
    assert secrets["secret-access-key"] not in ctrl.log_path.read_text()


def test_dry_run_reports_and_deletes_nothing_and_interval_zero_turns_gc_off(cluster) -> None:
    garbage = put_garbage(cluster.env, 4)
    time.sleep(1.1)
    storage = cluster.env["CHUNKFS_STORAGE"]
    ctrl = cluster.start("ctrl", "controller", extra=(*GC, "--gc-dry-run"))
    wait_for("a dry run", lambda: ctrl.metric("chunkfs_gc_runs_total", storage=storage,
                                              result="ok") >= 1)
    assert ctrl.metric("chunkfs_gc_last_run_garbage_objects", storage=storage) == 4
    assert ctrl.metric("chunkfs_gc_deleted_objects_total", storage=storage) == 0
    assert ctrl.metric("chunkfs_gc_dry_run") == 1
    assert objects(cluster.env) == garbage
    ctrl.stop()
    off = cluster.start("ctrl-off", "controller", extra=("--gc-interval", "0"))
    assert off.metric("chunkfs_gc_interval_seconds") == 0
    assert off.metric("chunkfs_gc_backends") == 0
    assert "automatic garbage collection is off" in off.log_path.read_text()


# --- the schedule, in process ----------------------------------------------------------


async def test_one_leader_per_backend_takes_over_when_the_holder_goes_silent(backend_env) -> None:
    """Two runners of one backend: one leads (runs), the other waits; when the leader
    stops renewing (a crashed replica), the other takes over after the hold."""
    from prometheus_client import CollectorRegistry

    backend = resolve({}, backend_env)
    settings = GcSettings(interval=0.8, grace=3600)
    a = GcRunner(settings, GcMetrics(CollectorRegistry()), replica="a")
    b = GcRunner(settings, GcMetrics(CollectorRegistry()), replica="b")
    for runner in (a, b):
        runner.track(backend)
        runner.start()
    try:
        async def leaders() -> list[str]:
            for _ in range(100):
                got = [r.replica for r in (a, b) if r.status()[0]["leader"]]
                if len(got) == 1 and sum(r.status()[0]["runs"] for r in (a, b)) >= 2:
                    return got
                await asyncio.sleep(0.1)
            raise AssertionError(f"no single leader: {a.status()} {b.status()}")

        first = (await leaders())[0]
        holder, waiting = (a, b) if first == "a" else (b, a)
        assert waiting.status()[0]["runs"] == 0
        for task in [t for tr in holder._tracked.values() for t in (tr.loop, tr.run) if t]:  # noqa: SLF001
            task.cancel()  # silent, as a crashed replica: no release
        for _ in range(100):
            if waiting.status()[0]["runs"] >= 1:
                break
            await asyncio.sleep(0.1)
        assert waiting.status()[0]["leader"] and waiting.status()[0]["runs"] >= 1
    finally:
        await a.stop()
        await b.stop()


async def test_rotated_credentials_replace_the_old_ones_for_the_next_run(backend_env) -> None:
    """A Secret whose keys changed names the same backend: one schedule, new credentials."""
    import dataclasses

    from prometheus_client import CollectorRegistry

    opened: list[VolumeService] = []

    async def opener(meta: str, storage: StorageConfig) -> VolumeService:
        svc = await VolumeService.open(meta, storage)
        opened.append(svc)
        return svc

    backend = resolve({}, backend_env)
    rotated = dataclasses.replace(backend, overrides=(("AWS_SECRET_ACCESS_KEY", "new"),))
    runner = GcRunner(GcSettings(interval=0.4, grace=3600), GcMetrics(CollectorRegistry()),
                      opener=opener, replica="r")
    runner.track(backend)
    runner.start()
    try:
        async def runs(n: int) -> None:
            for _ in range(200):
                if runner.status()[0]["runs"] >= n and not runner.status()[0]["running"]:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(runner.status())

        await runs(1)
        runner.track(rotated)
        before = runner.status()[0]["runs"]
        await runs(before + 1)
        assert len(opened) == 2 and len(runner.status()) == 1
    finally:
        await runner.stop()
