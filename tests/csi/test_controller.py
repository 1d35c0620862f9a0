"""Controller service conformance: every RPC, positive and negative cases of the spec.

All calls go through a real gRPC channel on a unix socket to a plugin process backed
by the real Redis and SeaweedFS of the test session.
"""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import pytest

from csi.v1 import csi_pb2
from csi.validate import MULTI_NODE_MULTI_WRITER_NOTE

from .conftest import Mode, backend_secrets, block_cap, mount_cap

GiB = 1 << 30
MiB = 1 << 20
RPC = csi_pb2.ControllerServiceCapability.RPC


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    return err.value.code()


def create(plugin, name: str, required: int = GiB, limit: int = 0, *, caps=None,
           source=None, parameters=None, secrets=None) -> csi_pb2.Volume:
    req = csi_pb2.CreateVolumeRequest(
        name=name, volume_capabilities=caps or [mount_cap()],
        capacity_range=csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit),
        parameters=parameters or {}, secrets=secrets or {})
    if source is not None:
        req.volume_content_source.CopyFrom(source)
    return plugin.controller.CreateVolume(req).volume


def snapshot_source(snapshot_id: str) -> csi_pb2.VolumeContentSource:
    return csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id))


def volume_source(volume_id: str) -> csi_pb2.VolumeContentSource:
    return csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=volume_id))


# --- ControllerGetCapabilities ------------------------------------------------------

def test_controller_capabilities(plugin) -> None:
    resp = plugin.controller.ControllerGetCapabilities(
        csi_pb2.ControllerGetCapabilitiesRequest())
    assert {c.rpc.type for c in resp.capabilities} == {
        RPC.CREATE_DELETE_VOLUME, RPC.PUBLISH_UNPUBLISH_VOLUME, RPC.LIST_VOLUMES,
        RPC.GET_CAPACITY, RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS, RPC.GET_SNAPSHOT,
        RPC.CLONE_VOLUME, RPC.PUBLISH_READONLY, RPC.EXPAND_VOLUME, RPC.GET_VOLUME,
        RPC.SINGLE_NODE_MULTI_WRITER}


# --- CreateVolume -------------------------------------------------------------------

def test_create_volume_returns_the_volume(plugin) -> None:
    vol = create(plugin, "pvc-1", 2 * GiB, parameters={"cache-size": "5GiB"})
    assert vol.volume_id == "pvc-1"
    assert vol.capacity_bytes == 2 * GiB
    assert vol.volume_context == {"cache-size": "5GiB"}
    assert not vol.HasField("content_source")


def test_create_volume_is_idempotent_by_name(plugin) -> None:
    first = create(plugin, "pvc-1", GiB)
    again = create(plugin, "pvc-1", GiB)
    assert again == first
    vols = plugin.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries
    assert [e.volume.volume_id for e in vols] == ["pvc-1"]


def test_create_volume_with_another_capacity_is_already_exists(plugin) -> None:
    create(plugin, "pvc-1", GiB)
    assert code_of(create, plugin, "pvc-1", 2 * GiB) == grpc.StatusCode.ALREADY_EXISTS
    # a range the existing volume satisfies is a repeat, not a conflict
    assert create(plugin, "pvc-1", GiB // 2, 2 * GiB).capacity_bytes == GiB


def test_create_volume_with_another_source_is_already_exists(plugin) -> None:
    create(plugin, "pvc-src", GiB)
    create(plugin, "pvc-1", GiB)
    code = code_of(create, plugin, "pvc-1", GiB, source=volume_source("pvc-src"))
    assert code == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize("field", ["name", "volume_capabilities"])
def test_create_volume_missing_field_is_invalid_argument(plugin, field) -> None:
    req = csi_pb2.CreateVolumeRequest(name="pvc-1", volume_capabilities=[mount_cap()])
    req.ClearField(field)
    assert code_of(plugin.controller.CreateVolume, req) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("cap, why", [
    (block_cap(), "block"),
    (mount_cap(fs_type="ext4"), "fs_type"),
    (mount_cap(Mode.MULTI_NODE_SINGLE_WRITER), "MULTI_NODE_SINGLE_WRITER"),
    (csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume()), "access_mode"),
    (mount_cap(flags=("epoch=7",)), "set by the driver"),
])
def test_create_volume_unsupported_capability_is_invalid_argument(plugin, cap, why) -> None:
    with pytest.raises(grpc.RpcError) as err:
        create(plugin, "pvc-1", caps=[cap])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert why in err.value.details()
    assert not plugin.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries


