"""The data of one regular file as this mount sees it: committed slices plus local changes.

Its surface is narrow: ``read``, ``write``, ``flush``, ``truncate``, ``size``, ``is_clean``.
It does its own readahead (a reader's ``ReadStream`` says how far it has read in order)
and its own accounting: the write-buffer bytes it holds (``dirty_bytes``), the capacity
its uncommitted writes will charge (``uncommitted_growth``), and the admission of a write
against the volume's capacity (``Admission``, the mount's registry) before it buffers a
byte. The mount's registry (``chunkfs.openfiles``) alone uses the rest: loading
(``loaded``), memory pressure (``dirty_blocks``/``start_upload``), upkeep at the last
close (``look_after``/``busy``/``settled``) and dropping local state (``abandon``). Inside:

* Committed state: per block, the slice list last committed (``chunkfs.blocks.slices``).
* Local changes, per block, oldest first, as *generations* (``Gen``): bytes written since
  the previous generation was frozen (a ``Sparse`` buffer, only the bytes written: no
  read-modify-write), then frozen and stored as slices — an object uploaded to S3, or,
  when small, inline slices that the commit itself stores in Redis (no PUT at all: a
  4 KiB fsync costs one Redis call), or zero slices for zeros.
* ``flush`` (fsync, close) freezes what was written before it, waits for its uploads, and
  commits every stored generation in one atomic script: slices appended on top of the
  block (the old version or the new one is visible, never a mix), the size, and the
  settlement of the uploads with GC (``docs/dev/gc.md``). A flush costs what was written
  since the last one.

Concurrency protocol (one event loop, so only ``await`` points matter):
- ``write`` touches only the newest generation of a block, and only if it is DIRTY; a
  frozen generation never changes again except by ``truncate`` (under ``lock``).
- ``lock`` serialises flush, truncate and background compaction of this file: commits of
  one file never interleave. Writes do not take it; what a flush commits is what was
  frozen when it began (writes racing with RELEASE stay for the next flush).
- A failed upload leaves its generation FROZEN with its bytes: the next flush uploads it
  again; acknowledged data is never dropped, and the error is reported by that flush.
- Memory pressure may freeze and upload any dirty generation (``start_upload``): a later
  write starts a new generation on top, so pressure never changes what is read.
- Capacity is charged at write time (``growth_of``: how far the write extends a block's
  extent), so ENOSPC surfaces in ``write``; ``truncate`` commits the truncation alone and
  trims local changes, so freeing space always works on a full volume.
- A file truncated to zero (``O_TRUNC``) is this mount's to write whole (``exact``): its
  commits set the file to exactly what was written since, so two nodes rewriting one
  file leave the version closed last, complete.
- Other commits append on top of what is in Redis, so writers of one file on several
  nodes (RWX) keep each other's bytes, whatever the ranges.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from chunkfs.blocks import slices as sl
from chunkfs.blocks.budget import WriteBudget
from chunkfs.blocks.slices import Slice
from chunkfs.blocks.sparse import Sparse
from chunkfs.blocks.store import BlockStore, ObjectRef, all_zero
from chunkfs.errors import (
    BlockMissing,
    ChunkfsError,
    FsError,
    InlineFull,
    MetaUnavailable,
    SliceConflict,
)
from chunkfs.faults import crash_point
from chunkfs.meta.redis_meta import BlockOp, VolumeMeta

log = logging.getLogger(__name__)

INLINE_SLICE_MAX = 64 * 1024  # a frozen generation up to this size is stored in Redis
ZERO = sl.ZERO
# background upkeep of a block's committed slices (``_maintain``): inline slices move to
# an object once they hold this much, or at the file's last close; a block naming more
# objects or slices than this gets its newest slices merged (bounded read amplification)
MOVE_BYTES = 256 * 1024
READ_ATTEMPTS = 3  # a read whose view went stale under it (upkeep, GC) reads the new one
MOVE_COUNT = 64
COMPACT_OBJECTS = 16
COMPACT_SLICES = 256
MERGE_RATIO = 4  # a merge takes the next older slice while it is at most this times bigger
RANDOM_READ_MAX = 128 * 1024  # a read out of order up to this size fetches only its range
_ids = itertools.count(1)
Buffer = bytes | bytearray | memoryview


class Admission(Protocol):
    """Who admits writes against the volume's capacity (the mount's registry)."""

    def fits(self, growth: int) -> bool:
        """Whether ``growth`` more bytes are admitted at once, far from the limit (no
        question to Redis first): the common case, without an await."""

    async def admit(self, growth: Callable[[], int]) -> None:
        """Return when the volume can hold ``growth()`` more bytes (asked again after any
        wait, the file may have changed meanwhile); raise ``NoSpace`` when it cannot."""


@dataclass
class ReadStream:
    """One reader's position in a file (a FUSE handle's): whether a read continues where
    the last one ended, and how many bytes it has read in order (sizes the readahead)."""

    next_offset: int = 0
    streak: int = 0


class State(enum.Enum):
    DIRTY = "dirty"      # takes writes
    FROZEN = "frozen"    # bytes fixed, not stored yet (or its upload failed)
    STORING = "storing"  # its upload is running
    STORED = "stored"    # its slices are known; waiting for the commit


@dataclass(eq=False)
class Gen:
    """One generation of local changes to one block."""

    seq: int
    sparse: Sparse | None = field(default_factory=Sparse)
    state: State = State.DIRTY
    slices: list[Slice] = field(default_factory=list)
    inline: dict[str, bytes] = field(default_factory=dict)  # id -> bytes the commit stores
    key: str | None = None   # the object it uploaded (registered with GC until settled)
    held: int = 0            # write-budget bytes it holds
    keep: int | None = None  # a truncation that arrived while it was uploading

    @property
    def end(self) -> int:
        if self.sparse is not None:
            return self.sparse.end
        return sl.extent(self.slices)


class FileData:
    def __init__(self, ino: int, meta: VolumeMeta, blocks: BlockStore, budget: WriteBudget, *,
                 block_size: int, inline_limit: int, readahead_blocks: int = 0,
                 admission: Admission | None = None) -> None:
        self.ino = ino
        self.meta = meta
        self.blocks = blocks
        self.budget = budget
        self.bs = block_size
        self.inline_limit = inline_limit
        self.readahead_blocks = readahead_blocks  # 0: none
        self.admission = admission  # None: no capacity check before buffering
        self.inline: bytearray | None = None  # a small file's whole body ('d')
        self.inline_dirty = False
        self.converted = False  # its body became blocks: the next commit drops 'd'
        self.committed: dict[int, list[Slice]] = {}
        self.local: dict[int, list[Gen]] = {}
        self.inline_bytes: dict[str, bytes] = {}  # bytes of inline slices read or written
        self.tasks: set[asyncio.Task[Any]] = set()
        self.errors: list[BaseException] = []
        self.seq = 0
        self.size = 0
        self.committed_size = 0
        self.committed_inline = 0  # length of the committed inline body (capacity checks)
        self.exact = False
        self.uncertain: _Commit | None = None  # sent, outcome unknown: replayed as it was
        self.writes = 0
        self.lock = asyncio.Lock()
        self._todo: dict[int, bool] = {}  # blocks to look after -> move every inline slice
        self._upkeep: asyncio.Task[None] | None = None

    # ---- loading -----------------------------------------------------------------------
    async def load(self, size: int) -> None:
        inline, committed = await self.meta.file_data(self.ino)
        self.loaded(size, inline, committed)

    def loaded(self, size: int, inline: bytes | None, committed: dict[int, list[Slice]]) -> None:
        self.inline = bytearray(inline) if inline is not None else None
        self.committed_inline = len(inline) if inline is not None else 0
        self.committed = committed
        self.size = self.committed_size = size

    @property
    def is_clean(self) -> bool:
        return not (self.local or self.inline_dirty or self.converted)

    @property
    def dirty_bytes(self) -> int:
        n = sum(g.held for gens in self.local.values() for g in gens)
        return n + (len(self.inline) if self.inline_dirty and self.inline is not None else 0)

    # ---- capacity ------------------------------------------------------------------
    def _committed_extent(self, idx: int) -> int:
        return sl.extent(self.committed.get(idx, ()))

    def _extent(self, idx: int) -> int:
        """How far block ``idx`` reaches in this mount's view (what it would charge)."""
        if self.inline is not None:
            return len(self.inline) if idx == 0 else 0
        ends = [g.end for g in self.local.get(idx, ())]
        return max([self._committed_extent(idx), *ends])

    def growth_of(self, off: int, n: int) -> int:
        """Volume usage a write of ``n`` bytes at ``off`` adds (what its commit charges)."""
        if n <= 0:
            return 0
        end = off + n
        if self.inline is not None and end <= self.inline_limit:
            return max(0, end - len(self.inline))
        growth = 0
        for idx in range(off // self.bs, (end - 1) // self.bs + 1):
            stop = min(end, (idx + 1) * self.bs) - idx * self.bs
            growth += max(0, stop - self._extent(idx))
        return growth

    @property
    def uncommitted_growth(self) -> int:
        if self.inline is not None:
            return max(0, len(self.inline) - self.committed_inline) if self.inline_dirty else 0
        growth = sum(max(0, self._extent(idx) - self._committed_extent(idx)) for idx in self.local)
        if self.converted:
            growth -= self.committed_inline
        return max(0, growth)

    # ---- reads ---------------------------------------------------------------------
    async def read(self, off: int, size: int, stream: ReadStream | None = None) -> Buffer:
        """Bytes ``[off, off+size)`` (fewer at the end of the file): a read-only buffer
        (bytes, bytearray or a memoryview of a cached block) that the caller must not
        keep beyond its reply.

        With the reader's ``stream``, a read that continues where its last one ended
        starts loading the blocks it reaches next (``_readahead``), and a small read out
        of order fetches only its range, not its whole block. Without one, the read is
        whole-block and starts nothing else."""
        random = False
        if stream is not None:
            sequential = off == stream.next_offset
            stream.streak = stream.streak + size if sequential else 0
            if sequential:
                self._readahead(off + size, stream.streak)
            stream.next_offset = off + size
            random = not sequential and size <= RANDOM_READ_MAX
        for _ in range(READ_ATTEMPTS - 1):
            try:
                return await self._read(off, size, random=random)
            except BlockMissing:
                # the view this read used may be older than the file: another mount
                # replaced blocks and GC collected the old objects, or upkeep (ours, or
                # another mount's) moved inline slices, freeing them, while the read
                # waited between the map and their bytes. Read the current version again,
                # as close-to-open allows; what stays missing is an error.
                await self._refresh_committed()
        return await self._read(off, size, random=random)

    async def _refresh_committed(self) -> None:
        """Reload the committed slices."""
        _, self.committed = await self.meta.file_data(self.ino)

    async def _read(self, off: int, size: int, *, random: bool) -> Buffer:
        end = min(off + size, self.size)
        if off >= end:
            return b""
        if self.inline is not None:
            chunk = bytes(self.inline[off:end])
            return chunk + bytes(end - off - len(chunk))
        first, last = off // self.bs, (end - 1) // self.bs
        spans = [(i, max(off, i * self.bs) - i * self.bs, min(end, (i + 1) * self.bs) - i * self.bs)
                 for i in range(first, last + 1)]
        if len(spans) == 1:
            i, a, b = spans[0]
            return await self._block_range(i, a, b, random=random)
        parts = await asyncio.gather(*(self._block_range(i, a, b, random=random) for i, a, b in spans))
        return b"".join(parts)

    def _layers(self, idx: int) -> list[Slice | Sparse]:
        """Block ``idx`` as its layers, oldest first: committed slices, then local ones."""
        layers: list[Slice | Sparse] = list(self.committed.get(idx, ()))
        for g in self.local.get(idx, ()):
            if g.state is State.STORED:
                layers.extend(g.slices)
            elif g.sparse is not None:
                layers.append(g.sparse)
        return layers

    async def _block_range(self, idx: int, start: int, stop: int, *, random: bool,
                           layers: list[Slice | Sparse] | None = None) -> Buffer:
        """Bytes ``[start, stop)`` of block ``idx`` (of ``layers``, oldest first; default:
        the committed slices and local changes).

        A range one slice supplies whole (a streaming reader of a file written
        sequentially, the common case) is that slice's bytes as they are: a view of
        the block, no copy; pyfuse3 replies from any buffer."""
        out: bytearray | None = None
        uncovered = [(start, stop)]
        wanted: list[tuple[Slice, int, int]] = []
        for layer in reversed(self._layers(idx) if layers is None else layers):
            if not uncovered:
                break
            rest: list[tuple[int, int]] = []
            for a, b in uncovered:
                if isinstance(layer, Sparse):
                    if out is None:
                        out = bytearray(stop - start)
                    tmp = bytearray(b - a)
                    holes = layer.overlay(tmp, a, b)
                    _copy_except(out, start, tmp, a, holes)
                    rest.extend(holes)
                    continue
                lo, hi = max(a, layer.pos), min(b, layer.end)
                if lo >= hi:
                    rest.append((a, b))
                    continue
                wanted.append((layer, lo, hi))
                if a < lo:
                    rest.append((a, lo))
                if hi < b:
                    rest.append((hi, b))
            uncovered = rest
        if out is None and len(wanted) == 1 and wanted[0][1:] == (start, stop):
            s, lo, hi = wanted[0]
            return await self._piece(s, lo, hi, random=random)
        if out is None:
            out = bytearray(stop - start)
        if wanted:
            pieces = await asyncio.gather(*(self._piece(s, lo, hi, random=random) for s, lo, hi in wanted))
            for (_, lo, hi), data in zip(wanted, pieces, strict=True):
                out[lo - start:hi - start] = data
        return out

    async def _piece(self, s: Slice, lo: int, hi: int, *, random: bool) -> Buffer:
        """Block bytes ``[lo, hi)`` that slice ``s`` supplies."""
        at, n = s.off + lo - s.pos, hi - lo
        if s.ref == ZERO:
            return bytes(n)
        if s.inline:
            data = self.inline_bytes.get(s.inline_id)
            if data is None:
                found = await self.meta.inline_slices(self.ino, [s.inline_id])
                data = found.get(s.inline_id)
                if data is None:
                    raise BlockMissing(f"inline slice {s.inline_id} of inode {self.ino} is gone")
                self.inline_bytes[s.inline_id] = data
            return data[at:at + n]
        ref = ObjectRef.of(s.ref)
        if random and n <= 128 * 1024:
            return await self.blocks.read_range(ref, at, n)
        data = await self.blocks.get(ref)
        return memoryview(data)[at:at + n]

    def _readahead(self, pos: int, streak: int) -> None:
        """Start loading the blocks a sequential reader reaches next: from the block under
        ``pos`` on, as far as four times the bytes it read in a row so far, at most
        ``readahead_blocks`` blocks. A reader of a file's first bytes gets the one block it
        needs, alone on the link (the first byte of a new mount); a streaming reader has
        the full window within its first block."""
        if self.readahead_blocks <= 0:
            return
        first = pos // self.bs
        last = min(first + self.readahead_blocks, (pos + 4 * streak) // self.bs + 1)
        self._prefetch(first, last - first)

    def _prefetch(self, first: int, count: int) -> None:
        """Start loading the objects of blocks ``first .. first+count-1``."""
        if self.inline is not None:
            return
        for idx in range(first, first + count):
            if idx * self.bs >= self.size:
                return
            for s in self.committed.get(idx, ()):
                if not s.inline and s.ref != ZERO:
                    self.blocks.prefetch(ObjectRef.of(s.ref))

    # ---- writes --------------------------------------------------------------------
    async def write(self, off: int, buf: bytes) -> None:
        """Buffer ``buf`` at ``off``; ``NoSpace`` (nothing buffered) when the volume
        cannot hold what its commit would charge (``growth_of``)."""
        if self.admission is not None:
            n = len(buf)
            if not self.admission.fits(self.growth_of(off, n)):
                await self.admission.admit(lambda: self.growth_of(off, n))
        self.writes += 1
        end = off + len(buf)
        if self.inline is not None:
            if end <= self.inline_limit:
                if len(self.inline) < off:
                    self.inline.extend(bytes(off - len(self.inline)))
                self.inline[off:end] = buf
                self.inline_dirty = True
                self.size = max(self.size, end)
                return
            await self._convert_inline()
        view = memoryview(buf)
        pos = off
        while pos < end:
            idx = pos // self.bs
            start = pos - idx * self.bs
            n = min(end, (idx + 1) * self.bs) - pos
            gen = self._dirty_gen(idx)
            grow = gen.sparse.write(start, view[pos - off:pos - off + n])  # type: ignore[union-attr]
            if grow:
                gen.held += grow
                await self.budget.acquire(grow)
            if gen.state is State.DIRTY and gen.sparse is not None and gen.sparse.covers(0, self.bs):
                # a full block: upload it now, as one content-addressed object
                self._freeze(idx, gen, upload=True)
            pos += n
        self.size = max(self.size, end)

    def _dirty_gen(self, idx: int) -> Gen:
        gens = self.local.setdefault(idx, [])
        if gens and gens[-1].state is State.DIRTY:
            return gens[-1]
        self.seq += 1
        gen = Gen(self.seq)
        gens.append(gen)
        return gen

    async def _convert_inline(self) -> None:
        data = bytes(self.inline or b"")
        self.inline = None
        self.inline_dirty = False
        self.converted = True
        if data:
            gen = self._dirty_gen(0)
            grow = gen.sparse.write(0, data)  # type: ignore[union-attr]
            gen.held += grow
            await self.budget.acquire(grow)

    def dirty_blocks(self) -> list[tuple[int, int]]:
        """(block, buffered bytes) of the generations that still take writes."""
        return [(idx, gens[-1].held) for idx, gens in self.local.items()
                if gens and gens[-1].state is State.DIRTY and gens[-1].held]

    def start_upload(self, idx: int) -> int:
        """Memory pressure: upload block ``idx``'s dirty generation now; returns its bytes."""
        gens = self.local.get(idx)
        if not gens or gens[-1].state is not State.DIRTY:
            return 0
        held = gens[-1].held
        self._freeze(idx, gens[-1], upload=True)
        return held

    # ---- storing generations -------------------------------------------------------
    def _freeze(self, idx: int, gen: Gen, *, upload: bool) -> None:
        """Fix ``gen``'s bytes and store them: zeros as zero slices, small ones inline (the
        commit stores them), the rest as one object uploaded in the background."""
        gen.state = State.FROZEN
        sparse = gen.sparse
        assert sparse is not None
        data = [(s, b) for s, b in sparse.intervals() if not all_zero(b)]
        if not data:
            gen.slices = [Slice(ZERO, 0, len(b), s) for s, b in sparse.intervals()]
            self._stored(gen)
            return
        if not upload and sparse.nbytes <= INLINE_SLICE_MAX:
            blob_id = f"{self.meta.instance}.{next(_ids):x}"
            blob, slices_, at = bytearray(), [], 0
            for s, b in sparse.intervals():
                if all_zero(b):
                    slices_.append(Slice(ZERO, 0, len(b), s))
                else:
                    slices_.append(Slice("@" + blob_id, at, len(b), s))
                    blob += b
                    at += len(b)
            gen.inline = {blob_id: bytes(blob)}
            self.inline_bytes[blob_id] = gen.inline[blob_id]  # readable before it commits
            gen.slices = slices_
            self._stored(gen, keep_held=True)  # its bytes stay in memory until the commit
            return
        gen.state = State.STORING
        task = asyncio.create_task(self._upload(idx, gen))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _stored(self, gen: Gen, *, keep_held: bool = False) -> None:
        gen.state = State.STORED
        gen.sparse = None
        if not keep_held:
            self.budget.release(gen.held)
            gen.held = 0

    async def _upload(self, idx: int, gen: Gen) -> None:
        sparse = gen.sparse
        assert sparse is not None
        parts: list[bytearray] = []
        size = 0
        layout: list[tuple[int, int, int]] = []  # (pos, length, offset in the object; -1: zeros)
        for s, b in sparse.intervals():
            if all_zero(b):
                layout.append((s, len(b), -1))
            else:
                layout.append((s, len(b), size))
                parts.append(b)
                size += len(b)
        # one copy, into immutable bytes: the upload, its retries and the cache write all
        # send these (a truncate may trim the frozen buffers meanwhile)
        body = b"".join(parts)
        try:
            ref = await self.blocks.put(body)
        except BaseException as exc:
            gen.state = State.FROZEN  # stays with its bytes: the next flush tries again
            self.errors.append(exc)
            log.warning("block upload failed", extra={"ino": self.ino, "block": idx,
                                                      "error": f"{type(exc).__name__}: {exc}"})
            return
        if ref is not None:
            gen.key = ref.key
        gen.slices = [Slice(ZERO, 0, n, s) if at < 0 or ref is None else Slice(ref.ref, at, n, s)
                      for s, n, at in layout]
        if gen.keep is not None:  # truncated while it was uploading
            gen.slices = sl.trim(gen.slices, gen.keep)
        self._stored(gen)

    # ---- durability ------------------------------------------------------------------
    async def flush(self) -> None:
        async with self.lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        """Commit what was written before this call; writes arriving meanwhile (RELEASE is
        not serialised with WRITE by the kernel) stay for the next flush."""
        if self.inline is not None and self.inline_dirty:
            body, size, writes = bytes(self.inline), self.size, self.writes
            await self.meta.commit(self.ino, size=size, inline=body, exact=self.exact)
            self.committed_size = size if self.exact else max(self.committed_size, size)
            self.committed_inline = len(body)
            if self.writes == writes:
                self.inline_dirty = False
            return
        # failures of earlier background uploads: their generations are FROZEN with their
        # bytes and are stored again right below, so only this flush's outcome counts
        self.errors.clear()
        for idx, gens in self.local.items():
            for g in gens:
                if g.state in (State.DIRTY, State.FROZEN):
                    self._freeze(idx, g, upload=False)
        upto, size = self.seq, self.size
        await asyncio.gather(*list(self.tasks), return_exceptions=True)
        if self.errors:
            err = self.errors[0]
            self.errors.clear()
            raise err
        crash_point("before-commit")
        try:
            await self._commit(upto, size)
        except InlineFull:
            # the volume keeps enough small writes in Redis already: these go to S3
            for idx, gens in self.local.items():
                for g in gens:
                    if g.seq <= upto and g.inline:
                        self._reupload(idx, g)
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
            if self.errors:
                err = self.errors[0]
                self.errors.clear()
                raise err from None
            await self._commit(upto, size)

    def _reupload(self, idx: int, gen: Gen) -> None:
        """An inline generation as an object instead (the bytes are still held)."""
        sparse = Sparse()
        for s in gen.slices:
            if s.inline:
                sparse.write(s.pos, gen.inline[s.inline_id][s.off:s.off + s.length])
            else:
                sparse.write(s.pos, bytes(s.length))
        gen.sparse, gen.inline, gen.slices = sparse, {}, []
        self._freeze(idx, gen, upload=True)

    async def _commit(self, upto: int, size: int) -> None:
        if self.uncertain is not None:
            await self._send(self.uncertain)
        ready: dict[int, list[Gen]] = {}
        for idx, gens in self.local.items():
            done = []
            for g in gens:
                if g.seq > upto or g.state is not State.STORED:
                    break  # a generation is committed only on top of all older ones
                done.append(g)
            if done and idx * self.bs < size:
                ready[idx] = done
        if not (ready or self.converted or size != self.committed_size):
            return
        ops: list[BlockOp] = []
        store: dict[str, bytes] = {}
        settle: list[str] = []
        views: dict[int, list[Slice]] = {}
        for idx, gens in sorted(ready.items()):
            new = [s for g in gens for s in g.slices]
            view = sl.append(self.committed.get(idx, []), new)
            views[idx] = view
            if self.exact:
                ops.append(BlockOp(idx, "S", sl.encode(view)))
            else:
                ops.append(BlockOp(idx, "A", sl.encode(new)))
            for g in gens:
                store.update(g.inline)
                if g.key is not None:
                    settle.append(g.key)
        await self._send(_Commit(self.meta.request_key(), size, self.exact, ops, store, settle,
                                 ready, views))

    async def _send(self, c: _Commit) -> None:
        """Send a commit, and apply it to the local view once Redis has it. An outcome we
        cannot know (Redis did not answer) is sent again, exactly, before anything newer:
        its stored reply makes the retry exact."""
        self.uncertain = None
        try:
            await self.meta.commit(self.ino, size=c.size, ops=c.ops, store=c.store,
                                   settle=c.settle, exact=c.exact, request_key=c.key)
        except MetaUnavailable:
            self.uncertain = c
            raise
        ready, views, size = c.ready, c.views, c.size
        for idx, gens in ready.items():
            view = views[idx]
            if all(s.ref == ZERO for s in view):
                view = []
            if view:
                self.committed[idx] = view
            else:
                self.committed.pop(idx, None)
            for g in gens:
                self.budget.release(g.held)
                g.held = 0
            left = [g for g in self.local.get(idx, ()) if g not in gens]
            if left:
                self.local[idx] = left
            else:
                self.local.pop(idx, None)
        if c.exact:
            for idx in [i for i in self.committed if i * self.bs >= size]:
                del self.committed[idx]
        if self.converted:
            self.committed_inline = 0
        self.converted = False
        self.committed_size = size if c.exact else max(self.committed_size, size)
        self.look_after(ready)

    # ---- upkeep: moving inline slices to S3, compacting fragmented blocks ----------------
    @property
    def busy(self) -> bool:
        """Background upkeep is running."""
        return self._upkeep is not None and not self._upkeep.done()

    def look_after(self, blocks: Any = None, *, move_all: bool = False) -> bool:
        """Check ``blocks`` (every committed one by default) in the background: move
        inline slices to an object when they hold enough (``move_all``: whatever they hold,
        at the last close), rewrite a block that names too many objects or slices. A
        read-only mount (a snapshot, a read-only publish) cannot commit: it reads slices
        where they are and leaves their upkeep to the volume's writer."""
        if self.meta.read_only:
            return False
        for idx in (self.committed if blocks is None else blocks):
            if self._work(idx, move_all=move_all or self._todo.get(idx, False)):
                self._todo[idx] = move_all or self._todo.get(idx, False)
        if self._todo and not self.busy:
            self._upkeep = asyncio.create_task(self._maintain())
        return self.busy

    async def settled(self) -> None:
        """Wait for the background upkeep (unmount)."""
        while self._upkeep is not None and not self._upkeep.done():
            await asyncio.wait({self._upkeep})

    def _work(self, idx: int, *, move_all: bool) -> str | None:
        view = self.committed.get(idx, [])
        if len(sl.objects(view)) > COMPACT_OBJECTS or len(view) > COMPACT_SLICES:
            return "compact"
        inline = [s for s in view if s.inline]
        if inline and (move_all or len(inline) >= MOVE_COUNT
                       or sum(s.length for s in inline) >= MOVE_BYTES):
            return "move"
        return None

    async def _maintain(self) -> None:
        while self._todo:
            idx, move_all = self._todo.popitem()
            work = None if idx in self.local else self._work(idx, move_all=move_all)
            if work is None:
                continue  # written meanwhile (the next commit looks again), or done
            try:
                await self._rewrite(idx, work)
            except (SliceConflict, BlockMissing):
                # another commit changed the block (the compare-and-set refused, or a
                # piece of our view was freed meanwhile): read what it is now
                async with self.lock:
                    with contextlib.suppress(ChunkfsError):
                        await self._refresh_committed()
            except ChunkfsError as exc:  # a later commit or close tries again
                if isinstance(exc, FsError) and exc.errno == errno.ENOENT:
                    # the file is gone (last link removed, purged): nothing to keep up
                    log.debug("slice upkeep: file gone", extra={"ino": self.ino})
                    return
                log.warning("slice upkeep failed", extra={"ino": self.ino, "block": idx,
                                                          "work": work, "error": str(exc)})
                return

    async def _rewrite(self, idx: int, work: str) -> None:
        """Store the same bytes of block ``idx`` otherwise, in one compare-and-set commit.

        The bytes are read and uploaded without the file's lock, from the committed view
        only, so a commit of this file (the next fsync of a log or a WAL) never waits for
        an upload of bytes that are durable already. Only the compare-and-set takes the
        lock: if the view is still the start of the block's list (this mount appended on
        top meanwhile), the rewritten view replaces it under what was appended since;
        otherwise the upload is given back and a later commit looks again."""
        view = list(self.committed.get(idx, []))
        if work == "move":  # inline slices into one object, each in its place in the list
            body, at = bytearray(), {}
            for s in view:
                if s.inline:
                    at[s] = len(body)
                    body += await self._piece(s, s.pos, s.end, random=False)
            ref = await self.blocks.put(body)
            new = [(Slice(ref.ref, at[s], s.length, s.pos) if ref else Slice(ZERO, 0, s.length, s.pos))
                   if s.inline else s for s in view]
        else:  # the newest slices of similar size merged into one (size-tiered: each byte
            # is rewritten a logarithmic number of times, however long the block's history)
            run = merge_run(view)
            lo, hi = min(s.pos for s in run), max(s.end for s in run)
            merged_bytes = await self._block_range(idx, lo, hi, random=False, layers=list(view))
            ref = await self.blocks.put(bytearray(merged_bytes))
            merged = [Slice(ref.ref, 0, hi - lo, lo) if ref else Slice(ZERO, 0, hi - lo, lo)]
            new = sl.append(view[:len(view) - len(run)], merged)
        crash_point("before-upkeep-commit")
        try:
            async with self.lock:
                now = self.committed.get(idx, [])
                if now[:len(view)] != view:  # truncated, or a big write dropped part of it
                    raise SliceConflict(f"block {idx} of inode {self.ino} changed under its upkeep")
                new += now[len(view):]
                await self.meta.commit(self.ino, size=0, ops=[BlockOp(idx, "C", sl.encode(new),
                                                                       sl.encode(now))],
                                       settle=[ref.key] if ref else [], keep_times=True)
                if new and not all(s.ref == ZERO for s in new):
                    self.committed[idx] = new
                else:
                    self.committed.pop(idx, None)
        except BaseException:
            if ref is not None:
                with contextlib.suppress(Exception):
                    await self.meta.settle_uploads([ref.key])
            raise
        if self._work(idx, move_all=False):  # a merge may leave the block over a bound still
            self._todo.setdefault(idx, False)

    async def abandon(self) -> None:
        """The file is dropped with local state (unlinked and closed, fenced, unmounted):
        give its buffers back to the budget and its uploads back to GC."""
        if self._upkeep is not None:
            self._upkeep.cancel()
        self._todo.clear()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*list(self.tasks), return_exceptions=True)
        self.errors.clear()
        keys = []
        for gens in self.local.values():
            for g in gens:
                self.budget.release(g.held)
                g.held = 0
                if g.key is not None:
                    keys.append(g.key)
        self.local.clear()
        self.inline_dirty = self.converted = False
        await self.meta.settle_uploads(keys)

    async def truncate(self, size: int) -> None:
        """Cut or extend the file. Local changes are trimmed to the new size here and
        committed later; the truncation itself commits at once and, shrinking, frees
        space first, so it works on a full volume."""
        async with self.lock:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)  # settle uploads
            if self.uncertain is not None:  # cut nothing a commit of unknown outcome holds
                await self._send(self.uncertain)
            if size == 0:
                self.exact = True
            if self.inline is not None and size > self.inline_limit:
                # an inline body must become a block before the file can grow past the
                # limit: extending it in Redis would store every zero
                await self._convert_inline()
                await self._flush_locked()
            dropped = self._trim_local(size)
            await self.meta.truncate(self.ino, size, self.bs)
            self._trim_committed(size)
            if dropped:  # uploads of blocks cut away: no commit will reference them
                await self.meta.settle_uploads(dropped)

    def _trim_local(self, size: int) -> list[str]:
        """Cut local changes at ``size``; returns the uploads no commit will reference."""
        dropped: list[str] = []
        if self.inline is not None:
            del self.inline[size:]
            self.inline.extend(bytes(size - len(self.inline)))
        for idx in list(self.local):
            keep = size - idx * self.bs
            kept = []
            for g in self.local[idx]:
                if g.state is State.STORING:  # its upload applies the cut when it is done
                    g.keep = max(0, keep if g.keep is None else min(g.keep, keep))
                    kept.append(g)
                    continue
                if g.sparse is not None:
                    freed = g.sparse.trim(max(keep, 0))
                    g.held -= freed
                    self.budget.release(freed)
                    if len(g.sparse):
                        kept.append(g)
                        continue
                else:
                    g.slices = sl.trim(g.slices, max(keep, 0))
                    if g.slices:
                        kept.append(g)
                        continue
                self.budget.release(g.held)
                g.held = 0
                if g.key is not None:
                    dropped.append(g.key)
            if kept:
                self.local[idx] = kept
            else:
                del self.local[idx]
        self.size = size
        return dropped

    def _trim_committed(self, size: int) -> None:
        """The committed view after TRUNCATE (the script trims the same way)."""
        for idx in list(self.committed):
            keep = size - idx * self.bs
            view = sl.trim(self.committed[idx], max(keep, 0))
            if view and not all(s.ref == ZERO for s in view):
                self.committed[idx] = view
            else:
                del self.committed[idx]
        if self.inline is not None:
            self.committed_inline = size  # TRUNCATE cut or zero-padded the stored body
        self.committed_size = size


