"""The controller plugin as a container, from the chart's own Deployment spec.

Its default backend comes from the backend Secret through secretKeyRef env, exactly as
the chart wires it; the calls carry the same Secret as the StorageClass and the
VolumeSnapshotClass name it (the provisioner and snapshotter pass it as CSI secrets).
It runs as the unprivileged uid of the pod's securityContext, with a read-only root,
no capabilities, and a 0600 socket in the pod's emptyDir.
"""

from __future__ import annotations

import os
import stat
import uuid

import grpc
import pytest

from csi.v1 import csi_pb2
from tests.container import chart

Mode = csi_pb2.VolumeCapability.AccessMode
pytestmark = pytest.mark.timeout(900)  # the first run builds the base image and the image


def cap() -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(),
                                    access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))


def sc_parameters(objects: list[dict]) -> dict[str, str]:
    """What the external-provisioner passes on: StorageClass parameters minus its own."""
    params = chart.find(objects, "StorageClass")["parameters"]
    return {k: v for k, v in params.items() if not k.startswith("csi.storage.k8s.io/")}


def test_controller_container_serves_volumes_and_snapshots(docker, image, node_host,
                                                           backend_secret, chart_pods):
    pods = chart_pods(node_host.values(storageClass={"cacheSize": "64MiB"}))
    cid, csi = pods.start_controller()

    socket = pods.emptydir("controller", "socket-dir") / "csi.sock"
    st = os.stat(socket)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 10001
    top = docker.docker("top", cid, "-o", "pid,uid,args").stdout
    assert "10001" in top and "--role=controller" in top
    caps = docker.inspect(cid)["HostConfig"]
    assert caps["ReadonlyRootfs"] and caps["CapDrop"] == ["ALL"]

    csi.identity.Probe(csi_pb2.ProbeRequest(), timeout=30)  # the default backend answers
    name = f"pvc-{uuid.uuid4()}"
    vol = csi.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=64 << 20),
        volume_capabilities=[cap()], parameters=sc_parameters(pods.objects),
        secrets=backend_secret), timeout=60).volume
    assert vol.volume_id == name and vol.capacity_bytes == 64 << 20
    assert vol.volume_context["cache-size"] == "64MiB"

    snap = csi.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        source_volume_id=name, name=f"snapshot-{uuid.uuid4()}", secrets=backend_secret),
        timeout=60).snapshot
    assert snap.ready_to_use and snap.source_volume_id == name
    listed = csi.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(
        snapshot_id=snap.snapshot_id, secrets=backend_secret), timeout=30)
    assert [e.snapshot.snapshot_id for e in listed.entries] == [snap.snapshot_id]

    restored = csi.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=f"pvc-{uuid.uuid4()}", capacity_range=csi_pb2.CapacityRange(
            required_bytes=64 << 20), volume_capabilities=[cap()], secrets=backend_secret,
        volume_content_source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(
                snapshot_id=snap.snapshot_id))), timeout=60).volume
    assert restored.content_source.snapshot.snapshot_id == snap.snapshot_id

    # bad input still gets the spec's codes through the container
    with pytest.raises(grpc.RpcError) as err:
        csi.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=f"pvc-{uuid.uuid4()}", volume_capabilities=[cap()],
            parameters={"access-key-id": "x"}, secrets=backend_secret), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    csi.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(
        snapshot_id=snap.snapshot_id, secrets=backend_secret), timeout=60)
    for volume_id in (restored.volume_id, name):
        csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(
            volume_id=volume_id, secrets=backend_secret), timeout=60)
    logs = docker.logs(cid, tail=500)
    assert backend_secret["secret-access-key"] not in logs
    assert backend_secret["access-key-id"] not in logs
