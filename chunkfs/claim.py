"""Which metadata engine a storage prefix belongs to.

GC deletes every block object under a prefix that its metadata engine does not
reference. A second engine (another Redis, or another database of the same Redis,
named by a StorageClass's Secret) writing blocks under the same prefix would see them
deleted by the first one's GC. So a prefix records, in one object at its root, the
identity of the one engine allowed to use it (``cfs:engine`` in Redis, a random id
made on first use), and every engine checks it before it creates volumes, mounts,
or deletes anything. A mismatch is refused with a clear error, never "fixed".

The one legitimate hand-over is a restore: Redis was lost, an empty Redis takes its
place and a volume is restored from a snapshot manifest. That adopts the prefix's
identity (``adopt=True``), but only into a Redis that has no volumes or snapshots.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import redis.asyncio as aioredis

from chunkfs.errors import NoSuchObject, StorageClaimed
from chunkfs.meta.schema import ENGINE, SNAPSHOTS, VOLUMES
from chunkfs.objstore import ObjectStore

MARKER = "chunkfs-engine.json"
FORMAT = 1


def _decode(data: bytes) -> str:
    try:
        doc = json.loads(data)
        engine = doc["engine"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StorageClaimed(f"the storage marker {MARKER} is unreadable ({type(exc).__name__}); "
                             "refusing to use this prefix") from None
    if not isinstance(engine, str) or not engine:
        raise StorageClaimed(f"the storage marker {MARKER} names no engine")
    return engine


async def read_marker(store: ObjectStore, deadline: float | None = None) -> str | None:
    """The engine the prefix belongs to, None if unclaimed. A mount reads it at start
    (``chunkfs.startup``): that GET is also its check that the bucket answers."""
    try:
        return _decode(await store.get(MARKER, deadline=deadline))
    except NoSuchObject:
        return None


async def _empty(r: aioredis.Redis) -> bool:
    return not (await r.exists(VOLUMES) or await r.exists(SNAPSHOTS))


async def claim_storage(r: aioredis.Redis, store: ObjectStore, *, adopt: bool = False) -> str:
    """Make sure ``store``'s prefix belongs to the engine behind ``r``; returns its id.

    Claims an unclaimed prefix (and gives the engine an id if it has none yet). Raises
    ``StorageClaimed`` when the prefix belongs to another engine.
    """
    # the marker first: every claimant sets the engine's identity before it writes the
    # marker, so a marker read before the identity is never newer than it (the other
    # order refuses a claimant that started first and read the marker late)
    marker = await read_marker(store)
    mine: bytes | None = await r.get(ENGINE)
    where = store.config.url
    if marker is not None:
        if mine is not None and mine.decode() == marker:
            return marker
        if mine is None and adopt and await _empty(r) and await r.set(ENGINE, marker, nx=True):
            return marker
        if mine is None:
            raise StorageClaimed(
                f"{where} belongs to metadata engine {marker}, and this Redis database has no "
                "engine identity: point it at its own storage prefix, or restore volumes into "
                "it from this prefix's snapshots (volume create --from-snapshot)")
        raise StorageClaimed(
            f"{where} belongs to metadata engine {marker}, not to this Redis database "
            f"(engine {mine.decode()}): every storage prefix serves exactly one Redis "
            "database, or one engine's garbage collection would delete the other's blocks")
    if mine is None:
        await r.set(ENGINE, secrets.token_hex(16), nx=True)
        mine = await r.get(ENGINE)
        assert mine is not None
    engine = mine.decode()
    doc: dict[str, Any] = {"format": FORMAT, "engine": engine, "claimed": time.time()}
    await store.put_new(MARKER, json.dumps(doc).encode())
    found = await read_marker(store)  # another engine may have won a race to claim it
    if found != engine:
        raise StorageClaimed(f"{where} was claimed by metadata engine {found} at the same time")
    return engine
