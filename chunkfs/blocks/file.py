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
- Memory pressure may upload any dirty block of any file (``start_upload``, called by the
  mount-wide budget), partial ones too: a later write to such a block starts from the
  uploaded copy, so pressure never changes what a reader sees.
- Capacity is charged at write time (``growth_of``: the bytes the next commit would add to
  the volume's usage, holes included), so ENOSPC surfaces in ``write``; ``truncate``
  never needs to commit other pending data first, so freeing space always works.
- A file truncated to zero (``O_TRUNC``) is this mount's to write whole: its commits set
  the file to exactly what was written since (``exact``), so two nodes rewriting one file
  leave one complete version, the last one closed, never a mix of blocks.
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
        self.committed_inline = 0  # length of the committed inline body (capacity checks)
        self.exact = False  # truncated to zero here: commits replace the whole file
        self.writes = 0  # write calls so far: tells a flush whether writes raced it
        self.lock = asyncio.Lock()
        self.opens = 0

    async def load(self, size: int) -> None:
        inline, entries = await self.meta.file_data(self.ino)
        self.loaded(size, inline, entries)

    def loaded(self, size: int, inline: bytes | None, entries: dict[int, BlockEntry]) -> None:
        self.inline = bytearray(inline) if inline is not None else None
        self.committed_inline = len(inline) if inline is not None else 0
        self.entries = entries
        self.size = self.committed_size = size

    @property
    def is_clean(self) -> bool:
        return not (self.dirty or self.inflight or self.pending or self.inline_dirty
                    or self.converted)

    # ---- capacity ------------------------------------------------------------------
    def _local_len(self, idx: int) -> int:
        """How many bytes block ``idx`` holds in this mount's current view (holes count
        from the block's start, as the committed entry's valid length does)."""
        if self.inline is not None:
            return len(self.inline) if idx == 0 else 0
        if idx in self.dirty:
            return len(self.dirty[idx])
        if idx in self.inflight:
            return len(self.inflight[idx][1])
        entry = self.entry_for(idx)
        return entry.valid if entry else 0

    def growth_of(self, off: int, n: int) -> int:
        """Bytes of volume usage a write of ``n`` bytes at ``off`` adds (what the commit
        will charge): bytes past each touched block's current length."""
        if n <= 0:
            return 0
        end = off + n
        if self.inline is not None and end <= self.inline_limit:
            return max(0, end - len(self.inline))
        growth = 0
        for idx in range(off // self.bs, (end - 1) // self.bs + 1):
            stop = min(end, (idx + 1) * self.bs) - idx * self.bs
            growth += max(0, stop - self._local_len(idx))
        return growth

    @property
    def uncommitted_growth(self) -> int:
        """Usage that committing this mount's local changes would add."""
        if self.inline is not None:
            return max(0, len(self.inline) - self.committed_inline) if self.inline_dirty else 0
        growth = 0
        for idx in set(self.dirty) | set(self.inflight) | set(self.pending):
            entry = self.entries.get(idx)
            growth += max(0, self._local_len(idx) - (entry.valid if entry else 0))
        if self.converted:
            growth -= self.committed_inline
        return max(0, growth)

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
                await self.budget.acquire(grow)
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
        if base:
            await self.budget.acquire(len(base))
            if idx in self.dirty:  # created meanwhile: our budget goes back
                self.budget.release(len(base))
                return self.dirty[idx]
        block = bytearray(base)
        self.dirty[idx] = block
        return block

    async def _convert_inline(self) -> None:
        data = bytes(self.inline or b"")
        if data:
            await self.budget.acquire(len(data))
        self.inline = None
        self.inline_dirty = False
        self.converted = True
        if data:
            self.dirty[0] = bytearray(data)

    def _start_all_uploads(self) -> None:
        for idx in list(self.dirty):
            self._start_upload(idx)

    def start_upload(self, idx: int) -> int:
        """Upload dirty block ``idx`` now (memory pressure); returns its size, 0 if clean."""
        if idx not in self.dirty:
            return 0
        n = len(self.dirty[idx])
        self._start_upload(idx)
        return n

    def _start_upload(self, idx: int) -> None:
        data = bytes(self.dirty.pop(idx))
        self.seq += 1
        seq = self.seq
        self.inflight[idx] = (seq, data)
        task = asyncio.create_task(self._upload(idx, seq, data))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _upload(self, idx: int, seq: int, data: bytes) -> None:
        requeued = False  # its bytes went back to ``dirty``: they stay in the budget
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
                requeued = True
            log.warning("block upload failed", extra={"ino": self.ino, "block": idx,
                                                      "error": f"{type(exc).__name__}: {exc}"})
        finally:
            if self.inflight.get(idx, (None,))[0] == seq:
                del self.inflight[idx]
            if not requeued:
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
            await self.meta.commit(self.ino, size=size, inline=body, exact=self.exact)
            self.committed_size = size if self.exact else max(self.committed_size, size)
            self.committed_inline = len(body)
            if self.writes == writes:
                self.inline_dirty = False
            return
        self._start_all_uploads()
        size, mine = self.size, list(self.tasks)
        await asyncio.gather(*mine, return_exceptions=True)
        if self.errors:
            err = self.errors[0]
            self.errors.clear()
            raise err
        # every finished upload goes in: one that started after the capture holds the
        # captured bytes of its block too (plus newer ones, hidden beyond ``size`` until
        # the next commit); blocks wholly past ``size`` wait for the next commit
        changes = {idx: entry for idx, (_, entry) in self.pending.items() if idx * self.bs < size}
        if not (changes or self.converted or size != self.committed_size):
            return
        settled = self._settled_by(changes)
        await self.meta.commit(self.ino, size=size, entries=changes, exact=self.exact,
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
        if self.exact:
            for idx in [i for i in self.entries if i * self.bs >= size]:
                del self.entries[idx]
        if self.converted:
            self.committed_inline = 0
        self.converted = False
        self.committed_size = size if self.exact else max(self.committed_size, size)

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
        self.inline_dirty = self.converted = False
        keys = [key for _, _, key in self.uploads]
        self.uploads.clear()
        self.pending.clear()
        await self.meta.settle_uploads(keys)

    async def truncate(self, size: int) -> None:
        """Cut or extend the file. Local changes are trimmed to the new size here and
        committed later; the truncation itself commits at once and, shrinking, frees
        space first, so it works on a full volume."""
        async with self.lock:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)  # settle uploads
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
                self.uploads = [r for r in self.uploads if r not in dropped]
                await self.meta.settle_uploads([key for _, _, key in dropped])

    def _trim_local(self, size: int) -> list[tuple[int, int, str]]:
        """Cut local changes at ``size``; returns the upload records of blocks cut away."""
        bs = self.bs
        if self.inline is not None:
            del self.inline[size:]
            self.inline.extend(bytes(size - len(self.inline)))
        for idx in list(self.dirty):
            keep = size - idx * bs
            if keep < len(self.dirty[idx]):
                freed = len(self.dirty[idx]) - max(0, keep)
                if keep <= 0:
                    del self.dirty[idx]
                else:
                    del self.dirty[idx][keep:]
                self.budget.release(freed)
        for idx, (seq, entry) in list(self.pending.items()):
            keep = size - idx * bs
            if keep <= 0:
                del self.pending[idx]  # its upload records are settled by the next commit
            elif entry is not None and entry.valid > keep:
                self.pending[idx] = (seq, BlockEntry(entry.digest, entry.length, keep))
        self.size = size
        return [r for r in self.uploads if r[0] not in self.pending and r[0] * bs >= size]

    def _trim_committed(self, size: int) -> None:
        """The committed view after TRUNCATE (the script trims the same way)."""
        for idx, entry in list(self.entries.items()):
            keep = size - idx * self.bs
            if keep <= 0:
                del self.entries[idx]
            elif entry.valid > keep:
                self.entries[idx] = BlockEntry(entry.digest, entry.length, keep)
        if self.inline is not None:
            self.committed_inline = size  # TRUNCATE cut or zero-padded the stored body
        self.committed_size = size
