"""The chart, rendered with Helm's own Go SDK (helm-python-sdk, no helm binary), and the
translation of a rendered pod's container into ``docker run`` arguments.

``render(values)`` returns the objects a ``helm install`` would create. ``docker_args``
runs one container of a rendered Deployment/DaemonSet the way kubelet would, within
what Docker accepts here: image, args (with kubelet's ``$(VAR)`` expansion), env
(fieldRefs and secretKeyRefs resolved), every volumeMount with its hostPath and
propagation (Bidirectional -> rshared, HostToContainer -> rslave), devices, user,
read-only root, capabilities and no-new-privileges. ``privileged: true`` is refused by
this sandbox; it becomes ``--cap-add SYS_ADMIN --device /dev/fuse --security-opt
apparmor=unconfined``, which is what a chunkfs mount needs of it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "chunkfs-csi"
RELEASE = "chunkfs-csi"
NAMESPACE = "kube-system"

PROPAGATION = {None: "rprivate", "None": "rprivate", "HostToContainer": "rslave",
               "Bidirectional": "rshared"}


def render(values: dict[str, Any] | None = None, *, name: str = RELEASE,
           namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """Every object of the chart rendered with ``values`` (NOTES.txt left out)."""
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values or {}, name=name, namespace=namespace, is_install=True)
    objects = []
    for path in sorted(out):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(out[path]):
            if doc:
                objects.append(doc)
    return objects


def notes(values: dict[str, Any] | None = None) -> str:
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return next(v for k, v in out.items() if k.endswith("NOTES.txt"))


def find(objects: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    matches = [o for o in objects
               if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]
    assert len(matches) == 1, f"{len(matches)} {kind} objects named *{suffix}"
    return matches[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def container(obj: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod_spec(obj)["containers"] if c["name"] == name)


# --- docker run arguments -------------------------------------------------------------

def _env(spec: dict[str, Any], fields: Mapping[str, str],
         secrets: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in spec.get("env", []):
        if "value" in item:
            env[item["name"]] = _expand(str(item["value"]), env)
            continue
        src = item["valueFrom"]
        if "fieldRef" in src:
            env[item["name"]] = fields[src["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in src:
            ref = src["secretKeyRef"]
            data = secrets.get(ref["name"], {})
            if ref["key"] in data:
                env[item["name"]] = data[ref["key"]]
            elif not ref.get("optional"):
                raise AssertionError(f"secret {ref['name']} has no key {ref['key']}")
        else:
            raise AssertionError(f"unsupported env source {src}")
    return env


def _expand(text: str, env: Mapping[str, str]) -> str:
    """kubelet's $(VAR) expansion of args and env values."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)),
                  text)


def _security(ctx: dict[str, Any], pod_ctx: dict[str, Any]) -> list[str]:
    args: list[str] = []
    if ctx.get("privileged"):
        args += ["--cap-add", "SYS_ADMIN", "--device", "/dev/fuse",
                 "--security-opt", "apparmor=unconfined"]
    caps = ctx.get("capabilities", {})
    for cap in caps.get("drop", []):
        args += ["--cap-drop", cap]
    for cap in caps.get("add", []):
        args += ["--cap-add", cap]
    if ctx.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    if ctx.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    user = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
    group = ctx.get("runAsGroup", pod_ctx.get("runAsGroup"))
    if user is not None:
        args += ["--user", f"{user}:{group if group is not None else user}"]
    if pod_ctx.get("fsGroup") is not None:
        args += ["--group-add", str(pod_ctx["fsGroup"])]
    return args


def _mounts(spec: dict[str, Any], volumes: dict[str, dict[str, Any]],
            emptydirs: Path) -> list[str]:
    args: list[str] = []
    for mount in spec.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        dst = mount["mountPath"]
        if "hostPath" in volume:
            src, kind = volume["hostPath"]["path"], volume["hostPath"].get("type", "")
            if kind == "CharDevice":
                args += ["--device", f"{src}:{dst}"]
                continue
            if kind == "DirectoryOrCreate":
                os.makedirs(src, exist_ok=True)
            assert os.path.isdir(src), f"hostPath {src} ({kind}) does not exist"
            prop = PROPAGATION[mount.get("mountPropagation")]
            ro = ",readonly" if mount.get("readOnly") else ""
            args += ["--mount", f"type=bind,src={src},dst={dst},bind-propagation={prop}{ro}"]
        elif "emptyDir" in volume:
            size = volume["emptyDir"].get("sizeLimit", "64Mi").replace("Mi", "m")
            if volume["emptyDir"].get("medium") == "Memory":
                args += ["--tmpfs", f"{dst}:rw,size={size},mode=1777"]
            else:  # a directory of its own on the host, like kubelet's
                src = emptydirs / mount["name"]
                src.mkdir(parents=True, exist_ok=True)
                src.chmod(0o777)
                args += ["--mount", f"type=bind,src={src},dst={dst}"]
        else:
            raise AssertionError(f"unsupported volume {volume}")
    return args


