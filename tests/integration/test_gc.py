"""Garbage collection against real Redis + SeaweedFS: it deletes exactly what nothing can
reference any more, whatever the grace period, and refuses to run where it cannot see
everything (docs/dev/gc.md). Every test runs on a standalone Redis and on a Redis
Cluster of three primaries, where namespaces, pending uploads and GC's own keys live on
different shards."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest

from chunkfs import gc, spill
from chunkfs.blocks import slices
from chunkfs.blocks.slices import Slice
from chunkfs.blocks.store import BlockStore, ObjectRef
from chunkfs.cache import BlockCache
from chunkfs.claim import claim_storage, read_marker
from chunkfs.config import StorageConfig
from chunkfs.errors import NoSpace, SessionExpired, StorageClaimed
from chunkfs.fsck import check_namespace
from chunkfs.gc import GcRefused, collect_garbage
from chunkfs.meta import topology
from chunkfs.meta.redis_meta import BlockOp, VolumeMeta
from chunkfs.meta.schema import ENGINE, GC_DOOMED, ROOT_INODE
from chunkfs.objstore import ObjectStore
from chunkfs.volumes import VolumeService
from tests.integration.conftest import open_svc

MiB = 1 << 20


@pytest.fixture(params=["standalone", "cluster"])
async def svc(request: pytest.FixtureRequest, s3_env: dict[str, str]) -> AsyncIterator[VolumeService]:
    url = request.getfixturevalue("meta_url" if request.param == "standalone" else "cluster_url")
    async with open_svc(url, s3_env) as service:
        yield service


@dataclass
class Writer:
    """One mount's worth of write path over the service's backends, without FUSE."""

    svc: VolumeService
    ns: str
    blocks: BlockStore
    meta: VolumeMeta
    inos: dict[bytes, int] = field(default_factory=dict)

    async def upload(self, body: bytes) -> tuple[ObjectRef, str]:
        ref = await self.blocks.put(body)
        assert ref is not None
        return ref, ref.key

    async def create(self, name: bytes) -> int:
        attr = await self.meta.create(ROOT_INODE, name, stat.S_IFREG | 0o644, 0, 0)
        self.inos[name] = attr.ino
        return attr.ino

    async def commit(self, name: bytes, ref: ObjectRef, key: str, size: int) -> None:
        one = slices.encode([Slice(ref.ref, 0, size, 0)])
        await self.meta.commit(self.inos[name], size=size, ops=[BlockOp(0, "A", one)], settle=[key])

    async def write(self, name: bytes, body: bytes) -> str:
        await self.create(name)
        entry, key = await self.upload(body)
        await self.commit(name, entry, key, len(body))
        return key

    async def unlink(self, name: bytes) -> None:
        await self.meta.unlink(ROOT_INODE, name, is_dir=False, keep_if_open=False)


@pytest.fixture
async def writer_for(svc: VolumeService, tmp_path) -> AsyncIterator:
    made: list[Writer] = []

    async def make(ns: str, session: str = "w") -> Writer:
        cache = await BlockCache.open(str(tmp_path / f"cache-{len(made)}"), 1 << 30)
        meta = VolumeMeta(svc.fast, ns, epoch="", session=f"{session}{len(made)}", deadline=10)  # type: ignore[attr-defined]
        await meta.heartbeat()
        w = Writer(svc, ns, BlockStore(svc.store, cache, meta, memory_limit=1 << 20), meta)
        made.append(w)
        return w

    yield make
    for w in made:
        await w.blocks.drain()


async def objects(svc: VolumeService) -> set[str]:
    return {k async for k, _, _ in svc.store.list("blocks/")}


async def aged(svc: VolumeService) -> None:
    """Wait until every object is older than now by the store's clock resolution, so that
    ``grace=0`` makes each of them a candidate (S3 times have whole seconds)."""
    for _ in range(100):
        newest = max([m async for _, _, m in svc.store.list("blocks/")], default=0.0)
        if newest < time.time() - 0.001:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("object timestamps stay in the future")


async def fsck_objects(svc: VolumeService, ns: str) -> list[str]:
    return await check_namespace(svc.r, ns, svc.store)


async def test_gc_deletes_only_unreferenced_blocks_past_the_grace(svc, writer_for) -> None:
    info = await svc.create_volume("v", 1 << 30)
    w = await writer_for(info.id)
    kept = await w.write(b"kept", os.urandom(5000))
    doomed = await w.write(b"doomed", os.urandom(5000))
    await w.unlink(b"doomed")

    report = await collect_garbage(svc.r, svc.store, grace=3600)
    assert report.deleted == 0 and report.young == 2  # too young to be collected
    assert await objects(svc) == {kept, doomed}

    await aged(svc)
    report = await collect_garbage(svc.r, svc.store, grace=0, dry_run=True)
    assert report.deleted == 1 and await objects(svc) == {kept, doomed}

    await aged(svc)
    report = await collect_garbage(svc.r, svc.store, grace=0)
    assert report.deleted == 1 and report.deleted_bytes == 5000
    assert await objects(svc) == {kept}
    assert await fsck_objects(svc, info.id) == []


async def test_an_upload_no_commit_references_yet_survives_any_grace(svc, writer_for) -> None:
    """A file held open: its full blocks are uploaded long before the commit."""
    info = await svc.create_volume("v", 1 << 30)
    w = await writer_for(info.id)
    await w.create(b"log")
    entry, key = await w.upload(os.urandom(3 * MiB))
    for _ in range(2):
        await aged(svc)
        await collect_garbage(svc.r, svc.store, grace=0)
    assert key in await objects(svc)
    await w.commit(b"log", entry, key, 3 * MiB)
    assert await fsck_objects(svc, info.id) == []
    # once committed, the protection has done its job; the reference keeps it from now on
    await aged(svc)
    await collect_garbage(svc.r, svc.store, grace=0)
    await aged(svc)
    await collect_garbage(svc.r, svc.store, grace=0)
    assert key in await objects(svc)
    assert await svc.r.hlen(f"cfs{{{info.id}}}:pending") == 0


async def test_a_commit_refused_then_retried_after_gc_finds_its_blocks(svc, writer_for) -> None:
    info = await svc.create_volume("small", 1 * MiB)
    w = await writer_for(info.id)
    await w.create(b"big")
    entry, key = await w.upload(os.urandom(2 * MiB))
    with pytest.raises(NoSpace):
        await w.commit(b"big", entry, key, 2 * MiB)
    await aged(svc)
    await collect_garbage(svc.r, svc.store, grace=0)
    await svc.resize_volume("small", 4 * MiB)
    await w.commit(b"big", entry, key, 2 * MiB)
    assert await fsck_objects(svc, info.id) == []


async def test_a_block_deleted_by_gc_is_uploaded_again_by_a_mount_that_uploaded_it_before(
        svc, writer_for) -> None:
    """The mount's skip-the-repeated-PUT memory must not outlive a GC deletion."""
    info = await svc.create_volume("v", 1 << 30)
    w = await writer_for(info.id)
    body = os.urandom(100_000)
    key = await w.write(b"a", body)
    await w.unlink(b"a")
    await aged(svc)
    await collect_garbage(svc.r, svc.store, grace=0)
    assert key not in await objects(svc)
    assert await w.write(b"b", body) == key  # same content: same object, PUT again
    assert key in await objects(svc)
    assert await fsck_objects(svc, info.id) == []


