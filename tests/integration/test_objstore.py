"""The S3 client against SeaweedFS: what its responses parse to."""

from __future__ import annotations

import os
import time
from datetime import UTC

import pytest

from chunkfs.config import StorageConfig
from chunkfs.objstore import ObjectStore, block_key

pytestmark = pytest.mark.integration


async def test_times_in_responses_parse_to_the_moment_of_the_write(s3_env: dict[str, str]) -> None:
    """``Last-Modified`` (a header of every GET and HEAD) and a listing's ``LastModified``
    (XML) go through the client's own timestamp parser (``objstore._timestamp``: UTC
    from the standard library, not dateutil's zone) and say when the object was
    written; GC's grace period is counted from the listing's."""
    store = await ObjectStore.create(StorageConfig.from_url(s3_env["CHUNKFS_STORAGE"], s3_env))
    try:
        await store.ensure_bucket()
        before = time.time()
        key = block_key("ab" * 32, 10)
        await store.put(key, os.urandom(10))
        head = await store.head(key)
        assert head["LastModified"].tzinfo is UTC
        assert before - 2 <= head["LastModified"].timestamp() <= time.time() + 2
        listed = [mtime async for k, _, mtime in store.list("blocks/") if k == key]
        assert len(listed) == 1 and abs(listed[0] - head["LastModified"].timestamp()) <= 1
    finally:
        await store.close()
