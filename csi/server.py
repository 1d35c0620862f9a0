"""The plugin process: ``chunkfs-csi --endpoint unix:///csi/csi.sock --role node ...``.

One grpc.aio server per process serves Identity plus the Controller service
(``--role controller``), the Node service (``--role node``) or both (``--role all``,
for local use and conformance runs) on one unix socket. ``--role mounter`` is not a
gRPC server: it is the process the node's chunkfs mounts live in (``csi/mounter.py``),
and a node plugin started with ``--mounter-socket`` runs its mounts there. SIGTERM stops it gracefully:
in-flight RPCs get ``--grace`` seconds, and chunkfs mounts are left running (they
belong to the pods, not to the plugin). A node plugin re-establishes dead mounts from
its state directory at start and every ``--recover-interval`` seconds. A controller
collects garbage on every backend it served, every ``--gc-interval`` seconds
(``csi/gc_runner.py``), and backs up every volume of those backends every
``--backup-interval`` seconds (``csi/backup_runner.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence

import grpc
import prometheus_client

from chunkfs.config import parse_size
from chunkfs.errors import InvalidArgument
from csi import validate
from csi.backends import ServiceCache, default_configured, resolve
from csi.backup_runner import BackupMetrics, BackupRunner, BackupSettings
from csi.controller import ControllerServicer
from csi.gc_runner import GcMetrics, GcRunner, GcSettings
from csi.identity import DRIVER_NAME, IdentityServicer, vendor_version
from csi.launcher import MounterClient
from csi.mounts import Mounter, NodeMounts
from csi.node import NodeServicer
from csi.observe import MountCollector, Observer, RpcMetrics, setup_logging
from csi.registry import EXPIRY_BEATS, HEARTBEAT_INTERVAL, NodeRegistry
from csi.rpc import KeyLocks
from csi.secret_backend import DEFAULT_DENY, AddressPolicy, parse_networks
from csi.secretstore import SecretStore
from csi.v1 import csi_pb2_grpc

log = logging.getLogger("chunkfs.csi.server")

MAX_REQUEST_BYTES = 2 << 20  # a Kubernetes Secret is at most 1 MiB


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="chunkfs-csi",
        description="CSI plugin for chunkfs volumes (S3 + Redis). The default backend "
        "comes from CHUNKFS_META, CHUNKFS_STORAGE and AWS_*; CSI secrets override it.")
    p.add_argument("--endpoint", default="unix:///csi/csi.sock",
                   help="gRPC endpoint, unix:///path/to/csi.sock (default: %(default)s)")
    p.add_argument("--role", choices=("controller", "node", "all", "mounter"), default="all")
    p.add_argument("--node-id", default=os.environ.get("NODE_ID") or socket.gethostname(),
                   help="this node's id for NodeGetInfo (default: $NODE_ID or the hostname)")
    p.add_argument("--driver-name", default=DRIVER_NAME, help="default: %(default)s")
    p.add_argument("--cache-dir", help="node: the node's block cache (in its _shared/ "
                   "subdirectory, one for every volume staged here)")
    p.add_argument("--state-dir", help="node: where staged/published mounts are recorded")
    p.add_argument("--secrets-dir", default="/run/chunkfs-csi",
                   help="node: where credentials of Secret backends are kept for re-mounts, "
                   "used only if it is on tmpfs/ramfs (else: memory only) "
                   "(default: %(default)s)")
    p.add_argument("--kubelet-dir", default="/var/lib/kubelet",
                   help="node: staging and target paths must be under it "
                   "(default: %(default)s)")
    p.add_argument("--mounter-socket",
                   help="node: run the chunkfs mount processes in the mounter listening on "
                   "this unix socket (a separate pod, so that they outlive this one); "
                   "mounter: the socket to listen on. Default (node): child processes")
    p.add_argument("--cache-size", type=_size_arg, default="10GiB",
                   help="node: bound of the node's block cache, every volume staged here "
                   "together (least recently used blocks go first, whichever volume read "
                   "them); a StorageClass's cache-size caps one volume's share "
                   "(default: %(default)s)")
    p.add_argument("--max-volumes-per-node", type=int, default=64)
    p.add_argument("--heartbeat-interval", type=float, default=HEARTBEAT_INTERVAL,
                   help="node: seconds between two registrations in the default backend; "
                   f"a node is forgotten after {EXPIRY_BEATS} missed ones "
                   "(default: %(default)s)")
    p.add_argument("--recover-interval", type=float, default=10.0,
                   help="node: seconds between checks of the recorded mounts (0: only at "
                   "start)")
    p.add_argument("--default-volume-size", default="1GiB",
                   help="controller: size of a volume created without a capacity range")
    p.add_argument("--max-volume-size", default="1PiB")
    p.add_argument("--gc-interval", type=_seconds, default=3600.0,
                   help="controller: seconds between two garbage collections of each backend "
                   "it serves (one replica runs them); 0 turns automatic GC off "
                   "(default: %(default)s)")
    p.add_argument("--gc-grace", type=_seconds, default=3600.0,
                   help="controller: GC never deletes objects younger than this many seconds "
                   "(default: %(default)s)")
    p.add_argument("--gc-session-grace", type=_seconds, default=600.0,
                   help="controller: a mount silent this long past its session's expiry is "
                   "declared dead by GC (default: %(default)s)")
    p.add_argument("--gc-dry-run", action="store_true",
                   help="controller: GC runs only report what they would delete")
    p.add_argument("--gc-work-dir",
                   help="controller: where a GC run keeps its sorted sets of object keys, about "
                   "100 bytes per object in the bucket (default: $TMPDIR or /tmp)")
    p.add_argument("--backup-interval", type=_seconds, default=3600.0,
                   help="controller: seconds between two backups of every volume of each "
                   "backend it serves (one replica runs them; incremental); 0 turns automatic "
                   "backups off (default: %(default)s)")
    p.add_argument("--backup-keep", type=int, default=24,
                   help="controller: backups kept per volume, the newest (default: %(default)s)")
    p.add_argument("--metrics-address",
                   help="[host]:port to serve Prometheus metrics on (no authentication); "
                   "without a host, loopback only (127.0.0.1:port). Give the pod IP or "
                   "0.0.0.0 explicitly to let a scraper on another host in")
    p.add_argument("--max-request-bytes", type=_size, default=MAX_REQUEST_BYTES,
                   help="largest gRPC request accepted (default: 2MiB: room for the "
                   "largest Kubernetes Secret)")
    p.add_argument("--secret-deny-networks", default=",".join(DEFAULT_DENY),
                   help="comma-separated networks that hosts named by a Secret (meta-url, "
                   "endpoint) must not resolve to; '' allows all (default: %(default)s)")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds in-flight RPCs get at SIGTERM (default: %(default)s)")
    p.add_argument("--log-level", default=os.environ.get("CHUNKFS_CSI_LOG_LEVEL", "info"))
    p.add_argument("--log-format", choices=("json", "text"), default="json")
    args = p.parse_args(argv)
    if args.role in ("node", "all", "mounter") and not (args.cache_dir and args.state_dir):
        p.error(f"--role {args.role} needs --cache-dir and --state-dir")
    if args.role == "mounter" and not args.mounter_socket:
        p.error("--role mounter needs --mounter-socket")
    if not args.endpoint.startswith("unix://"):
        p.error("--endpoint must be unix:///path/to/csi.sock")
    try:
        parse_networks(args.secret_deny_networks.split(","))
    except ValueError as exc:
        p.error(f"--secret-deny-networks: {exc}")
    if args.metrics_address:
        try:
            metrics_bind(args.metrics_address)
        except ValueError:
            p.error("--metrics-address must be [host]:port")
    return args


def socket_path(endpoint: str) -> str:
    path = endpoint[len("unix://"):]
    return path if path.startswith("/") else "/" + path


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"seconds must be a finite number >= 0, got {text!r}")
    return value


def _size_arg(text: str) -> str:
    """A size as chunkfs takes it (checked here, passed on as written)."""
    try:
        parse_size(text)
    except Exception as exc:  # noqa: BLE001 - argparse reports it as a usage error
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


class Plugin:
    """The servicers of one process, wired to one service cache and one set of locks."""

    def __init__(self, args: argparse.Namespace, metrics: RpcMetrics,
                 registry: prometheus_client.CollectorRegistry | None = None) -> None:
        self.args = args
        self.services = ServiceCache(policy=AddressPolicy(parse_networks(
            args.secret_deny_networks.split(","))))
        self.registry = NodeRegistry(self.services, interval=args.heartbeat_interval)
        self.started = time.time()
        self.server = grpc.aio.server(
            interceptors=[Observer(metrics)],
            options=[("grpc.max_receive_message_length", args.max_request_bytes)])
        self.mounts: NodeMounts | None = None
        self.gc: GcRunner | None = None
        self.backups: BackupRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        controller = args.role in ("controller", "all")
        csi_pb2_grpc.add_IdentityServicer_to_server(
            IdentityServicer(self.services, driver_name=args.driver_name,
                             controller=controller), self.server)
        if controller:
            rules = validate.CapacityRules(default=_size(args.default_volume_size),
                                           maximum=_size(args.max_volume_size))
            csi_pb2_grpc.add_ControllerServicer_to_server(
                ControllerServicer(self.services, rules, self.registry), self.server)
            self.gc = self._gc_runner(args, registry)
            self.backups = self._backup_runner(args, registry)
        if args.role in ("node", "all"):
            locks = KeyLocks()
            launcher = MounterClient(args.mounter_socket) if args.mounter_socket else None
            mounter = Mounter(os.path.join(args.state_dir, "logs"), launcher=launcher,
                              default_cache_size=args.cache_size)
            self.mounts = NodeMounts(args.state_dir, args.cache_dir, mounter=mounter,
                                     locks=locks, secrets=SecretStore(args.secrets_dir))
            csi_pb2_grpc.add_NodeServicer_to_server(
                NodeServicer(self.services, self.mounts, node_id=args.node_id,
                             kubelet_dir=args.kubelet_dir,
                             max_volumes=args.max_volumes_per_node, locks=locks),
                self.server)
            if registry is not None:
                registry.register(MountCollector(self.mounts))

    def _gc_runner(self, args: argparse.Namespace,
                   registry: prometheus_client.CollectorRegistry | None) -> GcRunner:
        settings = GcSettings(interval=args.gc_interval, grace=args.gc_grace,
                              session_grace=args.gc_session_grace, dry_run=args.gc_dry_run,
                              work_dir=args.gc_work_dir)
        runner = GcRunner(settings, GcMetrics(registry or prometheus_client.CollectorRegistry()))
        if not settings.enabled:
            log.info("automatic garbage collection is off (--gc-interval 0)")
            return runner
        self.services.observers.append(runner.track)
        if default_configured():
            runner.track(resolve({}))
        return runner

    def _backup_runner(self, args: argparse.Namespace,
                       registry: prometheus_client.CollectorRegistry | None) -> BackupRunner:
        settings = BackupSettings(interval=args.backup_interval, keep=args.backup_keep)
        runner = BackupRunner(settings, BackupMetrics(registry
                                                      or prometheus_client.CollectorRegistry()))
        if not settings.enabled:
            log.info("automatic backups are off (--backup-interval 0)")
            return runner
        self.services.observers.append(runner.track)
        if default_configured():
            runner.track(resolve({}))
        return runner

    async def start(self) -> None:
        if self.mounts is not None:
            await self.mounts.mounter.launcher.warm()  # first: the zygote imports meanwhile
            await self.mounts.drop_legacy_caches()
            await self._register()
        path = socket_path(self.args.endpoint)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket of a previous run
        old = os.umask(0o177)  # the socket is created 0600, whatever the umask was
        try:
            self.server.add_insecure_port("unix://" + path)
            await self.server.start()
        finally:
            os.umask(old)
        os.chmod(path, 0o600)  # and explicitly so: only root (kubelet, sidecars) may call
        if self.mounts is not None:
            log.info("chunkfs mounts run as %s", self.mounts.mounter.launcher.describe())
        log.info("serving %s on %s", self.args.role, path,
                 extra={"fields": {"role": self.args.role, "endpoint": path,
                                   "node_id": self.args.node_id,
                                   "driver": self.args.driver_name}})
        if self.gc is not None:
            self.gc.start()
        if self.backups is not None:
            self.backups.start()
        if self.mounts is not None:
            self._tasks.append(asyncio.create_task(self._recover()))
            if self.registry.available():
                self._tasks.append(asyncio.create_task(self.registry.heartbeat_forever(
                    *self._registration())))

    def _registration(self) -> tuple[str, float, str, int]:
        return (self.args.node_id, self.started, vendor_version(),
                self.args.max_volumes_per_node)

    async def _register(self) -> None:
        """Register the node before serving, so that the controller knows it by the time
        kubelet learns the node id from NodeGetInfo (bounded: Redis may be down)."""
        if not self.registry.available():
            log.info("no default backend: node %s is not registered; the controller cannot "
                     "check node ids", self.args.node_id)
            return
        await self.registry.beat(*self._registration())

    async def _recover(self) -> None:
        assert self.mounts is not None
        outcome = await self.mounts.recover()
        if outcome:
            log.info("recorded mounts checked at start: %s", outcome,
                     extra={"fields": {"mounts": outcome}})
        if self.args.recover_interval > 0:
            await asyncio.sleep(self.args.recover_interval)
            await self.mounts.recover_forever(self.args.recover_interval)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.server.stop(self.args.grace)
        if self.gc is not None:
            await self.gc.stop()
        if self.backups is not None:
            await self.backups.stop()
        await self.services.close()
        if self.mounts is not None:
            await self.mounts.mounter.launcher.close()
            self.mounts.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path(self.args.endpoint))
        log.info("stopped; chunkfs mounts keep running")


def metrics_bind(address: str) -> tuple[str, int]:
    """(host, port) of ``--metrics-address``: ``:PORT`` means loopback, never every
    interface (the endpoint has no authentication)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def _serve_metrics(address: str, registry: prometheus_client.CollectorRegistry) -> None:
    host, port = metrics_bind(address)
    prometheus_client.start_http_server(port, addr=host, registry=registry)


