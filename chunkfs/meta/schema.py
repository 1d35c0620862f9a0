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
                                 version, restored_from (the manifest URL a restored volume
                                 came from); snapshots also ready (1 once the manifest is
                                 written) and source_volume (the volume it was taken of)
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
    cfs{ID}:hot            ZSET  block file name "<sha256 hex>_<object size>" -> unix ms of its last
                                 read by a mount (the warm-start hot set, chunkfs/hotset.py):
                                 merged by every mount periodically and at unmount, trimmed to
                                 the newest few thousand; advisory, prefetched by the next mount
    cfs{ID}:pub            HASH  node id -> JSON of a ControllerPublishVolume to that node
                                 (access mode, readonly, publish_context); volumes only, written
                                 and removed by the CSI controller, never copied into clones
    cfs{ID}:backup         HASH  the volume's last backup (chunkfs/backup.py, volumes only): id,
                                 url, created, finished (unix s), files, size_bytes, pages,
                                 pages_written, bytes_written; temp: the namespace id of the
                                 point-in-time copy a backup in progress exports (a leftover
                                 of a backup that died is deleted by the next one); kind (full
                                 or incremental), base (the backup it was made incrementally
                                 from), captured (inodes the backup read from Redis)
    cfs{ID}:changed        SET   inode numbers changed since the capture of the backup that
                                 ``backup`` records (docs/dev/backup.md): every mutation script
                                 adds the inodes whose keys it wrote, while the set exists;
                                 member 0 (never an inode) keeps it existing. Absent: no backup
                                 has started tracking (the next backup is full)
    cfs{ID}:capture        SET   the changes a backup in progress took out of ``changed`` (or a
                                 failed one did: the next backup takes them again); deleted
                                 with the record of the backup that captured them

    cfs:backup:<volume>    STRING a backup of that volume in progress (its random token);
                                 expires unless renewed (chunkfs/backup.py backup_lock)

Objects (in the bucket, under the storage prefix):

    blocks/<h[0:2]>/<h[2:4]>/<h>_<length>      immutable block, h = sha256(content)
    snapshots/<snapshot id>/manifest.json.gz   immutable snapshot manifest
    backups/<volume>/<backup id>/manifest.json.gz   immutable backup manifest: its pages
    backups/<volume>/pages/<h>.json.gz         immutable page of inodes, h = sha256 of its
                                               canonical JSON (docs/dev/backup.md)

Every key suffix and hash field above is defined once below (``Keys``, ``InodeField``,
``VolumeField``, ``GcStateField``, ``GcScheduleField``); the Lua scripts take theirs from
them through ``lua()``, and each persistent record is parsed by its one type (``Attr``,
``VolumeRecord``, ``GcRun``; block map values by ``chunkfs.blocks.slices``).
``tests/unit/test_schema.py`` checks the definitions against this text and
``tests/integration/test_format.py`` what they write against the format of earlier releases.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Mapping
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
DEFAULT_BLOCK_SIZE = 4 << 20  # of new volumes; a volume's own is in its record


