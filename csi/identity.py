"""CSI Identity service: who the plugin is, what it offers, whether it is healthy."""

from __future__ import annotations

import asyncio
import importlib.metadata

from google.protobuf import wrappers_pb2

from csi import backends, errors
from csi.v1 import csi_pb2, csi_pb2_grpc

DRIVER_NAME = "csi.chunkfs.io"
PROBE_TIMEOUT = 5.0

Service = csi_pb2.PluginCapability.Service
Expansion = csi_pb2.PluginCapability.VolumeExpansion


def vendor_version() -> str:
    try:
        return importlib.metadata.version("chunkfs-csi")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0-dev"


class IdentityServicer(csi_pb2_grpc.IdentityServicer):
    def __init__(self, services: backends.ServiceCache, *, driver_name: str = DRIVER_NAME,
                 controller: bool = True) -> None:
        self.services = services
        self.driver_name = driver_name
        self.controller = controller

    async def GetPluginInfo(self, request, context):
        return csi_pb2.GetPluginInfoResponse(name=self.driver_name,
                                             vendor_version=vendor_version())

    async def GetPluginCapabilities(self, request, context):
        caps = [csi_pb2.PluginCapability(
            volume_expansion=Expansion(type=Expansion.ONLINE))]
        if self.controller:
            caps.insert(0, csi_pb2.PluginCapability(
                service=Service(type=Service.CONTROLLER_SERVICE)))
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=caps)

    async def Probe(self, request, context):
        """Ready when the default backend's Redis and S3 answer (when one is configured:
        a plugin whose backends all come from secrets has nothing to check here)."""
        if backends.default_configured():
            try:
                svc = await asyncio.wait_for(
                    self.services.get(backends.resolve({})), PROBE_TIMEOUT)
                await asyncio.wait_for(svc.ping(), PROBE_TIMEOUT)
            except TimeoutError:
                raise errors.plugin_not_healthy(
                    f"the backend did not answer within {PROBE_TIMEOUT:.0f}s") from None
            except Exception as exc:  # noqa: BLE001 - any failure means not ready
                raise errors.plugin_not_healthy(f"{type(exc).__name__}: {exc}") from None
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))
