"""The local block cache: a directory on the node's NVMe, bounded in bytes.

Block files are named by their content hash and length, written to ``tmp/`` and
renamed into place (a crash never leaves a half-written block under a real name),
evicted least-recently-used, and verified against their hash on every load: a
corrupted or truncated file is deleted and reported as a miss, so a reader never
sees bad bytes. The directory survives a restart (warm) and may be wiped at any time
(cold): it is never the only copy of anything.

A cache file is the block followed by a trailer of CRC32s, one per 64 KiB chunk, so a
random read of 4 KiB reads and verifies one chunk instead of hashing the whole block;
whole-block loads verify the block's SHA-256 as before.

Accounting protocol (one event loop: only ``await`` points interleave):
- ``_lru`` maps a file name to its ``_Entry`` (bytes on disk); ``used`` is always the sum
  of the entries. An entry is added only after its file was renamed into place, and
  removed before its file is unlinked, each in one step with its ``used`` change.
- A name in ``_busy`` has a disk write or unlink in flight: a second put of it is
  refused (single flight), so two writers never both count one file.
- A failed load forgets an entry only if it is still the entry the load looked up
  (identity, not name): a newer file of the same name is never dropped by an old miss.
- When a write finds the directory gone (wiped), ``rescan`` rebuilds the index from
  what is on disk once no disk operation is in flight; puts are refused meanwhile.
- ``offer`` is the non-blocking put of the read path: it refuses when more than
  ``max_pending`` writes or ``max_pending_bytes`` are in flight, so a slow cache disk
  bounds the memory the cache holds instead of growing it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
import struct
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    evictions: int = 0
    writes: int = 0
    skipped: int = 0  # offers refused because the cache disk lags behind
    rescans: int = 0

    def as_dict(self, used: int, limit: int, entries: int) -> dict[str, Any]:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "corrupt": self.corrupt,
                "evictions": self.evictions, "writes": self.writes, "skipped": self.skipped,
                "rescans": self.rescans, "bytes": used, "limit": limit, "entries": entries,
                "hit_ratio": round(self.hits / total, 4) if total else 0.0}


class _Entry:
    """One indexed block file; compared by identity (see the protocol above)."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


def _trailer(data: bytes | memoryview) -> bytes:
    view = memoryview(data)
    return b"".join(struct.pack("<I", zlib.crc32(view[i:i + CHUNK]))
                    for i in range(0, len(view), CHUNK))


