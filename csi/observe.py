"""The one server interceptor: error codes, structured logs and Prometheus metrics.

For every unary RPC it
* turns an exception escaping the handler into the gRPC status of ``errors.to_status``
  (``CsiError`` or a typed chunkfs error; anything else is INTERNAL and logged with its
  traceback), with the request's secret values scrubbed from the message;
* logs one JSON line: method, code, duration, the volume/snapshot/node ids, the error,
  and at DEBUG the request with every ``csi_secret`` field stripped (only the names of
  the secret keys remain);
* counts the call and observes its latency per method and code.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import text_format
from google.protobuf.message import Message
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from chunkfs.control import ControlError
from chunkfs.logs import JsonFormatter
from csi.errors import to_status
from csi.v1 import csi_pb2

log = logging.getLogger("chunkfs.csi.rpc")

# Called every few seconds by kubelet and the sidecars: logged at DEBUG only.
QUIET = frozenset({
    "Probe", "GetPluginInfo", "GetPluginCapabilities", "ControllerGetCapabilities",
    "NodeGetCapabilities", "NodeGetInfo", "NodeGetVolumeStats", "GetCapacity",
})
_ID_FIELDS = ("volume_id", "name", "snapshot_id", "source_volume_id", "node_id",
              "target_path", "staging_target_path", "volume_path")
_SERVER_FAULTS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                            grpc.StatusCode.DATA_LOSS})


# --- secrets ------------------------------------------------------------------------

def _is_secret(field: Any) -> bool:
    return bool(field.GetOptions().Extensions[csi_pb2.csi_secret])


def secret_values(msg: Message) -> list[str]:
    """Every value of every ``csi_secret`` field in ``msg`` (to scrub messages with)."""
    found: list[str] = []
    for field, value in msg.ListFields():
        if _is_secret(field):
            found.extend(value.values() if hasattr(value, "values") else [str(value)])
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            for item in value if field.is_repeated else [value]:
                found.extend(secret_values(item))
    return found


def strip_secrets(msg: Message) -> tuple[Message, list[str]]:
    """A copy of ``msg`` without ``csi_secret`` fields, and the names of the removed keys."""
    copy = type(msg)()
    copy.CopyFrom(msg)
    names: list[str] = []
    _strip(copy, names)
    return copy, names


def _strip(msg: Message, names: list[str]) -> None:
    for field, value in msg.ListFields():
        if _is_secret(field):
            names.extend(sorted(value.keys()) if hasattr(value, "keys") else [field.name])
            msg.ClearField(field.name)
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            for item in value if field.is_repeated else [value]:
                _strip(item, names)


def scrub(text: str, secrets: Iterable[str]) -> str:
    for value in secrets:
        if value and len(value) >= 3:
            text = text.replace(value, "***")
    return text


# --- logs ---------------------------------------------------------------------------
# one JSON formatter for the whole project: chunkfs.logs (secrets scrubbed there too)

def setup_logging(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# --- metrics ------------------------------------------------------------------------

class RpcMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.calls = Counter("chunkfs_csi_rpc", "CSI RPCs served, by method and status code",
                             ["method", "code"], registry=registry)
        self.latency = Histogram(
            "chunkfs_csi_rpc_duration_seconds", "CSI RPC latency, by method", ["method"],
            buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=registry)
        self.inflight = Gauge("chunkfs_csi_rpc_inflight", "CSI RPCs in progress",
                              ["method"], registry=registry)


class MountCollector:
    """Per-mount gauges of a node plugin, collected at scrape time.

    ``chunkfs_csi_mount_up{volume}`` from the last recovery round, and every number of
    the mount's status report (what ``chunkfs status MOUNTPOINT --json`` prints) as
    ``chunkfs_mount_<path>{volume}``: dirty bytes, cache hits and misses, S3 and Redis
    requests, bytes and errors, fenced, ... Runs in the metrics HTTP thread, never on
    the event loop; a mount that does not answer within ``status_timeout`` is skipped.
    """

    def __init__(self, mounts: Any, status_timeout: float = 3.0) -> None:
        self.mounts = mounts
        self.status_timeout = status_timeout

    def collect(self):
        staged = dict(self.mounts.store.staged)
        yield GaugeMetricFamily("chunkfs_csi_staged_volumes", "Volumes staged on this node",
                                value=len(staged))
        yield GaugeMetricFamily("chunkfs_csi_published_targets",
                                "Bind mounts of staged volumes into pods",
                                value=len(self.mounts.store.published))
        up = GaugeMetricFamily("chunkfs_csi_mount_up",
                               "1 when the volume's chunkfs mount answered at the last check",
                               labels=["volume"])
        families: dict[str, GaugeMetricFamily] = {}
        for volume_id, rec in sorted(staged.items()):
            up.add_metric([volume_id], 1.0 if self.mounts.health.get(volume_id) == "alive"
                          else 0.0)
            for name, value in self._status(rec.staging_path):
                fam = families.get(name)
                if fam is None:
                    fam = families[name] = GaugeMetricFamily(
                        name, "from chunkfs status --json", labels=["volume"])
                fam.add_metric([volume_id], value)
        yield up
        yield from families.values()

    def _status(self, path: str) -> list[tuple[str, float]]:
        from csi.mounts import read_status

        try:
            doc = self.mounts.prober.run_blocking(
                "status", path, functools.partial(read_status, run_dir=self.mounts.run_dir),
                self.status_timeout)
        except (OSError, TimeoutError, ValueError, ControlError):
            return []
        doc.pop("pid", None)
        return list(_numbers("chunkfs_mount", doc))


def _numbers(prefix: str, doc: Any):
    if isinstance(doc, bool):
        yield prefix, float(doc)
    elif isinstance(doc, int | float):
        yield prefix, float(doc)
    elif isinstance(doc, dict):
        for key, value in doc.items():
            name = "".join(c if c.isalnum() else "_" for c in str(key)).lower()
            yield from _numbers(f"{prefix}_{name}", value)


# --- the interceptor ----------------------------------------------------------------

class Observer(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: RpcMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        async def observed(request: Message, context: grpc.aio.ServicerContext) -> Any:
            start = time.monotonic()
            code, error = grpc.StatusCode.OK, ""
            self.metrics.inflight.labels(method).inc()
            try:
                return await inner(request, context)
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:
                code, error = grpc.StatusCode.CANCELLED, "cancelled by the client"
                raise
            except Exception as exc:  # noqa: BLE001 - every error becomes a status here
                code, error = to_status(exc)
                error = scrub(error, secret_values(request))
                if code in _SERVER_FAULTS:
                    log.error("%s failed", method, exc_info=True,
                              extra={"fields": {"method": method}})
                await context.abort(code, error)
            finally:
                elapsed = time.monotonic() - start
                self.metrics.inflight.labels(method).dec()
                self.metrics.calls.labels(method, code.name).inc()
                self.metrics.latency.labels(method).observe(elapsed)
                self._log(method, request, code, error, elapsed)

        return grpc.unary_unary_rpc_method_handler(
            observed, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    @staticmethod
    def _log(method: str, request: Message, code: grpc.StatusCode, error: str,
             elapsed: float) -> None:
        if code is grpc.StatusCode.OK:
            level = logging.DEBUG if method in QUIET else logging.INFO
        else:
            level = logging.ERROR if code in _SERVER_FAULTS else logging.WARNING
        if not log.isEnabledFor(level):
            return
        fields: dict[str, Any] = {"method": method, "code": code.name,
                                  "duration_ms": round(elapsed * 1000, 2)}
        for name in _ID_FIELDS:
            value = getattr(request, name, None)
            if value:
                fields[name] = value
        if error:
            fields["error"] = error
        if log.isEnabledFor(logging.DEBUG):
            stripped, secret_keys = strip_secrets(request)
            fields["request"] = text_format.MessageToString(stripped, as_one_line=True)
            if secret_keys:
                fields["secrets"] = secret_keys
        log.log(level, "%s %s", method, code.name, extra={"fields": fields})
