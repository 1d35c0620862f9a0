"""The local block cache: a directory on the node's NVMe, bounded in bytes, shared by
every mount of the node.

Block files are named by their content hash and length, written to ``tmp/`` and
renamed into place (a crash never leaves a half-written block under a real name),
evicted least-recently-used, and verified against their hash on every load: a
corrupted or truncated file is deleted and reported as a miss, so a reader never
sees bad bytes. The directory survives a restart (warm) and may be wiped at any time
(cold): it is never the only copy of anything.

One directory, one bound: the mounts of a node (separate processes, one per volume)
share the directory and its bound. Because blocks are named by content, a block that
two volumes hold (a clone and its source, a snapshot) is one file, cached once and
warm for both. The accounting is a shared SQLite index (``chunkfs.cacheindex``, where
its cross-process protocol is written down); this module is its asynchronous face:
every disk and index operation runs in threads of the cache's own, never on the event
loop, and a cache that cannot write (a full disk, a locked or corrupt index) yields:
the block is not cached, nothing fails.

A cache file is the block followed by a trailer of CRC-32s, one per 64 KiB chunk. Every
load checks the file's size (exactly the block's length plus its trailer) and the CRC of
each chunk it returns: a random read of 4 KiB reads and verifies one chunk, a whole-block
load all of them. The SHA-256 in the name is not recomputed on a load, and this is
why that is enough:
- What goes in is right: every ``put`` is of bytes whose SHA-256 was checked or made
  just before (a GET from S3, an upload, the warm-start prefetch), and the trailer is
  computed from those bytes in the writing process. The SHA-256 guards the path that
  is not ours (the network, the object store); the cache file is our own, on local
  disk, so what can happen to it is bit rot, a truncated or zero-filled file after a
  crash (the rename may reach the disk before the data: there is no fsync, the cache is
  disposable), or a file damaged by hand; not an adversary who forges a CRC.
- A file of the wrong size (truncated, extended, a crash mid-write) is corrupt before
  any byte of it is read. Its trailer is where it should be, so each chunk is compared
  with its own CRC: a damaged chunk or a damaged trailer entry (the trailer is checked
  against the data, never trusted alone) fails the comparison, except with probability
  2^-32 per damaged chunk for garbage, and never for the common faults (CRC-32 catches
  every error of one or two bits in a chunk and every burst of up to 32 bits). A
  zero-filled region fails too: the CRC of zeros is not zero.
- Either way the file is deleted and the load is a miss (the block comes from S3
  again, verified by its SHA-256): a reader never sees bad bytes.
The CRC is ISA-L's (``isal``: the same CRC-32 as zlib's, vectorised, ~40 GB/s here
against ~0.8 GB/s for SHA-256), so a warm 4 MiB load costs one read and ~0.1 ms of CRC
instead of ~5 ms of hashing.

Whole blocks are written and loaded with direct I/O (``O_DIRECT``, through a page-aligned
buffer that each of the two I/O threads keeps: ~8 MiB in all), range reads through the
page cache. A block written or loaded whole is in the memory cache and in the reader's
page cache already; a third copy in the page cache of the cache file cost the kernel
more than all the rest of a cold read (its pages, on a 2-core VM: ~2.5 s of system
time per GiB written, against ~0.2 s direct). A random reader's ranges do gain from
the page cache. A filesystem that refuses direct I/O (EINVAL) is used buffered.

In-process protocol (one event loop: only ``await`` points interleave):
- A name in ``_busy`` has a put in flight in this process: a second put of it is
  refused here at once; across processes the index's WRITING row refuses it.
- ``_known`` remembers names this process saw cached, so that offers of blocks in the
  cache cost no index transaction; a miss forgets the name again (another mount may
  have evicted it).
- Uses (hits) are recorded in memory and written to the index in batches by the upkeep
  task, and before every reservation (so this process's LRU order is exact).
- ``offer`` is the non-blocking put of the read path: it refuses when more than
  ``max_pending`` writes or ``max_pending_bytes`` are in flight, so a slow cache disk
  bounds the memory the cache holds instead of growing it.
- ``on_read`` (the hot set, ``chunkfs.hotset``) hears of every block a reader asked the
  cache for, hit or miss; ``last_foreground`` is when that last happened (the warm-start
  prefetcher gives way to readers).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import mmap
import os
import re
import sqlite3
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from isal.isal_zlib import crc32

from chunkfs.cacheindex import SQLITE_FULL, CacheIndex, Reserved, private_dir

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
_DIGEST = re.compile(r"[0-9a-f]{64}")
_CORRUPT = object()
_NOSPACE = (errno.ENOSPC, errno.EDQUOT)
UPKEEP_S = 1.0          # how often uses are written to the index and totals read back
RECOVER_EVERY = 10      # upkeep rounds between looks for rows of dead mounts
PRESSURE_S = 30.0       # how long a full disk lowers the bound to what fitted
KNOWN_MAX = 65536
ALIGN = 4096            # direct I/O: buffer address, length and offset in units of this
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    evictions: int = 0
    writes: int = 0
    skipped: int = 0  # offers refused because the cache disk lags behind
    rescans: int = 0
    nospace: int = 0  # times the disk was full: the cache yielded (evicted, or skipped a block)
    errors: int = 0   # blocks not cached because of an index or disk error

    def as_dict(self, used: int, limit: int, entries: int) -> dict[str, Any]:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "corrupt": self.corrupt,
                "evictions": self.evictions, "writes": self.writes, "skipped": self.skipped,
                "rescans": self.rescans, "nospace": self.nospace, "errors": self.errors,
                "bytes": used, "limit": limit, "entries": entries,
                "hit_ratio": round(self.hits / total, 4) if total else 0.0}


def _crcs(view: memoryview) -> list[int]:
    """The CRC-32 of each 64 KiB chunk of ``view`` (the last one may be shorter)."""
    return [crc32(view[i:i + CHUNK]) for i in range(0, len(view), CHUNK)]


def _trailer(data: bytes | memoryview) -> bytes:
    crcs = _crcs(memoryview(data))
    return struct.pack(f"<{len(crcs)}I", *crcs)


def _chunks(length: int) -> int:
    return (length + CHUNK - 1) // CHUNK


def stored_size(length: int) -> int:
    """Bytes a block of ``length`` bytes takes in the cache (block + CRC trailer)."""
    return length + 4 * _chunks(length)


def _padded(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _write_all(fd: int, parts: list[memoryview]) -> None:
    """``writev`` until every byte of ``parts`` is written (a regular file may take
    fewer bytes than asked, e.g. when interrupted by a signal)."""
    parts = [p for p in parts if len(p)]
    while parts:
        n = os.writev(fd, parts)
        if n <= 0:
            raise OSError(errno.EIO, "write to the cache made no progress")
        while parts and n >= len(parts[0]):
            n -= len(parts[0])
            parts.pop(0)
        if parts and n:
            parts[0] = parts[0][n:]


def _name(digest: str, length: int) -> str:
    """The file name of a block; rejects what could not be one (or escape the dir)."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ValueError(f"not a SHA-256 hex digest: {digest!r}")
    if not isinstance(length, int) or length < 0:
        raise ValueError(f"bad block length: {length!r}")
    return f"{digest}_{length}"



