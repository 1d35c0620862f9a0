"""Where a node's chunkfs mount processes run: here, or in the mounter.

``csi/mounts.py`` decides *what* is mounted and keeps the records; a ``Launcher`` decides
*where the FUSE process lives*, which is what decides what survives what:

* ``ChildLauncher`` runs ``chunkfs mount`` as a child of this process. The mount process
  detaches into its own session, so it outlives the plugin *process* -- but not the
  plugin's *container*: a container's processes all die with it (PID namespace, cgroup).
  Right for a bare host, ``--role all`` and the mounter itself.
* ``MounterClient`` asks the mounter (``chunkfs-csi --role mounter``, its own DaemonSet in
  the chart, see ``csi/mounter.py`` and ``docs/dev/mounts-in-kubernetes.md``) over a unix
  socket to run the mount there. Killing, restarting or upgrading the node plugin then
  touches no mount process.

Both return an ``Outcome`` (the chunkfs CLI's exit status and its last words); mapping
that to gRPC codes stays in ``csi/mounts.py``. The backend (and any credentials from
the CSI secrets) travels in the environment, never in argv; to the mounter it goes over
the socket and is held in memory only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from chunkfs import zygote
from chunkfs.control import default_run_dir
from csi import errors

log = logging.getLogger("chunkfs.csi.launcher")

PROTOCOL_VERSION = 1
MAX_MESSAGE = 1 << 20            # one request or response line, bytes
BACKEND_PREFIXES = ("AWS_", "CHUNKFS_")   # the environment a mount needs from the plugin
LOG_LIMIT = 16 << 20             # a mount's log file is truncated at the next mount beyond this


@dataclass(frozen=True)
class MountSpec:
    """One ``chunkfs mount``: what to mount where, with which cache and options."""

    volume_id: str
    staging_path: str
    cache_dir: str
    log_file: str
    options: list[str] = field(default_factory=list)   # the full -o list (ro, epoch=N, ...)
    cache_size: str | None = None

    def argv(self, chunkfs: list[str]) -> list[str]:
        argv = [*chunkfs, "mount", self.volume_id, self.staging_path,
                "--cache-dir", self.cache_dir]
        if self.cache_size:
            argv += ["--cache-size", self.cache_size]
        if self.options:
            argv += ["-o", ",".join(self.options)]
        return argv + ["--log-file", self.log_file]


@dataclass(frozen=True)
class Outcome:
    """A chunkfs command's exit status and the line that explains a failure."""

    rc: int
    message: str = ""
    timed_out: bool = False


class Launcher(Protocol):
    def describe(self) -> str: ...

    async def warm(self) -> None:
        """Get ready to mount fast (start a zygote); returns at once."""

    async def close(self) -> None:
        """Stop what ``warm`` started (never a mount)."""

    async def mount(self, spec: MountSpec, env: Mapping[str, str],
                    seconds: float) -> Outcome: ...

    async def umount(self, path: str, seconds: float) -> Outcome: ...


def backend_env(env: Mapping[str, str]) -> dict[str, str]:
    """The part of an environment that names the backend and its credentials."""
    return {k: v for k, v in env.items() if k.startswith(BACKEND_PREFIXES)}


# --- here ----------------------------------------------------------------------------

