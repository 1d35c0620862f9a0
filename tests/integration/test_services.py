"""The real local backends: Redis and SeaweedFS as started by devstack.localstack."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import botocore
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ReadTimeoutError

from devstack.localstack import BUCKET, LocalStack, start_redis

# devstack/ is not installed: `python -m devstack...` runs from the checkout.
ROOT = Path(__file__).resolve().parents[2]


def _gone(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return text[text.rindex(")") + 2 :].split()[0] in ("Z", "X")


def _wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _key(s3_env: dict[str, str], name: str) -> str:
    prefix = s3_env["CHUNKFS_STORAGE"].removeprefix(f"s3://{BUCKET}/")
    return f"{prefix}/{name}"


# --------------------------------------------------------------------------- session stack


def test_redis_answers(redis_url: str, local_services: LocalStack) -> None:
    import redis

    assert redis_url == f"redis://127.0.0.1:{local_services.redis.port}/0"
    with redis.Redis.from_url(redis_url) as client:
        assert client.ping()
        client.set("localstack-test", b"v")
        assert client.get("localstack-test") == b"v"
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("bind")["bind"] == "127.0.0.1"


def test_s3_put_get_round_trip(s3_client, s3_env: dict[str, str]) -> None:
    key = _key(s3_env, "hello")
    body = os.urandom(300_000)
    s3_client.put_object(Bucket=BUCKET, Key=key, Body=body)
    assert s3_client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == body
    listed = s3_client.list_objects_v2(Bucket=BUCKET, Prefix=key)["Contents"]
    assert [o["Key"] for o in listed] == [key]
    s3_client.delete_object(Bucket=BUCKET, Key=key)
    with pytest.raises(ClientError) as err:
        s3_client.head_object(Bucket=BUCKET, Key=key)
    assert err.value.response["Error"]["Code"] in ("404", "NoSuchKey")


async def test_aiobotocore_finds_everything_in_the_env(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data path (aiobotocore) needs nothing but the AWS_* variables of s3_env."""
    from aiobotocore.session import get_session

    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    key = _key(s3_env, "aio")
    async with get_session().create_client("s3", config=Config(s3={"addressing_style": "path"})) as client:
        await client.put_object(Bucket=BUCKET, Key=key, Body=b"async data")
        resp = await client.get_object(Bucket=BUCKET, Key=key)
        async with resp["Body"] as stream:
            assert await stream.read() == b"async data"


def test_s3_rejects_a_wrong_secret_and_anonymous_requests(
    local_services: LocalStack, s3_env: dict[str, str]
) -> None:
    s3 = local_services.s3
    key = _key(s3_env, "guarded")
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=b"secret data")

    wrong = s3.client(secret_key=s3.secret_key[::-1], retries=1)
    for call in (
        lambda: wrong.put_object(Bucket=BUCKET, Key=key, Body=b"overwritten"),
        lambda: wrong.get_object(Bucket=BUCKET, Key=key),
        lambda: wrong.list_objects_v2(Bucket=BUCKET),
    ):
        with pytest.raises(ClientError) as err:
            call()
        assert err.value.response["Error"]["Code"] in ("SignatureDoesNotMatch", "AccessDenied")

    unknown = s3.client(access_key="CFSNOSUCHKEY00000000", retries=1)
    with pytest.raises(ClientError) as err:
        unknown.get_object(Bucket=BUCKET, Key=key)
    assert err.value.response["Error"]["Code"] in ("InvalidAccessKeyId", "AccessDenied")

    anonymous = botocore.session.get_session().create_client(
        "s3", endpoint_url=s3.endpoint, region_name=s3.region,
        config=Config(signature_version=botocore.UNSIGNED, s3={"addressing_style": "path"}),
    )  # fmt: skip
    with pytest.raises(ClientError):
        anonymous.get_object(Bucket=BUCKET, Key=key)
    assert s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"secret data"


def test_backend_env_is_complete_and_isolated(
    backend_env: dict[str, str], local_services: LocalStack
) -> None:
    import redis

    for name in ("CHUNKFS_META", "CHUNKFS_STORAGE", "AWS_ENDPOINT_URL", "AWS_REGION",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PATH"):  # fmt: skip
        assert backend_env.get(name), name
    assert backend_env["CHUNKFS_STORAGE"].startswith(f"s3://{BUCKET}/t/")
    assert backend_env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    meta = backend_env["CHUNKFS_META"]
    assert not meta.endswith("/0"), "tests get their own database, not the shared db 0"
    with redis.Redis.from_url(meta) as client:
        assert client.dbsize() == 0
        client.set("mine", 1)
    with redis.Redis.from_url(local_services.redis.url) as client:
        assert client.get("mine") is None
    # The env works for a subprocess as is (no inherited AWS_* config, creds present).
    out = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ['AWS_ENDPOINT_URL'])"],
        env=backend_env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert out == local_services.s3.endpoint


