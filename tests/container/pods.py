"""The chart's pods as Docker containers, and a CSI client that plays kubelet / sidecars.

``ChartPods`` renders the chart for a ``NodeHost`` and starts the controller, node plugin
and mounter containers from the rendered Deployment/DaemonSets (``chart.docker_args``),
with the backend Secret resolved the way kubelet resolves ``secretKeyRef``s.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import grpc

from csi.v1 import csi_pb2, csi_pb2_grpc
from tests.container import chart
from tests.container.engine import DockerEngine

NODE_NAME = "node-a"


class Csi:
    """Stubs over one plugin socket."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)

    def close(self) -> None:
        self.channel.close()


class ChartPods:
    def __init__(self, docker: DockerEngine, host: Any, secret: dict[str, str],
                 values: dict[str, Any] | None = None) -> None:
        self.docker = docker
        self.host = host
        self.secrets = {host.values()["backend"]["secretName"]: secret}
        self.values = values or host.values()
        self.objects = chart.render(self.values)
        self.scratch = Path(host.root) / "pods"
        self.scratch.mkdir(exist_ok=True)
        self.prefix = uuid.uuid4().hex[:6]
        self.started: list[str] = []

    def close(self) -> None:
        """Remove every container this set started (by ID), the newest first."""
        for cid in reversed(self.started):
            self.docker.remove(cid)
        self.started.clear()

    def _start(self, kind: str, suffix: str, container: str, name: str,
               image: str | None = None) -> str:
        obj = chart.find(self.objects, kind, suffix)
        work = self.scratch / name
        work.mkdir(exist_ok=True)
        fields = {"spec.nodeName": NODE_NAME, "status.podIP": "127.0.0.1",
                  "metadata.namespace": chart.NAMESPACE}
        args = chart.docker_args(obj, container, name=f"{name}-{self.prefix}", fields=fields,
                                 secrets=self.secrets, env_file=work / "env",
                                 emptydirs=work / "emptydir")
        if image is not None:  # an upgrade: the same spec with another image
            spec_image = chart.container(obj, container)["image"]
            args[args.index(spec_image)] = image
        cid = self.docker.run(args)
        self.started.append(cid)
        return cid

    def emptydir(self, name: str, volume: str) -> Path:
        return self.scratch / name / "emptydir" / volume

    def start_controller(self, name: str = "controller") -> tuple[str, Csi]:
        cid = self._start("Deployment", "-controller", "chunkfs-csi", name)
        return cid, self.wait_csi(cid, self.emptydir(name, "socket-dir") / "csi.sock")

    def start_node(self, name: str = "node", image: str | None = None) -> tuple[str, Csi]:
        cid = self._start("DaemonSet", "-node", "chunkfs-csi", name, image)
        return cid, self.wait_csi(cid, self.host.plugin_socket)

    def start_mounter(self, name: str = "mounter") -> str:
        cid = self._start("DaemonSet", "-mounter", "mounter", name)
        socket = Path(self.host.root) / "mounter" / "mounter.sock"
        self.wait_for(cid, socket.exists, f"the mounter socket {socket}")
        return cid

    def wait_for(self, cid: str, ready: Any, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.docker.running(cid):
                raise AssertionError(f"container exited before {what}:\n"
                                     + self.docker.logs(cid))
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout}s:\n" + self.docker.logs(cid))
            time.sleep(0.1)

    def wait_gone(self, cid: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.docker.running(cid):
            assert time.monotonic() < deadline, f"container {cid[:12]} still runs"
            time.sleep(0.05)

    def wait_csi(self, cid: str, socket: Path, timeout: float = 60.0) -> Csi:
        self.wait_for(cid, socket.exists, f"socket {socket}", timeout)
        csi = Csi(socket)

        def answers() -> bool:
            try:
                csi.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=2)
                return True
            except grpc.RpcError:
                return False

        self.wait_for(cid, answers, f"GetPluginInfo on {socket}", timeout)
        return csi