@pytest.mark.parametrize("mode", [Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_SINGLE_WRITER,
                                  Mode.SINGLE_NODE_MULTI_WRITER, Mode.SINGLE_NODE_READER_ONLY,
                                  Mode.MULTI_NODE_READER_ONLY, Mode.MULTI_NODE_MULTI_WRITER])
def test_create_volume_supported_access_modes(plugin, mode) -> None:
    assert create(plugin, "pvc-1", caps=[mount_cap(mode)]).volume_id == "pvc-1"


@pytest.mark.parametrize("params, why", [
    ({"meta-url": "redis://h:1/0"}, "secrets"),
    ({"secret-access-key": "x"}, "secrets"),
    ({"color": "blue"}, "unknown parameter"),
    ({"cache-size": "lots"}, "cache-size"),
])
def test_create_volume_bad_parameters_are_invalid_argument(plugin, params, why) -> None:
    with pytest.raises(grpc.RpcError) as err:
        create(plugin, "pvc-1", parameters=params)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert why in err.value.details()


def test_create_volume_ignores_provisioner_metadata_parameters(plugin) -> None:
    vol = create(plugin, "pvc-1", parameters={"csi.storage.k8s.io/pvc/name": "data"})
    assert vol.volume_context == {}


def test_create_volume_bad_name_is_invalid_argument(plugin) -> None:
    assert code_of(create, plugin, "../etc") == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(create, plugin, "x" * 200) == grpc.StatusCode.INVALID_ARGUMENT


def test_create_volume_capacity_defaults_and_limits(plugin) -> None:
    assert create(plugin, "pvc-default", 0).capacity_bytes == GiB
    assert create(plugin, "pvc-limit", 0, 100 * MiB).capacity_bytes == 100 * MiB
    assert create(plugin, "pvc-tiny", 1).capacity_bytes == MiB  # rounded up to the minimum


@pytest.mark.parametrize("required, limit", [
    (2 * GiB, GiB),           # required above the limit
    (0, 1000),                # limit below the minimum volume size
    (1 << 62, 0),             # above the maximum volume size
])
def test_create_volume_unsatisfiable_capacity_is_out_of_range(plugin, required, limit) -> None:
    assert code_of(create, plugin, "pvc-1", required, limit) == grpc.StatusCode.OUT_OF_RANGE
    assert not plugin.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries


def test_create_volume_negative_capacity_is_invalid_argument(plugin) -> None:
    assert code_of(create, plugin, "pvc-1", -1) == grpc.StatusCode.INVALID_ARGUMENT


def test_create_volume_from_snapshot_and_clone(plugin) -> None:
    create(plugin, "pvc-src", GiB)
    snap = plugin.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(source_volume_id="pvc-src", name="snap-1")).snapshot
    restored = create(plugin, "pvc-restored", GiB, source=snapshot_source(snap.snapshot_id))
    assert restored.content_source.snapshot.snapshot_id == "snap-1"
    clone = create(plugin, "pvc-clone", 2 * GiB, source=volume_source("pvc-src"))
    assert clone.content_source.volume.volume_id == "pvc-src"
    assert clone.capacity_bytes == 2 * GiB
    # repeats are idempotent
    assert create(plugin, "pvc-clone", 2 * GiB, source=volume_source("pvc-src")) == clone


def test_create_volume_from_missing_source_is_not_found(plugin) -> None:
    assert code_of(create, plugin, "pvc-1", source=snapshot_source("snap-nope")) \
        == grpc.StatusCode.NOT_FOUND
    assert code_of(create, plugin, "pvc-1", source=volume_source("pvc-nope")) \
        == grpc.StatusCode.NOT_FOUND


