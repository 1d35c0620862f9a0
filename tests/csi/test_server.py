"""What the plugin process exposes (issue 10 item 6): a 0600 socket whatever the umask,
metrics on loopback unless told otherwise, and a cap on request sizes."""

from __future__ import annotations

import ipaddress
import os
import stat
import urllib.request

import grpc
import pytest

from csi.server import metrics_bind
from csi.v1 import csi_pb2
from devstack.localstack import free_port

from .conftest import mount_cap

MiB = 1 << 20


def listeners(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (from /proc/net/tcp*)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        with open(table) as f:
            next(f)
            for line in f:
                local, state = line.split()[1], line.split()[3]
                address, hexport = local.split(":")
                if state == "0A" and int(hexport, 16) == port:  # LISTEN
                    found.add(_address(address, width))
    return found


def _address(hexaddr: str, width: int) -> str:
    raw = bytes.fromhex(hexaddr)
    if width == 8:
        return ".".join(str(b) for b in raw[::-1])
    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
    return str(ipaddress.IPv6Address(b"".join(words)))


def test_metrics_address_without_a_host_is_loopback() -> None:
    assert metrics_bind(":9810") == ("127.0.0.1", 9810)
    assert metrics_bind("0.0.0.0:9810") == ("0.0.0.0", 9810)
    assert metrics_bind("[::]:9810") == ("::", 9810)
    assert metrics_bind("10.1.2.3:1") == ("10.1.2.3", 1)


def test_metrics_on_a_bare_port_listen_on_loopback_only(cluster) -> None:
    port = free_port()
    cluster.start("ctrl", "controller", extra=("--metrics-address", f":{port}"))
    assert listeners(port) == {"127.0.0.1"}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert b"chunkfs_csi_rpc" in resp.read()


def test_an_explicit_metrics_address_is_honoured(cluster) -> None:
    port = free_port()
    cluster.start("ctrl", "controller", extra=("--metrics-address", f"0.0.0.0:{port}"))
    assert listeners(port) == {"0.0.0.0"}


def test_the_socket_is_0600_whatever_the_umask(cluster) -> None:
    old = os.umask(0)  # inherited by the plugin process
    try:
        plugin = cluster.start("node-a", "all")
    finally:
        os.umask(old)
    mode = os.stat(plugin.socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert os.stat(plugin.state_dir).st_mode & 0o077 == 0  # and so is its state


def test_an_oversized_request_is_refused_and_the_plugin_keeps_serving(plugin) -> None:
    huge = csi_pb2.CreateVolumeRequest(name="pvc-1", volume_capabilities=[mount_cap()],
                                       parameters={"cache-size": "1GiB", "x": "a" * (3 * MiB)})
    with pytest.raises(grpc.RpcError) as err:
        plugin.controller.CreateVolume(huge)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # a request carrying the largest Kubernetes Secret (1 MiB) still fits
    big_secret = {"ca.crt": "c" * (MiB - 4096)}  # not a backend key: the default backend
    vol = plugin.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="pvc-1", volume_capabilities=[mount_cap()], secrets=big_secret)).volume
    assert vol.volume_id == "pvc-1"
    assert plugin.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest()).name
