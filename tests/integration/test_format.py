"""The persistent format, pinned: what a fixed set of operations leaves in Redis and S3.

Volumes outlive releases: a mount of a new release must read what an old one wrote and
write what an old one reads. So every key, every hash field and every block map value
that a volume, its snapshot and a clone of it hold after a fixed workload is compared
with the literal listing below, which was taken from the release before the schema
module became the one source of keys and fields (only clock readings, random ids and
request ids are masked). A change here is a format change: it needs a new manifest
FORMAT or a migration, never a silent edit.
"""

from __future__ import annotations

import hashlib
import re
import stat
from typing import Any

from chunkfs.meta import namespace as nsops
from chunkfs.meta.redis_meta import BlockOp, VolumeMeta
from chunkfs.meta.schema import ATTR_FIELDS, ROOT_INODE, Keys, lua
from chunkfs.objstore import block_key
from chunkfs.volumes import VolumeService, manifest_key

KiB = 1 << 10
BS = 4 << 20  # a volume's block size
BLOCK = b"b" * (4 * KiB)
DIGEST = hashlib.sha256(BLOCK).hexdigest()
REF = f"{DIGEST}_{len(BLOCK)}"
TIME = re.compile(rb"^\d{10,19}(\.\d+)?$")


async def workload(svc: VolumeService) -> None:
    """Every kind of persistent object: directories, inline and block files, a symlink,
    a hard link, xattrs, object and inline slices, a truncate, an orphan, a session, an
    upload record, then a snapshot (manifest) and a clone of it."""
    info = await svc.create_volume("v", 1 << 30)
    meta = VolumeMeta(svc.fast, info.id, epoch="1", session="s1", deadline=10)  # type: ignore[attr-defined]
    await meta.heartbeat()
    d = await meta.create(ROOT_INODE, b"d", stat.S_IFDIR | 0o755, 1000, 1000)
    small = await meta.create(d.ino, b"small", stat.S_IFREG | 0o644, 1000, 1000, inline=True)
    await meta.commit(small.ino, size=5, inline=b"hello")
    await meta.create(ROOT_INODE, b"link", stat.S_IFLNK | 0o777, 0, 0, target=b"d/small")
    big = await meta.create(ROOT_INODE, b"big", stat.S_IFREG | 0o640, 7, 8, rdev=0)
    key = block_key(DIGEST, len(BLOCK))
    await meta.register_upload(key)
    await svc.store.put(key, BLOCK)
    await meta.commit(big.ino, size=2 * BS + 50, settle=[key], store={"s1-1": b"inline slice bytes" * 2},
                      ops=[BlockOp(0, "A", f"{REF}:0:{4 * KiB}:0"), BlockOp(1, "A", "@s1-1:0:36:0"),
                           BlockOp(2, "A", f"{REF}:10:20:30")])
    await meta.truncate(big.ino, BS + 30, BS)  # block 1 is cut, block 2 goes
    await meta.setxattr(big.ino, b"user.k", b"value")
    await meta.link(big.ino, d.ino, b"hard")
    await meta.setattr(big.ino, {"m": stat.S_IFREG | 0o600})
    gone = await meta.create(ROOT_INODE, b"gone", stat.S_IFREG | 0o644, 0, 0, inline=True)
    await meta.unlink(ROOT_INODE, b"gone", is_dir=False, keep_if_open=True)
    assert gone.ino == 6
    await svc.create_snapshot("v", "snap")
    await svc.create_volume("clone", 1 << 30, source_snapshot="snap")


def _mask(key: str, field: bytes, value: bytes) -> bytes:
    """Clock readings vary from run to run: inode times, creation times, expiries."""
    inode_time = re.search(r":i\d+$", key) and field in (b"a", b"t", b"c")
    if inode_time or field == b"created" or key.endswith((":sessions", ":settled")):
        assert TIME.match(value), (key, field, value)
        return b"<t>"
    return value


async def redis_listing(svc: VolumeService) -> dict[str, Any]:
    """Every key of the database: namespace ids by role, times and random ids masked."""
    names = {}
    for registry in (b"cfs:volumes", b"cfs:snapshots"):
        for name, ns in (await svc.r.hgetall(registry)).items():
            names[ns.decode()] = name.decode().upper()
    out: dict[str, Any] = {}
    async for raw_key in svc.r.scan_iter(count=1000):
        key = raw_key.decode().replace(DIGEST, "<sha256>")
        for ns, role in names.items():
            key = key.replace(ns, role)
        key = re.sub(r":r:.*$", ":r:<request>", key)
        kind = (await svc.r.type(raw_key)).decode()
        if kind == "hash":
            value: Any = {f.decode().replace(DIGEST, "<sha256>"):
                          _mask(key, f, v).decode("latin-1").replace(DIGEST, "<sha256>")
                          for f, v in sorted((await svc.r.hgetall(raw_key)).items())}
            if key in ("cfs:volumes", "cfs:snapshots"):
                value = {f: names[v] for f, v in value.items()}
        elif kind == "set":
            value = sorted(int(m) for m in await svc.r.smembers(raw_key))
        else:
            value = "<string>"
        if key.endswith(":r:<request>"):  # stored replies: how many, not which
            out[key] = out.get(key, 0) + 1
        else:
            out[key] = value
    return dict(sorted(out.items()))


