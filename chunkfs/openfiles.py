"""Every file this mount has open, loading, or keeps for the kernel: one registry.

Why one place: whether an inode's data stays in memory, is loaded afresh, is purged, or
lets the kernel keep its page cache depends on several counts at once (handles open on
it, the kernel's lookup references, whether its last link is gone, whether it holds
bytes not committed, whether a load of it is in flight). Each decision reads several of
them, so they live in one object and change only through its methods; the FUSE handlers
(``chunkfs.fs``) translate requests into these calls and never keep per-file state of
their own. The volume's live state (capacity, usage, fenced) is ``VolumeState``, read
here, never copied.

Invariants (one event loop: only ``await`` points interleave):

1. **One FileData per inode.** Opens that race share one load (``_loading``): two objects
   for one file would each commit their own view of it. Every handle's data is the
   inode's current FileData: an object is replaced or dropped only while no handle is
   open on it.
2. **Kept while used.** A FileData stays while a handle is open on it or it holds changes
   not committed; a clean one nobody has open is dropped (at its last close, or by the
   next open: close-to-open loads it afresh). After the last close, a file whose small
   writes wait in Redis to move to S3 is kept in ``_upkeep`` until that finishes.
3. **Orphans are purged once, when nothing refers to them.** An inode whose last link
   went (``unlinked``) stays readable while a handle is open on it or the kernel holds a
   lookup reference (``looked_up`` .. ``forget``), as POSIX requires; then it leaves
   ``orphans`` *before* the purge is sent, so a close and a forget that race purge it
   exactly once. A purge that fails leaves it in the volume's orphan list (its session's
   successor reaps it); at unmount every reference is let go (``purge_orphans``).
4. **Versions.** ``_versions`` holds the (mtime, size) an inode had when it was last
   opened here: an open that loads the same version while no other handle has the file
   lets the kernel keep its page cache. A change through this mount (flush, truncate,
   the last link removed) forgets it. ``_kernel_attrs`` is what the kernel was last
   told of an inode's (mtime, size), so an open that loads newer attributes can expire
   the kernel's copy (close-to-open across nodes); it goes with the last lookup reference.
5. **Admission.** A write is admitted (``fits``, else ``admit``: FileData asks before it buffers)
   while the volume's capacity holds the last known usage, the uncommitted growth of
   every file here and the write's own growth; near the limit the usage is read from
   Redis first. A fenced mount flushes nothing more (``VolumeState.check_writable``).
6. **Memory.** When the write budget is spent, dirty blocks of any file here are
   uploaded, largest first (``relieve``): a writer never waits on partial blocks of
   other files that nobody flushes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from chunkfs.blocks.budget import WriteBudget
from chunkfs.blocks.file import FileData, ReadStream
from chunkfs.blocks.store import BlockStore
from chunkfs.errors import ChunkfsError, FsError, NoSpace
from chunkfs.meta.redis_meta import VolumeMeta
from chunkfs.meta.schema import Attr
from chunkfs.volume_state import VolumeState

log = logging.getLogger(__name__)

NEAR_FULL = 1 << 20  # closer to the capacity than this, a write checks the usage in Redis
Version = tuple[int, int]  # (mtime_ns, size)


@dataclass(eq=False)
class Handle:
    """One open of a regular file (a FUSE file handle)."""

    ino: int
    data: FileData
    stream: ReadStream = field(default_factory=ReadStream)


class OpenFiles:
    def __init__(self, meta: VolumeMeta, blocks: BlockStore, state: VolumeState, *,
                 block_size: int, inline_limit: int, readahead_blocks: int,
                 changed: Callable[[int], None] = lambda ino: None) -> None:
        """``changed(ino)`` hears of every inode whose attributes an operation here may
        have changed (the mount's metadata cache forgets it)."""
        self.meta = meta
        self.blocks = blocks
        self.state = state
        self.block_size = block_size
        self.inline_limit = inline_limit
        self.readahead_blocks = readahead_blocks
        self._changed = changed
        self.budget: WriteBudget | None = None
        self._files: dict[int, FileData] = {}
        self._loading: dict[int, asyncio.Future[None]] = {}
        self._opens: dict[FileData, int] = {}  # handles open on each FileData
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._lookups: dict[int, int] = {}  # inode -> the kernel's lookup references
        self._orphans: set[int] = set()
        self._upkeep: set[FileData] = set()  # closed files whose slices are being moved
        self._versions: dict[int, Version] = {}
        self._kernel_attrs: dict[int, Version] = {}

    def attach_budget(self, budget: WriteBudget) -> None:
        self.budget = budget
        budget.relieve = self.relieve

    # ---- handles ---------------------------------------------------------------------
    def new_fh(self) -> int:
        """A handle number, unique on this mount (files, directories, the status file)."""
        self._next_fh += 1
        return self._next_fh

    def is_loaded(self, ino: int) -> bool:
        return ino in self._files

    def handle(self, fh: int) -> Handle:
        return self._handles[fh]

    async def open(self, ino: int, *, fresh: bool = False) -> tuple[int, Handle, Attr | None]:
        """A new handle on the inode's data: ``fresh`` for a file just created (nothing to
        load), else loaded with its attributes in one round trip unless another handle has
        it open here (then ``attr`` is None). A clean file nobody has open is re-read."""
        data, attr = await self._file_data(ino, fresh=fresh, reload_clean=True)
        self._opens[data] = self._opens.get(data, 0) + 1
        fh = self.new_fh()
        handle = self._handles[fh] = Handle(ino, data)
        return fh, handle, attr

    async def flush(self, fh: int) -> None:
        """fsync / FUSE flush: commit the handle's file, if it has anything to commit."""
        data = self._handles[fh].data
        if data.is_clean:
            return
        self.state.check_writable()
        try:
            await data.flush()
        finally:
            self._changed(data.ino)
        self._versions.pop(data.ino, None)

    async def release(self, fh: int) -> None:
        """The handle's last reference: commit what it wrote (unless fenced) and, at the
        file's last close, free it, start its upkeep, or purge it if it is an orphan."""
        handle = self._handles.pop(fh)
        data, ino = handle.data, handle.ino
        self._opens[data] -= 1
        if self._opens[data] <= 0:
            del self._opens[data]
        try:
            if not data.is_clean and not self.state.fenced:
                await data.flush()
        finally:
            self._changed(ino)
            if self._opens.get(data, 0) <= 0:
                if self.state.fenced and not data.is_clean and self._files.get(ino) is data:
                    # nothing of it can be committed any more: free its buffers and uploads
                    del self._files[ino]
                    await data.abandon()
                elif not self.state.fenced and data.is_clean:
                    # its last close: small writes kept in Redis move to S3 in the background
                    self._upkeep = {d for d in self._upkeep if d.busy}
                    if data.look_after(move_all=True):
                        self._upkeep.add(data)
                self._drop_if_unused(data)
                await self._maybe_purge(ino)

    # ---- file data -------------------------------------------------------------------
    def size(self, ino: int, committed: int) -> int:
        """The inode's size as this mount sees it: with its local writes when loaded."""
        data = self._files.get(ino)
        return data.size if data is not None else committed

    async def truncate(self, ino: int, size: int) -> None:
        """setattr(size): cut or extend the file, and commit it at once when nobody has it
        open here (nothing else would)."""
        data, _ = await self._file_data(ino)
        try:
            self._changed(ino)
            await data.truncate(size)
            if self._opens.get(data, 0) <= 0 and not data.is_clean:
                await data.flush()
        finally:
            self._drop_if_unused(data)

    async def _file_data(self, ino: int, *, fresh: bool = False,
                         reload_clean: bool = False) -> tuple[FileData, Attr | None]:
        """The one FileData of an inode on this mount (invariant 1). ``reload_clean``
        re-reads a file nobody has open here (close-to-open)."""
        while True:
            loading = self._loading.get(ino)
            if loading is not None:
                await asyncio.shield(loading)
                continue
            data = self._files.get(ino)
            if data is not None and reload_clean and data.is_clean \
                    and self._opens.get(data, 0) == 0:
                del self._files[ino]
                data = None
            if data is not None:
                return data, None
            done = asyncio.get_running_loop().create_future()
            self._loading[ino] = done
            try:
                assert self.budget is not None
                data = FileData(ino, self.meta, self.blocks, self.budget,
                                block_size=self.block_size, inline_limit=self.inline_limit,
                                readahead_blocks=self.readahead_blocks, admission=self)
                attr = None
                if fresh:
                    data.loaded(0, b"", {})
                else:
                    attr, inline, entries = await self.meta.open_file(ino)
                    assert attr is not None
                    if attr.is_dir:
                        raise FsError(errno.EISDIR)
                    data.loaded(attr.size, inline, entries)
                self._files[ino] = data
                return data, attr
            finally:
                del self._loading[ino]
                done.set_result(None)

    def _drop_if_unused(self, data: FileData) -> None:
        if self._opens.get(data, 0) <= 0 and data.is_clean \
                and self._files.get(data.ino) is data:
            del self._files[data.ino]

    # ---- what the kernel holds ---------------------------------------------------------
    def looked_up(self, ino: int) -> None:
        """A reply handed the kernel a reference to ``ino`` (until ``forget``)."""
        self._lookups[ino] = self._lookups.get(ino, 0) + 1

    async def forget(self, ino: int, count: int) -> None:
        left = self._lookups.get(ino, 0) - count
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups.pop(ino, None)
        self._kernel_attrs.pop(ino, None)
        if ino in self._orphans:
            await self._maybe_purge(ino)

    def told_kernel(self, ino: int, version: Version) -> None:
        """The attributes last handed to the kernel: what it may still serve from its
        attribute cache (for up to attr-timeout)."""
        self._kernel_attrs[ino] = version

    def kernel_has(self, ino: int, version: Version) -> bool:
        return self._kernel_attrs.get(ino) == version

    def same_version(self, ino: int, version: Version) -> bool:
        """Whether the inode was last opened here at ``version``; remembers it."""
        same = self._versions.get(ino) == version
        self._versions[ino] = version
        return same

    def forget_version(self, ino: int) -> None:
        """This mount changed the file: the kernel's page cache of it is not to be kept."""
        self._versions.pop(ino, None)

    # ---- orphans -----------------------------------------------------------------------
    async def unlinked(self, ino: int) -> None:
        """The inode's last link is gone (unlink, rename over it): purge it once nothing
        here refers to it any more."""
        self._orphans.add(ino)
        self._versions.pop(ino, None)
        await self._maybe_purge(ino)

    async def _maybe_purge(self, ino: int) -> None:
        """Remove an unlinked inode once neither the kernel nor an open file refers to it.

        Until then it stays in the volume's orphan list, so a process that looked the
        name up just before it was replaced can still open and read it (POSIX semantics).
        """
        if ino not in self._orphans or self._lookups.get(ino, 0) > 0:
            return
        data = self._files.get(ino)
        if data is not None and self._opens.get(data, 0) > 0:
            return
        self._orphans.discard(ino)
        data = self._files.pop(ino, None)
        try:
            if data is not None and not data.is_clean:
                await data.abandon()
            await self.meta.purge(ino)
        except ChunkfsError as exc:  # left in the orphan list: reaped at the next mount
            log.warning("purge of an unlinked inode failed", extra={"ino": ino, "error": str(exc)})

    async def purge_orphans(self) -> None:
        """At unmount the kernel lets go of everything: remove what was only kept for it."""
        self._lookups.clear()
        for ino in list(self._orphans):
            await self._maybe_purge(ino)

    # ---- accounting --------------------------------------------------------------------
    def __len__(self) -> int:
        """Files whose data is loaded here (open, or holding changes)."""
        return len(self._files)

    def uncommitted_growth(self) -> int:
        return sum(f.uncommitted_growth for f in self._files.values())

    def dirty_bytes(self) -> int:
        return sum(f.dirty_bytes for f in self._files.values())

    def unflushed(self) -> dict[int, int]:
        """For the status: inode -> bytes not durable yet, of every file that is not clean."""
        return {ino: f.dirty_bytes for ino, f in self._files.items() if not f.is_clean}

    def _space_left(self, growth: int) -> int:
        """Capacity left after a write growing the volume by ``growth``: on top of the last
        known usage and everything this mount has not committed yet."""
        if not growth:
            return 1 << 62
        return self.state.capacity - self.state.used - self.uncommitted_growth() - growth

    def _near_full(self) -> int:
        return max(NEAR_FULL, self.state.capacity // 100)

    def fits(self, growth: int) -> bool:
        """``admit`` would let this growth pass without asking Redis (a write that grows
        nothing always fits)."""
        return self._space_left(growth) >= self._near_full()

    async def admit(self, growth: Callable[[], int]) -> None:
        """ENOSPC before buffering bytes the volume cannot hold. The usage we know may be up
        to a second old (space used or freed since): near the limit, ask Redis first."""
        left = self._space_left(growth())
        if left < self._near_full():
            await self.state.refresh_usage()
            left = self._space_left(growth())
        if left < 0:
            used = self.state.used + self.uncommitted_growth()
            raise NoSpace(f"volume full: {used} of {self.state.capacity} bytes in use")

    def relieve(self, need: int) -> None:
        """The write budget is spent: upload dirty blocks of any file here, largest first,
        until ``need`` bytes are on their way."""
        dirty = sorted(((n, ino, idx) for ino, f in self._files.items()
                        for idx, n in f.dirty_blocks()), reverse=True)
        started = 0
        for _size, ino, idx in dirty:
            if started >= need:
                break
            started += self._files[ino].start_upload(idx)

    async def flush_all(self) -> None:
        """Flush every file with local changes (unmount, SIGTERM), then let the background
        upkeep of slices finish (it only moves committed bytes: its loss loses nothing)."""
        for data in list(self._files.values()):
            if not data.is_clean:
                await data.flush()
        pending = [d.settled() for d in {*self._upkeep, *self._files.values()}]
        self._upkeep.clear()
        if pending:
            await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 60)
