"""The zygote: a pre-imported process that forks one mount process per ``chunkfs mount``.

Why: on a new node, most of the time from ``chunkfs mount`` to the first byte goes into
starting Python and importing the mount's libraries (aiobotocore, botocore, aiohttp,
redis-py, pyfuse3 and trio: about a second of CPU on the development machines) and into
building the S3 client from botocore's JSON models. A zygote does all of that once and
then waits; each mount request forks it, and the child -- already warm -- becomes the
mount process. The CSI node plugin and the mounter keep one running (``csi/launcher.py``);
on any host ``chunkfs zygote`` runs one, and ``chunkfs mount`` uses it when it answers
and starts a mount process the ordinary way when it does not.

Where: a unix socket ``zygote-<identity>.sock`` in the root-only run directory of the
mounts' control sockets (``chunkfs.control``; ``--run-dir``). The identity names the
interpreter and the installed chunkfs, so a client never hands its mount to a zygote of
another installation (another virtualenv, another version after an upgrade): it would
find no socket of its own and start the mount itself. The socket is 0600 in a 0700
directory, and both sides check the other's uid through the kernel (``SO_PEERCRED``).

Protocol (version 1), one request per connection, JSON lines:

    client -> {"version": 1, "op": "mount", "argv": ["mount", VOLUME, MOUNTPOINT, ...],
               "title": [...the command line to show], "env": {...}, "cwd": "/...",
               "umask": 18}
    zygote -> {"accepted": true}        (or {"fallback": "why"}: nothing was started)
    child  -> {"started": PID, "log": "/path/to/its.log"}          (once its input is valid)
    child  -> {"rc": 0, "pid": PID, "message": "mounted ..."}   or  {"rc": N, "error": "..."}
    client -> {"version": 1, "op": "ping"}  ->  {"ok": true, "pid": PID, "identity": "..."}

``rc`` is what ``chunkfs mount`` exits with (2: bad input, 1: the mount failed). A
connection that ends before the final line means the mount process died; its log says why.

What a fork must not share, and how it is kept apart:

* no threads, no event loop, no connection exist in the zygote when it forks: it serves
  with a blocking ``select`` loop, its warm-up runs in an event loop that is closed
  before the first fork and opens no connection (``objstore.preload``), and it refuses to
  fork (the client falls back) if a thread is running;
* each mount makes its own event loop, aiohttp session, Redis connections, cache
  threads and log handler after the fork (the ordinary mount code does);
* the child leaves the zygote's session for one of its own (it outlives the zygote, the
  plugin and the client, exactly as a mount started by the CLI; the zygote ignores
  SIGCHLD, so the kernel reaps mounts that end while it runs), takes
  the client's environment, working directory and umask, closes the zygote's listening
  socket and lifeline, restores default signal handlers, reseeds ``random`` and shows
  its own command line and environment in /proc (``chunkfs.proctitle``);
* the zygote's output buffers are flushed before each fork (a child must not write the
  zygote's pending log lines into its own log), and the zygote keeps no request: the
  credentials in it live in the child only. String hashing is seeded per zygote (every
  fork shares that seed; nothing in chunkfs relies on it).

A zygote runs the code it imported when it started: restart it after an upgrade (the
node plugin and the mounter start theirs with themselves; ``--lifeline`` makes a zygote
exit when the process that started it dies).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import random
import select
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from chunkfs import proctitle
from chunkfs.control import (
    ControlError,
    _check_private_dir,
    _reachable,
    default_run_dir,
    prepare_run_dir,
)

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_REQUEST = 1 << 20
ACCEPT_TIMEOUT = 10.0        # seconds a client waits for the zygote to take its request
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def identity() -> str:
    """Names this interpreter + chunkfs installation + protocol (the socket's name)."""
    package = os.path.dirname(os.path.abspath(__file__))
    text = f"{PROTOCOL_VERSION}\0{os.path.realpath(sys.executable)}\0{os.path.realpath(package)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def socket_path(run_dir: str | None = None) -> str:
    return os.path.join(run_dir or default_run_dir(), f"zygote-{identity()}.sock")


def _peer_uid_ok(sock: socket.socket) -> bool:
    _, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return uid in (0, os.geteuid())


# --- the client's side (blocking; used by ``chunkfs mount``) --------------------------

@dataclass(frozen=True)
class Reply:
    """How a mount handed to the zygote ended: ``rc`` as ``chunkfs mount`` exits."""

    rc: int
    message: str
    pid: int = 0


def _connect(run_dir: str | None, timeout: float) -> socket.socket | None:
    """A connection to this installation's zygote, or None when none answers."""
    path = socket_path(run_dir)
    try:
        _check_private_dir(os.path.dirname(path))
        st = os.lstat(path)
    except (OSError, ControlError) as exc:
        log.debug("no zygote at %s: %s", path, exc)
        return None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid not in (0, os.geteuid()):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with _reachable(path) as address:
            sock.connect(address)
    except OSError:  # a zygote that died left its socket behind
        sock.close()
        return None
    if not _peer_uid_ok(sock):
        sock.close()
        return None
    return sock


class _Lines:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def next(self, timeout: float | None) -> dict[str, Any] | None:
        """The next JSON line, None at the end of the connection."""
        self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
            if len(self.buf) > MAX_REQUEST:
                raise ValueError("reply too long")
        line, _, self.buf = self.buf.partition(b"\n")
        doc = json.loads(line)
        if not isinstance(doc, dict):
            raise ValueError("reply is not an object")
        return doc


def request_mount(run_dir: str | None, argv: list[str], *, title: list[str],
                  env: Mapping[str, str]) -> Reply | None:
    """Hand ``chunkfs mount`` (``argv`` from "mount" on) to the zygote and wait until the
    mount is ready or failed. None when no zygote took it (start the mount yourself)."""
    sock = _connect(run_dir, ACCEPT_TIMEOUT)
    if sock is None:
        return None
    with sock:
        request = {"version": PROTOCOL_VERSION, "op": "mount", "argv": argv, "title": title,
                   "env": dict(env), "cwd": os.getcwd(), "umask": _umask()}
        lines = _Lines(sock)
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
            first = lines.next(ACCEPT_TIMEOUT)
        except (OSError, ValueError) as exc:  # nothing was started
            log.debug("the zygote did not take the mount: %s", exc)
            return None
        if first is None or "fallback" in first or not first.get("accepted"):
            return None
        return _outcome(lines)


class _Progress:
    """The child's lines after ``accepted``: ``feed`` returns the final Reply, if that was it."""

    def __init__(self) -> None:
        self.started: dict[str, Any] = {}

    def feed(self, doc: dict[str, Any]) -> Reply | None:
        if "started" in doc:
            self.started = doc
        elif "rc" in doc:
            rc = int(doc["rc"])
            return Reply(rc, str(doc.get("message" if rc == 0 else "error", "")),
                         int(doc.get("pid", 0)))
        return None

    def ended(self, why: str) -> Reply:
        """The connection ended without a final line: the mount process died."""
        where = self.started.get("log")
        return Reply(1, f"mount process {self.started.get('started', '?')} exited before it "
                     f"was ready ({why})" + (f"; see {where}" if where else ""))


def _outcome(lines: _Lines) -> Reply:
    progress = _Progress()
    while True:
        try:
            doc = lines.next(None)  # the mount bounds its own startup (its deadlines)
        except (OSError, ValueError) as exc:
            return progress.ended(str(exc))
        if doc is None:
            return progress.ended("it closed the connection")
        reply = progress.feed(doc)
        if reply is not None:
            return reply


async def request_mount_async(run_dir: str | None, argv: list[str], *, title: list[str],
                              env: Mapping[str, str], seconds: float) -> Reply | None:
    """``request_mount`` for an event loop (the CSI launcher), bounded by ``seconds``:
    a mount not ready by then is reported as rc -1 (it may still come up)."""
    import asyncio

    path = socket_path(run_dir)
    try:
        _check_private_dir(os.path.dirname(path))
        with _reachable(path) as address:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(address, limit=MAX_REQUEST), ACCEPT_TIMEOUT)
    except (OSError, ControlError, TimeoutError):
        return None
    try:
        sock = writer.get_extra_info("socket")
        if sock is None or not _peer_uid_ok(sock):
            return None
        request = {"version": PROTOCOL_VERSION, "op": "mount", "argv": argv, "title": title,
                   "env": dict(env), "cwd": "/", "umask": _umask()}
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            first = await asyncio.wait_for(reader.readline(), ACCEPT_TIMEOUT)
            accepted = json.loads(first) if first else None
        except (OSError, ValueError, TimeoutError):
            return None
        if not isinstance(accepted, dict) or not accepted.get("accepted"):
            return None
        deadline = time.monotonic() + seconds
        progress = _Progress()
        while True:
            try:
                raw = await asyncio.wait_for(reader.readline(),
                                             max(0.0, deadline - time.monotonic()))
                doc = json.loads(raw) if raw else None
            except TimeoutError:
                return Reply(-1, "chunkfs mount did not finish in time",
                             int(progress.started.get("started", 0)))
            except (OSError, ValueError) as exc:
                return progress.ended(str(exc))
            if not isinstance(doc, dict):
                return progress.ended("it closed the connection")
            reply = progress.feed(doc)
            if reply is not None:
                return reply
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _umask() -> int:
    """This process's umask, read without changing it (other threads may create files)."""
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ping(run_dir: str | None, timeout: float = 2.0) -> dict[str, Any] | None:
    """The zygote's answer to ``ping`` (its pid, identity), None when none answers."""
    sock = _connect(run_dir, timeout)
    if sock is None:
        return None
    with sock:
        try:
            sock.sendall(json.dumps({"version": PROTOCOL_VERSION, "op": "ping"}).encode() + b"\n")
            return _Lines(sock).next(timeout)
        except (OSError, ValueError):
            return None