def merge_run(view: list[Slice]) -> list[Slice]:
    """The newest slices of a block to merge: from the newest back, while the next older
    one is at most MERGE_RATIO times the largest in the run (at least two). Slices of one
    size merge together into one of the next size, as a binary counter carries: a byte
    is rewritten a logarithmic number of times, never once per merge."""
    run: list[Slice] = []
    largest = 0
    for s in reversed(view):
        if len(run) >= 2 and s.length > MERGE_RATIO * largest:
            break
        run.append(s)
        largest = max(largest, s.length)
    run.reverse()
    return run


@dataclass
class _Commit:
    """One COMMIT of a file's generations, kept so that it can be sent again unchanged."""

    key: str
    size: int
    exact: bool
    ops: list[BlockOp]
    store: dict[str, bytes]
    settle: list[str]
    ready: dict[int, list[Gen]]
    views: dict[int, list[Slice]]


def _copy_except(out: bytearray, out_start: int, src: bytearray, src_start: int,
                 holes: list[tuple[int, int]]) -> None:
    """Copy ``src`` (mapping ``src_start``) into ``out`` except the ``holes``."""
    at = src_start
    for a, b in [*holes, (src_start + len(src), src_start + len(src))]:
        if a > at:
            out[at - out_start:a - out_start] = src[at - src_start:a - src_start]
        at = max(at, b)
