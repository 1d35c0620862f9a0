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


@pytest.mark.parametrize("url", ["rediss://:pw@host:6380/0", "http://host/0", "redis://", "",
                                 "redis://host:notaport/0"])
def test_metadata_urls_that_chunkfs_cannot_honour_are_refused(url: str) -> None:
    """rediss:// would silently lose its TLS in the hot-path client: refused like garbage."""
    from chunkfs.config import check_meta_url

    with pytest.raises(InvalidArgument) as err:
        check_meta_url(url)
    assert "pw" not in str(err.value)
