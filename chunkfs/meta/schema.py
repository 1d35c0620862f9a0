"""The Redis key schema of chunkfs: the one place where keys are built.

Global keys (one of each per Redis database):

    cfs:volumes            HASH  volume name   -> namespace id
    cfs:snapshots          HASH  snapshot name -> namespace id
    cfs:engine             STRING this metadata engine's identity (random hex); the storage
                                 prefix records the one engine it belongs to (chunkfs/claim.py)
    cfs:node:<node id>     HASH  a CSI node plugin's registration: started, heartbeat (unix s),
                                 version, max_volumes; renewed by every heartbeat with an
                                 EXPIRE, so a node that stopped beating disappears

Garbage collection (one hash-tag slot of their own; the protocol is docs/dev/gc.md):

    cfs{_gc}:state         HASH  gen (bumped before each deletion phase), owner (GC run id),
                                 lease (unix ms until which the owner's lease holds), started
    cfs{_gc}:doomed        SET   object keys that the running GC is about to delete; an upload
                                 of one of them waits until GC is done
    cfs{_gc}:last          HASH  the last GC run that held the lease (``GcRun``): started,
                                 finished (unix s), seconds, ok (1|0), dry_run (1|0), objects,
                                 deleted, deleted_bytes, error ("" or its type and message),
                                 success (unix s when a run last ended well); read by mounts
                                 and `volume info` for their status
    cfs{_gc}:sched         HASH  the CSI controllers' GC schedule (csi/gc_runner.py): owner
                                 (the replica that runs GC here), held (unix ms until which its
                                 claim holds), next (unix ms when the next run is due)

Per namespace (a volume or a snapshot); every key carries the namespace id as its
Redis Cluster hash tag, so every multi-key script of one volume runs on one shard:

    cfs{ID}:vol            HASH  name, kind (volume|snapshot), capacity, used (bytes held by
                                 block entries and inline data, and by metadata: entry names,
                                 symlink targets, xattr names and values), inodes, max_inodes
                                 (absent: inode_limit(capacity)), slicebytes (bytes of inline
                                 slices), maxslicebytes (absent: min(MAX_SLICE_BYTES,
                                 capacity/64)), next_ino, epoch
                                 (writer epoch, bumped by every lease hand-over), writer
                                 (node id or ""), created (unix s), block_size, source,
                                 frozen (unix ms until which writers wait: a snapshot, clone
                                 or backup is copying the volume; the latest deadline of the
                                 fields frozen:<token>, one per freezer, so freezes nest),
                                 version,
                                 restored_from (the manifest URL a restored volume came from)
    cfs{ID}:idx            SET   every live inode number (including unlinked-but-open ones)
    cfs{ID}:orphans        HASH  inode -> session: nlink reached 0 while that mount still had the
                                 inode open or known to its kernel; removed when it lets go
    cfs{ID}:sessions       HASH  session -> expiry (unix ms), renewed by each live mount; the
                                 orphans of an expired session are reaped by the next mount.
                                 "dead:<ms>": tombstoned by GC (silent far past its expiry);
                                 such a session can no longer register, commit or heartbeat
    cfs{ID}:pending        HASH  "<object key> <session>" -> count of that session's uploads of
                                 the object that no block map references yet (GC keeps them)
    cfs{ID}:settled        HASH  object key -> unix ms when an upload of it was last committed
                                 or superseded (GC runs that started before then keep it)
    cfs{ID}:r:<request>    STRING the stored reply of a mutation (exact retries), expires
    cfs{ID}:i<ino>         HASH  m mode (type bits included), u uid, g gid, n nlink, s size,
                                 a/t/c atime/mtime/ctime in ns, r rdev, p parent (directories),
                                 l symlink target, d inline data (present iff the file's data
                                 is stored inline instead of in blocks)
    cfs{ID}:d<ino>         HASH  entry name -> child inode (directories only)
    cfs{ID}:b<ino>         HASH  block index -> slice list (chunkfs/blocks/slices.py): slices
                                 "ref:off:length:pos" joined by ";", oldest first; block i
                                 covers [i*block_size, (i+1)*block_size) and reads as zeros
                                 overlaid with its slices in order. ref is an object
                                 "<sha256 hex>_<object size>", "@<id>" (an inline slice in
                                 y<ino>) or "0" (zeros). A missing index is a hole.
    cfs{ID}:y<ino>         HASH  inline slice id -> bytes: small durable writes kept in Redis
                                 until a background move puts them in an object; counted in
                                 the volume's slicebytes (bounded by maxslicebytes)
    cfs{ID}:x<ino>         HASH  xattr name -> value
    cfs{ID}:pub            HASH  node id -> JSON of a ControllerPublishVolume to that node
                                 (access mode, readonly, publish_context); volumes only, written
                                 and removed by the CSI controller, never copied into clones
    cfs{ID}:backup         HASH  the volume's last backup (chunkfs/backup.py, volumes only): id,
                                 url, created, finished (unix s), files, size_bytes, pages,
                                 pages_written, bytes_written; temp: the namespace id of the
                                 point-in-time copy a backup in progress exports (a leftover
                                 of a backup that died is deleted by the next one)

    cfs:backup:<volume>    STRING a backup of that volume in progress (its random token);
                                 expires unless renewed (chunkfs/backup.py backup_lock)

Objects (in the bucket, under the storage prefix):

    blocks/<h[0:2]>/<h[2:4]>/<h>_<length>      immutable block, h = sha256(content)
    snapshots/<snapshot id>/manifest.json.gz   immutable snapshot manifest
    backups/<volume>/<backup id>/manifest.json.gz   immutable backup manifest: its pages
    backups/<volume>/pages/<h>.json.gz         immutable page of inodes, h = sha256 of its
                                               canonical JSON (docs/dev/backup.md)
"""

