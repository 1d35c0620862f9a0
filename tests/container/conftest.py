"""Fixtures of the container tests: a Docker engine of our own, the image, a kubelet dir.

    docker          session  DockerEngine (tests/container/engine.py): our own dockerd,
                             stopped by PID at the end; skips the test (with the reason)
                             when no engine can start here
    image           session  "chunkfs-csi:test", built by scripts/build-image.sh
    node_host       function NodeHost: a scratch "node" (kubelet dir made rshared, cache,
                             state and mounter dirs) and the chart values that point there
    chart_pods      function ChartPods factory (tests/container/pods.py): the chart's pods
                             as containers on node_host, removed at teardown
    backend_secret  function the backend Secret's data (meta-url, storage, endpoint, ...)
                             for this test's fresh Redis database and S3 prefix

Every container runs with ``--network host``: the test services listen on loopback.
The engine's data root lives in ``.docker-test/`` of the checkout (or
``$CHUNKFS_TEST_DOCKER_DIR``) so that the base image and build cache are reused.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from csi.mounts import mount_table
from tests.container.engine import (
    DockerEngine,
    EngineUnavailable,
    build_image,
    ensure_base_image,
)

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "chunkfs-csi:test"
SECRET_NAME = "chunkfs-backend"


@pytest.fixture(scope="session")
def docker() -> Iterator[DockerEngine]:
    root = Path(os.environ.get("CHUNKFS_TEST_DOCKER_DIR") or ROOT / ".docker-test")
    engine = DockerEngine(root)
    try:
        engine.start()
    except EngineUnavailable as exc:
        pytest.skip(f"no Docker engine can be started here: {exc}")
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def image(docker: DockerEngine) -> str:
    log = docker.root / "build.log"
    try:
        ensure_base_image(docker, docker.root, log)
    except EngineUnavailable as exc:
        pytest.skip(f"no base image: {exc}")
    build_image(docker, ROOT, IMAGE, log)
    # the images of earlier runs, now untagged, and a bounded build cache: the data root
    # stays a few GiB however often the suite runs
    docker.docker("image", "prune", "--force", check=False)
    docker.docker("builder", "prune", "--force", "--keep-storage", "2GB", check=False)
    return IMAGE


@dataclass
class NodeHost:
    """A node's directories on this host, laid out as the chart lays them out."""

    root: Path

    @property
    def kubelet(self) -> Path:
        return self.root / "kubelet"

    @property
    def secrets(self) -> Path:
        """Where a node keeps Secret credentials: a tmpfs, as /run is on a real node."""
        return self.root / "run-secrets"

    @property
    def plugin_socket(self) -> Path:
        return self.kubelet / "plugins" / "csi.chunkfs.io" / "csi.sock"

    def values(self, **extra: object) -> dict:
        values = {
            "image": {"repository": IMAGE.split(":")[0], "tag": IMAGE.split(":")[1]},
            "backend": {"secretName": SECRET_NAME},
            "kubeletDir": str(self.kubelet),
            "node": {"cache": {"hostPath": str(self.root / "cache")},
                     "stateDir": str(self.root / "state"), "recoverInterval": 1,
                     "secretsDir": str(self.secrets), "logLevel": "debug"},
            "mounter": {"socketDir": str(self.root / "mounter"), "grace": 30},
        }
        for key, value in extra.items():
            values[key] = {**values.get(key, {}), **value}  # type: ignore[dict-item]
        return values

    def staging(self, volume_id: str) -> str:
        path = self.kubelet / "plugins/kubernetes.io/csi/csi.chunkfs.io" / volume_id / "globalmount"
        path.parent.mkdir(parents=True, exist_ok=True)
        return str(path)

    def target(self, volume_id: str, pod_uid: str) -> str:
        parent = self.kubelet / "pods" / pod_uid / "volumes/kubernetes.io~csi" / volume_id
        parent.mkdir(parents=True, exist_ok=True)
        return str(parent / "mount")


def _unmount_under(root: Path) -> None:
    """Detach whatever is still mounted under ``root`` (deepest first): all ours."""
    prefix = str(root) + "/"
    for path in sorted((p for p in mount_table() if p.startswith(prefix)), reverse=True):
        with contextlib.suppress(subprocess.SubprocessError):
            subprocess.run(["umount", "-l", path], capture_output=True, timeout=30, check=False)


@pytest.fixture
def node_host() -> Iterator[NodeHost]:
    root = Path(tempfile.mkdtemp(prefix="cfs-node-", dir="/tmp"))
    host = NodeHost(root)
    kubelet = host.kubelet
    (kubelet / "plugins_registry").mkdir(parents=True)
    # kubelet's directory is a shared mount on a real node: make ours one
    subprocess.run(["mount", "--bind", str(kubelet), str(kubelet)], check=True)
    subprocess.run(["mount", "--make-rshared", str(kubelet)], check=True)
    host.secrets.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0700,size=4m", "tmpfs", str(host.secrets)],
                   check=True)
    try:
        yield host
    finally:
        subprocess.run(["umount", "-l", str(host.secrets)], capture_output=True, check=False)
        _unmount_under(kubelet)
        subprocess.run(["umount", "-l", str(kubelet)], capture_output=True, check=False)
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], capture_output=True,
                       check=False)


@pytest.fixture
def chart_pods(docker: DockerEngine, node_host: NodeHost, backend_secret: dict[str, str]):
    """ChartPods(values=None) for this test's node; its containers go at teardown."""
    from tests.container.pods import ChartPods

    made: list[ChartPods] = []

    def make(values: dict | None = None) -> ChartPods:
        pods = ChartPods(docker, node_host, backend_secret, values)
        made.append(pods)
        return pods

    try:
        yield make
    finally:
        for pods in made:
            pods.close()


@pytest.fixture
def backend_secret(meta_url: str, s3_env: dict[str, str]) -> dict[str, str]:
    """The backend Secret's keys, as the README tells users to create it."""
    return {
        "meta-url": meta_url,
        "storage": s3_env["CHUNKFS_STORAGE"],
        "endpoint": s3_env["AWS_ENDPOINT_URL"],
        "region": s3_env.get("AWS_REGION", "us-east-1"),
        "access-key-id": s3_env["AWS_ACCESS_KEY_ID"],
        "secret-access-key": s3_env["AWS_SECRET_ACCESS_KEY"],
    }
