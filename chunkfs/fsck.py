"""Consistency check of one namespace: the invariants the Lua scripts maintain.

Tests run it after filesystem workloads (a self-checking suite); operators run it
with ``chunkfs fsck``. It only reads; every finding is a line of text.
"""

from __future__ import annotations

import stat
from collections import Counter

import redis.asyncio as aioredis

from chunkfs.blocks import slices
from chunkfs.blocks.slices import Slice
from chunkfs.meta.schema import ROOT_INODE, Keys, VolumeRecord
from chunkfs.meta.schema import InodeField as F
from chunkfs.objstore import ObjectStore, block_key


async def check_namespace(r: aioredis.Redis, ns: str,
                          store: ObjectStore | None = None) -> list[str]:
    k = Keys(ns)
    problems: list[str] = []
    raw_vol = await r.hgetall(k.vol)
    if not raw_vol:
        return [f"namespace {ns} has no volume record"]
    vol = VolumeRecord.parse(raw_vol)
    inos = sorted(int(i) for i in await r.smembers(k.idx))
    orphans = {int(i) for i in await r.hkeys(k.orphans)}
    attrs: dict[int, dict[str, bytes]] = {}
    dirs: dict[int, dict[bytes, bytes]] = {}
    blocks: dict[int, dict[bytes, bytes]] = {}
    xattr_bytes: dict[int, int] = {}
    inline: dict[int, dict[bytes, bytes]] = {}
    for start in range(0, len(inos), 2000):
        batch = inos[start:start + 2000]
        pipe = r.pipeline(transaction=False)
        for ino in batch:
            pipe.hgetall(k.inode(ino))
            pipe.hgetall(k.dir(ino))
            pipe.hgetall(k.blocks(ino))
            pipe.hgetall(k.xattr(ino))
            pipe.hgetall(k.slices(ino))
        rows = await pipe.execute()
        for n, ino in enumerate(batch):
            attrs[ino] = {a.decode(): b for a, b in rows[5 * n].items()}
            dirs[ino], blocks[ino] = rows[5 * n + 1], rows[5 * n + 2]
            xattr_bytes[ino] = sum(len(a) + len(b) for a, b in rows[5 * n + 3].items())
            inline[ino] = rows[5 * n + 4]
    links: Counter[int] = Counter()
    stored_inline = 0
    subdirs: Counter[int] = Counter()
    used = 0
    for ino in inos:
        attr = attrs[ino]
        if not attr:
            problems.append(f"inode {ino} is indexed but has no attributes")
            continue
        mode = int(attr[F.MODE])
        # metadata is charged to the volume too: names, symlink targets, xattrs
        used += sum(len(name) for name in dirs[ino]) + len(attr.get(F.TARGET, b"")) + xattr_bytes[ino]
        for name, child in dirs[ino].items():
            child_ino = int(child)
            if child_ino not in attrs or not attrs[child_ino]:
                problems.append(f"entry {name!r} in directory {ino} points to missing inode {child_ino}")
                continue
            links[child_ino] += 1
            if stat.S_ISDIR(int(attrs[child_ino][F.MODE])):
                subdirs[ino] += 1
                if int(attrs[child_ino].get(F.PARENT, b"0")) != ino:
                    problems.append(f"directory {child_ino} has parent {attrs[child_ino].get(F.PARENT)}"
                                    f" but is listed in {ino}")
        if dirs[ino] and not stat.S_ISDIR(mode):
            problems.append(f"non-directory {ino} has entries")
        if F.DATA in attr:
            used += len(attr[F.DATA])
            if blocks[ino]:
                problems.append(f"inode {ino} has both inline data and blocks")
        size = int(attr.get(F.SIZE, b"0"))
        bs = vol.block_size
        named: set[str] = set()
        for idx, raw in blocks[ino].items():
            where = f"inode {ino} block {int(idx)}"
            try:
                block = slices.parse(raw)
            except ValueError:
                problems.append(f"{where} has an unreadable slice list {raw[:80]!r}")
                continue
            extent = slices.extent(block)
            used += extent
            if int(idx) * bs >= max(size, 0) and extent and size >= 0:
                # bytes past the size may exist (written after the last commit's snapshot of
                # the size), but a block wholly past the end is never committed
                problems.append(f"{where} starts past the file size {size}")
            if not block or all(s.ref == slices.ZERO for s in block):
                problems.append(f"{where} is stored although it reads as a hole")
            for s in block:
                problems += _slice_problems(where, s, bs, inline[ino], named)
            if store is not None:
                for digest, n in slices.object_refs(raw):
                    if not await store.exists(block_key(digest, n)):
                        problems.append(f"{where} object {digest} is missing")
        stored_inline += sum(len(v) for v in inline[ino].values())
        for orphan in sorted(set(inline[ino]) - {n.encode() for n in named}):
            problems.append(f"inode {ino} keeps inline slice {orphan.decode()} that no block names")
    for ino in inos:
        attr = attrs[ino]
        if not attr:
            continue
        mode, nlink = int(attr[F.MODE]), int(attr[F.NLINK])
        if ino == ROOT_INODE:
            expected = 2 + subdirs[ino]
        elif stat.S_ISDIR(mode):
            expected = 2 + subdirs[ino]
            if links[ino] != 1:
                problems.append(f"directory {ino} is linked {links[ino]} times")
        else:
            expected = links[ino]
        if nlink != expected and not (ino in orphans and links[ino] == 0):
            problems.append(f"inode {ino} has nlink {nlink}, expected {expected}")
        if ino != ROOT_INODE and links[ino] == 0 and ino not in orphans:
            problems.append(f"inode {ino} is not reachable from any directory")
    if vol.slicebytes != stored_inline:
        problems.append(f"volume records {vol.slicebytes} inline slice bytes, "
                        f"the files hold {stored_inline}")
    if vol.used != used:
        problems.append(f"volume records {vol.used} bytes used, blocks add up to {used}")
    if vol.inodes != len(inos):
        problems.append(f"volume records {vol.inodes} inodes, index has {len(inos)}")
    return problems


def _slice_problems(where: str, s: Slice, bs: int, inline: dict[bytes, bytes],
                    named: set[str]) -> list[str]:
    """What is wrong with one slice of a block (its bytes must exist and fit)."""
    out = []
    if s.length <= 0 or s.pos < 0 or s.end > bs or s.off < 0:
        out.append(f"{where} has a slice out of bounds: {s.encode()}")
    if s.inline:
        named.add(s.inline_id)
        blob = inline.get(s.inline_id.encode())
        if blob is None:
            out.append(f"{where} names inline slice {s.inline_id}, which is gone")
        elif s.off + s.length > len(blob):
            out.append(f"{where} reads past inline slice {s.inline_id}")
    elif s.ref != slices.ZERO:
        try:
            size = s.object_size
        except ValueError:
            return [*out, f"{where} names an unreadable object {s.ref!r}"]
        if s.off + s.length > size:
            out.append(f"{where} reads past its object: {s.encode()}")
    return out