async def test_an_upload_of_a_doomed_object_waits_for_gc_then_uploads_again(svc, writer_for) -> None:
    info = await svc.create_volume("v", 1 << 30)
    w = await writer_for(info.id)
    body = os.urandom(70_000)
    key = await w.write(b"a", body)
    await w.unlink(b"a")
    with spill.Workspace() as ws:
        doomed = ws.spill("doomed")
        await doomed.add([(key, len(body))])
        await doomed.seal()
        async with gc.gc_lease(svc.r) as lease:  # a GC between publishing doomed and deleting
            await gc._publish_doomed(svc.r, lease, doomed)
            late = asyncio.create_task(w.write(b"b", body))
            await asyncio.sleep(1.0)
            assert not late.done(), "an upload of an object GC is deleting went ahead"
            await svc.store.delete_many([key])
    await asyncio.wait_for(late, 30)
    assert key in await objects(svc)
    assert await fsck_objects(svc, info.id) == []


async def test_an_upload_registered_while_gc_publishes_doomed_is_spared(svc, writer_for) -> None:
    info = await svc.create_volume("v", 1 << 30)
    w = await writer_for(info.id)
    key = await w.write(b"a", os.urandom(60_000))
    await w.unlink(b"a")
    with spill.Workspace() as ws:
        doomed = ws.spill("doomed")
        await doomed.add([(key, 60_000)])
        await doomed.seal()
        async with gc.gc_lease(svc.r) as lease:
            run_start = lease.started_ms
            await gc._publish_doomed(svc.r, lease, doomed)
            await w.meta.register_upload(key)  # checked doomed just before it was published
            final, gone, spared = await gc._reprieve(svc.r, doomed, run_start, ws,
                                                     session_grace=600)
            assert (spared.count, spared.bytes) == (1, 60_000) and gone.count == 0
            assert list(final.records()) == []
            assert not await svc.r.sismember(GC_DOOMED, key)  # its uploader stops waiting


