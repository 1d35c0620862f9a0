"""The S3 client: idempotent get/put/delete/list with bounded retries.

Every call is safe to repeat (objects are immutable and content-addressed), so a
transient failure is simply retried with jittered backoff until ``deadline`` seconds
have passed; only then does the caller see ``StorageUnavailable``. The deadline is
what bounds how long an ``fsync`` waits for an unreachable S3 before failing with EIO.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.httpsession import AIOHTTPSession
from aiobotocore.session import get_session
from botocore.auth import S3SigV4Auth
from botocore.exceptions import BotoCoreError, ClientError
from botocore.httpsession import get_cert_path
from botocore.utils import parse_timestamp

from chunkfs.config import StorageConfig
from chunkfs.errors import InvalidArgument, NoSuchObject, StorageUnavailable
from chunkfs.latency import Latency

log = logging.getLogger(__name__)
T = TypeVar("T")

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_PERMANENT = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket",
              "InvalidBucketName", "403"}


@dataclass
class StoreStats:
    """Counters for ``chunkfs status`` and the CSI metrics."""

    requests: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    retries: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    latency_sum: float = 0.0
    latency_count: int = 0
    latency: Latency = field(default_factory=Latency)

    def observe(self, op: str, seconds: float) -> None:
        self.requests[op] = self.requests.get(op, 0) + 1
        self.latency_sum += seconds
        self.latency_count += 1
        self.latency.observe(seconds)

    def failed(self, op: str, err: BaseException) -> None:
        self.errors += 1
        self.latency.error(f"{op}: {type(err).__name__}")

    def as_dict(self) -> dict[str, Any]:
        avg = self.latency_sum / self.latency_count if self.latency_count else 0.0
        return {"requests": dict(self.requests), "errors": self.errors, "retries": self.retries,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "avg_latency_ms": round(avg * 1000, 3), "latency": self.latency.as_dict()}


_BLOCK_PATH = re.compile(r"/blocks/[0-9a-f]{2}/[0-9a-f]{2}/([0-9a-f]{64})_\d+$")
_DIGEST = "chunkfs_payload_sha256"
_botocore_payload = S3SigV4Auth.payload


def _payload(self: S3SigV4Auth, request: Any) -> str:
    return request.context.get(_DIGEST) or _botocore_payload(self, request)


# Over plain HTTP botocore hashes every PUT body to sign it, synchronously on the event
# loop, although a block's name already is the SHA-256 of its content. Our client marks
# block PUTs with that digest (``_mark_block_digest``); every other request is signed as
# botocore does.
S3SigV4Auth.payload = _payload  # type: ignore[method-assign]


def _mark_block_digest(request: Any, **_: Any) -> None:
    match = _BLOCK_PATH.search(request.url.split("?", 1)[0])
    if match and request.method == "PUT":
        request.context[_DIGEST] = match.group(1)


# What an S3 client costs to make, and how a process that forks mounts (chunkfs.zygote)
# pays it once (``preload``):
# * botocore builds every client from JSON models (the S3 API, its endpoint rules) that
#   a fresh session's loader reads and parses again: ~100 ms of CPU. The warm loader's
#   caches hold only parsed data files (no credentials, no configuration, no connection);
# * a new session registers ~130 event handlers, inspecting each one's signature: ~10
#   ms. A spare session made in the zygote and never used there is exactly what a new
#   one would be in the child that takes it (it has read no configuration, no
#   credentials, no environment);
# * aiohttp builds a TLS context per client and loads the CA bundle into it (~20 ms),
#   even for an http:// endpoint. ``_HttpSession`` keeps one per CA file (its path,
#   size and mtime: a replaced bundle is loaded again) without client certificates or
#   proxies, which get their own as before.
_warm_loader: Any = None
_spare_session: Any = None
_tls_contexts: dict[tuple[Any, ...], Any] = {}


class _HttpSession(AIOHTTPSession):
    """aiobotocore's HTTP session, with TLS contexts shared within the process."""

    def _build_ssl_contexts(self, proxy_url: str | None) -> tuple[Any, Any]:
        if self._cert_file or proxy_url:
            return super()._build_ssl_contexts(proxy_url)
        key: tuple[Any, ...] = (self._verify,)
        if self._verify:
            path = get_cert_path(self._verify)
            with contextlib.suppress(OSError, TypeError):
                st = os.stat(path)
                key += (path, st.st_ino, st.st_size, st.st_mtime_ns)
        context = _tls_contexts.get(key)
        if context is None:
            context = _tls_contexts[key] = self._build_verify_context()
        return context, None


