"""Fixtures for tests whose nodes sit in their own network namespaces."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multinode.cluster import Cluster, netns_available


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    root = Path(tmp_path_factory.mktemp("cluster"))
    c = Cluster(root)
    try:
        c.up()
        yield c
    finally:
        c.down()