# --- the zygote -----------------------------------------------------------------------

class _Stop(Exception):
    """SIGTERM/SIGINT: stop serving."""


def warm() -> None:
    """Import everything a mount runs and build one S3 client, in a throwaway event
    loop that is closed again: afterwards no loop, thread or connection exists."""
    import asyncio

    import chunkfs.mount  # noqa: F401 - the mount's own modules and their libraries
    from chunkfs import cli, objstore
    from chunkfs.meta import redis_meta

    cli.forked_mount_parser()
    redis_meta.connect("redis://127.0.0.1:9/0")  # no connection: the client's one-time costs
    asyncio.run(objstore.preload())
    asyncio.set_event_loop(None)
    gc.collect()
    # the forks keep the zygote's objects in the permanent generation: their collections
    # never touch (and so never copy) the pages the zygote's objects live in
    gc.freeze()


def serve(run_dir: str | None, *, lifeline: int | None = None) -> int:
    """Warm up, then fork a mount process for each request until SIGTERM/SIGINT (or, with
    ``lifeline``, until that descriptor reaches its end: the starter died)."""
    proctitle.reserve()  # may re-execute this process (before the imports below)
    os.environ.pop(proctitle.ROOM_VARIABLE, None)
    proctitle.set_title([a for a in sys.orig_argv if not a.startswith(proctitle.ROOM_FLAG)],
                        dict(os.environ))
    os.chdir("/")  # a mount takes its client's directory; the zygote pins none
    run_dir = run_dir or default_run_dir()
    prepare_run_dir(run_dir)
    started = time.monotonic()
    warm()
    path = socket_path(run_dir)
    listener = _listen(path)
    bound = os.stat(path)  # the file, to remove at the end unless another zygote replaced it

    def stop(signum: int, _frame: Any) -> None:
        raise _Stop(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # mount processes are reaped by the kernel
    log.info("zygote ready", extra={"socket": path, "pid": os.getpid(),
                                    "warm_up_ms": round((time.monotonic() - started) * 1000)})
    watched: list[Any] = [listener] + ([lifeline] if lifeline is not None else [])
    try:
        while True:
            ready, _, _ = select.select(watched, [], [])
            if lifeline is not None and lifeline in ready and not os.read(lifeline, 4096):
                log.info("zygote stopping: the process that started it is gone")
                return 0
            if listener in ready:
                _accept(listener, lifeline)
    except _Stop:
        log.info("zygote stopping on a signal")
        return 0
    finally:
        with contextlib.suppress(OSError):
            now = os.stat(path)
            if (now.st_dev, now.st_ino) == (bound.st_dev, bound.st_ino):
                os.unlink(path)
        listener.close()


def _listen(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a dead zygote's socket (or a live one's: this one replaces it)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        with _reachable(path) as address:
            sock.bind(address)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(64)
    return sock


def _accept(listener: socket.socket, lifeline: int | None) -> None:
    try:
        conn, _ = listener.accept()
    except OSError:
        return
    with conn:
        try:
            conn.settimeout(5)
            if not _peer_uid_ok(conn):
                return
            request = _read_request(conn)
            if request.get("op") == "ping":
                _send(conn, {"ok": True, "pid": os.getpid(), "identity": identity()})
                return
            why = _refusal(request)
            if why:
                log.warning("zygote refused a request", extra={"reason": why})
                _send(conn, {"fallback": why})
                return
            _send(conn, {"accepted": True})
            _fork(conn, listener, lifeline, request)
        except (OSError, ValueError) as exc:
            log.warning("zygote request failed", extra={"error": str(exc)})


def _read_request(conn: socket.socket) -> dict[str, Any]:
    buf = b""
    while b"\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            raise ValueError("the client closed the connection")
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too long")
    request = json.loads(buf.partition(b"\n")[0])
    if not isinstance(request, dict):
        raise ValueError("the request is not an object")
    return request


def _refusal(request: dict[str, Any]) -> str | None:
    """Why this request cannot be forked (the client then mounts by itself), or None."""
    if request.get("version") != PROTOCOL_VERSION:
        return f"protocol version {request.get('version')!r}, this zygote speaks {PROTOCOL_VERSION}"
    if request.get("op") != "mount":
        return f"unknown op {request.get('op')!r}"
    argv, title, env = request.get("argv"), request.get("title"), request.get("env")
    if not (isinstance(argv, list) and argv[:1] == ["mount"] and isinstance(title, list)
            and all(isinstance(a, str) for a in argv + title) and isinstance(env, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
            and isinstance(request.get("cwd"), str) and isinstance(request.get("umask"), int)):
        return "malformed mount request"
    if threading.active_count() != 1:  # a fork would copy a lock some thread holds
        return f"{threading.active_count() - 1} thread(s) running in the zygote"
    return None


def _send(conn: socket.socket, doc: dict[str, Any]) -> None:
    conn.sendall(json.dumps(doc).encode() + b"\n")


def _fork(conn: socket.socket, listener: socket.socket, lifeline: int | None,
          request: dict[str, Any]) -> None:
    """Fork the mount process (the zygote's SIGCHLD is ignored: the kernel reaps it)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() == 0:
        _become_mount(conn, listener, lifeline, request)


def _become_mount(conn: socket.socket, listener: socket.socket, lifeline: int | None,
                  request: dict[str, Any]) -> NoReturn:
    """In the grandchild: leave the zygote behind, then run ``chunkfs mount`` detached."""
    code = 1
    try:
        listener.close()
        if lifeline is not None:
            _release(lifeline)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGPIPE else signal.SIG_IGN)
        random.seed()  # (Python reseeds its global generator at a fork too; this is explicit)
        os.umask(request["umask"])
        proctitle.set_title(request["title"], request["env"])
        report = _reporter(conn)
        try:
            os.chdir(request["cwd"])
        except OSError as exc:
            report({"rc": 1, "error": f"cannot enter the working directory {request['cwd']}: "
                    f"{exc.strerror}"})
            os._exit(1)
        from chunkfs.cli import run_forked_mount

        code = run_forked_mount(request["argv"], report)
    except BaseException:  # noqa: BLE001 - a broken child must never return into the zygote
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _release(fd: int) -> None:
    """Close ``fd``; a standard descriptor (the lifeline is standard input) gets
    /dev/null instead, so that the next file opened does not become standard input."""
    if fd > 2:
        os.close(fd)
        return
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, fd)
    os.close(null)


def _reporter(conn: socket.socket) -> Callable[[dict[str, Any]], None]:
    """Writes the child's lines to its client; the connection ends with the final one."""

    def report(doc: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the client may have given up waiting
            _send(conn, doc)
        if "rc" in doc:
            with contextlib.suppress(OSError):
                conn.close()

    return report


def main() -> int:
    """``python -m chunkfs.zygote ARGS`` = ``chunkfs zygote ARGS``."""
    from chunkfs.cli import main as cli_main

    return cli_main(["zygote", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
