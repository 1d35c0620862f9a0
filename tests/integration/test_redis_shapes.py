"""chunkfs on Redis in every production shape, against the real servers (tests/redis_shapes.py):
a password and a least-privilege ACL user, TLS from a throwaway CA, Sentinel with a
failover during writes, and a Cluster of three primaries (slots, MOVED and ASK, GC and
listings across shards). Each test reaches its Redis through the URL an operator writes.

The Redis fixtures are requested before ``mounter`` so that mounts are undone first."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from chunkfs import gc
from chunkfs.errors import MetaUnavailable
from chunkfs.fsck import check_namespace
from chunkfs.meta.redis_meta import VolumeMeta, connect_fast
from chunkfs.meta.resp import ReplicationUnconfirmed, RespClient, key_slot
from chunkfs.meta.schema import ROOT_INODE, Keys
from tests.integration.conftest import open_svc
from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import (
    Cli,
    MiB,
    Mount,
    Mounter,
    assert_one_line_error,
    file_sha256,
    make_env,
    rand_bytes,
    sha256,
    wait_until,
    write_file,
)
from tests.redis_shapes import ACL_USER, Cluster, SentinelSet, start_server

_dbs = itertools.count(1)


def _fresh_db(server: Any) -> int:
    db = next(_dbs)
    with server.client(db=db) as c:
        c.flushdb()
    return db


def workload(m: Mount) -> dict[str, str]:
    """Every kind of metadata mutation through a mount (CREATE, COMMIT with REGISTER and
    SETTLE, RENAME, LINK, UNLINK of an open file then PURGE, SETATTR, TRUNCATE, XATTR);
    returns sha256 by path of what must read back."""
    (m / "d").mkdir()
    big = rand_bytes(5 * MiB + 4321, "big")
    write_file(m / "d" / "big", big)
    write_file(m / "small", b"inline data")
    os.rename(m / "small", m / "d" / "renamed")
    os.link(m / "d" / "big", m / "hard")
    os.symlink("d/big", m / "sym")
    os.setxattr(m / "d" / "big", "user.k", b"v")
    os.setxattr(m / "d" / "big", "user.gone", b"x")
    os.removexattr(m / "d" / "big", "user.gone")
    os.chmod(m / "d" / "big", 0o600)
    write_file(m / "cut", rand_bytes(3 * MiB, "cut"))
    os.truncate(m / "cut", MiB + 7)
    fd = os.open(m / "hard", os.O_RDONLY)
    try:
        os.unlink(m / "hard")  # an orphan while open, purged at close
        assert os.pread(fd, 16, 0) == big[:16]
    finally:
        os.close(fd)
    return {"d/big": sha256(big), "d/renamed": sha256(b"inline data"),
            "cut": sha256(rand_bytes(3 * MiB, "cut")[:MiB + 7]), "sym": sha256(big)}


def verify(m: Mount, expected: dict[str, str]) -> None:
    for path, digest in expected.items():
        assert file_sha256(m / path) == digest, path
    assert os.getxattr(m / "d" / "big", "user.k") == b"v"
    assert os.listxattr(m / "d" / "big") == ["user.k"]
    assert stat.S_IMODE(os.stat(m / "d" / "big").st_mode) == 0o600
    assert not (m / "hard").exists()


# --------------------------------------------------------------------------- ACL


def test_a_least_privilege_acl_user_runs_volumes_mounts_snapshots_and_gc(
        acl_redis, mounter: Mounter, s3_env: dict[str, str]) -> None:
    db = _fresh_db(acl_redis.server)
    cli = Cli(make_env(s3_env, CHUNKFS_META=acl_redis.user_url(db)))
    cli.create_volume("vol")
    m = mounter.mount("vol", env=cli.env)
    expected = workload(m)
    cli.run("snapshot", "create", "vol", "snap")
    cli.run("volume", "create", "clone", "--capacity", "1GiB", "--from-snapshot", "snap")
    assert "0 problem(s)" in cli.run("fsck", "vol", "--objects").stdout
    # backups: the change capture and the copy of the changed inodes under this user
    assert "(full" in cli.run("volume", "backup", "vol").stdout
    write_file(m / "after-backup", b"noted by the change tracking")
    out = cli.run("volume", "backup", "vol").stdout
    assert "(incremental of " in out and re.search(r"wrote [12] of", out), out  # file + root
    out = cli.run("gc", "--grace", "0").stdout
    assert "deleted" in out
    status = m.status()["redis_durability"]
    assert status["servers"][0]["appendfsync"] == "everysec"  # +config|get lets it check
    verify(mounter.mount("clone", env=cli.env), expected)
    # the rules are real: the user reaches its own keys only, and not FLUSHALL
    with acl_redis.server.client(username=ACL_USER, password=acl_redis.user_password) as c:
        with pytest.raises(redis.exceptions.NoPermissionError):
            c.get("someone-else:key")
        with pytest.raises(redis.exceptions.NoPermissionError):
            c.flushall()
    # the default user with requirepass, password only
    m2 = mounter.remount(m, env=make_env(s3_env, CHUNKFS_META=acl_redis.password_url(db)))
    verify(m2, expected)


def test_a_wrong_acl_password_is_one_clear_line_without_the_password(
        acl_redis, s3_env: dict[str, str]) -> None:
    url = acl_redis.user_url(_fresh_db(acl_redis.server), password="not-the-Password-9")
    proc = Cli(make_env(s3_env, CHUNKFS_META=url)).run("volume", "list", check=False, timeout=60)
    line = assert_one_line_error(proc, "credentials")
    assert "not-the-Password-9" not in proc.stderr + proc.stdout, line


# --------------------------------------------------------------------------- TLS


def test_a_volume_over_tls_mounts_remounts_and_reads_back(
        tls_redis, mounter: Mounter, s3_env: dict[str, str]) -> None:
    db = _fresh_db(tls_redis.server)
    cli = Cli(make_env(s3_env, CHUNKFS_META=tls_redis.url(db)))
    cli.create_volume("vol")
    m = mounter.mount("vol", env=cli.env)
    expected = workload(m)
    assert m.status()["redis_durability"]["servers"][0]["appendonly"] == "yes"
    m = mounter.remount(m, cache_dir=mounter.new_dir("cache"), env=cli.env)
    verify(m, expected)
    # the host name is checked against the certificate's names (localhost is one of them)
    verify(mounter.remount(m, env=make_env(s3_env, CHUNKFS_META=tls_redis.url(
        db, host="localhost"))), expected)


def test_tls_with_an_untrusted_ca_fails_at_once_with_one_line(
        tls_redis, mounter: Mounter, s3_env: dict[str, str]) -> None:
    db = _fresh_db(tls_redis.server)
    Cli(make_env(s3_env, CHUNKFS_META=tls_redis.url(db))).create_volume("vol")
    bad = make_env(s3_env, CHUNKFS_META=tls_redis.url(db, ca=tls_redis.pki.other_ca))
    start = time.monotonic()
    proc = Cli(bad).run("mount", "vol", str(mounter.new_dir("mp")), "--cache-dir",
                        str(mounter.new_dir("cache")), check=False, timeout=60)
    assert_one_line_error(proc, "TLS")
    assert time.monotonic() - start < 8, "a certificate problem must not be retried"


async def test_the_hot_path_client_speaks_mutual_tls_and_refuses_plain_tcp_to_a_tls_port(
        tls_redis) -> None:
    client = RespClient.from_url(tls_redis.url(_fresh_db(tls_redis.server), client_cert=True))
    try:
        assert await client.execute("PING") == b"PONG"
        assert (await client.execute("CLIENT", "INFO")).find(b"db=") >= 0
    finally:
        await client.aclose()
    plain = RespClient.from_url(f"redis://:{tls_redis.server.password}@127.0.0.1:"
                                f"{tls_redis.server.port}/0", timeout=2)
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await plain.execute("PING")
    finally:
        await plain.aclose()


# --------------------------------------------------------------------------- Sentinel


_APPEND = r"""
import hashlib, os, sys, time
path, size, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
i = 0
while not os.path.exists(stop):
    os.write(fd, hashlib.sha256(b"chunk-%d" % i).digest() * (size // 32))
    os.fsync(fd)
    i += 1
    print(i, time.monotonic(), flush=True)
"""


class Appender:
    """A process that appends 64 KiB + fsync in a loop and prints each ack (when fsync
    returned). A process, not a thread: a test that starts processes while it holds
    FUSE files open would make each child's close of them flush (and wait on) the mount."""

    CHUNK = 64 * 1024

    def __init__(self, path: Path, stop_file: Path) -> None:
        self.stop_file = stop_file
        self.acks: list[float] = []
        self.proc = subprocess.Popen([sys.executable, "-c", _APPEND, str(path), str(self.CHUNK),
                                      str(stop_file)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            fields = line.split()
            if len(fields) == 2:  # "<n> <time>"; anything else (a torn last line) is no ack
                self.acks.append(float(fields[1]))

    def failed(self) -> bool:
        return self.proc.poll() not in (None, 0)

    def stop(self) -> str:
        self.stop_file.touch()
        _, err = self.proc.communicate(timeout=120)
        self.reader.join(10)
        return "" if self.proc.returncode == 0 else err[-2000:]

    def expected(self) -> bytes:
        return b"".join(hashlib.sha256(b"chunk-%d" % i).digest() * (self.CHUNK // 32)
                        for i in range(len(self.acks)))


@pytest.mark.mount_log_allows("redis retry", "reading the last gc run failed",
                              "reading the last backup failed",
                              reason="the primary is killed on purpose: requests are retried")
def test_a_sentinel_failover_during_writes_loses_no_acknowledged_byte(
        sentinel_set: SentinelSet, mounter: Mounter, s3_env: dict[str, str]) -> None:
    env = make_env(s3_env, CHUNKFS_META=sentinel_set.url(0))
    Cli(env).create_volume("vol")
    m = mounter.mount("vol", env=env, options="io-timeout=60")
    assert m.status()["redis_durability"]["wait_replicas"] == 1
    writer = Appender(m / "log", mounter.new_dir("stop") / "now")
    try:
        wait_until(lambda: len(writer.acks) >= 20 or writer.failed(), 60, what="20 acks")
        old, replica = sentinel_set.primary, sentinel_set.replica
        killed_at, acked_before = time.monotonic(), len(writer.acks)
        old.kill()  # the primary's host dies
        wait_until(lambda: sentinel_set.primary_address() == replica.address, 30,
                   what="the sentinels to promote the replica")
        failover_s = time.monotonic() - killed_at
        old.restart()  # the host comes back: the sentinels make it the new replica
        wait_until(lambda: len(writer.acks) >= acked_before + 20 or writer.failed(), 60,
                   what="writes to go on after the failover")
    finally:
        error = writer.stop()
    assert not error, error
    gaps = [b - a for a, b in itertools.pairwise(writer.acks)]
    print(f"\nsentinel failover: promoted {failover_s:.1f}s after the kill, writes paused "
          f"{max(gaps):.1f}s at most, {len(writer.acks)} acks "
          f"({len(writer.acks) * Appender.CHUNK} bytes verified)")
    with sentinel_set.replica.client() as c:
        assert c.info("replication")["role"] == "master"
    # every acknowledged byte is there, read through a fresh cache after a remount
    expected = writer.expected()
    m = mounter.remount(m, cache_dir=mounter.new_dir("cache"), env=env)
    with open(m / "log", "rb") as f:
        assert sha256(f.read(len(expected))) == sha256(expected)


async def test_a_sentinel_mutation_is_acknowledged_only_once_a_replica_holds_it(
        sentinel_set: SentinelSet) -> None:
    """WAIT counts a connection's own writes: a fresh connection (a retry after a cut)
    must still not acknowledge what the replica has not got."""
    client = RespClient.from_url(sentinel_set.url(0), timeout=3)
    try:
        assert await client.evalsha("return redis.call('SET', KEYS[1], 'a')",
                                    ["cfs{t}:k"], [], write=True) == b"OK"
        sentinel_set.replica.process.pause()
        try:
            with sentinel_set.primary.client() as c:  # an earlier run, on another connection
                c.set("cfs{t}:k", "b")
            fresh = RespClient.from_url(sentinel_set.url(0), timeout=3)
            try:
                with pytest.raises(ReplicationUnconfirmed):
                    await fresh.evalsha("return redis.call('GET', KEYS[1])", ["cfs{t}:k"], [],
                                        write=True)
                assert await fresh.execute("GET", "cfs{t}:k") == b"b"  # reads need no replica
            finally:
                await fresh.aclose()
        finally:
            sentinel_set.replica.process.resume()
        assert await client.evalsha("return redis.call('GET', KEYS[1])", ["cfs{t}:k"], [],
                                    write=True) == b"b"
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- Cluster


def _shard(cluster: Cluster, ns: str) -> int:
    return cluster.node_of_slot(key_slot(Keys(ns).vol)).port


async def test_volumes_spread_over_every_shard_and_every_listing_sees_them(
        redis_cluster: Cluster, cluster_url: str, s3_env: dict[str, str]) -> None:
    async with open_svc(cluster_url, s3_env) as svc:
        shards: dict[int, list[str]] = {}
        for i in range(200):
            info = await svc.create_volume(f"v{i}", 1 << 30)
            shards.setdefault(_shard(redis_cluster, info.id), []).append(info.name)
            if len(shards) == len(redis_cluster.nodes):
                break
        assert len(shards) == 3, "random namespace ids should reach every shard"
        names = sorted(n for group in shards.values() for n in group)
        assert sorted(v.name for v in await svc.list_volumes()) == names
        assert len(await gc.all_namespaces(svc.r)) == len(names)
        report = await gc.collect_garbage(svc.r, svc.store, grace=0, dry_run=True)
        assert report.namespaces == len(names)


async def test_incremental_backups_on_redis_cluster_equal_full_ones(
        redis_cluster: Cluster, cluster_url: str, s3_env: dict[str, str]) -> None:
    """The backup's copy lives in another slot than its volume: the changed inodes are
    exported and imported instead of COPYed, and the result is the same."""
    from tests.integration.test_backup_incremental import incremental_then_full
    from tests.integration.test_volumes import meta_of, put_file

    async with open_svc(cluster_url, s3_env) as svc:
        info = await svc.create_volume("vol", 1 << 30)
        meta = meta_of(svc, info.id)
        inos = [await put_file(meta, ROOT_INODE, f"f{i}".encode(), b"x" * i) for i in range(60)]
        first = await svc.backup_volume("vol")
        await meta.commit(inos[33], size=4, inline=b"new!")
        await meta.unlink(ROOT_INODE, b"f50", is_dir=False, keep_if_open=False)
        second = await incremental_then_full(svc, "vol")
        assert second.base == first.id and second.files == 60
        assert second.captured <= 3 * 16  # the pages of f33, f50 and the root


def test_a_mount_on_redis_cluster_runs_every_operation_snapshots_clones_and_gc(
        cluster_url: str, mounter: Mounter, s3_env: dict[str, str]) -> None:
    cli = Cli(make_env(s3_env, CHUNKFS_META=cluster_url))
    cli.create_volume("vol")
    m = mounter.mount("vol", env=cli.env)
    expected = workload(m)
    assert m.status()["redis_durability"]["shape"] == "cluster"
    assert len(m.status()["redis_durability"]["servers"]) == 3
    cli.run("snapshot", "create", "vol", "snap")  # across slots: export + import
    cli.run("volume", "create", "from-snap", "--capacity", "1GiB", "--from-snapshot", "snap")
    cli.run("volume", "create", "from-vol", "--capacity", "1GiB", "--from-volume", "vol")
    for name in ("vol", "snap", "from-snap", "from-vol"):
        assert "0 problem(s)" in cli.run("fsck", name, "--objects").stdout, name
    # garbage: written after the snapshot, then deleted; GC removes exactly its two block
    # objects (two whole blocks: no tail that upkeep may or may not have moved to S3 yet)
    write_file(m / "garbage", rand_bytes(8 * MiB, "garbage"))
    os.unlink(m / "garbage")
    time.sleep(1.1)  # S3 times have whole seconds: let --grace 0 see every object
    out = cli.run("gc", "--grace", "0").stdout
    assert "by 4 namespaces" in out and "deleted 2 " in out, out
    for name in ("from-snap", "from-vol"):
        verify(mounter.mount(name, env=cli.env), expected)
    verify(mounter.remount(m, cache_dir=mounter.new_dir("cache"), env=cli.env), expected)


async def test_the_hot_path_client_follows_ask_and_moved_while_a_volume_moves_shards(
        redis_cluster: Cluster, cluster_url: str, s3_env: dict[str, str]) -> None:
    async with open_svc(cluster_url, s3_env) as svc:
        info = await svc.create_volume("v", 1 << 30)
        client = connect_fast(cluster_url)
        meta = VolumeMeta(client, info.id, epoch="", session="s", deadline=10)
        await meta.heartbeat()
        f = await meta.create(ROOT_INODE, b"f", stat.S_IFREG | 0o644, 0, 0, inline=True)
        slot = key_slot(Keys(info.id).vol)
        source = redis_cluster.node_of_slot(slot)
        target = next(n for n in redis_cluster.nodes if n is not source)
        ids = {n.port: n.client().execute_command("CLUSTER", "MYID").decode()
               for n in redis_cluster.nodes}
        with source.client() as src, target.client() as dst:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source.port])
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target.port])
            with pytest.raises(gc.GcRefused, match="migrated"):
                await gc.collect_garbage(svc.r, svc.store, grace=0)
            keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10000)
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "AUTH",
                                redis_cluster.password, "KEYS", *keys)
            # every key is on the target now, the slot still belongs to the source: ASK
            assert (await meta.getattr(f.ino)).ino == f.ino
            assert (await meta.lookup(ROOT_INODE, b"f")).ino == f.ino
            assert client.redirects["ask"] >= 2
            # a script that creates keys meets TRYAGAIN until the slot has moved: it waits
            create = asyncio.create_task(meta.create(ROOT_INODE, b"g", stat.S_IFDIR | 0o755, 0, 0))
            await asyncio.sleep(0.5)
            assert not create.done() and client.redirects["retry"] > 0
            for node in redis_cluster.nodes:
                with node.client() as c:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target.port])
            g = await create
            await meta.commit(f.ino, size=5, inline=b"hello")
        # the slot is the target's: the client's map is stale, MOVED corrects it
        assert [n for n, _ in await meta.readdir(ROOT_INODE)] == [b"f", b"g"]
        assert (await meta.lookup(ROOT_INODE, b"g")).ino == g.ino
        assert client.redirects["moved"] >= 1
        moved = client.redirects["moved"]
        await meta.getattr(f.ino)
        assert client.redirects["moved"] == moved, "the map was reloaded after MOVED"
        inline, _ = await meta.file_data(f.ino)
        assert inline == b"hello"
        assert await check_namespace(svc.r, info.id) == []
        assert _shard(redis_cluster, info.id) == target.port
        await client.aclose()


