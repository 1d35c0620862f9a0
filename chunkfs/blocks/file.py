"""The data of one regular file as this mount sees it: committed state plus local changes.

Writes land in per-block buffers; a full block is uploaded in the background at once,
partial blocks when the file is flushed. ``flush`` (fsync, close) waits for every
upload and then commits all new block entries and the size in one atomic metadata
script, so other nodes see the old or the new version of the file, never a mix.

Concurrency protocol (one event loop, so only ``await`` points matter):
- ``dirty`` buffers are only touched between awaits by ``write``/``read``/``flush``.
- An upload owns an immutable ``bytes`` copy (in ``inflight``); a later write to the
  same block starts a new buffer from that copy. Results are ordered by ``seq``: an
  older upload finishing late never replaces a newer one in ``pending``.
- ``lock`` serialises flush/commit and truncate, so commits of one file never interleave.
- A failed upload puts its bytes back into ``dirty`` (unless rewritten since) and the
  error is reported by the next flush: acknowledged data is never dropped.
- Every finished upload is recorded in ``uploads`` (block index, seq, object key): GC
  keeps its object until a commit settles it. A commit settles the uploads whose entry
  it writes and those a newer upload of the same block superseded; the others (blocks
  left for a later commit) stay protected. A file dropped with uploads unsettled
  (``abandon``) releases them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from chunkfs.blocks.budget import WriteBudget
from chunkfs.blocks.store import BlockStore, object_key
from chunkfs.errors import BlockMissing
from chunkfs.meta.redis_meta import VolumeMeta
from chunkfs.meta.schema import BlockEntry

log = logging.getLogger(__name__)


class FileData:
    def __init__(self, ino: int, meta: VolumeMeta, blocks: BlockStore, budget: WriteBudget, *,
                 block_size: int, inline_limit: int) -> None:
        self.ino = ino
        self.meta = meta
        self.blocks = blocks
        self.budget = budget
        self.bs = block_size
        self.inline_limit = inline_limit
        self.inline: bytearray | None = None
        self.inline_dirty = False
        self.converted = False
        self.entries: dict[int, BlockEntry] = {}
        self.pending: dict[int, tuple[int, BlockEntry | None]] = {}
        self.dirty: dict[int, bytearray] = {}
        self.inflight: dict[int, tuple[int, bytes]] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.uploads: list[tuple[int, int, str]] = []  # finished, not yet settled by a commit
        self.errors: list[BaseException] = []
        self.seq = 0
        self.size = 0
        self.committed_size = 0
        self.size_dirty = False
        self.uncommitted_growth = 0  # bytes appended since the last commit (capacity checks)
        self.writes = 0  # write calls so far: tells a flush whether writes raced it
        self.lock = asyncio.Lock()
        self.opens = 0

    async def load(self, size: int) -> None:
        inline, entries = await self.meta.file_data(self.ino)
        self.loaded(size, inline, entries)

    def loaded(self, size: int, inline: bytes | None, entries: dict[int, BlockEntry]) -> None:
        self.inline = bytearray(inline) if inline is not None else None
        self.entries = entries
        self.size = self.committed_size = size

    @property
    def is_clean(self) -> bool:
        return not (self.dirty or self.inflight or self.pending or self.inline_dirty
                    or self.converted or self.size_dirty)

    @property
    def dirty_bytes(self) -> int:
        n = sum(len(b) for b in self.dirty.values()) + sum(len(d) for _, d in self.inflight.values())
        return n + (len(self.inline) if self.inline_dirty and self.inline is not None else 0)

    # ---- reads ---------------------------------------------------------------------
    def entry_for(self, idx: int) -> BlockEntry | None:
        if idx in self.pending:
            return self.pending[idx][1]
        return self.entries.get(idx)

    async def _block_bytes(self, idx: int) -> bytes | bytearray:
        """Current content of block ``idx`` (may be shorter than the block: zeros follow)."""
        if idx in self.dirty:
            return self.dirty[idx]
        if idx in self.inflight:
            return self.inflight[idx][1]
        entry = self.entry_for(idx)
        if entry is None:
            return b""
        data = await self.blocks.get(entry)
        return memoryview(data)[:entry.valid] if entry.valid < len(data) else data

    async def read(self, off: int, size: int, *, random: bool = False) -> bytes:
        try:
            return await self._read(off, size, random=random)
        except BlockMissing:
            # our block map may be older than the file (another mount replaced blocks and
            # GC collected the old ones): read the current version, as close-to-open allows
            if not await self._refresh_entries():
                raise
            return await self._read(off, size, random=random)

    async def _refresh_entries(self) -> bool:
        """Reload committed entries of blocks without local changes; True if any changed."""
        _, entries = await self.meta.file_data(self.ino)
        changed = False
        for idx in set(self.entries) | set(entries):
            if idx in self.pending or idx in self.dirty or idx in self.inflight:
                continue
            if self.entries.get(idx) != entries.get(idx):
                changed = True
                if idx in entries:
                    self.entries[idx] = entries[idx]
                else:
                    del self.entries[idx]
        return changed

    async def _read(self, off: int, size: int, *, random: bool) -> bytes:
        end = min(off + size, self.size)
        if off >= end:
            return b""
        if self.inline is not None:
            chunk = bytes(self.inline[off:end])
            return chunk + bytes(end - off - len(chunk))
        first, last = off // self.bs, (end - 1) // self.bs
        if random and first == last and first not in self.dirty and first not in self.inflight:
            entry = self.entry_for(first)
            if entry is not None:
                start = off - first * self.bs
                piece = await self.blocks.read_range(entry, start, max(0, min(end, first * self.bs
                                                                              + entry.valid) - off))
                return piece + bytes(end - off - len(piece))
        if first == last:
            return self._slice(await self._block_bytes(first), off - first * self.bs, end - off)
        parts = await asyncio.gather(*(self._block_bytes(i) for i in range(first, last + 1)))
        out = bytearray()
        for i, data in zip(range(first, last + 1), parts, strict=True):
            start = max(off, i * self.bs) - i * self.bs
            stop = min(end, (i + 1) * self.bs) - i * self.bs
            out += self._slice(data, start, stop - start)
        return bytes(out)

    @staticmethod
    def _slice(data: bytes | bytearray | memoryview, start: int, length: int) -> bytes:
        chunk = bytes(data[start:start + length])
        if len(chunk) < length:
            chunk += bytes(length - len(chunk))
        return chunk

    # ---- writes --------------------------------------------------------------------
    async def write(self, off: int, buf: bytes) -> None:
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
        pos = off
        view = memoryview(buf)
        while pos < end:
            idx = pos // self.bs
            start = pos - idx * self.bs
            n = min(end, (idx + 1) * self.bs) - pos
            block = self.dirty.get(idx)
            if block is None:
                block = await self._new_dirty(idx, covers_from_zero=start == 0, length=n)
            grow = max(0, start + n - len(block))
            if grow:
                await self.budget.acquire(grow, self._start_all_uploads)
                block = self.dirty.get(idx)
                if block is None:  # uploaded meanwhile under memory pressure
                    block = await self._new_dirty(idx, covers_from_zero=start == 0, length=n)
            if len(block) < start:
                block.extend(bytes(start - len(block)))
            block[start:start + n] = view[pos - off:pos - off + n]
            if start + n >= self.bs:
                # the writer reached the end of the block: sequential writers are done with
                # it. A random write into a block whose old content was loaded also fills it,
                # but that block waits for the flush, so each block is uploaded once.
                self._start_upload(idx)
            pos += n
        self.size = max(self.size, end)

    async def _new_dirty(self, idx: int, *, covers_from_zero: bool, length: int) -> bytearray:
        base: bytes | bytearray | memoryview = b""
        existing = self.inflight[idx][1] if idx in self.inflight else None
        entry = self.entry_for(idx)
        known = len(existing) if existing is not None else (entry.valid if entry else 0)
        if known and not (covers_from_zero and length >= known):
            base = existing if existing is not None else await self._block_bytes(idx)
        if idx in self.dirty:  # another writer created it while we fetched the base
            return self.dirty[idx]
        block = bytearray(base)
        if block:
            await self.budget.acquire(len(block), self._start_all_uploads)
        self.dirty[idx] = block
        return block

    async def _convert_inline(self) -> None:
        data = bytes(self.inline or b"")
        self.inline = None
        self.inline_dirty = False
        self.converted = True
        if data:
            self.dirty[0] = bytearray(data)

    def _start_all_uploads(self) -> None:
        for idx in list(self.dirty):
            self._start_upload(idx)

    def _start_upload(self, idx: int) -> None:
        data = bytes(self.dirty.pop(idx))
        self.seq += 1
        seq = self.seq
        self.inflight[idx] = (seq, data)
        task = asyncio.create_task(self._upload(idx, seq, data))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _upload(self, idx: int, seq: int, data: bytes) -> None:
        try:
            entry = await self.blocks.put(data)
            if entry is not None:
                self.uploads.append((idx, seq, object_key(entry)))
            if self.pending.get(idx, (-1, None))[0] < seq:
                self.pending[idx] = (seq, entry)
        except BaseException as exc:
            self.errors.append(exc)
            if idx not in self.dirty and self.inflight.get(idx, (None,))[0] == seq:
                self.dirty[idx] = bytearray(data)
                self.budget.used += len(data)  # stays accounted while it waits for a retry
            log.warning("block upload failed", extra={"ino": self.ino, "block": idx,
                                                      "error": f"{type(exc).__name__}: {exc}"})
        finally:
            if self.inflight.get(idx, (None,))[0] == seq:
                del self.inflight[idx]
            self.budget.release(len(data))

    # ---- durability ------------------------------------------------------------------
    async def flush(self) -> None:
        async with self.lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        """Commit what was written before this call. Writes that arrive while it waits
        (RELEASE is not serialised with WRITE by the kernel) stay dirty for the next flush:
        the size, body and block set committed are captured at one instant."""
        if self.inline is not None and self.inline_dirty:
            body, size, writes = bytes(self.inline), self.size, self.writes
            await self.meta.commit(self.ino, size=size, inline=body)
            self.committed_size = max(self.committed_size, size)
            if self.writes == writes:
                self.inline_dirty = False
                self.uncommitted_growth = 0
            return
        self._start_all_uploads()
        size, writes, mine = self.size, self.writes, list(self.tasks)
        await asyncio.gather(*mine, return_exceptions=True)
        if self.errors:
            err = self.errors[0]
            self.errors.clear()
            raise err
        # every finished upload goes in: one that started after the capture holds the
        # captured bytes of its block too (plus newer ones, hidden beyond ``size`` until
        # the next commit); blocks wholly past ``size`` wait for the next commit
        changes = {idx: entry for idx, (_, entry) in self.pending.items() if idx * self.bs < size}
        if not (changes or self.converted or size > self.committed_size or self.size_dirty):
            return
        settled = self._settled_by(changes)
        await self.meta.commit(self.ino, size=size, entries=changes,
                               settle=[key for _, _, key in settled])
        for record in settled:
            self.uploads.remove(record)
        for idx, entry in changes.items():
            if entry is None:
                self.entries.pop(idx, None)
            else:
                self.entries[idx] = entry
            if self.pending.get(idx, (None, None))[1] is entry:
                del self.pending[idx]
        self.converted = False
        self.size_dirty = False
        self.committed_size = max(self.committed_size, size)
        if self.writes == writes:
            self.uncommitted_growth = 0

    def _settled_by(self, changes: dict[int, BlockEntry | None]) -> list[tuple[int, int, str]]:
        """Uploads a commit of ``changes`` releases: those it references, and those that a
        newer upload of the same block superseded."""
        out = []
        for record in self.uploads:
            idx, seq, _ = record
            newest = self.pending.get(idx)
            if idx in changes or newest is None or newest[0] > seq:
                out.append(record)
        return out

    async def abandon(self) -> None:
        """The file is dropped with local state (unlinked and closed, fenced, unmounted):
        give its buffers back to the budget and its uploads back to GC."""
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*list(self.tasks), return_exceptions=True)
        self.errors.clear()
        self.budget.release(sum(len(b) for b in self.dirty.values()))
        self.dirty.clear()
        self.inline_dirty = self.converted = self.size_dirty = False
        keys = [key for _, _, key in self.uploads]
        self.uploads.clear()
        self.pending.clear()
        await self.meta.settle_uploads(keys)

    async def truncate(self, size: int) -> None:
        async with self.lock:
            await self._flush_locked()
            if self.inline is not None and size > self.inline_limit:
                await self._convert_inline()
                await self._flush_locked()
            await self.meta.truncate(self.ino, size, self.bs)
            await self.load(size)
