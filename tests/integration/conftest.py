"""Fixtures shared by the integration tests that drive the service layer directly."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from chunkfs.config import StorageConfig
from chunkfs.meta.redis_meta import connect_fast
from chunkfs.volumes import VolumeService


@contextlib.asynccontextmanager
async def open_svc(url: str, s3_env: dict[str, str]) -> AsyncIterator[VolumeService]:
    """A VolumeService on ``url`` and the test's S3 prefix, with ``.fast``: a hot-path
    client for building ``VolumeMeta`` objects in tests."""
    service = await VolumeService.open(url, StorageConfig.from_url(s3_env["CHUNKFS_STORAGE"], s3_env))
    service.fast = connect_fast(url)  # type: ignore[attr-defined]
    try:
        yield service
    finally:
        await service.fast.aclose()  # type: ignore[attr-defined]
        await service.close()


@pytest.fixture
async def svc(meta_url: str, s3_env: dict[str, str]) -> AsyncIterator[VolumeService]:
    """A VolumeService on a fresh Redis database and S3 prefix (see ``open_svc``)."""
    async with open_svc(meta_url, s3_env) as service:
        yield service
