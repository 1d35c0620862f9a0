"""Which Redis and S3 a request talks to, and a small cache of open VolumeServices.

The plugin's own environment (``CHUNKFS_META``, ``CHUNKFS_STORAGE``, ``AWS_*``, the
same as the chunkfs CLI) is the default backend, so volumes need no StorageClass
parameters at all. A StorageClass selects another backend by naming Kubernetes
Secrets (``csi.storage.k8s.io/provisioner-secret-name`` and friends); their keys
arrive in the CSI ``secrets`` fields of every RPC that needs them and override the
environment per request:

    meta-url            redis://[:password@]host:port/db
    storage             s3://bucket/prefix
    endpoint            S3 endpoint URL
    region              S3 region
    access-key-id       S3 credentials
    secret-access-key

Credentials are never taken from parameters and never logged (``Backend.describe``
is the redacted form).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from chunkfs.config import StorageConfig, backend_from_env, redact_url

log = logging.getLogger("chunkfs.csi.backends")

# secret key -> environment variable, as the chunkfs CLI reads it
SECRET_ENV = {
    "meta-url": "CHUNKFS_META",
    "storage": "CHUNKFS_STORAGE",
    "endpoint": "AWS_ENDPOINT_URL",
    "region": "AWS_REGION",
    "access-key-id": "AWS_ACCESS_KEY_ID",
    "secret-access-key": "AWS_SECRET_ACCESS_KEY",
}
BACKEND_ENV = (*SECRET_ENV.values(), "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")


@dataclass(frozen=True)
class Backend:
    meta_url: str
    storage: StorageConfig
    overrides: tuple[tuple[str, str], ...] = ()   # env vars set from secrets

    def describe(self) -> str:
        return f"meta={redact_url(self.meta_url)} storage={self.storage.url}"

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment a `chunkfs mount` child needs to reach this backend."""
        env = dict(os.environ if base is None else base)
        return overlay_env(env, dict(self.overrides))


def overlay_env(env: dict[str, str], overrides: Mapping[str, str]) -> dict[str, str]:
    if "AWS_ENDPOINT_URL" in overrides:
        env.pop("AWS_ENDPOINT_URL_S3", None)  # it would win over the secret's endpoint
    env.update(overrides)
    return env


def overrides_from_secrets(secrets: Mapping[str, str]) -> dict[str, str]:
    """Environment overrides named by a CSI secrets map (unknown keys are ignored)."""
    return {SECRET_ENV[k]: v for k, v in secrets.items() if k in SECRET_ENV and v}


def resolve(secrets: Mapping[str, str], base: Mapping[str, str] | None = None) -> Backend:
    """The backend for a request: the environment overridden by the request's secrets.

    Raises chunkfs ``InvalidArgument`` (-> INVALID_ARGUMENT) when nothing names a
    metadata engine or object store, or a URL is malformed.
    """
    overrides = overrides_from_secrets(secrets)
    env = overlay_env(dict(os.environ if base is None else base), overrides)
    meta, storage = backend_from_env(None, None, env)
    return Backend(meta, storage, tuple(sorted(overrides.items())))


def default_configured(base: Mapping[str, str] | None = None) -> bool:
    env = os.environ if base is None else base
    return bool(env.get("CHUNKFS_META") and env.get("CHUNKFS_STORAGE"))


class ServiceCache:
    """Open ``VolumeService``s keyed by backend, least recently used closed first.

    ``opener`` is ``VolumeService.open`` (tests may pass another factory).
    """

    def __init__(self, opener: Any = None, size: int = 8) -> None:
        self._opener = opener
        self._size = size
        self._services: OrderedDict[Backend, Any] = OrderedDict()
        self._opening: dict[Backend, asyncio.Future[Any]] = {}

    async def get(self, backend: Backend) -> Any:
        svc = self._services.get(backend)
        if svc is not None:
            self._services.move_to_end(backend)
            return svc
        pending = self._opening.get(backend)
        if pending is not None:  # single flight: one open per backend
            return await asyncio.shield(pending)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._opening[backend] = fut
        try:
            svc = await self._open(backend)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # consumed here; waiters re-raise it
            raise
        finally:
            self._opening.pop(backend, None)
        fut.set_result(svc)
        self._services[backend] = svc
        log.info("opened backend %s", backend.describe())
        while len(self._services) > self._size:
            _, old = self._services.popitem(last=False)
            await self._close(old)
        return svc

    async def _open(self, backend: Backend) -> Any:
        opener = self._opener
        if opener is None:
            from chunkfs.volumes import VolumeService

            opener = VolumeService.open
        return await opener(backend.meta_url, backend.storage)

    async def _close(self, svc: Any) -> None:
        with contextlib.suppress(Exception):
            await svc.close()

    async def for_secrets(self, secrets: Mapping[str, str]) -> Any:
        return await self.get(resolve(secrets))

    async def close(self) -> None:
        services, self._services = list(self._services.values()), OrderedDict()
        for svc in services:
            await self._close(svc)
