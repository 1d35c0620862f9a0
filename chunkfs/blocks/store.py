"""Content-addressed blocks: hashing, upload, and the read path.

Reads go memory -> local cache -> S3, with single-flight loading (ten readers of one
block cause one GET) and verification of every byte against the content hash
(``CorruptObject`` instead of bad data). Uploads hash in a worker thread (hashlib
releases the GIL), skip all-zero blocks (holes cost nothing in S3) and write the
block through to the local cache so that a reader on this node hits it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from chunkfs.blocks import slices
from chunkfs.cache import BlockCache
from chunkfs.errors import BlockMissing, CorruptObject, NoSuchObject, StorageUnavailable
from chunkfs.objstore import ObjectStore, block_key

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """An immutable block object: named by the SHA-256 of its content and its size."""

    digest: str
    size: int

    @property
    def key(self) -> str:
        """Its key in the store (what uploads register and commits settle)."""
        return block_key(self.digest, self.size)

    @property
    def ref(self) -> str:
        """How a slice names it (``chunkfs.blocks.slices``)."""
        return slices.object_ref(self.digest, self.size)

    @classmethod
    def of(cls, ref: str) -> ObjectRef:
        return cls(*slices.split_object_ref(ref))


def all_zero(data: bytes | bytearray) -> bool:
    """Cheap for the common case: real data rarely starts and ends with a zero byte."""
    return not data or (data[0] == 0 and data[-1] == 0 and data.count(0) == len(data))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class MemoryBlocks:
    """A small LRU of verified block contents, bounded in bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()

    def get(self, digest: str) -> bytes | None:
        data = self._items.get(digest)
        if data is not None:
            self._items.move_to_end(digest)
        return data

    def put(self, digest: str, data: bytes) -> None:
        if digest in self._items or len(data) > self.limit:
            return
        self._items[digest] = data
        self.used += len(data)
        while self.used > self.limit:
            _, old = self._items.popitem(last=False)
            self.used -= len(old)


class UploadGuard(Protocol):
    """Where uploads are registered so that GC keeps them (``VolumeMeta`` is one)."""

    async def register_upload(self, object_key: str) -> tuple[int, bool]: ...

    async def doomed(self, object_key: str) -> tuple[int, bool]: ...

    async def settle_uploads(self, object_keys: Sequence[str]) -> None: ...


