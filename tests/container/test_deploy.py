"""deploy/: the rendered default install stays the chart's, and the examples are valid
Kubernetes objects that fit the driver (no Docker needed)."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.container import chart

EXAMPLES = sorted((chart.ROOT / "deploy" / "examples").glob("*.yaml"))
SNAPSHOT_KINDS = {"VolumeSnapshot", "VolumeSnapshotClass"}


def test_the_rendered_manifests_are_the_charts_default_install():
    assert chart.DEPLOY.read_text() == chart.default_manifests(), (
        "deploy/chunkfs-csi.yaml is out of date: run .venv/bin/python -m tests.container.chart")


def test_the_rendered_manifests_are_the_objects_helm_would_install():
    docs = [d for d in yaml.safe_load_all(chart.DEPLOY.read_text()) if d]
    assert docs == chart.render()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_a_valid_object_for_the_driver(path: Path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        if doc["kind"] in SNAPSHOT_KINDS:
            assert doc["apiVersion"] == "snapshot.storage.k8s.io/v1"
        else:
            kubernetes_validate.validate(doc, "1.30.0", strict=True)
        if doc["kind"] in ("StorageClass", "VolumeSnapshotClass"):
            assert doc.get("provisioner", doc.get("driver")) == "csi.chunkfs.io"
            assert all(k == "cache-size" or k.startswith("csi.storage.k8s.io/")
                       for k in doc.get("parameters", {}))
        if doc["kind"] == "StorageClass":
            assert {"nosuid", "nodev"} <= set(doc["mountOptions"])
        if doc["kind"] == "PersistentVolumeClaim":
            assert doc["spec"]["storageClassName"] == "chunkfs"
        pod = doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else (
            doc["spec"] if doc["kind"] == "Pod" else None)
        if pod is not None:
            for c in pod["containers"]:
                for m in c["volumeMounts"]:
                    assert m["mountPropagation"] == "HostToContainer", (path.name, m)


def test_the_examples_cover_what_the_readme_promises():
    kinds = {}
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            kinds.setdefault(doc["kind"], []).append(doc)
    assert {"Secret", "StorageClass", "PersistentVolumeClaim", "Pod", "VolumeSnapshotClass",
            "VolumeSnapshot", "Deployment"} <= set(kinds)
    sources = {(d["spec"].get("dataSource") or {}).get("kind") for d in kinds["PersistentVolumeClaim"]}
    assert {"VolumeSnapshot", "PersistentVolumeClaim"} <= sources
    assert any("ReadWriteMany" in d["spec"]["accessModes"] for d in kinds["PersistentVolumeClaim"])
    secret = kinds["Secret"][0]["stringData"]
    assert set(secret) == {"meta-url", "storage", "endpoint", "region", "access-key-id",
                           "secret-access-key"}


def test_the_readme_lists_every_value_of_the_chart():
    readme = (chart.ROOT / "README.md").read_text()
    assert chart.values_table() in readme, (
        "the README's values table differs from charts/chunkfs-csi/values.yaml: replace it "
        "with the output of tests.container.chart.values_table()")
