"""Whole-database reads that must see every shard of a Redis Cluster.

Most of chunkfs talks to one key (or one hash tag) at a time, which redis-py routes
on a cluster as on a single server. A few readers need the whole database: GC lists
every namespace and must notice a reshard; the durability check reads every server's
settings. They go through these helpers, which take either client (``redis.asyncio.
Redis`` or ``RedisCluster``, as built by ``chunkfs.meta.redis_meta.connect``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio.cluster import RedisCluster

_TIME = "local t = redis.call('TIME') return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)"


def is_cluster(r: Any) -> bool:
    return isinstance(r, RedisCluster)


async def _primaries(r: Any) -> list[Any]:
    """The cluster's primaries (its slot map is loaded first), or [None] for one server."""
    if not is_cluster(r):
        return [None]
    await r.initialize()  # a no-op once the client knows the cluster
    return list(r.get_primaries())


async def scan_keys(r: Any, match: str, count: int = 1000) -> AsyncIterator[bytes]:
    """Every key matching ``match`` on every primary (one after the other)."""
    if not is_cluster(r):
        async for key in r.scan_iter(match=match, count=count):
            yield key
        return
    for node in await _primaries(r):
        cursor = 0
        while True:
            cursors, keys = await r.scan(cursor, match=match, count=count, target_nodes=node)
            for key in keys:
                yield key
            cursor = next(iter(cursors.values()))
            if cursor == 0:
                break


async def server_ms(r: Any, key: str) -> int:
    """The clock (unix ms) of the server that holds ``key``: compared with timestamps
    that scripts on that server wrote, never with another server's clock."""
    return int(await r.eval(_TIME, 1, key))


async def earliest_clock_ms(r: Any) -> int:
    """The earliest of every primary's clock, read now. A run that starts now may treat
    anything any shard stamps from here on as "at or after its start"."""
    times = []
    for node in await _primaries(r):
        if node is None:
            seconds, micros = await r.time()
        else:
            seconds, micros = await r.execute_command("TIME", target_nodes=node)
        times.append(int(seconds) * 1000 + int(micros) // 1000)
    return min(times)


async def layout(r: Any) -> tuple[tuple[str, str], ...] | None:
    """Which primary serves which slots (None for a single server). A slot being
    migrated shows as ``[slot->-node]`` / ``[slot-<-node]`` in its primary's entry."""
    if not is_cluster(r):
        return None
    raw = await r.execute_command("CLUSTER", "NODES", target_nodes=(await _primaries(r))[0])
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    shards = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 8 and "master" in fields[2].split(","):
            shards.append((fields[0], " ".join(fields[8:])))
    return tuple(sorted(shards))


def migrating(shape: tuple[tuple[str, str], ...] | None) -> bool:
    return shape is not None and any("[" in slots for _, slots in shape)


async def per_server(r: Any, *command: Any) -> list[tuple[str, Any]]:
    """``command`` on every primary: [(address, reply)] (a reply may be an exception)."""
    out: list[tuple[str, Any]] = []
    for node in await _primaries(r):
        try:
            if node is None:
                reply = await r.execute_command(*command)
            else:
                reply = await r.execute_command(*command, target_nodes=node)
        except Exception as exc:  # noqa: BLE001 - the caller reports it per server
            reply = exc
        out.append((node.name if node is not None else _address(r), reply))
    return out


def _address(r: Any) -> str:
    pool = r.connection_pool
    if getattr(pool, "service_name", None):
        return f"primary {pool.service_name!r} (Sentinel)"
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
