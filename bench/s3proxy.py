"""A counting HTTP/1.1 proxy in front of SeaweedFS's S3 port: S3 requests and bytes per
client, measured the same way for every filesystem.

    python -m bench.s3proxy '{"upstream": "127.0.0.1:8333", "listeners": ["chunkfs", "juicefs"]}'

listens on one loopback port per listener (each client is pointed at its own port, so
that every request is attributed to exactly one client without guessing from bucket
names), forwards every byte unchanged to ``upstream`` (SigV4 signatures stay valid: the
Host header is forwarded as the client signed it), and counts each request/response
exchange by S3 operation class: requests, request-body bytes (sent to S3), response-body
bytes (received from S3) and responses with status >= 400. On stdout it prints one JSON
line, ``{"ports": {listener: port}, "control": port}``, once it is ready; ``GET
/counters`` on the control port returns the totals so far as JSON. SIGTERM stops it.

Why a proxy rather than SeaweedFS's metrics: ``weed server`` exposes per-request
metrics only with ``-metricsPort``, which the shared local stack does not pass, and the
mounts' own counters (``.chunkfs.status``, JuiceFS's metrics) measure different things.

Bodies of known length are moved with ``splice(2)`` through a pipe (no copy into Python),
so the proxy's CPU cost is per request, not per byte; it is reported per workload next to
the mounts' (bench.run).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

CLASSES = ("GET", "PUT", "HEAD", "LIST", "DELETE", "POST", "OTHER")
MAX_HEAD = 64 * 1024  # an S3 request or response head is a few hundred bytes
CHUNK = 1 << 20
LOOPBACK = "127.0.0.1"


class ProtocolError(Exception):
    """The peer sent something that is not HTTP/1.x framing we can relay."""


# --------------------------------------------------------------------------- pure logic


def classify(method: str, target: str) -> str:
    """The S3 operation class of a path-style request: GET/PUT/HEAD/DELETE of an object,
    LIST (a GET of the bucket itself), DELETE also for a multi-object delete (POST
    ?delete), POST for multipart initiate/complete, OTHER for the rest (bucket calls)."""
    path, _, query = target.partition("?")
    if "://" in path:  # absolute-form request target
        path = "/" + path.split("://", 1)[1].partition("/")[2]
    bucket, _, key = path.lstrip("/").partition("/")
    params = {k for k, _ in parse_qsl(query, keep_blank_values=True)}
    method = method.upper()
    if method == "POST":
        return "DELETE" if "delete" in params else "POST"
    if not bucket:
        return "OTHER"
    if not key:
        return "LIST" if method == "GET" and not params & {"location", "acl", "policy"} else "OTHER"
    if method in ("GET", "PUT", "HEAD", "DELETE"):
        return method
    return "OTHER"


@dataclass
class Head:
    """A parsed request or response head."""

    start: list[str]  # request: [method, target, version]; response: [version, status, reason]
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    raw: bytes

    def header(self, name: str) -> str:
        return self.headers.get(name, "")

    @property
    def chunked(self) -> bool:
        return "chunked" in self.header("transfer-encoding").lower()

    @property
    def content_length(self) -> int | None:
        value = self.header("content-length")
        if not value:
            return None
        try:
            n = int(value.split(",")[0].strip())
        except ValueError as e:
            raise ProtocolError(f"bad Content-Length {value!r}") from e
        if n < 0:
            raise ProtocolError(f"bad Content-Length {value!r}")
        return n

    @property
    def wants_close(self) -> bool:
        conn = self.header("connection").lower()
        if self.start[-1 if self.is_request else 0].upper() == "HTTP/1.0" and "keep-alive" not in conn:
            return True
        return "close" in conn

    @property
    def is_request(self) -> bool:
        return not self.start[0].upper().startswith("HTTP/")

    @property
    def status(self) -> int:
        return int(self.start[1])


def parse_head(raw: bytes) -> Head:
    """Parse the bytes of a head up to and including the blank line."""
    try:
        text = raw.decode("latin-1")
    except UnicodeDecodeError as e:  # pragma: no cover - latin-1 decodes every byte
        raise ProtocolError(str(e)) from e
    lines = text.split("\r\n")
    start = lines[0].split(" ", 2)
    if len(start) < 2:
        raise ProtocolError(f"bad start line {lines[0][:80]!r}")
    if start[0].upper().startswith("HTTP/"):
        if not start[1].isdigit():
            raise ProtocolError(f"bad status line {lines[0][:80]!r}")
    elif len(start) != 3 or not start[2].upper().startswith("HTTP/"):
        raise ProtocolError(f"bad request line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise ProtocolError(f"bad header line {line[:80]!r}")
        key = name.strip().lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return Head(start=start, headers=headers, raw=raw)


def response_has_body(request_method: str, status: int) -> bool:
    return not (request_method.upper() == "HEAD" or 100 <= status < 200 or status in (204, 304))


@dataclass
class Counter:
    requests: int = 0
    bytes_sent: int = 0  # request bodies: client -> S3
    bytes_received: int = 0  # response bodies: S3 -> client
    errors: int = 0  # responses with status >= 400

    def add(self, other: Counter) -> None:
        self.requests += other.requests
        self.bytes_sent += other.bytes_sent
        self.bytes_received += other.bytes_received
        self.errors += other.errors


@dataclass
class Counters:
    """Totals per listener and operation class (thread-safe)."""

    by_listener: dict[str, dict[str, Counter]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, listener: str, op: str, sent: int, received: int, status: int) -> None:
        with self.lock:
            c = self.by_listener.setdefault(listener, {}).setdefault(op, Counter())
            c.requests += 1
            c.bytes_sent += sent
            c.bytes_received += received
            c.errors += status >= 400

    def snapshot(self) -> dict[str, dict[str, dict[str, int]]]:
        with self.lock:
            return {
                name: {op: vars(c).copy() for op, c in ops.items()} for name, ops in self.by_listener.items()
            }


def diff_counters(before: dict[str, Any], after: dict[str, Any], listener: str) -> dict[str, Any]:
    """The requests one listener made between two snapshots: per class and in total
    (``{"total": {...}, "by_op": {"GET": {...}, ...}}``; classes with no request omitted)."""
    b, a = before.get(listener, {}), after.get(listener, {})
    by_op: dict[str, dict[str, int]] = {}
    total = Counter()
    for op in sorted(set(a) | set(b), key=lambda o: CLASSES.index(o) if o in CLASSES else len(CLASSES)):
        d = Counter(**{k: a.get(op, {}).get(k, 0) - b.get(op, {}).get(k, 0) for k in vars(Counter())})
        if d.requests or d.bytes_sent or d.bytes_received:
            by_op[op] = vars(d)
            total.add(d)
    return {"total": vars(total), "by_op": by_op}


# --------------------------------------------------------------------------- relaying


class Conn:
    """A blocking socket with a read buffer: heads are parsed from the buffer, bodies
    are relayed from it first and then straight from the socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self._pipe: tuple[int, int] | None = None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        if self._pipe is not None:
            for fd in self._pipe:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._pipe = None

    def _fill(self) -> bool:
        data = self.sock.recv(CHUNK)
        if not data:
            return False
        self.buf += data
        return True

    def read_head(self) -> Head | None:
        """The next head; None if the peer closed cleanly before sending a byte of it."""
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                raw = bytes(self.buf[: end + 4])
                del self.buf[: end + 4]
                return parse_head(raw)
            if len(self.buf) > MAX_HEAD:
                raise ProtocolError("head too large")
            if not self._fill():
                if self.buf:
                    raise ProtocolError("connection closed inside a head")
                return None

    def read_line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[: end + 2])
                del self.buf[: end + 2]
                return line
            if len(self.buf) > MAX_HEAD or not self._fill():
                raise ProtocolError("bad or truncated chunked framing")

    def relay_exact(self, n: int, dst: socket.socket) -> int:
        """Copy exactly n body bytes to dst (buffered ones first, then by splice)."""
        done = 0
        if self.buf:
            take = min(n, len(self.buf))
            dst.sendall(self.buf[:take])
            del self.buf[:take]
            done = take
        while done < n:
            moved = self._splice(dst, n - done)
            if moved == 0:
                raise ProtocolError(f"connection closed {n - done} bytes before the end of a body")
            done += moved
        return n

    def _splice(self, dst: socket.socket, want: int) -> int:
        if self._pipe is None:
            r, w = os.pipe()
            with contextlib.suppress(OSError):  # F_SETPIPE_SZ: bigger moves, fewer calls
                import fcntl

                fcntl.fcntl(w, 1031, CHUNK)
            self._pipe = (r, w)
        r, w = self._pipe
        got = os.splice(self.sock.fileno(), w, min(want, CHUNK))
        left = got
        while left:
            left -= os.splice(r, dst.fileno(), left)
        return got

    def relay_chunked(self, dst: socket.socket) -> int:
        """Relay a chunked body (framing included); returns the payload bytes."""
        payload = 0
        while True:
            line = self.read_line()
            dst.sendall(line)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError as e:
                raise ProtocolError(f"bad chunk size line {line[:40]!r}") from e
            if size == 0:
                while True:  # trailer section, up to the blank line
                    trailer = self.read_line()
                    dst.sendall(trailer)
                    if trailer == b"\r\n":
                        return payload
            self.relay_exact(size, dst)
            payload += size
            crlf = self.read_line()
            if crlf != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")
            dst.sendall(crlf)

    def relay_to_eof(self, dst: socket.socket) -> int:
        total = 0
        if self.buf:
            dst.sendall(self.buf)
            total = len(self.buf)
            self.buf.clear()
        while True:
            moved = self._splice(dst, CHUNK)
            if moved == 0:
                return total
            total += moved


