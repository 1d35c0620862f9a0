"""Whole-namespace operations: create, export, import, delete.

Snapshots and clones are built from these: a namespace is exported (every inode
hash, directory, block map and xattr of the volume, no block data) and imported
under a new id. The export is also the snapshot manifest written to S3, so the
durable state of a snapshot survives the loss of Redis. Cost grows with the number
of inodes, never with the bytes stored.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import secrets
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException, ResponseError

from chunkfs.blocks import slices
from chunkfs.meta import topology
from chunkfs.meta.resp import key_slot
from chunkfs.meta.schema import FREEZE_SECONDS, NO_INODE, ROOT_INODE, Keys, lua
from chunkfs.meta.schema import InodeField as F
from chunkfs.meta.schema import VolumeField as V

FORMAT = 2  # 2: block maps are slice lists, inline slices included (1: one object a block)

# Batch scripts: one server-side call per _BATCH inodes instead of four commands each.
# They declare the namespaces' volume keys (which route them on Redis Cluster) and touch
# only keys of the same hash tags; across two slots of a cluster the COPY is not tried
# at all and callers fall back to export + import.
# KEYS: src vol, dst vol ; ARGV: src prefix, dst prefix, inodes...
_COPY_BATCH = lua(r"""
local src, dst = ARGV[1], ARGV[2]
for i = 3, #ARGV do
  for _, t in ipairs(PER_INODE) do
    redis.call('COPY', src .. t .. ARGV[i], dst .. t .. ARGV[i])
  end