def _timestamp(value: Any) -> datetime:
    """botocore's timestamp parser (dateutil's, ~80 us a call) for the two forms S3
    sends: RFC 1123 in headers (``Last-Modified`` of every GET and HEAD) and ISO 8601
    with a zone in XML bodies (listings), ~1-6 us; anything else goes to botocore's.
    It runs on the event loop, once per response."""
    if isinstance(value, str):
        try:
            parsed = (parsedate_to_datetime(value) if value.endswith("GMT")
                      else datetime.fromisoformat(value))
        except (TypeError, ValueError):
            pass
        else:
            if parsed.tzinfo is not None:
                return parsed
    return parse_timestamp(value)


async def preload() -> None:
    """Build one S3 client (imports, models, endpoint rules, a TLS context) without any
    request, and keep a spare session: nothing of it stays open afterwards."""
    global _warm_loader, _spare_session
    session = get_session()
    async with session.create_client(
            "s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
            aws_access_key_id="preload", aws_secret_access_key="preload",
            config=_config(1)) as client:
        client._endpoint.http_session._build_ssl_contexts(None)  # the zygote may block
    _warm_loader = session.get_component("data_loader")
    _spare_session = get_session()


def _config(max_connections: int) -> AioConfig:
    return AioConfig(
        max_pool_connections=max_connections,
        connect_timeout=5,
        read_timeout=20,
        retries={"max_attempts": 1, "mode": "standard"},
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        http_session_cls=_HttpSession,
    )