def test_clone_smaller_than_its_source_is_out_of_range(plugin) -> None:
    create(plugin, "pvc-src", 2 * GiB)
    code = code_of(create, plugin, "pvc-1", GiB, GiB, source=volume_source("pvc-src"))
    assert code == grpc.StatusCode.OUT_OF_RANGE


def test_create_volume_with_backend_from_secrets(plugin, cluster) -> None:
    """Secrets override the plugin's environment per request (here: another S3 prefix)."""
    secrets = backend_secrets(cluster.env, storage=cluster.env["CHUNKFS_STORAGE"] + "-other")
    assert create(plugin, "pvc-1", secrets=secrets).volume_id == "pvc-1"


def test_a_partial_secret_is_refused_and_changes_nothing(plugin, cluster, local_services) -> None:
    """A Secret naming only a Redis must not get the plugin's default bucket and keys."""
    db = int(cluster.env["CHUNKFS_META"].rsplit("/", 1)[1]) % 255 + 1
    with local_services.redis.client(db=db) as client:
        client.flushdb()
    for secrets in ({"meta-url": local_services.redis.url_for_db(db)},
                    {"endpoint": "http://127.0.0.1:1/"},
                    {k: v for k, v in backend_secrets(cluster.env).items() if k != "endpoint"}):
        with pytest.raises(grpc.RpcError) as err:
            create(plugin, "pvc-1", secrets=secrets)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "must name all of it: missing" in err.value.details()
    with local_services.redis.client(db=db) as client:
        assert client.dbsize() == 0
    assert not plugin.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries


@pytest.mark.parametrize("key, value", [
    ("meta-url", "unix:///var/run/redis/redis-server.sock"),
    ("meta-url", "rediss://127.0.0.1:6380/0?ssl_certfile=/var/lib/kubelet/pki/kubelet.pem"),
    ("endpoint", "http://169.254.169.254/"),
    ("endpoint", "unix:///run/containerd/containerd.sock"),
])
def test_secrets_naming_node_sockets_or_metadata_addresses_are_refused(plugin, cluster, key,
                                                                      value) -> None:
    secrets = backend_secrets(cluster.env, **{key.replace("-", "_"): value})
    with pytest.raises(grpc.RpcError) as err:
        create(plugin, "pvc-1", secrets=secrets)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert key in err.value.details()
    assert cluster.env["AWS_SECRET_ACCESS_KEY"] not in err.value.details()


def test_create_volume_bad_secret_url_is_invalid_argument_and_not_logged(plugin) -> None:
    secrets = {"meta-url": "redis://:hunter2-secret@", "secret-access-key": "s3cr3t-value"}
    with pytest.raises(grpc.RpcError) as err:
        create(plugin, "pvc-1", secrets=secrets)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hunter2" not in err.value.details()
    log = plugin.wait_for_log('"method": "CreateVolume"')
    assert "hunter2" not in log and "s3cr3t-value" not in log
    assert '"secrets": ["meta-url", "secret-access-key"]' in log  # the key names only


# --- DeleteVolume -------------------------------------------------------------------

def test_delete_volume_is_idempotent(plugin) -> None:
    create(plugin, "pvc-1")
    for _ in range(2):
        plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="pvc-1"))
    assert not plugin.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="never-existed"))


def test_delete_volume_missing_id_is_invalid_argument(plugin) -> None:
    assert code_of(plugin.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest()) \
        == grpc.StatusCode.INVALID_ARGUMENT


def test_delete_volume_published_for_writing_is_failed_precondition(plugin) -> None:
    create(plugin, "pvc-1")
    publish(plugin, "pvc-1", "node-a")
    assert code_of(plugin.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(
        volume_id="pvc-1")) == grpc.StatusCode.FAILED_PRECONDITION
    plugin.controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id="pvc-1", node_id="node-a"))
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="pvc-1"))


# --- ControllerPublishVolume / ControllerUnpublishVolume: the fencing point ----------

def publish(plugin, volume_id: str, node_id: str, mode: int = Mode.SINGLE_NODE_WRITER,
            readonly: bool = False) -> dict[str, str]:
    resp = plugin.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
        volume_id=volume_id, node_id=node_id, volume_capability=mount_cap(mode),
        readonly=readonly))
    return dict(resp.publish_context)


