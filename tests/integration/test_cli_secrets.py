"""Secrets (the S3 secret key, the Redis password) never show in `ps`, logs or output."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.localstack import RedisService, start_redis
from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import (
    Cli,
    Mount,
    Mounter,
    assert_one_line_error,
    make_env,
    rand_bytes,
    write_file,
)


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[RedisService]:
    svc = start_redis(tmp_path / "redis", databases=2, password="redispw" + secrets.token_hex(8),
                      die_with_parent=True)
    try:
        yield svc
    finally:
        svc.stop(timeout=5)


def _ps_lines() -> str:
    return subprocess.run(["ps", "-eo", "pid,args", "--cols", "100000"], capture_output=True,
                          text=True, check=True).stdout


def _exercise(m: Mount) -> None:
    """Some work, including failures, so that the log has something to say."""
    write_file(m / "f", rand_bytes(5 << 20, "s"))
    (m / "f").read_bytes()
    (m / "d").mkdir()
    os.rename(m / "f", m / "d" / "g")
    for bad in (lambda: os.stat(m / "missing"), lambda: os.rmdir(m / "d")):
        try:
            bad()
        except OSError:
            pass


def _assert_secret_free(m: Mount, *secret_values: str) -> None:
    cmdline = Path(f"/proc/{m.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert str(m.path) in cmdline, "the mount process must name its mount point"
    ps = _ps_lines()
    status = m.status()
    texts = {"mount process cmdline": cmdline, "ps": ps, "status": str(status)}
    for value in secret_values:
        for what, text in texts.items():
            assert value not in text, f"a secret appears in {what}"


@pytest.mark.parametrize("via", ["env", "argv"])
def test_secrets_not_in_ps_logs_or_status(redis_with_password: RedisService, mounter: Mounter,
                                          s3_env: dict[str, str], via: str) -> None:
    # (the private Redis first: torn down after the mounter, it outlives every mount)
    password = redis_with_password.password
    aws_secret = s3_env["AWS_SECRET_ACCESS_KEY"]
    assert password and aws_secret
    meta_url = redis_with_password.url
    env = make_env(s3_env, CHUNKFS_META=meta_url)
    cli = Cli(env)
    cli.create_volume("vol", "1GiB")
    mp, cache = mounter.new_dir("mp"), mounter.new_dir("cache")
    log_file = mounter.base / f"secret-{via}.log"
    args = ["mount", "vol", str(mp), "--cache-dir", str(cache), "--log-file", str(log_file),
            "--log-level", "debug"]
    if via == "argv":  # the user passed the URL with its password on the command line
        env = make_env(s3_env)
        args += ["--meta", meta_url, "--storage", s3_env["CHUNKFS_STORAGE"]]
    proc = Cli(env).run(*args)
    assert password not in proc.stdout + proc.stderr
    pid = int(json.loads((mp / ".chunkfs.status").read_bytes())["pid"])
    m = Mount("vol", mp, cache, pid, log_file, cli)
    mounter.mounts.append(m)
    _exercise(m)
    _assert_secret_free(m, password, aws_secret)
    info = cli.run("volume", "info", "vol", "--json").stdout + cli.run("volume", "list").stdout
    assert password not in info and aws_secret not in info
    mounter.umount(m)
    log = log_file.read_text()
    assert log.strip(), "the mount wrote no log at all"
    assert password not in log, "the Redis password is in the mount log"
    assert aws_secret not in log, "the S3 secret key is in the mount log"
    cache_files = "".join(p.read_text(errors="replace") for p in Path(cache).rglob("*.log"))
    assert password not in cache_files and aws_secret not in cache_files


def test_wrong_redis_password_error_does_not_echo_it(redis_with_password: RedisService,
                                                     mounter: Mounter,
                                                     s3_env: dict[str, str]) -> None:
    good = redis_with_password.url
    wrong = good.replace(redis_with_password.password or "", "not-the-pw-" + secrets.token_hex(4))
    env = make_env(s3_env, CHUNKFS_META=wrong)
    mp, cache = mounter.new_dir("mp"), mounter.new_dir("cache")
    for args in (["volume", "list"], ["mount", "vol", str(mp), "--cache-dir", str(cache)]):
        proc = Cli(env).run(*args, check=False, timeout=90)
        line = assert_one_line_error(proc)
        # a wrong password is not a network problem: say so
        assert "auth" in line.lower() or "password" in line.lower(), line
        out = proc.stdout + proc.stderr
        assert "not-the-pw-" not in out and (redis_with_password.password or "") not in out
