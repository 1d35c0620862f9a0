"""A small asyncio Redis client for the filesystem's hot path.

Every FUSE operation costs at least one Redis round trip, so the client's own
overhead is on the critical path of every ``stat``, ``open`` and ``create``. This
client writes RESP directly to the transport and parses with hiredis; requests on a
connection are pipelined (responses come back in order and resolve a queue of
futures), which makes one round trip cost roughly half of what the general-purpose
asyncio client costs. Administrative code (transactions with WATCH, scans) keeps
using redis-py.

Shapes (``chunkfs.meta.redis_url`` parses the URL):

* standalone, over TCP, TLS (``rediss://``) or a unix socket: one connection to one
  server; nothing else sits between a request and the socket.
* Sentinel: the primary's address comes from the first sentinel that answers; the
  connection checks ``ROLE`` when it opens. A broken connection, or a primary that
  became a replica (``READONLY``), makes the next request ask the sentinels again.
  Replication is asynchronous, so a mutation (``write=True``) is followed by ``WAIT``
  in the same write to the socket: it is acknowledged only once ``wait_replicas``
  replicas hold it, and a failover cannot lose it. A connection's first ``WAIT`` is
  preceded by a ``PUBLISH``, so that it also covers a retried mutation whose first run
  went through an earlier connection (``WAIT`` counts only a connection's own writes).
* Cluster: one connection per primary, commands routed by the slot of their (first)
  key; every script's keys share one hash tag. ``MOVED`` updates the slot map (and
  reloads it before the next request), ``ASK`` sends ``ASKING`` plus the command to the
  importing node once, ``TRYAGAIN`` and ``CLUSTERDOWN`` are retried after a pause.

Failure model: a connection that breaks or does not answer within ``timeout`` fails
every request waiting on it with ``ConnectionError``/``TimeoutError`` (redis-py's
classes, so ``with_retries`` treats both clients alike) and is discarded; the next
request reconnects (and, with Sentinel or Cluster, finds the current topology again).
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chunkfs.meta import redis_url
from chunkfs.meta.redis_url import RedisTarget

Address = tuple[str, int]
SLOTS = 16384
_KEYLESS = frozenset({"PING", "TIME", "INFO", "CONFIG", "CLUSTER", "ROLE", "WAIT", "SCRIPT",
                      "ASKING", "PUBLISH", "SENTINEL", "AUTH", "SELECT"})
_REDIRECTS = ("MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN")


class TlsFailure(AuthenticationError):
    """The TLS handshake failed (certificate not trusted, wrong host name, ...): retrying
    cannot help."""


class ReplicationUnconfirmed(RedisConnectionError):
    """A mutation reached the primary, but not enough replicas confirmed it in time.
    Retryable: a retry of the same request is answered from its stored reply and
    waits for the replicas again."""


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.busy_since: float | None = None  # oldest unanswered request (watchdog)
        self.synced = False  # Sentinel: a WAIT on this connection covered every earlier write

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


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


async def _send(conn: _Connection, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Write ``commands`` at once; their replies in order (error replies as exceptions)."""
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


