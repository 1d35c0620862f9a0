"""Shared fixtures: the real backends (Redis + SeaweedFS), started lazily, once per session.

Nothing starts unless a test asks for one of SERVICE_FIXTURES; such tests are marked
``services`` automatically, so ``pytest -m "not services"`` (or ``--no-services``) runs
without backends. Tests under tests/<group>/ get the marker ``<group>`` (integration,
csi, multinode, container, e2e).

Fixtures (all backends are real processes on loopback ports):
  local_services  session   devstack.localstack.LocalStack (.redis: RedisService, .s3: S3Service)
  redis_url       session   "redis://127.0.0.1:PORT/0" (db 0 is shared; prefer meta_url)
  s3_client       session   botocore S3 client with the stack's credentials (path style)
  meta_url        function  "redis://127.0.0.1:PORT/N": a database flushed for this test
  s3_env          function  AWS_* + CHUNKFS_STORAGE=s3://chunkfs/t/<test>-<random>
  backend_env     function  os.environ (minus AWS_*/CHUNKFS_*) + s3_env + CHUNKFS_META=meta_url,
                            venv bin first on PATH: pass as env= to a `chunkfs` subprocess
  nonroot_user    session   NonRootUser(name, uid, gid): "chunkfs-test", uid 1777 if free

Redis in its production shapes (tests/redis_shapes.py; each started on first use):
  acl_redis       session   AclRedis: requirepass + a least-privilege ACL user (.user_url(db))
  tls_redis       session   TlsRedis: TLS only, throwaway CA (.url(db), .pki)
  redis_cluster   session   Cluster: three primaries (.url, .nodes, .client())
  cluster_url     function  redis_cluster.url, the cluster flushed for this test
  sentinel_set    function  SentinelSet: primary + replica + 3 sentinels, new for each test
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from devstack.localstack import BUCKET, LocalStack, ServiceError
from tests import redis_shapes

SERVICE_FIXTURES = frozenset(
    {"local_services", "redis_url", "s3_client", "meta_url", "s3_env", "backend_env",
     "acl_redis", "tls_redis", "redis_cluster", "cluster_url", "sentinel_set"}
)
GROUPS = ("unit", "integration", "csi", "multinode", "container", "e2e")
NONROOT_NAME = "chunkfs-test"
NONROOT_UID = 1777
REDIS_TEST_DBS = range(1, 256)  # localstack starts redis with 256 databases; 0 is redis_url's


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("chunkfs")
    group.addoption(
        "--no-services",
        action="store_true",
        help="skip the tests that need the local Redis + SeaweedFS",
    )
    group.addoption(
        "--services-dir",
        default=None,
        help="data directory of the test services (default: a pytest tmp dir)",
    )
    group.addoption(
        "--keep-services",
        action="store_true",
        help="leave the services running at the end (with --services-dir: reused next run)",
    )
    fsx = parser.getgroup("fsx", "the randomized operation tester (tests/integration/test_fsx.py)")
    fsx.addoption("--fsx-long", action="store_true",
                  help="run the long fsx mode (also CHUNKFS_FSX_LONG=1): random seeds for "
                       "--fsx-minutes, for the benchmark machine")
    fsx.addoption("--fsx-minutes", type=float, default=None,
                  help="how long the long mode runs (default 30, or CHUNKFS_FSX_MINUTES)")
    fsx.addoption("--fsx-seed", type=int, default=None,
                  help="long mode: the first seed (default: random; printed)")
    fsx.addoption("--fsx-variants", default=None,
                  help="long mode: comma-separated mount variants to cycle through (default: all)")
    fsx.addoption("--fsx-keep-going", action="store_true",
                  help="long mode: report a failing seed and go on with the next one")
    fsx.addoption("--fsx-replay", default=None,
                  help="replay an fsx op log (the JSON file a failure names) in test_fsx_replay")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests_dir = Path(config.rootpath, "tests")
    skip = pytest.mark.skip(reason="--no-services: needs the local Redis + SeaweedFS")
    for item in items:
        try:
            rel = Path(item.path).resolve().relative_to(tests_dir)
        except ValueError:
            rel = None
        if rel is not None and len(rel.parts) > 1 and rel.parts[0] in GROUPS:
            if rel.parts[0] != "unit":
                item.add_marker(rel.parts[0])
        if SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker("services")
            if config.getoption("--no-services"):
                item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """Keep each phase's report on the item: fixture teardowns run self-checks (fsck,
    mount logs) only after a test body that passed (tests/integration/fs_fixtures.py)."""
    outcome = yield
    reports = item.__dict__.setdefault("chunkfs_reports", {})
    reports[call.when] = outcome.get_result()


# --------------------------------------------------------------------------- backends


@pytest.fixture(scope="session")
def local_services(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    """Redis + SeaweedFS for the whole session; stopped at the end, also after failures."""
    if request.config.getoption("--no-services"):
        pytest.skip("--no-services")
    services_dir = request.config.getoption("--services-dir")
    keep = request.config.getoption("--keep-services")
    data_dir = Path(services_dir) if services_dir else tmp_path_factory.mktemp("services")
    # Unless kept, the services die with this process even if pytest itself is killed.
    stack = LocalStack(data_dir, die_with_parent=not keep)
    try:
        stack.up(timeout=120)
    except ServiceError as e:
        try:
            stack.down(timeout=5)
        finally:
            pytest.fail(f"could not start the local services: {e}", pytrace=False)
    try:
        yield stack
    finally:
        if not keep:
            # Test data is disposable: no need to wait ~16 s for weed's graceful shutdown.
            stack.down(timeout=3)


@pytest.fixture(scope="session")
def redis_url(local_services: LocalStack) -> str:
    assert local_services.redis is not None
    return local_services.redis.url


@pytest.fixture(scope="session")
def s3_client(local_services: LocalStack):
    assert local_services.s3 is not None
    return local_services.s3.client()


_test_dbs = itertools.cycle(REDIS_TEST_DBS)


@pytest.fixture
def meta_url(local_services: LocalStack) -> str:
    """A Redis database of its own (flushed before the test) as a CHUNKFS_META URL."""
    redis = local_services.redis
    assert redis is not None
    db = next(_test_dbs)
    with redis.client(db=db) as client:
        client.flushdb()
    return redis.url_for_db(db)


def _unique_prefix(request: pytest.FixtureRequest) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name).strip("-.")[:60]
    return f"t/{name or 'test'}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def s3_env(local_services: LocalStack, request: pytest.FixtureRequest) -> dict[str, str]:
    """AWS_* for the test S3 plus CHUNKFS_STORAGE with a prefix unique to this test."""
    assert local_services.s3 is not None
    return {
        **local_services.s3.env(),
        "CHUNKFS_STORAGE": f"s3://{BUCKET}/{_unique_prefix(request)}",
    }


@pytest.fixture
def backend_env(meta_url: str, s3_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """A complete environment for a `chunkfs`/CSI subprocess against fresh backends."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CHUNKFS_"))}
    env.update(s3_env)
    env["CHUNKFS_META"] = meta_url
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in (bindir, env.get("PATH", "")) if p)
    yield env


