"""Metadata of one mounted volume, over Redis.

The key schema is documented in ``chunkfs.meta.schema``; every mutation is one Lua
script from ``chunkfs.meta.scripts`` (atomic, fenced by the writer epoch). This module
adds the client-side policy: retries with backoff while Redis is unreachable (bounded
by ``deadline``), waiting out a snapshot freeze, and translating script error codes
into typed exceptions.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import random
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chunkfs.blocks import slices
from chunkfs.blocks.slices import Slice
from chunkfs.errors import (
    Fenced,
    FsError,
    InlineFull,
    MetaUnavailable,
    NoSpace,
    ReadOnly,
    SessionExpired,
    SliceConflict,
    VolumeFrozen,
)
from chunkfs.latency import Latency
from chunkfs.meta import redis_url, scripts
from chunkfs.meta.resp import RespClient, TlsFailure, pairs_to_dict
from chunkfs.meta.schema import (
    ATTR_FIELDS,
    FREEZE_SECONDS,
    GC_DOOMED,
    GC_LAST,
    GC_STATE,
    Attr,
    GcRun,
    InodeField,
    Keys,
    VolumeRecord,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_ERRNO_CODES = {name: getattr(errno, name) for name in (
    "ENOENT", "EEXIST", "ENOTEMPTY", "ENOTDIR", "EISDIR", "EINVAL", "EPERM", "ENODATA", "ELOOP")}
# a freeze ends by itself FREEZE_SECONDS after its last renewal: waiting longer than
# that means the snapshot's copy keeps renewing it, which is reported, not waited out
_FROZEN_WAIT = FREEZE_SECONDS + 5.0
_MUTATIONS = ("CREATE", "LINK", "UNLINK", "RENAME", "SETATTR", "TRUNCATE", "COMMIT", "XATTR",
              "PURGE", "HEARTBEAT", "REGISTER", "SETTLE")


def connect_fast(url: str, timeout: float = 10.0) -> RespClient:
    """The hot-path client a mount uses for every filesystem operation."""
    return RespClient.from_url(url, timeout=timeout)


class _SentinelRedis(aioredis.Redis):
    """The primary's client of a Sentinel URL; closing it closes the sentinels' too."""

    sentinel: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel is not None:
            for client in self.sentinel.sentinels:
                await client.aclose()


@functools.cache
def _driver_info() -> dict[str, Any]:
    """redis-py reads its own version from its package metadata for every client it makes
    (for CLIENT SETINFO): milliseconds of parsing on each mount's startup. Once per process
    instead (redis-py versions without ``driver_info`` read it their own way)."""
    try:
        from redis.driver_info import resolve_driver_info
    except ImportError:
        return {}
    return {"driver_info": resolve_driver_info()}


def connect(url: str) -> aioredis.Redis:
    """The administrative client (redis-py) for every shape of metadata URL
    (``chunkfs.meta.redis_url``); short socket timeouts so a dead Redis is noticed
    quickly. On Redis Cluster it is a ``RedisCluster``, which offers the same commands
    (callers that scan keys use ``chunkfs.meta.topology``)."""
    target = redis_url.parse(url)
    common: dict[str, Any] = {"decode_responses": False, "socket_timeout": 10,
                              "socket_connect_timeout": 5, "username": target.username,
                              "password": target.password, **_driver_info()}
    if target.kind == "cluster":
        return RedisCluster(  # type: ignore[return-value]
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            max_connections=64, **common)
    # with_retries retries (bounded, with backoff): redis-py backing off inside each call
    # too would multiply the wait, also for what cannot heal (credentials, certificates).
    # One immediate retry still replaces a connection the server closed while idle.
    common["retry"] = Retry(NoBackoff(), 1)
    if target.kind == "sentinel":
        sentinel = Sentinel(
            list(target.nodes), sentinel_kwargs={
                "socket_timeout": 5, "socket_connect_timeout": 5,
                "username": target.sentinel_username, "password": target.sentinel_password},
            db=target.db, health_check_interval=30, **common)
        client = sentinel.master_for(target.master or "", redis_class=_SentinelRedis,
                                     max_connections=64)
        client.sentinel = sentinel
        return client
    if target.kind == "unix":
        return aioredis.Redis(unix_socket_path=target.unix_path, health_check_interval=30,
                              max_connections=64, **common)
    tls = target.tls.redis_py() if target.tls is not None else {}
    return aioredis.Redis(host=target.host, port=target.port, db=target.db,
                          health_check_interval=30, max_connections=64, **tls, **common)


def error_code(exc: ResponseError) -> str:
    """The short code a script returned (Redis may prefix it with ``ERR``)."""
    words = str(exc).split()
    if words and words[0] == "ERR" and len(words) > 1:
        words = words[1:]
    return words[0] if words else ""


def translate(exc: ResponseError) -> Exception:
    code = error_code(exc)
    if code in _ERRNO_CODES:
        return FsError(_ERRNO_CODES[code])
    if code == "FENCED":
        return Fenced("this mount's writer lease was revoked (volume published to another node)")
    if code == "ENOSPC":
        return NoSpace("volume capacity exceeded")
    if code == "EROFS":
        return ReadOnly("snapshots are read-only")
    if code in ("WRONGPASS", "NOAUTH", "NOPERM"):
        return MetaUnavailable("Redis refused the credentials (check the password in the URL)")
    if code == "NOVOL":
        return FsError(errno.ESTALE, "volume was deleted")
    if code == "SLICEFULL":
        return InlineFull("the volume keeps as many small writes in Redis as it may")
    if code == "CONFLICT":
        return SliceConflict("the block changed meanwhile")
    if code == "SESSION":
        return SessionExpired("this mount was unreachable for so long that its session was "
                              "declared dead; remount the volume")
    return exc


@dataclass(frozen=True)
class BlockOp:
    """One change to a block's slice list in a COMMIT: ``op`` is 'A' (append the slices
    of ``value``), 'S' (set it to ``value``) or 'C' (set, only if it is ``expected``)."""

    index: int
    op: str
    value: str
    expected: str = ""


@dataclass
class MetaStats:
    requests: int = 0
    errors: int = 0
    latency_sum: float = 0.0
    by_op: dict[str, int] = field(default_factory=dict)
    latency: Latency = field(default_factory=Latency)

    def observe(self, op: str, seconds: float) -> None:
        self.requests += 1
        self.latency_sum += seconds
        self.by_op[op] = self.by_op.get(op, 0) + 1
        self.latency.observe(seconds)

    def failed(self, op: str, err: BaseException) -> None:
        self.errors += 1
        self.latency.error(f"{op}: {type(err).__name__}")

    def as_dict(self) -> dict[str, Any]:
        avg = self.latency_sum / self.requests if self.requests else 0.0
        return {"requests": self.requests, "errors": self.errors,
                "avg_latency_ms": round(avg * 1000, 3), "by_op": dict(self.by_op),
                "latency": self.latency.as_dict()}


async def with_retries(call: Callable[[], Awaitable[T]], *, deadline: float,
                       stats: MetaStats | None = None, op: str = "",
                       client: Any = None) -> T:
    """Run ``call``, retrying connection failures and snapshot freezes until ``deadline``.

    With a ``client`` that knows since when Redis is down, the deadline counts from the
    start of the outage: operations started later fail fast instead of waiting again.
    """
    limit = time.monotonic() + deadline
    frozen_limit = time.monotonic() + _FROZEN_WAIT
    delay = 0.02
    while True:
        start = time.monotonic()
        try:
            result = await call()
            if stats is not None:
                stats.observe(op, time.monotonic() - start)
            return result
        except TlsFailure as exc:  # retrying cannot help
            raise MetaUnavailable(f"{exc} (check ssl_ca_certs and the host name in the "
                                  "URL)") from exc
        except AuthenticationError as exc:
            raise MetaUnavailable("Redis refused the credentials (check the user and password "
                                  "in the URL)") from exc
        except ResponseError as exc:
            if error_code(exc) == "FROZEN":
                if time.monotonic() < frozen_limit:
                    await asyncio.sleep(0.01 + random.random() * 0.02)
                    continue
                raise VolumeFrozen(f"a snapshot of the volume kept writers waiting for more "
                                   f"than {_FROZEN_WAIT:.0f}s") from exc
            raise translate(exc) from exc
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            tls = _tls_failure(exc)
            if tls is not None:  # redis-py's form of a certificate problem: retrying cannot help
                raise MetaUnavailable(f"TLS handshake with Redis failed: {tls} (check "
                                      "ssl_ca_certs and the host name in the URL)") from exc
            if stats is not None:
                stats.failed(op, exc)
            down_since = getattr(client, "down_since", None)
            if down_since is not None:
                limit = min(limit, down_since + deadline)
            if time.monotonic() + delay > limit:
                raise MetaUnavailable(f"Redis unreachable: {type(exc).__name__}") from exc
            log.warning("redis retry", extra={"op": op, "error": type(exc).__name__})
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)


def _tls_failure(exc: BaseException) -> str | None:
    """The reason when ``exc`` was caused by a failed TLS handshake (redis-py wraps it)."""
    seen = 0
    cause: BaseException | None = exc
    while cause is not None and seen < 5:
        if isinstance(cause, ssl.SSLError):
            return cause.reason or type(cause).__name__
        cause = cause.__cause__ or cause.__context__
        seen += 1
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text or "WRONG_VERSION_NUMBER" in text:
        return "certificate verify failed" if "CERTIFICATE" in text else "not a TLS server"
    return None


def _listing(flat: list[Any]) -> list[tuple[bytes, Attr]]:
    """(name, attributes) of a flat name, ino, fields ... reply; inodes gone are left out."""
    out = []
    for i in range(0, len(flat), 3):
        attr = Attr.from_fields(int(flat[i + 1]), flat[i + 2])
        if attr is not None:
            out.append((flat[i], attr))
    return out


def now_ns() -> int:
    return time.time_ns()


class VolumeMeta:
    """Metadata operations of one volume namespace, as seen by one mount."""

    def __init__(self, client: RespClient, ns: str, *, epoch: str, session: str,
                 read_only: bool = False, deadline: float = 60.0) -> None:
        self.r = client
        self.keys = Keys(ns)
        self.epoch = epoch
        self.session = session
        self.read_only = read_only
        self.deadline = deadline
        self.stats = MetaStats()
        self._requests = 0
        self._instance = secrets.token_hex(6)
        # bytes our commits added to the volume's usage since volume_state() last read it
        self.charged = 0

    def _request_key(self) -> str:
        """A reply key unique to one logical request (kept across its retries)."""
        self._requests += 1
        return self.keys.reply(f"{self._instance}.{self._requests}")

    def request_key(self) -> str:
        """A reply key for a request the caller may have to send again later, exactly as
        it was (``commit(..., request_key=)``): a retry after an unknown outcome."""
        return self._request_key()

    async def _run(self, name: str, keys: list[str], args: list[Any],
                   request_key: str | None = None) -> Any:
        if self.read_only and name in _MUTATIONS and name not in ("REGISTER", "SETTLE"):
            raise ReadOnly("mounted read-only")
        script = getattr(scripts, name)
        if name in _MUTATIONS:
            keys = [*keys, request_key or self._request_key()]
        write = name in _MUTATIONS
        return await with_retries(lambda: self.r.evalsha(script, keys, args, write=write),
                                  deadline=self.deadline, stats=self.stats, op=name.lower(),
                                  client=self.r)

    async def _call(self, op: str, call: Callable[[], Awaitable[T]]) -> T:
        return await with_retries(call, deadline=self.deadline, stats=self.stats, op=op,
                                  client=self.r)

    # ---- reads -------------------------------------------------------------------
    async def volume_state(self) -> VolumeRecord | None:
        """The volume's record (None: its hash is gone). Its ``used`` includes every commit
        of ours counted in ``charged`` when the read began; those are forgotten (a commit
        that lands during the read stays counted until the next one: usage is
        overestimated, never under)."""
        counted = self.charged
        raw = await self._call("vol", lambda: self.r.execute("HGETALL", self.keys.vol))
        self.charged -= counted
        fields = pairs_to_dict(raw)
        return VolumeRecord.parse(fields) if fields else None

    async def gc_record(self) -> GcRun | None:
        """The engine's last GC run (``cfs{_gc}:last``), for the mount's status."""
        raw = await self._call("gc", lambda: self.r.execute("HGETALL", GC_LAST))
        return GcRun.parse(pairs_to_dict(raw))

    async def getattr(self, ino: int) -> Attr:
        values = await self._call("getattr",
                                  lambda: self.r.execute("HMGET", self.keys.inode(ino), *ATTR_FIELDS))
        attr = Attr.from_fields(ino, values)
        if attr is None:
            raise FsError(errno.ENOENT)
        return attr

    async def getattrs(self, inos: Iterable[int]) -> list[Attr | None]:
        inos = list(inos)

        commands = [("HMGET", self.keys.inode(ino), *ATTR_FIELDS) for ino in inos]
        rows = await self._call("getattrs", lambda: self.r.pipeline(commands)) if inos else []
        return [Attr.from_fields(ino, row) for ino, row in zip(inos, rows, strict=True)]

    async def lookup(self, parent: int, name: bytes) -> Attr:
        res = await self._run("LOOKUP", [self.keys.dir(parent)], [name, self.keys.prefix])
        if res is None:
            raise FsError(errno.ENOENT)
        attr = Attr.from_fields(int(res[0]), res[1])
        if attr is None:
            raise FsError(errno.ENOENT)
        return attr

    async def lookup_dir(self, parent: int, name: bytes, limit: int,
                         ) -> tuple[Attr | None, int, list[tuple[bytes, Attr]] | None]:
        """One round trip: the entry (None if absent), the directory's entry count, and,
        when that is at most ``limit``, every entry with its attributes."""
        ino, fields, count, flat = await self._run(
            "LOOKUP_DIR", [self.keys.dir(parent)], [name, self.keys.prefix, limit])
        attr = Attr.from_fields(int(ino), fields) if ino else None
        return attr, int(count), None if flat is None else _listing(flat)

    async def dir_page(self, parent: int, cursor: bytes, count: int,
                       ) -> tuple[bytes, list[tuple[bytes, Attr]]]:
        """One HSCAN step of a directory with its entries' attributes; cursor b"0" is
        both the first and, returned, the end."""
        nxt, flat = await self._run("DIR_PAGE", [self.keys.dir(parent)],
                                    [cursor, count, self.keys.prefix])
        return nxt, _listing(flat)

    async def readdir(self, ino: int) -> list[tuple[bytes, int]]:
        """Every entry, sorted. Read in HSCAN steps: one HGETALL of a directory with a
        million entries would stall Redis for every volume it serves."""
        key = self.keys.dir(ino)

        async def scan() -> dict[bytes, bytes]:
            found: dict[bytes, bytes] = {}
            cursor = b"0"
            while True:
                cursor, flat = await self.r.execute("HSCAN", key, cursor, "COUNT", 1000)
                found.update(pairs_to_dict(flat))
                if cursor in (b"0", 0, "0"):
                    return found

        raw = await self._call("readdir", scan)
        return sorted((name, int(child)) for name, child in raw.items())

    async def readlink(self, ino: int) -> bytes:
        target = await self._call("readlink",
                                  lambda: self.r.execute("HGET", self.keys.inode(ino), InodeField.TARGET))
        if target is None:
            raise FsError(errno.EINVAL)
        return target

    async def file_data(self, ino: int) -> tuple[bytes | None, dict[int, list[Slice]]]:
        """Inline data (None when the file uses blocks) and the block map of a file."""
        _, inline, entries = await self.open_file(ino, with_attr=False)
        return inline, entries

    async def open_file(self, ino: int, *, with_attr: bool = True,
                        ) -> tuple[Attr | None, bytes | None, dict[int, list[Slice]]]:
        """Attributes, inline data and block map of a file in one round trip."""
        commands: list[tuple[Any, ...]] = [("HGET", self.keys.inode(ino), InodeField.DATA),
                                           ("HGETALL", self.keys.blocks(ino))]
        if with_attr:
            commands.append(("HMGET", self.keys.inode(ino), *ATTR_FIELDS))
        rows = await self._call("open", lambda: self.r.pipeline(commands))
        attr = None
        if with_attr:
            attr = Attr.from_fields(ino, rows[2])
            if attr is None:
                raise FsError(errno.ENOENT)
        blocks = {int(k): slices.parse(v) for k, v in pairs_to_dict(rows[1]).items()}
        return attr, rows[0], blocks

    async def inline_slices(self, ino: int, ids: Sequence[str]) -> dict[str, bytes]:
        """The bytes of inline slices of a file (``y<ino>``); missing ids are left out."""
        if not ids:
            return {}
        values = await self._call("slices", lambda: self.r.execute(
            "HMGET", self.keys.slices(ino), *ids))
        return {i: v for i, v in zip(ids, values, strict=True) if v is not None}

    async def getxattr(self, ino: int, name: bytes) -> bytes | None:
        return await self._call("getxattr",
                                lambda: self.r.execute("HGET", self.keys.xattr(ino), name))

    async def listxattr(self, ino: int) -> list[bytes]:
        return await self._call("listxattr",
                                lambda: self.r.execute("HKEYS", self.keys.xattr(ino)))

    # ---- mutations ---------------------------------------------------------------
    async def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int, *,
                     rdev: int = 0, target: bytes = b"", inline: bool = False) -> Attr:
        now = now_ns()
        is_dir = (mode & 0o170000) == 0o040000
        ino, mode, gid = await self._run(
            "CREATE",
            [self.keys.vol, self.keys.dir(parent), self.keys.inode(parent), self.keys.idx],
            [self.epoch, name, mode, uid, gid, rdev, now, target, self.keys.prefix,
             "1" if is_dir else "0", parent, "1" if inline else "0"])
        return Attr(int(ino), int(mode), uid, int(gid), 2 if is_dir else 1, len(target), now, now,
                    now, rdev)

    async def link(self, ino: int, parent: int, name: bytes) -> None:
        await self._run("LINK", [self.keys.vol, self.keys.dir(parent), self.keys.inode(parent),
                                 self.keys.inode(ino)], [self.epoch, name, ino, now_ns()])

    async def unlink(self, parent: int, name: bytes, *, is_dir: bool,
                     keep_if_open: bool) -> tuple[int, int]:
        """Remove an entry; returns (inode, links left). Orphans it when ``keep_if_open``."""
        ino, left = await self._run(
            "UNLINK", [self.keys.vol, self.keys.dir(parent), self.keys.inode(parent)],
            [self.epoch, name, "1" if is_dir else "0", now_ns(), self.keys.prefix,
             "1" if keep_if_open else "0", self.session])
        return int(ino), int(left)

    async def rename(self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes,
                     flags: int, *, keep_if_open: bool) -> tuple[int, int]:
        """Returns (replaced inode or 0, links it has left)."""
        k = self.keys
        replaced, left = await self._run(
            "RENAME", [k.vol, k.dir(parent_old), k.dir(parent_new), k.inode(parent_old),
                       k.inode(parent_new)],
            [self.epoch, name_old, name_new, flags, now_ns(), k.prefix,
             "1" if keep_if_open else "0", self.session, parent_old, parent_new])
        return int(replaced), int(left)

    async def setattr(self, ino: int, fields: dict[str, int]) -> None:
        args: list[Any] = [self.epoch]
        for key, value in fields.items():
            args += [key, value]
        await self._run("SETATTR", [self.keys.vol, self.keys.inode(ino)], args)

    async def truncate(self, ino: int, size: int, block_size: int) -> None:
        k = self.keys
        await self._run("TRUNCATE", [k.vol, k.inode(ino), k.blocks(ino), k.slices(ino)],
                        [self.epoch, size, block_size, now_ns()])

    async def commit(self, ino: int, *, size: int, ops: Sequence[BlockOp] = (),
                     store: dict[str, bytes] | None = None, inline: bytes | None = None,
                     settle: Sequence[str] = (), exact: bool = False, keep_times: bool = False,
                     request_key: str | None = None) -> None:
        """Make new data visible atomically: an inline body, or changes to block slice
        lists (``BlockOp``), with the bytes of new inline slices (``store``).
        ``settle``: object keys of this session's uploads that the new block map references,
        released from GC's protection in the same step. ``exact``: the file becomes exactly
        ``size`` bytes (blocks past it go), instead of at least ``size``. Raises InlineFull
        when the volume keeps as many inline slice bytes as it may, SliceConflict when a
        compare-and-set op finds its block changed."""
        args: list[Any] = [self.epoch, now_ns(), size]
        mode = ("X" if exact else "") + ("K" if keep_times else "")
        args += ["I" + mode, inline] if inline is not None else ["B" + mode, ""]
        args += [self.session, len(settle), *settle, len(ops)]
        for op in ops:
            args += [op.index, op.op, op.value, op.expected]
        store = store or {}
        args.append(len(store))
        for blob_id, data in store.items():
            args += [blob_id, data]
        k = self.keys
        grew = await self._run("COMMIT", [k.vol, k.inode(ino), k.blocks(ino), k.pending,
                                          k.settled, k.sessions, k.slices(ino)], args, request_key)
        if isinstance(grew, int) and grew > 0:
            self.charged += grew

    @property
    def instance(self) -> str:
        """Unique to this object: a prefix for ids it makes (inline slices)."""
        return self._instance

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        await self._run("XATTR", [self.keys.vol, self.keys.inode(ino), self.keys.xattr(ino)],
                        [self.epoch, name, value, flags, now_ns(), "0"])

    async def removexattr(self, ino: int, name: bytes) -> None:
        await self._run("XATTR", [self.keys.vol, self.keys.inode(ino), self.keys.xattr(ino)],
                        [self.epoch, name, b"", 0, now_ns(), "1"])

    async def heartbeat(self) -> None:
        """Tell other mounts and GC that this session is alive (its orphans must not be
        reaped, its uploads not collected). Raises SessionExpired once GC declared it dead."""
        if self.read_only:
            return
        await self._run("HEARTBEAT", [self.keys.vol, self.keys.sessions], [self.session])

    async def end_session(self) -> None:
        """A clean end: release every upload registration, then the session itself."""
        if self.read_only:
            return
        await self.settle_uploads(["*"])
        await self._call("heartbeat", lambda: self.r.execute(
                "HDEL", self.keys.sessions, self.session))

    # ---- upload protection (docs/dev/gc.md) -------------------------------------------
    async def register_upload(self, object_key: str) -> tuple[int, bool]:
        """Count an upload GC must keep until a commit references it; returns (GC
        generation, True while a GC run is deleting that very object)."""
        k = self.keys
        await self._run("REGISTER", [k.vol, k.pending, k.sessions], [self.session, object_key])
        return await self.doomed(object_key)

    async def doomed(self, object_key: str) -> tuple[int, bool]:
        gen, doomed = await self._call("doomed", lambda: self.r.evalsha(
            scripts.DOOMED, [GC_DOOMED, GC_STATE], [object_key]))
        return int(gen), bool(int(doomed))

    async def settle_uploads(self, object_keys: Sequence[str]) -> None:
        """Release registrations of uploads no commit will reference (``["*"]``: all)."""
        if object_keys:
            k = self.keys
            await self._run("SETTLE", [k.vol, k.pending, k.settled], [self.session, *object_keys])

    async def reap_orphans(self) -> int:
        """Purge unlinked inodes left behind by mounts that died while holding them."""
        if self.read_only:
            return 0
        orphans, sessions = await self._call("reap", lambda: self.r.pipeline([
            ("HGETALL", self.keys.orphans), ("HGETALL", self.keys.sessions)]))
        alive = {s for s, exp in pairs_to_dict(sessions).items()
                 if exp.isdigit() and int(exp) > time.time() * 1000}
        reaped = 0
        for ino, session in pairs_to_dict(orphans).items():
            if session not in alive and session.decode() != self.session:
                await self.purge(int(ino))
                reaped += 1
        return reaped

    async def purge(self, ino: int) -> None:
        if self.read_only:
            return
        await self._run("PURGE", [self.keys.vol], [self.epoch, self.keys.prefix, ino])