def relay_body(src: Conn, dst: socket.socket, head: Head, *, to_eof: bool = False) -> int:
    if head.chunked:
        return src.relay_chunked(dst)
    n = head.content_length
    if n is not None:
        return src.relay_exact(n, dst)
    return src.relay_to_eof(dst) if to_eof else 0


def serve_connection(client: Conn, upstream: Conn, listener: str, counters: Counters) -> None:
    """Relay request/response exchanges until either side closes."""
    while True:
        req = client.read_head()
        if req is None:
            return
        method = req.start[0]
        op = classify(method, req.start[1])
        upstream.sock.sendall(req.raw)
        sent = 0
        body_sent = False
        if "100-continue" not in req.header("expect").lower():
            sent = relay_body(client, upstream.sock, req)
            body_sent = True
        while True:  # interim (1xx) responses, then the final one
            resp = upstream.read_head()
            if resp is None:
                raise ProtocolError("upstream closed before responding")
            client.sock.sendall(resp.raw)
            if resp.status == 100 and not body_sent:
                sent = relay_body(client, upstream.sock, req)
                body_sent = True
                continue
            if 100 <= resp.status < 200:
                continue
            break
        received = 0
        if response_has_body(method, resp.status):
            received = relay_body(upstream, client.sock, resp, to_eof=True)
        counters.record(listener, op, sent, received, resp.status)
        # A final answer to an Expect: 100-continue request that never asked for the
        # body leaves it unknown whether the client sends it anyway: end the connection.
        if not body_sent or req.wants_close or resp.wants_close:
            return
        if resp.content_length is None and not resp.chunked and response_has_body(method, resp.status):
            return  # the body ended with the connection


