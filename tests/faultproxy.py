"""A TCP proxy that injects network faults between a client (a mount, the CLI) and a real
server (Redis, the S3 gateway): replies held back, connections dropped, replies cut midway.

The kernel here has no ``netem``, and SIGSTOPping a server freezes every client at once;
this proxy hurts one path only, and can do what a pause cannot: let a request reach the
server and lose (or delay) its reply, which is how a retried request can run twice.

    from tests.faultproxy import FaultProxy

    with FaultProxy("redis://127.0.0.1:6379/3") as proxy:
        env = make_env(s3_env, CHUNKFS_META=proxy.url)   # redis://127.0.0.1:<proxy port>/3
        ...
        proxy.hold_replies(20)       # requests still reach Redis; their replies wait 20 s
        assert proxy.wait_held(5)    # a reply is now held back: the outcome is unknown
        proxy.release()              # deliver held replies now (or let the 20 s pass)
        proxy.cut()                  # the next reply: first half delivered, then the connection dies
        proxy.drop()                 # reset every open connection now
        proxy.refuse()               # new connections are reset as soon as they are accepted
        proxy.pass_through()         # clear every fault

API (all methods are thread-safe and return at once; the proxy runs its own event loop
in a daemon thread, so sync tests drive it directly):

  FaultProxy(upstream)    ``upstream``: a URL (``redis://[:pw@]host:port/db``,
                          ``http://host:port``) or ``host:port``
  .start() / .close()     or use it as a context manager; ``close`` resets every connection
  .host .port .address    where clients connect (``address`` = "host:port")
  .url                    ``upstream`` with its host:port replaced by the proxy's
  .hold_replies(seconds)  bytes from the server are held until ``seconds`` from now (a new
                          call replaces the deadline); requests keep flowing to the server
  .hold_requests(seconds) bytes from clients are held (the server sees nothing)
  .hold_replies_after(seconds, *needles)
                          armed: the first request chunk holding every one of ``needles``
                          starts ``hold_replies(seconds)`` before it reaches the server,
                          so the reply of that very request is held (and every later one):
                          a lost reply of one chosen request, not of the reads before it
  .release()              end both holds now; held bytes are delivered in order
  .cut(keep=None)         one-shot: the next reply chunk is forwarded only up to ``keep``
                          bytes (default: half of it), then both sides are reset
  .drop()                 reset every open connection (both sides)
  .refuse(on=True)        reset new connections at accept time
  .pass_through()         ``release`` + ``refuse(False)`` + cancel a pending ``cut``
  .wait_held(timeout)     True once a reply has been held back since the last hold_replies
  .stats()                counters: connections, active, replies, held_bytes, cuts, drops

A "reply" is whatever one read from the server returns (TCP has no messages); for a
request/response protocol such as Redis's, a reply read while the client waits is one
reply or a pipeline of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

CHUNK = 64 * 1024


@dataclass(eq=False)  # one object per connection, hashed by identity
class _Conn:
    """One proxied connection: the client side and the server side."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def reset(self) -> None:
        """Abort both sides: the peers see a connection reset, not a clean close."""
        for writer in (self.client, self.server):
            if writer is not None:
                _abort(writer)


def _abort(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:  # SO_LINGER 0: close() sends RST
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.transport.abort()


def _split_upstream(upstream: str) -> tuple[str, int, Any]:
    if "://" in upstream:
        parts = urlsplit(upstream)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream URL needs an explicit host and port: {upstream!r}")
        return parts.hostname, parts.port, parts
    host, _, port = upstream.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"upstream must be a URL or host:port, not {upstream!r}")
    return host, int(port), None


