"""devstack.localstack without the real services: processes, state file, env, arguments."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devstack import localstack
from devstack.localstack import (
    WEED_PORT_FLAGS,
    LocalStack,
    ManagedProcess,
    RedisService,
    S3Service,
    ServiceError,
    format_exports,
)

# devstack/ is not installed: `python -m devstack...` runs from the checkout.
ROOT = Path(__file__).resolve().parents[2]


def _state(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()[0]


@pytest.fixture
def sleeper(tmp_path: Path):
    procs: list[ManagedProcess] = []

    def spawn(script: str = "sleep 60") -> ManagedProcess:
        p = localstack._spawn(
            ["bash", "-c", script], cwd=tmp_path, log_path=tmp_path / "log", die_with_parent=True
        )
        procs.append(p)
        return p

    yield spawn
    for p in procs:
        if p.alive():
            os.kill(p.pid, signal.SIGKILL)
            p.wait(5)


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = localstack.free_ports(8)
    assert len(set(ports)) == 8
    assert all(localstack.port_is_free(p) for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))
        s.listen()
        assert not localstack.port_is_free(ports[0])


def _state_becomes(pid: int, states: tuple[str, ...], timeout: float = 5.0) -> bool:
    """Signals are delivered asynchronously: a loaded machine shows the new state late."""
    deadline = time.monotonic() + timeout
    while _state(pid) not in states:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_process_pause_resume_stop(sleeper) -> None:
    p = sleeper("exec sleep 60")
    assert p.alive()
    assert os.getpgid(p.pid) == p.pid, "a service runs in its own process group"
    p.pause()
    assert p.wait(0.2) is False
    assert _state_becomes(p.pid, ("T",)), "pause() stops the process"
    p.resume()
    assert _state_becomes(p.pid, ("S", "R")), "resume() lets it run again"
    p.stop(timeout=5)
    assert not p.alive()
    assert _state(p.pid) is None, "stop() reaps the process"
    p.stop(timeout=1)  # idempotent


def test_stop_sends_sigkill_when_sigterm_is_ignored(sleeper) -> None:
    p = sleeper("trap '' TERM; while :; do sleep 0.1; done")
    assert p.wait(0.3) is False
    p.stop(timeout=0.5)
    assert not p.alive()
    assert p.popen is not None and p.popen.returncode == -signal.SIGKILL


def test_stop_of_a_paused_process_does_not_hang(sleeper) -> None:
    p = sleeper("exec sleep 60")
    p.pause()
    p.stop(timeout=5)
    assert p.popen is not None and p.popen.returncode == -signal.SIGTERM


def test_pid_reuse_is_detected(sleeper) -> None:
    p = sleeper()
    assert p.start_time is not None
    impostor = ManagedProcess(pid=p.pid, start_time=p.start_time + 1)
    assert not impostor.alive()
    with pytest.raises(ServiceError):
        impostor.pause()
    impostor.stop(timeout=1)  # a no-op: never signals a process it cannot identify
    assert p.alive() and _state(p.pid) != "T"


def test_private_files_are_0600(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    localstack._write_private(path, "x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "x"


def test_exports_survive_the_shell() -> None:
    env = {"A_PLAIN": "abc", "A_QUOTED": 'it\'s $HOME `x` "y" a b'}
    out = subprocess.run(
        ["bash", "-c", format_exports(env) + 'printf "%s\\n%s" "$A_PLAIN" "$A_QUOTED"'],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out.split("\n") == [env["A_PLAIN"], env["A_QUOTED"]]


def test_credentials_are_random_and_never_in_repr(tmp_path: Path) -> None:
    (a1, s1), (a2, s2) = localstack.new_s3_credentials(), localstack.new_s3_credentials()
    assert a1 != a2 and s1 != s2 and len(s1) >= 32 and s1.isalnum()
    proc = ManagedProcess(pid=1, start_time=0)
    s3 = S3Service(
        ports={k: 1 for k in WEED_PORT_FLAGS}, data_dir=tmp_path, process=proc,
        access_key=a1, secret_key=s1,
    )  # fmt: skip
    redis = RedisService(port=1, data_dir=tmp_path, process=proc, password="hunter2secret")
    assert s1 not in repr(s3) and "hunter2secret" not in repr(redis)
    assert s3.env()["AWS_SECRET_ACCESS_KEY"] == s1
    assert redis.url == "redis://:hunter2secret@127.0.0.1:1/0"
    config = json.loads(localstack._s3_identity_config(a1, s1))
    assert config["identities"][0]["credentials"] == [{"accessKey": a1, "secretKey": s1}]


def test_weed_args_pin_every_port(tmp_path: Path) -> None:
    ports = dict(zip(WEED_PORT_FLAGS, localstack.free_ports(len(WEED_PORT_FLAGS)), strict=True))
    args = localstack._weed_args("weed", tmp_path, ports, 1024)
    for name, flag in WEED_PORT_FLAGS.items():
        assert f"{flag}={ports[name]}" in args
    # Fixed default ports would collide between stacks; these are switched off.
    assert "-s3.port.iceberg=0" in args and "-s3.port.lance=0" in args
    assert "-ip.bind=127.0.0.1" in args and "-master.telemetry=false" in args
    assert f"-s3.config={tmp_path / 's3.json'}" in args


def test_redis_conf_keeps_the_password_off_the_command_line(tmp_path: Path) -> None:
    conf = localstack._redis_conf(6399, tmp_path, "pw123", 256)
    assert "requirepass pw123" in conf and "bind 127.0.0.1" in conf
    assert "appendonly yes" in conf and 'save ""' in conf


def test_env_of_a_stopped_stack_is_an_error(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path).load()
    assert not stack.running()
    with pytest.raises(ServiceError, match="not running"):
        stack.env()
    rc = subprocess.run(
        [sys.executable, "-m", "devstack.localstack", "env", "--dir", str(tmp_path)],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )  # fmt: skip
    assert rc.returncode == 1 and "not running" in rc.stderr and rc.stdout == ""


def test_down_never_signals_a_process_that_is_not_the_recorded_service(tmp_path: Path, sleeper) -> None:
    """A state file naming a live PID that is not redis/weed (PID reuse after a reboot)."""
    p = sleeper("exec sleep 60")
    state = {
        "version": localstack.STATE_VERSION,
        "redis": {
            "pid": p.pid, "start_time": p.start_time, "port": 6399, "password": None,
            "data_dir": str(tmp_path / "redis"),
        },
        "s3": {
            "pid": p.pid, "start_time": p.start_time, "access_key": "A", "secret_key": "S",
            "ports": {k: 1 for k in WEED_PORT_FLAGS}, "data_dir": str(tmp_path / "seaweedfs"),
        },
    }  # fmt: skip
    (tmp_path / "state.json").write_text(json.dumps(state))
    stack = LocalStack(tmp_path)
    assert not stack.load().running()
    stack.down(timeout=1)
    assert p.alive() and _state(p.pid) in ("S", "R")
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["redis"]["pid"] is None and saved["s3"]["access_key"] == "A"


def test_unreadable_state_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{not json")
    assert not LocalStack(tmp_path).load().running()


def test_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CHUNKFS_REDIS_SERVER", str(tmp_path / "no-such-redis-server"))
    with pytest.raises(ServiceError, match="CHUNKFS_REDIS_SERVER"):
        localstack.start_redis(tmp_path / "redis", timeout=2)