def unpublish(plugin, volume_id: str, node_id: str = "") -> None:
    plugin.controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=volume_id, node_id=node_id))


@pytest.mark.parametrize("mode", [Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_SINGLE_WRITER,
                                  Mode.SINGLE_NODE_MULTI_WRITER])
def test_publish_single_writer_hands_out_a_new_epoch(plugin, node_b, mode) -> None:
    create(plugin, "pvc-1")
    first = publish(plugin, "pvc-1", "node-a", mode)
    assert int(first["epoch"]) > 0
    assert publish(plugin, "pvc-1", "node-a", mode) == first  # idempotent: same epoch
    with pytest.raises(grpc.RpcError) as err:
        publish(plugin, "pvc-1", "node-b", mode)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "node-a" in err.value.details()
    unpublish(plugin, "pvc-1", "node-a")
    unpublish(plugin, "pvc-1", "node-a")  # idempotent
    second = publish(plugin, "pvc-1", "node-b", mode)
    assert int(second["epoch"]) > int(first["epoch"])  # node-a is fenced


def test_publish_is_visible_in_controller_get_volume(plugin) -> None:
    create(plugin, "pvc-1")
    publish(plugin, "pvc-1", "node-a")
    resp = plugin.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id="pvc-1"))
    assert list(resp.status.published_node_ids) == ["node-a"]
    unpublish(plugin, "pvc-1")  # no node_id: from every node
    resp = plugin.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id="pvc-1"))
    assert not resp.status.published_node_ids


@pytest.mark.parametrize("mode", [Mode.MULTI_NODE_MULTI_WRITER, Mode.MULTI_NODE_READER_ONLY])
def test_multi_node_publish_takes_no_lease_and_records_every_node(plugin, node_b, mode) -> None:
    create(plugin, "pvc-1", caps=[mount_cap(mode)])
    assert publish(plugin, "pvc-1", "node-a", mode) == {}
    assert publish(plugin, "pvc-1", "node-b", mode) == {}
    assert published_nodes(plugin, "pvc-1") == ["node-a", "node-b"]
    assert code_of(plugin.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(
        volume_id="pvc-1")) == grpc.StatusCode.FAILED_PRECONDITION
    unpublish(plugin, "pvc-1", "node-a")
    assert published_nodes(plugin, "pvc-1") == ["node-b"]
    unpublish(plugin, "pvc-1")  # no node_id: from every node
    assert published_nodes(plugin, "pvc-1") == []
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="pvc-1"))


@pytest.mark.parametrize("mode, readonly", [(Mode.SINGLE_NODE_WRITER, True),
                                            (Mode.SINGLE_NODE_READER_ONLY, False)])
def test_single_node_read_only_publish_to_a_second_node_is_failed_precondition(
        plugin, node_b, mode, readonly) -> None:
    """No writer lease is taken, but a single-node mode is still one node at a time."""
    create(plugin, "pvc-1", caps=[mount_cap(mode)])
    assert publish(plugin, "pvc-1", "node-a", mode, readonly) == {}
    with pytest.raises(grpc.RpcError) as err:
        publish(plugin, "pvc-1", "node-b", mode, readonly)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "node-a" in err.value.details()
    unpublish(plugin, "pvc-1", "node-a")
    assert publish(plugin, "pvc-1", "node-b", mode, readonly) == {}


def published_nodes(plugin, volume_id: str) -> list[str]:
    return list(plugin.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(
        volume_id=volume_id)).status.published_node_ids)


@pytest.mark.parametrize("mode, readonly, why", [
    (Mode.SINGLE_NODE_WRITER, True, "readonly"),                # csi-sanity's case
    (Mode.SINGLE_NODE_MULTI_WRITER, False, "SINGLE_NODE_MULTI_WRITER"),
    (Mode.SINGLE_NODE_READER_ONLY, False, "SINGLE_NODE_READER_ONLY"),
])
def test_publish_again_with_another_capability_is_already_exists(plugin, mode, readonly,
                                                                 why) -> None:
    create(plugin, "pvc-1")
    first = publish(plugin, "pvc-1", "node-a")
    with pytest.raises(grpc.RpcError) as err:
        publish(plugin, "pvc-1", "node-a", mode, readonly)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "node-a" in err.value.details() and why in err.value.details()
    assert publish(plugin, "pvc-1", "node-a") == first  # the compatible repeat still works
    unpublish(plugin, "pvc-1", "node-a")
    assert publish(plugin, "pvc-1", "node-a", mode, readonly) is not None  # now it may


