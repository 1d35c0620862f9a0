"""The Helm chart: it lints, renders, validates against the Kubernetes API schemas and
holds the invariants that make it safe (no Docker needed: Helm's Go SDK renders it).
"""

from __future__ import annotations

import json

import kubernetes_validate
import pytest

from csi.server import parse_args
from tests.container import chart

KUBE_VERSIONS = ("1.26.0", "1.30.0", "1.33.0")
OVERRIDES = {
    "defaults": {},
    "podIP metrics + ServiceMonitor": {
        "metrics": {"expose": "podIP", "serviceMonitor": {"enabled": True,
                                                          "labels": {"release": "prom"}}}},
    "no mounter, one controller": {"mounter": {"enabled": False},
                                   "controller": {"replicas": 1}},
    "custom paths and classes": {
        "kubeletDir": "/data/kubelet", "driverName": "csi.example.org",
        "node": {"cache": {"hostPath": "/mnt/nvme/chunkfs", "size": "50GiB"}},
        "storageClass": {"name": "fast", "isDefault": True, "cacheSize": "20GiB",
                         "mountOptions": ["noatime", "buffer-size=512MiB"],
                         "volumeBindingMode": "WaitForFirstConsumer"},
        "volumeSnapshotClass": {"name": "fast", "isDefault": True},
        "rbac": {"secretNamespaces": ["tenant-a", "tenant-b"]},
        "imagePullSecrets": [{"name": "regcred"}]},
    "metrics off, no snapshots": {"metrics": {"expose": "none"},
                                  "volumeSnapshotClass": {"create": False},
                                  "controller": {"sidecars": {"snapshotter": {
                                      "enabled": False}}}},
}
CRD_KINDS = {"VolumeSnapshotClass", "ServiceMonitor"}
BACKEND_ENV = {"CHUNKFS_META", "CHUNKFS_STORAGE", "AWS_ENDPOINT_URL", "AWS_REGION",
               "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


@pytest.fixture(scope="module", params=list(OVERRIDES), ids=list(OVERRIDES))
def rendered(request: pytest.FixtureRequest) -> tuple[dict, list[dict]]:
    values = OVERRIDES[request.param]
    return values, chart.render(values)


def containers(objects: list[dict]) -> list[tuple[str, dict, dict]]:
    """(workload name, pod spec, container) of every container of every workload."""
    out = []
    for obj in objects:
        if obj["kind"] in ("Deployment", "DaemonSet"):
            pod = chart.pod_spec(obj)
            out += [(obj["metadata"]["name"], pod, c) for c in pod["containers"]]
    return out


def test_chart_lints_clean_for_defaults_and_overrides():
    import helm_python as helm

    for name, values in OVERRIDES.items():
        report = helm.lint(str(chart.CHART), values, strict=True, kube_version="v1.30.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not report["errors"] and not problems, (name, report)


def test_every_rendered_object_validates_against_the_kubernetes_schemas(rendered):
    _, objects = rendered
    kinds = {o["kind"] for o in objects}
    assert {"CSIDriver", "Deployment", "DaemonSet", "StorageClass", "ClusterRole"} <= kinds
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            assert obj["apiVersion"] in ("snapshot.storage.k8s.io/v1", "monitoring.coreos.com/v1")
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_csidriver_fences_through_attach_and_supports_fsgroup():
    driver = chart.find(chart.render(), "CSIDriver")
    assert driver["metadata"]["name"] == "csi.chunkfs.io"
    spec = driver["spec"]
    assert spec["attachRequired"] is True and spec["podInfoOnMount"] is True
    assert spec["fsGroupPolicy"] == "File" and spec["volumeLifecycleModes"] == ["Persistent"]


def test_controller_runs_every_sidecar_with_leader_election():
    deploy = chart.find(chart.render(), "Deployment", "-controller")
    names = [c["name"] for c in chart.pod_spec(deploy)["containers"]]
    assert names == ["chunkfs-csi", "csi-provisioner", "csi-attacher", "csi-resizer",
                     "csi-snapshotter", "liveness-probe"]
    assert deploy["spec"]["replicas"] == 2
    for c in chart.pod_spec(deploy)["containers"]:
        assert "--csi-address=/csi/csi.sock" in c["args"] or c["name"] == "chunkfs-csi"
        if c["name"].startswith("csi-"):
            assert "--leader-election" in c["args"], c["name"]
    pod = chart.pod_spec(deploy)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0


def test_the_controller_collects_garbage_with_a_disk_of_its_own_unless_turned_off():
    deploy = chart.find(chart.render(), "Deployment", "-controller")
    plugin = chart.container(deploy, "chunkfs-csi")
    args = parse_args(plugin["args"])
    assert (args.gc_interval, args.gc_grace, args.gc_dry_run) == (3600, 3600, False)
    mounts = {m["name"]: m["mountPath"] for m in plugin["volumeMounts"]}
    assert mounts["gc-work"] == args.gc_work_dir  # not /tmp: a small memory-backed dir
    work = next(v for v in chart.pod_spec(deploy)["volumes"] if v["name"] == "gc-work")
    assert work["emptyDir"] == {"sizeLimit": "2Gi"}
    dry = chart.find(chart.render({"controller": {"gc": {"dryRun": True, "interval": 600}}}),
                     "Deployment", "-controller")
    args = parse_args(chart.container(dry, "chunkfs-csi")["args"])
    assert args.gc_dry_run and args.gc_interval == 600
    off = chart.find(chart.render({"controller": {"gc": {"enabled": False}}}),
                     "Deployment", "-controller")
    assert parse_args(chart.container(off, "chunkfs-csi")["args"]).gc_interval == 0
    assert "gc-work" not in {v["name"] for v in chart.pod_spec(off)["volumes"]}


def test_the_controller_backs_volumes_up_every_hour_keeping_24_unless_told_otherwise():
    deploy = chart.find(chart.render(), "Deployment", "-controller")
    args = parse_args(chart.container(deploy, "chunkfs-csi")["args"])
    assert (args.backup_interval, args.backup_keep) == (3600, 24)
    tuned = chart.find(chart.render({"controller": {"backup": {"interval": 600, "keep": 3}}}),
                       "Deployment", "-controller")
    args = parse_args(chart.container(tuned, "chunkfs-csi")["args"])
    assert (args.backup_interval, args.backup_keep) == (600, 3)
    off = chart.find(chart.render({"controller": {"backup": {"interval": 0}}}),
                     "Deployment", "-controller")
    assert parse_args(chart.container(off, "chunkfs-csi")["args"]).backup_interval == 0


def test_node_plugin_and_mounter_have_what_mounts_need():
    objects = chart.render()
    node = chart.find(objects, "DaemonSet", "-node")
    mounter = chart.find(objects, "DaemonSet", "-mounter")
    assert [c["name"] for c in chart.pod_spec(node)["containers"]] == [
        "chunkfs-csi", "node-driver-registrar", "liveness-probe"]
    for ds in (node, mounter):
        pod = chart.pod_spec(ds)
        assert pod["tolerations"] == [{"operator": "Exists"}]
        assert pod["priorityClassName"] == "system-node-critical"
        assert pod["automountServiceAccountToken"] is False
        main = pod["containers"][0]
        kubelet = next(m for m in main["volumeMounts"] if m["name"] == "kubelet-dir")
        assert kubelet["mountPath"] == "/var/lib/kubelet"
        assert kubelet["mountPropagation"] == "Bidirectional"
        assert main["securityContext"]["privileged"] is True
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["state-dir"]["hostPath"]["path"] == "/var/lib/chunkfs-csi/state"
    mounter_pod = chart.pod_spec(mounter)
    volumes = {v["name"]: v for v in mounter_pod["volumes"]}
    assert volumes["fuse"]["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    assert volumes["cache-dir"]["hostPath"]["path"] == "/var/lib/chunkfs-csi/cache"
    # what keeps the mounts alive: nothing restarts the mounter on its own
    assert mounter["spec"]["updateStrategy"] == {"type": "OnDelete"}
    assert "livenessProbe" not in mounter_pod["containers"][0]
    assert mounter_pod["terminationGracePeriodSeconds"] > 120
    plugin_args = chart.container(node, "chunkfs-csi")["args"]
    assert "--mounter-socket=/run/chunkfs-mounter/mounter.sock" in plugin_args
    assert "--cache-size=10GiB" in plugin_args
    pdbs = {p["metadata"]["name"]: p["spec"] for p in objects
            if p["kind"] == "PodDisruptionBudget"}
    assert pdbs["chunkfs-csi-mounter"]["maxUnavailable"] == 0


def test_without_the_mounter_the_node_plugin_mounts_itself():
    objects = chart.render({"mounter": {"enabled": False}})
    assert not [o for o in objects if o["metadata"]["name"].endswith("-mounter")]
    node = chart.find(objects, "DaemonSet", "-node")
    volumes = {v["name"] for v in chart.pod_spec(node)["volumes"]}
    assert {"fuse", "cache-dir"} <= volumes and "mounter-dir" not in volumes
    assert not any(a.startswith("--mounter-socket")
                   for a in chart.container(node, "chunkfs-csi")["args"])
    assert "mounter.enabled=false" in chart.notes({"mounter": {"enabled": False}})


def test_the_plugin_accepts_every_flag_the_chart_passes(rendered):
    _, objects = rendered
    for workload, _, c in containers(objects):
        if c["name"] in ("chunkfs-csi", "mounter"):
            args = [a.replace("$(NODE_ID)", "n").replace("$(POD_IP)", "10.0.0.1")
                    for a in c["args"]]
            parsed = parse_args(args)  # SystemExit (a test error) on an unknown flag
            assert parsed.role in ("controller", "node", "mounter"), workload


def test_only_the_mounting_containers_are_privileged_and_the_rest_is_locked_down(rendered):
    _, objects = rendered
    for workload, pod, c in containers(objects):
        ctx = c.get("securityContext", {})
        if c["name"] in ("chunkfs-csi", "mounter") and not workload.endswith("-controller"):
            assert ctx["privileged"] is True
            continue
        assert not ctx.get("privileged"), (workload, c["name"])
        assert ctx["allowPrivilegeEscalation"] is False, (workload, c["name"])
        assert ctx["readOnlyRootFilesystem"] is True, (workload, c["name"])
        assert ctx["capabilities"] == {"drop": ["ALL"]}, (workload, c["name"])
        for mount in c.get("volumeMounts", []):
            assert mount.get("mountPropagation") in (None, "None"), (workload, mount)
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"


def test_no_credential_is_inline_anywhere(rendered):
    _, objects = rendered
    assert not [o for o in objects if o["kind"] == "Secret"]
    for workload, _, c in containers(objects):
        for env in c.get("env", []):
            if env["name"] in BACKEND_ENV:
                ref = env["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "chunkfs-backend" and ref["optional"] is True
            assert "value" not in env, (workload, env)
        assert not any("key" in a.lower() or "password" in a.lower() for a in c["args"])
    for obj in objects:
        if obj["kind"] in ("StorageClass", "VolumeSnapshotClass"):
            params = obj["parameters"]
            refs = {k: v for k, v in params.items() if k.startswith("csi.storage.k8s.io/")}
            assert set(params) - set(refs) <= {"cache-size"}
            assert all(k.endswith(("-secret-name", "-secret-namespace")) for k in refs)


def test_storage_and_snapshot_classes_name_the_backend_secret_for_every_call():
    objects = chart.render({"storageClass": {"mountOptions": ["noatime", "nosuid"]}})
    sc = chart.find(objects, "StorageClass")
    for kind in ("provisioner", "controller-publish", "node-stage", "controller-expand"):
        assert sc["parameters"][f"csi.storage.k8s.io/{kind}-secret-name"] == "chunkfs-backend"
        assert sc["parameters"][f"csi.storage.k8s.io/{kind}-secret-namespace"] == "kube-system"
    assert sc["mountOptions"] == ["nosuid", "nodev", "noatime"]
    assert sc["allowVolumeExpansion"] is True and sc["provisioner"] == "csi.chunkfs.io"
    vsc = chart.find(objects, "VolumeSnapshotClass")
    assert vsc["driver"] == "csi.chunkfs.io"
    assert vsc["parameters"]["csi.storage.k8s.io/snapshotter-secret-name"] == "chunkfs-backend"


def test_rbac_is_least_privilege(rendered):
    values, objects = rendered
    for role in (o for o in objects if o["kind"] in ("ClusterRole", "Role")):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
            if "secrets" in rule["resources"]:
                assert role["kind"] == "Role" and rule["verbs"] == ["get"], role
            if "pods" in rule["resources"]:
                assert set(rule["verbs"]) <= {"get", "list", "watch"}
    cluster_role = chart.find(objects, "ClusterRole")
    assert not [r for r in cluster_role["rules"] if "secrets" in r["resources"]]
    secret_roles = sorted(o["metadata"]["namespace"] for o in objects
                          if o["kind"] == "Role" and o["metadata"]["name"].endswith("-secrets"))
    assert secret_roles == sorted({"kube-system", *values.get("rbac", {}).get(
        "secretNamespaces", [])})
    bound = {s["name"] for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")
             for s in o["subjects"]}
    assert bound == {"chunkfs-csi-controller"}  # the node side talks to no API at all


def test_metrics_listen_on_loopback_unless_the_pod_ip_is_chosen():
    default = chart.render()
    for _, _, c in containers(default):
        for arg in c.get("args", []):
            if arg.startswith("--metrics-address="):
                assert arg.split("=", 1)[1].startswith("127.0.0.1:")
    assert not [o for o in default if o["kind"] in ("Service", "ServiceMonitor")]
    opened = chart.render({"metrics": {"expose": "podIP", "serviceMonitor": {"enabled": True}}})
    services = [o for o in opened if o["kind"] == "Service"]
    assert len(services) == 2 and chart.find(opened, "ServiceMonitor")
    node = chart.find(opened, "DaemonSet", "-node")
    assert "--metrics-address=$(POD_IP):9810" in chart.container(node, "chunkfs-csi")["args"]


def test_pod_disruption_budgets_follow_the_replicas():
    many = {o["metadata"]["name"] for o in chart.render() if o["kind"] == "PodDisruptionBudget"}
    assert many == {"chunkfs-csi-controller", "chunkfs-csi-node", "chunkfs-csi-mounter"}
    one = {o["metadata"]["name"] for o in chart.render({"controller": {"replicas": 1}})
           if o["kind"] == "PodDisruptionBudget"}
    assert "chunkfs-csi-controller" not in one


@pytest.mark.parametrize(("values", "message"), [
    ({"controller": {"replicas": 0}}, "/controller/replicas"),
    ({"metrics": {"expose": "public"}}, "value must be one of"),
    ({"node": {"cache": {"size": "lots"}}}, "/node/cache/size"),
    ({"kubeletDir": "var/lib/kubelet"}, "/kubeletDir"),
    ({"backend": {"secretName": ""}}, "/backend/secretName"),
    ({"backend": {"secretName": "s", "accessKeyId": "AKIA"}}, "accessKeyId"),
    ({"csiDriver": {"fsGroupPolicy": "Always"}}, "/csiDriver/fsGroupPolicy"),
    ({"storageClass": {"reclaimPolicy": "Keep"}}, "/storageClass/reclaimPolicy"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"node": {"recoverInterval": 0}}, "/node/recoverInterval"),
    ({"mounter": {"grace": 5}}, "/mounter/grace"),
    ({"controller": {"gc": {"interval": 0}}}, "/controller/gc/interval"),
    ({"controller": {"gc": {"workDirSizeLimit": "lots"}}}, "/controller/gc/workDirSizeLimit"),
    ({"controller": {"backup": {"keep": 0}}}, "/controller/backup/keep"),
    ({"controller": {"backup": {"interval": -1}}}, "/controller/backup/interval"),
    ({"colour": "blue"}, "additional properties 'colour' not allowed"),
    ({"storageClass": {"mountOptions": ["suid"]}}, "suid and dev would let pods"),
    ({"storageClass": {"mountOptions": ["epoch=3"]}}, "epoch= is set by the controller"),
])
def test_bad_values_are_refused_with_a_message_naming_them(values, message):
    import helm_python as helm

    with pytest.raises(helm.HelmError) as err:
        chart.render(values)
    assert message in str(err.value)


def test_every_value_is_documented_and_in_the_schema():
    values_text = (chart.CHART / "values.yaml").read_text()
    schema = json.loads((chart.CHART / "values.schema.json").read_text())
    import yaml

    def walk(node: dict, schema_node: dict, path: str) -> None:
        props = schema_node.get("properties", {})
        for key, value in node.items():
            assert key in props, f"{path}{key} is not in values.schema.json"
            if isinstance(value, dict) and props[key].get("properties"):
                walk(value, props[key], f"{path}{key}.")

    walk(yaml.safe_load(values_text), schema, "")
    # every key has a comment line above it, except inside values that are data
    # (resources, updateStrategy: documented as a whole)
    opaque_indent: int | None = None
    lines = values_text.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if opaque_indent is not None:
            if not stripped or indent > opaque_indent:
                continue
            opaque_indent = None
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        key = stripped.split(":")[0]
        if key in ("resources", "updateStrategy"):
            opaque_indent = indent
        if stripped.endswith(":") and key not in ("resources", "updateStrategy"):
            continue  # a group of keys, each commented
        assert lines[i - 1].strip().startswith("#"), f"values.yaml line {i + 1} has no comment"


def test_notes_tell_what_to_do_next():
    text = chart.notes()
    assert "kubectl -n kube-system get secret chunkfs-backend" in text
    assert "storageClassName: chunkfs" in text and "HostToContainer" in text
