"""A small asyncio Redis client for the filesystem's hot path.

Every FUSE operation costs at least one Redis round trip, so the client's own
overhead is on the critical path of every ``stat``, ``open`` and ``create``. This
client writes RESP directly to the transport and parses with hiredis; requests on a
connection are pipelined (responses come back in order and resolve a queue of
futures), which makes one round trip cost roughly half of what the general-purpose
asyncio client costs. Administrative code (transactions with WATCH, scans) keeps
using redis-py.

Failure model: a connection that breaks or does not answer within ``timeout`` fails
every request waiting on it with ``ConnectionError``/``TimeoutError`` (redis-py's
classes, so ``with_retries`` treats both clients alike) and is discarded; the next
request reconnects.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.busy_since: float | None = None  # oldest unanswered request (watchdog)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                self.busy_since = asyncio.get_running_loop().time() if self.waiting else None
                return
            fut = self.waiting.popleft()
            if fut.done():
                continue
            if isinstance(reply, ResponseError):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def fail(self, exc: Exception) -> None:
        self.closed = True
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


class RespClient:
    def __init__(self, host: str, port: int, *, db: int = 0, password: str | None = None,
                 username: str | None = None, timeout: float = 10.0,
                 unix_path: str | None = None) -> None:
        self.host, self.port, self.db = host, port, db
        self.unix_path = unix_path
        self._password, self._username = password, username
        self.timeout = timeout
        self._conn: _Connection | None = None
        self._connecting: asyncio.Lock | None = None
        self._shas: dict[str, bytes] = {}
        self._watchdog: asyncio.Task[None] | None = None
        # when Redis stopped answering (monotonic clock); None while it answers. Callers
        # measure their deadline from here, so one outage is waited out once, not once
        # per request of a FUSE operation
        self.down_since: float | None = None
        self._probe: asyncio.Task[None] | None = None

    @classmethod
    def from_url(cls, url: str, timeout: float = 10.0) -> RespClient:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return cls("", 0, unix_path=parts.path, timeout=timeout,
                       password=unquote(parts.password) if parts.password else None)
        db = int(parts.path.strip("/") or 0)
        return cls(parts.hostname or "127.0.0.1", parts.port or 6379, db=db, timeout=timeout,
                   password=unquote(parts.password) if parts.password else None,
                   username=unquote(parts.username) if parts.username else None)

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._conn is not None and not self._conn.closed:
                return self._conn
            loop = asyncio.get_running_loop()
            try:
                if self.unix_path:
                    coro = loop.create_unix_connection(_Connection, self.unix_path)
                else:
                    coro = loop.create_connection(_Connection, self.host, self.port)
                _, conn = await asyncio.wait_for(coro, self.timeout)
            except (OSError, TimeoutError) as exc:
                raise RedisConnectionError(f"cannot connect to Redis: {exc}") from exc
            hello: list[tuple[Any, ...]] = []
            if self._password:
                hello.append(("AUTH", self._username, self._password) if self._username
                             else ("AUTH", self._password))
            if self.db:
                hello.append(("SELECT", self.db))
            for command in hello:
                await self._send(conn, [command])
            self._conn = conn
            if self._watchdog is None or self._watchdog.done():
                self._watchdog = asyncio.create_task(self._watch())
            return conn

    async def _watch(self) -> None:
        """Fail a connection whose oldest request waits longer than ``timeout``: cheaper
        than a timer per request, and a stopped Redis is still noticed."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(self.timeout / 4, 0.05))
            conn = self._conn
            if conn is not None and not conn.closed and conn.busy_since is not None:
                if loop.time() - conn.busy_since > self.timeout:
                    if self.down_since is None:  # the outage began with the oldest request
                        self.down_since = time.monotonic() - (loop.time() - conn.busy_since)
                    conn.fail(RedisTimeoutError("Redis did not answer in time"))

    async def _send(self, conn: _Connection, commands: list[tuple[Any, ...]]) -> list[Any]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        if conn.closed or conn.transport is None:
            raise RedisConnectionError("connection to Redis lost")
        if not conn.waiting:
            conn.busy_since = loop.time()
        conn.waiting.extend(futures)
        conn.transport.write(b"".join([hiredis.pack_command(c) for c in commands]))
        if len(futures) == 1:
            try:
                return [await futures[0]]
            except ResponseError as exc:
                return [exc]
        done = await asyncio.gather(*futures, return_exceptions=True)
        for result in done:
            if isinstance(result, (RedisConnectionError, RedisTimeoutError)):
                raise result
        return done

    async def execute(self, *args: Any) -> Any:
        (result,) = await self.pipeline([args])
        return result

    async def pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send commands in one write; raises the first error reply."""
        if self.down_since is not None and time.monotonic() - self.down_since > self.timeout:
            # a long outage: fail at once instead of making every request wait it out,
            # while a probe looks for Redis coming back
            if self._probe is None or self._probe.done():
                self._probe = asyncio.create_task(self._probe_until_up())
            await asyncio.wait({self._probe}, timeout=1.0)
            if self.down_since is not None:
                raise RedisConnectionError("Redis is unreachable")
        try:
            conn = await self._connection()
            results = await self._send(conn, commands)
        except (RedisConnectionError, RedisTimeoutError):
            if self.down_since is None:
                self.down_since = time.monotonic()
            raise
        self.down_since = None
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    async def _probe_until_up(self) -> None:
        while self.down_since is not None:
            try:
                conn = await self._connection()
                fut = asyncio.get_running_loop().create_future()
                await self._send_probe(conn, fut)
                self.down_since = None
                return
            except (RedisConnectionError, RedisTimeoutError, TimeoutError):
                await asyncio.sleep(0.2)

    async def _send_probe(self, conn: _Connection, fut: asyncio.Future[Any]) -> None:
        if not conn.waiting:
            conn.busy_since = asyncio.get_running_loop().time()
        conn.waiting.append(fut)
        assert conn.transport is not None
        conn.transport.write(hiredis.pack_command(("PING",)))
        try:
            await asyncio.wait_for(asyncio.shield(fut), min(self.timeout, 1.0))
        except TimeoutError:
            conn.fail(RedisTimeoutError("Redis did not answer in time"))
            raise

    async def evalsha(self, script: str, keys: list[Any], args: list[Any]) -> Any:
        sha = self._shas.get(script)
        if sha is None:
            sha = self._shas[script] = hashlib.sha1(script.encode()).hexdigest().encode()
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            return await self.execute("EVAL", script, len(keys), *keys, *args)

    async def aclose(self) -> None:
        for task in (self._watchdog, self._probe):
            if task is not None:
                task.cancel()
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()
        self._conn = None


def pairs_to_dict(flat: list[Any]) -> dict[Any, Any]:
    return dict(zip(flat[::2], flat[1::2], strict=True))
