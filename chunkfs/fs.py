"""The FUSE operations of chunkfs: the only place that raises ``FUSEError``.

Handlers stay thin: they translate between pyfuse3's types and the metadata layer
(``VolumeMeta``), the mount's registry of open files (``OpenFiles``: handles, lookups,
orphans, versions, loading, admission) and the file data layer (``FileData``: read,
write, flush, truncate, size), and turn typed chunkfs errors into errno values in one
decorator. Per-file state lives in the registry, never here.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyfuse3

from chunkfs.blocks.budget import WriteBudget
from chunkfs.blocks.store import BlockStore
from chunkfs.errors import ChunkfsError, Fenced, FsError, SessionExpired
from chunkfs.meta.redis_meta import VolumeMeta
from chunkfs.meta.schema import ROOT_INODE, Attr, InodeField, VolumeRecord
from chunkfs.metacache import PAGE, SMALL_DIR, MetaCache
from chunkfs.openfiles import OpenFiles
from chunkfs.volume_state import VolumeState

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

STATUS_NAME = b".chunkfs.status"
NAME_MAX = 255  # bytes per name (statfs f_namemax): longer names fail with ENAMETOOLONG
STATUS_INO = (1 << 62) + 1
_RENAME_FLAGS = {0: 0, pyfuse3.RENAME_NOREPLACE: 1, pyfuse3.RENAME_EXCHANGE: 2}


def fuse_errors(fn: F) -> F:
    """Translate chunkfs errors into FUSE errno replies; log what is unexpected."""

    @functools.wraps(fn)
    async def wrapper(self: ChunkFS, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except ChunkfsError as exc:
            if isinstance(exc, (Fenced, SessionExpired)):
                self.state.refused()
            if exc.errno == errno.EIO:
                self.status.errors += 1
                self.status.last_error = f"{fn.__name__}: {type(exc).__name__}: {exc}"
                log.error("operation failed", extra={"op": fn.__name__, "error": str(exc)})
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception as exc:
            self.status.errors += 1
            self.status.last_error = f"{fn.__name__}: {type(exc).__name__}: {exc}"
            log.exception("unexpected error", extra={"op": fn.__name__})
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


@dataclass
class MountOptions:
    read_only: bool = False
    attr_timeout: float = 1.0
    entry_timeout: float = 1.0
    # "no such name" kept by the kernel: 0 by default (as JuiceFS), so a name another node
    # creates is seen at once by path; a higher value saves lookups of missing names
    negative_timeout: float = 0.0
    inline_limit: int = 16 * 1024
    readahead_blocks: int = 4
    block_size: int = 4 * 1024 * 1024


@dataclass
class MountStatus:
    reads: int = 0
    read_bytes: int = 0
    writes: int = 0
    write_bytes: int = 0
    errors: int = 0
    last_error: str = ""
    started: float = field(default_factory=time.time)


@dataclass
class DirHandle:
    """An open directory: its entries as listed at opendir, for readdir's offsets."""

    ino: int
    entries: list[tuple[bytes, int]]
    names_until: float  # the metadata cache's clock until which its names may be trusted


