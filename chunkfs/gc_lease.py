"""The GC lease: one garbage collection at a time per metadata engine.

A run holds ``cfs{_gc}:state`` (owner, lease expiry) for as long as it runs, renewed in
the background, and checks it before every deletion batch; releasing it clears the
doomed set. The same script bumps the *generation* before a run publishes what it is
about to delete (``docs/dev/gc.md``). ``check_layout`` is the Redis Cluster side of the
same guarantee: a run refuses while slots migrate, and one whose layout changed
deletes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from chunkfs.errors import ChunkfsError
from chunkfs.meta import scripts, topology
from chunkfs.meta.schema import GC_DOOMED, GC_STATE, lua

LEASE_MS = 10 * 60 * 1000      # a run renews it at least every LEASE_RENEW_S
LEASE_RENEW_S = 30.0


class GcRefused(ChunkfsError):
    """GC cannot run safely now (another run holds the lease, a cluster reshard, ...)."""


_LEASE = lua(scripts.PRELUDE + r"""
local now = now_ms()
local st = redis.call('HMGET', KEYS[1], G.owner, G.lease)
local mine = st[1] == ARGV[1]
if ARGV[2] == 'acquire' then
  if st[1] and not mine and tonumber(st[2] or '0') > now then return {0, st[1], st[2]} end
  redis.call('HSET', KEYS[1], G.owner, ARGV[1], G.lease, I(now + tonumber(ARGV[3])),
             G.started, I(now))
  return {1, ARGV[1], I(now)}
end
if not mine then return {0, st[1] or '', st[2] or '0'} end
if ARGV[2] == 'renew' then
  redis.call('HSET', KEYS[1], G.lease, I(now + tonumber(ARGV[3])))
elseif ARGV[2] == 'doom' then
  redis.call('HINCRBY', KEYS[1], G.gen, 1)
else
  redis.call('HSET', KEYS[1], G.lease, '0')
  redis.call('DEL', KEYS[2])
end
return {1, ARGV[1], I(now)}
""")


class Lease:
    """This run's hold on the engine's GC lease, renewed in the background."""

    def __init__(self, r: aioredis.Redis) -> None:
        self.r = r
        self.owner = secrets.token_hex(8)
        self.lost: str | None = None
        self.started_ms = 0

    async def _call(self, action: str) -> list[bytes]:
        return await self.r.eval(_LEASE, 2, GC_STATE, GC_DOOMED, self.owner, action, LEASE_MS)

    async def acquire(self) -> None:
        ok, owner, value = await self._call("acquire")
        if not int(ok):
            raise GcRefused(f"another garbage collection ({owner.decode()}) holds the lease "
                            "of this metadata engine; try again when it is done")
        self.started_ms = int(value)

    async def renew_forever(self) -> None:
        while True:
            await asyncio.sleep(LEASE_RENEW_S)
            try:
                ok, owner, _ = await self._call("renew")
            except Exception as exc:  # noqa: BLE001 - check() reports it before any delete
                self.lost = f"renewing the GC lease failed: {type(exc).__name__}"
                continue
            if not int(ok):
                self.lost = f"the GC lease was taken over by {owner.decode()}"
                return
            self.lost = None

    async def check(self) -> None:
        """Before deleting anything: the lease must still be ours (renewed just now)."""
        ok, owner, _ = await self._call("renew")
        if not int(ok) or self.lost:
            raise GcRefused(self.lost or f"the GC lease was taken over by {owner.decode()}")

    async def bump_generation(self) -> None:
        await self._call("doom")

    async def release(self) -> None:
        await self._call("release")


@contextlib.asynccontextmanager
async def gc_lease(r: aioredis.Redis) -> AsyncIterator[Lease]:
    lease = Lease(r)
    await lease.acquire()
    renewer = asyncio.create_task(lease.renew_forever())
    try:
        yield lease
    finally:
        renewer.cancel()
        with contextlib.suppress(Exception):
            await lease.release()


async def check_layout(r: aioredis.Redis, before: tuple[tuple[str, str], ...] | None,
                       ) -> tuple[tuple[str, str], ...] | None:
    """The cluster's slot layout now; refuses while slots migrate, or when it is not
    ``before`` any more (a key scan during a reshard can miss keys that move)."""
    now = await topology.layout(r)
    if topology.migrating(now):
        raise GcRefused("Redis Cluster slots are being migrated: garbage collection waits "
                        "until the reshard is done (run it again then)")
    if before is not None and now != before:
        raise GcRefused("the Redis Cluster layout changed during garbage collection; "
                        "nothing was deleted (run it again)")
    return now