end
return #ARGV - 2
""")
# KEYS: vol ; ARGV: prefix, inodes...  ->  per inode its hashes in PER_INODE order
_DUMP_BATCH = lua(r"""
local prefix, out = ARGV[1], {}
for i = 2, #ARGV do
  for _, t in ipairs(PER_INODE) do
    out[#out + 1] = redis.call('HGETALL', prefix .. t .. ARGV[i])
  end
end
return out
""")
_BATCH = 2000


def new_namespace_id() -> str:
    return secrets.token_hex(8)


def _s(b: bytes) -> str:
    return b.decode("latin-1")


def _b(s: str) -> bytes:
    return s.encode("latin-1")


async def init_namespace(r: aioredis.Redis, ns: str, settings: dict[str, Any],
                         root_mode: int = 0o41777) -> None:
    """Create the volume hash and the root directory of an empty namespace.

    The root is world-writable with the sticky bit, as /tmp is: every uid sharing the
    volume can create entries, none can remove or rename another's."""
    k = Keys(ns)
    now = time.time_ns()
    async with r.pipeline(transaction=True) as pipe:
        pipe.hset(k.vol, mapping={V.USED: 0, V.INODES: 1, V.NEXT_INO: ROOT_INODE,
                                  V.EPOCH: 1, V.WRITER: "", **settings})
        pipe.hset(k.inode(ROOT_INODE), mapping={F.MODE: root_mode, F.UID: 0, F.GID: 0, F.NLINK: 2,
                                                F.SIZE: 0, F.ATIME: now, F.MTIME: now, F.CTIME: now,
                                                F.RDEV: 0, F.PARENT: ROOT_INODE})
        pipe.sadd(k.idx, ROOT_INODE)
        await pipe.execute()


# Freezes nest: every freezer (a snapshot, a clone, a backup) holds its own deadline in a
# field "frozen:<token>" of the volume hash, and ``frozen`` (what the scripts check) is the
# latest deadline of them all, so the first freezer to thaw does not thaw the others.
# KEYS: vol ; ARGV: "frozen:<token>", deadline (unix ms) or "" to thaw
_FREEZE = lua(r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
else redis.call('HDEL', KEYS[1], ARGV[1]) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all, top = redis.call('HGETALL', KEYS[1]), nil
for i = 1, #all, 2 do
  if string.sub(all[i], 1, #V.frozen + 1) == V.frozen .. ':' then
    local d = tonumber(all[i + 1]) or 0
    if d <= now then redis.call('HDEL', KEYS[1], all[i])
    elseif not top or d > top then top = d end
  end
end
if top then redis.call('HSET', KEYS[1], V.frozen, string.format('%d', top))
else redis.call('HDEL', KEYS[1], V.frozen) end
return top
""")


def _frozen_field(token: str) -> str:
    return f"{V.FROZEN}:{token}"


async def freeze(r: aioredis.Redis, ns: str, token: str = "-") -> None:
    """Make writers of ``ns`` wait (for at most FREEZE_SECONDS unless renewed) while it
    is copied; ``token`` names this freezer (another one's thaw does not end it)."""
    deadline = int(time.time() * 1000) + FREEZE_SECONDS * 1000
    await r.eval(_FREEZE, 1, Keys(ns).vol, _frozen_field(token), deadline)


async def thaw(r: aioredis.Redis, ns: str, token: str = "-") -> None:
    await r.eval(_FREEZE, 1, Keys(ns).vol, _frozen_field(token), "")


def _unfrozen(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k != V.FROZEN and not k.startswith(f"{V.FROZEN}:")}


# Change capture for an incremental backup (docs/dev/backup.md), one atomic step: the
# changes noted since the last capture move from ``changed`` into ``capture`` (which keeps
# those of a capture whose backup failed), and tracking goes on in a new ``changed``.
# KEYS: vol, changed, capture ; ARGV: '1' to return the captured inodes, NO_INODE (the
# member that keeps the new ``changed`` existing)
#   ->  {1 if tracking was on, the inode numbers in capture (when asked and tracking was on)}
_CAPTURE = lua(r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('NOVOL') end
local tracked = redis.call('EXISTS', KEYS[2])
if tracked == 1 then
  redis.call('SUNIONSTORE', KEYS[3], KEYS[3], KEYS[2])
  redis.call('DEL', KEYS[2])
end
redis.call('SADD', KEYS[2], ARGV[2])
if ARGV[1] == '1' and tracked == 1 then return {1, redis.call('SMEMBERS', KEYS[3])} end
return {tracked, {}}
""")


async def capture_changes(r: aioredis.Redis, ns: str, *, listed: bool) -> tuple[bool, set[int]]:
    """Take the changes noted since the last capture (the namespace must be frozen, so
    that they are exactly those since then) and start noting anew. Returns whether
    tracking was on (if not, nothing is known: the backup must be full) and, when
    ``listed``, every inode changed since the capture of the volume's last recorded
    backup (this capture's and those of failed backups since)."""
    k = Keys(ns)
    tracked, members = await r.eval(_CAPTURE, 3, k.vol, k.changed, k.capture,
                                    "1" if listed else "0", NO_INODE)
    return bool(tracked), {int(m) for m in members} - {NO_INODE}


async def export_namespace(r: aioredis.Redis, ns: str,
                           only: list[int] | None = None) -> dict[str, Any]:
    """Everything of a namespace but block data, as a JSON-able document; with ``only``,
    just those of these inode numbers that exist (and are not orphans)."""
    k = Keys(ns)
    settings = _unfrozen({_s(a): _s(b) for a, b in (await r.hgetall(k.vol)).items()})
    inos = sorted(int(i) for i in await r.smembers(k.idx)) if only is None else sorted(only)
    inodes: dict[str, Any] = {}
    for start in range(0, len(inos), _BATCH):
        batch = inos[start:start + _BATCH]
        flat = await r.eval(_DUMP_BATCH, 1, k.vol, k.prefix, *batch)
        rows = [dict(zip(f[::2], f[1::2], strict=True)) for f in flat]
        for n, ino in enumerate(batch):
            attr, entries, blocks, xattrs, inline_slices = rows[5 * n:5 * n + 5]
            if not attr:
                continue
            inline = attr.pop(F.DATA.encode(), None)
            doc: dict[str, Any] = {"attr": {_s(a): _s(b) for a, b in attr.items()}}
            if inline is not None:
                doc["data"] = base64.b64encode(inline).decode()
            if entries:
                doc["dir"] = {_s(a): int(b) for a, b in entries.items()}
            if blocks:
                doc["blocks"] = {_s(a): _s(b) for a, b in blocks.items()}
            if xattrs:
                doc["xattr"] = {_s(a): base64.b64encode(b).decode() for a, b in xattrs.items()}
            if inline_slices:
                doc["slices"] = {_s(a): base64.b64encode(b).decode()
                                 for a, b in inline_slices.items()}
            inodes[str(ino)] = doc
    orphans = await r.hkeys(k.orphans)
    for ino in orphans:  # unlinked-but-open files are not part of a snapshot
        inodes.pop(_s(ino), None)
    return {"format": FORMAT, "namespace": ns, "created": time.time(), "settings": settings,
            "inodes": inodes}


def node_bytes(node: dict[str, Any]) -> int:
    """What an exported inode charges to its volume: data, names, symlink target, xattrs."""
    n = len(base64.b64decode(node["data"])) if "data" in node else 0
    n += sum(slices.extent(slices.parse(v)) for v in node.get("blocks", {}).values())
    n += sum(len(_b(name)) for name in node.get("dir", {}))
    n += len(_b(node["attr"].get(F.TARGET, "")))
    n += sum(len(_b(a)) + len(base64.b64decode(v)) for a, v in node.get("xattr", {}).items())
    return n


async def import_namespace(r: aioredis.Redis, ns: str, doc: dict[str, Any],
                           settings: dict[str, Any]) -> None:
    """Write an exported document under namespace ``ns`` (which must not exist)."""
    if doc.get("format") == 1:  # one object a block: the same as a slice list of one
        for node in doc["inodes"].values():
            node["blocks"] = {i: slices.from_legacy(e) for i, e in node.get("blocks", {}).items()}
    elif doc.get("format") != FORMAT:
        raise ValueError(f"unsupported manifest format {doc.get('format')!r}")
    k = Keys(ns)
    items = list(doc["inodes"].items())
    src = doc["settings"]
    used = sum(node_bytes(node) for _, node in items)
    slicebytes = sum(len(base64.b64decode(v)) for _, node in items
                     for v in node.get("slices", {}).values())
    base = {V.USED: used, V.INODES: len(items), V.NEXT_INO: src.get(V.NEXT_INO, 1),
            V.BLOCK_SIZE: src.get(V.BLOCK_SIZE), V.EPOCH: 1, V.WRITER: "",
            V.SLICEBYTES: slicebytes}
    # the volume record first: GC finds namespaces by it, so blocks are protected while
    # the rest is written
    await r.hset(k.vol, mapping={**{a: v for a, v in base.items() if v is not None}, **settings})
    for start in range(0, len(items), _BATCH):
        pipe = r.pipeline(transaction=False)
        for ino_s, node in items[start:start + _BATCH]:
            ino = int(ino_s)
            attr = {a: _b(v) for a, v in node["attr"].items()}
            if "data" in node:
                attr[F.DATA] = base64.b64decode(node["data"])
            pipe.hset(k.inode(ino), mapping=attr)
            if node.get("dir"):
                pipe.hset(k.dir(ino), mapping={_b(a): v for a, v in node["dir"].items()})
            if node.get("blocks"):
                pipe.hset(k.blocks(ino), mapping=dict(node["blocks"].items()))
            if node.get("xattr"):
                pipe.hset(k.xattr(ino), mapping={_b(a): base64.b64decode(v)
                                                 for a, v in node["xattr"].items()})
            if node.get("slices"):
                pipe.hset(k.slices(ino), mapping={_b(a): base64.b64decode(v)
                                                  for a, v in node["slices"].items()})
            pipe.sadd(k.idx, ino)
        await pipe.execute()


async def copy_namespace(r: aioredis.Redis, src: str, dst: str, settings: dict[str, Any],
                         only: list[int] | None = None) -> bool:
    """Copy a namespace inside Redis (``COPY``, no data through this process); with
    ``only``, the volume record and just those of these inodes that exist.

    The caller makes sure ``src`` does not change meanwhile (frozen, or a snapshot).
    Returns False, having written nothing, when the server refuses (Redis Cluster keeps
    the two namespaces in different slots): the caller then exports and imports.
    """
    s, d = Keys(src), Keys(dst)
    if topology.is_cluster(r) and key_slot(s.vol) != key_slot(d.vol):
        return False  # COPY cannot cross slots
    try:
        await r.copy(s.vol, d.vol)
    except (ResponseError, RedisClusterException):
        return False
    if only is None:
        inos = [int(i) for i in await r.smembers(s.idx)]
    else:
        present = await r.smismember(s.idx, only) if only else []
        inos = [ino for ino, there in zip(only, present, strict=True) if there]
    orphans = {int(i) for i in await r.hkeys(s.orphans)}
    live = [ino for ino in inos if ino not in orphans]
    for start in range(0, len(live), _BATCH):
        await r.eval(_COPY_BATCH, 2, s.vol, d.vol, s.prefix, d.prefix,
                     *live[start:start + _BATCH])
    if live:
        await r.sadd(d.idx, *live)
    used = int(await r.hget(s.vol, V.USED) or 0)
    slicebytes = int(await r.hget(s.vol, V.SLICEBYTES) or 0)
    for ino in orphans:  # unlinked-but-open files are not part of the copy
        inline, target = await r.hmget(s.inode(ino), F.DATA, F.TARGET)
        used -= len(inline or b"") + len(target or b"")
        used -= sum(slices.extent(slices.parse(v)) for v in await r.hvals(s.blocks(ino)))
        used -= sum(len(a) + len(b) for a, b in (await r.hgetall(s.xattr(ino))).items())
        slicebytes -= sum(len(v) for v in await r.hvals(s.slices(ino)))
    freezers = [f for f in await r.hkeys(d.vol) if f.startswith(f"{V.FROZEN}:".encode())]
    await r.hdel(d.vol, V.FROZEN, V.READY, V.SOURCE_VOLUME, *freezers)
    await r.hset(d.vol, mapping={V.USED: used, V.INODES: len(live), V.EPOCH: 1, V.WRITER: "",
                                 V.SLICEBYTES: slicebytes, **settings})
    return True


async def delete_namespace(r: aioredis.Redis, ns: str) -> None:
    k = Keys(ns)
    inos = [int(i) for i in await r.smembers(k.idx)]
    for start in range(0, len(inos), _BATCH):
        keys = [key for ino in inos[start:start + _BATCH] for key in k.per_inode(ino)]
        await r.delete(*keys)
    await r.delete(k.idx, k.orphans, k.sessions, k.pending, k.settled, k.publications, k.hot,
                   k.backup, k.changed, k.capture,
                   k.vol)


def encode_manifest(doc: dict[str, Any]) -> bytes:
    return gzip.compress(json.dumps(doc, separators=(",", ":")).encode(), compresslevel=1)


def decode_manifest(data: bytes) -> dict[str, Any]:
    return json.loads(gzip.decompress(data))


async def encode_manifest_async(doc: dict[str, Any]) -> bytes:
    return await asyncio.to_thread(encode_manifest, doc)
