"""Backend configuration: sizes, URLs, and credentials that never leak."""

from __future__ import annotations

import pytest

from chunkfs.config import StorageConfig, backend_from_env, parse_size, redact_url
from chunkfs.errors import InvalidArgument


@pytest.mark.parametrize(("text", "expected"), [
    ("10GiB", 10 << 30), ("10Gi", 10 << 30), ("500M", 500_000_000), ("1.5KiB", 1536),
    ("4096", 4096), (" 2 TiB ", 2 << 40), (123, 123),
])
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "ten", "10XB", "-5", "5 G B", "1e9"])
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_size(text)


def test_redact_url_hides_the_password() -> None:
    assert redact_url("redis://:hunter2@host:6379/1") == "redis://:***@host:6379/1"
    assert "hunter2" not in redact_url("redis://user:hunter2@h:1/0")
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"
    assert redact_url("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact_url("unix://:pw@/run/redis.sock") == "unix://:***@/run/redis.sock"
    assert redact_url("s3://bucket/prefix") == "s3://bucket/prefix"


# every character a user may put, unencoded, into a user name or a password
_ANY = [chr(c) for c in range(0x20, 0x7f)] + ["\t", "é", "密"]


@pytest.mark.parametrize("c", _ANY)
def test_redact_url_hides_a_password_containing_any_character(c: str) -> None:
    password = f"pa{c}ss{c}word"
    for url in (f"redis://:{password}@host:6379/0", f"redis://user:{password}@host:6379/0",
                f"redis://:{password}@host", f"rediss://:{password}@10.0.0.1:6380/2?x=1",
                f"unix://:{password}@/run/redis.sock"):
        shown = redact_url(url)
        assert password not in shown and "ss" + c + "word" not in shown, (url, shown)


@pytest.mark.parametrize("c", _ANY)
def test_redact_url_hides_the_password_whatever_the_user_name(c: str) -> None:
    for user in (f"us{c}er", f"{c}", f"a{c}{c}b"):
        shown = redact_url(f"redis://{user}:hunter2@host:6379/0")
        assert "hunter2" not in shown and "unter" not in shown, (user, shown)


def test_redact_url_hides_a_password_query_parameter() -> None:
    shown = redact_url("redis://host:6379/0?password=hunter2&db=1")
    assert "hunter2" not in shown and "db=1" in shown


def test_storage_config_from_url_and_env() -> None:
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ACCESS_KEY_ID": "AK",
           "AWS_SECRET_ACCESS_KEY": "SK", "AWS_REGION": "eu-west-1"}
    cfg = StorageConfig.from_url("s3://bucket-1/some/prefix/", env)
    assert (cfg.bucket, cfg.prefix, cfg.endpoint, cfg.region) == (
        "bucket-1", "some/prefix", "http://127.0.0.1:9000", "eu-west-1")
    assert "SK" not in repr(cfg)


@pytest.mark.parametrize("url", ["http://bucket/x", "s3://", "s3://AK:SK@bucket/p", "s3://Bad_Bucket/x"])
def test_storage_url_errors(url: str) -> None:
    with pytest.raises(InvalidArgument):
        StorageConfig.from_url(url, {})


def test_backend_from_env_requires_both_and_checks_meta() -> None:
    with pytest.raises(InvalidArgument, match="CHUNKFS_META"):
        backend_from_env(None, "s3://b-1/p", {})
    with pytest.raises(InvalidArgument, match="CHUNKFS_STORAGE"):
        backend_from_env("redis://h:1/0", None, {})
    with pytest.raises(InvalidArgument):
        backend_from_env("mysql://h/0", "s3://b-1/p", {})
    meta, storage = backend_from_env(None, None, {"CHUNKFS_META": "redis://h:1/0",
                                                  "CHUNKFS_STORAGE": "s3://b-1/p"})
    assert meta == "redis://h:1/0" and storage.bucket == "b-1"


@pytest.mark.parametrize("url", [
    "http://host/0", "redis://", "", "redis://host:notaport/0", "redis://h1,h2/0",
    "rediss://:pw@host/0?ssl_verify=no", "rediss://:pw@host/0?ssl_cert_reqs=maybe",
    "rediss://:pw@host/0?ssl_ca_certs=relative.pem", "redis://:pw@host/0?socket_timeout=1",
    "redis+sentinel://:pw@s1:26379", "redis+sentinel://:pw@s1/m?wait_replicas=x",
    "redis+cluster://:pw@n1:7000/3", "unix://:pw@relative.sock", "redis://:pw@host/0#x"])
def test_metadata_urls_that_chunkfs_cannot_honour_are_refused(url: str) -> None:
    """A typo must not silently drop TLS verification or replication safety: unknown
    options and malformed forms are refused, and the message never shows the password."""
    from chunkfs.config import check_meta_url

    with pytest.raises(InvalidArgument) as err:
        check_meta_url(url)
    assert "pw" not in str(err.value)


def test_every_documented_metadata_url_form_parses() -> None:
    from chunkfs.meta.redis_url import parse

    t = parse("rediss://app:s%2Fcret@redis.example:6380/2?ssl_ca_certs=/etc/ca.pem")
    assert (t.kind, t.nodes, t.db, t.username, t.password) == (
        "standalone", (("redis.example", 6380),), 2, "app", "s/cret")
    assert t.tls is not None and t.tls.ca_certs == "/etc/ca.pem" and t.tls.verify
    t = parse("redis+sentinel://:pw@s1,s2:26380,[::1]/mymaster/3?sentinel_password=sp")
    assert (t.kind, t.nodes, t.master, t.db, t.wait_replicas, t.sentinel_password) == (
        "sentinel", (("s1", 26379), ("s2", 26380), ("::1", 26379)), "mymaster", 3, 1, "sp")
    assert parse("redis+sentinel://s1/m?wait_replicas=0").wait_replicas == 0
    t = parse("redis+cluster://u:pw@n1:7000,n2:7001")
    assert (t.kind, t.nodes, t.username) == ("cluster", (("n1", 7000), ("n2", 7001)), "u")
    assert parse("unix://:pw@/run/redis.sock").unix_path == "/run/redis.sock"
    assert "sp" not in redact_url("redis+sentinel://:pw@s1/m?sentinel_password=sp")