# --------------------------------------------------------------------------- Redis shapes


def _started(start, *args):  # noqa: ANN001, ANN202 - a redis_shapes starter
    try:
        return start(*args)
    except ServiceError as e:
        pytest.fail(f"could not start {start.__name__[6:]}: {e}", pytrace=False)


@pytest.fixture(scope="session")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis_shapes.AclRedis]:
    server = _started(redis_shapes.start_acl_redis, tmp_path_factory.mktemp("redis-acl"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis_shapes.TlsRedis]:
    server = _started(redis_shapes.start_tls_redis, tmp_path_factory.mktemp("redis-tls"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis_shapes.Cluster]:
    cluster = _started(redis_shapes.start_cluster, tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster: redis_shapes.Cluster) -> str:
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture
def sentinel_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis_shapes.SentinelSet]:
    """New for each test: a failover test leaves its set reshaped."""
    sset = _started(redis_shapes.start_sentinel_set, tmp_path_factory.mktemp("redis-sentinel"))
    yield sset
    sset.stop()


# --------------------------------------------------------------------------- users


class NonRootUser(NamedTuple):
    name: str
    uid: int
    gid: int


@pytest.fixture(scope="session")
def nonroot_user() -> NonRootUser:
    """An unprivileged local user for permission tests (created once, kept)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create and switch to an unprivileged user")
    try:
        pw = pwd.getpwnam(NONROOT_NAME)
    except KeyError:
        try:
            pwd.getpwuid(NONROOT_UID)
            uid_args: list[str] = []  # the uid is taken by someone else: let useradd pick
        except KeyError:
            uid_args = ["--uid", str(NONROOT_UID)]
        cmd = ["useradd", *uid_args, "--user-group", "--no-create-home",
               "--shell", "/usr/sbin/nologin", NONROOT_NAME]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        try:
            pw = pwd.getpwnam(NONROOT_NAME)  # also fine if a concurrent run created it
        except KeyError:
            pytest.fail(f"useradd {NONROOT_NAME} failed: {proc.stderr.strip()}", pytrace=False)
    return NonRootUser(pw.pw_name, pw.pw_uid, pw.pw_gid)
