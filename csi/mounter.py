"""The mounter: ``chunkfs-csi --role mounter``, the process a node's chunkfs mounts live in.

Why it exists: in a pod, every process of a container dies with the container. Mount
processes started by the node plugin would die with it at every crash, liveness
restart or DaemonSet upgrade, and every application pod would be left with
"Transport endpoint is not connected". So the chart runs this mounter in a DaemonSet
of its own (``updateStrategy: OnDelete``, no liveness probe, nothing in it that needs
upgrading often) and the node plugin asks it, over a unix socket on a hostPath, to run
``chunkfs mount`` and ``chunkfs umount``. The node plugin keeps the records, the
bind mounts, health checks and recovery (``csi/mounts.py``); it can be killed,
restarted or upgraded at any time without touching a mount process. The design,
its failure modes and the upgrade procedure: ``docs/dev/mounts-in-kubernetes.md``.

Protocol (version 1): one request per connection, one JSON object per line each way,
at most ``MAX_MESSAGE`` bytes:

    {"version": 1, "op": "mount", "spec": MountSpec fields, "env": {AWS_*/CHUNKFS_*},
     "timeout": seconds}                          -> {"rc": N, "message": "...",
    {"version": 1, "op": "umount", "path": staging path, "timeout": seconds}   "timed_out": b}
    {"version": 1, "op": "ping"}                  -> {"rc": 0, "version": 1, "mounts": N}

``rc`` is the chunkfs CLI's exit status (2: bad input); a request the mounter refuses
(a path outside its directories, an unknown op) gets rc 2 and a message. The socket
is created 0600 in a 0700 directory: only root on the node reaches it. The backend
environment of a mount (credentials included) is used for the child process only and
never written down or logged.

SIGTERM (the pod is deleted): stop accepting requests, then unmount every mount this
process started with ``chunkfs umount`` (which flushes what the applications wrote),
within ``--grace`` seconds. The node plugin re-mounts them once a mounter runs again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
from typing import Any

from csi import errors, paths, validate
from csi.launcher import (
    BACKEND_PREFIXES,
    MAX_MESSAGE,
    PROTOCOL_VERSION,
    ChildLauncher,
    Launcher,
    MountSpec,
    Outcome,
)
from csi.mounts import FSTYPE, MOUNT_TIMEOUT, UNMOUNT_TIMEOUT, chunkfs_command, mount_table

log = logging.getLogger("chunkfs.csi.mounter")

EXIT_USAGE = 2                       # as the chunkfs CLI: the request itself is wrong
_OPTION_RE = re.compile(r"^[A-Za-z0-9_.:=-]{1,256}$")   # one `-o` option, no commas
_SIZE_RE = re.compile(r"^[0-9]+(\.[0-9]+)?\s*([KMGTPE]i?B?|B)?$", re.IGNORECASE)


class Refused(Exception):
    """A request the mounter does not carry out (reported as rc 2)."""


class MounterServer:
    """Serves mount/umount requests; ``mounted`` is what this process started."""

    def __init__(self, socket_path: str, *, kubelet_dir: str, cache_dir: str, state_dir: str,
                 launcher: Launcher | None = None) -> None:
        self.socket_path = socket_path
        self.kubelet_dir = kubelet_dir
        self.cache_dir = cache_dir
        self.state_dir = state_dir
        self.launcher = launcher or ChildLauncher(
            chunkfs_command(), run_dir=os.path.join(state_dir, "control"),
            zygote_log=os.path.join(state_dir, "logs", "zygote.log"))
        self.mounted: set[str] = set()
        self._server: asyncio.base_events.Server | None = None
        self._base_env = {k: v for k, v in os.environ.items()
                          if not k.startswith(BACKEND_PREFIXES)}

    async def start(self) -> None:
        directory = os.path.dirname(self.socket_path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)  # a stale socket of a previous run
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._handle, self.socket_path, limit=MAX_MESSAGE)
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        await self.launcher.warm()  # a zygote: the first mount on this node is fast too
        log.info("mounter serving on %s", self.socket_path,
                 extra={"fields": {"socket": self.socket_path,
                                   "kubelet_dir": self.kubelet_dir}})

    async def stop(self, grace: float) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        await self.unmount_all(grace)
        await self.launcher.close()

    async def unmount_all(self, grace: float) -> None:
        """Flush and unmount every live mount this process started, all at once."""
        table = mount_table()
        paths = sorted(p for p in self.mounted if table.get(p) == FSTYPE)
        if not paths:
            return
        log.warning("stopping: unmounting %d chunkfs mounts (the node plugin re-mounts "
                    "them once a mounter runs again)", len(paths),
                    extra={"fields": {"mounts": paths}})
        results = await asyncio.gather(
            *(self.launcher.umount(p, grace) for p in paths), return_exceptions=True)
        for path, result in zip(paths, results, strict=True):
            if isinstance(result, BaseException) or result.rc != 0:
                log.error("unmounting %s at stop failed: %s", path,
                          result if isinstance(result, BaseException) else result.message)

    # -- requests --

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            reply = await self._answer(reader)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError) as exc:
            log.warning("mounter connection failed: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        try:
            raw = await reader.readline()
            request = json.loads(raw) if raw else None
            if not isinstance(request, dict):
                raise Refused("the request is not a JSON object")
            if request.get("version") != PROTOCOL_VERSION:
                raise Refused(f"unsupported protocol version {request.get('version')!r}; "
                              f"this mounter speaks {PROTOCOL_VERSION}")
            outcome = await self._dispatch(request)
        except ValueError as exc:  # also a line over the limit
            outcome = Outcome(EXIT_USAGE, f"malformed request: {exc}")
        except Refused as exc:
            outcome = Outcome(EXIT_USAGE, str(exc))
        except errors.CsiError as exc:
            outcome = Outcome(EXIT_USAGE, exc.message)
        if isinstance(outcome, dict):
            return outcome
        return {"rc": outcome.rc, "message": outcome.message, "timed_out": outcome.timed_out}

    async def _dispatch(self, request: dict[str, Any]) -> Outcome | dict[str, Any]:
        op = request.get("op")
        if op == "ping":
            return {"rc": 0, "version": PROTOCOL_VERSION, "mounts": len(self.mounted)}
        seconds = _seconds(request.get("timeout"),
                           MOUNT_TIMEOUT if op == "mount" else UNMOUNT_TIMEOUT)
        if op == "mount":
            spec = self._spec(request.get("spec"))
            env = {**self._base_env, **_backend_env(request.get("env"))}
            outcome = await self.launcher.mount(spec, env, seconds)
            if outcome.rc == 0:
                self.mounted.add(spec.staging_path)
            log.info("mount %s at %s: rc %d", spec.volume_id, spec.staging_path, outcome.rc,
                     extra={"fields": {"volume": spec.volume_id, "rc": outcome.rc,
                                       "message": outcome.message}})
            return outcome
        if op == "umount":
            path = paths.KubeletDir(self.kubelet_dir).canonical("path", str(request.get("path", "")))
            if mount_table().get(path) != FSTYPE:
                self.mounted.discard(path)
                return Outcome(0, f"{path} is not a chunkfs mount")
            outcome = await self.launcher.umount(path, seconds)
            if outcome.rc == 0:
                self.mounted.discard(path)
            log.info("umount %s: rc %d", path, outcome.rc,
                     extra={"fields": {"path": path, "rc": outcome.rc,
                                       "message": outcome.message}})
            return outcome
        raise Refused(f"unknown op {op!r}")

    def _spec(self, doc: Any) -> MountSpec:
        if not isinstance(doc, dict):
            raise Refused("spec must be an object")
        try:
            spec = MountSpec(**doc)
        except TypeError as exc:
            raise Refused(f"bad spec: {exc}") from None
        validate.check_id("volume_id", str(spec.volume_id))
        staging = paths.KubeletDir(self.kubelet_dir).canonical("staging_path", str(spec.staging_path))
        cache = paths.KubeletDir(self.cache_dir).canonical("cache_dir", str(spec.cache_dir))
        log_file = paths.KubeletDir(self.state_dir).canonical("log_file", str(spec.log_file))
        options = spec.options if isinstance(spec.options, list) else None
        if options is None or not all(isinstance(o, str) and _OPTION_RE.match(o)
                                      for o in options):
            raise Refused("options must be a list of plain mount options")
        if spec.cache_size is not None and not (isinstance(spec.cache_size, str)
                                                and _SIZE_RE.match(spec.cache_size)):
            raise Refused(f"bad cache_size {spec.cache_size!r}")
        return MountSpec(volume_id=spec.volume_id, staging_path=staging, cache_dir=cache,
                         log_file=log_file, options=list(options), cache_size=spec.cache_size)


def _backend_env(doc: Any) -> dict[str, str]:
    if doc is None:
        return {}
    if not isinstance(doc, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in doc.items()):
        raise Refused("env must be an object of strings")
    stray = sorted(k for k in doc if not k.startswith(BACKEND_PREFIXES))
    if stray:
        raise Refused(f"env may only name the backend (AWS_*, CHUNKFS_*), not {stray}")
    return dict(doc)


def _seconds(value: Any, default: float) -> float:
    if value is None:
        return default
    if not isinstance(value, (int, float)) or not 0 < value <= 3600:
        raise Refused(f"bad timeout {value!r}")
    return float(value)


async def serve(args: argparse.Namespace) -> None:
    """Run the mounter until SIGTERM/SIGINT, then unmount what it started."""
    server = MounterServer(args.mounter_socket, kubelet_dir=args.kubelet_dir,
                           cache_dir=args.cache_dir, state_dir=args.state_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await stop.wait()
    log.info("signal received, stopping")
    await server.stop(args.grace)
    log.info("mounter stopped")
