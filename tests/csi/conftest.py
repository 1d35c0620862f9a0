"""Fixtures of the CSI suite: real plugin processes, driven over real unix-socket channels.

    plugin          the plugin (``--role all``, node ``node-a``) against fresh backends
    cluster         a factory of plugin processes: a controller and node plugins ("nodes"
                    with their own kubelet, cache and state dirs)
    kubelet         node-a's paths the way kubelet lays them out (staging, pod targets)
    node_b          a second node plugin ("node-b", role node) next to ``plugin``
    default_redis   a Redis client on the plugins' default backend database

Every plugin runs as ``python -m csi.server`` with ``backend_env`` (CHUNKFS_META,
CHUNKFS_STORAGE, AWS_*). At teardown the plugins get SIGTERM, then every chunkfs mount
process started under this test's directory is stopped (by PID) and whatever is still
mounted under it is detached.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from csi.mounts import mount_table
from csi.v1 import csi_pb2, csi_pb2_grpc
from devstack.localstack import free_port

ROOT = Path(__file__).resolve().parents[2]
SHM = Path("/dev/shm")  # tmpfs: node plugins' --secrets-dir lives under it
Mode = csi_pb2.VolumeCapability.AccessMode


def mount_cap(mode: int = Mode.SINGLE_NODE_WRITER, flags: tuple[str, ...] = (),
              fs_type: str = "") -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
        access_mode=Mode(mode=mode))


def backend_secrets(env: dict[str, str], **override: str) -> dict[str, str]:
    """A complete backend as a StorageClass Secret holds it, from a backend environment
    (``override`` replaces keys: ``storage=...``, ``meta_url=...``)."""
    secrets = {"meta-url": env["CHUNKFS_META"], "storage": env["CHUNKFS_STORAGE"],
               "endpoint": env["AWS_ENDPOINT_URL"], "region": env["AWS_REGION"],
               "access-key-id": env["AWS_ACCESS_KEY_ID"],
               "secret-access-key": env["AWS_SECRET_ACCESS_KEY"]}
    secrets.update({k.replace("_", "-"): v for k, v in override.items()})
    return secrets


def block_cap(mode: int = Mode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                    access_mode=Mode(mode=mode))


@dataclass
class PluginProcess:
    """One ``chunkfs-csi`` process and its stubs."""

    name: str
    argv: list[str]
    env: dict[str, str]
    socket: str
    log_path: Path
    metrics_port: int
    kubelet: Kubelet | None = None
    cache_dir: Path | None = None
    state_dir: Path | None = None
    secrets_dir: Path | None = None
    proc: subprocess.Popen | None = None
    channel: grpc.Channel | None = None
    identity: csi_pb2_grpc.IdentityStub = field(init=False)
    controller: csi_pb2_grpc.ControllerStub = field(init=False)
    node: csi_pb2_grpc.NodeStub = field(init=False)

    def start(self, timeout: float = 30.0) -> PluginProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, cwd=ROOT)
        self.channel = grpc.insecure_channel("unix://" + self.socket)
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"plugin {self.name} exited ({self.proc.returncode}):\n"
                                     + self.log_tail())
            try:
                self.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=1)
                return self
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"plugin {self.name} did not answer:\n"
                                         + self.log_tail()) from None
                time.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> PluginProcess:
        self.stop()
        return self.start()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 5.0) -> str:
        """The plugin's log once it contains ``text`` (lines are written after replies)."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log_path.read_text(errors="replace")
            if text in log:
                return log
            assert time.monotonic() < deadline, f"{text!r} not in the log:\n{self.log_tail()}"
            time.sleep(0.05)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.metrics().splitlines():
            key, _, value = line.rpartition(" ")
            if key == (f"{name}{{{want}}}" if want else name):
                return float(value)
        return 0.0