def test_publications_are_durable_across_a_controller_restart(cluster, plugin) -> None:
    """The records live in Redis, not in the controller: a restarted (or another)
    controller answers repeats the same way."""
    ctrl = cluster.start("ctrl", "controller")
    create(ctrl, "pvc-1")
    first = publish(ctrl, "pvc-1", "node-a")
    ctrl.restart()
    assert publish(ctrl, "pvc-1", "node-a") == first
    assert code_of(publish, ctrl, "pvc-1", "node-a", readonly=True) \
        == grpc.StatusCode.ALREADY_EXISTS
    assert published_nodes(ctrl, "pvc-1") == ["node-a"]


def test_delete_volume_removes_its_publication_records(plugin, default_redis) -> None:
    create(plugin, "pvc-1", caps=[mount_cap(Mode.MULTI_NODE_READER_ONLY)])
    publish(plugin, "pvc-1", "node-a", Mode.MULTI_NODE_READER_ONLY)
    ns = default_redis.hget("cfs:volumes", "pvc-1").decode()
    assert default_redis.hkeys(f"cfs{{{ns}}}:pub") == [b"node-a"]
    unpublish(plugin, "pvc-1", "node-a")
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="pvc-1"))
    assert not default_redis.exists(f"cfs{{{ns}}}:pub")
    create(plugin, "pvc-1")  # the same name again starts with no publications
    assert published_nodes(plugin, "pvc-1") == []


# --- the node registry: which nodes exist --------------------------------------------

def test_publish_to_a_node_that_does_not_exist_is_not_found(plugin) -> None:
    create(plugin, "pvc-1")
    with pytest.raises(grpc.RpcError) as err:
        publish(plugin, "pvc-1", "fake-node-id-1")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "fake-node-id-1" in err.value.details()
    assert published_nodes(plugin, "pvc-1") == []  # no lease, no record
    assert code_of(publish, plugin, "pvc-nope", "fake-node-id-1") == grpc.StatusCode.NOT_FOUND
    assert code_of(publish, plugin, "pvc-1", "bad node\n") == grpc.StatusCode.INVALID_ARGUMENT


def test_node_plugins_register_and_renew_their_record(cluster, default_redis) -> None:
    cluster.start("node-b", "node", extra=("--heartbeat-interval", "0.3"))
    record = default_redis.hgetall("cfs:node:node-b")
    assert record[b"version"] and int(record[b"max_volumes"]) == 64
    assert float(record[b"started"]) <= float(record[b"heartbeat"])
    assert 0 < default_redis.pttl("cfs:node:node-b") <= 3000  # ten intervals
    beat = float(record[b"heartbeat"])
    deadline = time.monotonic() + 10
    while float(default_redis.hget("cfs:node:node-b", "heartbeat")) == beat:
        assert time.monotonic() < deadline, "the heartbeat was not renewed"
        time.sleep(0.05)


def test_a_restarting_node_stays_known_and_a_dead_one_is_forgotten(cluster,
                                                                   default_redis) -> None:
    ctrl = cluster.start("ctrl", "controller")
    node = cluster.start("node-b", "node", extra=("--heartbeat-interval", "0.3"))
    for name in ("pvc-1", "pvc-2", "pvc-3"):
        create(ctrl, name)
    publish(ctrl, "pvc-1", "node-b")
    node.kill()  # dead or restarting: its record outlives a few missed heartbeats
    publish(ctrl, "pvc-2", "node-b")
    deadline = time.monotonic() + 15
    while default_redis.exists("cfs:node:node-b"):
        assert time.monotonic() < deadline, "the dead node's record never expired"
        time.sleep(0.1)
    assert code_of(publish, ctrl, "pvc-3", "node-b") == grpc.StatusCode.NOT_FOUND
    unpublish(ctrl, "pvc-1", "node-b")  # unpublishing from a forgotten node is fine
    node.start()
    publish(ctrl, "pvc-3", "node-b")


