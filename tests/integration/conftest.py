"""Fixtures shared by the integration tests that drive the service layer directly."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from chunkfs.config import StorageConfig
from chunkfs.meta.redis_meta import connect_fast
from chunkfs.volumes import VolumeService


@pytest.fixture
async def svc(meta_url: str, s3_env: dict[str, str]) -> AsyncIterator[VolumeService]:
    """A VolumeService on a fresh Redis database and S3 prefix; ``svc.fast`` is a hot-path
    client for building ``VolumeMeta`` objects in tests."""
    service = await VolumeService.open(meta_url, StorageConfig.from_url(s3_env["CHUNKFS_STORAGE"], s3_env))
    service.fast = connect_fast(meta_url)  # type: ignore[attr-defined]
    yield service
    await service.fast.aclose()  # type: ignore[attr-defined]
    await service.close()