@pytest.mark.parametrize("when", ["before the source is marked", "after the source is marked"])
async def test_a_clone_made_while_gc_marks_keeps_its_blocks(svc, writer_for, monkeypatch, when) -> None:
    src = await svc.create_volume("src", 1 << 30)
    w = await writer_for(src.id)
    await w.write(b"f", os.urandom(200_000))
    real = gc.referenced_blocks
    done: list[str] = []

    async def clone_then_drop() -> None:
        if not done:
            done.append((await svc.create_volume("clone", 1 << 30, source_volume="src")).id)
            await w.unlink(b"f")

    async def marking(r, ns, marks):
        if ns == src.id and when.startswith("before"):
            await clone_then_drop()
        refs = await real(r, ns, marks)
        if ns == src.id and when.startswith("after"):
            await clone_then_drop()
        return refs

    monkeypatch.setattr(gc, "referenced_blocks", marking)
    await aged(svc)
    await collect_garbage(svc.r, svc.store, grace=0)
    monkeypatch.setattr(gc, "referenced_blocks", real)
    assert done and await fsck_objects(svc, done[0]) == []
    await aged(svc)
    await collect_garbage(svc.r, svc.store, grace=0)
    assert await fsck_objects(svc, done[0]) == []


async def test_a_snapshot_made_while_gc_marks_keeps_its_blocks(svc, writer_for, monkeypatch) -> None:
    src = await svc.create_volume("src", 1 << 30)
    w = await writer_for(src.id)
    await w.write(b"f", os.urandom(200_000))
    real = gc.referenced_blocks
    made: list[str] = []

    async def marking(r, ns, marks):
        refs = await real(r, ns, marks)
        if ns == src.id and not made:
            made.append((await svc.create_snapshot("src", "snap")).id)
            await w.unlink(b"f")
        return refs

    monkeypatch.setattr(gc, "referenced_blocks", marking)
    await aged(svc)
    await collect_garbage(svc.r, svc.store, grace=0)
    assert await fsck_objects(svc, made[0]) == []


async def test_a_silent_session_is_declared_dead_and_can_no_longer_commit(svc, writer_for) -> None:
    info = await svc.create_volume("v", 1 << 30)
    w = await writer_for(info.id)
    await w.create(b"f")
    entry, key = await w.upload(os.urandom(50_000))
    # the session has not expired yet: its upload is protected
    await aged(svc)
    await collect_garbage(svc.r, svc.store, grace=0, session_grace=0)
    assert key in await objects(svc)
    # a session that stays silent past its expiry plus the grace is dead for GC ...
    await svc.r.hset(f"cfs{{{info.id}}}:sessions", w.meta.session, 1)
    await aged(svc)
    await collect_garbage(svc.r, svc.store, grace=0, session_grace=0)
    assert key not in await objects(svc)
    # ... and for itself: it can neither commit what GC took, nor carry on
    with pytest.raises(SessionExpired):
        await w.commit(b"f", entry, key, 50_000)
    with pytest.raises(SessionExpired):
        await w.meta.heartbeat()
    assert await fsck_objects(svc, info.id) == []


async def test_gc_keeps_manifest_blocks_and_refuses_a_redis_that_lost_its_identity(svc, writer_for) -> None:
    info = await svc.create_volume("v", 1 << 30)
    w = await writer_for(info.id)
    key = await w.write(b"f", os.urandom(3000))
    await svc.create_snapshot("v", "snap")
    await svc.r.flushdb()  # Redis is lost
    await aged(svc)
    with pytest.raises(StorageClaimed, match="no engine identity"):
        await collect_garbage(svc.r, svc.store, grace=0)
    assert key in await objects(svc)
    restored = await svc.create_volume("restored", 1 << 30, source_snapshot="snap")  # adopts
    await aged(svc)
    report = await collect_garbage(svc.r, svc.store, grace=0)
    assert report.manifests == 1 and report.deleted == 0
    assert await fsck_objects(svc, restored.id) == []


async def test_a_storage_prefix_serves_exactly_one_redis_database(svc, local_services, s3_env) -> None:
    if topology.is_cluster(svc.r):
        pytest.skip("picks a second database of the same server: standalone only")
    await svc.create_volume("first", 1 << 30)
    other_db = (int(svc.meta_url.rsplit("/", 1)[1]) + 128) % 255 + 1
    other_url = local_services.redis.url_for_db(other_db)
    with local_services.redis.client(db=other_db) as client:
        client.flushdb()
    other = await VolumeService.open(other_url, StorageConfig.from_url(s3_env["CHUNKFS_STORAGE"], s3_env))
    try:
        with pytest.raises(StorageClaimed, match="belongs to metadata engine"):
            await other.create_volume("second", 1 << 30)
        with pytest.raises(StorageClaimed):
            await collect_garbage(other.r, other.store, grace=0)
        assert await other.list_volumes() == []
    finally:
        await other.r.flushdb()
        await other.close()


