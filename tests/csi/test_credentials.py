"""Credentials of a Secret's backend on a node (issue 10 item 4): never on the node's
disk, kept for re-mounts on a memory filesystem only, and rotated by a repeated
NodeStageVolume. The Redis credentials are a real Redis ACL user whose passwords the
tests change, so "the mount uses the new password" is checked by Redis itself."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import grpc
import pytest

from csi.mounts import mount_pids
from csi.v1 import csi_pb2

from .conftest import Mode, backend_secrets, mount_cap

MiB = 1 << 20
CAP = mount_cap(Mode.SINGLE_NODE_WRITER)


class AclUser:
    """A Redis ACL user of the test Redis (removed at the end)."""

    def __init__(self, redis) -> None:
        self.redis = redis
        self.name = f"csi-{uuid.uuid4().hex[:8]}"
        self.client = redis.client()
        self.passwords: list[str] = []

    def kill_connections(self) -> int:
        """Drop every connection authenticated as this user (as Redis does not do by
        itself when a password is revoked): their clients must reconnect."""
        return int(self.client.execute_command("CLIENT", "KILL", "USER", self.name))

    def connections(self) -> int:
        listing = self.client.execute_command("CLIENT", "LIST")
        text = listing.decode() if isinstance(listing, bytes) else str(listing)
        return sum(1 for line in text.splitlines() if f" user={self.name} " in f" {line} ")

    def allow(self, *passwords: str) -> None:
        """Exactly these passwords are accepted from now on (new connections)."""
        self.client.execute_command("ACL", "SETUSER", self.name, "reset", "on",
                                    *[f">{p}" for p in passwords], "~*", "&*", "+@all")
        self.passwords = list(passwords)

    def url(self, password: str, db: int) -> str:
        return f"redis://{self.name}:{password}@{self.redis.host}:{self.redis.port}/{db}"

    def close(self) -> None:
        self.client.execute_command("ACL", "DELUSER", self.name)
        self.client.close()


@pytest.fixture
def acl_user(local_services):
    user = AclUser(local_services.redis)
    user.allow(f"pw1-{uuid.uuid4().hex}")
    yield user
    user.close()


def _db(cluster) -> int:
    return int(cluster.env["CHUNKFS_META"].rsplit("/", 1)[1])


def _secrets(cluster, acl_user, password: str) -> dict[str, str]:
    return backend_secrets(cluster.env, meta_url=acl_user.url(password, _db(cluster)))


class Volume:
    """One volume of a Secret's backend on one node plugin, driven like kubelet does."""

    def __init__(self, ctrl, node, secrets: dict[str, str], name: str = "pvc-s") -> None:
        self.node, self.name, self.secrets = node, name, secrets
        ctrl.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=name, volume_capabilities=[CAP], secrets=secrets,
            capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB)))
        self.ctx = dict(ctrl.controller.ControllerPublishVolume(
            csi_pb2.ControllerPublishVolumeRequest(volume_id=name, node_id=node.name,
                                                   volume_capability=CAP,
                                                   secrets=secrets)).publish_context)
        self.staging = node.kubelet.staging(name)
        self.target = node.kubelet.target(name)

    def stage(self, secrets: dict[str, str] | None = None) -> None:
        self.node.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=self.name, staging_target_path=self.staging, volume_capability=CAP,
            publish_context=self.ctx, secrets=secrets or self.secrets))

    def publish(self) -> None:
        self.node.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=self.name, staging_target_path=self.staging, target_path=self.target,
            volume_capability=CAP, publish_context=self.ctx))

    def unstage(self) -> None:
        self.node.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=self.name, staging_target_path=self.staging))

    def unpublish(self) -> None:
        self.node.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=self.name, target_path=self.target))

    def pid(self) -> int:
        pids = mount_pids(self.staging)
        assert len(pids) == 1, pids
        return pids[0]

    def mount_env(self) -> dict[str, str]:
        raw = Path(f"/proc/{self.pid()}/environ").read_bytes().split(b"\0")
        return dict(item.decode().split("=", 1) for item in raw if b"=" in item)

    def stats(self, path: str) -> csi_pb2.NodeGetVolumeStatsResponse:
        return self.node.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=self.name, volume_path=path))


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def wait_readable(path: str, data: bytes, node, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path, "rb") as f:
                if f.read() == data:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{path} never came back:\n{node.log_tail()}"
        time.sleep(0.2)


def kill_plugin_and_mounts(node, vol: Volume) -> None:
    """What a container restart does: the plugin and its mount processes die."""
    node.kill()
    for pid in mount_pids(vol.staging):
        os.kill(pid, signal.SIGKILL)


def disk_bytes(*roots: Path) -> bytes:
    return b"".join(p.read_bytes() for r in roots for p in r.rglob("*") if p.is_file())


def test_credentials_never_reach_the_nodes_disk(cluster, acl_user) -> None:
    ctrl = cluster.start("ctrl", "controller")
    node = cluster.start("node-a", "node")
    password = acl_user.passwords[0]
    secret_key = cluster.env["AWS_SECRET_ACCESS_KEY"]
    vol = Volume(ctrl, node, _secrets(cluster, acl_user, password))
    vol.stage()
    vol.publish()
    write(os.path.join(vol.target, "f"), b"through a Secret's backend")
    env = vol.mount_env()  # the mount process has them: it needs them
    assert acl_user.name in env["CHUNKFS_META"] and env["AWS_SECRET_ACCESS_KEY"] == secret_key
    on_disk = disk_bytes(node.state_dir, node.cache_dir)
    assert password.encode() not in on_disk and secret_key.encode() not in on_disk
    stored = node.secrets_dir / "pvc-s.json"  # /dev/shm: memory
    assert stored.stat().st_mode & 0o777 == 0o600
    assert password in json.loads(stored.read_text())["env"]["CHUNKFS_META"]
    record = json.loads((node.state_dir / "staged/pvc-s.json").read_text())
    assert record["backend"].startswith(f"redis://{acl_user.redis.host}:") and "env" not in record
    vol.unpublish()
    vol.unstage()
    assert not stored.exists()
    assert password.encode() not in disk_bytes(node.state_dir, node.cache_dir)


