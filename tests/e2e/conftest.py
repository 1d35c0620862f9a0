"""The kind e2e suite's cluster: one control plane, two workers, the driver installed.

    .venv/bin/python -m pytest tests/e2e        # needs Docker, kind and network access

The session creates a kind cluster named ``chunkfs-e2e`` (kept with
``CHUNKFS_E2E_KEEP=1``; an existing one of that name is reused), builds the image with
scripts/build-image.sh and loads it into the nodes, installs the VolumeSnapshot CRDs and
the snapshot-controller (external-snapshotter, from its release manifests), runs Redis
and SeaweedFS's S3 gateway in the cluster, creates the backend Secret and installs the
chart with Helm's SDK (helm-python-sdk: no helm binary). Without kind or without a
Docker engine every test is skipped with that reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = "chunkfs-e2e"
IMAGE = "chunkfs-csi:e2e"
NAMESPACE = "kube-system"
BACKEND_NS = "chunkfs-e2e-backend"
APP_NS = "default"
SNAPSHOTTER = "v8.2.1"
SNAPSHOTTER_URL = ("https://raw.githubusercontent.com/kubernetes-csi/external-snapshotter/"
                   f"{SNAPSHOTTER}/")
SNAPSHOTTER_MANIFESTS = [
    "client/config/crd/snapshot.storage.k8s.io_volumesnapshotclasses.yaml",
    "client/config/crd/snapshot.storage.k8s.io_volumesnapshotcontents.yaml",
    "client/config/crd/snapshot.storage.k8s.io_volumesnapshots.yaml",
    "deploy/kubernetes/snapshot-controller/rbac-snapshot-controller.yaml",
    "deploy/kubernetes/snapshot-controller/setup-snapshot-controller.yaml",
]
KIND_CONFIG = """\
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
  - role: worker
"""
BACKEND = f"""\
apiVersion: v1
kind: Namespace
metadata: {{name: {BACKEND_NS}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: redis, namespace: {BACKEND_NS}}}
spec:
  selector: {{matchLabels: {{app: redis}}}}
  template:
    metadata: {{labels: {{app: redis}}}}
    spec:
      containers:
        - name: redis
          image: redis:7.2-alpine
          args: [--save, "", --appendonly, "no"]
          ports: [{{containerPort: 6379}}]
---
apiVersion: v1
kind: Service
metadata: {{name: redis, namespace: {BACKEND_NS}}}
spec:
  selector: {{app: redis}}
  ports: [{{port: 6379}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: s3, namespace: {BACKEND_NS}}}
