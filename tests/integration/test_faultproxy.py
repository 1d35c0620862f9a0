"""The fault proxy between real clients and the real backends: what the lost-reply fault
tests rely on (a request that reaches Redis while its reply is held or cut), and a mount
that runs through proxies for both Redis and S3."""

from __future__ import annotations

import os
import threading
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.faultproxy import FaultProxy
from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import (
    Cli,
    MiB,
    Mounter,
    file_sha256,
    make_env,
    rand_bytes,
    sha256,
    write_file,
)


def test_a_held_reply_hides_a_write_that_redis_already_did(redis_proxy: FaultProxy,
                                                          meta_url: str) -> None:
    direct = redis.Redis.from_url(meta_url)
    proxied = redis.Redis.from_url(redis_proxy.url, socket_timeout=30)
    assert proxied.ping()
    redis_proxy.hold_replies(30)
    done = threading.Event()
    threading.Thread(target=lambda: (proxied.set("k", "v"), done.set()), daemon=True).start()
    assert redis_proxy.wait_held(10), "the reply of SET was never held"
    assert direct.get("k") == b"v", "the write must reach Redis while its reply is held"
    assert not done.is_set(), "the client got its reply during the hold"
    redis_proxy.release()
    assert done.wait(10), "the held reply was not delivered after release()"
    proxied.close()
    direct.close()


def test_a_cut_reply_is_a_connection_error_and_the_next_connection_works(
        redis_proxy: FaultProxy) -> None:
    client = _no_retry_client(redis_proxy.url)
    client.set("big", "x" * 100_000)
    redis_proxy.cut()
    with pytest.raises(redis.exceptions.ConnectionError):
        client.get("big")  # half of the reply, then a reset
    assert client.get("big") == b"x" * 100_000  # redis-py reconnects
    assert redis_proxy.stats()["cuts"] == 1
    client.close()


def _no_retry_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=10, retry=Retry(NoBackoff(), 0))


def test_dropped_connections_reconnect_and_refused_ones_fail(redis_proxy: FaultProxy) -> None:
    client = _no_retry_client(redis_proxy.url)
    assert client.ping()
    # a command in flight when its connection drops fails: its reply is lost
    redis_proxy.hold_replies(30)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            client.incr("n")
        except BaseException as exc:  # noqa: BLE001 - inspected below
            errors.append(exc)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    assert redis_proxy.wait_held(10)
    redis_proxy.drop()
    t.join(10)
    assert errors and isinstance(errors[0], redis.exceptions.ConnectionError), errors
    redis_proxy.release()
    assert client.get("n") == b"1", "the command ran although its client saw an error"
    assert redis_proxy.stats()["connections"] == 2  # the client reconnected
    redis_proxy.refuse()
    with pytest.raises(redis.exceptions.ConnectionError):
        _no_retry_client(redis_proxy.url).ping()
    redis_proxy.pass_through()
    assert client.ping()
    client.close()


@pytest.mark.mount_log_allows("redis retry", "s3 retry",
                              reason="the test drops the mount's connections: the next "
                                     "request on each fails once and is retried")
def test_a_mount_through_proxies_survives_dropped_idle_connections(
        redis_proxy: FaultProxy, s3_proxy: FaultProxy, mounter: Mounter,
        s3_env: dict[str, str]) -> None:
    # (the proxies come first: torn down after the mounter, they outlive every mount)
    env = make_env({**s3_env, "AWS_ENDPOINT_URL": s3_proxy.url}, CHUNKFS_META=redis_proxy.url)
    Cli(env).create_volume("vol", "1GiB")
    m = mounter.mount("vol", env=env, options="io-timeout=20")
    data = rand_bytes(5 * MiB, "through")
    write_file(m / "f", data)
    assert redis_proxy.stats()["replies"] > 0 and s3_proxy.stats()["replies"] > 0
    for proxy in (redis_proxy, s3_proxy):
        proxy.drop()
    write_file(m / "g", b"after the drop")
    (m / "d").mkdir()
    assert (m / "g").read_bytes() == b"after the drop"
    # a slow S3 (replies held for a while, well inside io-timeout) delays, never fails
    s3_proxy.hold_replies(1.5)
    started = time.monotonic()
    write_file(m / "slow", rand_bytes(MiB, "slow"))
    assert time.monotonic() - started >= 1.0, "the S3 replies were not held"
    m = mounter.remount(m, cache_dir=mounter.new_dir("cache"), env=env)  # a cold cache
    assert file_sha256(m / "f") == sha256(data)
    assert file_sha256(m / "slow") == sha256(rand_bytes(MiB, "slow"))
    assert sorted(os.listdir(m.path)) == ["d", "f", "g", "slow"]


def _read_direct(path: os.PathLike[str] | str) -> bytes:
    """Read a file with O_DIRECT: every read reaches the mount and its error reaches us
    (a buffered read would retry a failed readahead page and hide it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        out = bytearray()
        while chunk := os.pread(fd, MiB, len(out)):
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)


def _cut_reads(s3_proxy: FaultProxy, mounter: Mounter, s3_env: dict[str, str], cli: Cli,
               keep: int) -> None:
    env = make_env({**s3_env, "AWS_ENDPOINT_URL": s3_proxy.url}, CHUNKFS_META=cli.env["CHUNKFS_META"])
    Cli(env).create_volume("cut", "1GiB")
    m = mounter.mount("cut", env=env, options="io-timeout=20,readahead=0")
    data = rand_bytes(3 * MiB, "cut")
    write_file(m / "f", data)
    m = mounter.remount(m, cache_dir=mounter.new_dir("cache"), env=env)  # nothing cached
    s3_proxy.cut(keep=keep)
    assert _read_direct(m / "f") == data, f"bad bytes after a reply cut at {keep} bytes"
    assert s3_proxy.stats()["cuts"] == 1


@pytest.mark.parametrize("keep", [10, 300], ids=["in-the-status-line", "in-the-headers"])
@pytest.mark.mount_log_allows("s3 retry", reason="the test cuts an S3 reply: the GET is retried")
def test_an_s3_reply_cut_in_its_headers_is_retried(
        s3_proxy: FaultProxy, mounter: Mounter, s3_env: dict[str, str], cli: Cli,
        keep: int) -> None:
    _cut_reads(s3_proxy, mounter, s3_env, cli, keep)


@pytest.mark.mount_log_allows("s3 retry", reason="the test cuts an S3 reply: the GET is retried")
def test_an_s3_reply_cut_in_its_body_is_retried(
        s3_proxy: FaultProxy, mounter: Mounter, s3_env: dict[str, str], cli: Cli) -> None:
    _cut_reads(s3_proxy, mounter, s3_env, cli, 40_000)