class ObjectStore:
    """One bucket + prefix on an S3 endpoint; keys passed in are relative to the prefix."""

    def __init__(self, config: StorageConfig, *, deadline: float = 60.0,
                 max_connections: int = 32) -> None:
        self.config = config
        self.deadline = deadline
        self.attempt_timeout = 30.0
        self.stats = StoreStats()
        self._max_connections = max_connections
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    @classmethod
    async def create(cls, config: StorageConfig, **kwargs: Any) -> ObjectStore:
        store = cls(config, **kwargs)
        await store._open()
        return store

    async def _open(self) -> None:
        global _spare_session
        session, _spare_session = _spare_session or get_session(), None
        if _warm_loader is not None:
            session.register_component("data_loader", _warm_loader)
        session.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=_timestamp)
        aio_config = _config(self._max_connections)
        self._client = await self._stack.enter_async_context(
            session.create_client(
                "s3",
                endpoint_url=self.config.endpoint,
                region_name=self.config.region,
                aws_access_key_id=self.config.access_key,
                aws_secret_access_key=self.config.secret_key,
                config=aio_config,
            )
        )
        self._client.meta.events.register("before-sign.s3.PutObject", _mark_block_digest)

    def rotate(self, access_key: str, secret_key: str) -> None:
        """Rotated keys (a Secret changed under a running mount): every request signed
        from now on uses them. Static keys only: the client signs with its credentials
        object, which we own."""
        if not access_key or not secret_key:
            raise InvalidArgument("rotated S3 credentials need both keys")
        credentials = self._client._request_signer._credentials
        if credentials is None or not hasattr(credentials, "secret_key"):
            raise InvalidArgument("this S3 client's credentials cannot be rotated")
        credentials.access_key, credentials.secret_key = access_key, secret_key
        self.config = replace(self.config, access_key=access_key, secret_key=secret_key)

    async def close(self) -> None:
        await self._stack.aclose()

    def _key(self, key: str) -> str:
        return f"{self.config.prefix}/{key}" if self.config.prefix else key

    async def _retry(self, op: str, call: Callable[[], Awaitable[T]],
                     deadline: float | None = None) -> T:
        limit = time.monotonic() + (self.deadline if deadline is None else deadline)
        delay = 0.05
        while True:
            start = time.monotonic()
            # aiohttp's timeouts do not cover sending a request body: a server that stops
            # reading (SIGSTOP, a partition) would stall a PUT forever without this bound
            attempt = max(0.5, min(self.attempt_timeout, limit - start))
            try:
                result = await asyncio.wait_for(call(), attempt)
                self.stats.observe(op, time.monotonic() - start)
                return result
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if code == "NoSuchBucket":  # a 404 too, but no retry or caller can fix it
                    self.stats.errors += 1
                    raise StorageUnavailable(
                        f"bucket {self.config.bucket!r} does not exist") from exc
                if code in _NOT_FOUND or status == 404:
                    self.stats.observe(op, time.monotonic() - start)
                    raise NoSuchObject(f"{op}: no such object") from exc
                self.stats.failed(op, exc)
                if code in _PERMANENT or status in (400, 403):
                    raise StorageUnavailable(f"S3 {op} refused: {code or status}") from exc
                err: Exception = exc
            except (TimeoutError, BotoCoreError, OSError, aiohttp.ClientError) as exc:
                # aiohttp's errors: a body cut midway (ClientPayloadError) or a dropped
                # connection while streaming it
                self.stats.failed(op, exc)
                err = exc
            if time.monotonic() + delay > limit:
                raise StorageUnavailable(
                    f"S3 {op} failed after retrying: {type(err).__name__}: {err}"
                ) from err
            self.stats.retries += 1
            log.warning("s3 retry", extra={"op": op, "error": type(err).__name__,
                                           "delay_s": round(delay, 3)})
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)

    async def put(self, key: str, data: bytes | bytearray | memoryview,
                  deadline: float | None = None) -> None:
        body = bytes(data)

        async def call() -> None:
            await self._client.put_object(Bucket=self.config.bucket, Key=self._key(key), Body=body)

        await self._retry("put", call, deadline)
        self.stats.bytes_out += len(body)

    async def put_new(self, key: str, data: bytes) -> bool:
        """Create ``key`` unless it exists (``If-None-Match: *``); False if it existed.
        A server that ignores the condition overwrites: callers read back what won."""
        async def call() -> bool:
            try:
                await self._client.put_object(Bucket=self.config.bucket, Key=self._key(key),
                                              Body=data, IfNoneMatch="*")
            except ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if status == 412 or exc.response.get("Error", {}).get("Code") == "PreconditionFailed":
                    return False
                raise
            return True

        created = await self._retry("put", call)
        self.stats.bytes_out += len(data)
        return created

    async def get(self, key: str, deadline: float | None = None) -> bytes:
        async def call() -> bytes:
            resp = await self._client.get_object(Bucket=self.config.bucket, Key=self._key(key))
            async with resp["Body"] as stream:
                return await stream.read()

        data = await self._retry("get", call, deadline)
        self.stats.bytes_in += len(data)
        return data

    async def head(self, key: str, deadline: float | None = None) -> dict[str, Any]:
        async def call() -> dict[str, Any]:
            return await self._client.head_object(Bucket=self.config.bucket, Key=self._key(key))

        return await self._retry("head", call, deadline)

    async def exists(self, key: str) -> bool:
        try:
            await self.head(key)
        except NoSuchObject:
            return False
        return True

    async def delete(self, key: str) -> None:
        async def call() -> None:
            await self._client.delete_object(Bucket=self.config.bucket, Key=self._key(key))

        with contextlib.suppress(NoSuchObject):
            await self._retry("delete", call)

    async def delete_many(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[start:start + 1000]]

            async def call(batch: list[dict[str, str]] = batch) -> None:
                await self._client.delete_objects(
                    Bucket=self.config.bucket, Delete={"Objects": batch, "Quiet": True})

            await self._retry("delete", call)

    async def list(self, prefix: str = "") -> AsyncIterator[tuple[str, int, float]]:
        """Yield ``(key relative to the store prefix, size, mtime)`` under ``prefix``."""
        full = self._key(prefix)
        strip = len(self._key(""))
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.config.bucket, "Prefix": full}
            if token:
                kwargs["ContinuationToken"] = token

            async def call(kwargs: dict[str, Any] = kwargs) -> dict[str, Any]:
                return await self._client.list_objects_v2(**kwargs)

            page = await self._retry("list", call)
            for item in page.get("Contents", []):
                yield item["Key"][strip:], item["Size"], item["LastModified"].timestamp()
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    async def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet (local stacks and tests)."""
        async def call() -> None:
            try:
                await self._client.head_bucket(Bucket=self.config.bucket)
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code not in ("404", "NoSuchBucket", "NotFound"):
                    raise
                await self._client.create_bucket(Bucket=self.config.bucket)

        await self._retry("bucket", call)

    async def ping(self, deadline: float = 5.0) -> None:
        """Check that the bucket answers; raises StorageUnavailable otherwise."""
        async def call() -> None:
            await self._client.list_objects_v2(
                Bucket=self.config.bucket, Prefix=self._key("ping/"), MaxKeys=1)

        try:
            await self._retry("list", call, deadline)
        except NoSuchObject as exc:
            raise StorageUnavailable(f"bucket {self.config.bucket!r} does not exist") from exc


def block_key(digest: str, length: int) -> str:
    """Object key of a block: content hash and size in the name, so no HEAD is ever needed."""
    if len(digest) != 64:
        raise InvalidArgument(f"bad block digest {digest!r}")
    return f"blocks/{digest[:2]}/{digest[2:4]}/{digest}_{length}"