class FaultProxy:
    def __init__(self, upstream: str, *, host: str = "127.0.0.1") -> None:
        self.upstream_host, self.upstream_port, self._url_parts = _split_upstream(upstream)
        self.host = host
        self.port = 0
        self._lock = threading.Lock()
        self._hold_replies_until = 0.0
        self._hold_requests_until = 0.0
        self._trigger: tuple[float, tuple[bytes, ...]] | None = None  # hold_replies_after
        self._triggered = threading.Event()
        self._cut_keep: int | None | bool = False  # False: no cut pending; None: half
        self._refuse = False
        self._conns: set[_Conn] = set()
        self._counters = {"connections": 0, "replies": 0, "held_bytes": 0, "cuts": 0, "drops": 0}
        self._held_event = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    # ---- lifetime --------------------------------------------------------------------
    def start(self) -> FaultProxy:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"faultproxy-{self.upstream_port}",
                                        daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        if not self.port:
            raise RuntimeError("fault proxy did not start")
        return self

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _listen(self) -> None:
        self._wake = asyncio.Event()
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await asyncio.sleep(0.05)  # connections accepted just now get their callback first
        for conn in list(self._conns):
            conn.reset()
            for task in conn.tasks:  # the pumps; each connection's own task then ends
                task.cancel()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if others:
            await asyncio.wait(others, timeout=5)

    # ---- addresses -------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The upstream URL pointing at the proxy (credentials, path and query kept)."""
        if self._url_parts is None:
            return self.address
        parts = self._url_parts
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@{self.address}" if userinfo else self.address
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    # ---- faults (called from any thread) ---------------------------------------------
    def hold_replies(self, seconds: float) -> None:
        with self._lock:
            self._hold_replies_until = time.monotonic() + seconds
            self._held_event.clear()
        self._poke()

    def hold_requests(self, seconds: float) -> None:
        with self._lock:
            self._hold_requests_until = time.monotonic() + seconds
        self._poke()

    def hold_replies_after(self, seconds: float, *needles: bytes) -> None:
        if not needles or not all(needles):
            raise ValueError("hold_replies_after needs at least one non-empty needle")
        with self._lock:
            self._trigger = (seconds, needles)
            self._triggered.clear()
            self._held_event.clear()

    def wait_triggered(self, timeout: float) -> bool:
        """True once the request armed by ``hold_replies_after`` went to the server."""
        return self._triggered.wait(timeout)

    def release(self) -> None:
        with self._lock:
            self._hold_replies_until = self._hold_requests_until = 0.0
            self._trigger = None
        self._poke()

    def cut(self, keep: int | None = None) -> None:
        if keep is not None and keep < 0:
            raise ValueError("keep must be >= 0")
        with self._lock:
            self._cut_keep = keep
        self._poke()

    def drop(self) -> None:
        done = threading.Event()

        def reset_all() -> None:
            for conn in list(self._conns):
                conn.reset()
            with self._lock:
                self._counters["drops"] += 1
            done.set()

        self._call(reset_all)
        done.wait(10)

    def refuse(self, on: bool = True) -> None:
        with self._lock:
            self._refuse = on

    def pass_through(self) -> None:
        with self._lock:
            self._refuse = False
            self._cut_keep = False
        self.release()

    # ---- observations ----------------------------------------------------------------
    def wait_held(self, timeout: float) -> bool:
        """Wait until a reply has been held back since the last ``hold_replies``: the
        request reached the server, and the client is waiting for an answer."""
        return self._held_event.wait(timeout)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self._counters, "active": len(self._conns)}

    # ---- the event loop side ---------------------------------------------------------
    def _call(self, fn: Any) -> None:
        if self._loop is None:
            raise RuntimeError("fault proxy is not running")
        self._loop.call_soon_threadsafe(fn)

    def _poke(self) -> None:
        """Wake every pump so that it re-reads the fault state."""
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake_all)

    def _wake_all(self) -> None:
        assert self._wake is not None
        self._wake.set()
        self._wake = asyncio.Event()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer)
        with self._lock:
            refuse = self._refuse
            self._counters["connections"] += 1
            if not refuse:
                self._conns.add(conn)
        if refuse:
            conn.reset()
            return
        try:
            up_reader, conn.server = await asyncio.open_connection(self.upstream_host,
                                                                   self.upstream_port)
        except OSError:
            with self._lock:
                self._conns.discard(conn)
            conn.reset()
            return
        conn.tasks = [asyncio.ensure_future(self._pump(reader, conn.server, conn, reply=False)),
                      asyncio.ensure_future(self._pump(up_reader, conn.client, conn, reply=True))]
        try:
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.reset()

    def _hold_deadline(self, reply: bool) -> float:
        with self._lock:
            return self._hold_replies_until if reply else self._hold_requests_until

    def _take_cut(self, n: int) -> int | None:
        """How many bytes of this reply to forward before cutting (None: no cut)."""
        with self._lock:
            keep = self._cut_keep
            if keep is False:
                return None
            self._cut_keep = False
            self._counters["cuts"] += 1
        return min(n, n // 2 if keep is None else int(keep))

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, conn: _Conn, *,
                    reply: bool) -> None:
        """Copy one direction until EOF, applying the faults to each chunk read."""
        try:
            while data := await src.read(CHUNK):
                await self._wait_hold(len(data), reply)
                if not reply:
                    self._check_trigger(data)
                if reply:
                    with self._lock:
                        self._counters["replies"] += 1
                    keep = self._take_cut(len(data))
                    if keep is not None:
                        dst.write(data[:keep])
                        with contextlib.suppress(ConnectionError):
                            await dst.drain()
                        conn.reset()
                        return
                dst.write(data)
                await dst.drain()
            with contextlib.suppress(OSError):
                dst.write_eof()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            conn.reset()

    def _check_trigger(self, request: bytes) -> None:
        """Start the armed reply hold if ``request`` holds every needle (one TCP read: a
        small request such as one Redis command arrives whole)."""
        with self._lock:
            if self._trigger is None:
                return
            seconds, needles = self._trigger
            if not all(n in request for n in needles):
                return
            self._trigger = None
            self._hold_replies_until = time.monotonic() + seconds
        self._triggered.set()

    async def _wait_hold(self, n: int, reply: bool) -> None:
        counted = False
        try:
            while (left := self._hold_deadline(reply) - time.monotonic()) > 0:
                if reply and not counted:
                    counted = True
                    with self._lock:
                        self._counters["held_bytes"] += n
                    self._held_event.set()
                assert self._wake is not None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), left)
        finally:
            if counted:
                with self._lock:
                    self._counters["held_bytes"] -= n