class GatedS3:
    """A TCP forwarder to S3 that holds every request until ``gate`` is set (a slow link
    to the object store, for one client only)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.gate = asyncio.Event()
        self.connected = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connected.set()
        await self.gate.wait()
        up_r, up_w = await asyncio.open_connection(*self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()


async def test_a_claim_racing_the_first_claim_of_its_own_engine_succeeds(svc, s3_env) -> None:
    """Two volume creations or mounts meet an unclaimed prefix at once; the one whose S3
    is slower finds the marker the other wrote for their one engine, and is not told the
    prefix belongs to another engine."""
    endpoint = urlsplit(s3_env["AWS_ENDPOINT_URL"])
    gated = GatedS3((endpoint.hostname, endpoint.port))
    url = await gated.start()
    slow = await ObjectStore.create(StorageConfig.from_url(
        s3_env["CHUNKFS_STORAGE"], {**s3_env, "AWS_ENDPOINT_URL": url}))
    try:
        late = asyncio.create_task(claim_storage(svc.r, slow))
        await asyncio.wait_for(gated.connected.wait(), 30)  # its S3 request is held
        first = await claim_storage(svc.r, svc.store)       # the other claims meanwhile
        gated.gate.set()
        assert await asyncio.wait_for(late, 60) == first == (await svc.r.get(ENGINE)).decode()
        assert await read_marker(svc.store) == first
    finally:
        await slow.close()
        await gated.close()


async def test_two_gc_runs_never_overlap(svc) -> None:
    await svc.create_volume("v", 1 << 30)
    async with gc.gc_lease(svc.r):
        with pytest.raises(GcRefused, match="holds the lease"):
            await collect_garbage(svc.r, svc.store, grace=0)
    await collect_garbage(svc.r, svc.store, grace=0)  # free again


async def test_a_deleted_volume_returns_its_bytes_except_what_its_snapshot_shares(
        svc, writer_for) -> None:
    """A PVC's life: written, snapshotted, written again, deleted. GC leaves exactly the
    snapshot's blocks; once the snapshot goes too, blocks/ is empty."""
    info = await svc.create_volume("pvc", 1 << 30)
    w = await writer_for(info.id)
    shared = {await w.write(b"a", os.urandom(300_000)), await w.write(b"b", os.urandom(5000))}
    await svc.create_snapshot("pvc", "snap")
    after = await w.write(b"c", os.urandom(200_000))  # only in the volume
    await w.meta.end_session()
    await svc.delete_volume("pvc")
    await aged(svc)
    report = await collect_garbage(svc.r, svc.store, grace=0)
    assert await objects(svc) == shared and report.deleted == 1
    assert after not in await objects(svc)
    await svc.delete_snapshot("snap")
    await aged(svc)
    report = await collect_garbage(svc.r, svc.store, grace=0)
    assert await objects(svc) == set() and report.deleted == 2
    assert report.deleted_bytes == 305_000


async def test_a_deleted_volume_keeps_what_its_clone_shares(svc, writer_for) -> None:
    info = await svc.create_volume("pvc", 1 << 30)
    w = await writer_for(info.id)
    shared = await w.write(b"a", os.urandom(100_000))
    clone = await svc.create_volume("clone", 1 << 30, source_volume="pvc")
    only_source = await w.write(b"b", os.urandom(100_000))
    await w.meta.end_session()
    await svc.delete_volume("pvc")
    await aged(svc)
    await collect_garbage(svc.r, svc.store, grace=0)
    assert await objects(svc) == {shared} and only_source not in await objects(svc)
    assert await fsck_objects(svc, clone.id) == []
    await svc.delete_volume("clone")
    await aged(svc)
    await collect_garbage(svc.r, svc.store, grace=0)
    assert await objects(svc) == set()