# --------------------------------------------------------------------------- server


class Proxy:
    def __init__(self, upstream: tuple[str, int], listeners: Iterable[str]) -> None:
        self.upstream = upstream
        self.counters = Counters()
        self.sockets: dict[str, socket.socket] = {}
        for name in listeners:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((LOOPBACK, 0))
            s.listen(256)
            self.sockets[name] = s
            self.counters.by_listener.setdefault(name, {})
        self.control = _control_server(self.counters)
        self._stop = threading.Event()

    @property
    def ports(self) -> dict[str, int]:
        return {name: s.getsockname()[1] for name, s in self.sockets.items()}

    def start(self) -> None:
        for name, s in self.sockets.items():
            threading.Thread(target=self._accept, args=(name, s), daemon=True, name=f"accept-{name}").start()
        threading.Thread(
            target=self.control.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="control"
        ).start()

    def stop(self) -> None:
        self._stop.set()
        self.control.shutdown()
        self.control.server_close()
        for s in self.sockets.values():
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self, name: str, lsock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(name, sock), daemon=True).start()

    def _handle(self, name: str, sock: socket.socket) -> None:
        client = Conn(sock)
        upstream: Conn | None = None
        try:
            upstream = Conn(socket.create_connection(self.upstream, timeout=None))
            for s in (sock, upstream.sock):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            serve_connection(client, upstream, name, self.counters)
        except (OSError, ProtocolError) as e:
            # The client sees its connection reset, as it would with a flaky S3; we say why.
            if not isinstance(e, (ConnectionResetError, BrokenPipeError)):
                print(f"s3proxy [{name}]: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        finally:
            client.close()
            if upstream is not None:
                upstream.close()


def _control_server(counters: Counters) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path != "/counters":
                self.send_error(404)
                return
            body = json.dumps(counters.snapshot()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    return ThreadingHTTPServer((LOOPBACK, 0), Handler)


def fetch_counters(control_port: int, timeout: float = 10.0) -> dict[str, Any]:
    """The proxy's totals so far."""
    import urllib.request

    with urllib.request.urlopen(f"http://{LOOPBACK}:{control_port}/counters", timeout=timeout) as r:
        return json.loads(r.read())


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # preexec_fn: runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class ProxyProcess:
    """The proxy as a child process of the benchmark (signalled by its PID only; it also
    gets SIGTERM if the benchmark dies)."""

    def __init__(
        self,
        upstream: str,
        listeners: list[str],
        log_path: str | os.PathLike[str],
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.spec = {"upstream": upstream, "listeners": listeners}
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.popen: subprocess.Popen[str] | None = None
        self.ports: dict[str, int] = {}
        self.control = 0

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log_path, "ab") as logf:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "bench.s3proxy", json.dumps(self.spec)], cwd=self.cwd, env=self.env,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=logf, text=True,
                start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        assert self.popen.stdout is not None
        ready, _, _ = select.select([self.popen.stdout], [], [], timeout)
        line = self.popen.stdout.readline() if ready else ""
        if not line:
            self.stop()
            raise RuntimeError(f"s3proxy did not start (see {self.log_path})")
        info = json.loads(line)
        self.ports, self.control = info["ports"], info["control"]

    def url(self, listener: str) -> str:
        return f"http://{LOOPBACK}:{self.ports[listener]}"

    def counters(self) -> dict[str, Any]:
        return fetch_counters(self.control)

    def quiesce(self, listener: str, quiet: float = 0.3, limit: float = 3.0) -> dict[str, Any]:
        """Wait until ``listener`` has made no request for ``quiet`` seconds (at most
        ``limit``), so that requests a workload left in flight count as its own; returns
        the counters then."""
        deadline = time.monotonic() + limit
        last = self.counters()
        since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.counters()
            if now.get(listener) != last.get(listener):
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return last

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.s3proxy '<json spec>'", file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    host, _, port = str(spec["upstream"]).rpartition(":")
    proxy = Proxy((host or LOOPBACK, int(port)), spec["listeners"])
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    proxy.start()
    sys.stdout.write(json.dumps({"ports": proxy.ports, "control": proxy.control.server_address[1]}) + "\n")
    sys.stdout.flush()
    done.wait()
    proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
