"""Declarative plumbing shared by the servicers: required fields and per-key exclusivity.

Every handler has the same shape::

    @require("volume_id", "volume_capability")      # INVALID_ARGUMENT when missing
    @exclusive("volume", lambda r: r.volume_id)      # ABORTED while another call holds it
    async def SomeRpc(self, request, context):
        ...validate values -> idempotent lookup -> act -> respond

Errors are raised, never ``set_code``-and-return: the interceptor in ``csi/observe.py``
turns them into gRPC statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from google.protobuf.message import Message

from csi import errors

Handler = Callable[..., Awaitable[Any]]


def _present(request: Message, path: str) -> bool:
    value: Any = request
    for part in path.split("."):
        field = value.DESCRIPTOR.fields_by_name[part]
        if field.message_type and not field.is_repeated and not value.HasField(part):
            return False
        value = getattr(value, part)
    return True if isinstance(value, Message) else bool(value)


def require(*fields: str) -> Callable[[Handler], Handler]:
    """Fail with INVALID_ARGUMENT unless every (dotted) field is set and non-empty."""

    def wrap(fn: Handler) -> Handler:
        @functools.wraps(fn)
        async def handler(self: Any, request: Message, context: Any) -> Any:
            for field in fields:
                if not _present(request, field):
                    raise errors.missing(field)
            return await fn(self, request, context)

        return handler

    return wrap


class KeyLocks:
    """Names (volume ids, snapshot names) with an operation in flight, in this process.

    An RPC finding its key held by another RPC fails with ABORTED at once, as the spec
    allows for a second concurrent call on one volume. Background work (mount recovery)
    is not a caller's concurrent call: an RPC waits for it, and it waits for anyone.
    """

    def __init__(self) -> None:
        self._held: dict[str, bool] = {}  # key -> held by an RPC (not background work)
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    def busy(self, kind: str, key: str) -> bool:
        return f"{kind}/{key}" in self._held

    async def _wait(self, full: str) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(full, []).append(fut)
        await fut

    @contextlib.asynccontextmanager
    async def rpc(self, kind: str, key: str) -> AsyncIterator[None]:
        full = f"{kind}/{key}"
        while full in self._held:
            if self._held[full]:
                raise errors.busy(kind, key)
            await self._wait(full)
        self._held[full] = True
        try:
            yield
        finally:
            self._release(full)

    @contextlib.asynccontextmanager
    async def background(self, kind: str, key: str) -> AsyncIterator[None]:
        full = f"{kind}/{key}"
        while full in self._held:
            await self._wait(full)
        self._held[full] = False
        try:
            yield
        finally:
            self._release(full)

    def _release(self, full: str) -> None:
        self._held.pop(full, None)
        for fut in self._waiters.pop(full, []):
            if not fut.done():
                fut.set_result(None)


def exclusive(kind: str, key: Callable[[Any], str]) -> Callable[[Handler], Handler]:
    """Run the handler holding ``kind/key(request)`` in ``self.locks``, or fail ABORTED."""

    def wrap(fn: Handler) -> Handler:
        @functools.wraps(fn)
        async def handler(self: Any, request: Message, context: Any) -> Any:
            async with self.locks.rpc(kind, key(request)):
                return await fn(self, request, context)

        return handler

    return wrap