def stored_size(length: int) -> int:
    """Bytes a block of ``length`` bytes takes in the cache (block + CRC trailer)."""
    return length + 4 * ((length + CHUNK - 1) // CHUNK)


def _name(digest: str, length: int) -> str:
    """The file name of a block; rejects what could not be one (or escape the dir)."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ValueError(f"not a SHA-256 hex digest: {digest!r}")
    if not isinstance(length, int) or length < 0:
        raise ValueError(f"bad block length: {length!r}")
    return f"{digest}_{length}"



def _private_dir(path: str) -> None:
    """The cache holds the blocks of every volume that used it: only its owner may read
    it (a pod's user on the node, or another tenant's process, must not). A directory we
    own is tightened to 0700 whatever made it; the blocks in it are created 0600."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid == os.geteuid() and st.st_mode & 0o077:
        os.chmod(path, 0o700)

class BlockCache:
    """Content-addressed block files under ``root``; all disk I/O runs in threads."""

    def __init__(self, root: str, limit: int, *, max_pending: int = 8,
                 max_pending_bytes: int = 64 * 1024 * 1024) -> None:
        self.root = root
        self.limit = limit
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.stats = CacheStats()
        self.used = 0
        self.pending_writes = 0
        self.pending_bytes = 0
        self._lru: OrderedDict[str, _Entry] = OrderedDict()
        self._busy: set[str] = set()
        self._quiet: asyncio.Event | None = None  # set while nothing is busy
        self._scanning = False
        self._rescan_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._blocks = os.path.join(root, "blocks")
        self._tmp = os.path.join(root, "tmp")
        # disk I/O has threads of its own: a slow disk must not delay the hashing that
        # uploads and verified reads wait for in the default pool
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cache-io")

    @classmethod
    async def open(cls, root: str, limit: int, **kw: int) -> BlockCache:
        cache = cls(root, limit, **kw)
        found = await cache._run(cache._list)
        cache._index(found)
        await cache._unlink(cache._pick_victims())
        return cache

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    def _path(self, name: str) -> str:
        return os.path.join(self._blocks, name[:2], name)

    # ---- the index ---------------------------------------------------------------------
    def _list(self) -> list[tuple[float, str, int]]:
        """What the directory holds (mtime, name, size); drops stray temporary files."""
        _private_dir(self.root)
        os.makedirs(self._blocks, mode=0o700, exist_ok=True)
        os.makedirs(self._tmp, mode=0o700, exist_ok=True)
        for entry in os.scandir(self._tmp):
            try:
                os.unlink(entry.path)
            except OSError:
                pass
        found: list[tuple[float, str, int]] = []
        for sub in os.scandir(self._blocks):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                try:
                    st = entry.stat()
                except OSError:
                    continue
                found.append((st.st_mtime, entry.name, st.st_size))
        return found

    def _index(self, found: list[tuple[float, str, int]]) -> None:
        """Replace the index with ``found``, oldest first (the LRU order of a restart)."""
        self._lru = OrderedDict((name, _Entry(size)) for _, name, size in sorted(found))
        self.used = sum(e.size for e in self._lru.values())

    def entries(self) -> dict[str, int]:
        """The index: file name -> bytes on disk."""
        return {name: e.size for name, e in self._lru.items()}

    def _forget(self, name: str, entry: _Entry) -> None:
        if self._lru.get(name) is entry:
            del self._lru[name]
            self.used -= entry.size

    def _begin(self, name: str) -> None:
        self._busy.add(name)
        if self._quiet is not None:
            self._quiet.clear()

    def _end(self, name: str) -> None:
        self._busy.discard(name)
        if not self._busy and self._quiet is not None:
            self._quiet.set()

    # ---- reads -------------------------------------------------------------------------
    async def get(self, digest: str, length: int) -> bytes | None:
        name = _name(digest, length)
        entry = self._lru.get(name)
        if entry is None:
            self.stats.misses += 1
            return None
        self._lru.move_to_end(name)
        data = await self._run(self._load, name, digest, length)
        if data is None:
            self._forget(name, entry)
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return data

    def _load(self, name: str, digest: str, length: int) -> bytes | None:
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                data = f.read(length)
        except FileNotFoundError:
            return None
        if len(data) != length or hashlib.sha256(data).hexdigest() != digest:
            return self._discard_corrupt(name, path)
        try:
            os.utime(path)
        except OSError:
            pass
        return data

    async def read_range(self, digest: str, length: int, start: int, size: int) -> bytes | None:
        """Bytes [start, start+size) of a cached block, verified chunk by chunk; None on miss.

        The block has ``length`` bytes: a range that starts at or past its end, or an
        empty one, holds no bytes (b""; the caller supplies the zeros of a hole), and a
        range running past the end returns the bytes up to it.
        """
        name = _name(digest, length)
        if not isinstance(start, int) or not isinstance(size, int) or start < 0 or size < 0:
            raise ValueError(f"bad range: start={start!r} size={size!r}")
        end = min(start + size, length)
        if start >= end:
            return b""
        entry = self._lru.get(name)
        if entry is None:
            return None
        self._lru.move_to_end(name)
        data = await self._run(self._load_range, name, length, start, end)
        if data is None:
            self._forget(name, entry)
            return None
        self.stats.hits += 1
        return data

    def _load_range(self, name: str, length: int, start: int, end: int) -> bytes | None:
        """Read and verify the chunks covering [start, end), 0 <= start < end <= length."""
        path = self._path(name)
        first, last = start // CHUNK, (end - 1) // CHUNK
        count = last - first + 1
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            body = os.pread(fd, min(length, (last + 1) * CHUNK) - first * CHUNK, first * CHUNK)
            crcs = os.pread(fd, 4 * count, length + 4 * first)
        finally:
            os.close(fd)
        ok = len(crcs) == 4 * count and len(body) == min(length, (last + 1) * CHUNK) - first * CHUNK
        for i in range(count) if ok else ():
            chunk = memoryview(body)[i * CHUNK:(i + 1) * CHUNK]
            if struct.unpack_from("<I", crcs, 4 * i)[0] != zlib.crc32(chunk):
                ok = False
                break
        if not ok:
            return self._discard_corrupt(name, path)
        offset = start - first * CHUNK
        return body[offset:offset + end - start]

    def _discard_corrupt(self, name: str, path: str) -> None:
        self.stats.corrupt += 1
        log.warning("corrupt cache block removed", extra={"block": name})
        try:
            os.unlink(path)
        except OSError:
            pass

    # ---- writes ------------------------------------------------------------------------
    def _admissible(self, name: str, length: int) -> bool:
        return (name not in self._lru and name not in self._busy and not self._scanning
                and stored_size(length) <= self.limit)

    async def put(self, digest: str, data: bytes) -> bool:
        """Store a block (waiting for the disk); True if the cache holds it afterwards."""
        name = _name(digest, len(data))
        if not self._admissible(name, len(data)):
            return name in self._lru
        self._reserve(name, len(data))
        return await self._write(name, data)

    def offer(self, digest: str, data: bytes) -> bool:
        """Cache a block in the background unless the cache disk lags behind: False (and
        nothing is kept) when ``max_pending`` writes or ``max_pending_bytes`` are in
        flight already, or the block is cached or on its way. Never waits."""
        name = _name(digest, len(data))
        if not self._admissible(name, len(data)):
            return False
        if (self.pending_writes >= self.max_pending
                or self.pending_bytes + len(data) > self.max_pending_bytes):
            self.stats.skipped += 1
            return False
        self._reserve(name, len(data))
        self._spawn(self._write(name, data))
        return True

    def _reserve(self, name: str, n: int) -> None:
        self._begin(name)
        self.pending_writes += 1
        self.pending_bytes += n

    async def _write(self, name: str, data: bytes) -> bool:
        """Write a reserved block; the caller reserved ``name`` (``_reserve``)."""
        try:
            wiped = await self._run(self._store, name, data)
        except OSError as exc:
            log.warning("cache write failed", extra={"error": str(exc)})
            return False
        finally:
            self.pending_writes -= 1
            self.pending_bytes -= len(data)
            self._end(name)
        # no await since the rename: nobody else can have indexed this name meanwhile
        entry = _Entry(stored_size(len(data)))
        self._lru[name] = entry
        self.used += entry.size
        self.stats.writes += 1
        if wiped:
            self._start_rescan()
        await self._unlink(self._pick_victims())
        return True

    def _store(self, name: str, data: bytes) -> bool:
        """Write tmp + rename; True if the directory had been wiped (and was recreated)."""
        tmp = os.path.join(self._tmp, f"{name}.{secrets.token_hex(4)}")
        final = self._path(name)
        trailer = _trailer(data)
        wiped = False
        for attempt in (1, 2):
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with open(fd, "wb") as f:
                    f.write(data)
                    f.write(trailer)
                os.makedirs(os.path.dirname(final), mode=0o700, exist_ok=True)
                os.rename(tmp, final)
                return wiped
            except FileNotFoundError:
                if attempt == 2:
                    raise
                # the cache directory was deleted under us: recreate it and try once more
                wiped = True
                _private_dir(self.root)
                os.makedirs(self._tmp, mode=0o700, exist_ok=True)
                os.makedirs(os.path.dirname(final), mode=0o700, exist_ok=True)
        return wiped

    # ---- eviction ----------------------------------------------------------------------
    def _pick_victims(self) -> list[str]:
        victims = []
        while self.used > self.limit and self._lru:
            name, entry = self._lru.popitem(last=False)
            self.used -= entry.size
            self.stats.evictions += 1
            victims.append(name)
        return victims

    async def _unlink(self, names: list[str]) -> None:
        if not names:
            return
        for name in names:
            self._begin(name)
        try:
            await self._run(self._unlink_all, names)
        finally:
            for name in names:
                self._end(name)

    def _unlink_all(self, names: list[str]) -> None:
        for name in names:
            try:
                os.unlink(self._path(name))
            except OSError:
                pass

    # ---- rescans -----------------------------------------------------------------------
    def _start_rescan(self) -> None:
        if self._rescan_task is None or self._rescan_task.done():
            self._rescan_task = self._spawn(self.rescan())

    async def rescan(self) -> None:
        """Rebuild the index from the directory, once no disk operation is in flight
        (files deleted behind the cache's back are forgotten, their bytes uncounted)."""
        if self._scanning:
            return
        self._scanning = True
        try:
            while self._busy:
                if self._quiet is None:
                    self._quiet = asyncio.Event()
                await self._quiet.wait()
            found = await self._run(self._list)
            self._index(found)
            self.stats.rescans += 1
            log.info("cache index rebuilt from disk",
                     extra={"entries": len(self._lru), "bytes": self.used})
        finally:
            self._scanning = False
        await self._unlink(self._pick_victims())

    # ---- lifetime ----------------------------------------------------------------------
    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self) -> None:
        """Wait for the background writes of ``offer`` and any rescan (before shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def summary(self) -> dict[str, Any]:
        return self.stats.as_dict(self.used, self.limit, len(self._lru))