class Kubelet:
    """Paths under a kubelet root dir, as kubelet would create them."""

    def __init__(self, root: Path, driver: str = "csi.chunkfs.io") -> None:
        self.root = root
        self.driver = driver
        root.mkdir(parents=True, exist_ok=True)

    def staging(self, volume_id: str) -> str:
        path = self.root / "plugins/kubernetes.io/csi" / self.driver / volume_id / "globalmount"
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def target(self, volume_id: str, pod: str | None = None) -> str:
        pod = pod or uuid.uuid4().hex[:12]
        parent = self.root / "pods" / pod / "volumes/kubernetes.io~csi" / volume_id
        parent.mkdir(parents=True, exist_ok=True)
        return str(parent / "mount")


class Cluster:
    """Plugin processes of one test, all under one short temporary directory."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = env
        self.plugins: list[PluginProcess] = []
        self.shm = SHM / root.name  # memory-backed: where node plugins keep credentials

    def start(self, name: str, role: str = "all", *, node_id: str | None = None,
              env: dict[str, str] | None = None, extra: tuple[str, ...] = ()) -> PluginProcess:
        node_dir = self.root / name
        node_dir.mkdir(exist_ok=True)
        port = free_port()
        argv = [sys.executable, "-m", "csi.server", "--endpoint",
                f"unix://{self.root}/{name}.sock", "--role", role,
                "--node-id", node_id or name, "--metrics-address", f"127.0.0.1:{port}",
                "--log-level", "debug", "--recover-interval", "1", *extra]
        if name in {p.name for p in self.plugins}:
            raise ValueError(f"plugin {name} exists already")
        plugin = PluginProcess(name, argv, dict(env or self.env), f"{self.root}/{name}.sock",
                               node_dir / "plugin.log", port)
        if role in ("node", "all"):
            plugin.kubelet = Kubelet(node_dir / "kubelet")
            plugin.cache_dir, plugin.state_dir = node_dir / "cache", node_dir / "state"
            plugin.secrets_dir = self.shm / name
            argv += ["--cache-dir", str(plugin.cache_dir), "--state-dir", str(plugin.state_dir),
                     "--kubelet-dir", str(plugin.kubelet.root)]
            if not any(a == "--secrets-dir" for a in extra):
                argv += ["--secrets-dir", str(plugin.secrets_dir)]
        self.plugins.append(plugin)
        return plugin.start()

    def cleanup(self) -> None:
        for plugin in self.plugins:
            plugin.stop()
        stop_mount_processes(str(self.root))
        for path in sorted(mount_table(), key=len, reverse=True):
            if path.startswith(str(self.root) + "/"):
                subprocess.run(["umount", "-l", path], check=False, capture_output=True)
        shutil.rmtree(self.shm, ignore_errors=True)


def mount_processes(under: str) -> list[int]:
    """PIDs of chunkfs mount processes whose command line names a path under ``under``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv]
        if "mount" in words and any(w.startswith(under + "/") for w in words) and any(
                "chunkfs" in w for w in words):
            pids.append(int(entry))
    return pids


def stop_mount_processes(under: str, timeout: float = 15.0) -> None:
    pids = mount_processes(under)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.fixture
def csi_root() -> Iterator[Path]:
    # Short: unix socket paths must fit in 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="csi-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cluster(csi_root: Path, backend_env: dict[str, str]) -> Iterator[Cluster]:
    c = Cluster(csi_root, backend_env)
    try:
        yield c
    finally:
        c.cleanup()


@pytest.fixture
def plugin(cluster: Cluster) -> PluginProcess:
    return cluster.start("node-a", "all")


@pytest.fixture
def kubelet(plugin: PluginProcess) -> Kubelet:
    assert plugin.kubelet is not None
    return plugin.kubelet


@pytest.fixture
def node_b(cluster: Cluster, plugin: PluginProcess) -> PluginProcess:
    """A second node plugin, "node-b" (after ``plugin``, node-a)."""
    return cluster.start("node-b", "node")


@pytest.fixture
def default_redis(local_services, backend_env: dict[str, str]):
    """A Redis client on the plugins' default backend database (to look at records)."""
    db = int(backend_env["CHUNKFS_META"].rsplit("/", 1)[1])
    client = local_services.redis.client(db=db)
    try:
        yield client
    finally:
        client.close()