class BlockCache:
    """Content-addressed block files under ``root``, shared with the other mounts that
    use ``root``; ``limit`` bounds the directory, ``volume_limit`` (optional) the bytes
    that this mount's volume may hold of it."""

    def __init__(self, root: str, limit: int, *, max_pending: int = 8,
                 max_pending_bytes: int = 64 * 1024 * 1024, volume: str = "",
                 volume_limit: int | None = None, direct_io: bool = True) -> None:
        self.root = root
        self.direct_io = direct_io  # False once the directory's filesystem refused it
        self.limit = limit
        self.volume = volume
        self.volume_limit = volume_limit
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.stats = CacheStats()
        self.index = CacheIndex(root, volume)
        self.pending_writes = 0
        self.pending_bytes = 0
        self.on_read: Callable[[str], None] | None = None
        self.disabled: str | None = None  # why the directory could not be used at open
        self.last_foreground = 0.0
        self._busy: set[str] = set()
        self._unreleased: set[str] = set()  # reservations to give up (the index failed)
        self._known: OrderedDict[str, None] = OrderedDict()
        self._uses: dict[str, float] = {}
        self._clock = 0.0
        self._soft_limit: tuple[int, float] | None = None  # (bound, until) after ENOSPC
        self._reconciles_at_open = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._upkeep: asyncio.Task[None] | None = None
        # disk I/O has threads of its own: a slow disk must not delay the hashing that
        # uploads and verified reads wait for in the default pool; the index has one
        # thread, which serialises this process's transactions
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cache-io")
        self._buffers = threading.local()  # each I/O thread's aligned buffer (``_aligned``)
        self._ix = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-index")

    @classmethod
    async def open(cls, root: str, limit: int, **kw: Any) -> BlockCache:
        """Open the cache at ``root``; a directory that cannot be used (a full or
        read-only disk, no permission) gives a mount without a disk cache, not an error."""
        cache = cls(root, limit, **kw)
        try:
            await cache._index_call(cache.index.open)
            cache._reconciles_at_open = cache.index.reconciles
            await cache._index_call(cache.index.shrink, limit, cache.volume_limit)
        except (OSError, sqlite3.Error) as exc:
            cache.disabled = f"{type(exc).__name__}: {exc}"
            log.warning("cache directory unusable: serving without a disk cache",
                        extra={"error": cache.disabled})
        return cache

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    async def _index_call(self, fn: Any, *args: Any) -> Any:
        """Run an index operation in the index thread; a corrupt index is rebuilt."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._ix, fn, *args)
        except sqlite3.OperationalError:
            raise  # locked for too long, or a full disk: the caller skips this time
        except sqlite3.DatabaseError:
            await loop.run_in_executor(self._ix, self.index.reset)
            raise

    @property
    def used(self) -> int:
        """Bytes the directory holds (all volumes), as of the last index transaction."""
        return self.index.totals.bytes

    def _path(self, name: str) -> str:
        return self.index.path(name)

    def entries(self) -> dict[str, int]:
        """The index: file name -> bytes on disk (blocking: for tests and diagnostics)."""
        return self.index.entries()

    # ---- uses --------------------------------------------------------------------------
    def _asked(self, name: str) -> None:
        """A reader asked for a block (hit or miss): foreground, and part of the hot set."""
        self.last_foreground = time.monotonic()
        if self.on_read is not None:
            self.on_read(name)

    def _used(self, name: str) -> None:
        now = max(time.time(), self._clock + 1e-6)  # strictly increasing: an exact LRU here
        self._clock = now
        self._uses[name] = now
        self._remember(name)

    def _remember(self, name: str) -> None:
        self._known[name] = None
        self._known.move_to_end(name)
        if len(self._known) > KNOWN_MAX:
            self._known.popitem(last=False)

    def _take_uses(self) -> list[tuple[str, float]]:
        uses, self._uses = list(self._uses.items()), {}
        return uses

    # ---- reads -------------------------------------------------------------------------
    async def get(self, digest: str, length: int) -> bytes | None:
        name = _name(digest, length)
        self._asked(name)
        if self.disabled:
            self.stats.misses += 1
            return None
        data = await self._run(self._load, name, length)
        if data is None or data is _CORRUPT:
            self._known.pop(name, None)
            self.stats.misses += 1
            if data is _CORRUPT:
                await self._drop(name)
            return None
        self.stats.hits += 1
        self._used(name)
        return data

    def _load(self, name: str, length: int) -> Any:
        """The whole block, every chunk verified; None if not cached, or ``_CORRUPT``.

        Read with direct I/O, file and trailer in one ``pread`` into this thread's
        aligned buffer, then copied out once: the bytes go to the memory cache and the
        reader's page cache anyway, a third copy in the page cache of the cache file
        would only cost the kernel pages (measured: half the system time of a warm
        read). Range reads stay buffered: a random reader gains from the page cache."""
        if not self.direct_io:
            return self._read_chunks(name, length, 0, _chunks(length))
        size = stored_size(length)
        try:
            fd = self._open_checked(name, length, os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._no_direct_io(exc)
            return self._read_chunks(name, length, 0, _chunks(length))
        if fd is None or fd is _CORRUPT:
            return fd
        buf = self._aligned(size)
        try:
            got = os.preadv(fd, [buf[:_padded(size)]], 0)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # the device wants a coarser alignment
                self._no_direct_io(exc)
                return self._read_chunks(name, length, 0, _chunks(length))
            if exc.errno != errno.EIO:
                raise
            return self._corrupt(name)
        finally:
            os.close(fd)
        n = _chunks(length)
        if got != size or list(struct.unpack_from(f"<{n}I", buf, length)) != _crcs(buf[:length]):
            return self._corrupt(name)
        return bytes(buf[:length])

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
        self._asked(name)
        if self.disabled:
            return None
        data = await self._run(self._load_range, name, length, start, end)
        if data is None or data is _CORRUPT:
            self._known.pop(name, None)
            if data is _CORRUPT:
                await self._drop(name)
            return None
        self.stats.hits += 1
        self._used(name)
        return data

    def _load_range(self, name: str, length: int, start: int, end: int) -> Any:
        """Bytes [start, end) of the block, 0 <= start < end <= length: the chunks that
        cover them are read and verified, nothing else."""
        first, last = start // CHUNK, (end - 1) // CHUNK
        body = self._read_chunks(name, length, first, last - first + 1)
        if body is None or body is _CORRUPT:
            return body
        offset = start - first * CHUNK
        if offset == 0 and end - start == len(body):
            return body
        return body[offset:offset + end - start]

    def _read_chunks(self, name: str, length: int, first: int, count: int) -> Any:
        """Chunks ``first .. first+count-1`` of the block, each checked against its
        trailer entry, in a file of exactly the right size; None if there is no file,
        ``_CORRUPT`` if anything does not match (or the disk fails to read it)."""
        span = min(length, (first + count) * CHUNK) - first * CHUNK
        fd = self._open_checked(name, length)
        if fd is None or fd is _CORRUPT:
            return fd
        try:
            body = os.pread(fd, span, first * CHUNK)
            trailer = os.pread(fd, 4 * count, length + 4 * first)
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            return self._corrupt(name)  # a bad sector: the block comes from S3 instead
        finally:
            os.close(fd)
        if (len(body) != span or len(trailer) != 4 * count
                or list(struct.unpack(f"<{count}I", trailer)) != _crcs(memoryview(body))):
            return self._corrupt(name)
        return body

    def _open_checked(self, name: str, length: int, flags: int = 0) -> Any:
        """An open descriptor of the block's file if it has exactly the size it must
        have; None if there is no file, ``_corrupt`` if its size is wrong (the trailer
        of a truncated or extended file is not where it belongs)."""
        try:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_NOFOLLOW | flags)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            return self._corrupt(name)  # a symlink is no file the cache wrote
        try:
            size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        if size != stored_size(length):
            os.close(fd)
            return self._corrupt(name)
        return fd

    def _aligned(self, size: int) -> memoryview:
        """This thread's page-aligned buffer of at least ``_padded(size)`` bytes, kept
        for the next block (its pages stay mapped: a new buffer per block would fault
        in 1024 fresh pages each time). Two I/O threads: at most two blocks' worth."""
        buf = getattr(self._buffers, "buf", None)
        if buf is None or len(buf) < _padded(size):
            # the old one is unmapped when the last view of it goes (closing it here
            # would fail while a view is still alive)
            buf = self._buffers.buf = mmap.mmap(-1, max(ALIGN, _padded(size)))
        return memoryview(buf)

    def _no_direct_io(self, exc: OSError) -> None:
        if self.direct_io:
            self.direct_io = False
            log.info("cache directory refuses direct I/O: buffered from now on",
                     extra={"dir": self.root, "error": str(exc)})

    def _corrupt(self, name: str) -> object:
        self.stats.corrupt += 1
        log.warning("corrupt cache block removed", extra={"block": name})
        return _CORRUPT

    async def _drop(self, name: str) -> None:
        """Unlink a corrupt file through the index (its bytes stop counting with it)."""
        try:
            await self._index_call(self.index.drop, name)
        except (OSError, sqlite3.Error) as exc:
            self.stats.errors += 1
            log.warning("cache index error", extra={"error": str(exc)})

    async def contains(self, names: list[str]) -> set[str]:
        """Which of these block file names the cache holds (one index query)."""
        if self.disabled:
            return set()
        return await self._index_call(self.index.contains, names)

    # ---- writes ------------------------------------------------------------------------
    def _admissible(self, name: str, length: int) -> bool:
        return (name not in self._known and name not in self._busy and not self.disabled
                and stored_size(length) <= self.limit)

    def _bound(self) -> int:
        if self._soft_limit is not None:
            bound, until = self._soft_limit
            if time.monotonic() < until:
                return min(self.limit, bound)
            self._soft_limit = None
        return self.limit

    async def put(self, digest: str, data: bytes) -> bool:
        """Store a block (waiting for the disk); True if the cache holds it afterwards."""
        name = _name(digest, len(data))
        if not self._admissible(name, len(data)):
            return name in self._known
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
        self._busy.add(name)
        self.pending_writes += 1
        self.pending_bytes += n

    async def _write(self, name: str, data: bytes) -> bool:
        """Reserve room in the index, write the file, commit; never raises for a disk or
        index that fails (the block is simply not cached). ``_reserve``d by the caller."""
        size = stored_size(len(data))
        reserved = False
        try:
            outcome = await self._index_call(self.index.reserve, name, size, self._bound(),
                                             self.volume_limit, self._take_uses())
            if outcome is Reserved.EXISTS:
                self._remember(name)
                return True
            if outcome is not Reserved.OK:
                return False
            reserved = True
            stored = await self._run(self._store, name, data)
            if not stored:  # the disk is full: make room below the bound and try once more
                self.stats.nospace += 1
                await self._make_room(2 * size)
                stored = await self._run(self._store, name, data)
            if not stored:
                self._disk_full(size)
                return False
            await self._index_call(self.index.commit, name, size)
            reserved = False
            self.stats.writes += 1
            self._remember(name)
            return True
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != SQLITE_FULL:
                self.stats.errors += 1
                log.warning("cache write failed", extra={"error": str(exc)})
                return False
            await self._make_room(2 * size)  # the index itself cannot write: make room
            self._disk_full(size)
            return False
        except (OSError, sqlite3.Error) as exc:
            self.stats.errors += 1
            log.warning("cache write failed", extra={"error": str(exc)})
            return False
        finally:
            if reserved:
                await self._release_quietly(name)
            self.pending_writes -= 1
            self.pending_bytes -= len(data)
            self._busy.discard(name)

    def _disk_full(self, size: int) -> None:
        """Yield: this block is not cached, and the bound drops to what fitted for a while."""
        self.stats.nospace += 1
        self.stats.skipped += 1
        self._soft_limit = (max(0, self.index.totals.bytes - size),
                            time.monotonic() + PRESSURE_S)
        log.info("cache disk full: block not cached, bound lowered for a while",
                 extra={"bound": self._soft_limit[0]})

    async def _make_room(self, nbytes: int) -> None:
        """Evict ``nbytes`` of the least recently used files from a full disk."""
        try:
            await self._index_call(self.index.evict, nbytes)
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != SQLITE_FULL:
                raise
        await self._index_call(self.index.relieve, nbytes)

    async def _release_quietly(self, name: str) -> None:
        """Give up our reservation; if even that fails, upkeep retries it."""
        try:
            await self._index_call(self.index.release, name)
            self._unreleased.discard(name)
        except (OSError, sqlite3.Error):
            self._unreleased.add(name)

    def _store(self, name: str, data: bytes) -> bool:
        """Write tmp + rename; False if the disk is full (nothing is left behind).

        The directory of a name is made only when the rename finds it missing (once
        per directory, not per block)."""
        tmp = self.index.tmp_path(name)
        final = self._path(name)
        trailer = _trailer(data)
        for attempt in (1, 2):
            try:
                try:
                    self._write_file(tmp, data, trailer)
                    try:
                        os.rename(tmp, final)
                    except FileNotFoundError:
                        if not os.path.exists(tmp):
                            raise  # the cache directory was deleted under us
                        os.makedirs(os.path.dirname(final), mode=0o700, exist_ok=True)
                        os.rename(tmp, final)
                except BaseException:
                    _unlink_quietly(tmp)
                    raise
                return True
            except FileNotFoundError:
                if attempt == 2:
                    raise
                # the cache directory was deleted under us: recreate it and try once more
                # (the index notices at its next transaction and is rebuilt)
                private_dir(self.root)
                os.makedirs(self.index.tmp, mode=0o700, exist_ok=True)
            except OSError as exc:
                if exc.errno in _NOSPACE:
                    return False
                raise
        return False

    def _write_file(self, path: str, data: bytes, trailer: bytes) -> None:
        """Create ``path`` holding the block and its trailer.

        With direct I/O: the block and trailer are copied into this thread's aligned
        buffer and written past the page cache (``_write_direct``). A
        block read from S3 is already in the reader's page cache and in the memory
        cache; writing it through the page cache as well cost the kernel more than the
        rest of a cold read (measured: ~2.5 s of system time per GiB here, against
        ~0.2 s direct). A filesystem that refuses direct I/O (EINVAL) gets one
        ``writev`` from the caller's buffer, now and from then on."""
        if self.direct_io:
            try:
                fd = os.open(path, _CREATE | os.O_DIRECT, 0o600)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._no_direct_io(exc)
                _unlink_quietly(path)  # open may have created it before refusing
            else:
                try:
                    self._write_direct(fd, data, trailer)
                    return
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self._no_direct_io(exc)
                finally:
                    os.close(fd)
                _unlink_quietly(path)
        fd = os.open(path, _CREATE, 0o600)
        try:
            _write_all(fd, [memoryview(data), memoryview(trailer)])
        finally:
            os.close(fd)

    def _write_direct(self, fd: int, data: bytes, trailer: bytes) -> None:
        """The aligned head of the file past the page cache, its last partial 4 KiB (for
        a 4 MiB block: the trailer) through it, so that the file needs no cutting to
        size (a truncate would read the last block back from the disk)."""
        size = len(data) + len(trailer)
        head = size // ALIGN * ALIGN
        buf = self._aligned(size)
        buf[:len(data)] = data
        buf[len(data):size] = trailer
        if head:
            _write_all(fd, [buf[:head]])
        if head < size:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            _write_all(fd, [buf[head:size]])

    # ---- upkeep ------------------------------------------------------------------------
    def start_upkeep(self) -> None:
        """Write uses to the index, refresh the totals and recover dead mounts' rows in
        the background (a mount calls this; ``close`` stops it)."""
        if self._upkeep is None and not self.disabled:
            self._upkeep = asyncio.get_running_loop().create_task(self._upkeep_loop())

    async def _upkeep_loop(self) -> None:
        rounds = 0
        while True:
            await asyncio.sleep(UPKEEP_S)
            rounds += 1
            try:
                await self.flush_uses()
                for name in list(self._unreleased):
                    await self._release_quietly(name)
                if rounds % RECOVER_EVERY == 0:
                    await self._index_call(self.index.recover)
            except (OSError, sqlite3.Error) as exc:
                self.stats.errors += 1
                log.warning("cache index upkeep failed", extra={"error": str(exc)})

    async def flush_uses(self) -> None:
        """Write the recorded uses to the index and read the totals back."""
        if self.disabled:
            self._uses.clear()
            return
        await self._index_call(self.index.touch, self._take_uses())

    async def rescan(self) -> None:
        """Make the index say what the directory holds (files deleted behind the cache's
        back are forgotten, their bytes uncounted; files it did not know are adopted)."""
        if self.disabled:
            return
        await self._index_call(self.index.reconcile)
        self._known.clear()
        await self._index_call(self.index.shrink, self.limit, self.volume_limit)

    # ---- lifetime ----------------------------------------------------------------------
    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self) -> None:
        """Wait for the background writes of ``offer`` (before shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Stop the upkeep, write the last uses, let go of the index."""
        if self._upkeep is not None:
            self._upkeep.cancel()
            await asyncio.gather(self._upkeep, return_exceptions=True)
            self._upkeep = None
        await self.drain()
        try:
            await self.flush_uses()
        except (OSError, sqlite3.Error) as exc:
            log.warning("cache index: last uses not recorded", extra={"error": str(exc)})
        try:
            await asyncio.get_running_loop().run_in_executor(self._ix, self.index.close)
        except OSError:
            pass
        self._io.shutdown(wait=False)
        self._ix.shutdown(wait=False)

    def summary(self) -> dict[str, Any]:
        totals = self.index.totals
        self.stats.rescans = self.index.reconciles - self._reconciles_at_open
        self.stats.evictions = self.index.evicted
        doc = self.stats.as_dict(totals.bytes, self.limit, totals.entries)
        doc.update({"dir": self.root, "disabled": self.disabled or "",
                    "volume_bytes": totals.volume_bytes,
                    "volume_entries": totals.volume_entries,
                    "volume_limit": self.volume_limit or 0,
                    "recovered": self.index.recovered})
        return doc