async def serve(args: argparse.Namespace) -> None:
    registry = prometheus_client.REGISTRY
    plugin = Plugin(args, RpcMetrics(registry), registry)
    if args.metrics_address:
        _serve_metrics(args.metrics_address, registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await plugin.start()
    await stop.wait()
    log.info("signal received, stopping gracefully")
    await plugin.stop()


def check_paths(args: argparse.Namespace) -> str | None:
    """What is wrong with the directories the flags name (checked where the plugin runs,
    not by ``parse_args``: a chart's flags are parsed anywhere)."""
    if args.backup_keep < 1:
        return f"--backup-keep must be at least 1, got {args.backup_keep}"
    if args.role in ("controller", "all") and args.gc_work_dir and not os.path.isdir(
            args.gc_work_dir):
        return f"--gc-work-dir {args.gc_work_dir!r} is not an existing directory"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    problem = check_paths(args)
    if problem:
        print(f"chunkfs-csi: error: {problem}", file=sys.stderr)
        return 2
    setup_logging(args.log_level, args.log_format)
    try:
        if args.role == "mounter":
            from csi import mounter

            asyncio.run(mounter.serve(args))
        else:
            asyncio.run(serve(args))
    except Exception:  # noqa: BLE001 - report and exit non-zero
        log.exception("chunkfs-csi failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