def test_s3_pause_and_resume(local_services: LocalStack, s3_env: dict[str, str]) -> None:
    s3 = local_services.s3
    key = _key(s3_env, "paused")
    impatient = s3.client(timeout=1.5, retries=1)
    s3.pause()
    try:
        with pytest.raises((ReadTimeoutError, botocore.exceptions.ConnectTimeoutError)):
            impatient.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    finally:
        s3.resume()
    deadline = time.monotonic() + 30
    while not s3.check():
        assert time.monotonic() < deadline, "S3 did not recover after SIGCONT"
        time.sleep(0.2)
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=b"after")


# --------------------------------------------------------------------------- own processes


def test_redis_stop_pause_resume(tmp_path: Path) -> None:
    svc = start_redis(tmp_path / "redis", password="pw-in-config-only", die_with_parent=True)
    try:
        assert svc.ping()
        assert "pw-in-config-only" not in Path(f"/proc/{svc.pid}/cmdline").read_text()
        with svc.client() as c:
            c.set("k", "v")
        svc.pause()
        assert not svc.ping(timeout=0.5)
        svc.resume()
        assert svc.ping()
        pid = svc.pid
    finally:
        svc.stop(timeout=10)
    assert _wait_gone(pid)
    assert not svc.alive() and not svc.ping(timeout=0.5)
    # AOF persistence: a restart on the same directory has the data back.
    again = start_redis(tmp_path / "redis", password="pw-in-config-only", die_with_parent=True)
    try:
        with again.client() as c:
            assert c.get("k") == b"v"
    finally:
        again.stop(timeout=10)


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devstack.localstack", *args],
        capture_output=True, text=True, check=check, timeout=180, cwd=ROOT,
    )  # fmt: skip


def _exports(text: str) -> dict[str, str]:
    out = subprocess.run(["bash", "-c", text + "\nenv -0"], capture_output=True, check=True, env={}).stdout
    pairs = (item.split(b"=", 1) for item in out.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode() for k, v in pairs if k.startswith((b"AWS_", b"CHUNKFS_"))}


def test_stack_cli_up_twice_reuses_then_down_stops(tmp_path: Path) -> None:
    """`up` detaches the services, a second `up` reuses them, `down` ends them, and a
    new `up` brings the same data back with the same credentials."""
    data = tmp_path / "stack"
    try:
        first = _cli("up", "--dir", str(data))
        env = _exports(first.stdout)
        state = json.loads((data / "state.json").read_text())
        pids = (state["redis"]["pid"], state["s3"]["pid"])
        assert env["CHUNKFS_STORAGE"] == f"s3://{BUCKET}/vol"
        assert env["CHUNKFS_META"] == state["redis"]["url"]
        assert env["AWS_SECRET_ACCESS_KEY"] not in first.stderr, "secrets stay out of the logs"
        for path in (data / "state.json", data / "env", data / "seaweedfs" / "s3.json"):
            assert path.stat().st_mode & 0o077 == 0, path
        assert _exports((data / "env").read_text()) == env

        second = _cli("up", "--dir", str(data))
        assert _exports(second.stdout) == env
        assert "reusing" in second.stderr
        state2 = json.loads((data / "state.json").read_text())
        assert (state2["redis"]["pid"], state2["s3"]["pid"]) == pids
        assert _exports(_cli("env", "--dir", str(data)).stdout) == env
        status = json.loads(_cli("status", "--dir", str(data)).stdout)
        assert status["redis"]["answers"] and status["s3"]["answers"]
        assert env["AWS_SECRET_ACCESS_KEY"] not in json.dumps(status)

        stack = LocalStack(data).load()
        stack.s3.client().put_object(Bucket=BUCKET, Key="vol/kept", Body=b"durable")
        with stack.redis.client() as c:
            c.set("kept", "yes")

        _cli("down", "--dir", str(data), "--timeout", "5")
        for pid in pids:
            assert _wait_gone(pid), f"pid {pid} still running after down"
        assert _cli("env", "--dir", str(data), check=False).returncode == 1

        stack = LocalStack(data, die_with_parent=True).up()
        assert stack.redis.pid not in pids and stack.s3.pid not in pids
        # Same credentials and URLs (ports are reused when still free: usually, not always).
        same = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "CHUNKFS_STORAGE", "AWS_REGION")
        assert {k: stack.env()[k] for k in same} == {k: env[k] for k in same}
        got = stack.s3.client().get_object(Bucket=BUCKET, Key="vol/kept")["Body"].read()
        assert got == b"durable"
        with stack.redis.client() as c:
            assert c.get("kept") == b"yes"
        new_pids = (stack.redis.pid, stack.s3.pid)
        stack.down(timeout=5)
        for pid in new_pids:
            assert _wait_gone(pid)
    finally:
        # Whatever happened above: nothing of this test keeps running.
        leftover = LocalStack(data).load()
        pids = [s.pid for s in (leftover.redis, leftover.s3) if s is not None]
        leftover.down(timeout=3)
        for pid in pids:
            if not _wait_gone(pid, 5):
                os.kill(pid, signal.SIGKILL)
