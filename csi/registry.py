"""Node plugins register themselves so that the controller knows which nodes exist.

ControllerPublishVolume must answer NOT_FOUND for a node that does not exist, and the
plugin has no Kubernetes API to ask. So every node plugin writes a small record,
``cfs:node:<node id>`` (see ``chunkfs.meta.schema``: started, heartbeat, version,
max_volumes), and renews it every ``interval`` seconds with a TTL of ``EXPIRY_BEATS``
intervals: one HSET + PEXPIRE per node and interval, one EXISTS per publish.

Where the record lives, and why there:

* In the plugin's **default backend** (``CHUNKFS_META``), the only Redis a node plugin
  knows before any request arrives. A request whose secrets name another backend is
  still checked against the default backend's registry: node plugins cannot register
  in backends they have not been told about yet. Controller and node plugins must
  therefore share one default backend (the chart gives both the same environment).
* Without a default backend, or while its Redis does not answer within
  ``LOOKUP_TIMEOUT``, the controller cannot tell and lets the publish proceed (logged):
  the check catches wrong node ids, it is not what keeps writers apart (the writer
  lease is), so it must not make attaching depend on one more Redis being up.
* A restarting node plugin keeps its record: nothing is removed at shutdown, and the
  record outlives ``EXPIRY_BEATS - 1`` missed heartbeats (5 minutes by default), longer
  than a plugin restart or upgrade takes.
* A node that died disappears once its record expires (by default after 5 minutes,
  close to Kubernetes' default pod eviction timeout); until then a publish to it
  succeeds, exactly as it would for a live node that is slow to use the volume.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from chunkfs.meta.schema import node_key
from csi.backends import ServiceCache, default_configured

log = logging.getLogger("chunkfs.csi.registry")

HEARTBEAT_INTERVAL = 30.0  # seconds between two registrations of one node
EXPIRY_BEATS = 10          # a record expires after this many intervals without a beat
LOOKUP_TIMEOUT = 5.0       # the controller's existence check gives up after this long
REGISTER_TIMEOUT = 5.0     # one registration attempt


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    started: float
    heartbeat: float
    version: str
    max_volumes: int

    @classmethod
    def parse(cls, node_id: str, raw: Mapping[bytes, bytes]) -> NodeRecord:
        def text(name: str) -> str:
            return raw.get(name.encode(), b"").decode(errors="replace")

        def number(name: str) -> float:
            try:
                return float(text(name) or 0)
            except ValueError:
                return 0.0

        return cls(node_id, number("started"), number("heartbeat"), text("version"),
                   int(number("max_volumes")))


class NodeRegistry:
    """Registration (node plugins) and lookup (controller) of ``cfs:node:<id>`` records."""

    def __init__(self, services: ServiceCache, *, interval: float = HEARTBEAT_INTERVAL) -> None:
        self.services = services
        self.interval = interval
        self._failing = False  # log a failing heartbeat once, not every interval

    @property
    def ttl_ms(self) -> int:
        return max(1000, int(self.interval * EXPIRY_BEATS * 1000))

    def available(self) -> bool:
        return default_configured()

    async def _redis(self) -> Any:
        svc = await self.services.for_secrets({})
        return svc.r

    # --- node side ------------------------------------------------------------------

    async def register(self, node_id: str, started: float, version: str,
                       max_volumes: int) -> None:
        """Write (or renew) this node's record; raises when Redis does not take it."""
        r = await self._redis()
        key = node_key(node_id)
        async with r.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"started": repr(started), "heartbeat": repr(time.time()),
                                    "version": version, "max_volumes": max_volumes})
            pipe.pexpire(key, self.ttl_ms)
            await pipe.execute()

    async def beat(self, node_id: str, started: float, version: str,
                   max_volumes: int) -> bool:
        """One bounded registration attempt; failures are logged (once) and tolerated."""
        try:
            await asyncio.wait_for(self.register(node_id, started, version, max_volumes),
                                   REGISTER_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - retried at the next interval
            if not self._failing:
                log.warning("node %s: registration in the default backend failed (%s: %s); "
                            "retrying every %.0fs", node_id, type(exc).__name__, exc,
                            self.interval)
            self._failing = True
            return False
        if self._failing:
            log.info("node %s: registered again", node_id)
        self._failing = False
        return True

    async def heartbeat_forever(self, node_id: str, started: float, version: str,
                                max_volumes: int) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.beat(node_id, started, version, max_volumes)

    # --- controller side ------------------------------------------------------------

    async def lookup(self, node_id: str) -> NodeRecord | None:
        """The node's record, or None when it has none (never registered, or expired)."""
        r = await self._redis()
        raw = await r.hgetall(node_key(node_id))
        return NodeRecord.parse(node_id, raw) if raw else None

    async def known(self, node_id: str) -> bool | None:
        """True / False when the registry answered; None when it cannot tell."""
        if not self.available():
            return None
        try:
            return await asyncio.wait_for(self.lookup(node_id), LOOKUP_TIMEOUT) is not None
        except Exception as exc:  # noqa: BLE001 - the check is best effort (see above)
            log.warning("node registry unavailable (%s: %s): not checking node %s",
                        type(exc).__name__, exc, node_id)
            return None
