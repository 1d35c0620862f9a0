"""Which Redis and S3 a request talks to, and a small cache of open VolumeServices.

The plugin's own environment (``CHUNKFS_META``, ``CHUNKFS_STORAGE``, ``AWS_*``, the
same as the chunkfs CLI) is the default backend, so volumes need no StorageClass
parameters at all. A StorageClass selects another backend by naming Kubernetes
Secrets (``csi.storage.k8s.io/provisioner-secret-name`` and friends); their keys
arrive in the CSI ``secrets`` fields of every RPC that needs them. A Secret that names
any backend key replaces the default backend as a whole: it must be complete, and no
backend setting or credential is taken from the plugin's environment
(``csi/secret_backend.py`` lists the keys and what each may contain):

    meta-url            redis://[user:password@]host:port/db
    storage             s3://bucket/prefix
    endpoint            S3 endpoint URL
    region              S3 region (optional, us-east-1)
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from chunkfs.config import StorageConfig, backend_from_env, redact_url
from csi import secret_backend
from csi.secret_backend import AddressPolicy

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
    overrides: tuple[tuple[str, str], ...] = ()   # the whole backend env, from secrets

    def describe(self) -> str:
        return f"meta={redact_url(self.meta_url)} storage={self.storage.url}"

    @property
    def from_secrets(self) -> bool:
        return bool(self.overrides)

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment a `chunkfs mount` child needs to reach this backend."""
        env = dict(os.environ if base is None else base)
        return overlay_env(env, dict(self.overrides))


def overlay_env(env: dict[str, str], overrides: Mapping[str, str]) -> dict[str, str]:
    """``env`` with a backend from secrets laid over it: every AWS_* and CHUNKFS_* backend
    variable of ``env`` is dropped first (profiles, session tokens, other endpoints must
    not mix with the Secret's credentials). No overrides: ``env`` as it is."""
    if overrides:
        for key in [k for k in env if k.startswith("AWS_") or k in BACKEND_ENV]:
            del env[key]
    env.update(overrides)
    return env


def overrides_from_secrets(secrets: Mapping[str, str]) -> dict[str, str]:
    """The complete backend environment named by a Secret ({} when it names none).

    Raises INVALID_ARGUMENT for an incomplete or malformed backend (no values in the
    message); addresses are checked separately (``check_addresses``, it resolves DNS).
    """
    if not secret_backend.names_backend(secrets):
        return {}
    keys = secret_backend.check(secrets)
    env = {SECRET_ENV[k]: v for k, v in keys.items()}
    env["AWS_DEFAULT_REGION"] = env["AWS_REGION"]
    env["AWS_EC2_METADATA_DISABLED"] = "true"  # never the node's instance credentials
    return env


def resolve(secrets: Mapping[str, str], base: Mapping[str, str] | None = None) -> Backend:
    """The backend for a request: the Secret's when it names one, else the environment's.

    Raises ``CsiError`` / chunkfs ``InvalidArgument`` (-> INVALID_ARGUMENT) when nothing
    names a metadata engine or object store, or a Secret's backend is incomplete or
    malformed.
    """
    overrides = overrides_from_secrets(secrets)
    env = dict(overrides) if overrides else dict(os.environ if base is None else base)
    meta, storage = backend_from_env(None, None, env)
    return Backend(meta, storage, tuple(sorted(overrides.items())))


async def resolve_checked(secrets: Mapping[str, str], policy: AddressPolicy,
                          base: Mapping[str, str] | None = None) -> Backend:
    """``resolve``, and for a Secret's backend the address policy on its hosts."""
    backend = resolve(secrets, base)
    if backend.from_secrets:
        env = dict(backend.overrides)
        await secret_backend.check_addresses(
            {"meta-url": env["CHUNKFS_META"], "endpoint": env["AWS_ENDPOINT_URL"]}, policy)
    return backend


def default_configured(base: Mapping[str, str] | None = None) -> bool:
    env = os.environ if base is None else base
    return bool(env.get("CHUNKFS_META") and env.get("CHUNKFS_STORAGE"))


class ServiceCache:
    """Open ``VolumeService``s keyed by backend, least recently used closed first.

    ``opener`` is ``VolumeService.open`` (tests may pass another factory).
    """

    def __init__(self, opener: Any = None, size: int = 8,
                 policy: AddressPolicy | None = None) -> None:
        self._opener = opener
        self._size = size
        self.policy = policy or AddressPolicy()
        self._services: OrderedDict[Backend, Any] = OrderedDict()
        self._opening: dict[Backend, asyncio.Future[Any]] = {}
        # told of every backend a request used (the controller's GC runs each of them)
        self.observers: list[Callable[[Backend], None]] = []

    async def get(self, backend: Backend) -> Any:
        for observe in self.observers:
            observe(backend)
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

    async def backend_for(self, secrets: Mapping[str, str]) -> Backend:
        return await resolve_checked(secrets, self.policy)

    async def for_secrets(self, secrets: Mapping[str, str]) -> Any:
        return await self.get(await self.backend_for(secrets))

    async def close(self) -> None:
        services, self._services = list(self._services.values()), OrderedDict()
        for svc in services:
            await self._close(svc)