class _Node:
    """One server: one pipelined connection, its handshake, and a watchdog."""

    def __init__(self, owner: RespClient, address: Address, *, unix_path: str | None = None,
                 tls: ssl.SSLContext | None = None, username: str | None = None,
                 password: str | None = None, db: int = 0, primary_only: bool = False) -> None:
        self.owner = owner
        self.address = address
        self.unix_path = unix_path
        self.tls = tls
        self._username, self._password = username, password
        self.db = db
        self.primary_only = primary_only
        self._conn: _Connection | None = None
        self._connecting: asyncio.Lock | None = None
        self._watchdog: asyncio.Task[None] | None = None

    async def run(self, commands: list[tuple[Any, ...]], write: bool = False) -> list[Any]:
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self.connection()
        return await _send(conn, commands)

    async def connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._conn is not None and not self._conn.closed:
                return self._conn
            conn = await self._open()
            try:
                await asyncio.wait_for(self._handshake(conn), self.owner.timeout)
            except BaseException:
                conn.fail(RedisConnectionError("handshake failed"))
                raise
            self._conn = conn
            if self._watchdog is None or self._watchdog.done():
                self._watchdog = asyncio.create_task(self._watch())
            return conn

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        host, port = self.address
        try:
            if self.unix_path:
                coro = loop.create_unix_connection(_Connection, self.unix_path)
            elif self.tls is not None:
                coro = loop.create_connection(
                    _Connection, host, port, ssl=self.tls,
                    server_hostname=host if self.tls.check_hostname else None)
            else:
                coro = loop.create_connection(_Connection, host, port)
            _, conn = await asyncio.wait_for(coro, self.owner.timeout)
        except ssl.SSLError as exc:  # a certificate problem does not heal by retrying
            raise TlsFailure(f"TLS handshake with Redis failed: {exc.reason}") from None
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"cannot connect to Redis: {exc}") from exc
        return conn

    async def _handshake(self, conn: _Connection) -> None:
        hello: list[tuple[Any, ...]] = []
        if self._password:
            hello.append(("AUTH", self._username, self._password) if self._username
                         else ("AUTH", self._password))
        if self.db:
            hello.append(("SELECT", self.db))
        if self.primary_only:
            hello.append(("ROLE",))
        if not hello:
            return
        replies = await _send(conn, hello)
        for command, reply in zip(hello, replies, strict=True):
            if isinstance(reply, ResponseError):
                if command[0] == "AUTH" or str(reply).startswith(("WRONGPASS", "NOAUTH",
                                                                  "NOPERM")):
                    raise AuthenticationError(str(reply).split(".")[0])
                raise reply
        if self.primary_only and replies[-1][0] != b"master":
            raise RedisConnectionError(f"{self.address[0]}:{self.address[1]} is not the "
                                       "primary (any more); asking the sentinels again")

    async def _watch(self) -> None:
        """Fail a connection whose oldest request waits longer than ``timeout``: cheaper
        than a timer per request, and a stopped Redis is still noticed."""
        loop = asyncio.get_running_loop()
        owner = self.owner
        while True:
            await asyncio.sleep(max(owner.timeout / 4, 0.05))
            conn = self._conn
            if conn is not None and not conn.closed and conn.busy_since is not None:
                if loop.time() - conn.busy_since > owner.timeout:
                    if owner.down_since is None:  # the outage began with the oldest request
                        owner.down_since = time.monotonic() - (loop.time() - conn.busy_since)
                    conn.fail(RedisTimeoutError("Redis did not answer in time"))

    async def probe(self, patience: float) -> None:
        """One PING that gives up after ``patience`` s (and drops a connection that hangs)."""
        conn = await self.connection()
        fut = asyncio.get_running_loop().create_future()
        # the PING's reply (or the connection's failure) may come after we gave up on it:
        # nobody awaits it then, so its outcome is consumed here
        fut.add_done_callback(_consume)
        if not conn.waiting:
            conn.busy_since = asyncio.get_running_loop().time()
        conn.waiting.append(fut)
        assert conn.transport is not None
        conn.transport.write(hiredis.pack_command(("PING",)))
        try:
            await asyncio.wait_for(asyncio.shield(fut), patience)
        except TimeoutError:
            conn.fail(RedisTimeoutError("Redis did not answer in time"))
            raise

    def drop(self, exc: Exception) -> None:
        if self._conn is not None:
            self._conn.fail(exc)

    async def aclose(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()
        self._conn = None


NodeFactory = Callable[..., _Node]


class _Single:
    """Standalone Redis: every command goes to one node."""

    def __init__(self, node: _Node) -> None:
        self.node = node
        self.run = node.run

    async def probe(self, patience: float) -> None:
        await self.node.probe(patience)

    async def aclose(self) -> None:
        await self.node.aclose()


class _Sentinel:
    """The primary named by the sentinels; re-resolved after a failure or failover."""

    def __init__(self, target: RedisTarget, make: NodeFactory, sentinel: NodeFactory,
                 timeout: float) -> None:
        self.master = target.master or ""
        self.wait = target.wait_replicas
        self.wait_ms = max(int(min(1.0, timeout / 2) * 1000), 10)
        self.sentinels = [sentinel(address) for address in target.nodes]
        self.make = make
        self.timeout = timeout
        self.primary: _Node | None = None
        self._resolving: asyncio.Lock | None = None

    async def _primary(self) -> _Node:
        if self.primary is not None:
            return self.primary
        if self._resolving is None:
            self._resolving = asyncio.Lock()
        async with self._resolving:
            if self.primary is None:
                self.primary = self.make(await self._ask(), primary_only=True)
            return self.primary

    async def _ask(self) -> Address:
        for i, node in enumerate(self.sentinels):
            try:
                (reply,) = await asyncio.wait_for(
                    node.run([("SENTINEL", "get-master-addr-by-name", self.master)]),
                    min(self.timeout, 1.0))
            except (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError) as exc:
                node.drop(RedisConnectionError(str(exc)))
                continue
            if isinstance(reply, ResponseError) or not reply:
                continue  # refused us, or does not know that name
            self.sentinels.insert(0, self.sentinels.pop(i))  # ask it first next time
            return reply[0].decode(), int(reply[1])
        raise RedisConnectionError(f"no sentinel answered with a primary named {self.master!r}")

    def _forget(self, node: _Node, exc: Exception) -> None:
        if self.primary is node:
            self.primary = None
        node.drop(exc)
        asyncio.get_running_loop().create_task(node.aclose())

    async def run(self, commands: list[tuple[Any, ...]], write: bool = False) -> list[Any]:
        node = await self._primary()
        replicate = write and self.wait > 0
        try:
            if replicate:
                conn = await node.connection()
                lead = [] if conn.synced else [("PUBLISH", "cfs:sync", "")]
                batch = [*lead, *commands, ("WAIT", self.wait, self.wait_ms)]
                replies = await _send(conn, batch)
                acked, results = replies[-1], replies[len(lead):-1]
            else:
                results = await node.run(commands)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self._forget(node, exc)
            raise
        for result in results:
            if isinstance(result, ResponseError) and str(result).startswith("READONLY"):
                exc = RedisConnectionError("the primary became a replica (failover)")
                self._forget(node, exc)
                raise exc
        if replicate:
            if not isinstance(acked, int) or acked < self.wait:
                raise ReplicationUnconfirmed(
                    f"{acked if isinstance(acked, int) else 0} of {self.wait} replicas "
                    f"confirmed a mutation within {self.wait_ms} ms")
            conn.synced = True
        return results

    async def probe(self, patience: float) -> None:
        node = await self._primary()
        try:
            await node.probe(patience)
        except (RedisConnectionError, RedisTimeoutError, TimeoutError) as exc:
            self._forget(node, RedisConnectionError(str(exc)))
            raise

    async def aclose(self) -> None:
        for node in [*self.sentinels, *([self.primary] if self.primary else [])]:
            await node.aclose()


def _crc16(data: bytes) -> int:
    """CRC16-CCITT (XModem), as Redis Cluster hashes keys."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFF00) ^ _CRC_TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC_TABLE = _crc_table()


def key_slot(key: bytes | str) -> int:
    """The cluster slot of a key: of its ``{hash tag}`` when it has a non-empty one."""
    raw = key.encode() if isinstance(key, str) else key
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1:end]
    return _crc16(raw) % SLOTS


def command_key(command: tuple[Any, ...]) -> Any:
    """The key a command is routed by (None: any node will do)."""
    name = command[0]
    if name in ("EVALSHA", "EVAL"):
        return command[3] if int(command[2]) > 0 else None
    if name in _KEYLESS or len(command) < 2:
        return None
    return command[1]


class _Cluster:
    """Redis Cluster: a slot map, one node per primary, redirections followed."""

    def __init__(self, target: RedisTarget, make: NodeFactory, timeout: float) -> None:
        self.seeds = list(target.nodes)
        self.make = make
        self.timeout = timeout
        self.nodes: dict[Address, _Node] = {}
        self.slots: list[Address | None] = [None] * SLOTS
        self.stale = True
        self._refreshing: asyncio.Lock | None = None
        self._slot_of: dict[Any, int] = {}
        self.redirects = {"moved": 0, "ask": 0, "retry": 0}  # seen, for status and tests

    def _discard(self, address: Address) -> None:
        node = self.nodes.pop(address, None)
        if node is not None:
            asyncio.get_running_loop().create_task(node.aclose())

    def node(self, address: Address) -> _Node:
        node = self.nodes.get(address)
        if node is None:
            node = self.nodes[address] = self.make(address)
        return node

    async def refresh(self) -> None:
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            if not self.stale:
                return
            for address in dict.fromkeys([*self.nodes, *self.seeds]):
                try:
                    (reply,) = await asyncio.wait_for(
                        self.node(address).run([("CLUSTER", "SLOTS")]), min(self.timeout, 2.0))
                except AuthenticationError:
                    raise
                except (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError):
                    self._discard(address)
                    continue
                if isinstance(reply, ResponseError) or not reply:
                    continue
                slots: list[Address | None] = [None] * SLOTS
                for start, end, primary, *_ in reply:
                    host = primary[0].decode() if primary[0] else address[0]
                    where = (host, int(primary[1]))
                    for slot in range(int(start), int(end) + 1):
                        slots[slot] = where
                self.slots = slots
                self.stale = False
                return
            raise RedisConnectionError("no Redis Cluster node answered CLUSTER SLOTS")

    def _address(self, command: tuple[Any, ...]) -> Address:
        key = command_key(command)
        if key is None:
            return next((a for a in self.slots if a is not None), self.seeds[0])
        slot = self._slot_of.get(key)
        if slot is None:
            slot = key_slot(key)
            if len(self._slot_of) > 4096:
                self._slot_of.clear()
            self._slot_of[key] = slot
        address = self.slots[slot]
        if address is None:
            self.stale = True
            raise RedisConnectionError(f"no Redis Cluster node serves slot {slot}")
        return address

    async def _send_group(self, address: Address, commands: list[tuple[Any, ...]],
                          asking: list[bool]) -> list[Any]:
        batch: list[tuple[Any, ...]] = []
        for command, ask in zip(commands, asking, strict=True):
            if ask:
                batch.append(("ASKING",))
            batch.append(command)
        replies = await self.node(address).run(batch)
        out, i = [], 0
        for ask in asking:
            i += 1 if ask else 0
            out.append(replies[i])
            i += 1
        return out

    async def run(self, commands: list[tuple[Any, ...]], write: bool = False) -> list[Any]:
        if self.stale:
            await self.refresh()
        targets = [self._address(c) for c in commands]
        asking = [False] * len(commands)
        results: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))
        for attempt in range(8):
            groups: dict[Address, list[int]] = {}
            for i in todo:
                groups.setdefault(targets[i], []).append(i)
            outcomes = await asyncio.gather(
                *(self._send_group(a, [commands[i] for i in idx], [asking[i] for i in idx])
                  for a, idx in groups.items()), return_exceptions=True)
            redo, pause = [], False
            for (address, idx), outcome in zip(groups.items(), outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    if not isinstance(outcome, AuthenticationError):
                        self.stale = True
                        self._discard(address)
                    raise outcome
                for i, reply in zip(idx, outcome, strict=True):
                    results[i] = reply
                    asking[i] = False
                    if not isinstance(reply, ResponseError) or not str(reply).startswith(
                            _REDIRECTS):
                        continue
                    word, *rest = str(reply).split()
                    self.redirects["moved" if word == "MOVED" else "ask" if word == "ASK"
                                   else "retry"] += 1
                    if word in ("MOVED", "ASK"):
                        host, _, port = rest[1].rpartition(":")
                        targets[i] = (host or address[0], int(port))
                        if word == "MOVED":
                            self.slots[int(rest[0])] = targets[i]
                            self.stale = True  # the whole map is reloaded before next time
                        else:
                            asking[i] = True
                    else:
                        pause = True
                    redo.append(i)
            if not redo:
                return results
            todo = redo
            if pause:
                await asyncio.sleep(0.02 * (attempt + 1))
        raise RedisConnectionError(f"Redis Cluster kept redirecting ({results[todo[0]]})")

    async def probe(self, patience: float) -> None:
        self.stale = True
        await asyncio.wait_for(self.refresh(), patience)

    async def aclose(self) -> None:
        for node in self.nodes.values():
            await node.aclose()


class RespClient:
    def __init__(self, target: RedisTarget, *, timeout: float = 10.0) -> None:
        self.target = target
        self.timeout = timeout
        self._shas: dict[str, bytes] = {}
        # when Redis stopped answering (monotonic clock); None while it answers. Callers
        # measure their deadline from here, so one outage is waited out once, not once
        # per request of a FUSE operation
        self.down_since: float | None = None
        self._probe: asyncio.Task[None] | None = None
        tls = target.tls.context() if target.tls is not None else None
        # every node made, so that rotated credentials reach them all (``rotate``)
        self._data_nodes: weakref.WeakSet[_Node] = weakref.WeakSet()
        self._sentinel_nodes: weakref.WeakSet[_Node] = weakref.WeakSet()

        def make(address: Address, primary_only: bool = False) -> _Node:
            node = _Node(self, address, unix_path=target.unix_path, tls=tls,
                         username=self.target.username, password=self.target.password,
                         db=target.db, primary_only=primary_only)
            self._data_nodes.add(node)
            return node

        def sentinel(address: Address) -> _Node:
            node = _Node(self, address, username=self.target.sentinel_username,
                         password=self.target.sentinel_password)
            self._sentinel_nodes.add(node)
            return node

        if target.kind == "sentinel":
            self._router: _Single | _Sentinel | _Cluster = _Sentinel(target, make, sentinel,
                                                                      timeout)
        elif target.kind == "cluster":
            self._router = _Cluster(target, make, timeout)
        else:
            self._router = _Single(make(target.nodes[0] if target.nodes else ("", 0)))
        self._run = self._router.run

    def rotate(self, target: RedisTarget) -> None:
        """Rotated credentials for the same servers (a Secret changed under a running
        mount): every connection opened from now on authenticates with them. Open
        connections stay: Redis checked their credentials when they opened, and a
        revoked password ends them only when Redis drops them (then they reconnect with
        these)."""
        old = self.target
        if (target.kind, target.nodes, target.db, target.unix_path, target.master,
                target.tls is None) != (old.kind, old.nodes, old.db, old.unix_path, old.master,
                                        old.tls is None):
            raise ValueError("rotated credentials must name the same Redis servers and database")
        self.target = target
        for node in list(self._data_nodes):
            node._username, node._password = target.username, target.password
        for node in list(self._sentinel_nodes):
            node._username, node._password = target.sentinel_username, target.sentinel_password

    @property
    def redirects(self) -> dict[str, int]:
        """Cluster redirections followed so far (MOVED, ASK, TRYAGAIN/CLUSTERDOWN)."""
        return dict(getattr(self._router, "redirects", {}))

    @classmethod
    def from_url(cls, url: str, timeout: float = 10.0) -> RespClient:
        return cls(redis_url.parse(url), timeout=timeout)

    async def execute(self, *args: Any) -> Any:
        (result,) = await self.pipeline([args])
        return result

    async def pipeline(self, commands: list[tuple[Any, ...]], *, write: bool = False) -> list[Any]:
        """Send commands in one write; raises the first error reply. ``write``: they
        mutate (with Sentinel, acknowledged once replicas hold them)."""
        if self.down_since is not None and time.monotonic() - self.down_since > self.timeout:
            # a long outage: fail at once instead of making every request wait it out,
            # while a probe looks for Redis coming back
            if self._probe is None or self._probe.done():
                self._probe = asyncio.create_task(self._probe_until_up())
            await asyncio.wait({self._probe}, timeout=1.0)
            if self.down_since is not None:
                raise RedisConnectionError("Redis is unreachable")
        try:
            results = await self._run(commands, write)
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
                await self._router.probe(min(self.timeout, 1.0))
                self.down_since = None
                return
            except (RedisConnectionError, RedisTimeoutError, TimeoutError, ResponseError):
                await asyncio.sleep(0.2)

    async def evalsha(self, script: str, keys: list[Any], args: list[Any], *,
                      write: bool = False) -> Any:
        sha = self._shas.get(script)
        if sha is None:
            sha = self._shas[script] = hashlib.sha1(script.encode()).hexdigest().encode()
        try:
            (result,) = await self.pipeline([("EVALSHA", sha, len(keys), *keys, *args)],
                                            write=write)
            return result
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            (result,) = await self.pipeline([("EVAL", script, len(keys), *keys, *args)],
                                            write=write)
            return result

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        await self._router.aclose()


def pairs_to_dict(flat: list[Any]) -> dict[Any, Any]:
    return dict(zip(flat[::2], flat[1::2], strict=True))
