"""Whole-volume stories across plugins: a controller and two node plugins ("nodes" with
their own kubelet, cache and state dirs), driven the way Kubernetes drives them.

* reschedule: a pod moves from node A to node B, which has an empty cache;
* fencing: node A keeps writing after the volume's lease moved to node B;
* plugin restart: the node plugin dies (alone, or with its mounts, as when its
  container restarts) while a "pod" process writes through the publish target.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest

from csi.mounts import mount_pids
from csi.v1 import csi_pb2

from .conftest import Mode, backend_secrets, mount_cap

MiB = 1 << 20
CAP = mount_cap(Mode.SINGLE_NODE_WRITER)


class Pod:
    """A volume staged and published on one node plugin, as kubelet would do it."""

    def __init__(self, node, volume_id: str, ctx: dict[str, str]) -> None:
        self.node, self.volume_id, self.ctx = node, volume_id, ctx
        self.staging = node.kubelet.staging(volume_id)
        self.target = node.kubelet.target(volume_id)

    def start(self) -> Pod:
        self.node.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=self.volume_id, staging_target_path=self.staging,
            volume_capability=CAP, publish_context=self.ctx))
        self.node.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=self.volume_id, staging_target_path=self.staging,
            target_path=self.target, volume_capability=CAP, publish_context=self.ctx))
        return self

    def stop(self) -> None:
        self.node.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=self.volume_id, target_path=self.target))
        self.node.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=self.volume_id, staging_target_path=self.staging))

    def path(self, name: str) -> str:
        return os.path.join(self.target, name)

    def stats(self) -> csi_pb2.NodeGetVolumeStatsResponse:
        return self.node.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=self.volume_id, volume_path=self.target))


def create_volume(ctrl, name: str, capacity: int = 256 * MiB) -> None:
    ctrl.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=name, volume_capabilities=[CAP],
        capacity_range=csi_pb2.CapacityRange(required_bytes=capacity)))


def attach(ctrl, volume_id: str, node_id: str) -> dict[str, str]:
    return dict(ctrl.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
        volume_id=volume_id, node_id=node_id, volume_capability=CAP)).publish_context)


def detach(ctrl, volume_id: str, node_id: str) -> None:
    ctrl.controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=volume_id, node_id=node_id))


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def tree_digest(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.startswith(".chunkfs"):
                continue
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def nodes(cluster):
    ctrl = cluster.start("ctrl", "controller")
    return ctrl, cluster.start("node-a", "node"), cluster.start("node-b", "node")


def test_reschedule_to_a_node_with_an_empty_cache(nodes) -> None:
    ctrl, node_a, node_b = nodes
    create_volume(ctrl, "pvc-data")

    ctx_a = attach(ctrl, "pvc-data", "node-a")
    pod = Pod(node_a, "pvc-data", ctx_a).start()
    os.makedirs(pod.path("dir/sub"))
    write_file(pod.path("big.bin"), os.urandom(6 * MiB + 12345))  # spans several blocks
    for i in range(20):
        write_file(pod.path(f"dir/sub/small-{i}.txt"), f"file {i}\n".encode() * (i + 1))
    os.rename(pod.path("dir/sub/small-0.txt"), pod.path("dir/renamed.txt"))
    expected = tree_digest(pod.target)
    pod.stop()
    detach(ctrl, "pvc-data", "node-a")

    ctx_b = attach(ctrl, "pvc-data", "node-b")
    assert int(ctx_b["epoch"]) > int(ctx_a["epoch"])
    assert not list((node_b.cache_dir / "_shared").glob("blocks/*/*"))  # node B starts cold
    pod = Pod(node_b, "pvc-data", ctx_b).start()
    assert tree_digest(pod.target) == expected

    ctrl.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id="pvc-data", capacity_range=csi_pb2.CapacityRange(required_bytes=512 * MiB)))
    deadline = time.monotonic() + 10
    while True:
        total = {u.unit: u.total for u in pod.stats().usage}[csi_pb2.VolumeUsage.BYTES]
        if total == 512 * MiB:
            break
        assert time.monotonic() < deadline, f"node B still sees {total} bytes"
        time.sleep(0.2)
    write_file(pod.path("after-expand.txt"), b"more room")
    pod.stop()
    detach(ctrl, "pvc-data", "node-b")
    ctrl.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="pvc-data"))
    assert not ctrl.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries


def _try(fn) -> int:
    """0 if ``fn`` succeeded, else the errno it failed with."""
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return 0


def test_fenced_node_cannot_commit_after_the_lease_moved(nodes) -> None:
    ctrl, node_a, node_b = nodes
    create_volume(ctrl, "pvc-rwo")
    ctx_a = attach(ctrl, "pvc-rwo", "node-a")
    pod_a = Pod(node_a, "pvc-rwo", ctx_a).start()
    write_file(pod_a.path("shared.txt"), b"from A, before the move\n")
    late = os.open(pod_a.path("late.txt"), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(late, b"acknowledged by A\n")
    os.fsync(late)

    # Node A is cut off; Kubernetes force-detaches it and attaches node B.
    detach(ctrl, "pvc-rwo", "node-a")
    ctx_b = attach(ctrl, "pvc-rwo", "node-b")
    pod_b = Pod(node_b, "pvc-rwo", ctx_b).start()
    write_file(pod_b.path("shared.tmp"), b"from B\n")  # replace A's file atomically
    os.replace(pod_b.path("shared.tmp"), pod_b.path("shared.txt"))
    write_file(pod_b.path("b.txt"), b"written by B\n")

    # Node A still runs and keeps writing: none of its commits may land.
    # (a fenced mount may refuse the write itself, or at the latest the fsync)
    failed = _try(lambda: os.write(late, b"written by A after the move\n")) or _try(
        lambda: os.fsync(late))
    assert failed == errno.EIO
    _try(lambda: os.close(late))  # close flushes too: it may fail the same way
    assert _try(lambda: write_file(pod_a.path("shared.txt"), b"from A, fenced\n")) == errno.EIO
    assert _try(lambda: write_file(pod_a.path("a-new.txt"), b"new file from A\n")) == errno.EIO
    assert _try(lambda: os.mkdir(pod_a.path("a-dir"))) == errno.EIO

    # Node B's data is intact.
    assert open(pod_b.path("shared.txt"), "rb").read() == b"from B\n"
    assert open(pod_b.path("b.txt"), "rb").read() == b"written by B\n"
    assert open(pod_b.path("late.txt"), "rb").read() == b"acknowledged by A\n"
    assert not os.path.exists(pod_b.path("a-new.txt"))
    assert not os.path.exists(pod_b.path("a-dir"))

    # Node A reports its volume as abnormal.
    deadline = time.monotonic() + 10
    while not (cond := pod_a.stats().volume_condition).abnormal:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert "writer lease" in cond.message

    pod_a.stop()  # kubelet on A eventually cleans up: its unflushed writes are dropped
    pod_b.stop()
    detach(ctrl, "pvc-rwo", "node-b")


POD_WRITER = textwrap.dedent("""
    import os, sys, time
    target, acks_path, stop_path = sys.argv[1:4]
    path = os.path.join(target, "journal.txt")
    seq, fd, errors = 0, None, 0
    with open(acks_path, "a", buffering=1) as acks:
        while not os.path.exists(stop_path):
            seq += 1
            line = f"{seq:08d} {'x' * 200}\\n".encode()
            try:
                if fd is None:
                    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                os.write(fd, line)
                os.fsync(fd)
                acks.write(f"{seq}\\n")          # acknowledged: must never be lost
                with open(path, "rb") as f:     # and read back what we wrote
                    f.seek(-len(line), 2)
                    assert f.read() == line
            except OSError as exc:
                errors += 1
                acks.write(f"error errno={exc.errno}\\n")
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                    fd = None
                time.sleep(0.1)
            time.sleep(0.01)
    if fd is not None:
        os.close(fd)
