"""A small cluster of "nodes" in network namespaces, for tests that cross a network.

Layout (all namespaces and addresses are created here and removed at teardown):

    netns <id>s  "storage host": bridge 10.213.<k>.1, Redis :6379, SeaweedFS S3 :8333
    netns <id>a  node A, 10.213.<k>.2, its own cache dir
    netns <id>b  node B, 10.213.<k>.3, its own cache dir
    root ns      10.213.<k>.254 (the test process acts as the controller)

Mount processes are started with ``nsenter --net`` so that their FUSE mounts live in the
test's mount namespace while their traffic goes through their node's network: a
partition of node A (a blackhole route on A) cuts exactly A's mount off Redis and S3.
The kernel here has no ``netem`` qdisc, so partitions are blackhole routes.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from devstack.localstack import _s3_identity_config, find_binary, new_s3_credentials

BUCKET = "chunkfs"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def netns_available() -> str | None:
    """None if network namespaces work here, else why not."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    probe = f"cfsprobe{os.getpid()}"
    result = sh("ip", "netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"ip netns add failed: {result.stderr.strip()}"
    sh("ip", "netns", "del", probe, check=False)
    return None


@dataclass
class Node:
    name: str
    netns: str
    ip: str
    veth: str
    cache_dir: Path
    mounts: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)

    def nsenter(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}"]


