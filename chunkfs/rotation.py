"""Rotated backend credentials for a running mount.

A Secret rotated under a published volume reaches its mount without a re-mount (which
would need every pod using it to stop): the CSI node plugin hands the new credentials
over the mount's root-only control socket (``chunkfs.control``), and from then on every
new Redis connection authenticates with them and every S3 request is signed with them.
Only credentials change: the servers, database and bucket must stay the same (another
backend for a staged volume is refused by the plugin before it gets here).
"""

from __future__ import annotations

import logging
from typing import Any

from chunkfs.errors import InvalidArgument
from chunkfs.meta import redis_url
from chunkfs.meta.resp import RespClient
from chunkfs.objstore import ObjectStore

log = logging.getLogger(__name__)


def apply(doc: dict[str, Any], *, redis: RespClient, store: ObjectStore) -> None:
    """``doc``: ``meta_url`` (the metadata URL with its new credentials), ``access_key``
    and ``secret_key`` (S3); either part may be absent. Checks everything before changing
    anything it can (``RespClient.rotate`` is the one check that the servers stay the
    same, and it changes nothing when they do not); error messages never repeat a
    credential."""
    url, access, secret = doc.get("meta_url"), doc.get("access_key"), doc.get("secret_key")
    if not any((url, access, secret)):
        raise InvalidArgument("no credentials given")
    for value in (url, access, secret):
        if value is not None and not isinstance(value, str):
            raise InvalidArgument("credentials must be strings")
    target = None
    if url:
        try:
            target = redis_url.parse(url)
        except InvalidArgument:
            raise InvalidArgument("the rotated metadata URL is not valid") from None
    if (access or secret) and not (access and secret):
        raise InvalidArgument("rotated S3 credentials need both keys")
    if target is not None:
        try:
            redis.rotate(target)
        except ValueError:
            raise InvalidArgument("rotated credentials must name the same Redis") from None
    if access and secret:
        store.rotate(access, secret)
    log.info("credentials rotated", extra={"redis": target is not None,
                                           "s3": bool(access and secret)})