def inode_limit(capacity: int, max_inodes: int | None = None) -> int:
    """How many inodes a volume may hold (CREATE refuses more with ENOSPC; df -i)."""
    return max_inodes if max_inodes else max(MIN_INODES, capacity // BYTES_PER_INODE)


class InodeField:
    """The fields of an inode's hash, ``cfs{ID}:i<ino>`` (one letter each: there are
    millions of these hashes)."""

    MODE = "m"      # st_mode, type bits included
    UID = "u"
    GID = "g"
    NLINK = "n"
    SIZE = "s"
    ATIME = "a"     # times in ns
    MTIME = "t"
    CTIME = "c"
    RDEV = "r"
    PARENT = "p"    # directories: the parent's inode
    TARGET = "l"    # symlinks: the target
    DATA = "d"      # present iff the file's data is inline (its value is the data)


class VolumeField:
    """The fields of a namespace's hash, ``cfs{ID}:vol`` (read as a ``VolumeRecord``)."""

    NAME = "name"
    KIND = "kind"                    # "volume" | "snapshot"
    CAPACITY = "capacity"
    USED = "used"
    INODES = "inodes"
    MAX_INODES = "max_inodes"
    SLICEBYTES = "slicebytes"
    MAXSLICEBYTES = "maxslicebytes"
    NEXT_INO = "next_ino"
    EPOCH = "epoch"
    WRITER = "writer"
    CREATED = "created"
    BLOCK_SIZE = "block_size"
    SOURCE = "source"                # "", "snapshot:<name>" or "volume:<name>"
    FROZEN = "frozen"                # unix ms until which writers wait
    READY = "ready"                  # snapshots: 1 once the manifest is written
    SOURCE_VOLUME = "source_volume"  # snapshots: the volume taken
    RESTORED_FROM = "restored_from"  # the manifest URL a restored volume came from


class GcStateField:
    """The fields of ``cfs{_gc}:state`` (the GC lease, ``chunkfs.gc_lease``)."""

    GEN = "gen"
    OWNER = "owner"
    LEASE = "lease"
    STARTED = "started"


class GcScheduleField:
    """The fields of ``cfs{_gc}:sched`` (the CSI controllers' GC schedule)."""

    OWNER = "owner"
    HELD = "held"
    NEXT = "next"


def _fields(cls: type) -> dict[str, str]:
    """A field class as {attribute name: field}, in definition order."""
    return {name: value for name, value in vars(cls).items() if name.isupper()}


ATTR_FIELDS = (InodeField.MODE, InodeField.UID, InodeField.GID, InodeField.NLINK, InodeField.SIZE,
               InodeField.ATIME, InodeField.MTIME, InodeField.CTIME, InodeField.RDEV)
# the per-inode keys of a namespace, cfs{ID}:<letter><ino>, in the order of Keys.per_inode
INODE_KEY, DIR_KEY, BLOCKS_KEY, XATTR_KEY, SLICES_KEY = "i", "d", "b", "x", "y"
PER_INODE = (INODE_KEY, DIR_KEY, BLOCKS_KEY, XATTR_KEY, SLICES_KEY)
VOL_KEY, IDX_KEY, ORPHANS_KEY = "vol", "idx", "orphans"  # namespace keys the scripts build too
CHANGED_KEY, CAPTURE_KEY = "changed", "capture"
NO_INODE = 0  # the member that keeps a tracking ``changed`` set existing


def node_key(node_id: str) -> str:
    """A CSI node plugin's registration (see the schema above)."""
    return f"cfs:node:{node_id}"


class Keys:
    """Key builders for one namespace."""

    __slots__ = ("ns", "prefix", "vol", "idx", "orphans", "sessions", "pending", "settled",
                 "publications", "hot", "backup", "changed", "capture")

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.prefix = f"cfs{{{ns}}}:"
        self.vol = self.prefix + VOL_KEY
        self.idx = self.prefix + IDX_KEY
        self.orphans = self.prefix + ORPHANS_KEY
        self.sessions = self.prefix + "sessions"
        self.pending = self.prefix + "pending"
        self.settled = self.prefix + "settled"
        self.publications = self.prefix + "pub"
        self.hot = self.prefix + "hot"
        self.backup = self.prefix + "backup"
        self.changed = self.prefix + CHANGED_KEY
        self.capture = self.prefix + CAPTURE_KEY

    def reply(self, request: str) -> str:
        return f"{self.prefix}r:{request}"

    def inode(self, ino: int) -> str:
        return f"{self.prefix}{INODE_KEY}{ino}"

    def dir(self, ino: int) -> str:
        return f"{self.prefix}{DIR_KEY}{ino}"

    def blocks(self, ino: int) -> str:
        return f"{self.prefix}{BLOCKS_KEY}{ino}"

    def xattr(self, ino: int) -> str:
        return f"{self.prefix}{XATTR_KEY}{ino}"

    def slices(self, ino: int) -> str:
        """The inline slice bytes of a file (``y<ino>``)."""
        return f"{self.prefix}{SLICES_KEY}{ino}"

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
class VolumeRecord:
    """A namespace's hash ``cfs{ID}:vol``, parsed in this one place for all its readers
    (the mount, its refresher and status, fsck, the volume service). Absent fields read
    as the defaults below, as they always have."""

    name: str = ""
    kind: str = ""              # "volume" | "snapshot"
    capacity: int = 0
    used: int = 0
    inodes: int = 0
    max_inodes: int = 0         # 0: not set (``inode_limit(capacity)`` applies)
    slicebytes: int = 0
    maxslicebytes: int = 0      # 0: not set
    next_ino: int = 0
    epoch: str = ""             # text: the scripts' fencing compares it as such
    writer: str = ""            # node id, "" when nobody holds the lease
    created: float = 0.0
    block_size: int = DEFAULT_BLOCK_SIZE
    source: str = ""
    frozen: int = 0             # unix ms until which writers wait, 0: not frozen
    ready: bool = False         # snapshots: the manifest is written
    source_volume: str = ""     # snapshots: the volume taken

    @classmethod
    def parse(cls, raw: Mapping[bytes, bytes]) -> VolumeRecord:
        """From an HGETALL (an empty one gives the defaults: callers check for it)."""
        F = VolumeField

        def text(name: str) -> str:
            v = raw.get(name.encode())
            return v.decode() if v is not None else ""

        def num(name: str, default: int = 0) -> int:
            return int(raw.get(name.encode()) or default)

        return cls(name=text(F.NAME), kind=text(F.KIND), capacity=num(F.CAPACITY), used=num(F.USED),
                   inodes=num(F.INODES), max_inodes=num(F.MAX_INODES), slicebytes=num(F.SLICEBYTES),
                   maxslicebytes=num(F.MAXSLICEBYTES), next_ino=num(F.NEXT_INO), epoch=text(F.EPOCH),
                   writer=text(F.WRITER), created=float(raw.get(F.CREATED.encode()) or 0),
                   block_size=num(F.BLOCK_SIZE, DEFAULT_BLOCK_SIZE), source=text(F.SOURCE),
                   frozen=num(F.FROZEN), ready=raw.get(F.READY.encode()) == b"1",
                   source_volume=text(F.SOURCE_VOLUME))

    @property
    def inode_limit(self) -> int:
        return inode_limit(self.capacity, self.max_inodes)


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


_LUA_FIELDS = {"F": InodeField, "V": VolumeField, "G": GcStateField, "S": GcScheduleField}
_LUA_BUILDERS = {  # the key builders lua() fills in for the scripts: name -> key suffix
    "inode_key": INODE_KEY, "dir_key": DIR_KEY, "blocks_key": BLOCKS_KEY, "xattr_key": XATTR_KEY,
    "slices_key": SLICES_KEY, "idx_key": IDX_KEY, "orphans_key": ORPHANS_KEY,
    "changed_key": CHANGED_KEY, "capture_key": CAPTURE_KEY}


def lua(source: str) -> str:
    """A Lua script with the schema filled in, so that no script spells a key or a field.

    In ``source``, ``F.<name>`` is an inode field (``F.mode`` -> ``'m'``), ``V.<name>`` a
    volume field, ``G.<name>`` and ``S.<name>`` fields of the GC state and schedule;
    ``ATTR_FIELDS`` is the attribute fields as arguments (``'m', 'u', ...``) and
    ``PER_INODE`` the per-inode key letters as a table and ``PER_INODE_CLASS`` as a Lua
    pattern class (``[idbxy]``); ``inode_key(prefix, ino)``, ``dir_key``, ``blocks_key``,
    ``xattr_key``, ``slices_key`` and ``idx_key(prefix)``, ``orphans_key(prefix)``,
    ``changed_key(prefix)``, ``capture_key(prefix)`` become the concatenation that builds
    the key. Filled in once,
    at import, as text (no tables, no functions: every call of a script runs its prelude,
    so each would cost each call): a script runs exactly what it ran when it spelled them.
    An unknown name is an error here, not a nil field in Redis."""

    def field(m: re.Match[str]) -> str:
        value = _fields(_LUA_FIELDS[m.group(1)]).get(m.group(2).upper())
        if value is None:
            raise ValueError(f"Lua names {m.group(0)}, which the schema does not define")
        return f"'{value}'"

    def quoted(values: tuple[str, ...]) -> str:
        return ", ".join(f"'{v}'" for v in values)

    out = re.sub(r"\b([FVGS])\.([A-Za-z_]+)\b", field, source)
    out = re.sub(r"\bATTR_FIELDS\b", quoted(ATTR_FIELDS), out)
    out = re.sub(r"\bPER_INODE_CLASS\b", "'[" + "".join(PER_INODE) + "]'", out)
    out = re.sub(r"\bPER_INODE\b", "{" + quoted(PER_INODE) + "}", out)
    for name, suffix in _LUA_BUILDERS.items():
        if suffix in PER_INODE:
            out = re.sub(rf"\b{name}\(([^(),]+), ([^(),]+)\)", rf"(\1 .. '{suffix}' .. \2)", out)
        else:
            out = re.sub(rf"\b{name}\(([^(),]+)\)", rf"(\1 .. '{suffix}')", out)
        if re.search(rf"\b{name}\(", out):
            raise ValueError(f"Lua calls {name} with arguments lua() cannot fill in (simple names only)")
    return out