class ChildLauncher:
    """``chunkfs mount`` / ``chunkfs umount`` as child processes of this process.

    With ``zygote_log`` (and once ``warm`` was awaited) it keeps a chunkfs zygote
    running (``chunkfs.zygote``) and hands each mount to it: the mount process is then a
    fork of an already warm interpreter instead of a new ``chunkfs mount`` process, which
    is most of the time to the first byte of a volume staged on a new node. Whenever the
    zygote is not ready (starting, dead, refusing), a mount runs ``chunkfs mount`` as
    before, and a dead zygote is started again.
    """

    def __init__(self, chunkfs: list[str], run_dir: str | None = None, *,
                 zygote_log: str | None = None) -> None:
        self.chunkfs = chunkfs
        self.run_dir = run_dir  # the mounts' control sockets (chunkfs.control)
        self.zygote = ZygoteKeeper(chunkfs, zygote_log) if zygote_log else None

    def describe(self) -> str:
        how = " (forked from a zygote)" if self.zygote is not None else ""
        return f"child processes of the plugin{how}"

    def _run_dir(self) -> str:
        return self.run_dir or default_run_dir()

    async def warm(self) -> None:
        if self.zygote is not None:
            await self.zygote.start(self._run_dir())

    async def close(self) -> None:
        if self.zygote is not None:
            await self.zygote.stop()

    def _env(self, env: Mapping[str, str]) -> dict[str, str]:
        env = dict(env)
        if self.run_dir:
            env["CHUNKFS_RUN_DIR"] = self.run_dir
        return env

    async def mount(self, spec: MountSpec, env: Mapping[str, str], seconds: float) -> Outcome:
        await asyncio.to_thread(os.makedirs, spec.cache_dir, mode=0o700, exist_ok=True)
        await asyncio.to_thread(os.makedirs, os.path.dirname(spec.log_file), mode=0o700,
                                exist_ok=True)
        argv = spec.argv(self.chunkfs)
        out, offset = await asyncio.to_thread(_open_log, spec.log_file, argv)
        if self.zygote is not None:
            reply = await self.zygote.mount(self._run_dir(), argv, len(self.chunkfs),
                                            self._env(env), seconds)
            if reply is not None:
                out.close()
                return Outcome(reply.rc, reply.message if reply.rc != 0 else "",
                               timed_out=reply.rc == -1)
        with out:
            # own session: the mount must not die with the plugin's process group
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                env=self._env(env), start_new_session=True)
        try:
            rc = await asyncio.wait_for(proc.wait(), seconds)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return Outcome(-1, "chunkfs mount did not finish in time", timed_out=True)
        message = "" if rc == 0 else await asyncio.to_thread(_last_line, spec.log_file, offset)
        return Outcome(rc, message or ("" if rc == 0 else f"chunkfs mount exited with status {rc}"))

    async def umount(self, path: str, seconds: float) -> Outcome:
        proc = await asyncio.create_subprocess_exec(
            *self.chunkfs, "umount", path, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env=self._env(os.environ))
        try:
            _, err = await asyncio.wait_for(proc.communicate(), seconds)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return Outcome(-1, "chunkfs umount did not finish in time", timed_out=True)
        return Outcome(proc.returncode or 0, err.decode(errors="replace").strip())


class ZygoteKeeper:
    """A chunkfs zygote as a child process of this one, started again when it died.

    Its standard input is a pipe this process never writes: the zygote exits when that
    pipe closes (``--lifeline``), so a plugin that dies, however, takes its zygote along
    -- never a mount (they run in sessions of their own). Its log is ``log_file``.
    """

    READY_TIMEOUT = 60.0

    def __init__(self, chunkfs: list[str], log_file: str) -> None:
        self.chunkfs = chunkfs
        self.log_file = log_file
        self.proc: asyncio.subprocess.Process | None = None
        self.run_dir: str | None = None
        self._ready: asyncio.Task[bool] | None = None

    @property
    def ready(self) -> bool:
        return (self.proc is not None and self.proc.returncode is None
                and self._ready is not None and self._ready.done()
                and not self._ready.cancelled() and self._ready.result())

    async def start(self, run_dir: str) -> None:
        """Start the zygote (if it is not running); it gets ready in the background."""
        if self.proc is not None and self.proc.returncode is None:
            return
        self.run_dir = run_dir
        await asyncio.to_thread(os.makedirs, os.path.dirname(self.log_file), mode=0o700,
                                exist_ok=True)
        out = await asyncio.to_thread(
            lambda: os.fdopen(os.open(self.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                                      0o600), "ab"))
        with out:
            self.proc = await asyncio.create_subprocess_exec(
                *self.chunkfs, "zygote", "--run-dir", run_dir, "--lifeline",
                stdin=asyncio.subprocess.PIPE, stdout=out, stderr=out, start_new_session=True)
        self._ready = asyncio.create_task(self._wait_ready(self.proc))

    async def _wait_ready(self, proc: asyncio.subprocess.Process) -> bool:
        deadline = time.monotonic() + self.READY_TIMEOUT
        while proc.returncode is None and time.monotonic() < deadline:
            answer = await asyncio.to_thread(zygote.ping, self.run_dir, 1.0)
            if answer is not None and answer.get("pid") == proc.pid:
                log.info("chunkfs zygote %d ready: mounts are forked from it", proc.pid)
                return True
            await asyncio.sleep(0.05)
        log.warning("the chunkfs zygote did not get ready (see %s): mounts start new "
                    "processes", self.log_file)
        return False

    async def mount(self, run_dir: str, argv: list[str], skip: int, env: Mapping[str, str],
                    seconds: float) -> zygote.Reply | None:
        """Hand ``argv`` (``skip`` words of chunkfs command, then ``mount ...``) to the
        zygote; None when it is not ready (it is started again if it died)."""
        if not self.ready:
            if self.proc is not None and self.proc.returncode is not None:
                log.warning("the chunkfs zygote exited (%s); starting another",
                            self.proc.returncode)
                await self.start(run_dir)
            return None
        return await zygote.request_mount_async(run_dir, argv[skip:], title=argv, env=env,
                                                seconds=seconds)

    async def stop(self) -> None:
        if self._ready is not None:
            self._ready.cancel()
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def _open_log(path: str, argv: list[str]) -> tuple[Any, int]:
    """The volume's log (shared with its detached mount process), opened for appending."""
    with contextlib.suppress(FileNotFoundError):
        if os.path.getsize(path) > LOG_LIMIT:
            os.truncate(path, 0)
    out = os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
    offset = out.tell()
    out.write(f"--- {time.strftime('%F %T')} {' '.join(argv)}\n".encode())
    out.flush()
    return out, offset


