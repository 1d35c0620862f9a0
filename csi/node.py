"""CSI Node service: stage (chunkfs mount), publish (bind mount), stats, expansion.

The mount mechanics and their crash safety live in ``csi/mounts.py``; this module
holds what the spec asks of each RPC: required fields, paths under the kubelet
directory, the idempotency and compatibility rules, and the per-volume lock.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os

from chunkfs import errors as cf
from chunkfs.control import ControlError
from csi import errors, mountinfo, paths, validate
from csi.backends import ServiceCache, default_configured
from csi.controller import EPOCH_KEY
from csi.mounts import Health, NodeMounts, describe, is_dead_error, is_mountpoint, owner_of
from csi.rpc import KeyLocks, exclusive, require
from csi.state import PublishRecord, StageRecord, backend_identity
from csi.v1 import csi_pb2, csi_pb2_grpc

log = logging.getLogger("chunkfs.csi.node")

RPC = csi_pb2.NodeServiceCapability.RPC
CAPABILITIES = (RPC.STAGE_UNSTAGE_VOLUME, RPC.GET_VOLUME_STATS, RPC.EXPAND_VOLUME,
                RPC.VOLUME_CONDITION, RPC.SINGLE_NODE_MULTI_WRITER)
Usage = csi_pb2.VolumeUsage


class NodeServicer(csi_pb2_grpc.NodeServicer):
    def __init__(self, services: ServiceCache, mounts: NodeMounts, *, node_id: str,
                 kubelet_dir: str | None = "/var/lib/kubelet",
                 max_volumes: int = 64, locks: KeyLocks | None = None) -> None:
        self.services = services
        self.mounts = mounts
        self.node_id = node_id
        self.kubelet = paths.KubeletDir(kubelet_dir)
        self.max_volumes = max_volumes
        self.locks = locks or KeyLocks()

    async def _path(self, field: str, path: str) -> str:
        """The canonical path, every component checked without following symlinks
        (INVALID_ARGUMENT otherwise; ``csi/paths.py``)."""
        canonical = self.kubelet.canonical(field, path)
        try:
            await asyncio.to_thread(paths.inspect, canonical)
        except paths.PathError as exc:
            raise errors.unsafe_path(field, path, exc.reason) from None
        return canonical

    # --- stage ----------------------------------------------------------------------

    @require("volume_id", "staging_target_path", "volume_capability")
    @exclusive("volume", lambda r: r.volume_id)
    async def NodeStageVolume(self, request, context):
        volume_id = validate.check_id("volume_id", request.volume_id)
        staging = await self._path("staging_target_path", request.staging_target_path)
        cap = request.volume_capability
        validate.check_capabilities([cap])
        self.mounts.check_owned(volume_id, "staging_target_path", staging)
        _, options = validate.split_mount_flags(cap.mount.mount_flags)
        backend = await self.services.backend_for(request.secrets)  # a Secret: complete
        env = dict(backend.overrides)
        ctx = request.volume_context
        mode = validate.access_mode(cap)
        rec = StageRecord(
            volume_id=volume_id, staging_path=staging, mode=mode,
            readonly=mode in validate.READ_ONLY_MODES, epoch=_epoch(request.publish_context),
            options=options, cache_size=ctx.get("cache-size") or None,
            backend=backend_identity(env))

        existing = self.mounts.staged(volume_id)
        if existing is not None:
            if existing.staging_path != staging:
                raise errors.staged_elsewhere(volume_id, existing.staging_path)
            if existing.same_request(rec):
                await self.mounts.restage(existing, env)
                return csi_pb2.NodeStageVolumeResponse()
            if not _newer_lease(existing, rec):
                raise errors.published_incompatible(
                    volume_id, staging,
                    "another volume_capability, publish_context or Secret backend")
            # The lease came back to this node with a new epoch while the old, fenced mount
            # was never unstaged (a partition healed): replace it unless pods still use it.
            live = self.mounts.prune_publishes(volume_id)
            if live:
                raise errors.volume_in_use(
                    volume_id, "staged with an older writer epoch and still published at "
                    + ", ".join(p.target_path for p in live))
            log.warning("volume %s: re-staging with epoch %s (was %s)", volume_id, rec.epoch,
                        existing.epoch)
            await self.mounts.unstage(volume_id, staging)

        if rec.epoch is None and mode in validate.SINGLE_WRITER_MODES:
            log.warning("volume %s: staged for writing without an epoch in publish_context "
                        "(no ControllerPublishVolume?): it is not fenced", volume_id)
        svc = await self.services.get(backend)
        try:
            await svc.get_volume(volume_id)
        except cf.VolumeNotFound:
            raise errors.volume_not_found(volume_id) from None
        await self.mounts.stage(rec, env)
        return csi_pb2.NodeStageVolumeResponse()

    @require("volume_id", "staging_target_path")
    @exclusive("volume", lambda r: r.volume_id)
    async def NodeUnstageVolume(self, request, context):
        volume_id = validate.check_id("volume_id", request.volume_id)
        staging = await self._path("staging_target_path", request.staging_target_path)
        self.mounts.check_owned(volume_id, "staging_target_path", staging)
        live = self.mounts.prune_publishes(volume_id)
        if live:
            raise errors.volume_in_use(
                volume_id, "still published at " + ", ".join(p.target_path for p in live))
        await self._check_exists_if_unknown(volume_id, staging)
        await self.mounts.unstage(volume_id, staging)
        return csi_pb2.NodeUnstageVolumeResponse()

    # --- publish --------------------------------------------------------------------

    @require("volume_id", "target_path", "volume_capability")
    @exclusive("volume", lambda r: r.volume_id)
    async def NodePublishVolume(self, request, context):
        volume_id = validate.check_id("volume_id", request.volume_id)
        if not request.staging_target_path:  # the spec's code for this case
            raise errors.not_staged(volume_id, "")
        staging = await self._path("staging_target_path", request.staging_target_path)
        target = await self._path("target_path", request.target_path)
        if target == staging or target.startswith(staging + "/"):
            raise errors.invalid("target_path", f"{request.target_path!r} is (inside) the "
                                 "staging path")
        cap = request.volume_capability
        validate.check_capabilities([cap])
        flags, _ = validate.split_mount_flags(cap.mount.mount_flags)
        mode = validate.access_mode(cap)
        readonly = request.readonly or mode in validate.READ_ONLY_MODES or "ro" in flags
        rec = PublishRecord(volume_id=volume_id, target_path=target, staging_path=staging,
                            mode=mode, readonly=readonly, flags=flags)

        stage = self.mounts.staged(volume_id)
        if stage is None or stage.staging_path != staging:
            raise errors.not_staged(volume_id, staging)
        if stage.readonly and not readonly:
            raise errors.staged_read_only(volume_id)
        await self.mounts.ensure_staged(stage)  # never bind a dead mount into a pod
        existing = self.mounts.publication(target)
        if existing is not None:
            if not existing.same_request(rec):
                raise errors.published_incompatible(
                    volume_id, target, "another volume_capability or readonly flag")
            await self.mounts.ensure_published(existing)
            return csi_pb2.NodePublishVolumeResponse()
        self.mounts.check_owned(volume_id, "target_path", target)
        others = [p for p in self.mounts.prune_publishes(volume_id) if p.target_path != target]
        if others and mode in validate.ONE_TARGET_MODES:
            raise errors.single_writer_published(volume_id, others[0].target_path)
        await self.mounts.publish(rec)
        return csi_pb2.NodePublishVolumeResponse()

    @require("volume_id", "target_path")
    @exclusive("volume", lambda r: r.volume_id)
    async def NodeUnpublishVolume(self, request, context):
        volume_id = validate.check_id("volume_id", request.volume_id)
        target = await self._path("target_path", request.target_path)
        stage = self.mounts.staged(volume_id)
        if stage is not None and stage.staging_path == target:
            raise errors.invalid("target_path", f"{request.target_path!r} is the staging "
                                 "path; use NodeUnstageVolume")
        self.mounts.check_owned(volume_id, "target_path", target)
        await self._check_exists_if_unknown(volume_id, target)
        await self.mounts.unpublish(target)
        return csi_pb2.NodeUnpublishVolumeResponse()

    async def _check_exists_if_unknown(self, volume_id: str, path: str) -> None:
        """NOT_FOUND for a volume this node never saw and the default backend does not
        know (the spec's "volume does not exist"). Anything known here, mounted at the
        path, or not checkable (no default backend, backend down) is left to the
        idempotent undo: teardown must not get stuck on the backend."""
        if (self.mounts.staged(volume_id) or self.mounts.publishes_of(volume_id)
                or is_mountpoint(path) or not default_configured()):
            return
        try:
            svc = await self.services.for_secrets({})
            await asyncio.wait_for(svc.get_volume(volume_id), 10)
        except cf.VolumeNotFound:
            raise errors.volume_not_found(volume_id) from None
        except Exception as exc:  # noqa: BLE001 - unknown: do the (idempotent) undo
            log.info("volume %s: existence not checked (%s)", volume_id, exc)

    # --- health and size ------------------------------------------------------------

    async def _known_path(self, volume_id: str, raw: str) -> str:
        """``raw`` as the canonical path of a stage or publish of the volume on this node,
        with the volume mounted there; NOT_FOUND for anything else (the spec's "volume
        does not exist on the specified volume_path"), whatever the path looks like."""
        try:
            path = self.kubelet.canonical("volume_path", raw)
        except errors.CsiError:
            raise errors.not_mounted_at(volume_id, raw, "not a path under the kubelet "
                                        "directory") from None
        if not self.mounts.knows(volume_id, path):
            raise errors.not_mounted_at(volume_id, raw)
        try:
            kind = await asyncio.to_thread(paths.inspect, path)
        except paths.PathError as exc:
            raise errors.not_mounted_at(volume_id, raw, exc.reason) from None
        entry = mountinfo.mounts().get(path)
        if kind is not paths.Kind.MOUNTPOINT or entry is None:
            raise errors.not_mounted_at(volume_id, raw, "nothing is mounted there")
        if owner_of(entry) != volume_id:
            raise errors.not_mounted_at(volume_id, raw,
                                        f"it is a mount point of {describe(entry)}")
        return path

    @require("volume_id", "volume_path")
    async def NodeGetVolumeStats(self, request, context):
        path = await self._known_path(request.volume_id, request.volume_path)
        health = await self.mounts.prober.health(path)
        Condition = csi_pb2.VolumeCondition
        if health is not Health.ALIVE:
            message = _condition_message(health, path)
            if health is Health.DEAD and not self.mounts.can_remount(request.volume_id):
                message = errors.credentials_unavailable(request.volume_id).message
            return csi_pb2.NodeGetVolumeStatsResponse(volume_condition=Condition(
                abnormal=True, message=message))
        stage = self.mounts.staged(request.volume_id)
        try:
            st = await self.mounts.prober.statvfs(path)
            status = (await self.mounts.prober.status(stage.staging_path)) if stage else {}
        except TimeoutError:
            return csi_pb2.NodeGetVolumeStatsResponse(volume_condition=Condition(
                abnormal=True, message=_condition_message(Health.HUNG, path)))
        except ControlError as exc:
            return csi_pb2.NodeGetVolumeStatsResponse(
                volume_condition=Condition(abnormal=True, message=str(exc)))
        except (OSError, ValueError) as exc:
            message = (_condition_message(Health.DEAD, path)
                       if isinstance(exc, OSError) and is_dead_error(exc)
                       else f"statfs of {path} failed: {exc}")
            return csi_pb2.NodeGetVolumeStatsResponse(
                volume_condition=Condition(abnormal=True, message=message))
        condition = Condition(abnormal=False, message="mounted")
        if status.get("fenced"):
            condition = Condition(abnormal=True, message=(
                "this node lost the volume's writer lease (another node published it): "
                "writes fail with EIO"))
        elif status.get("last_error"):
            condition.message = f"mounted; last error: {status['last_error']}"
        total, free, avail = (st.f_blocks * st.f_frsize, st.f_bfree * st.f_frsize,
                              st.f_bavail * st.f_frsize)
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=[
                Usage(unit=Usage.BYTES, total=total, available=avail, used=total - free),
                Usage(unit=Usage.INODES, total=st.f_files, available=st.f_favail,
                      used=st.f_files - st.f_ffree),
            ],
            volume_condition=condition)

    @require("volume_id", "volume_path")
    async def NodeExpandVolume(self, request, context):
        """chunkfs mounts read the quota from the metadata engine: resizes are live."""
        path = await self._known_path(request.volume_id, request.volume_path)
        if request.HasField("volume_capability"):
            validate.check_capabilities([request.volume_capability])
        health = await self.mounts.prober.health(path)
        if health is not Health.ALIVE:
            raise errors.mount_unhealthy(_condition_message(health, path))
        st = await self.mounts.prober.statvfs(path)
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=st.f_blocks * st.f_frsize)

    # --- about the node -------------------------------------------------------------

    async def NodeGetCapabilities(self, request, context):
        Cap = csi_pb2.NodeServiceCapability
        return csi_pb2.NodeGetCapabilitiesResponse(
            capabilities=[Cap(rpc=Cap.RPC(type=t)) for t in CAPABILITIES])

    async def NodeGetInfo(self, request, context):
        # No accessible_topology: every node reaches every volume through S3 and Redis.
        return csi_pb2.NodeGetInfoResponse(node_id=self.node_id,
                                           max_volumes_per_node=self.max_volumes)


def _newer_lease(old: StageRecord, new: StageRecord) -> bool:
    """``new`` differs from ``old`` only by a newer writer epoch."""
    if old.epoch is None or new.epoch is None or new.epoch <= old.epoch:
        return False
    return old.same_request(StageRecord(**{**vars(new), "epoch": old.epoch}))


def _epoch(publish_context) -> int | None:
    raw = publish_context.get(EPOCH_KEY)
    if raw is None or raw == "":
        return None
    try:
        epoch = int(raw)
    except ValueError:
        raise errors.invalid("publish_context", f"epoch {raw!r} is not an integer") from None
    if epoch < 0:
        raise errors.invalid("publish_context", f"epoch {raw!r} is negative")
    return epoch


def _condition_message(health: Health, path: str) -> str:
    if health is Health.DEAD:
        return (f"the chunkfs mount at {path} is dead (its process exited: "
                f"{os.strerror(errno.ENOTCONN)}); the plugin re-mounts it")
    if health is Health.HUNG:
        return f"the chunkfs mount at {path} does not respond"
    return f"{path} is not mounted"