def test_a_plain_url_to_a_cluster_node_is_refused_at_mount(
        redis_cluster: Cluster, cluster_url: str, mounter: Mounter,
        s3_env: dict[str, str]) -> None:
    Cli(make_env(s3_env, CHUNKFS_META=cluster_url)).create_volume("vol")
    plain = f"redis://:{redis_cluster.password}@{redis_cluster.nodes[0].address}/0"
    proc = Cli(make_env(s3_env, CHUNKFS_META=plain)).run(
        "mount", "vol", str(mounter.new_dir("mp")), "--cache-dir", str(mounter.new_dir("cache")),
        check=False, timeout=60)
    assert_one_line_error(proc, "redis+cluster://")


# --------------------------------------------------------------------------- durability


@pytest.mark.parametrize("settings, risk", [
    (["appendonly no"], "appendonly is off"),
    (["appendonly yes", "appendfsync no"], "appendfsync no"),
    (["appendonly yes", "appendfsync always"], None),
])
def test_redis_durability_is_checked_at_mount_logged_and_shown_in_status(
        tmp_path: Path, servers: list[Any], mounter: Mounter, s3_env: dict[str, str],
        settings: list[str], risk: str | None) -> None:
    from devstack.localstack import free_ports

    (port,) = free_ports(1)
    lines = [f"port {port}", "bind 127.0.0.1", 'save ""', f"dir {tmp_path}", *settings]
    servers.append(start_server(tmp_path, port, lines))
    env = make_env(s3_env, CHUNKFS_META=f"redis://127.0.0.1:{port}/0")
    Cli(env).create_volume("vol")
    m = mounter.mount("vol", env=env)
    report = m.status()["redis_durability"]
    text = Cli(env).run("status", str(m.path)).stdout
    log = m.log_file.read_text()
    if risk is None:
        assert report["ok"] and report["warnings"] == [] and "durability:    ok" in text
        assert '"redis durability"' not in log
    else:
        assert not report["ok"] and risk in report["warnings"][0]
        assert "AT RISK" in text and risk in text
        assert '"redis durability"' in log and risk in log
    mounter.umount(m)


@pytest.fixture
def servers() -> Iterator[list[Any]]:
    """Servers a test starts itself, stopped after its mounts' teardown (request this
    fixture before ``mounter``: the teardown checks each volume with fsck)."""
    started: list[Any] = []
    yield started
    for server in started:
        server.stop()


async def test_with_retries_gives_up_at_once_on_a_tls_failure_of_the_admin_client(
        tls_redis, s3_env: dict[str, str]) -> None:
    from chunkfs.meta.redis_meta import connect, with_retries

    r = connect(tls_redis.url(0, ca=tls_redis.pki.other_ca))
    start = time.monotonic()
    try:
        with pytest.raises(MetaUnavailable, match="TLS"):
            await with_retries(lambda: r.ping(), deadline=20)
    finally:
        await r.aclose()
    assert time.monotonic() - start < 5
