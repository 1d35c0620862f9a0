"""chunkfs-csi on a kind cluster (one control plane, two workers), end to end.

    .venv/bin/python -m pytest tests/e2e     # Docker + kind + network; skipped otherwise

In order: a PVC and a pod write data; the node is cordoned and the pod deleted; it comes
back on the other worker and reads the same data. The node plugin DaemonSet is rolled
while a pod writes and fsyncs: no I/O error. A VolumeSnapshot and a PVC restored from
it; a clone; online expansion; an RWX volume written from pods on both workers. At the
end everything is deleted and GC empties the bucket of blocks.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from tests.e2e.conftest import APP_NS, NAMESPACE, SECRET, wait_until

pytestmark = pytest.mark.timeout(1800)
BUSYBOX = "busybox:1.36"


@pytest.fixture(scope="module")
def api(installed: dict[str, str], k8s: Any) -> Any:
    from kubernetes import client

    class Api:
        core = client.CoreV1Api(k8s)
        apps = client.AppsV1Api(k8s)
        batch = client.BatchV1Api(k8s)
        custom = client.CustomObjectsApi(k8s)
        workers = installed["workers"].split(",")
    return Api


def pvc(name: str, size: str = "1Gi", mode: str = "ReadWriteOnce",
        source: dict | None = None) -> dict:
    spec: dict[str, Any] = {"accessModes": [mode], "storageClassName": "chunkfs",
                            "resources": {"requests": {"storage": size}}}
    if source:
        spec["dataSource"] = source
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name}, "spec": spec}


def pod(name: str, claim: str, script: str, node: str | None = None) -> dict:
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                            "fsGroupChangePolicy": "OnRootMismatch"},
        "containers": [{"name": "app", "image": BUSYBOX, "command": ["sh", "-c", script],
                        "volumeMounts": [{"name": "v", "mountPath": "/data",
                                          "mountPropagation": "HostToContainer"}]}],
        "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": claim}}]}
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def create(api: Any, obj: dict) -> None:
    if obj["kind"] == "PersistentVolumeClaim":
        api.core.create_namespaced_persistent_volume_claim(APP_NS, obj)
    elif obj["kind"] == "Pod":
        api.core.create_namespaced_pod(APP_NS, obj)
    elif obj["kind"] == "VolumeSnapshot":
        api.custom.create_namespaced_custom_object("snapshot.storage.k8s.io", "v1", APP_NS,
                                                   "volumesnapshots", obj)


def phase(api: Any, name: str) -> str:
    return api.core.read_namespaced_pod(name, APP_NS).status.phase


def run_pod(api: Any, name: str, claim: str, script: str, node: str | None = None,
            timeout: float = 300) -> str:
    """Run a pod to completion; its log."""
    create(api, pod(name, claim, script, node))
    wait_until(f"pod {name} done", lambda: phase(api, name) in ("Succeeded", "Failed"),
               timeout)
    log = api.core.read_namespaced_pod_log(name, APP_NS)
    assert phase(api, name) == "Succeeded", log
    api.core.delete_namespaced_pod(name, APP_NS, grace_period_seconds=0)
    wait_until(f"pod {name} gone", lambda: name not in [
        p.metadata.name for p in api.core.list_namespaced_pod(APP_NS).items])
    return log


def bound(api: Any, name: str) -> bool:
    return api.core.read_namespaced_persistent_volume_claim(name, APP_NS).status.phase == "Bound"


WRITE = "dd if=/dev/urandom of=/data/blob bs=1M count=8 && sync && md5sum /data/blob"
READ = "md5sum /data/blob"


def test_a_volume_follows_its_pod_to_another_node(api):
    create(api, pvc("moving"))
    wait_until("moving bound", lambda: bound(api, "moving"))
    first, second = api.workers[:2]
    written = run_pod(api, "writer", "moving", WRITE, node=first).split()[0]
    api.core.patch_node(first, {"spec": {"unschedulable": True}})
    try:
        create(api, pod("reader", "moving", READ + " && sleep 1"))
        wait_until("reader done", lambda: phase(api, "reader") in ("Succeeded", "Failed"))
        placed = api.core.read_namespaced_pod("reader", APP_NS).spec.node_name
        assert placed == second
        assert api.core.read_namespaced_pod_log("reader", APP_NS).split()[0] == written
        api.core.delete_namespaced_pod("reader", APP_NS, grace_period_seconds=0)
    finally:
        api.core.patch_node(first, {"spec": {"unschedulable": False}})


def test_rolling_the_node_plugin_does_not_break_a_writer(api):
    create(api, pvc("rolling"))
    wait_until("rolling bound", lambda: bound(api, "rolling"))
    script = ("i=0; while [ ! -e /data/stop ]; do echo $i >> /data/log || exit 7; "
              "sync /data/log || exit 8; i=$((i+1)); sleep 0.1; done; wc -l < /data/log")
    create(api, pod("roller", "rolling", script, node=api.workers[0]))
    wait_until("roller running", lambda: phase(api, "roller") == "Running")
    ds = api.apps.read_namespaced_daemon_set("chunkfs-csi-node", NAMESPACE)
    generation = ds.metadata.generation
    api.apps.patch_namespaced_daemon_set("chunkfs-csi-node", NAMESPACE, {"spec": {"template": {
        "metadata": {"annotations": {"e2e/restarted": str(time.time())}}}}})

    def rolled() -> bool:
        d = api.apps.read_namespaced_daemon_set("chunkfs-csi-node", NAMESPACE)
        s = d.status
        return (d.metadata.generation > generation and s.observed_generation >= d.metadata.generation
                and s.updated_number_scheduled == s.desired_number_scheduled
                and s.number_ready == s.desired_number_scheduled)

    wait_until("the node DaemonSet rolled", rolled, timeout=600)
    assert phase(api, "roller") == "Running", api.core.read_namespaced_pod_log("roller", APP_NS)
    run_pod(api, "stopper", "rolling", "touch /data/stop", node=api.workers[0])
    wait_until("roller done", lambda: phase(api, "roller") in ("Succeeded", "Failed"))
    assert phase(api, "roller") == "Succeeded", "the writer saw an I/O error during the roll"
    assert int(api.core.read_namespaced_pod_log("roller", APP_NS).split()[-1]) > 10


def test_snapshot_restore_and_clone(api):
    create(api, pvc("origin"))
    wait_until("origin bound", lambda: bound(api, "origin"))
    written = run_pod(api, "origin-writer", "origin", WRITE).split()[0]
    create(api, {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
                 "metadata": {"name": "origin-snap"},
                 "spec": {"volumeSnapshotClassName": "chunkfs",
                          "source": {"persistentVolumeClaimName": "origin"}}})
    wait_until("snapshot ready", lambda: (api.custom.get_namespaced_custom_object(
        "snapshot.storage.k8s.io", "v1", APP_NS, "volumesnapshots", "origin-snap")
        .get("status") or {}).get("readyToUse"))
    create(api, pvc("restored", source={"apiGroup": "snapshot.storage.k8s.io",
                                        "kind": "VolumeSnapshot", "name": "origin-snap"}))
    create(api, pvc("cloned", source={"kind": "PersistentVolumeClaim", "name": "origin"}))
    for name in ("restored", "cloned"):
        wait_until(f"{name} bound", lambda n=name: bound(api, n))
        assert run_pod(api, f"{name}-reader", name, READ).split()[0] == written


def test_online_expansion(api):
    create(api, pvc("growing", size="1Gi"))
    wait_until("growing bound", lambda: bound(api, "growing"))
    script = ("while [ ! -e /data/stop ]; do df -k /data | tail -1 > /data/df.tmp && "
              "mv /data/df.tmp /data/df; sleep 1; done")
    create(api, pod("grower", "growing", script))
    wait_until("grower running", lambda: phase(api, "grower") == "Running")
    api.core.patch_namespaced_persistent_volume_claim(
        "growing", APP_NS, {"spec": {"resources": {"requests": {"storage": "3Gi"}}}})
    wait_until("capacity 3Gi", lambda: api.core.read_namespaced_persistent_volume_claim(
        "growing", APP_NS).status.capacity["storage"] == "3Gi")
    log = run_pod(api, "df-reader", "growing", "sleep 3; cat /data/df; touch /data/stop")
    assert int(log.split()[1]) >= 3 * 1024 * 1024 - 1024


def test_rwx_from_both_nodes(api):
    create(api, pvc("shared", mode="ReadWriteMany"))
    wait_until("shared bound", lambda: bound(api, "shared"))
    names = []
    for i, node in enumerate(api.workers[:2]):
        name = f"rwx-{i}"
        names.append(name)
        create(api, pod(name, "shared", f"echo {node} > /data/{name}; "
                        "for t in $(seq 60); do [ $(ls /data | grep -c rwx-) -ge 2 ] && break; "
                        "sleep 1; done; cat /data/rwx-0 /data/rwx-1", node=node))
    for name in names:
        wait_until(f"{name} done", lambda n=name: phase(api, n) in ("Succeeded", "Failed"))
        assert phase(api, name) == "Succeeded"
        assert api.core.read_namespaced_pod_log(name, APP_NS).split() == api.workers[:2]


def test_deleting_everything_lets_gc_empty_the_bucket(api):
    for p in api.core.list_namespaced_pod(APP_NS).items:
        api.core.delete_namespaced_pod(p.metadata.name, APP_NS, grace_period_seconds=0)
    api.custom.delete_collection_namespaced_custom_object(
        "snapshot.storage.k8s.io", "v1", APP_NS, "volumesnapshots")
    for c in api.core.list_namespaced_persistent_volume_claim(APP_NS).items:
        api.core.delete_namespaced_persistent_volume_claim(c.metadata.name, APP_NS)
    wait_until("no chunkfs PVs left", lambda: not [
        v for v in api.core.list_persistent_volume().items
        if v.spec.csi and v.spec.csi.driver == "csi.chunkfs.io"], timeout=600)
    job = f"gc-{uuid.uuid4().hex[:6]}"
    env = [{"name": k, "valueFrom": {"secretKeyRef": {"name": "chunkfs-backend", "key": key}}}
           for k, key in (("CHUNKFS_META", "meta-url"), ("CHUNKFS_STORAGE", "storage"),
                          ("AWS_ENDPOINT_URL", "endpoint"), ("AWS_REGION", "region"),
                          ("AWS_ACCESS_KEY_ID", "access-key-id"),
                          ("AWS_SECRET_ACCESS_KEY", "secret-access-key"))]
    count = ("import botocore.session as s, os; c = s.get_session().create_client('s3', "
             "endpoint_url=os.environ['AWS_ENDPOINT_URL']); "
             "b, p = os.environ['CHUNKFS_STORAGE'][5:].split('/', 1); "
             "r = c.list_objects_v2(Bucket=b, Prefix=p + '/blocks/'); print('blocks', r.get('KeyCount', 0))")
    api.batch.create_namespaced_job(NAMESPACE, {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": job},
        "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "gc", "image": "chunkfs-csi:e2e", "imagePullPolicy": "Never",
                            "command": ["sh", "-c", "chunkfs gc --grace 0 && python3 -c \""
                                        + count + "\""], "env": env}]}}}})
    wait_until("gc job done", lambda: (api.batch.read_namespaced_job(job, NAMESPACE).status
                                       .succeeded or 0) >= 1, timeout=600)
    pods = api.core.list_namespaced_pod(NAMESPACE, label_selector=f"job-name={job}").items
    log = api.core.read_namespaced_pod_log(pods[0].metadata.name, NAMESPACE)
    assert "blocks 0" in log, log
    assert SECRET["secret-access-key"] not in log
