"""The volume service: what the CLI's ``volume`` commands and the CSI controller call.

Volumes, snapshots and clones are namespaces in Redis (see ``chunkfs.meta.schema``).
A snapshot is a copy of a volume's metadata, taken while the volume's writers wait
for a moment, plus an immutable manifest in S3 from which the snapshot, and any
volume cloned from it, can be restored even if Redis is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from chunkfs import backup
from chunkfs.claim import claim_storage
from chunkfs.config import StorageConfig, redact_url
from chunkfs.errors import (
    InvalidArgument,
    LeaseHeld,
    MetaUnavailable,
    NoSuchObject,
    SnapshotExists,
    SnapshotNotFound,
    VolumeExists,
    VolumeNotFound,
)
from chunkfs.meta import namespace as nsops
from chunkfs.meta.redis_meta import connect, with_retries
from chunkfs.meta.schema import DEFAULT_BLOCK_SIZE, GC_LAST, SNAPSHOTS, VOLUMES, GcRun, Keys, VolumeRecord
from chunkfs.meta.schema import VolumeField as V
from chunkfs.objstore import ObjectStore

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,252}$")


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    id: str
    capacity: int
    used_bytes: int
    used_inodes: int
    created: float
    epoch: int
    writer: str | None
    source: str | None
    block_size: int
    max_inodes: int = 0


@dataclass(frozen=True)
class VolumeDetails:
    """What ``volume info`` shows: the volume, what was made from it, and its upkeep."""

    info: VolumeInfo
    snapshots: list[str]        # snapshots taken of it
    clones: list[str]           # volumes cloned from it (source volume:<name>)
    backups: list[str]          # ids of its backups in the object store, oldest first
    last_gc: GcRun | None       # the engine's last GC run (None: none recorded)
    last_backup: dict[str, Any] | None = None  # its last backup (``cfs{ID}:backup``)


@dataclass(frozen=True)
class SnapshotInfo:
    name: str
    id: str
    source_volume: str
    created: float
    size_bytes: int
    ready_to_use: bool


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid {kind} name {name!r}: 1-253 characters of letters, digits, '.', '_', '-',"
            " starting with a letter or digit")
    return name


def manifest_key(snapshot_name: str) -> str:
    """Where a snapshot's manifest is: the CSI snapshot id is the snapshot's name."""
    return backup.snapshot_manifest_key(snapshot_name)


def _volume_info(name: str, ns: str, raw: dict[bytes, bytes]) -> VolumeInfo:
    rec = VolumeRecord.parse(raw)
    return VolumeInfo(
        name=name, id=ns, capacity=rec.capacity, used_bytes=rec.used, used_inodes=rec.inodes,
        created=rec.created, epoch=int(rec.epoch or 0), writer=rec.writer or None,
        source=rec.source or None, block_size=rec.block_size, max_inodes=rec.inode_limit)


def _snapshot_info(name: str, ns: str, raw: dict[bytes, bytes]) -> SnapshotInfo:
    rec = VolumeRecord.parse(raw)
    return SnapshotInfo(name=name, id=ns, source_volume=rec.source_volume, created=rec.created,
                        size_bytes=rec.used, ready_to_use=rec.ready)


class VolumeService:
    """Administrative operations on the volumes of one Redis + one object store."""

    def __init__(self, redis_client: aioredis.Redis, store: ObjectStore, meta_url: str) -> None:
        self.r = redis_client
        self.store = store
        self.meta_url = meta_url
        self.deadline = 15.0
        self._claimed = False

    @classmethod
    async def open(cls, meta_url: str, storage: StorageConfig,
                   store: ObjectStore | None = None) -> VolumeService:
        client = connect(meta_url)
        store = store or await ObjectStore.create(storage, deadline=15.0)
        return cls(client, store, meta_url)

    async def close(self) -> None:
        await self.r.aclose()
        await self.store.close()

    def __repr__(self) -> str:
        return f"VolumeService(meta={redact_url(self.meta_url)}, storage={self.store.config.url})"

    async def _redis(self, call: Any) -> Any:
        return await with_retries(call, deadline=self.deadline)

    async def claim(self, *, adopt: bool = False) -> None:
        """The storage prefix must belong to this Redis database (``chunkfs.claim``)."""
        if adopt or not self._claimed:
            await self._redis(lambda: claim_storage(self.r, self.store, adopt=adopt))
            self._claimed = True

    async def _register(self, registry: str, name: str, ns: str) -> bool:
        """Register ``name`` -> ``ns`` unless the name is taken; a retry whose first reply
        was lost finds its own registration and succeeds too."""
        if await self._redis(lambda: self.r.hsetnx(registry, name, ns)):
            return True
        current = await self._redis(lambda: self.r.hget(registry, name))
        return current is not None and current.decode() == ns

    async def ping(self) -> None:
        try:
            await self._redis(lambda: self.r.ping())
        except MetaUnavailable as exc:
            raise MetaUnavailable(f"Redis at {redact_url(self.meta_url)} is unreachable") from exc
        await self.store.ping()

    # ---- volumes -------------------------------------------------------------------
    async def _volume_ns(self, name: str) -> str:
        ns = await self._redis(lambda: self.r.hget(VOLUMES, name))
        if ns is None:
            raise VolumeNotFound(f"volume {name!r} not found")
        return ns.decode()

    async def get_volume(self, name: str) -> VolumeInfo:
        check_name("volume", name)
        ns = await self._volume_ns(name)
        raw = await self._redis(lambda: self.r.hgetall(Keys(ns).vol))
        if not raw:
            raise VolumeNotFound(f"volume {name!r} not found")
        return _volume_info(name, ns, raw)

    async def volume_details(self, name: str) -> VolumeDetails:
        info = await self.get_volume(name)
        snapshots = [s.name for s in await self.list_snapshots(name)]
        clones = [v.name for v in await self.list_volumes() if v.source == f"volume:{name}"]
        last_gc = GcRun.parse(await self._redis(lambda: self.r.hgetall(GC_LAST)))
        backups = await backup.backup_ids(self.store, name)
        return VolumeDetails(info, snapshots, clones, backups, last_gc,
                             await self.last_backup(info.id))

    async def last_backup(self, ns: str) -> dict[str, Any] | None:
        return backup.parse_record(await self._redis(lambda: self.r.hgetall(Keys(ns).backup)))

    async def list_volumes(self) -> list[VolumeInfo]:
        registry = await self._redis(lambda: self.r.hgetall(VOLUMES))
        names = sorted((k.decode(), v.decode()) for k, v in registry.items())
        pipe = self.r.pipeline(transaction=False)
        for _, ns in names:
            pipe.hgetall(Keys(ns).vol)
        rows = await self._redis(pipe.execute) if names else []
        return [_volume_info(name, ns, raw) for (name, ns), raw in zip(names, rows, strict=True)
                if raw]

    async def create_volume(self, name: str, capacity: int, *, source_snapshot: str | None = None,
                            source_volume: str | None = None,
                            max_inodes: int | None = None) -> VolumeInfo:
        check_name("volume", name)
        if not isinstance(capacity, int) or capacity <= 0:
            raise InvalidArgument(f"capacity must be a positive number of bytes, got {capacity!r}")
        if max_inodes is not None and (not isinstance(max_inodes, int) or max_inodes <= 0):
            raise InvalidArgument(f"max_inodes must be a positive number, got {max_inodes!r}")
        with contextlib.suppress(VolumeNotFound):
            existing = await self.get_volume(name)
            raise VolumeExists(f"volume {name!r} already exists", existing)
        await self.claim()
        ns = nsops.new_namespace_id()
        settings = {V.NAME: name, V.KIND: "volume", V.CAPACITY: capacity, V.CREATED: time.time(),
                    V.BLOCK_SIZE: DEFAULT_BLOCK_SIZE, V.SOURCE: ""}
        if max_inodes is not None:
            settings[V.MAX_INODES] = max_inodes
        if source_snapshot is not None and source_volume is not None:
            raise InvalidArgument("give either a source snapshot or a source volume, not both")
        if source_snapshot is not None:
            settings[V.SOURCE] = f"snapshot:{source_snapshot}"
            await self._clone_snapshot(source_snapshot, ns, settings)
        elif source_volume is not None:
            settings[V.SOURCE] = f"volume:{source_volume}"
            source_ns = await self._volume_ns(check_name("volume", source_volume))
            await self._check_clone_capacity(source_ns, capacity)
            settings[V.BLOCK_SIZE] = await self._block_size(source_ns)
            await self._copy_live(source_ns, ns, settings)
        else:
            await self._redis(lambda: nsops.init_namespace(self.r, ns, settings))
        if not await self._register(VOLUMES, name, ns):
            await nsops.delete_namespace(self.r, ns)
            raise VolumeExists(f"volume {name!r} already exists", await self.get_volume(name))
        return await self.get_volume(name)

    async def resize_volume(self, name: str, capacity: int) -> VolumeInfo:
        info = await self.get_volume(name)
        if not isinstance(capacity, int) or capacity <= 0:
            raise InvalidArgument(f"capacity must be a positive number of bytes, got {capacity!r}")
        if capacity < info.used_bytes:
            raise InvalidArgument(
                f"cannot shrink volume {name!r} to {capacity} bytes: {info.used_bytes} are in use")
        await self._redis(lambda: self.r.hset(Keys(info.id).vol, V.CAPACITY, capacity))
        return await self.get_volume(name)

    async def delete_volume(self, name: str) -> None:
        """Delete a volume and its backups (first: a failure leaves the volume, and the
        call can be repeated, instead of backups that nothing would ever delete)."""
        check_name("volume", name)
        ns = await self._volume_ns(name)
        async with backup.backup_lock(self.r, name, wait=backup.LOCK_MS / 2000):
            await backup.delete_backups(self.store, name)
            await self._redis(lambda: self.r.hdel(VOLUMES, name))
            await self._redis(lambda: nsops.delete_namespace(self.r, ns))

    # ---- backups and restores (chunkfs.backup, docs/dev/backup.md) -------------------
    async def backup_volume(self, name: str, *, keep: int = backup.DEFAULT_KEEP,
                            wait: float = 0.0, full: bool = False) -> backup.BackupReport:
        """Back a live volume up to the object store, incrementally: writers wait only
        while the inodes changed since the last backup are copied in Redis (all of
        them for the first backup, or with ``full``), whose pages are written with one
        manifest that names the last backup's pages for the rest; then the backups
        beyond the newest ``keep`` are deleted. BackupBusy if one is in progress."""
        if not isinstance(keep, int) or keep < 1:
            raise InvalidArgument(f"keep must be a positive number of backups, got {keep!r}")
        ns = await self._volume_ns(check_name("volume", name))
        await self.claim()
        began = time.monotonic()
        k = Keys(ns)
        async with backup.backup_lock(self.r, name, wait=wait):
            leftover, last = await self._redis(lambda: self.r.hmget(k.backup, "temp", "id"))
            if leftover is not None:  # a backup that died midway
                await self._redis(lambda: nsops.delete_namespace(self.r, leftover.decode()))
            base = None if full or last is None else \
                await backup.read_base(self.store, name, last.decode())
            tmp = nsops.new_namespace_id()
            await self._redis(lambda: self.r.hset(k.backup, "temp", tmp))
            settings = {"name": name, "kind": "backup", "created": time.time(),
                        "source_volume": name, "source": ""}
            try:
                doc, changed = await self._capture(ns, tmp, settings, base is not None)
                if changed is None:
                    base = None
                doc["settings"].update(kind="volume", epoch="1", writer="")
                report = await backup.write_backup(self.store, name, doc, base=base,
                                                   changed_pages=changed)
            finally:  # the manifest (if any) protects the blocks from here on
                await self._redis(lambda: nsops.delete_namespace(self.r, tmp))
                await self._redis(lambda: self.r.hdel(k.backup, "temp"))
            report.expired = await backup.expire(self.store, name, keep)
            report.seconds = round(time.monotonic() - began, 3)
            fields = {f: v for f, v in report.as_dict().items()
                      if f in ("id", "url", "created", "files", "size_bytes", "pages",
                               "pages_written", "bytes_written", "seconds", "kind", "base",
                               "captured")}

            async def record() -> None:  # the capture is done with once its backup is recorded
                async with self.r.pipeline(transaction=True) as pipe:
                    pipe.hset(k.backup, mapping={**fields, "finished": time.time()})
                    pipe.delete(k.capture)
                    await pipe.execute()

            await self._redis(record)
        return report

    async def _capture(self, ns: str, tmp: str, settings: dict[str, Any],
                       incremental: bool) -> tuple[dict[str, Any], set[int] | None]:
        """Under one freeze of ``ns``: take its noted changes and copy, into namespace
        ``tmp`` (which protects their blocks from GC until the manifest names them), the
        whole volume or, when ``incremental`` and tracking was on, the inodes of every
        page a change touched. Returns the exported copy and the page numbers captured
        (None: the copy is the whole volume)."""
        pages: set[int] | None = None
        async with self._frozen(ns):
            tracked, changed = await self._redis(
                lambda: nsops.capture_changes(self.r, ns, listed=incremental))
            only = None
            if incremental and tracked:
                pages = {ino // backup.PAGE_INODES for ino in changed}
                only = [p * backup.PAGE_INODES + i for p in sorted(pages)
                        for i in range(backup.PAGE_INODES)]
            await self._copy(ns, tmp, settings, only=only)
        return await self._redis(lambda: nsops.export_namespace(self.r, tmp)), pages

    async def restore_volume(self, key: str, name: str, *,
                             capacity: int | None = None) -> tuple[VolumeInfo, int]:
        """A new volume ``name`` from the manifest at ``key`` of this service's prefix (a
        snapshot's or a backup's), into a Redis that may have lost everything. Every
        page and block object is read and checked against its hash before anything is
        written; a failure leaves no volume. Returns the volume and the objects checked."""
        check_name("volume", name)
        if capacity is not None and (not isinstance(capacity, int) or capacity <= 0):
            raise InvalidArgument(f"capacity must be a positive number of bytes, got {capacity!r}")
        with contextlib.suppress(VolumeNotFound):
            existing = await self.get_volume(name)
            raise VolumeExists(f"volume {name!r} already exists", existing)
        doc = await backup.load(self.store, key)
        src = doc["settings"]
        used = sum(nsops.node_bytes(node) for node in doc["inodes"].values())
        capacity = capacity or int(src.get("capacity") or 0)
        if capacity <= 0:
            raise InvalidArgument("the manifest records no capacity: give one")
        if capacity < used:
            raise InvalidArgument(f"capacity {capacity} is smaller than the {used} bytes of "
                                  "the manifest")
        checked = await backup.verify(self.store, doc)
        await self.claim(adopt=True)  # a Redis that lost everything takes the prefix over
        ns = nsops.new_namespace_id()
        settings: dict[str, Any] = {
            "name": name, "kind": "volume", "capacity": capacity, "created": time.time(),
            "block_size": int(src.get("block_size") or DEFAULT_BLOCK_SIZE), "source": "",
            V.RESTORED_FROM: backup.manifest_url(self.store.config.url, key)}
        if src.get("max_inodes"):
            settings["max_inodes"] = int(src["max_inodes"])
        try:
            await self._redis(lambda: nsops.import_namespace(self.r, ns, doc, settings))
            if not await self._register(VOLUMES, name, ns):
                raise VolumeExists(f"volume {name!r} already exists")
        except BaseException:
            with contextlib.suppress(Exception):
                await nsops.delete_namespace(self.r, ns)
            raise
        return await self.get_volume(name), checked

    def snapshot_url(self, snapshot_name: str) -> str:
        """The s3:// URL of a snapshot's manifest (what ``volume restore`` takes)."""
        return backup.manifest_url(self.store.config.url, manifest_key(snapshot_name))

    # ---- writer lease (fencing) -----------------------------------------------------
    async def acquire_writer(self, name: str, node_id: str, *, steal: bool = True) -> int:
        """Hand ``node_id`` the writer lease; a new epoch fences every previous writer.

        With ``steal=False`` the lease is only taken if it is free (or already ours), in the
        same transaction: two controllers can never both hand it out.
        """
        if not node_id:
            raise InvalidArgument("node id is required")
        key = Keys(await self._volume_ns(check_name("volume", name))).vol

        async def swap() -> int:
            async with self.r.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        await pipe.watch(key)
                        writer, epoch = await pipe.hmget(key, V.WRITER, V.EPOCH)
                        if epoch is None:
                            raise VolumeNotFound(f"volume {name!r} not found")
                        if writer is not None and writer.decode() == node_id:
                            return int(epoch)
                        if not steal and writer:
                            raise LeaseHeld(f"volume {name!r} is published to {writer.decode()}",
                                            writer.decode())
                        pipe.multi()
                        pipe.hincrby(key, V.EPOCH, 1)
                        pipe.hset(key, V.WRITER, node_id)
                        new_epoch, _ = await pipe.execute()
                        return int(new_epoch)
                    except aioredis.WatchError:
                        continue

        return await self._redis(swap)

    async def release_writer(self, name: str, node_id: str) -> None:
        """Take the lease back from ``node_id`` (and fence it); no-op if it does not hold it."""
        key = Keys(await self._volume_ns(check_name("volume", name))).vol

        async def release() -> None:
            async with self.r.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        await pipe.watch(key)
                        writer = await pipe.hget(key, V.WRITER)
                        if writer is None or writer.decode() != node_id:
                            return
                        pipe.multi()
                        pipe.hincrby(key, V.EPOCH, 1)
                        pipe.hset(key, V.WRITER, "")
                        await pipe.execute()
                        return
                    except aioredis.WatchError:
                        continue

        await self._redis(release)

    # ---- snapshots ------------------------------------------------------------------
    async def _block_size(self, ns: str) -> int:
        raw = await self._redis(lambda: self.r.hget(Keys(ns).vol, V.BLOCK_SIZE))
        return int(raw or DEFAULT_BLOCK_SIZE)

    async def _check_clone_capacity(self, source_ns: str, capacity: int) -> None:
        used = int(await self._redis(lambda: self.r.hget(Keys(source_ns).vol, V.USED)) or 0)
        if capacity < used:
            raise InvalidArgument(f"capacity {capacity} is smaller than the {used} bytes of the source")

    async def _copy(self, src: str, dst: str, settings: dict[str, Any],
                    only: list[int] | None = None) -> None:
        """Copy ``src`` (which must not change meanwhile) to the new namespace ``dst``:
        all of it, or the volume record and those of the inodes ``only`` that exist."""
        if not await self._redis(
                lambda: nsops.copy_namespace(self.r, src, dst, settings, only=only)):
            doc = await self._redis(lambda: nsops.export_namespace(self.r, src, only=only))
            await self._redis(lambda: nsops.import_namespace(self.r, dst, doc, settings))

    async def _copy_live(self, src: str, dst: str, settings: dict[str, Any]) -> None:
        """Copy a volume in use: its writers wait while its metadata is copied."""
        async with self._frozen(src):
            await self._copy(src, dst, settings)

    @contextlib.asynccontextmanager
    async def _frozen(self, ns: str) -> AsyncIterator[None]:
        """The volume's writers wait while this is entered. The freeze is renewed meanwhile
        (it ends by itself if this process dies), so what is read inside is one instant
        of the volume however long it takes."""
        token = nsops.new_namespace_id()  # this freeze's own (freezes nest)
        await self._redis(lambda: nsops.freeze(self.r, ns, token))

        async def renew() -> None:
            while True:
                await asyncio.sleep(nsops.FREEZE_SECONDS / 4)
                with contextlib.suppress(Exception):
                    await nsops.freeze(self.r, ns, token)

        renewer = asyncio.create_task(renew())
        try:
            yield
        finally:
            renewer.cancel()
            await self._redis(lambda: nsops.thaw(self.r, ns, token))

    async def _clone_snapshot(self, name: str, ns: str, settings: dict[str, Any]) -> None:
        """A new volume from a snapshot: copied in Redis, or restored from its S3 manifest
        when Redis no longer has it."""
        check_name("snapshot", name)
        source = await self._redis(lambda: self.r.hget(SNAPSHOTS, name))
        if source is not None:
            await self._check_clone_capacity(source.decode(), int(settings[V.CAPACITY]))
            settings[V.BLOCK_SIZE] = await self._block_size(source.decode())
            await self._copy(source.decode(), ns, settings)
            return
        try:
            data = await self.store.get(manifest_key(name))
        except NoSuchObject as exc:
            raise SnapshotNotFound(f"snapshot {name!r} not found") from exc
        await self.claim(adopt=True)  # a restore into a Redis that lost everything
        doc = nsops.decode_manifest(data)
        used = int(doc["settings"].get(V.USED, 0))
        if int(settings[V.CAPACITY]) < used:
            raise InvalidArgument(
                f"capacity {settings[V.CAPACITY]} is smaller than the {used} bytes of the source")
        settings[V.BLOCK_SIZE] = int(doc["settings"].get(V.BLOCK_SIZE, DEFAULT_BLOCK_SIZE))
        await self._redis(lambda: nsops.import_namespace(self.r, ns, doc, settings))

    async def get_snapshot(self, name: str) -> SnapshotInfo:
        check_name("snapshot", name)
        ns = await self._redis(lambda: self.r.hget(SNAPSHOTS, name))
        if ns is None:
            raise SnapshotNotFound(f"snapshot {name!r} not found")
        raw = await self._redis(lambda: self.r.hgetall(Keys(ns.decode()).vol))
        if not raw:
            raise SnapshotNotFound(f"snapshot {name!r} not found")
        return _snapshot_info(name, ns.decode(), raw)

    async def list_snapshots(self, source_volume: str | None = None) -> list[SnapshotInfo]:
        registry = await self._redis(lambda: self.r.hgetall(SNAPSHOTS))
        names = sorted((k.decode(), v.decode()) for k, v in registry.items())
        pipe = self.r.pipeline(transaction=False)
        for _, ns in names:
            pipe.hgetall(Keys(ns).vol)
        rows = await self._redis(pipe.execute) if names else []
        infos = [_snapshot_info(n, ns, raw) for (n, ns), raw in zip(names, rows, strict=True) if raw]
        if source_volume is not None:
            infos = [i for i in infos if i.source_volume == source_volume]
        return infos

    async def create_snapshot(self, volume_name: str, snapshot_name: str) -> SnapshotInfo:
        """Snapshot a volume. Repeating the call for a snapshot that exists but is not
        ready (its manifest upload failed, or the caller died) finishes it."""
        check_name("snapshot", snapshot_name)
        with contextlib.suppress(SnapshotNotFound):
            existing = await self.get_snapshot(snapshot_name)
            if not existing.ready_to_use and existing.source_volume == volume_name:
                return await self.finish_snapshot(snapshot_name)
            raise SnapshotExists(f"snapshot {snapshot_name!r} already exists", existing)
        source_ns = await self._volume_ns(check_name("volume", volume_name))
        await self.claim()
        ns = nsops.new_namespace_id()
        settings = {V.NAME: snapshot_name, V.KIND: "snapshot", V.CREATED: time.time(),
                    V.SOURCE_VOLUME: volume_name, V.READY: 0, V.SOURCE: ""}
        await self._copy_live(source_ns, ns, settings)
        if not await self._register(SNAPSHOTS, snapshot_name, ns):
            await nsops.delete_namespace(self.r, ns)
            raise SnapshotExists(f"snapshot {snapshot_name!r} already exists",
                                 await self.get_snapshot(snapshot_name))
        return await self.finish_snapshot(snapshot_name)

    async def finish_snapshot(self, snapshot_name: str) -> SnapshotInfo:
        """Write the manifest of a registered snapshot and mark it ready (idempotent).

        The manifest is the snapshot's durable copy in S3, made from the immutable
        snapshot namespace while the source volume is already writable again.
        """
        info = await self.get_snapshot(snapshot_name)
        if info.ready_to_use:
            return info
        doc = await self._redis(lambda: nsops.export_namespace(self.r, info.id))
        await self.store.put(manifest_key(snapshot_name), await nsops.encode_manifest_async(doc))
        await self._redis(lambda: self.r.hset(Keys(info.id).vol, V.READY, 1))
        return await self.get_snapshot(snapshot_name)

    async def delete_snapshot(self, name: str) -> None:
        check_name("snapshot", name)
        ns = await self._redis(lambda: self.r.hget(SNAPSHOTS, name))
        if ns is None:
            if not await self.store.exists(manifest_key(name)):
                raise SnapshotNotFound(f"snapshot {name!r} not found")
        else:
            await self._redis(lambda: self.r.hdel(SNAPSHOTS, name))
            await self._redis(lambda: nsops.delete_namespace(self.r, ns.decode()))
        await self.store.delete(manifest_key(name))