def test_secrets_naming_another_backend_check_nodes_in_the_default_one(plugin,
                                                                        cluster) -> None:
    secrets = backend_secrets(cluster.env, storage=cluster.env["CHUNKFS_STORAGE"] + "-other")
    create(plugin, "pvc-1", secrets=secrets)

    def publish_with_secrets(node_id: str) -> None:
        plugin.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id="pvc-1", node_id=node_id, volume_capability=mount_cap(),
            secrets=secrets))

    assert code_of(publish_with_secrets, "fake-node-id-2") == grpc.StatusCode.NOT_FOUND
    publish_with_secrets("node-a")


def test_without_a_default_backend_node_ids_are_not_checked(cluster) -> None:
    """Documented: a controller whose backends all come from secrets has no registry to
    ask, so it lets the publish proceed (the writer lease still fences)."""
    env = {k: v for k, v in cluster.env.items() if k not in ("CHUNKFS_META", "CHUNKFS_STORAGE")}
    ctrl = cluster.start("ctrl", "controller", env=env)
    secrets = backend_secrets(cluster.env)
    create(ctrl, "pvc-1", secrets=secrets)
    resp = ctrl.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
        volume_id="pvc-1", node_id="fake-node-id-3", volume_capability=mount_cap(),
        secrets=secrets))
    assert resp.publish_context["epoch"]


@pytest.mark.parametrize("field", ["volume_id", "node_id", "volume_capability"])
def test_publish_missing_field_is_invalid_argument(plugin, field) -> None:
    req = csi_pb2.ControllerPublishVolumeRequest(
        volume_id="pvc-1", node_id="node-a", volume_capability=mount_cap())
    req.ClearField(field)
    assert code_of(plugin.controller.ControllerPublishVolume, req) \
        == grpc.StatusCode.INVALID_ARGUMENT


def test_publish_unknown_volume_is_not_found(plugin) -> None:
    assert code_of(publish, plugin, "pvc-nope", "node-a") == grpc.StatusCode.NOT_FOUND


def test_unpublish_unknown_volume_is_ok(plugin) -> None:
    unpublish(plugin, "pvc-nope", "node-a")


def test_unpublish_missing_volume_id_is_invalid_argument(plugin) -> None:
    assert code_of(plugin.controller.ControllerUnpublishVolume,
                   csi_pb2.ControllerUnpublishVolumeRequest(node_id="node-a")) \
        == grpc.StatusCode.INVALID_ARGUMENT


# --- ValidateVolumeCapabilities -----------------------------------------------------

def test_validate_volume_capabilities(plugin) -> None:
    create(plugin, "pvc-1")
    ok = plugin.controller.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id="pvc-1", volume_capabilities=[mount_cap(), mount_cap(
                Mode.MULTI_NODE_MULTI_WRITER)]))
    assert len(ok.confirmed.volume_capabilities) == 2
    # confirmed, with what several writers may expect (docs/dev/csi.md, "Access modes")
    assert ok.message == MULTI_NODE_MULTI_WRITER_NOTE
    assert "keep each other's bytes" in ok.message and "close-to-open" in ok.message
    single = plugin.controller.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id="pvc-1",
                                                  volume_capabilities=[mount_cap()]))
    assert single.HasField("confirmed") and not single.message
    bad = plugin.controller.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id="pvc-1", volume_capabilities=[mount_cap(), block_cap()]))
    assert not bad.HasField("confirmed")
    assert "block" in bad.message


def test_validate_volume_capabilities_errors(plugin) -> None:
    validate = plugin.controller.ValidateVolumeCapabilities
    assert code_of(validate, csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id="pvc-nope", volume_capabilities=[mount_cap()])) == grpc.StatusCode.NOT_FOUND
    assert code_of(validate, csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_capabilities=[mount_cap()])) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(validate, csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id="pvc-1")) == grpc.StatusCode.INVALID_ARGUMENT


# --- ListVolumes --------------------------------------------------------------------

