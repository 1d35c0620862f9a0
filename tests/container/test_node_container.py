"""The node side of the chart, run as containers: the node plugin and the mounter.

Both run from the chart's own DaemonSet specs (tests/container/chart.py translates them
to docker flags); the test plays kubelet over the plugin's socket (NodeStage,
NodePublish with the StorageClass's secrets) and the controller container plays the
attach step (ControllerPublish hands out the writer epoch). An "application" container
then writes, fsyncs and reads records on the published path (HostToContainer
propagation, as a pod should mount it) while we

* SIGKILL the node plugin container and start it again from a new image tag (a crash
  and a DaemonSet upgrade): the application must not see a single error, and must keep
  writing while no plugin runs at all;
* kill the mounter container (all of the node's mount processes die with it) and start
  a new one: the restarted stack re-mounts the volume, binds it over the dead mount in
  the pod's target, the application reopens its file and goes on.

In both, every record the application saw acknowledged (fsync returned) is read back
afterwards from a fresh mount on the host with an empty cache: nothing acknowledged is
lost. The figures (records, the longest gap between acknowledgements) are printed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from csi.mounts import FSTYPE, mount_table
from csi.v1 import csi_pb2
from tests.container.app_writer import RECORD, record
from tests.container.pods import NODE_NAME, ChartPods, Csi

Mode = csi_pb2.VolumeCapability.AccessMode
HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.timeout(900)  # the first run builds the base image and the image


def capability() -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(mount_flags=["nosuid", "nodev"]),
        access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))


class App:
    """The application container and its control directory on the host."""

    def __init__(self, pods: ChartPods, image: str, target: str) -> None:
        self.pods = pods
        self.ctl = Path(pods.host.root) / f"app-{uuid.uuid4().hex[:6]}"
        self.ctl.mkdir()
        self.ctl.chmod(0o777)
        shutil.copy(HERE / "app_writer.py", self.ctl / "app_writer.py")
        # a pod's volumeMount with mountPropagation: HostToContainer, as an unprivileged
        # user with nothing else (no capabilities, read-only root)
        self.cid = pods.docker.run([
            "--name", f"app-{self.ctl.name}", "--network", "host", "--user", "10001:10001",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--read-only",
            "--mount", f"type=bind,src={target},dst=/data,bind-propagation=rslave",
            "--mount", f"type=bind,src={self.ctl},dst=/ctl",
            "--entrypoint", "/usr/bin/python3", image, "/ctl/app_writer.py", "/data", "/ctl"])
        pods.started.append(self.cid)

    def acks(self) -> list[tuple[int, float]]:
        try:
            lines = (self.ctl / "acks").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [(int(a), float(b)) for a, b in (ln.split() for ln in lines if " " in ln)]

    def errors(self) -> list[str]:
        try:
            return (self.ctl / "errors").read_text().splitlines()
        except FileNotFoundError:
            return []

    def wait_acks(self, count: int, after: float = 0.0, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while sum(1 for _, t in self.acks() if t > after) < count:
            assert self.pods.docker.running(self.cid), self.pods.docker.logs(self.cid)
            assert time.monotonic() < deadline, (
                f"the application acknowledged {len(self.acks())} records, waiting for "
                f"{count} after {after}; errors: {self.errors()[-5:]}")
            time.sleep(0.1)

    def stop(self) -> dict:
        (self.ctl / "stop").touch()
        deadline = time.monotonic() + 60
        while self.pods.docker.running(self.cid):
            assert time.monotonic() < deadline, "the application does not stop"
            time.sleep(0.1)
        return json.loads((self.ctl / "summary.json").read_text())


def gaps(acks: list[tuple[int, float]], start: float = 0.0) -> list[float]:
    times = [t for _, t in acks if t >= start]
    return sorted(b - a for a, b in zip(times, times[1:], strict=False))


def longest_gap(acks: list[tuple[int, float]], start: float = 0.0) -> float:
    return max(gaps(acks, start), default=0.0)


def stage_and_publish(node: Csi, host, volume_id: str, epoch: str,
                      secret: dict[str, str]) -> tuple[str, str]:
    staging = host.staging(volume_id)
    target = host.target(volume_id, uuid.uuid4().hex)
    node.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=staging, volume_capability=capability(),
        publish_context={"epoch": epoch}, secrets=secret), timeout=150)
    node.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id, staging_target_path=staging, target_path=target,
        volume_capability=capability(), publish_context={"epoch": epoch},
        volume_context={"csi.storage.k8s.io/pod.name": "app"}), timeout=60)
    return staging, target


def teardown_volume(node: Csi, volume_id: str, staging: str, target: str) -> None:
    node.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=volume_id, target_path=target), timeout=60)
    node.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=volume_id, staging_target_path=staging), timeout=330)
    assert target not in mount_table() and staging not in mount_table()


def verify_durable(backend_env: dict[str, str], volume_id: str, acked: int, work: Path) -> None:
    """Mount the volume afresh on the host (empty cache, read-only): every acknowledged
    record is there, byte for byte."""
    mnt, cache = work / "verify-mnt", work / "verify-cache"
    mnt.mkdir()
    subprocess.run(["chunkfs", "mount", volume_id, str(mnt), "--cache-dir", str(cache),
                    "-o", "ro"], env=backend_env, check=True, capture_output=True, timeout=120)
    try:
        with open(mnt / "app.log", "rb") as f:
            for n in range(acked):
                assert f.read(RECORD) == record(n), f"acknowledged record {n} is not intact"
    finally:
        subprocess.run(["chunkfs", "umount", str(mnt)], env=backend_env, check=False,
                       capture_output=True, timeout=120)


def create_and_attach(controller: Csi, volume_id: str, secret: dict[str, str]) -> str:
    controller.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=256 << 20),
        volume_capabilities=[capability()], secrets=secret), timeout=60)
    published = controller.controller.ControllerPublishVolume(
        csi_pb2.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=NODE_NAME, volume_capability=capability(),
            secrets=secret), timeout=60)
    return published.publish_context["epoch"]


def test_application_io_survives_node_plugin_kill_and_upgrade(
        docker, image, node_host, backend_secret, backend_env, chart_pods):
    pods = chart_pods()
    _, controller = pods.start_controller()
    pods.start_mounter()
    node_cid, node = pods.start_node("node-v1")
    volume_id = f"pvc-{uuid.uuid4()}"
    epoch = create_and_attach(controller, volume_id, backend_secret)
    staging, target = stage_and_publish(node, node_host, volume_id, epoch, backend_secret)

    app = App(pods, image, target)
    app.wait_acks(20)
    killed = time.time()
    docker.docker("kill", node_cid)  # SIGKILL: the container and everything in it
    pods.wait_gone(node_cid)
    node.close()
    app.wait_acks(30, after=killed)  # no plugin at all, and the application goes on
    assert mount_table().get(staging) == FSTYPE

    # the upgrade: a new container of the DaemonSet, from a new image
    docker.docker("tag", image, image + "-next")
    upgraded = time.time()
    _, node = pods.start_node("node-v2", image=image + "-next")
    stats = node.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=volume_id, volume_path=target), timeout=30)
    assert not stats.volume_condition.abnormal, stats.volume_condition.message
    app.wait_acks(30, after=time.time())
    summary = app.stop()

    acks = app.acks()
    assert app.errors() == [], "the application saw I/O errors"
    assert summary["bad_reads"] == 0 and summary["reads"] > 0
    assert summary["acked"] == len(acks)
    print(f"\nnode plugin kill + upgrade: {summary['acked']} records of {RECORD} bytes "
          f"acknowledged, {summary['reads']} read back; "
          f"{sum(1 for _, t in acks if killed < t < upgraded)} acknowledged while no "
          f"plugin ran; gap between acknowledgements: median {gaps(acks)[len(acks) // 2]:.3f}s"
          f", longest {longest_gap(acks):.3f}s (after the kill {longest_gap(acks, killed):.3f}s)")

    teardown_volume(node, volume_id, staging, target)  # the new plugin manages old mounts
    verify_durable(backend_env, volume_id, summary["acked"], Path(node_host.root))


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_mounts_come_back_after_the_mounter_dies(docker, image, node_host, backend_secret,
                                                 backend_env, chart_pods, how):
    """kill: SIGKILL, every mount process dies at once. stop: SIGTERM (the pod deleted):
    the mounter flushes and unmounts what it started, then exits."""
    pods = chart_pods()
    _, controller = pods.start_controller()
    mounter_cid = pods.start_mounter("mounter-1")
    _, node = pods.start_node()
    volume_id = f"pvc-{uuid.uuid4()}"
    epoch = create_and_attach(controller, volume_id, backend_secret)
    staging, target = stage_and_publish(node, node_host, volume_id, epoch, backend_secret)

    app = App(pods, image, target)
    app.wait_acks(20)
    killed = time.time()
    if how == "kill":
        docker.docker("kill", mounter_cid)  # every mount process of the node dies
    else:
        docker.docker("stop", "--time", "60", mounter_cid, timeout=90)
        log = docker.logs(mounter_cid, tail=200)
        assert "unmounting 1 chunkfs mounts" in log and "mounter stopped" in log, log
        assert "at stop failed" not in log, log
    pods.wait_gone(mounter_cid)
    pods.start_mounter("mounter-2")
    # re-mounted, re-bound into the pod, reopened: count from the restart (a stopping
    # mounter serves writes for a while, so acks "after the kill" may all precede the gap)
    app.wait_acks(20, after=max(killed, time.time()))
    summary = app.stop()

    acks = app.acks()
    errors = app.errors()
    assert errors, "the mount processes died: the application must have seen it"
    assert summary["bad_reads"] == 0
    first_error = float(errors[0].split()[0])
    resumed = next(t for _, t in acks if t > first_error)
    print(f"\nmounter {how}: {summary['acked']} records acknowledged, {len(errors)} failed "
          f"attempts; I/O resumed {resumed - first_error:.2f}s after the first error")
    stats = node.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=volume_id, volume_path=target), timeout=30)
    assert not stats.volume_condition.abnormal, stats.volume_condition.message

    teardown_volume(node, volume_id, staging, target)  # both layers of the target go
    assert not os.path.exists(target)
    verify_durable(backend_env, volume_id, summary["acked"], Path(node_host.root))


def test_without_the_mounter_a_plugin_restart_breaks_io_until_it_re_mounts(
        docker, image, node_host, backend_secret, backend_env, chart_pods):
    """The fallback (mounter.enabled=false): the mount processes live in the plugin's
    container and die with it -- why the chart has a mounter. The restarted plugin
    re-mounts from its records and the application recovers by reopening."""
    pods = chart_pods(node_host.values(mounter={"enabled": False}))
    _, controller = pods.start_controller()
    node_cid, node = pods.start_node("node-1")
    volume_id = f"pvc-{uuid.uuid4()}"
    epoch = create_and_attach(controller, volume_id, backend_secret)
    staging, target = stage_and_publish(node, node_host, volume_id, epoch, backend_secret)

    app = App(pods, image, target)
    app.wait_acks(20)
    killed = time.time()
    docker.docker("kill", node_cid)
    pods.wait_gone(node_cid)
    node.close()
    _, node = pods.start_node("node-2")
    app.wait_acks(20, after=killed)
    summary = app.stop()
    errors = app.errors()
    assert errors, "the mounts died with the plugin container: the application saw it"
    assert summary["bad_reads"] == 0
    first_error = float(errors[0].split()[0])
    resumed = next(t for _, t in app.acks() if t > first_error)
    print(f"\nno mounter, plugin kill: {summary['acked']} records acknowledged, "
          f"{len(errors)} failed attempts; I/O resumed {resumed - first_error:.2f}s after "
          "the first error")
    teardown_volume(node, volume_id, staging, target)
    verify_durable(backend_env, volume_id, summary["acked"], Path(node_host.root))