def manifest_shape(doc: dict[str, Any]) -> dict[str, Any]:
    """The manifest's layout: its keys, the settings' fields, each inode's parts."""
    return {"keys": sorted(doc), "format": doc["format"], "settings": sorted(doc["settings"]),
            "inodes": {ino: {part: sorted(v) if isinstance(v, dict) else "<data>"
                             for part, v in sorted(node.items())}
                       for ino, node in sorted(doc["inodes"].items())}}


EXPECTED_REDIS: dict[str, Any] = {
    "cfs:engine": "<string>",
    "cfs:snapshots": {"snap": "SNAP"},
    "cfs:volumes": {"clone": "CLONE", "v": "V"},
    "cfs{CLONE}:b5": {"0": "4096|<sha256>_4096:0:4096:0", "1": "30|@s1-1:0:30:0"},
    "cfs{CLONE}:d1": {"big": "5", "d": "2", "link": "4"},
    "cfs{CLONE}:d2": {"hard": "5", "small": "3"},
    "cfs{CLONE}:i1": {"a": "<t>", "c": "<t>", "g": "0", "m": "17407", "n": "3", "p": "1", "r": "0", "s": "0",
                      "t": "<t>", "u": "0"},
    "cfs{CLONE}:i2": {"a": "<t>", "c": "<t>", "g": "1000", "m": "16877", "n": "2", "p": "1", "r": "0",
                      "s": "0", "t": "<t>", "u": "1000"},
    "cfs{CLONE}:i3": {"a": "<t>", "c": "<t>", "d": "hello", "g": "1000", "m": "33188", "n": "1", "r": "0",
                      "s": "5", "t": "<t>", "u": "1000"},
    "cfs{CLONE}:i4": {"a": "<t>", "c": "<t>", "g": "0", "l": "d/small", "m": "41471", "n": "1", "r": "0",
                      "s": "7", "t": "<t>", "u": "0"},
    "cfs{CLONE}:i5": {"a": "<t>", "c": "<t>", "g": "8", "m": "33152", "n": "2", "r": "0", "s": "4194334",
                      "t": "<t>", "u": "7"},
    "cfs{CLONE}:idx": [1, 2, 3, 4, 5],
    "cfs{CLONE}:vol": {"block_size": "4194304", "capacity": "1073741824", "created": "<t>", "epoch": "1",
                       "inodes": "5", "kind": "volume", "name": "clone", "next_ino": "6", "slicebytes": "36",
                       "source": "snapshot:snap", "used": "4166", "writer": ""},
    "cfs{CLONE}:x5": {"user.k": "value"},
    "cfs{CLONE}:y5": {"s1-1": "inline slice bytesinline slice bytes"},
    "cfs{SNAP}:b5": {"0": "4096|<sha256>_4096:0:4096:0", "1": "30|@s1-1:0:30:0"},
    "cfs{SNAP}:d1": {"big": "5", "d": "2", "link": "4"},
    "cfs{SNAP}:d2": {"hard": "5", "small": "3"},
    "cfs{SNAP}:i1": {"a": "<t>", "c": "<t>", "g": "0", "m": "17407", "n": "3", "p": "1", "r": "0", "s": "0",
                     "t": "<t>", "u": "0"},
    "cfs{SNAP}:i2": {"a": "<t>", "c": "<t>", "g": "1000", "m": "16877", "n": "2", "p": "1", "r": "0",
                     "s": "0", "t": "<t>", "u": "1000"},
    "cfs{SNAP}:i3": {"a": "<t>", "c": "<t>", "d": "hello", "g": "1000", "m": "33188", "n": "1", "r": "0",
                     "s": "5", "t": "<t>", "u": "1000"},
    "cfs{SNAP}:i4": {"a": "<t>", "c": "<t>", "g": "0", "l": "d/small", "m": "41471", "n": "1", "r": "0",
                     "s": "7", "t": "<t>", "u": "0"},
    "cfs{SNAP}:i5": {"a": "<t>", "c": "<t>", "g": "8", "m": "33152", "n": "2", "r": "0", "s": "4194334",
                     "t": "<t>", "u": "7"},
    "cfs{SNAP}:idx": [1, 2, 3, 4, 5],
    "cfs{SNAP}:vol": {"block_size": "4194304", "capacity": "1073741824", "created": "<t>", "epoch": "1",
                      "inodes": "5", "kind": "snapshot", "name": "snap", "next_ino": "6", "ready": "1",
                      "slicebytes": "36", "source": "", "source_volume": "v", "used": "4166", "writer": ""},
    "cfs{SNAP}:x5": {"user.k": "value"},
    "cfs{SNAP}:y5": {"s1-1": "inline slice bytesinline slice bytes"},
    "cfs{V}:b5": {"0": "4096|<sha256>_4096:0:4096:0", "1": "30|@s1-1:0:30:0"},
    "cfs{V}:d1": {"big": "5", "d": "2", "link": "4"},
    "cfs{V}:d2": {"hard": "5", "small": "3"},
    "cfs{V}:i1": {"a": "<t>", "c": "<t>", "g": "0", "m": "17407", "n": "3", "p": "1", "r": "0", "s": "0",
                  "t": "<t>", "u": "0"},
    "cfs{V}:i2": {"a": "<t>", "c": "<t>", "g": "1000", "m": "16877", "n": "2", "p": "1", "r": "0", "s": "0",
                  "t": "<t>", "u": "1000"},
    "cfs{V}:i3": {"a": "<t>", "c": "<t>", "d": "hello", "g": "1000", "m": "33188", "n": "1", "r": "0",
                  "s": "5", "t": "<t>", "u": "1000"},
    "cfs{V}:i4": {"a": "<t>", "c": "<t>", "g": "0", "l": "d/small", "m": "41471", "n": "1", "r": "0",
                  "s": "7", "t": "<t>", "u": "0"},
    "cfs{V}:i5": {"a": "<t>", "c": "<t>", "g": "8", "m": "33152", "n": "2", "r": "0", "s": "4194334",
                  "t": "<t>", "u": "7"},
    "cfs{V}:i6": {"a": "<t>", "c": "<t>", "d": "", "g": "0", "m": "33188", "n": "0", "r": "0", "s": "0",
                  "t": "<t>", "u": "0"},
    "cfs{V}:idx": [1, 2, 3, 4, 5, 6],
    "cfs{V}:orphans": {"6": "s1"},
    "cfs{V}:r:<request>": 14,
    "cfs{V}:sessions": {"s1": "<t>"},
    "cfs{V}:settled": {"blocks/53/89/<sha256>_4096": "<t>"},
    "cfs{V}:vol": {"block_size": "4194304", "capacity": "1073741824", "created": "<t>", "epoch": "1",
                   "inodes": "6", "kind": "volume", "name": "v", "next_ino": "6", "slicebytes": "36",
                   "source": "", "used": "4166", "writer": ""},
    "cfs{V}:x5": {"user.k": "value"},
    "cfs{V}:y5": {"s1-1": "inline slice bytesinline slice bytes"},
}
EXPECTED_MANIFEST: dict[str, Any] = {
    "keys": ["created", "format", "inodes", "namespace", "settings"],
    "format": 2,
    "settings": ["block_size", "capacity", "created", "epoch", "inodes", "kind", "name", "next_ino", "ready",
                 "slicebytes", "source", "source_volume", "used", "writer"],
    "inodes": {"1": {"attr": ["a", "c", "g", "m", "n", "p", "r", "s", "t", "u"], "dir": ["big", "d", "link"]},
               "2": {"attr": ["a", "c", "g", "m", "n", "p", "r", "s", "t", "u"], "dir": ["hard", "small"]},
               "3": {"attr": ["a", "c", "g", "m", "n", "r", "s", "t", "u"], "data": "<data>"},
               "4": {"attr": ["a", "c", "g", "l", "m", "n", "r", "s", "t", "u"]},
               "5": {"attr": ["a", "c", "g", "m", "n", "r", "s", "t", "u"], "blocks": ["0", "1"],
                     "slices": ["s1-1"], "xattr": ["user.k"]}},
}


async def test_the_persistent_format_is_unchanged(svc) -> None:
    await workload(svc)
    listing = await redis_listing(svc)
    manifest = manifest_shape(nsops.decode_manifest(await svc.store.get(manifest_key("snap"))))
    assert listing == EXPECTED_REDIS
    assert manifest == EXPECTED_MANIFEST


async def test_the_scripts_build_the_keys_and_fields_python_builds(svc) -> None:
    """The schema filled into Lua (``lua()``), run by Redis itself, names what ``Keys`` and
    the field definitions name (the scripts and the Python side can only agree)."""
    k = Keys("ns")
    got = await svc.r.eval(lua("""
local p = ARGV[1]
local out = {inode_key(p, 7), dir_key(p, 7), blocks_key(p, 7), xattr_key(p, 7), slices_key(p, 7),
             idx_key(p), orphans_key(p)}
for _, f in ipairs({ATTR_FIELDS}) do out[#out + 1] = f end
out[#out + 1] = F.parent .. F.target .. F.data .. V.used .. V.epoch
return out"""), 0, k.prefix)
    assert [g.decode() for g in got] == [*k.per_inode(7), k.idx, k.orphans, *ATTR_FIELDS, "pldusedepoch"]