def test_list_volumes_pages(plugin) -> None:
    names = [f"pvc-{i}" for i in range(5)]
    for name in names:
        create(plugin, name, 10 * MiB)
    seen, token, pages = [], "", 0
    while True:
        resp = plugin.controller.ListVolumes(
            csi_pb2.ListVolumesRequest(max_entries=2, starting_token=token))
        assert len(resp.entries) <= 2
        seen += [e.volume.volume_id for e in resp.entries]
        pages += 1
        token = resp.next_token
        if not token:
            break
    assert seen == names and pages == 3


def test_list_volumes_token_survives_deletion_of_the_last_entry(plugin) -> None:
    for name in ("pvc-a", "pvc-b", "pvc-c"):
        create(plugin, name, 10 * MiB)
    first = plugin.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=2))
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="pvc-b"))
    rest = plugin.controller.ListVolumes(
        csi_pb2.ListVolumesRequest(starting_token=first.next_token))
    assert [e.volume.volume_id for e in rest.entries] == ["pvc-c"]


def test_list_volumes_bad_token_is_aborted(plugin) -> None:
    assert code_of(plugin.controller.ListVolumes, csi_pb2.ListVolumesRequest(
        starting_token="garbage")) == grpc.StatusCode.ABORTED


def test_list_volumes_negative_max_entries_is_invalid_argument(plugin) -> None:
    assert code_of(plugin.controller.ListVolumes, csi_pb2.ListVolumesRequest(
        max_entries=-1)) == grpc.StatusCode.INVALID_ARGUMENT


# --- GetCapacity --------------------------------------------------------------------

def test_get_capacity(plugin) -> None:
    resp = plugin.controller.GetCapacity(csi_pb2.GetCapacityRequest(
        volume_capabilities=[mount_cap()]))
    assert resp.available_capacity > 0
    assert resp.minimum_volume_size.value == MiB
    assert resp.maximum_volume_size.value == resp.available_capacity
    none = plugin.controller.GetCapacity(csi_pb2.GetCapacityRequest(
        volume_capabilities=[block_cap()]))
    assert none.available_capacity == 0


# --- ControllerExpandVolume ---------------------------------------------------------

def expand(plugin, volume_id: str, required: int, limit: int = 0):
    return plugin.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume_id,
        capacity_range=csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit)))


def test_expand_volume(plugin) -> None:
    create(plugin, "pvc-1", GiB)
    resp = expand(plugin, "pvc-1", 3 * GiB)
    assert resp.capacity_bytes == 3 * GiB
    assert resp.node_expansion_required is False
    assert expand(plugin, "pvc-1", 3 * GiB).capacity_bytes == 3 * GiB  # idempotent
    assert expand(plugin, "pvc-1", 2 * GiB).capacity_bytes == 3 * GiB  # never shrinks
    got = plugin.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id="pvc-1")).volume
    assert got.capacity_bytes == 3 * GiB


def test_expand_volume_errors(plugin) -> None:
    create(plugin, "pvc-1", 2 * GiB)
    assert code_of(expand, plugin, "pvc-nope", GiB) == grpc.StatusCode.NOT_FOUND
    assert code_of(expand, plugin, "pvc-1", GiB, GiB) == grpc.StatusCode.OUT_OF_RANGE
    assert code_of(expand, plugin, "pvc-1", 1 << 62) == grpc.StatusCode.OUT_OF_RANGE
    assert code_of(plugin.controller.ControllerExpandVolume,
                   csi_pb2.ControllerExpandVolumeRequest(volume_id="pvc-1")) \
        == grpc.StatusCode.INVALID_ARGUMENT


# --- ControllerGetVolume ------------------------------------------------------------

def test_controller_get_volume(plugin) -> None:
    create(plugin, "pvc-1", GiB)
    resp = plugin.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id="pvc-1"))
    assert resp.volume.volume_id == "pvc-1" and resp.volume.capacity_bytes == GiB
    assert code_of(plugin.controller.ControllerGetVolume, csi_pb2.ControllerGetVolumeRequest(
        volume_id="pvc-nope")) == grpc.StatusCode.NOT_FOUND


# --- snapshots ----------------------------------------------------------------------

def snap(plugin, volume_id: str, name: str) -> csi_pb2.Snapshot:
    return plugin.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(source_volume_id=volume_id, name=name)).snapshot