spec:
  selector: {{matchLabels: {{app: s3}}}}
  template:
    metadata: {{labels: {{app: s3}}}}
    spec:
      containers:
        - name: seaweedfs
          image: chrislusf/seaweedfs:3.80
          args: [server, -dir=/data, -s3, -s3.port=8333, -master.volumeSizeLimitMB=64,
                 -volume.max=0, -ip.bind=0.0.0.0]
          ports: [{{containerPort: 8333}}]
          volumeMounts: [{{name: data, mountPath: /data}}]
      volumes: [{{name: data, emptyDir: {{}}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: s3, namespace: {BACKEND_NS}}}
spec:
  selector: {{app: s3}}
  ports: [{{port: 8333}}]
"""
SECRET = {
    "meta-url": f"redis://redis.{BACKEND_NS}.svc:6379/0",
    "storage": "s3://chunkfs/e2e",
    "endpoint": f"http://s3.{BACKEND_NS}.svc:8333",
    "region": "us-east-1",
    "access-key-id": "e2e",          # SeaweedFS without identities accepts any key
    "secret-access-key": "e2e-secret",
}


def _run(*argv: str, timeout: float = 900, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          **kw)


def _skip_reason() -> str | None:
    if os.environ.get("CHUNKFS_E2E_KUBECONFIG"):
        return None
    if shutil.which("kind") is None:
        return ("kind is not installed (no `kind` on PATH): the kind e2e suite needs "
                "Docker, kind and network access; see tests/e2e/conftest.py")
    if shutil.which("docker") is None or _run("docker", "info", timeout=30).returncode != 0:
        return "no Docker engine answers `docker info`: kind needs one"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _skip_reason()
    if reason:
        for item in items:
            if "tests/e2e/" in str(item.path):
                item.add_marker(pytest.mark.skip(reason=reason))


def apply_yaml(api_client: Any, text: str, namespace: str | None = None) -> None:
    from kubernetes import utils
    from kubernetes.utils import FailToCreateError

    for doc in yaml.safe_load_all(text):
        if not doc:
            continue
        try:
            utils.create_from_dict(api_client, doc, namespace=namespace
                                   or doc.get("metadata", {}).get("namespace"))
        except FailToCreateError as exc:
            if not all(getattr(e, "status", None) == 409 for e in exc.api_exceptions):
                raise


def wait_until(what: str, check: Callable[[], Any], timeout: float = 300.0,
               interval: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture(scope="session")
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    given = os.environ.get("CHUNKFS_E2E_KUBECONFIG")
    if given:
        yield given
        return
    path = str(tmp_path_factory.mktemp("kind") / "kubeconfig")
    created = False
    if CLUSTER not in _run("kind", "get", "clusters").stdout.split():
        cfg = Path(path).with_name("kind.yaml")
        cfg.write_text(KIND_CONFIG)
        proc = _run("kind", "create", "cluster", "--name", CLUSTER, "--config", str(cfg),
                    "--wait", "300s")
        assert proc.returncode == 0, proc.stderr[-3000:]
        created = True
    proc = _run("kind", "get", "kubeconfig", "--name", CLUSTER)
    assert proc.returncode == 0, proc.stderr
    Path(path).write_text(proc.stdout)
    try:
        yield path
    finally:
        if created and not os.environ.get("CHUNKFS_E2E_KEEP"):
            _run("kind", "delete", "cluster", "--name", CLUSTER)


@pytest.fixture(scope="session")
def k8s(kubeconfig: str) -> Any:
    from kubernetes import client, config

    config.load_kube_config(config_file=kubeconfig)
    return client.ApiClient()


@pytest.fixture(scope="session")
def installed(kubeconfig: str, k8s: Any) -> dict[str, str]:
    """The driver installed with the chart, its backend running in the cluster."""
    from kubernetes import client

    if not os.environ.get("CHUNKFS_E2E_KUBECONFIG"):
        build = _run("bash", str(ROOT / "scripts/build-image.sh"), IMAGE, timeout=1800)
        assert build.returncode == 0, build.stderr[-3000:]
        load = _run("kind", "load", "docker-image", IMAGE, "--name", CLUSTER)
        assert load.returncode == 0, load.stderr[-2000:]
    for name in SNAPSHOTTER_MANIFESTS:
        with urllib.request.urlopen(SNAPSHOTTER_URL + name, timeout=60) as resp:
            apply_yaml(k8s, resp.read().decode(), namespace=NAMESPACE)
    apply_yaml(k8s, BACKEND)
    apps = client.AppsV1Api(k8s)
    for name in ("redis", "s3"):
        wait_until(f"{name} ready", lambda n=name: (apps.read_namespaced_deployment(
            n, BACKEND_NS).status.ready_replicas or 0) >= 1)
    core = client.CoreV1Api(k8s)
    body = client.V1Secret(metadata=client.V1ObjectMeta(name="chunkfs-backend"),
                           string_data=SECRET)
    try:
        core.create_namespaced_secret(NAMESPACE, body)
    except client.ApiException as exc:
        if exc.status != 409:
            raise
    import helm_python as helm

    cfg = helm.Config(kubeconfig_path=kubeconfig, namespace=NAMESPACE)
    values = {"image": {"repository": IMAGE.split(":")[0], "tag": IMAGE.split(":")[1],
                        "pullPolicy": "Never"},
              "node": {"recoverInterval": 2}}
    chart_dir = str(ROOT / "charts/chunkfs-csi")
    try:
        cfg.install(chart_dir, "chunkfs-csi", values, namespace=NAMESPACE, wait="watcher",
                    timeout=600)
    except helm.HelmError as exc:  # a kept cluster: the release exists, upgrade it
        if "re-use" not in str(exc) and "exists" not in str(exc):
            raise
        cfg.upgrade(chart_dir, "chunkfs-csi", values, namespace=NAMESPACE, wait="watcher",
                    timeout=600)
    storage = client.StorageV1Api(k8s)
    workers = [n.metadata.name for n in core.list_node().items
               if "node-role.kubernetes.io/control-plane" not in (n.metadata.labels or {})]
    for node in workers:
        wait_until(f"csi.chunkfs.io registered on {node}", lambda n=node: any(
            d.name == "csi.chunkfs.io" for d in (storage.read_csi_node(n).spec.drivers or [])))
    return {"kubeconfig": kubeconfig, "workers": ",".join(workers)}