""")


class PodWriter:
    def __init__(self, target: str, workdir: Path) -> None:
        self.acks = workdir / "acks.txt"
        self.stop_file = workdir / "stop"
        self.proc = subprocess.Popen([sys.executable, "-c", POD_WRITER, target, str(self.acks),
                                      str(self.stop_file)])

    def acked(self) -> list[int]:
        if not self.acks.exists():
            return []
        return [int(ln) for ln in self.acks.read_text().splitlines() if ln.isdigit()]

    def errors(self) -> int:
        return self.acks.read_text().count("error") if self.acks.exists() else 0

    def wait_for_progress(self, beyond: int, timeout: float) -> float:
        start = time.monotonic()
        while len(self.acked()) <= beyond:
            assert self.proc.poll() is None, "the pod process died"
            assert time.monotonic() - start < timeout, "the pod's I/O did not recover"
            time.sleep(0.05)
        return time.monotonic() - start

    def finish(self) -> None:
        self.stop_file.touch()
        assert self.proc.wait(30) == 0


def _neighbours(path: str, seq: int) -> list[int]:
    with open(path, "rb") as f:
        seqs = [int(line.split()[0]) for line in f.read().splitlines() if line]
    at = next((i for i, s in enumerate(seqs) if s > seq), len(seqs))
    return seqs[max(0, at - 5):at + 5]


def _around(words: list[str], word: str) -> list[str]:
    at = words.index(word) if word in words else 0
    return words[max(0, at - 6):at + 12]


def _journal_seqs(path: str) -> set[int]:
    with open(path, "rb") as f:
        return {int(line.split()[0]) for line in f.read().splitlines() if line}


@pytest.mark.parametrize("with_mounts", [False, True], ids=["plugin-only", "with-mounts"])
def test_node_plugin_restart_keeps_pod_io(cluster, csi_root, with_mounts) -> None:
    """Kill the node plugin while a pod writes. Plugin only: the mounts outlive it and
    I/O never stops. With its mounts (a container restart kills its children too): the
    restarted plugin re-mounts from its state dir and the pod's I/O recovers. Either
    way no acknowledged (fsync'ed) record is lost."""
    ctrl = cluster.start("ctrl", "controller")
    node = cluster.start("node-a", "node", extra=("--recover-interval", "0"))
    create_volume(ctrl, "pvc-journal")
    pod = Pod(node, "pvc-journal", attach(ctrl, "pvc-journal", "node-a")).start()
    writer = PodWriter(pod.target, csi_root)
    writer.wait_for_progress(20, timeout=60)

    node.kill()
    if with_mounts:
        for pid in mount_pids(pod.staging):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not writer.errors():
            assert time.monotonic() < deadline, "the pod never noticed the dead mount"
            time.sleep(0.05)
    else:
        writer.wait_for_progress(len(writer.acked()) + 20, timeout=30)  # plugin is down

    before = len(writer.acked())
    node.start()
    took = writer.wait_for_progress(before + 20, timeout=60)
    assert took < 30, f"I/O took {took:.1f}s to recover"
    assert (writer.errors() > 0) == with_mounts
    writer.finish()

    acked = writer.acked()
    present = _journal_seqs(pod.path("journal.txt"))
    lost = sorted(set(acked) - present)
    assert not lost, (f"{len(lost)} acknowledged records lost, e.g. {lost[:5]}; journal order "
                      f"near it: {_neighbours(pod.path('journal.txt'), lost[0])}; pod log: "
                      f"{_around(writer.acks.read_text().splitlines(), str(lost[0]))}")
    pod.stop()  # the restarted plugin knows the mounts it did not make itself
    # and a fresh mount (cold metadata) sees the same
    pod = Pod(node, "pvc-journal", pod.ctx).start()
    assert set(acked) <= _journal_seqs(pod.path("journal.txt"))
    pod.stop()
    detach(ctrl, "pvc-journal", "node-a")


def test_publish_after_restart_finds_recorded_state(cluster) -> None:
    """A restarted plugin answers repeats of NodeStage/NodePublish from its records."""
    ctrl = cluster.start("ctrl", "controller")
    node = cluster.start("node-a", "node")
    create_volume(ctrl, "pvc-1")
    pod = Pod(node, "pvc-1", attach(ctrl, "pvc-1", "node-a")).start()
    pids = mount_pids(pod.staging)
    node.restart()
    pod.start()  # idempotent repeats against the reloaded state
    assert mount_pids(pod.staging) == pids
    with pytest.raises(grpc.RpcError) as err:
        node.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id="pvc-1", staging_target_path=pod.staging))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # still published
    pod.stop()
    assert not mount_pids(pod.staging)


