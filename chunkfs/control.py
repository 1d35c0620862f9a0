"""A mount's control socket: how root on the node asks a mount for its state or its end.

The virtual status file inside a mount (``.chunkfs.status``) is for the people and pods
who use the volume; nothing privileged may trust it, because everyone who can write
the volume is on the other side of it. The mount process also listens on a unix socket
in a root-only directory (``run_dir``): a caller checks who owns the directory and the
socket, learns the mount process's pid from the kernel (``SO_PEERCRED``), never from a
document, and reads a bounded, shallow JSON reply whose parse errors are contained.

Requests are one line: ``status`` (the status document) or ``unmount`` (flush, unmount
and exit; the connection stays open and ends with a last line ``{"done": true,
"clean": ...}`` once the process is about to exit).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from chunkfs.errors import ChunkfsError

if TYPE_CHECKING:  # the server side runs in the mount process, which has asyncio already;
    import asyncio  # the callers' side (the CLI) starts faster without it

log = logging.getLogger(__name__)

MAX_REQUEST = 8192  # a request line: "status", "unmount", "credentials {json}"
MAX_REPLY = 256 * 1024
MAX_DEPTH = 8
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ControlError(ChunkfsError):
    """The control socket is missing, not trustworthy, or answered nonsense."""


def default_run_dir() -> str:
    env = os.environ.get("CHUNKFS_RUN_DIR")
    if env:
        return env
    return "/run/chunkfs" if os.geteuid() == 0 else f"/tmp/chunkfs-{os.geteuid()}"


def socket_path(mountpoint: str, run_dir: str | None = None) -> str:
    digest = hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:24]
    return os.path.join(run_dir or default_run_dir(), f"{digest}.sock")


@contextlib.contextmanager
def _reachable(path: str) -> Iterator[str]:
    """``path``, or an equivalent short enough for a unix socket address (108 bytes):
    the directory through an open descriptor of it."""
    if len(path.encode()) < 100:
        yield path
        return
    fd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(path)}"
    finally:
        os.close(fd)


def _check_private_dir(path: str) -> None:
    """The directory must belong to us (or root) and be writable by nobody else."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ControlError(f"{path} is not a directory")
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
        raise ControlError(f"{path} may be written by other users: refusing to use it")


def prepare_run_dir(run_dir: str) -> None:
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    _check_private_dir(run_dir)


# --- the mount's side ---------------------------------------------------------------

class ControlServer:
    """Serves one mount's control socket inside the mount process."""

    def __init__(self, path: str, status: Callable[[], dict[str, Any]],
                 terminate: Callable[[], None],
                 rotate: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path = path
        self._status = status
        self._terminate = terminate
        self._rotate = rotate
        self._server: asyncio.AbstractServer | None = None
        self._waiting: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        import asyncio

        prepare_run_dir(os.path.dirname(self.path))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a dead mount's socket: this mountpoint is ours now
        old = os.umask(0o177)
        try:
            with _reachable(self.path) as address:
                self._server = await asyncio.start_unix_server(self._serve, address)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import asyncio

        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            request = line[:MAX_REQUEST].strip().decode(errors="replace")
            if request.startswith("credentials ") and self._rotate is not None:
                writer.write(json.dumps(self._credentials(request)).encode() + b"\n")
            elif request == "status":
                writer.write(json.dumps(self._status()).encode() + b"\n")
            elif request == "unmount":
                writer.write(b'{"ok": true}\n')
                self._waiting.append(writer)
                await writer.drain()
                self._terminate()
                return  # answered again by ``close``
            else:
                writer.write(json.dumps({"error": f"unknown request {request[:40]!r}"}).encode()
                             + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, OSError):
            pass
        writer.close()

    def _credentials(self, request: str) -> dict[str, Any]:
        """Rotated backend credentials for this mount's next connections. The reply
        never repeats them, nor any part of the request."""
        assert self._rotate is not None
        try:
            doc = _parse(request.removeprefix("credentials ").encode())
            self._rotate(doc)
        except (ControlError, ChunkfsError, ValueError) as exc:
            return {"error": f"credentials refused: {type(exc).__name__}"}
        return {"ok": True}

    async def close(self, *, clean: bool) -> None:
        """Tell every ``unmount`` caller how it ended, then stop listening."""
        for writer in self._waiting:
            with contextlib.suppress(Exception):
                writer.write(json.dumps({"done": True, "clean": clean}).encode() + b"\n")
                await writer.drain()
                writer.close()
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


# --- the caller's side --------------------------------------------------------------

def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level)
    return level


def _parse(line: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ControlError(f"unreadable reply from the mount process ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or _depth(doc) > MAX_DEPTH:
        raise ControlError("malformed reply from the mount process")
    return doc


class Connection:
    """One request to a mount process over its control socket (blocking, bounded)."""

    def __init__(self, mountpoint: str, *, run_dir: str | None = None, timeout: float = 5.0) -> None:
        self.path = socket_path(mountpoint, run_dir)
        self.mountpoint = mountpoint
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.peer_pid = 0
        self._buf = b""

    def __enter__(self) -> Connection:
        try:
            _check_private_dir(os.path.dirname(self.path))
            st = os.lstat(self.path)
        except FileNotFoundError:
            raise ControlError(f"no chunkfs mount process answers for {self.mountpoint}") from None
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid not in (0, os.geteuid()):
            raise ControlError(f"{self.path} is not a control socket of ours: refusing it")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            with _reachable(self.path) as address:
                sock.connect(address)
        except OSError as exc:
            sock.close()
            raise ControlError(f"no chunkfs mount process answers for {self.mountpoint} "
                               f"({exc.strerror})") from None
        pid, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                   _CRED.size))
        if uid not in (0, os.geteuid()):
            sock.close()
            raise ControlError(f"the process behind {self.path} runs as uid {uid}: refusing it")
        self.sock, self.peer_pid = sock, pid
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sock is not None:
            self.sock.close()

    def send(self, request: str) -> None:
        assert self.sock is not None
        self.sock.sendall(request.encode() + b"\n")

    def receive(self, timeout: float | None = None) -> dict[str, Any]:
        """The next reply line (at most MAX_REPLY bytes)."""
        assert self.sock is not None
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ControlError(f"the mount process of {self.mountpoint} did not answer in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise ControlError(f"the mount process of {self.mountpoint} closed the connection")
            self._buf += chunk
            if len(self._buf) > MAX_REPLY:
                raise ControlError("the mount process's reply is too large")
        line, _, self._buf = self._buf.partition(b"\n")
        return _parse(line)


def query_status(mountpoint: str, *, run_dir: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """The status document of the mount at ``mountpoint``; ``pid`` is the kernel's word."""
    with Connection(mountpoint, run_dir=run_dir, timeout=timeout) as conn:
        conn.send("status")
        doc = conn.receive()
    doc["pid"] = conn.peer_pid
    return doc


def send_credentials(mountpoint: str, doc: dict[str, str], *, run_dir: str | None = None,
                     timeout: float = 5.0) -> None:
    """Hand rotated backend credentials (``meta_url``, ``access_key``, ``secret_key``) to
    the running mount at ``mountpoint``; raises ControlError if it refuses them (or is a
    version that does not take them: then only a re-mount brings them)."""
    with Connection(mountpoint, run_dir=run_dir, timeout=timeout) as conn:
        conn.send("credentials " + json.dumps(doc))
        reply = conn.receive()
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "the mount refused the credentials"))[:200])
