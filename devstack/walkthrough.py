"""A volume's life through the CSI plugins, driven the way Kubernetes drives them.

    python -m devstack.walkthrough [--dir DIR] [--keep]

Needs the backend in the environment (CHUNKFS_META, CHUNKFS_STORAGE, AWS_*; e.g.
``eval "$(python -m devstack.localstack env)"``) and root (FUSE, bind mounts). Starts a
controller plugin and two node plugins ("node-a", "node-b": each its own kubelet,
cache and state directory) on unix sockets under DIR, then plays the
external-provisioner, the external-attacher, the external-resizer and kubelet:

    CreateVolume -> ControllerPublish(node-a) -> NodeStage + NodePublish on node-a ->
    write files -> NodeUnpublish + NodeUnstage -> ControllerUnpublish(node-a) ->
    ControllerPublish(node-b) -> NodeStage + NodePublish on node-b (empty cache) ->
    read the files back -> ControllerExpandVolume -> tear down -> DeleteVolume

printing each step. Exit status 0 when every step did what it should.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from csi.identity import DRIVER_NAME
from csi.mounts import mount_table
from csi.v1 import csi_pb2, csi_pb2_grpc

MiB = 1 << 20
Mode = csi_pb2.VolumeCapability.AccessMode
CAP = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(),
                               access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))
VOLUME = "pvc-walkthrough"


class Plugin:
    def __init__(self, root: Path, name: str, role: str) -> None:
        self.name, self.dir = name, root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = root / f"{name}.sock"
        self.kubelet = self.dir / "kubelet"
        self.cache = self.dir / "cache"
        argv = [sys.executable, "-m", "csi.server", "--endpoint", f"unix://{self.socket}",
                "--role", role, "--node-id", name, "--log-format", "text"]
        if role == "node":
            argv += ["--cache-dir", str(self.cache), "--state-dir", str(self.dir / "state"),
                     "--kubelet-dir", str(self.kubelet)]
        self.log = self.dir / "plugin.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited; see {self.log}")
            try:
                self.identity.Probe(csi_pb2.ProbeRequest(), timeout=10)
                return
            except grpc.RpcError as exc:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{self.name} not ready: {exc.details()}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def paths(self, pod: str) -> tuple[str, str]:
        staging = self.kubelet / "plugins/kubernetes.io/csi" / DRIVER_NAME / VOLUME / "globalmount"
        target = self.kubelet / "pods" / pod / "volumes/kubernetes.io~csi" / VOLUME / "mount"
        staging.mkdir(parents=True, exist_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        return str(staging), str(target)


class Steps:
    def __init__(self) -> None:
        self.n = 0

    @contextlib.contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        self.n += 1
        print(f"[{self.n:2d}] {what} ...", end="", flush=True)
        start = time.monotonic()
        try:
            yield
        except grpc.RpcError as exc:
            print(f" FAILED: {exc.code().name}: {exc.details()}")
            raise SystemExit(1) from None
        print(f" ok ({(time.monotonic() - start) * 1000:.0f} ms)")


def _digest(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if not name.startswith(".chunkfs"):
                with open(os.path.join(dirpath, name), "rb") as f:
                    out[os.path.relpath(os.path.join(dirpath, name), root)] = \
                        hashlib.sha256(f.read()).hexdigest()
    return out


def stage_and_publish(step: Steps, node: Plugin, ctx: dict[str, str], pod: str):
    staging, target = node.paths(pod)
    with step(f"NodeStageVolume on {node.name}: chunkfs mount at {staging}"):
        node.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=VOLUME, staging_target_path=staging, volume_capability=CAP,
            publish_context=ctx))
    with step(f"NodePublishVolume on {node.name}: bind mount into pod {pod}"):
        node.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=VOLUME, staging_target_path=staging, target_path=target,
            volume_capability=CAP, publish_context=ctx))
    return staging, target


def tear_down(step: Steps, ctrl: Plugin, node: Plugin, staging: str, target: str) -> None:
    with step(f"NodeUnpublishVolume on {node.name}"):
        node.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=VOLUME, target_path=target))
    with step(f"NodeUnstageVolume on {node.name} (flush to S3, unmount)"):
        node.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=VOLUME, staging_target_path=staging))
    with step(f"ControllerUnpublishVolume from {node.name} (release the writer lease)"):
        ctrl.controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
            volume_id=VOLUME, node_id=node.name))


def run(root: Path) -> None:
    step = Steps()
    plugins: list[Plugin] = []
    try:
        with step("start a controller plugin and node plugins node-a, node-b"):
            plugins = [Plugin(root, "controller", "controller"), Plugin(root, "node-a", "node"),
                       Plugin(root, "node-b", "node")]
            for p in plugins:
                p.wait_ready()
        ctrl, node_a, node_b = plugins
        with step(f"CreateVolume {VOLUME} (256 MiB)"):
            vol = ctrl.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
                name=VOLUME, volume_capabilities=[CAP],
                capacity_range=csi_pb2.CapacityRange(required_bytes=256 * MiB))).volume
        with step("ControllerPublishVolume to node-a (writer lease)"):
            ctx = dict(ctrl.controller.ControllerPublishVolume(
                csi_pb2.ControllerPublishVolumeRequest(
                    volume_id=VOLUME, node_id="node-a", volume_capability=CAP)).publish_context)
        print(f"     publish_context: {ctx}")
        staging, target = stage_and_publish(step, node_a, ctx, "pod-1")
        with step("write files through the pod's mount (fsync)"):
            os.makedirs(os.path.join(target, "docs"), exist_ok=True)
            for i in range(10):
                with open(os.path.join(target, "docs", f"note-{i}.txt"), "w") as f:
                    f.write(f"note {i}\n" * 100)
            with open(os.path.join(target, "data.bin"), "wb") as f:
                f.write(os.urandom(8 * MiB))
                f.flush()
                os.fsync(f.fileno())
            expected = _digest(target)
        print(f"     {len(expected)} files written")
        tear_down(step, ctrl, node_a, staging, target)
        with step("ControllerPublishVolume to node-b (new epoch fences node-a)"):
            ctx = dict(ctrl.controller.ControllerPublishVolume(
                csi_pb2.ControllerPublishVolumeRequest(
                    volume_id=VOLUME, node_id="node-b", volume_capability=CAP)).publish_context)
        print(f"     publish_context: {ctx}; node-b cache empty: "
              f"{not (node_b.cache / VOLUME).exists()}")
        staging, target = stage_and_publish(step, node_b, ctx, "pod-2")
        with step("read the files back on node-b (cold cache: from S3)"):
            got = _digest(target)
            if got != expected:
                raise SystemExit(f"data differs on node-b: {sorted(set(got) ^ set(expected))}")
        with step("ControllerExpandVolume to 512 MiB (seen live by the mount)"):
            ctrl.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
                volume_id=VOLUME,
                capacity_range=csi_pb2.CapacityRange(required_bytes=512 * MiB)))
            deadline = time.monotonic() + 10
            while os.statvfs(target).f_blocks * os.statvfs(target).f_frsize != 512 * MiB:
                if time.monotonic() > deadline:
                    raise SystemExit("the mount did not see the new size")
                time.sleep(0.2)
        with step("NodeGetVolumeStats on node-b"):
            stats = node_b.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
                volume_id=VOLUME, volume_path=target))
        usage = {csi_pb2.VolumeUsage.Unit.Name(u.unit): (u.used, u.total) for u in stats.usage}
        print(f"     usage (used, total): {usage}; condition: {stats.volume_condition.message}")
        tear_down(step, ctrl, node_b, staging, target)
        with step(f"DeleteVolume {vol.volume_id}"):
            ctrl.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
        print("all steps passed")
    finally:
        for p in plugins:
            p.stop()
        for path in sorted(mount_table(), key=len, reverse=True):  # after a failed step
            if path.startswith(f"{root}/"):
                subprocess.run(["umount", "-l", path], check=False, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devstack.walkthrough", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", help="work directory (default: a new temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    args = p.parse_args(argv)
    if not (os.environ.get("CHUNKFS_META") and os.environ.get("CHUNKFS_STORAGE")):
        p.error("set CHUNKFS_META and CHUNKFS_STORAGE (and AWS_*) first")
    root = Path(args.dir or tempfile.mkdtemp(prefix="csi-walk-", dir="/tmp")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        run(root)
    finally:
        if args.keep:
            print(f"work directory and plugin logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