def test_create_snapshot_is_idempotent(plugin) -> None:
    create(plugin, "pvc-1")
    first = snap(plugin, "pvc-1", "snap-1")
    assert first.snapshot_id == "snap-1" and first.source_volume_id == "pvc-1"
    assert first.ready_to_use and first.creation_time.seconds > 0
    assert snap(plugin, "pvc-1", "snap-1") == first


def test_create_snapshot_errors(plugin) -> None:
    create(plugin, "pvc-1")
    create(plugin, "pvc-2")
    snap(plugin, "pvc-1", "snap-1")
    assert code_of(snap, plugin, "pvc-2", "snap-1") == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(snap, plugin, "pvc-nope", "snap-2") == grpc.StatusCode.NOT_FOUND
    assert code_of(snap, plugin, "", "snap-3") == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(snap, plugin, "pvc-1", "") == grpc.StatusCode.INVALID_ARGUMENT


def test_delete_snapshot_is_idempotent(plugin) -> None:
    create(plugin, "pvc-1")
    snap(plugin, "pvc-1", "snap-1")
    for _ in range(2):
        plugin.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id="snap-1"))
    assert code_of(plugin.controller.DeleteSnapshot, csi_pb2.DeleteSnapshotRequest()) \
        == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(plugin.controller.GetSnapshot, csi_pb2.GetSnapshotRequest(
        snapshot_id="snap-1")) == grpc.StatusCode.NOT_FOUND


def test_list_snapshots_filters_and_pages(plugin) -> None:
    create(plugin, "pvc-1")
    create(plugin, "pvc-2")
    for name in ("snap-a", "snap-b", "snap-c"):
        snap(plugin, "pvc-1", name)
    snap(plugin, "pvc-2", "snap-d")

    def ids(**kw) -> list[str]:
        resp = plugin.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(**kw))
        return [e.snapshot.snapshot_id for e in resp.entries]

    assert ids() == ["snap-a", "snap-b", "snap-c", "snap-d"]
    assert ids(source_volume_id="pvc-2") == ["snap-d"]
    assert ids(snapshot_id="snap-b") == ["snap-b"]
    assert ids(snapshot_id="snap-nope") == []
    assert ids(source_volume_id="pvc-nope") == []
    page = plugin.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(max_entries=3))
    assert len(page.entries) == 3 and page.next_token
    assert ids(starting_token=page.next_token) == ["snap-d"]
    assert code_of(plugin.controller.ListSnapshots, csi_pb2.ListSnapshotsRequest(
        starting_token="bogus")) == grpc.StatusCode.ABORTED


def test_get_snapshot(plugin) -> None:
    create(plugin, "pvc-1")
    made = snap(plugin, "pvc-1", "snap-1")
    got = plugin.controller.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id="snap-1"))
    assert got.snapshot == made


# --- concurrency: a second call on the same volume is ABORTED -----------------------

def test_concurrent_calls_on_one_volume_are_aborted(plugin, local_services) -> None:
    """While a CreateVolume holds the volume (Redis is paused under it), a second call on
    the same name gets ABORTED at once; a call on another volume is not refused."""
    local_services.redis.pause()
    pool = concurrent.futures.ThreadPoolExecutor(2)
    try:
        first = pool.submit(create, plugin, "pvc-1")
        deadline = time.monotonic() + 10
        while plugin.metric("chunkfs_csi_rpc_inflight", method="CreateVolume") < 1:
            assert time.monotonic() < deadline, "the first CreateVolume never arrived"
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as err:
            create(plugin, "pvc-1")
        assert err.value.code() == grpc.StatusCode.ABORTED
        other = pool.submit(create, plugin, "pvc-2")
        time.sleep(0.3)
        assert not other.done()  # waits for Redis like the first one, is not ABORTED
    finally:
        local_services.redis.resume()
    assert first.result(timeout=60).volume_id == "pvc-1"
    assert other.result(timeout=60).volume_id == "pvc-2"
    pool.shutdown()
    assert plugin.metric("chunkfs_csi_rpc_total", method="CreateVolume", code="ABORTED") == 1