def test_walkthrough_runs(backend_env) -> None:
    """`python -m devstack.walkthrough`, the local demo of the whole flow, stays working."""
    root = Path(__file__).resolve().parents[2]  # devstack/ runs from the checkout only
    out = subprocess.run([sys.executable, "-m", "devstack.walkthrough"], env=backend_env,
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all steps passed" in out.stdout


def test_lease_back_on_a_node_that_never_unstaged(nodes) -> None:
    """A partitioned node is force-detached and later gets the volume back with a new
    epoch while its old (fenced) mount is still staged: NodeStageVolume replaces the old
    mount once no pod uses it, and the node writes again."""
    ctrl, node_a, _ = nodes
    create_volume(ctrl, "pvc-back")
    pod = Pod(node_a, "pvc-back", attach(ctrl, "pvc-back", "node-a")).start()
    write_file(pod.path("before.txt"), b"epoch 1\n")
    detach(ctrl, "pvc-back", "node-a")                   # force-detach: the lease is revoked
    ctx = attach(ctrl, "pvc-back", "node-a")             # ... and handed back, newer epoch
    assert int(ctx["epoch"]) > int(pod.ctx["epoch"])
    new = Pod(node_a, "pvc-back", ctx)
    with pytest.raises(grpc.RpcError) as err:            # a pod still uses the old mount
        new.start()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    node_a.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id="pvc-back", target_path=pod.target))
    new.start()
    argv = open(f"/proc/{mount_pids(new.staging)[0]}/cmdline", "rb").read()
    assert f"epoch={ctx['epoch']}".encode() in argv
    write_file(new.path("after.txt"), b"epoch 2\n")
    assert open(new.path("before.txt"), "rb").read() == b"epoch 1\n"
    new.stop()
    detach(ctrl, "pvc-back", "node-a")


