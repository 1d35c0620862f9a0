"""CSI Controller service: volumes, snapshots, expansion and the fencing point.

Volume and snapshot ids are the names the CO chose (``pvc-...``, ``snapshot-...``):
chunkfs keys volumes by name, so CreateVolume is idempotent by name and every later
RPC finds the volume from its id alone.

ControllerPublishVolume checks that the node exists (``csi/registry.py``), records
where the volume is published (``csi/publications.py``) and is where single-writer
volumes are fenced: it hands the node the writer lease (``VolumeService.acquire_writer``),
whose new epoch travels to the node in ``publish_context["epoch"]`` and into
``chunkfs mount -o epoch=N``. Every metadata commit of that mount checks the epoch, so a
node that lost the lease (its pod was rescheduled away while it was partitioned) can no
longer commit anything.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import timestamp_pb2, wrappers_pb2

from chunkfs import errors as cf
from csi import errors, publications, validate
from csi.backends import ServiceCache
from csi.registry import NodeRegistry
from csi.rpc import KeyLocks, exclusive, require
from csi.v1 import csi_pb2, csi_pb2_grpc

RPC = csi_pb2.ControllerServiceCapability.RPC
CAPABILITIES = (
    RPC.CREATE_DELETE_VOLUME, RPC.PUBLISH_UNPUBLISH_VOLUME, RPC.LIST_VOLUMES, RPC.GET_CAPACITY,
    RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS, RPC.GET_SNAPSHOT, RPC.CLONE_VOLUME,
    RPC.PUBLISH_READONLY, RPC.EXPAND_VOLUME, RPC.GET_VOLUME, RPC.SINGLE_NODE_MULTI_WRITER,
)
EPOCH_KEY = "epoch"  # publish_context key read by NodeStageVolume


def _optional(msg: Any, field: str) -> Any:
    return getattr(msg, field) if msg.HasField(field) else None


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    whole = int(seconds)
    return timestamp_pb2.Timestamp(seconds=whole, nanos=int((seconds - whole) * 1e9))


def _source_of(info: Any) -> tuple[str, str] | None:
    """("snapshot"|"volume", name) from VolumeInfo.source, or None."""
    source = getattr(info, "source", None)
    if not source:
        return None
    kind, sep, name = str(source).partition(":")
    if sep and kind in ("snapshot", "volume"):
        return kind, name
    return "snapshot", str(source)


def _content_source(kind: str, name: str) -> csi_pb2.VolumeContentSource:
    if kind == "snapshot":
        return csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=name))
    return csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=name))


def to_volume(info: Any, context: dict[str, str] | None = None) -> csi_pb2.Volume:
    volume = csi_pb2.Volume(volume_id=info.name, capacity_bytes=info.capacity,
                            volume_context=context or {})
    source = _source_of(info)
    if source:
        volume.content_source.CopyFrom(_content_source(*source))
    return volume


def to_snapshot(info: Any) -> csi_pb2.Snapshot:
    return csi_pb2.Snapshot(
        snapshot_id=info.name, source_volume_id=info.source_volume,
        size_bytes=info.size_bytes, creation_time=_timestamp(info.created),
        ready_to_use=info.ready_to_use)


class ControllerServicer(csi_pb2_grpc.ControllerServicer):
    def __init__(self, services: ServiceCache,
                 rules: validate.CapacityRules | None = None,
                 registry: NodeRegistry | None = None) -> None:
        self.services = services
        self.rules = rules or validate.CapacityRules()
        self.registry = registry or NodeRegistry(services)
        self.locks = KeyLocks()

    # --- volumes --------------------------------------------------------------------

    @require("name", "volume_capabilities")
    @exclusive("volume", lambda r: r.name)
    async def CreateVolume(self, request, context):
        name = validate.check_id("name", request.name)
        validate.check_capabilities(request.volume_capabilities)
        options = validate.volume_options(
            {**request.parameters, **request.mutable_parameters})
        required, limit = validate.capacity_range(_optional(request, "capacity_range"))
        source = self._requested_source(request)
        svc = await self.services.for_secrets(request.secrets)

        try:
            existing = await svc.get_volume(name)
        except cf.VolumeNotFound:
            existing = None
        if existing is None:
            floor, kwargs = await self._source_floor(svc, source)
            capacity = validate.choose_capacity(required, limit, self.rules, floor)
            try:
                existing = await svc.create_volume(name, capacity, **kwargs)
            except cf.VolumeExists as exc:  # created behind our back: check it like a repeat
                existing = exc.existing or await svc.get_volume(name)
            else:
                return csi_pb2.CreateVolumeResponse(volume=to_volume(existing, options))
        self._check_compatible(existing, required, limit, source)
        return csi_pb2.CreateVolumeResponse(volume=to_volume(existing, options))

    @staticmethod
    def _requested_source(request) -> tuple[str, str] | None:
        if not request.HasField("volume_content_source"):
            return None
        src = request.volume_content_source
        if src.HasField("snapshot") and src.snapshot.snapshot_id:
            return "snapshot", src.snapshot.snapshot_id
        if src.HasField("volume") and src.volume.volume_id:
            return "volume", src.volume.volume_id
        raise errors.missing("volume_content_source.snapshot.snapshot_id or "
                             "volume_content_source.volume.volume_id")

    @staticmethod
    async def _source_floor(svc, source) -> tuple[int, dict[str, str]]:
        """(minimum capacity, create_volume kwargs) for a content source."""
        if source is None:
            return 0, {}
        kind, name = source
        if kind == "snapshot":
            try:
                snap = await svc.get_snapshot(name)
            except cf.SnapshotNotFound:
                raise errors.snapshot_not_found(name) from None
            return snap.size_bytes, {"source_snapshot": name}
        try:
            vol = await svc.get_volume(name)
        except cf.VolumeNotFound:
            raise errors.volume_not_found(name) from None
        return vol.capacity, {"source_volume": name}

    @staticmethod
    def _check_compatible(info, required: int, limit: int, source) -> None:
        if required and info.capacity < required:
            raise errors.volume_exists_incompatible(
                info.name, f"capacity {info.capacity} < required_bytes {required}")
        if limit and info.capacity > limit:
            raise errors.volume_exists_incompatible(
                info.name, f"capacity {info.capacity} > limit_bytes {limit}")
        if _source_of(info) != source:
            have = ":".join(_source_of(info) or ("no source",))
            raise errors.volume_exists_incompatible(info.name, f"content source is {have}")

    @require("volume_id")
    @exclusive("volume", lambda r: r.volume_id)
    async def DeleteVolume(self, request, context):
        svc = await self.services.for_secrets(request.secrets)
        try:
            info = await svc.get_volume(request.volume_id)
            if info.writer:
                raise errors.volume_in_use(
                    request.volume_id, f"published for writing at node {info.writer!r}")
            nodes = sorted(await publications.load(svc, info.id))
            if nodes:
                raise errors.volume_in_use(
                    request.volume_id, "published at node " + ", ".join(map(repr, nodes)))
            await svc.delete_volume(request.volume_id)
        except cf.VolumeNotFound:
            return csi_pb2.DeleteVolumeResponse()  # already gone: success (idempotent)
        await publications.drop_all(svc, info.id)
        return csi_pb2.DeleteVolumeResponse()

    @require("volume_id", "node_id", "volume_capability")
    @exclusive("volume", lambda r: r.volume_id)
    async def ControllerPublishVolume(self, request, context):
        validate.check_capabilities([request.volume_capability])
        node_id = validate.check_node_id("node_id", request.node_id)
        svc = await self.services.for_secrets(request.secrets)
        info = await self._volume(svc, request.volume_id)  # NOT_FOUND for an unknown volume
        if await self.registry.known(node_id) is False:
            raise errors.node_not_found(node_id)
        mode, readonly = validate.access_mode(request.volume_capability), request.readonly
        pubs = await publications.load(svc, info.id)
        mine = pubs.pop(node_id, None)
        if mine is not None and not mine.compatible(mode, readonly):
            raise errors.published_incompatible(
                request.volume_id, f"node {node_id!r}", f"{_describe(mine.mode, mine.readonly)}"
                f"; this request asks for {_describe(mode, readonly)}")
        if mine is None and pubs and (mode in validate.SINGLE_NODE_MODES or any(
                p.mode in validate.SINGLE_NODE_MODES for p in pubs.values())):
            raise errors.published_elsewhere(request.volume_id, sorted(pubs)[0])
        publish_context: dict[str, str] = {}
        if not readonly and mode in validate.SINGLE_WRITER_MODES:
            try:  # a repeat keeps the epoch the node mounted with; another holder is refused
                epoch = await svc.acquire_writer(request.volume_id, node_id, steal=False)
            except cf.LeaseHeld as exc:
                raise errors.published_elsewhere(request.volume_id, exc.holder) from None
            publish_context[EPOCH_KEY] = str(epoch)
        if mine is None or mine.context != publish_context:
            await publications.save(svc, info.id, publications.Publication(
                node_id, mode, readonly, publish_context))
        return csi_pb2.ControllerPublishVolumeResponse(publish_context=publish_context)

    @require("volume_id")
    @exclusive("volume", lambda r: r.volume_id)
    async def ControllerUnpublishVolume(self, request, context):
        svc = await self.services.for_secrets(request.secrets)
        try:
            info = await svc.get_volume(request.volume_id)
        except cf.VolumeNotFound:
            return csi_pb2.ControllerUnpublishVolumeResponse()  # nothing to unpublish
        pubs = await publications.load(svc, info.id)
        nodes = [request.node_id] if request.node_id else sorted(pubs)  # none: every node
        if info.writer and (not request.node_id or info.writer == request.node_id):
            await svc.release_writer(request.volume_id, info.writer)
        await publications.drop(svc, info.id, [n for n in nodes if n in pubs])
        return csi_pb2.ControllerUnpublishVolumeResponse()

    @require("volume_id", "volume_capabilities")
    async def ValidateVolumeCapabilities(self, request, context):
        svc = await self.services.for_secrets(request.secrets)
        await self._volume(svc, request.volume_id)
        for cap in request.volume_capabilities:
            problem = validate.capability_problem(cap)
            if problem:
                return csi_pb2.ValidateVolumeCapabilitiesResponse(message=problem)
        try:
            validate.check_capabilities(request.volume_capabilities)
            validate.volume_options({**request.parameters, **request.mutable_parameters})
        except errors.CsiError as exc:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=exc.message)
        Confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed
        modes = {validate.access_mode(c) for c in request.volume_capabilities}
        return csi_pb2.ValidateVolumeCapabilitiesResponse(
            confirmed=Confirmed(
                volume_context=request.volume_context,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters,
                mutable_parameters=request.mutable_parameters),
            message=(validate.MULTI_NODE_MULTI_WRITER_NOTE
                     if validate.Mode.MULTI_NODE_MULTI_WRITER in modes else ""))

    async def ListVolumes(self, request, context):
        svc = await self.services.for_secrets({})
        volumes = await svc.list_volumes()
        start, end, token = validate.page(
            [v.name for v in volumes], request.starting_token, request.max_entries)
        Entry = csi_pb2.ListVolumesResponse.Entry
        return csi_pb2.ListVolumesResponse(
            entries=[Entry(volume=to_volume(v)) for v in volumes[start:end]], next_token=token)

    async def GetCapacity(self, request, context):
        validate.volume_options(request.parameters)
        if any(validate.capability_problem(c) for c in request.volume_capabilities):
            return csi_pb2.GetCapacityResponse(available_capacity=0)
        # Objects live in S3, which has no size: report the largest volume we create.
        return csi_pb2.GetCapacityResponse(
            available_capacity=self.rules.maximum,
            maximum_volume_size=_int64(self.rules.maximum),
            minimum_volume_size=_int64(self.rules.minimum))

    async def ControllerGetCapabilities(self, request, context):
        Cap = csi_pb2.ControllerServiceCapability
        return csi_pb2.ControllerGetCapabilitiesResponse(
            capabilities=[Cap(rpc=Cap.RPC(type=t)) for t in CAPABILITIES])

    @require("volume_id", "capacity_range")
    @exclusive("volume", lambda r: r.volume_id)
    async def ControllerExpandVolume(self, request, context):
        if request.HasField("volume_capability"):
            validate.check_capabilities([request.volume_capability])
        required, limit = validate.capacity_range(request.capacity_range)
        svc = await self.services.for_secrets(request.secrets)
        info = await self._volume(svc, request.volume_id)
        capacity = info.capacity
        if capacity < required:
            if required > self.rules.maximum:
                raise errors.capacity_out_of_range(
                    f"{required} bytes exceeds the maximum volume size {self.rules.maximum}")
            capacity = (await svc.resize_volume(request.volume_id, required)).capacity
        elif limit and capacity > limit:
            raise errors.capacity_out_of_range(
                f"the volume has {capacity} bytes already and cannot shrink to {limit}")
        # chunkfs mounts see the new quota at once: nothing to do on the node.
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=capacity, node_expansion_required=False)

    @require("volume_id")
    async def ControllerGetVolume(self, request, context):
        svc = await self.services.for_secrets({})
        info = await self._volume(svc, request.volume_id)
        nodes = set(await publications.load(svc, info.id)) | ({info.writer} - {None})
        Status = csi_pb2.ControllerGetVolumeResponse.VolumeStatus
        return csi_pb2.ControllerGetVolumeResponse(
            volume=to_volume(info), status=Status(published_node_ids=sorted(nodes)))

    @staticmethod
    async def _volume(svc, volume_id: str):
        try:
            return await svc.get_volume(volume_id)
        except cf.VolumeNotFound:
            raise errors.volume_not_found(volume_id) from None

    # --- snapshots ------------------------------------------------------------------

    @require("source_volume_id", "name")
    @exclusive("snapshot", lambda r: r.name)
    async def CreateSnapshot(self, request, context):
        name = validate.check_id("name", request.name)
        svc = await self.services.for_secrets(request.secrets)
        try:
            info = await svc.get_snapshot(name)
        except cf.SnapshotNotFound:
            try:
                info = await svc.create_snapshot(request.source_volume_id, name)
            except cf.VolumeNotFound:
                raise errors.volume_not_found(request.source_volume_id) from None
            except cf.SnapshotExists as exc:
                info = exc.existing or await svc.get_snapshot(name)
        if info.source_volume != request.source_volume_id:
            raise errors.snapshot_exists_incompatible(name, info.source_volume)
        if not info.ready_to_use:  # an earlier call failed half-way: this retry finishes it
            info = await svc.finish_snapshot(name)
        return csi_pb2.CreateSnapshotResponse(snapshot=to_snapshot(info))

    @require("snapshot_id")
    @exclusive("snapshot", lambda r: r.snapshot_id)
    async def DeleteSnapshot(self, request, context):
        svc = await self.services.for_secrets(request.secrets)
        try:
            await svc.delete_snapshot(request.snapshot_id)
        except cf.SnapshotNotFound:
            pass  # already gone: success (idempotent)
        return csi_pb2.DeleteSnapshotResponse()

    async def ListSnapshots(self, request, context):
        svc = await self.services.for_secrets(request.secrets)
        if request.snapshot_id:
            try:
                snaps = [await svc.get_snapshot(request.snapshot_id)]
            except cf.SnapshotNotFound:
                snaps = []
            if request.source_volume_id:
                snaps = [s for s in snaps if s.source_volume == request.source_volume_id]
        elif request.source_volume_id:
            try:
                snaps = await svc.list_snapshots(source_volume=request.source_volume_id)
            except cf.VolumeNotFound:
                snaps = []
        else:
            snaps = await svc.list_snapshots()
        snaps = sorted(snaps, key=lambda s: s.name)
        start, end, token = validate.page(
            [s.name for s in snaps], request.starting_token, request.max_entries)
        Entry = csi_pb2.ListSnapshotsResponse.Entry
        return csi_pb2.ListSnapshotsResponse(
            entries=[Entry(snapshot=to_snapshot(s)) for s in snaps[start:end]],
            next_token=token)

    @require("snapshot_id")
    async def GetSnapshot(self, request, context):
        svc = await self.services.for_secrets(request.secrets)
        try:
            info = await svc.get_snapshot(request.snapshot_id)
        except cf.SnapshotNotFound:
            raise errors.snapshot_not_found(request.snapshot_id) from None
        return csi_pb2.GetSnapshotResponse(snapshot=to_snapshot(info))


def _describe(mode: int, readonly: bool) -> str:
    return f"access mode {validate.Mode.Mode.Name(mode)}, " + (
        "readonly" if readonly else "read-write")


def _int64(value: int) -> wrappers_pb2.Int64Value:
    return wrappers_pb2.Int64Value(value=value)
