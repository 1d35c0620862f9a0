"""Typed errors of chunkfs.

Lower layers raise these; only the edges translate them (``fs.py`` into errno via
``FUSEError``, ``csi/`` into gRPC status codes, ``cli.py`` into an exit status), so
every layer below the edges stays free of protocol concerns.
"""

from __future__ import annotations

import errno
from typing import Any


class ChunkfsError(Exception):
    """Base of every error chunkfs raises on purpose; ``errno`` is what FUSE returns."""

    errno: int = errno.EIO


class InvalidArgument(ChunkfsError):
    errno = errno.EINVAL


class VolumeNotFound(ChunkfsError):
    errno = errno.ENOENT


class VolumeExists(ChunkfsError):
    errno = errno.EEXIST

    def __init__(self, message: str, existing: Any = None) -> None:
        super().__init__(message)
        self.existing = existing


class SnapshotNotFound(ChunkfsError):
    errno = errno.ENOENT


class SnapshotExists(ChunkfsError):
    errno = errno.EEXIST

    def __init__(self, message: str, existing: Any = None) -> None:
        super().__init__(message)
        self.existing = existing


class NoSpace(ChunkfsError):
    """The volume's capacity would be exceeded."""

    errno = errno.ENOSPC


class Fenced(ChunkfsError):
    """This mount's writer epoch was superseded: another node owns the volume now."""

    errno = errno.EIO


class SessionExpired(ChunkfsError):
    """This mount was silent for so long that GC declared its session dead: what it
    uploaded but never committed may be gone, so it may not commit any more (remount)."""

    errno = errno.EIO


class InlineFull(ChunkfsError):
    """The volume keeps as many inline slice bytes in Redis as it may: store in S3."""


class SliceConflict(ChunkfsError):
    """A compare-and-set change to a block found it changed (a compaction lost a race)."""


class VolumeFrozen(ChunkfsError):
    """A snapshot kept the volume's writers waiting for longer than a freeze may last."""

    errno = errno.EIO


class StorageClaimed(ChunkfsError):
    """The storage prefix belongs to another metadata engine (or this one's identity is
    missing): using it would let one engine's GC delete the other's blocks."""

    errno = errno.EIO


class LeaseHeld(ChunkfsError):
    """Another node holds the volume's writer lease."""

    errno = errno.EBUSY

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


class ReadOnly(ChunkfsError):
    errno = errno.EROFS


class MetaUnavailable(ChunkfsError):
    """Redis could not be reached (after retries)."""

    errno = errno.EIO


class StorageUnavailable(ChunkfsError):
    """The object store could not be reached (after retries)."""

    errno = errno.EIO


class NoSuchObject(ChunkfsError):
    errno = errno.EIO


class CorruptObject(ChunkfsError):
    """An object's content does not match its content address."""

    errno = errno.EIO


class BlockMissing(CorruptObject):
    """A block map points at an object the store does not have (for a reader holding an
    old block map: the file changed and GC collected the replaced block)."""


class RestoreFailed(CorruptObject):
    """A manifest, a page or a block object a restore needs is missing or corrupt
    (chunkfs/backup.py): nothing was restored."""


class BackupBusy(ChunkfsError):
    """Another backup (or the deletion) of the volume is in progress: retry later."""


class FsError(ChunkfsError):
    """A POSIX error from the metadata layer (ENOENT, EEXIST, ENOTEMPTY, ...)."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(err, str(err)))
        self.errno = err
