"""Identity service conformance, through a real channel to a real plugin process."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest

from csi.v1 import csi_pb2

Service = csi_pb2.PluginCapability.Service
Expansion = csi_pb2.PluginCapability.VolumeExpansion


def test_plugin_info_names_the_driver(plugin) -> None:
    info = plugin.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "csi.chunkfs.io"
    assert info.vendor_version


def test_capabilities_controller_service_and_online_expansion(plugin) -> None:
    caps = plugin.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    services = {c.service.type for c in caps.capabilities if c.HasField("service")}
    expansion = {c.volume_expansion.type for c in caps.capabilities
                 if c.HasField("volume_expansion")}
    assert services == {Service.CONTROLLER_SERVICE}
    assert expansion == {Expansion.ONLINE}


def test_node_only_plugin_does_not_offer_the_controller_service(cluster) -> None:
    node = cluster.start("node-b", "node")
    caps = node.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    assert not [c for c in caps.capabilities if c.HasField("service")]
    with pytest.raises(grpc.RpcError) as err:
        node.controller.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest())
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_probe_is_ready_when_redis_and_s3_answer(plugin) -> None:
    resp = plugin.identity.Probe(csi_pb2.ProbeRequest())
    assert resp.ready.value is True


def test_probe_fails_when_redis_is_down(cluster, local_services) -> None:
    env = dict(cluster.env)
    env["CHUNKFS_META"] = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    plugin = cluster.start("node-x", "controller", env=env)
    with pytest.raises(grpc.RpcError) as err:
        plugin.identity.Probe(csi_pb2.ProbeRequest(), timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not healthy" in err.value.details()


def test_probe_fails_while_redis_is_paused(plugin, local_services) -> None:
    plugin.identity.Probe(csi_pb2.ProbeRequest())
    local_services.redis.pause()
    try:
        with pytest.raises(grpc.RpcError) as err:
            plugin.identity.Probe(csi_pb2.ProbeRequest(), timeout=30)
    finally:
        local_services.redis.resume()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert plugin.identity.Probe(csi_pb2.ProbeRequest()).ready.value


def test_sigterm_stops_gracefully_and_removes_the_socket(plugin) -> None:
    assert os.path.exists(plugin.socket)
    assert plugin.stop() == 0
    assert not os.path.exists(plugin.socket)
    assert '"msg": "signal received, stopping gracefully"' in plugin.log_path.read_text()


def test_bad_flags_exit_with_usage_error(cluster) -> None:
    out = subprocess.run([sys.executable, "-m", "csi.server", "--role", "node",
                          "--endpoint", "unix:///tmp/x.sock"], capture_output=True, text=True,
                         env=cluster.env, timeout=60)
    assert out.returncode == 2
    assert "--cache-dir and --state-dir" in out.stderr