def test_a_restarted_plugin_remounts_a_secret_backend_from_memory(cluster, acl_user) -> None:
    """Container restart: plugin and mounts die; the credentials survive on tmpfs."""
    ctrl = cluster.start("ctrl", "controller")
    node = cluster.start("node-a", "node")
    vol = Volume(ctrl, node, _secrets(cluster, acl_user, acl_user.passwords[0]))
    vol.stage()
    vol.publish()
    write(os.path.join(vol.target, "f"), b"before the restart")
    kill_plugin_and_mounts(node, vol)
    node.start()
    wait_readable(os.path.join(vol.target, "f"), b"before the restart", node)
    vol.unpublish()
    vol.unstage()


def test_without_a_memory_filesystem_a_dead_mount_waits_for_nodestage(cluster, csi_root,
                                                                       acl_user) -> None:
    ctrl = cluster.start("ctrl", "controller")
    on_disk = csi_root / "secrets-on-disk"
    node = cluster.start("node-a", "node", extra=("--secrets-dir", str(on_disk)))
    vol = Volume(ctrl, node, _secrets(cluster, acl_user, acl_user.passwords[0]))
    vol.stage()
    write(os.path.join(vol.staging, "f"), b"kept")
    assert not on_disk.exists()  # not a memory filesystem: nothing written there
    kill_plugin_and_mounts(node, vol)
    node.start()
    node.wait_for_log("needs the credentials of its Secret")
    cond = vol.stats(vol.staging).volume_condition
    assert cond.abnormal and "needs the credentials of its Secret" in cond.message
    vol.stage()  # kubelet's next NodeStageVolume brings the credentials
    wait_readable(os.path.join(vol.staging, "f"), b"kept", node)
    assert not vol.stats(vol.staging).volume_condition.abnormal
    vol.unstage()


def test_rotated_credentials_reach_the_mount(cluster, acl_user) -> None:
    """A repeated NodeStageVolume with rotated credentials: an unpublished mount is
    re-mounted with them at once; a published one keeps running and gets them over its
    control socket, so that once the old password is revoked and Redis drops its
    connections, it reconnects with the new one (no EIO, no re-mount); later re-mounts
    use them too."""
    ctrl = cluster.start("ctrl", "controller")
    node = cluster.start("node-a", "node")
    pw1 = acl_user.passwords[0]
    vol = Volume(ctrl, node, _secrets(cluster, acl_user, pw1))
    vol.stage()
    write(os.path.join(vol.staging, "f"), b"one")

    pw2 = f"pw2-{uuid.uuid4().hex}"
    acl_user.allow(pw1, pw2)                      # the rotation window: both work
    first = vol.pid()
    vol.stage(_secrets(cluster, acl_user, pw2))   # not published: re-mounted now
    assert vol.pid() != first and pw2 in vol.mount_env()["CHUNKFS_META"]
    acl_user.allow(pw2)                           # the old password is revoked
    write(os.path.join(vol.staging, "g"), b"two")
    assert open(os.path.join(vol.staging, "f"), "rb").read() == b"one"

    vol.publish()
    pw3 = f"pw3-{uuid.uuid4().hex}"
    acl_user.allow(pw2, pw3)
    running = vol.pid()
    vol.stage(_secrets(cluster, acl_user, pw3))   # published: handed to the running mount
    assert vol.pid() == running
    node.wait_for_log("credentials rotated; the running mount uses them from its next connection")
    stored = json.loads((node.secrets_dir / "pvc-s.json").read_text())
    assert pw3 in stored["env"]["CHUNKFS_META"]
    acl_user.allow(pw3)                           # pw2 revoked, and its connections cut:
    acl_user.kill_connections()
    write(os.path.join(vol.target, "h"), b"three")  # the mount reconnects, with pw3
    assert vol.pid() == running
    wait_readable(os.path.join(vol.target, "g"), b"two", node)
    assert acl_user.connections() >= 1            # authenticated as the ACL user, by pw3
    for pid in mount_pids(vol.staging):           # and when it is next re-mounted ...
        os.kill(pid, signal.SIGKILL)
    wait_readable(os.path.join(vol.target, "h"), b"three", node)
    assert pw3 in vol.mount_env()["CHUNKFS_META"]  # ... it starts with them
    vol.unpublish()
    vol.unstage()


def test_a_stage_naming_another_backend_for_a_staged_volume_is_refused(cluster,
                                                                      acl_user) -> None:
    ctrl = cluster.start("ctrl", "controller")
    node = cluster.start("node-a", "node")
    vol = Volume(ctrl, node, _secrets(cluster, acl_user, acl_user.passwords[0]))
    vol.stage()
    other = dict(vol.secrets, storage=cluster.env["CHUNKFS_STORAGE"] + "-elsewhere")
    with pytest.raises(grpc.RpcError) as err:
        vol.stage(other)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as err:  # a partial Secret never reaches the mount
        vol.stage({"meta-url": vol.secrets["meta-url"]})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    vol.unstage()