class ChunkFS(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, meta: VolumeMeta, blocks: BlockStore, options: MountOptions,
                 volume: VolumeRecord, status_extra: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self.meta = meta
        self.blocks = blocks
        self.opt = options
        self.dirs: dict[int, DirHandle] = {}
        self.status_bodies: dict[int, bytes] = {}  # status file handle -> what it reads
        self.cache = MetaCache(options.attr_timeout, options.entry_timeout)
        self._listings: dict[int, asyncio.Task[None]] = {}  # directory -> its listing in flight
        self.state = VolumeState(meta, volume)  # capacity, usage, epoch, fenced
        self.files = OpenFiles(meta, blocks, self.state, block_size=options.block_size,
                               inline_limit=options.inline_limit,
                               readahead_blocks=options.readahead_blocks,
                               changed=lambda ino: self.cache.forget(ino))
        self.status = MountStatus()
        self._status_extra = status_extra
        self.initialized = asyncio.Event()  # the kernel's INIT was answered

    def init(self) -> None:
        """pyfuse3 calls this while it answers the kernel's INIT (the answer goes out as
        soon as this returns)."""
        self.initialized.set()

    def attach_budget(self, budget: WriteBudget) -> None:
        self.files.attach_budget(budget)

    # ---- helpers -------------------------------------------------------------------
    def _entry(self, attr: Attr, entry_timeout: float | None = None,
               attr_timeout: float | None = None) -> pyfuse3.EntryAttributes:
        """The reply for ``attr``; timeouts shorter than the configured ones for what came
        from the metadata cache (its age counts against them)."""
        e = pyfuse3.EntryAttributes()
        e.st_ino = attr.ino
        e.generation = 0
        e.entry_timeout = self.opt.entry_timeout if entry_timeout is None else entry_timeout
        e.attr_timeout = self.opt.attr_timeout if attr_timeout is None else attr_timeout
        e.st_mode = attr.mode
        e.st_nlink = attr.nlink
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        e.st_rdev = attr.rdev
        e.st_size = self.files.size(attr.ino, attr.size)
        e.st_blksize = 1 << 17
        e.st_blocks = (e.st_size + 511) // 512
        e.st_atime_ns = attr.atime_ns
        e.st_mtime_ns = attr.mtime_ns
        e.st_ctime_ns = attr.ctime_ns
        if attr.ino != STATUS_INO:
            self.files.told_kernel(attr.ino, (e.st_mtime_ns, e.st_size))
        return e

    def _expire_kernel_attrs(self, attr: Attr) -> None:
        """Close-to-open across nodes: an open that loaded newer attributes than the
        kernel holds (another node changed the file within attr-timeout) makes the kernel
        ask again, so that fstat and reads see the new size, not the cached one."""
        if self.files.kernel_has(attr.ino, (attr.mtime_ns, attr.size)):
            return
        try:
            pyfuse3.invalidate_inode(attr.ino, attr_only=True)  # no writeback cache: no wait
        except OSError:  # the kernel does not know the inode (any more): nothing is cached
            pass

    def _known(self, entry: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        """Count a reply that hands the kernel a reference to an inode (until ``forget``)."""
        self.files.looked_up(entry.st_ino)
        return entry

    @staticmethod
    def _check_name(*names: bytes) -> None:
        """Every handler that takes a name calls this first: a name no entry can have is
        ENAMETOOLONG, never a lookup that answers ENOENT (or a rename that succeeds)."""
        if any(len(name) > NAME_MAX for name in names):
            raise FsError(errno.ENAMETOOLONG)

    def _status_entry(self) -> pyfuse3.EntryAttributes:
        now = time.time_ns()
        return self._entry(Attr(STATUS_INO, stat.S_IFREG | 0o444, 0, 0, 1, 0, now, now, now))

    @staticmethod
    def _not_reserved(parent: int, name: bytes, err: int = errno.EPERM) -> None:
        """The status file's name at the root belongs to the mount in every operation: a
        pod renaming, linking or creating its own file there would shadow it."""
        if parent == ROOT_INODE and name == STATUS_NAME:
            raise FsError(err)

    @staticmethod
    def _not_status(inode: int) -> None:
        if inode == STATUS_INO:
            raise FsError(errno.EPERM)

    def _check_writable(self) -> None:
        self.state.check_writable()

    def unflushed(self) -> dict[int, int]:
        """For the status: inode -> bytes not durable yet, of every file that is not clean."""
        return self.files.unflushed()

    def status_document(self) -> dict[str, Any]:
        budget = self.files.budget
        return {"pid": os.getpid(), "volume": self.state.name, "fenced": self.state.fenced,
                "read_only": self.opt.read_only, "epoch": self.meta.epoch,
                "dirty_bytes": self.files.dirty_bytes(), "open_files": len(self.files),
                "write_buffer": {"used": budget.used if budget else 0,
                                 "limit": budget.limit if budget else 0},
                "errors": self.status.errors, "last_error": self.status.last_error,
                "fuse": {"reads": self.status.reads, "read_bytes": self.status.read_bytes,
                         "writes": self.status.writes, "write_bytes": self.status.write_bytes},
                "uptime_s": round(time.time() - self.status.started, 1),
                "redis": self.meta.stats.as_dict(),
                "metadata_cache": {"hits": self.cache.hits, "misses": self.cache.misses},
                **self._status_extra()}

    # ---- lookups ---------------------------------------------------------------------
    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        self._check_name(name)
        if parent_inode == ROOT_INODE and name == STATUS_NAME:
            return self._status_entry()
        if name == b".":
            return self._known(await self._getattr(parent_inode))
        if name == b"..":
            raise FsError(errno.ENOTSUP)
        listing = self._listings.get(parent_inode)
        if listing is not None:  # a listing of this directory is on its way: it may answer
            await asyncio.wait([listing])
        hit = self.cache.entry(parent_inode, name)
        if hit is not None:
            attr, entry_left, attr_left = hit
            return self._known(self._entry(attr, entry_left, attr_left))
        at = self.cache.clock()
        attr, count, small = await self.meta.lookup_dir(parent_inode, name, SMALL_DIR)
        if small is not None:
            self.cache.put_listing(parent_inode, small, at, complete=True)
        if attr is None:
            return self._negative()
        self.cache.put_entry(parent_inode, name, attr, at)
        if small is None and parent_inode not in self._listings \
                and self.cache.should_list(parent_inode, count):
            self._start_listing(parent_inode)
        return self._known(self._entry(attr))

    def _negative(self) -> pyfuse3.EntryAttributes:
        """No such name: the kernel keeps that for negative-timeout (default 0: not at
        all; a create on this mount replaces it at once, a name created on another node
        shows within the timeout)."""
        if self.opt.negative_timeout <= 0:
            raise FsError(errno.ENOENT)
        e = pyfuse3.EntryAttributes()
        e.st_ino = 0
        e.entry_timeout = self.opt.negative_timeout
        return e

    def _start_listing(self, parent: int) -> None:
        """Fetch a directory's entries with their attributes, in pages, for the lookups of
        a reader that goes through its names (``stat`` of every file)."""
        async def fetch() -> None:
            at = self.cache.clock()
            cursor = b"0"
            try:
                while True:
                    cursor, page = await self.meta.dir_page(parent, cursor, PAGE)
                    self.cache.put_listing(parent, page, at)  # pages may miss or repeat names
                    if cursor in (b"0", 0, "0"):
                        return
            except ChunkfsError as exc:  # lookups ask Redis one by one, as without it
                log.debug("directory listing failed", extra={"ino": parent, "error": str(exc)})
            finally:
                self._listings.pop(parent, None)

        self._listings[parent] = asyncio.create_task(fetch())

    async def _getattr(self, inode: int) -> pyfuse3.EntryAttributes:
        hit = self.cache.attr(inode)
        if hit is not None:
            return self._entry(hit[0], attr_timeout=hit[1])
        at = self.cache.clock()
        attr = await self.meta.getattr(inode)
        self.cache.put_attr(attr, at)
        return self._entry(attr)

    @fuse_errors
    async def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        if inode == STATUS_INO:
            return self._status_entry()
        return await self._getattr(inode)

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: Any,
                      fh: int | None, ctx: Any) -> pyfuse3.EntryAttributes:
        self._not_status(inode)
        self._check_writable()
        self.cache.forget(inode)
        now = time.time_ns()
        changes: dict[str, int] = {}
        if fields.update_mode:
            changes[InodeField.MODE] = attr.st_mode
        if fields.update_uid:
            changes[InodeField.UID] = attr.st_uid
        if fields.update_gid:
            changes[InodeField.GID] = attr.st_gid
        if fields.update_atime:
            changes[InodeField.ATIME] = attr.st_atime_ns
        if fields.update_mtime:
            changes[InodeField.MTIME] = attr.st_mtime_ns
        if fields.update_size:
            await self.files.truncate(inode, attr.st_size)
        if changes or not fields.update_size:
            if InodeField.MODE in changes:
                current = await self.meta.getattr(inode)
                changes[InodeField.MODE] = (current.mode & ~0o7777) | (attr.st_mode & 0o7777)
            changes[InodeField.CTIME] = now
            await self.meta.setattr(inode, changes)
        self.cache.forget(inode)
        return await self._getattr(inode)

    @fuse_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await self.meta.readlink(inode)

    # ---- namespace changes ------------------------------------------------------------
    async def _create(self, parent: int, name: bytes, mode: int, ctx: Any, *, rdev: int = 0,
                      target: bytes = b"") -> Attr:
        self._check_name(name)
        self._check_writable()
        self._not_reserved(parent, name, errno.EEXIST)
        try:
            attr = await self.meta.create(parent, name, mode, ctx.uid, ctx.gid, rdev=rdev,
                                          target=target, inline=stat.S_ISREG(mode))
        finally:
            self.cache.forget(parent)
            self.cache.forget_entry(parent, name)
        self.cache.put_entry(parent, name, attr, self.cache.clock())
        return attr

    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        return self._known(self._entry(await self._create(parent_inode, name, mode, ctx, rdev=rdev)))

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        mode = (mode & 0o7777) | stat.S_IFDIR
        return self._known(self._entry(await self._create(parent_inode, name, mode, ctx)))

    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        mode = stat.S_IFLNK | 0o777
        return self._known(self._entry(await self._create(parent_inode, name, mode, ctx,
                                                          target=target)))

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        attr = await self._create(parent_inode, name, (mode & 0o7777) | stat.S_IFREG, ctx)
        info, _ = await self._open(attr.ino, fresh=True)
        return info, self._known(self._entry(attr))

    @fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: Any) -> pyfuse3.EntryAttributes:
        self._check_name(new_name)
        self._not_status(inode)
        self._not_reserved(new_parent_inode, new_name, errno.EEXIST)
        self._check_writable()
        try:
            await self.meta.link(inode, new_parent_inode, new_name)
        finally:
            self.cache.forget(inode, new_parent_inode)
            self.cache.forget_entry(new_parent_inode, new_name)
        return self._known(await self._getattr(inode))

    async def _after_unlink(self, ino: int, left: int) -> None:
        if left <= 0:
            await self.files.unlinked(ino)

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._check_name(name)
        self._not_reserved(parent_inode, name)
        self._check_writable()
        try:
            ino, left = await self.meta.unlink(parent_inode, name, is_dir=False, keep_if_open=True)
        finally:
            self._forget_name(parent_inode, name)
        self.cache.forget(ino)
        await self._after_unlink(ino, left)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._check_name(name)
        self._not_reserved(parent_inode, name, errno.ENOTDIR)
        self._check_writable()
        try:
            await self.meta.unlink(parent_inode, name, is_dir=True, keep_if_open=False)
        finally:
            self._forget_name(parent_inode, name)

    @fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        self._check_name(name_old, name_new)
        self._not_reserved(parent_inode_old, name_old)
        self._not_reserved(parent_inode_new, name_new)
        self._check_writable()
        if flags not in _RENAME_FLAGS:
            raise FsError(errno.EINVAL)
        try:
            replaced, left = await self.meta.rename(parent_inode_old, name_old, parent_inode_new,
                                                    name_new, _RENAME_FLAGS[flags],
                                                    keep_if_open=True)
        finally:
            self._forget_name(parent_inode_old, name_old)
            self._forget_name(parent_inode_new, name_new)
        if replaced:
            self.cache.forget(replaced)
            await self._after_unlink(replaced, left)

    def _forget_name(self, parent: int, name: bytes) -> None:
        """A name this mount removes, replaces or moves: it, its directory's attributes
        and the inode it named (nlink, ctime) are asked of Redis next time."""
        known = self.cache.entry_ino(parent, name)
        self.cache.forget_entry(parent, name)
        self.cache.forget(parent, *(() if known is None else (known,)))

    # ---- files -----------------------------------------------------------------------
    async def _open(self, ino: int, *, fresh: bool = False) -> tuple[pyfuse3.FileInfo, Attr | None]:
        """A handle on the file's data; loads attributes and block map in one round trip."""
        at = self.cache.clock()
        fh, _, attr = await self.files.open(ino, fresh=fresh)
        if attr is not None:  # read afresh (close-to-open): what getattr answers from now on
            self.cache.put_attr(attr, at)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False), attr

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode == STATUS_INO:
            fh = self.files.new_fh()
            body = json.dumps(self.status_document(), indent=2).encode() + b"\n"
            self.status_bodies[fh] = body
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        if flags & (os.O_WRONLY | os.O_RDWR):
            self._check_writable()
        shared = self.files.is_loaded(inode)
        info, attr = await self._open(inode)
        if flags & os.O_TRUNC and flags & (os.O_WRONLY | os.O_RDWR):
            # libfuse asks for atomic O_TRUNC: the kernel sends no separate truncate
            try:
                await self.files.handle(info.fh).data.truncate(0)
            except BaseException:
                await self.release(info.fh)
                raise
            finally:
                self.cache.forget(inode)
            self.files.forget_version(inode)
            info.keep_cache = False
            return info
        if attr is None:  # another handle has it open here: the page cache is ours already
            info.keep_cache = True
            return info
        self._expire_kernel_attrs(attr)
        same = self.files.same_version(inode, (attr.mtime_ns, attr.size))
        info.keep_cache = same and not shared
        return info

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:
        body = self.status_bodies.get(fh)
        if body is not None:
            return body[off:off + size]
        handle = self.files.handle(fh)
        self.status.reads += 1
        self.status.read_bytes += size
        return await handle.data.read(off, size, handle.stream)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self._check_writable()
        if fh in self.status_bodies:
            raise FsError(errno.EBADF)
        data = self.files.handle(fh).data
        self.status.writes += 1
        self.status.write_bytes += len(buf)
        await data.write(off, buf)  # admitted against the capacity first (ENOSPC)
        return len(buf)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        if fh not in self.status_bodies:
            await self.files.flush(fh)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.flush(fh)

    @fuse_errors
    async def release(self, fh: int) -> None:
        if self.status_bodies.pop(fh, None) is None:
            await self.files.release(fh)

    # ---- directories -----------------------------------------------------------------
    @fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        if not stat.S_ISDIR((await self._getattr(inode)).st_mode):
            raise FsError(errno.ENOTDIR)
        fh = self.files.new_fh()
        listed = self.cache.listing(inode)
        if listed is not None:
            entries, left = listed
        else:
            entries, left = await self.meta.readdir(inode), self.opt.entry_timeout
        self.dirs[fh] = DirHandle(inode, entries, self.cache.clock() + left)
        return fh

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        handle = self.dirs[fh]
        entries, parent, names_until = handle.entries, handle.ino, handle.names_until
        pos = start_id
        while pos < len(entries):
            batch = entries[pos:pos + 256]
            cached = [self.cache.attr(ino) for _, ino in batch]
            missing = [ino for (_, ino), hit in zip(batch, cached, strict=True) if hit is None]
            at = self.cache.clock()
            fetched = iter(await self.meta.getattrs(missing) if missing else ())
            for (name, _), hit in zip(batch, cached, strict=True):
                pos += 1
                if hit is not None:
                    attr, left = hit
                    entry = self._entry(attr, max(0.0, min(left, names_until - at)), left)
                else:
                    attr = next(fetched)
                    if attr is None:
                        continue
                    self.cache.put_entry(parent, name, attr, at)
                    entry = self._entry(attr, max(0.0, names_until - at))
                if not pyfuse3.readdir_reply(token, name, entry, pos):
                    return
                self.files.looked_up(attr.ino)

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    @fuse_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        state = await self.state.refresh_usage()
        capacity = state.capacity
        used = min(capacity, state.used + self.files.uncommitted_growth())
        s = pyfuse3.StatvfsData()
        s.f_bsize = 4096
        s.f_frsize = 4096
        s.f_blocks = capacity // 4096
        s.f_bfree = s.f_bavail = (capacity - used) // 4096
        inodes = state.inodes
        s.f_files = state.inode_limit
        s.f_ffree = s.f_favail = max(0, s.f_files - inodes)
        s.f_namemax = NAME_MAX
        return s

    # ---- xattrs ----------------------------------------------------------------------
    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        self._not_status(inode)
        self._check_writable()
        if len(name) > NAME_MAX or len(value) > 65536:  # the VFS refuses these first
            raise FsError(errno.ERANGE)
        try:
            await self.meta.setxattr(inode, name, value)
        finally:
            self.cache.forget(inode)
            self.cache.forget_xattrs(inode)

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        # the kernel asks for security.capability before every write: served from the cache
        hit = self.cache.xattr(inode, name)
        if hit is None:
            at = self.cache.clock()
            value = await self.meta.getxattr(inode, name)
            self.cache.put_xattr(inode, name, value, at)
        else:
            value = hit[0]
        if value is None:
            raise FsError(pyfuse3.ENOATTR)
        return value

    @fuse_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return await self.meta.listxattr(inode)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        self._not_status(inode)
        self._check_writable()
        try:
            await self.meta.removexattr(inode, name)
        except FsError as exc:
            if exc.errno == errno.ENODATA:
                raise FsError(pyfuse3.ENOATTR) from None
            raise
        finally:
            self.cache.forget(inode)
            self.cache.forget_xattrs(inode)

    @fuse_errors
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        return True

    async def purge_orphans(self) -> None:
        """At unmount the kernel lets go of everything: remove what was only kept for it."""
        await self.files.purge_orphans()

    async def flush_all(self) -> None:
        """Flush every file with local changes (unmount, SIGTERM), then let the background
        upkeep of slices finish."""
        await self.files.flush_all()

    async def forget(self, inode_list: Any) -> None:
        for ino, count in inode_list:
            await self.files.forget(ino, count)
