"""Does the Redis behind a mount keep what chunkfs acknowledges?

``fsync`` and ``close`` return once a file's new block map is committed in Redis, so
the metadata engine must keep every acknowledged write across a crash of its host.
That takes, on every server that accepts writes (each primary of a cluster):

* ``appendonly yes``: without the append-only file a restart goes back to the last RDB
  snapshot (or to nothing), and every volume loses what was written since;
* ``appendfsync always``: with ``everysec`` a power loss of the Redis host can lose
  the last second of acknowledged metadata, with ``no`` up to about 30 s. ``everysec``
  is enough when chunkfs also waits for a replica (Sentinel with ``wait_replicas``
  >= 1): an acknowledged write is then in the memory of two hosts.

The mount checks these when it starts: each shortfall is one structured log warning
(``redis durability``) and is listed in ``chunkfs status``. Settings it cannot read
(``CONFIG GET`` refused to the user) are reported as unknown. A plain ``redis://``
URL that reaches a Redis Cluster node is refused: it would only ever see one shard.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from chunkfs.errors import InvalidArgument
from chunkfs.meta import topology
from chunkfs.meta.redis_url import RedisTarget

log = logging.getLogger(__name__)


@dataclass
class Durability:
    shape: str
    wait_replicas: int
    servers: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.warnings

    def as_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "wait_replicas": self.wait_replicas, "ok": self.ok,
                "servers": self.servers, "warnings": self.warnings}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _info_field(raw: Any, name: str) -> str | None:
    if isinstance(raw, dict):
        value = raw.get(name)
        return None if value is None else _text(value)
    for line in _text(raw).splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return None


async def check(r: Any, target: RedisTarget) -> Durability:
    """Read every writable server's persistence settings (``r`` is the admin client)."""
    replicated = target.kind == "sentinel" and target.wait_replicas >= 1
    report = Durability(target.kind, target.wait_replicas if target.kind == "sentinel" else 0)
    if target.kind != "cluster":
        (_, info), = await topology.per_server(r, "INFO", "cluster")
        if not isinstance(info, Exception) and _info_field(info, "cluster_enabled") == "1":
            raise InvalidArgument("the metadata URL names one node of a Redis Cluster: use "
                                  "redis+cluster://host:port[,host:port...] so that every "
                                  "shard is reached")
    infos = dict(await topology.per_server(r, "INFO", "persistence"))
    configs = dict(await topology.per_server(r, "CONFIG", "GET", "appendfsync"))
    for address, info in infos.items():
        aof = None if isinstance(info, Exception) else _info_field(info, "aof_enabled")
        fsync = configs.get(address)
        if isinstance(fsync, Exception) or not fsync:
            policy = None
        elif isinstance(fsync, dict):
            policy = _text(next(iter(fsync.values())))
        else:
            policy = _text(fsync[1])
        report.servers.append({"server": address, "appendonly": {"1": "yes", "0": "no"}.get(
            aof or "", "unknown"), "appendfsync": policy or "unknown"})
        report.warnings += _risks(address, aof, policy, replicated)
    return report


def _risks(address: str, aof: str | None, policy: str | None, replicated: bool) -> list[str]:
    if aof is None:
        return [f"{address}: cannot read its persistence settings (INFO refused)"]
    if aof != "1":
        return [f"{address}: appendonly is off: a Redis restart loses every metadata change "
                "since its last snapshot; set appendonly yes"]
    if policy is None:
        return [f"{address}: cannot read appendfsync (CONFIG GET refused; grant +config|get "
                "to check it); chunkfs needs appendfsync always, or everysec with Sentinel "
                "and wait_replicas >= 1"]
    if policy == "no":
        return [f"{address}: appendfsync no: a crash of the Redis host can lose ~30 s of "
                "acknowledged metadata; set appendfsync always"]
    if policy == "everysec" and not replicated:
        return [f"{address}: appendfsync everysec: a power loss of the Redis host can lose "
                "the last second of acknowledged metadata; set appendfsync always, or use "
                "Sentinel with wait_replicas >= 1"]
    return []


def log_report(report: Durability) -> None:
    for warning in report.warnings:
        log.warning("redis durability", extra={"shape": report.shape, "risk": warning})
