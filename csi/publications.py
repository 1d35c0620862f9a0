"""The controller's durable record of where each volume is published.

``cfs{ID}:pub`` (see ``chunkfs.meta.schema``) maps node id -> the JSON of the
ControllerPublishVolume that published the volume there: access mode, readonly flag and
the publish_context returned. It lives in the volume's own backend (the one its secrets
name), under the volume's hash tag, next to the writer lease it complements:

* a repeat of a publish is compared with the record: the same mode and readonly flag is
  idempotent and returns the recorded publish_context, anything else is ALREADY_EXISTS;
* a single-node access mode cannot be published to a second node (FAILED_PRECONDITION),
  read-only ones included, which take no writer lease;
* multi-node modes record every node; ControllerUnpublishVolume removes one node's
  record (or all of them without a node id) after releasing the lease;
* DeleteVolume refuses a volume that still has records, and removes the key after the
  namespace (chunkfs' namespace deletion does not know this key).

Order against the lease: the record is written after the lease was taken and removed
after it was released, so a crash in between leaves at most a record that the retried
call (the CO retries until it succeeds) rewrites or removes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from chunkfs.meta.redis_meta import with_retries
from chunkfs.meta.schema import Keys

DEADLINE = 15.0  # seconds of Redis retries per call, as VolumeService uses


@dataclass(frozen=True)
class Publication:
    node_id: str
    mode: int                                  # VolumeCapability.AccessMode.Mode
    readonly: bool
    context: dict[str, str] = field(default_factory=dict)   # the publish_context returned
    created: float = field(default_factory=time.time)

    def compatible(self, mode: int, readonly: bool) -> bool:
        return self.mode == mode and self.readonly == readonly

    def encode(self) -> str:
        doc = asdict(self)
        doc.pop("node_id")
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def decode(cls, node_id: str, raw: bytes | str) -> Publication:
        doc = json.loads(raw)
        return cls(node_id=node_id, mode=int(doc["mode"]), readonly=bool(doc["readonly"]),
                   context={str(k): str(v) for k, v in doc.get("context", {}).items()},
                   created=float(doc.get("created", 0)))


async def load(svc: Any, ns: str) -> dict[str, Publication]:
    """Every publication of the volume with namespace id ``ns``, by node id."""
    raw = await with_retries(lambda: svc.r.hgetall(Keys(ns).publications), deadline=DEADLINE)
    return {k.decode(): Publication.decode(k.decode(), v) for k, v in raw.items()}


async def save(svc: Any, ns: str, pub: Publication) -> None:
    await with_retries(lambda: svc.r.hset(Keys(ns).publications, pub.node_id, pub.encode()),
                       deadline=DEADLINE)


async def drop(svc: Any, ns: str, node_ids: list[str]) -> None:
    if node_ids:
        await with_retries(lambda: svc.r.hdel(Keys(ns).publications, *node_ids),
                           deadline=DEADLINE)


async def drop_all(svc: Any, ns: str) -> None:
    await with_retries(lambda: svc.r.delete(Keys(ns).publications), deadline=DEADLINE)