from __future__ import annotations

import stat
from dataclasses import asdict, dataclass
from typing import Any

ROOT_INODE = 1
VOLUMES = "cfs:volumes"
SNAPSHOTS = "cfs:snapshots"
ENGINE = "cfs:engine"
GC_STATE = "cfs{_gc}:state"
GC_DOOMED = "cfs{_gc}:doomed"
GC_LAST = "cfs{_gc}:last"
GC_SCHEDULE = "cfs{_gc}:sched"
FREEZE_SECONDS = 60  # a snapshot's freeze ends by itself this long after it was last renewed
BYTES_PER_INODE = 4096  # a volume without max_inodes may hold capacity / this many inodes
MAX_SLICE_BYTES = 16 << 20  # inline slice bytes a volume may keep in Redis (at most 1/64 of it)
MIN_INODES = 10_000


def inode_limit(capacity: int, max_inodes: int | None = None) -> int:
    """How many inodes a volume may hold (CREATE refuses more with ENOSPC; df -i)."""
    return max_inodes if max_inodes else max(MIN_INODES, capacity // BYTES_PER_INODE)
ATTR_FIELDS = ("m", "u", "g", "n", "s", "a", "t", "c", "r")


def node_key(node_id: str) -> str:
    """A CSI node plugin's registration (see the schema above)."""
    return f"cfs:node:{node_id}"


class Keys:
    """Key builders for one namespace."""

    __slots__ = ("ns", "prefix", "vol", "idx", "orphans", "sessions", "pending", "settled",
                 "publications", "backup")

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.prefix = f"cfs{{{ns}}}:"
        self.vol = self.prefix + "vol"
        self.idx = self.prefix + "idx"
        self.orphans = self.prefix + "orphans"
        self.sessions = self.prefix + "sessions"
        self.pending = self.prefix + "pending"
        self.settled = self.prefix + "settled"
        self.publications = self.prefix + "pub"
        self.backup = self.prefix + "backup"

    def reply(self, request: str) -> str:
        return f"{self.prefix}r:{request}"

    def inode(self, ino: int) -> str:
        return f"{self.prefix}i{ino}"

    def dir(self, ino: int) -> str:
        return f"{self.prefix}d{ino}"

    def blocks(self, ino: int) -> str:
        return f"{self.prefix}b{ino}"

    def xattr(self, ino: int) -> str:
        return f"{self.prefix}x{ino}"

    def slices(self, ino: int) -> str:
        """The inline slice bytes of a file (``y<ino>``)."""
        return f"{self.prefix}y{ino}"

    def per_inode(self, ino: int) -> tuple[str, str, str, str, str]:
        return self.inode(ino), self.dir(ino), self.blocks(ino), self.xattr(ino), self.slices(ino)


@dataclass
class Attr:
    """An inode's attributes as stored in ``cfs{ID}:i<ino>``."""

    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int = 0

    @classmethod
    def from_fields(cls, ino: int, values: list[bytes | None]) -> Attr | None:
        """Build from an HMGET of ``ATTR_FIELDS``; None if the inode does not exist."""
        if values[0] is None:
            return None
        m, u, g, n, s, a, t, c, r = (int(v) if v is not None else 0 for v in values)
        return cls(ino, m, u, g, n, s, a, t, c, r)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.mode)


@dataclass(frozen=True)
class GcRun:
    """The record of the last GC run of a metadata engine (``cfs{_gc}:last``)."""

    started: float
    finished: float
    seconds: float
    ok: bool
    dry_run: bool
    objects: int
    deleted: int
    deleted_bytes: int
    error: str
    success: float | None  # when a run last ended well (this one or an earlier one)

    @classmethod
    def parse(cls, raw: dict[bytes, bytes]) -> GcRun | None:
        """From an HGETALL; None when no run has been recorded yet."""
        if not raw or b"finished" not in raw:
            return None

        def num(name: str) -> float:
            return float(raw.get(name.encode(), b"0") or 0)

        return cls(started=num("started"), finished=num("finished"), seconds=num("seconds"),
                   ok=raw.get(b"ok") == b"1", dry_run=raw.get(b"dry_run") == b"1",
                   objects=int(num("objects")), deleted=int(num("deleted")),
                   deleted_bytes=int(num("deleted_bytes")),
                   error=raw.get(b"error", b"").decode(errors="replace"),
                   success=num("success") if raw.get(b"success") else None)

    def fields(self) -> dict[str, str | int]:
        """The hash fields to write (``success`` only when there is one)."""
        out: dict[str, str | int] = {
            "started": f"{self.started:.3f}", "finished": f"{self.finished:.3f}",
            "seconds": f"{self.seconds:.3f}", "ok": int(self.ok), "dry_run": int(self.dry_run),
            "objects": self.objects, "deleted": self.deleted,
            "deleted_bytes": self.deleted_bytes, "error": self.error}
        if self.success is not None:
            out["success"] = f"{self.success:.3f}"
        return out

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