async def test_a_run_spilled_into_many_sorted_runs_deletes_exactly_the_garbage(
        svc, writer_for, monkeypatch) -> None:
    """Sets of a few keys per run, big block maps read in HSCAN steps: the streamed
    path decides exactly what the in-memory one would."""
    monkeypatch.setattr(gc, "_ENTRIES_PER_ROUND", 4)
    monkeypatch.setattr(gc, "_MAPS_PER_ROUND", 3)
    info = await svc.create_volume("v", 1 << 30)
    w = await writer_for(info.id)
    ino = await w.create(b"big")  # one file of 9 blocks: more than a round's entries
    ops, big = [], set()
    for i in range(9):
        ref, key = await w.upload(os.urandom(1000 + i))
        ops.append(BlockOp(i, "A", slices.encode([Slice(ref.ref, 0, 1000 + i, 0)])))
        big.add(key)
    await w.meta.commit(ino, size=8 * (4 << 20) + 1008, ops=ops, settle=sorted(big))
    kept, gone = set(), set()
    for i in range(12):
        key = await w.write(f"f{i}".encode(), os.urandom(2000 + i))
        if i % 3:
            await w.unlink(f"f{i}".encode())
            gone.add(key)
        else:
            kept.add(key)
    await aged(svc)
    report = await collect_garbage(svc.r, svc.store, grace=0, spill_batch=2)
    assert report.deleted == len(gone) and report.referenced == len(kept | big)
    assert await objects(svc) == kept | big
    assert await fsck_objects(svc, info.id) == []


async def test_each_run_records_its_outcome_for_mounts_and_volume_info(svc, writer_for) -> None:
    assert await gc.last_run(svc.r) is None
    info = await svc.create_volume("v", 1 << 30)
    w = await writer_for(info.id)
    await w.write(b"a", os.urandom(4000))
    await w.unlink(b"a")
    await aged(svc)
    before = time.time()
    await collect_garbage(svc.r, svc.store, grace=0)
    ok = await gc.last_run(svc.r)
    assert ok is not None and ok.ok and not ok.dry_run and ok.error == ""
    assert (ok.objects, ok.deleted, ok.deleted_bytes) == (1, 1, 4000)
    assert before <= ok.started <= ok.finished and ok.success == ok.finished
    # a run that fails once it holds the lease says why, and keeps the last success
    await svc.store.put("snapshots/broken/manifest.json.gz", b"not gzip")
    with pytest.raises(GcRefused, match="unreadable"):
        await collect_garbage(svc.r, svc.store, grace=0, dry_run=True)
    failed = await gc.last_run(svc.r)
    assert failed is not None and not failed.ok and failed.dry_run
    assert "GcRefused" in failed.error and "unreadable" in failed.error
    assert failed.success == ok.success and failed.finished > ok.finished
    # a run refused the lease records nothing: the record is the running run's
    await svc.store.delete("snapshots/broken/manifest.json.gz")
    async with gc.gc_lease(svc.r):
        with pytest.raises(GcRefused, match="holds the lease"):
            await collect_garbage(svc.r, svc.store, grace=0)
    assert await gc.last_run(svc.r) == failed


async def test_progress_reports_every_phase_and_ends_each_with_its_total(svc, writer_for) -> None:
    info = await svc.create_volume("v", 1 << 30)
    w = await writer_for(info.id)
    for i in range(3):
        await w.write(f"f{i}".encode(), os.urandom(3000 + i))
        await w.unlink(f"f{i}".encode())
    await aged(svc)
    seen: list[tuple[str, int, int | None]] = []
    await collect_garbage(svc.r, svc.store, grace=0, progress=lambda *a: seen.append(a))
    phases = list(dict.fromkeys(phase for phase, _, _ in seen))
    assert phases == ["list", "mark", "manifests", "sweep", "publish", "reprieve", "delete"]
    assert ("delete", 3, 3) in seen and ("list", 3, 3) in seen


async def test_first_uses_of_a_fresh_storage_prefix_at_once_all_succeed(svc) -> None:
    """GC, volume creation and mounts may claim a new prefix at the same moment (the
    controller's GC starts as soon as a Secret names a backend): none is refused, even
    one whose read of the prefix's marker is slow (a new S3 connection)."""
    class SlowReads:
        def __init__(self, store) -> None:
            self.store = store

        def __getattr__(self, name: str):
            return getattr(self.store, name)

        async def get(self, key: str, deadline: float | None = None) -> bytes:
            await asyncio.sleep(0.5)
            return await self.store.get(key, deadline)

    async def claim(delay: float) -> str:
        await asyncio.sleep(delay)
        return await claim_storage(svc.r, svc.store)

    slow = asyncio.create_task(claim_storage(svc.r, SlowReads(svc.store)))
    engines = await asyncio.gather(*(claim(d) for d in (0.02, 0.05, 0.1)), slow,
                                   return_exceptions=True)
    assert [e for e in engines if isinstance(e, BaseException)] == []
    assert len(set(engines)) == 1