def _memory(spec: dict[str, Any]) -> list[str]:
    limit = spec.get("resources", {}).get("limits", {}).get("memory")
    if not limit:
        return []
    number, unit = re.fullmatch(r"([0-9]+)(Mi|Gi)", limit).groups()  # type: ignore[union-attr]
    return ["--memory", f"{number}{'m' if unit == 'Mi' else 'g'}"]


def docker_args(obj: dict[str, Any], container_name: str, *, name: str,
                fields: Mapping[str, str], secrets: Mapping[str, Mapping[str, str]],
                env_file: Path, emptydirs: Path) -> list[str]:
    """``docker run -d`` arguments for one container of a rendered pod template."""
    pod = pod_spec(obj)
    spec = container(obj, container_name)
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    env = _env(spec, fields, secrets)
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    env_file.chmod(0o600)
    args = ["--name", name, "--network", "host", "--env-file", str(env_file),
            *_security(spec.get("securityContext", {}), pod.get("securityContext", {})),
            *_mounts(spec, volumes, emptydirs), *_memory(spec)]
    if "command" in spec:
        args += ["--entrypoint", spec["command"][0]]
    args.append(spec["image"])
    args += [_expand(a, env) for a in spec.get("command", [])[1:] + spec.get("args", [])]
    return args


# --- deploy/ --------------------------------------------------------------------------

DEPLOY = ROOT / "deploy" / "chunkfs-csi.yaml"
DEPLOY_HEADER = """\
# chunkfs-csi: the manifests of a default install (helm install chunkfs-csi
# charts/chunkfs-csi --namespace kube-system), for clusters without Helm:
#   kubectl apply -f deploy/chunkfs-csi.yaml
# Generated from the chart; do not edit. Regenerate with:
#   .venv/bin/python -m tests.container.chart
# (tests/container/test_deploy.py fails when this file and the chart differ.)
# Create the backend Secret first: deploy/examples/secret.yaml.
"""


def default_manifests() -> str:
    """The chart's default install as one multi-document YAML, like `helm template`."""
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render({}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    parts = [DEPLOY_HEADER]
    for path in sorted(out):
        text = out[path].strip()
        if path.endswith("NOTES.txt") or not text:
            continue
        for doc in (d.strip() for d in text.split("\n---")):
            if doc and yaml.safe_load(doc):
                parts.append(f"---\n# Source: {path}\n{doc}\n")
    return "".join(parts)


if __name__ == "__main__":
    DEPLOY.parent.mkdir(exist_ok=True)
    DEPLOY.write_text(default_manifests())
    print(f"wrote {DEPLOY.relative_to(ROOT)}")


def values_table() -> str:
    """The README's values table: every documented key of values.yaml, its default and
    its comment (tests/container/test_deploy.py keeps the README's copy in step)."""
    rows = ["| key | default | description |", "| --- | --- | --- |"]
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    stack: list[tuple[int, str]] = []
    comment: list[str] = []
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip().removeprefix("-- "))
            continue
        if not stripped or stripped.startswith("-") or ":" not in stripped:
            comment = [] if not stripped else comment
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = stripped.split(":")[0]
        path = [k for _, k in stack] + [key]
        stack.append((indent, key))
        if comment:
            value: Any = defaults
            for k in path:
                value = value[k]
            shown = json.dumps(value) if not isinstance(value, str) else (value or '""')
            text = " ".join(comment).replace("|", "\\|")
            rows.append(f"| `{'.'.join(path)}` | `{shown}` | {text} |")
        comment = []
    return "\n".join(rows) + "\n"
