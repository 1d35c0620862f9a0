"""Whole-namespace operations: create, export, import, delete.

Snapshots and clones are built from these: a namespace is exported (every inode
hash, directory, block map and xattr of the volume, no block data) and imported
under a new id. The export is also the snapshot manifest written to S3, so the
durable state of a snapshot survives the loss of Redis. Cost grows with the number
of inodes, never with the bytes stored.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import secrets
import time
from typing import Any

import redis.asyncio as aioredis

from chunkfs.meta.schema import ROOT_INODE, Keys

FORMAT = 1
_BATCH = 2000
FREEZE_SECONDS = 60


def new_namespace_id() -> str:
    return secrets.token_hex(8)


def _s(b: bytes) -> str:
    return b.decode("latin-1")


def _b(s: str) -> bytes:
    return s.encode("latin-1")


async def init_namespace(r: aioredis.Redis, ns: str, settings: dict[str, Any],
                         root_mode: int = 0o40777) -> None:
    """Create the volume hash and the root directory of an empty namespace."""
    k = Keys(ns)
    now = time.time_ns()
    async with r.pipeline(transaction=True) as pipe:
        pipe.hset(k.vol, mapping={"used": 0, "inodes": 1, "next_ino": ROOT_INODE,
                                  "epoch": 1, "writer": "", **settings})
        pipe.hset(k.inode(ROOT_INODE), mapping={"m": root_mode, "u": 0, "g": 0, "n": 2, "s": 0,
                                                "a": now, "t": now, "c": now, "r": 0,
                                                "p": ROOT_INODE})
        pipe.sadd(k.idx, ROOT_INODE)
        await pipe.execute()


async def freeze(r: aioredis.Redis, ns: str) -> None:
    """Make writers of ``ns`` wait (for at most FREEZE_SECONDS) while it is copied."""
    await r.hset(Keys(ns).vol, "frozen", int(time.time() * 1000) + FREEZE_SECONDS * 1000)


async def thaw(r: aioredis.Redis, ns: str) -> None:
    await r.hdel(Keys(ns).vol, "frozen")


async def export_namespace(r: aioredis.Redis, ns: str) -> dict[str, Any]:
    """Everything of a namespace but block data, as a JSON-able document."""
    k = Keys(ns)
    settings = {_s(a): _s(b) for a, b in (await r.hgetall(k.vol)).items()}
    inos = sorted(int(i) for i in await r.smembers(k.idx))
    inodes: dict[str, Any] = {}
    for start in range(0, len(inos), _BATCH):
        batch = inos[start:start + _BATCH]
        pipe = r.pipeline(transaction=False)
        for ino in batch:
            for key in k.per_inode(ino):
                pipe.hgetall(key)
        rows = await pipe.execute()
        for n, ino in enumerate(batch):
            attr, entries, blocks, xattrs = rows[4 * n:4 * n + 4]
            if not attr:
                continue
            doc: dict[str, Any] = {"attr": {_s(a): _s(b) for a, b in attr.items()}}
            if entries:
                doc["dir"] = {_s(a): int(b) for a, b in entries.items()}
            if blocks:
                doc["blocks"] = {_s(a): _s(b) for a, b in blocks.items()}
            if xattrs:
                doc["xattr"] = {_s(a): _s(b) for a, b in xattrs.items()}
            inodes[str(ino)] = doc
    orphans = await r.hkeys(k.orphans)
    for ino in orphans:  # unlinked-but-open files are not part of a snapshot
        inodes.pop(_s(ino), None)
    return {"format": FORMAT, "namespace": ns, "created": time.time(), "settings": settings,
            "inodes": inodes}


async def import_namespace(r: aioredis.Redis, ns: str, doc: dict[str, Any],
                           settings: dict[str, Any]) -> None:
    """Write an exported document under namespace ``ns`` (which must not exist)."""
    if doc.get("format") != FORMAT:
        raise ValueError(f"unsupported manifest format {doc.get('format')!r}")
    k = Keys(ns)
    items = list(doc["inodes"].items())
    src = doc["settings"]
    used = sum(len(_b(node["attr"].get("d", ""))) for _, node in items)
    used += sum(int(e.rsplit(":", 1)[1]) for _, node in items
                for e in node.get("blocks", {}).values())
    base = {"used": used, "inodes": len(items), "next_ino": src.get("next_ino", 1),
            "block_size": src.get("block_size"), "epoch": 1, "writer": ""}
    # the volume record first: GC finds namespaces by it, so blocks are protected while
    # the rest is written
    await r.hset(k.vol, mapping={**{a: v for a, v in base.items() if v is not None}, **settings})
    for start in range(0, len(items), _BATCH):
        pipe = r.pipeline(transaction=False)
        for ino_s, node in items[start:start + _BATCH]:
            ino = int(ino_s)
            pipe.hset(k.inode(ino), mapping={a: _b(v) for a, v in node["attr"].items()})
            if node.get("dir"):
                pipe.hset(k.dir(ino), mapping={_b(a): v for a, v in node["dir"].items()})
            if node.get("blocks"):
                pipe.hset(k.blocks(ino), mapping=dict(node["blocks"].items()))
            if node.get("xattr"):
                pipe.hset(k.xattr(ino), mapping={_b(a): _b(v) for a, v in node["xattr"].items()})
            pipe.sadd(k.idx, ino)
        await pipe.execute()


async def delete_namespace(r: aioredis.Redis, ns: str) -> None:
    k = Keys(ns)
    inos = [int(i) for i in await r.smembers(k.idx)]
    for start in range(0, len(inos), _BATCH):
        keys = [key for ino in inos[start:start + _BATCH] for key in k.per_inode(ino)]
        await r.delete(*keys)
    await r.delete(k.idx, k.orphans, k.sessions, k.vol)


def encode_manifest(doc: dict[str, Any]) -> bytes:
    return gzip.compress(json.dumps(doc, separators=(",", ":")).encode(), compresslevel=3)


def decode_manifest(data: bytes) -> dict[str, Any]:
    return json.loads(gzip.decompress(data))


async def encode_manifest_async(doc: dict[str, Any]) -> bytes:
    return await asyncio.to_thread(encode_manifest, doc)