def test_backend_from_secrets_end_to_end(cluster, local_services, s3_client) -> None:
    """A StorageClass whose Secret names another Redis database and S3 prefix: every RPC
    that carries the secret reaches that backend, the node's mount too (also when it is
    re-established after dying), and nothing lands in the plugin's default backend."""
    from devstack.localstack import BUCKET

    redis = local_services.redis
    default_db = int(cluster.env["CHUNKFS_META"].rsplit("/", 1)[1])
    other_db = default_db % 255 + 1  # the next test's database: it is flushed before use
    with redis.client(db=other_db) as client:
        client.flushdb()
    prefix = cluster.env["CHUNKFS_STORAGE"].removeprefix(f"s3://{BUCKET}/") + "-secret"
    secrets = backend_secrets(cluster.env, meta_url=redis.url_for_db(other_db),
                              storage=f"s3://{BUCKET}/{prefix}")
    ctrl = cluster.start("ctrl", "controller")
    node = cluster.start("node-a", "node")

    ctrl.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="pvc-s", volume_capabilities=[CAP], secrets=secrets,
        capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB)))
    assert not ctrl.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries  # default
    ctx = dict(ctrl.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
        volume_id="pvc-s", node_id="node-a", volume_capability=CAP,
        secrets=secrets)).publish_context)
    staging, target = node.kubelet.staging("pvc-s"), node.kubelet.target("pvc-s")
    node.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id="pvc-s", staging_target_path=staging, volume_capability=CAP,
        publish_context=ctx, secrets=secrets))
    node.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id="pvc-s", staging_target_path=staging, target_path=target,
        volume_capability=CAP, publish_context=ctx))
    data = os.urandom(5 * MiB)
    write_file(os.path.join(target, "blob"), data)
    listed = s3_client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")
    assert listed.get("KeyCount", 0) > 0

    for pid in mount_pids(staging):  # recovery re-mounts with the recorded secrets
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        try:
            with open(os.path.join(target, "blob"), "rb") as f:
                assert f.read() == data
            break
        except OSError:
            assert time.monotonic() < deadline, node.log_tail()
            time.sleep(0.2)

    node.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id="pvc-s", target_path=target))
    node.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id="pvc-s", staging_target_path=staging))
    ctrl.controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id="pvc-s", node_id="node-a", secrets=secrets))
    ctrl.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="pvc-s",
                                                             secrets=secrets))
    with redis.client(db=other_db) as client:
        client.flushdb()