class BlockStore:
    def __init__(self, store: ObjectStore, cache: BlockCache, guard: UploadGuard, *,
                 memory_limit: int, max_parallel_gets: int = 16, max_parallel_puts: int = 8) -> None:
        self.store = store
        self.cache = cache
        self.guard = guard
        self.memory = MemoryBlocks(memory_limit)
        self._inflight: dict[str, asyncio.Future[bytes]] = {}
        self._gets = asyncio.Semaphore(max_parallel_gets)
        # S3 clients copy a request body while it is in flight: more PUTs at once than the
        # store can absorb would only add copies of buffered blocks to the resident memory
        self._puts = asyncio.Semaphore(max_parallel_puts)
        self._background: set[asyncio.Task[Any]] = set()
        # objects this mount uploaded recently, with the GC generation of the upload: a
        # repeated PUT of the same block is skipped while no GC has started deleting since
        # (the generation is unchanged), whatever the grace period (docs/dev/gc.md)
        self._uploaded: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self.upload_memory_s = 300.0
        self.doomed_poll_s = 0.2

    # ---- read path -----------------------------------------------------------------
    async def get(self, entry: ObjectRef) -> bytes:
        data = self.memory.get(entry.digest)
        if data is not None:
            return data
        fut = self._inflight.get(entry.digest) or self._start_load(entry)
        return await asyncio.shield(fut)

    async def read_range(self, entry: ObjectRef, start: int, size: int) -> bytes:
        """A small piece of a block for a random reader: from memory, else a verified
        range of the cached file, else the whole block (which then gets cached)."""
        data = self.memory.get(entry.digest)
        if data is None and entry.digest not in self._inflight:
            piece = await self.cache.read_range(entry.digest, entry.size, start, size)
            if piece is not None:
                return piece
        if data is None:
            data = await self.get(entry)
        return data[start:start + size]

    def prefetch(self, entry: ObjectRef) -> None:
        """Start loading a block that a sequential reader will want soon."""
        if self.memory.get(entry.digest) is None and entry.digest not in self._inflight:
            self._start_load(entry)

    def _start_load(self, entry: ObjectRef) -> asyncio.Future[bytes]:
        """Single flight: the one load of a block that every reader of it awaits."""
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "never retrieved"
        self._inflight[entry.digest] = fut
        self._spawn(self._load(entry, fut))
        return fut

    async def _load(self, entry: ObjectRef, fut: asyncio.Future[bytes]) -> None:
        try:
            data = await self.cache.get(entry.digest, entry.size)
            if data is None:
                async with self._gets:
                    data = await self._fetch(entry)
            self.memory.put(entry.digest, data)
            if not fut.done():
                fut.set_result(data)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter
            if not fut.done():
                fut.set_exception(exc)
        finally:
            self._inflight.pop(entry.digest, None)

    async def _fetch(self, entry: ObjectRef) -> bytes:
        key = block_key(entry.digest, entry.size)
        try:
            data = await self.store.get(key)
        except NoSuchObject as exc:
            raise BlockMissing(f"block {entry.digest} is missing from the object store") from exc
        if len(data) != entry.size or await asyncio.to_thread(_sha256, data) != entry.digest:
            # one more try: a torn response is transient, a corrupt object is not
            data = await self.store.get(key)
            if len(data) != entry.size or await asyncio.to_thread(_sha256, data) != entry.digest:
                raise CorruptObject(f"block {entry.digest} in the object store is corrupt")
        self._spawn(self.cache.put(entry.digest, data))
        return data

    # ---- write path ----------------------------------------------------------------
    async def put(self, data: bytes | bytearray, *,
                  deadline: float | None = None) -> ObjectRef | None:
        """Upload one object; None for all-zero data (a hole: nothing is stored).

        The upload is registered with the guard first, so GC keeps the object until a
        commit references it (the caller settles the registration with that commit, see
        ``ObjectRef.key``); an object GC is deleting at this very moment is uploaded again
        once GC is done with it.
        """
        if all_zero(data):
            return None
        digest = await asyncio.to_thread(_sha256, data)
        key = block_key(digest, len(data))
        limit = time.monotonic() + (self.store.deadline if deadline is None else deadline)
        gen = await self._protect(key, limit)
        try:
            now = time.monotonic()
            while self._uploaded and next(iter(self._uploaded.values()))[0] < now - self.upload_memory_s:
                self._uploaded.popitem(last=False)
            if self._uploaded.get(key, (0.0, -1))[1] != gen:
                async with self._puts:
                    await self.store.put(key, data, deadline=max(0.5, limit - time.monotonic()))
                self._uploaded[key] = (time.monotonic(), gen)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.guard.settle_uploads([key])
            raise
        if self.cache.pending_writes < 8:  # a cache that cannot keep up is skipped, not waited for
            self._spawn(self.cache.put(digest, data))
        return ObjectRef(digest, len(data))

    async def _protect(self, key: str, limit: float) -> int:
        """Register an upload; wait while a GC run deletes that object. Returns the GC
        generation to compare with the one of an earlier upload of the same object."""
        gen, doomed = await self.guard.register_upload(key)
        while doomed:
            if time.monotonic() > limit:
                raise StorageUnavailable("garbage collection kept deleting this block for longer "
                                         "than the I/O timeout")
            await asyncio.sleep(self.doomed_poll_s)
            gen, doomed = await self.guard.doomed(key)
        return gen

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for background cache writes (before shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