class Cluster:
    def __init__(self, root: Path) -> None:
        self.id = secrets.token_hex(2)
        self.subnet = 100 + (int(self.id, 16) % 100)
        self.root = root
        self.svc_ns = f"cfs{self.id}s"
        self.bridge = f"cb{self.id}"
        self.server_ip = f"10.213.{self.subnet}.1"
        self.nodes: dict[str, Node] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.access_key, self.secret_key = new_s3_credentials()
        self._links: list[str] = []
        self.mountpoints: list[Path] = []
        self._namespaces: list[str] = []

    # ---- network ---------------------------------------------------------------------
    def _add_ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self._namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def _attach(self, netns: str | None, ifname: str, address: str) -> None:
        """A veth from the storage host's bridge to ``netns`` (None: the root namespace)."""
        peer = f"{ifname}p"
        sh("ip", "link", "add", ifname, "type", "veth", "peer", "name", peer)
        if netns is None:  # the other ends disappear with their namespaces
            self._links.append(ifname)
        sh("ip", "link", "set", peer, "netns", self.svc_ns)
        sh("ip", "-n", self.svc_ns, "link", "set", peer, "master", self.bridge, "up")
        if netns is not None:
            sh("ip", "link", "set", ifname, "netns", netns)
        prefix = ["ip", "-n", netns] if netns is not None else ["ip"]
        sh(*prefix, "addr", "add", f"{address}/24", "dev", ifname)
        sh(*prefix, "link", "set", ifname, "up")

    def up(self) -> None:
        self._add_ns(self.svc_ns)
        sh("ip", "-n", self.svc_ns, "link", "add", self.bridge, "type", "bridge")
        sh("ip", "-n", self.svc_ns, "addr", "add", f"{self.server_ip}/24", "dev", self.bridge)
        sh("ip", "-n", self.svc_ns, "link", "set", self.bridge, "up")
        self._attach(None, f"cr{self.id}", f"10.213.{self.subnet}.254")
        for index, name in enumerate(("a", "b"), start=2):
            netns = f"cfs{self.id}{name}"
            self._add_ns(netns)
            veth = f"c{self.id}{name}"
            self._attach(netns, veth, f"10.213.{self.subnet}.{index}")
            cache = self.root / f"cache-{name}"
            cache.mkdir(parents=True, exist_ok=True)
            self.nodes[name] = Node(name, netns, f"10.213.{self.subnet}.{index}", veth, cache)
        self._start_services()

    def partition(self, node: str) -> None:
        """Node ``node`` can no longer reach the storage host: packets vanish."""
        sh("ip", "-n", self.nodes[node].netns, "route", "add", "blackhole", f"{self.server_ip}/32")

    def heal(self, node: str) -> None:
        sh("ip", "-n", self.nodes[node].netns, "route", "del", "blackhole", f"{self.server_ip}/32")

    # ---- services --------------------------------------------------------------------
    def _spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(self.root / log, "wb") as out:
            proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.svc_ns}", *args],
                                    stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def _start_services(self) -> None:
        data = self.root / "services"
        (data / "redis").mkdir(parents=True)
        (data / "weed" / "data").mkdir(parents=True)
        (data / "weed" / "conf").mkdir(parents=True)
        (data / "s3.json").write_text(_s3_identity_config(self.access_key, self.secret_key))
        self._spawn(["redis-server", "--bind", self.server_ip, "--port", "6379",
                     "--dir", str(data / "redis"), "--save", "", "--appendonly", "no",
                     "--protected-mode", "no"], "redis.log")
        ip = self.server_ip
        self._spawn([find_binary("weed", "CHUNKFS_WEED"), "-logtostderr",
                     f"-config_dir={data / 'weed' / 'conf'}", "server", "-s3", "-filer",
                     f"-dir={data / 'weed' / 'data'}", f"-ip={ip}", f"-ip.bind={ip}",
                     "-s3.port=8333", "-s3.port.iceberg=0", "-s3.port.lance=0",
                     f"-s3.config={data / 's3.json'}", "-master.telemetry=false",
                     "-master.volumeSizeLimitMB=256", "-master.electionTimeout=1s",
                     "-volume.max=0", "-volume.preStopSeconds=0"], "weed.log")
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120.0) -> None:
        import botocore.session
        from botocore.config import Config
        from botocore.exceptions import ClientError

        deadline = time.monotonic() + timeout
        r = redis.Redis(host=self.server_ip, port=6379, socket_timeout=2)
        s3 = botocore.session.get_session().create_client("s3", endpoint_url=f"http://{self.server_ip}:8333",
                          aws_access_key_id=self.access_key,
                          aws_secret_access_key=self.secret_key, region_name="us-east-1",
                          config=Config(s3={"addressing_style": "path"},
                                        retries={"max_attempts": 1}))
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                r.ping()
                try:
                    s3.create_bucket(Bucket=BUCKET)
                except ClientError as exc:
                    if "BucketAlreadyOwnedByYou" not in str(exc):
                        raise
                s3.put_object(Bucket=BUCKET, Key="ready", Body=b"ok")
                return
            except Exception as exc:  # noqa: BLE001 - services still starting
                last = exc
                time.sleep(0.5)
        raise RuntimeError(f"cluster services did not become ready: {last}")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CHUNKFS_"))}
        env.update({
            "CHUNKFS_META": f"redis://{self.server_ip}:6379/0",
            "CHUNKFS_STORAGE": f"s3://{BUCKET}/cluster",
            "AWS_ENDPOINT_URL": f"http://{self.server_ip}:8333",
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        })
        return env

    # ---- chunkfs on nodes ------------------------------------------------------------
    def chunkfs(self, *args: str, node: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        prefix = self.nodes[node].nsenter() if node else []
        chunkfs = str(Path(sys.executable).with_name("chunkfs"))
        return subprocess.run([*prefix, chunkfs, *args], env=self.env(), check=check,
                              capture_output=True, text=True, timeout=300)

    def mount(self, node: str, volume: str, mountpoint: Path, options: str = "") -> None:
        mountpoint.mkdir(parents=True, exist_ok=True)
        args = ["mount", volume, str(mountpoint), "--cache-dir", str(self.nodes[node].cache_dir)]
        if options:
            args += ["-o", options]
        result = self.chunkfs(*args, node=node, check=False)
        if result.returncode == 0:
            self.mountpoints.append(mountpoint)
        else:
            raise RuntimeError(f"mount on node {node} failed: {result.stderr.strip()}")

    def mount_pid(self, mountpoint: Path) -> int:
        import json
        return int(json.loads((mountpoint / ".chunkfs.status").read_text())["pid"])

    def down(self) -> None:
        for mountpoint in self.mountpoints:
            try:  # the services go away next: the mount processes must not outlive them
                os.kill(self.mount_pid(mountpoint), signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass
            sh("fusermount3", "-u", "-z", str(mountpoint), check=False)
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for link in self._links:
            sh("ip", "link", "del", link, check=False)
        for ns in self._namespaces:
            sh("ip", "netns", "del", ns, check=False)