def _last_line(path: str, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            lines = [ln.strip() for ln in f.read(1 << 20).decode(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln and not ln.startswith("--- ")]
    return lines[-1] if lines else ""


# --- in the mounter ------------------------------------------------------------------

class MounterClient:
    """Runs mounts in the mounter process listening on ``socket_path`` (one request per
    connection, one JSON line each way; see ``csi/mounter.py``). The mounter keeps its
    own zygote warm."""

    CONNECT_TIMEOUT = 5.0

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    def describe(self) -> str:
        return f"the mounter at {self.socket_path}"

    async def warm(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def mount(self, spec: MountSpec, env: Mapping[str, str], seconds: float) -> Outcome:
        request = {"op": "mount", "spec": asdict(spec), "env": backend_env(env),
                   "timeout": seconds}
        return await self._call(request, seconds)

    async def umount(self, path: str, seconds: float) -> Outcome:
        return await self._call({"op": "umount", "path": path, "timeout": seconds}, seconds)

    async def ping(self) -> dict[str, Any]:
        return await self._exchange({"op": "ping"}, self.CONNECT_TIMEOUT)

    async def _call(self, request: dict[str, Any], seconds: float) -> Outcome:
        reply = await self._exchange(request, seconds + self.CONNECT_TIMEOUT)
        try:
            return Outcome(int(reply["rc"]), str(reply.get("message", "")),
                           bool(reply.get("timed_out", False)))
        except (KeyError, TypeError, ValueError):
            raise errors.mounter_unavailable(self.socket_path, "malformed reply") from None

    async def _exchange(self, request: dict[str, Any], seconds: float) -> dict[str, Any]:
        line = json.dumps({"version": PROTOCOL_VERSION, **request}).encode() + b"\n"
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.socket_path, limit=MAX_MESSAGE),
                self.CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            why = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            raise errors.mounter_unavailable(self.socket_path, why) from None
        try:
            writer.write(line)
            await writer.drain()
            raw = await asyncio.wait_for(reader.readline(), seconds)
        except (OSError, ValueError) as exc:
            raise errors.mounter_unavailable(self.socket_path, str(exc)) from None
        except TimeoutError:
            raise errors.timed_out(f"{request['op']} in the mounter") from None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if not raw:
            raise errors.mounter_unavailable(self.socket_path, "it closed the connection")
        try:
            reply = json.loads(raw)
        except ValueError:
            raise errors.mounter_unavailable(self.socket_path, "malformed reply") from None
        if not isinstance(reply, dict):
            raise errors.mounter_unavailable(self.socket_path, "malformed reply")
        return reply
