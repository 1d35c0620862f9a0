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
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import struct
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    evictions: int = 0
    writes: int = 0

    def as_dict(self, used: int, limit: int, entries: int) -> dict[str, Any]:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "corrupt": self.corrupt,
                "evictions": self.evictions, "writes": self.writes, "bytes": used,
                "limit": limit, "entries": entries,
                "hit_ratio": round(self.hits / total, 4) if total else 0.0}


CHUNK = 64 * 1024


def _trailer(data: bytes | memoryview) -> bytes:
    view = memoryview(data)
    return b"".join(struct.pack("<I", zlib.crc32(view[i:i + CHUNK]))
                    for i in range(0, len(view), CHUNK))


def _name(digest: str, length: int) -> str:
    return f"{digest}_{length}"


class BlockCache:
    """Content-addressed block files under ``root``; all disk I/O runs in threads."""

    def __init__(self, root: str, limit: int) -> None:
        self.root = root
        self.limit = limit
        self.stats = CacheStats()
        self.used = 0
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._blocks = os.path.join(root, "blocks")
        self._tmp = os.path.join(root, "tmp")
        # disk I/O has threads of its own: a slow disk must not delay the hashing that
        # uploads and verified reads wait for in the default pool
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cache-io")
        self.pending_writes = 0

    @classmethod
    async def open(cls, root: str, limit: int) -> BlockCache:
        cache = cls(root, limit)
        await cache._run(cache._scan)
        return cache

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    def _path(self, name: str) -> str:
        return os.path.join(self._blocks, name[:2], name)

    def _scan(self) -> None:
        """Index what a previous run left, oldest first; drop stray temporary files."""
        os.makedirs(self._blocks, exist_ok=True)
        os.makedirs(self._tmp, exist_ok=True)
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
        for _, name, size in sorted(found):
            self._lru[name] = size
            self.used += size
        self._evict_sync()

    async def get(self, digest: str, length: int) -> bytes | None:
        name = _name(digest, length)
        if name not in self._lru:
            self.stats.misses += 1
            return None
        self._lru.move_to_end(name)
        data = await self._run(self._load, name, digest, length)
        if data is None:
            self._forget(name)
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
        """Bytes [start, start+size) of a cached block, verified chunk by chunk; None on miss."""
        name = _name(digest, length)
        if name not in self._lru:
            return None
        self._lru.move_to_end(name)
        data = await self._run(self._load_range, name, length, start, size)
        if data is None:
            self._forget(name)
            return None
        self.stats.hits += 1
        return data

    def _load_range(self, name: str, length: int, start: int, size: int) -> bytes | None:
        path = self._path(name)
        first, last = start // CHUNK, (min(start + size, length) - 1) // CHUNK
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            body = os.pread(fd, min(length, (last + 1) * CHUNK) - first * CHUNK, first * CHUNK)
            crcs = os.pread(fd, 4 * (last - first + 1), length + 4 * first)
        finally:
            os.close(fd)
        ok = len(crcs) == 4 * (last - first + 1)
        for i in range(last - first + 1) if ok else ():
            chunk = memoryview(body)[i * CHUNK:(i + 1) * CHUNK]
            if struct.unpack_from("<I", crcs, 4 * i)[0] != zlib.crc32(chunk):
                ok = False
                break
        if not ok:
            return self._discard_corrupt(name, path)
        offset = start - first * CHUNK
        return body[offset:offset + size]

    def _discard_corrupt(self, name: str, path: str) -> None:
        self.stats.corrupt += 1
        log.warning("corrupt cache block removed", extra={"block": name})
        try:
            os.unlink(path)
        except OSError:
            pass

    def _forget(self, name: str) -> None:
        size = self._lru.pop(name, None)
        if size is not None:
            self.used -= size

    async def put(self, digest: str, data: bytes) -> None:
        name = _name(digest, len(data))
        if name in self._lru or len(data) > self.limit:
            return
        try:
            self.pending_writes += 1
            try:
                await self._run(self._store, name, data)
            finally:
                self.pending_writes -= 1
        except OSError as exc:
            log.warning("cache write failed", extra={"error": str(exc)})
            return
        self.stats.writes += 1
        stored = len(data) + 4 * ((len(data) + CHUNK - 1) // CHUNK)
        self._lru[name] = stored
        self.used += stored
        if self.used > self.limit:
            victims = self._pick_victims()
            await self._run(self._unlink_all, victims)

    def _store(self, name: str, data: bytes) -> None:
        tmp = os.path.join(self._tmp, f"{name}.{secrets.token_hex(4)}")
        final = self._path(name)
        trailer = _trailer(data)
        for attempt in (1, 2):
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.write(trailer)
                os.makedirs(os.path.dirname(final), exist_ok=True)
                os.rename(tmp, final)
                return
            except FileNotFoundError:
                if attempt == 2:
                    raise
                # the cache directory was wiped under us: recreate it and try once more
                os.makedirs(self._tmp, exist_ok=True)
                os.makedirs(os.path.dirname(final), exist_ok=True)

    def _pick_victims(self) -> list[str]:
        victims = []
        while self.used > self.limit and self._lru:
            name, size = self._lru.popitem(last=False)
            self.used -= size
            self.stats.evictions += 1
            victims.append(name)
        return victims

    def _unlink_all(self, names: list[str]) -> None:
        for name in names:
            try:
                os.unlink(self._path(name))
            except OSError:
                pass

    def _evict_sync(self) -> None:
        self._unlink_all(self._pick_victims())

    def summary(self) -> dict[str, Any]:
        return self.stats.as_dict(self.used, self.limit, len(self._lru))
