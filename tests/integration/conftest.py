"""Fixtures shared by the integration tests that drive the service layer directly."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator

import pytest

from chunkfs.config import StorageConfig
from chunkfs.fsck import check_namespace
from chunkfs.meta.redis_meta import connect_fast
from chunkfs.meta.schema import SNAPSHOTS, VOLUMES
from chunkfs.volumes import VolumeService
from tests.integration.fs_fixtures import allow_list, body_passed, fail_on


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
async def svc(meta_url: str, s3_env: dict[str, str],
              request: pytest.FixtureRequest) -> AsyncIterator[VolumeService]:
    """A VolumeService on a fresh Redis database and S3 prefix (see ``open_svc``). At
    teardown, after a passing test, every volume and snapshot namespace must pass fsck
    --objects (the check of ``chunkfs fsck``, run in-process)."""
    async with open_svc(meta_url, s3_env) as service:
        yield service
        if body_passed(request.node):
            fail_on(await _fsck_all(service, request.node), "fsck of the test's namespaces")


async def _fsck_all(service: VolumeService, node: pytest.Item) -> list[str]:
    allowed = [re.compile(p) for p in allow_list(node, "fsck_allows")]
    problems = []
    for kind, key in (("volume", VOLUMES), ("snapshot", SNAPSHOTS)):
        for name, ns in sorted((await service.r.hgetall(key)).items()):
            for line in await check_namespace(service.r, ns.decode(), service.store):
                text = f"{kind} {name.decode()}: {line}"
                if not any(p.search(text) for p in allowed):
                    problems.append(text)
    return problems
