"""The FUSE operations of chunkfs: the only place that raises ``FUSEError``.

Handlers stay thin: they translate between pyfuse3's types and the metadata layer
(``VolumeMeta``) and the file data layer (``FileData``), and turn typed chunkfs
errors into errno values in one decorator.
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
from chunkfs.blocks.file import FileData
from chunkfs.blocks.store import BlockStore
from chunkfs.errors import ChunkfsError, Fenced, FsError, NoSpace, SessionExpired
from chunkfs.meta.redis_meta import VolumeMeta
from chunkfs.meta.schema import ROOT_INODE, Attr, InodeField, VolumeRecord
from chunkfs.metacache import PAGE, SMALL_DIR, MetaCache
from chunkfs.volume_state import VolumeState

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

STATUS_NAME = b".chunkfs.status"
NAME_MAX = 255  # bytes per name (statfs f_namemax): longer names fail with ENAMETOOLONG
STATUS_INO = (1 << 62) + 1
_RENAME_FLAGS = {0: 0, pyfuse3.RENAME_NOREPLACE: 1, pyfuse3.RENAME_EXCHANGE: 2}
_NEAR_FULL = 1 << 20  # closer to the capacity than this, a write checks the usage in Redis


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
                self.state.fenced = True
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
class Handle:
    ino: int
    data: FileData | None
    next_offset: int = 0
    streak: int = 0  # bytes read sequentially up to next_offset (sizes the readahead)


class ChunkFS(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, meta: VolumeMeta, blocks: BlockStore, options: MountOptions,
                 volume: VolumeRecord, status_extra: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self.meta = meta
        self.blocks = blocks
        self.opt = options
        self.budget: WriteBudget | None = None
        self.files: dict[int, FileData] = {}
        self.handles: dict[int, Handle] = {}
        self.dirs: dict[int, list[tuple[bytes, int]]] = {}
        # directory handle -> its directory's inode, and until when its names may be trusted
        self.dir_inodes: dict[int, tuple[int, float]] = {}
        self.lookups: dict[int, int] = {}
        self.loading: dict[int, asyncio.Future[None]] = {}
        self.orphans: set[int] = set()
        self.upkeep: set[FileData] = set()  # closed files whose slices are being moved
        self.versions: dict[int, tuple[int, int]] = {}
        # (mtime, size) of the attributes last handed to the kernel, per inode: what it may
        # still serve from its attribute cache (for up to attr-timeout)
        self.kernel_attrs: dict[int, tuple[int, int]] = {}
        self.cache = MetaCache(options.attr_timeout, options.entry_timeout)
        self._listings: dict[int, asyncio.Task[None]] = {}  # directory -> its listing in flight
        self._next_fh = 1
        self.state = VolumeState(meta, volume)  # capacity, usage, epoch, fenced
        self.status = MountStatus()
        self._status_extra = status_extra
        self.initialized = asyncio.Event()  # the kernel's INIT was answered

    def init(self) -> None:
        """pyfuse3 calls this while it answers the kernel's INIT (the answer goes out as
        soon as this returns)."""
        self.initialized.set()

    def attach_budget(self, budget: WriteBudget) -> None:
        self.budget = budget
        budget.relieve = self.relieve_memory

    def relieve_memory(self, need: int) -> None:
        """The write budget is spent: upload dirty blocks of any open file, largest first,
        until ``need`` bytes are on their way (a writer of one file must never wait on
        partial blocks of others that nobody flushes)."""
        dirty = sorted(((n, ino, idx) for ino, f in self.files.items()
                        for idx, n in f.dirty_blocks()), reverse=True)
        started = 0
        for _size, ino, idx in dirty:
            if started >= need:
                break
            started += self.files[ino].start_upload(idx)

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
        data = self.files.get(attr.ino)
        e.st_size = data.size if data is not None else attr.size
        e.st_blksize = 1 << 17
        e.st_blocks = (e.st_size + 511) // 512
        e.st_atime_ns = attr.atime_ns
        e.st_mtime_ns = attr.mtime_ns
        e.st_ctime_ns = attr.ctime_ns
        if attr.ino != STATUS_INO:
            self.kernel_attrs[attr.ino] = (e.st_mtime_ns, e.st_size)
        return e

    def _expire_kernel_attrs(self, attr: Attr) -> None:
        """Close-to-open across nodes: an open that loaded newer attributes than the
        kernel holds (another node changed the file within attr-timeout) makes the kernel
        ask again, so that fstat and reads see the new size, not the cached one."""
        if self.kernel_attrs.get(attr.ino) == (attr.mtime_ns, attr.size):
            return
        try:
            pyfuse3.invalidate_inode(attr.ino, attr_only=True)  # no writeback cache: no wait
        except OSError:  # the kernel does not know the inode (any more): nothing is cached
            pass

    def _known(self, entry: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        """Count a reply that hands the kernel a reference to an inode (until ``forget``)."""
        self.lookups[entry.st_ino] = self.lookups.get(entry.st_ino, 0) + 1
        return entry

    async def _maybe_purge(self, ino: int) -> None:
        """Remove an unlinked inode once neither the kernel nor an open file refers to it.

        Until then it stays in the volume's orphan list, so a process that looked the
        name up just before it was replaced can still open and read it (POSIX semantics).
        """
        if ino not in self.orphans or self.lookups.get(ino, 0) > 0:
            return
        data = self.files.get(ino)
        if data is not None and data.opens > 0:
            return
        self.orphans.discard(ino)
        data = self.files.pop(ino, None)
        try:
            if data is not None and not data.is_clean:
                await data.abandon()
            await self.meta.purge(ino)
        except ChunkfsError as exc:  # left in the orphan list: reaped at the next mount
            log.warning("purge of an unlinked inode failed", extra={"ino": ino, "error": str(exc)})

    @staticmethod
    def _check_name(*names: bytes) -> None:
        """Every handler that takes a name calls this first: a name no entry can have is
        ENAMETOOLONG, never a lookup that answers ENOENT (or a rename that succeeds)."""
        if any(len(name) > NAME_MAX for name in names):
            raise FsError(errno.ENAMETOOLONG)

    def _status_entry(self) -> pyfuse3.EntryAttributes:
        now = time.time_ns()
        return self._entry(Attr(STATUS_INO, stat.S_IFREG | 0o444, 0, 0, 1, 0, now, now, now))

    def _fh(self) -> int:
        self._next_fh += 1
        return self._next_fh

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
        if self.state.fenced:
            raise Fenced("writer lease revoked: this node may no longer write the volume")

    def _space_left(self, data: FileData, off: int, n: int) -> int:
        """Capacity left after this write: what its commit would charge (a block's bytes
        up to the write, zeros of a hole included), on top of the last known usage and
        everything this mount has not committed yet."""
        growth = data.growth_of(off, n)
        if not growth:
            return 1 << 62
        return self.state.capacity - self.state.used - self.uncommitted_growth() - growth

    async def _check_space(self, data: FileData, off: int, n: int) -> None:
        """ENOSPC before buffering bytes the volume cannot hold. The usage we know may be up
        to a second old (space used or freed since): near the limit, ask Redis first."""
        left = self._space_left(data, off, n)
        if left < max(_NEAR_FULL, self.state.capacity // 100):
            await self.state.refresh_usage()
            left = self._space_left(data, off, n)
        if left < 0:
            used = self.state.used + self.uncommitted_growth()
            raise NoSpace(f"volume full: {used} of {self.state.capacity} bytes in use")

    def uncommitted_growth(self) -> int:
        return sum(f.uncommitted_growth for f in self.files.values())

    def dirty_bytes(self) -> int:
        return sum(f.dirty_bytes for f in self.files.values())

    def unflushed(self) -> dict[int, int]:
        """For the status: inode -> bytes not durable yet, of every file that is not clean."""
        return {ino: f.dirty_bytes for ino, f in self.files.items() if not f.is_clean}

    def status_document(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "volume": self.state.name, "fenced": self.state.fenced,
                "read_only": self.opt.read_only, "epoch": self.meta.epoch,
                "dirty_bytes": self.dirty_bytes(), "open_files": len(self.files),
                "write_buffer": {"used": self.budget.used if self.budget else 0,
                                 "limit": self.budget.limit if self.budget else 0},
                "errors": self.status.errors, "last_error": self.status.last_error,
                "fuse": {"reads": self.status.reads, "read_bytes": self.status.read_bytes,
                         "writes": self.status.writes, "write_bytes": self.status.write_bytes},
                "uptime_s": round(time.time() - self.status.started, 1),
                "redis": self.meta.stats.as_dict(),
                "metadata_cache": {"hits": self.cache.hits, "misses": self.cache.misses},
                **self._status_extra()}

    async def _file(self, ino: int) -> FileData:
        data, _ = await self._file_data(ino)
        return data

    async def _file_data(self, ino: int, *, fresh: bool = False,
                         reload_clean: bool = False) -> tuple[FileData, Attr | None]:
        """The one FileData of an inode on this mount (loaded once even when several opens
        race: two objects for one file would each commit their own view of it).
        ``reload_clean`` re-reads a file nobody has open here (close-to-open)."""
        while True:
            loading = self.loading.get(ino)
            if loading is not None:
                await asyncio.shield(loading)
                continue
            data = self.files.get(ino)
            if data is not None and reload_clean and data.is_clean and data.opens == 0:
                del self.files[ino]
                data = None
            if data is not None:
                return data, None
            done = asyncio.get_running_loop().create_future()
            self.loading[ino] = done
            try:
                assert self.budget is not None
                data = FileData(ino, self.meta, self.blocks, self.budget,
                                block_size=self.opt.block_size, inline_limit=self.opt.inline_limit)
                attr = None
                if fresh:
                    data.inline = bytearray()
                else:
                    attr, inline, entries = await self.meta.open_file(ino)
                    assert attr is not None
                    if attr.is_dir:
                        raise FsError(errno.EISDIR)
                    data.loaded(attr.size, inline, entries)
                self.files[ino] = data
                return data, attr
            finally:
                del self.loading[ino]
                done.set_result(None)

    def _drop_if_unused(self, data: FileData) -> None:
        if data.opens <= 0 and data.is_clean and self.files.get(data.ino) is data:
            del self.files[data.ino]

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
            data = await self._file(inode)
            try:
                self.cache.forget(inode)
                await data.truncate(attr.st_size)
                if data.opens <= 0 and not data.is_clean:
                    await data.flush()  # nobody has it open here: nothing else would commit it
            finally:
                self._drop_if_unused(data)
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
        if left > 0:
            return
        self.orphans.add(ino)
        self.versions.pop(ino, None)
        await self._maybe_purge(ino)

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
        data, attr = await self._file_data(ino, fresh=fresh, reload_clean=True)
        if attr is not None:  # read afresh (close-to-open): what getattr answers from now on
            self.cache.put_attr(attr, at)
        data.opens += 1
        fh = self._fh()
        self.handles[fh] = Handle(ino, data)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False), attr

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode == STATUS_INO:
            fh = self._fh()
            self.handles[fh] = Handle(inode, None)
            body = json.dumps(self.status_document(), indent=2).encode() + b"\n"
            self.dirs[-fh] = [(body, 0)]
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        if flags & (os.O_WRONLY | os.O_RDWR):
            self._check_writable()
        shared = inode in self.files
        info, attr = await self._open(inode)
        if flags & os.O_TRUNC and flags & (os.O_WRONLY | os.O_RDWR):
            # libfuse asks for atomic O_TRUNC: the kernel sends no separate truncate
            data = self.handles[info.fh].data
            assert data is not None
            try:
                await data.truncate(0)
            except BaseException:
                await self.release(info.fh)
                raise
            finally:
                self.cache.forget(inode)
            self.versions.pop(inode, None)
            info.keep_cache = False
            return info
        if attr is None:  # another handle has it open here: the page cache is ours already
            info.keep_cache = True
            return info
        self._expire_kernel_attrs(attr)
        version = (attr.mtime_ns, attr.size)
        info.keep_cache = self.versions.get(inode) == version and not shared
        self.versions[inode] = version
        return info

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:
        handle = self.handles[fh]
        if handle.data is None:
            body = self.dirs[-fh][0][0]
            return body[off:off + size]
        data = handle.data
        self.status.reads += 1
        self.status.read_bytes += size
        sequential = off == handle.next_offset
        handle.streak = handle.streak + size if sequential else 0
        if sequential:
            self._readahead(data, off + size, handle.streak)
        handle.next_offset = off + size
        return await data.read(off, size, random=not sequential and size <= 128 * 1024)

    def _readahead(self, data: FileData, pos: int, streak: int) -> None:
        """Start loading the blocks a sequential reader reaches next: from the block under
        ``pos`` on, as far as four times the bytes it read in a row so far, at most
        ``readahead_blocks`` blocks. A reader of a file's first bytes gets the one block it
        needs, alone on the link (the first byte of a new mount); a streaming reader has
        the full window within its first block."""
        if self.opt.readahead_blocks <= 0:
            return
        first = pos // data.bs
        last = min(first + self.opt.readahead_blocks, (pos + 4 * streak) // data.bs + 1)
        data.readahead(first, last - first)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self._check_writable()
        data = self.handles[fh].data
        if data is None:
            raise FsError(errno.EBADF)
        self.status.writes += 1
        self.status.write_bytes += len(buf)
        await self._check_space(data, off, len(buf))
        await data.write(off, buf)
        return len(buf)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        data = self.handles[fh].data
        if data is not None and not data.is_clean:
            self._check_writable()
            try:
                await data.flush()
            finally:
                self.cache.forget(data.ino)
            self._remember_version(data)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.flush(fh)

    def _remember_version(self, data: FileData) -> None:
        self.versions.pop(data.ino, None)

    @fuse_errors
    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        self.dirs.pop(-fh, None)
        data = handle.data
        if data is None:
            return
        data.opens -= 1
        try:
            if not data.is_clean and not self.state.fenced:
                await data.flush()
        finally:
            self.cache.forget(data.ino)
            if data.opens <= 0:
                if self.state.fenced and not data.is_clean and self.files.get(data.ino) is data:
                    # nothing of it can be committed any more: free its buffers and uploads
                    del self.files[data.ino]
                    await data.abandon()
                elif not self.state.fenced and data.is_clean:
                    # its last close: small writes kept in Redis move to S3 in the background
                    self.upkeep = {d for d in self.upkeep if d.busy}
                    if data.look_after(move_all=True):
                        self.upkeep.add(data)
                self._drop_if_unused(data)
                await self._maybe_purge(data.ino)

    # ---- directories -----------------------------------------------------------------
    @fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        if not stat.S_ISDIR((await self._getattr(inode)).st_mode):
            raise FsError(errno.ENOTDIR)
        fh = self._fh()
        listed = self.cache.listing(inode)
        if listed is not None:
            self.dirs[fh], left = listed
        else:
            self.dirs[fh], left = await self.meta.readdir(inode), self.opt.entry_timeout
        self.dir_inodes[fh] = (inode, self.cache.clock() + left)
        return fh

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = self.dirs[fh]
        parent, names_until = self.dir_inodes[fh]
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
                self.lookups[attr.ino] = self.lookups.get(attr.ino, 0) + 1

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)
        self.dir_inodes.pop(fh, None)

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    @fuse_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        state = await self.state.refresh_usage()
        capacity = state.capacity
        used = min(capacity, state.used + self.uncommitted_growth())
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
        self.lookups.clear()
        for ino in list(self.orphans):
            await self._maybe_purge(ino)

    async def flush_all(self) -> None:
        """Flush every file with local changes (unmount, SIGTERM), then let the background
        upkeep of slices finish (it only moves committed bytes: its loss loses nothing)."""
        for data in list(self.files.values()):
            if not data.is_clean:
                await data.flush()
        pending = [d.settled() for d in {*self.upkeep, *self.files.values()}]
        self.upkeep.clear()
        if pending:
            await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 60)

    async def forget(self, inode_list: Any) -> None:
        for ino, count in inode_list:
            left = self.lookups.get(ino, 0) - count
            if left > 0:
                self.lookups[ino] = left
                continue
            self.lookups.pop(ino, None)
            self.kernel_attrs.pop(ino, None)
            if ino in self.orphans:
                await self._maybe_purge(ino)
