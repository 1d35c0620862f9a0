"""The mounter's socket protocol: what it carries out, what it refuses, and how the node
plugin's client reports each outcome.

The server runs for real on a unix socket; only the launcher behind it is a recorder
(the chunkfs processes it would start are exercised by tests/container).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path

import grpc
import pytest

from csi import errors
from csi.launcher import MounterClient, MountSpec, Outcome, backend_env
from csi.mounter import MounterServer


class Recorder:
    """A launcher that records what it was asked and answers ``outcome``."""

    def __init__(self) -> None:
        self.outcome = Outcome(0)
        self.mounts: list[tuple[MountSpec, dict[str, str]]] = []
        self.umounts: list[str] = []

    def describe(self) -> str:
        return "recorder"

    async def warm(self) -> None:
        self.warmed = True

    async def close(self) -> None:
        self.closed = True

    async def mount(self, spec: MountSpec, env: Mapping[str, str], seconds: float) -> Outcome:
        self.mounts.append((spec, dict(env)))
        return self.outcome

    async def umount(self, path: str, seconds: float) -> Outcome:
        self.umounts.append(path)
        return self.outcome


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    out = {k: tmp_path / k for k in ("kubelet", "cache", "state", "sock")}
    for path in out.values():
        path.mkdir()
    return out


@pytest.fixture
async def server(dirs, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "the-mounter-s-own")
    monkeypatch.setenv("CHUNKFS_META", "redis://mounter-default/0")
    recorder = Recorder()
    srv = MounterServer(str(dirs["sock"] / "m.sock"), kubelet_dir=str(dirs["kubelet"]),
                        cache_dir=str(dirs["cache"]), state_dir=str(dirs["state"]),
                        launcher=recorder)
    await srv.start()
    srv.recorder = recorder  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        await srv.stop(1)


def spec(dirs, **changes) -> MountSpec:
    fields = {"volume_id": "pvc-1", "staging_path": str(dirs["kubelet"] / "pvc-1" / "g"),
              "cache_dir": str(dirs["cache"] / "pvc-1"),
              "log_file": str(dirs["state"] / "logs" / "pvc-1.log"),
              "options": ["ro", "epoch=3"], "cache_size": "1GiB", **changes}
    return MountSpec(**fields)


async def raw(path: str, line: bytes) -> dict:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(line)
    await writer.drain()
    reply = await reader.readline()
    writer.close()
    return json.loads(reply)


async def test_the_socket_is_root_only(server, dirs):
    assert stat.S_IMODE(os.stat(server.socket_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(dirs["sock"]).st_mode) == 0o700
    assert (await MounterClient(server.socket_path).ping())["version"] == 1


async def test_a_mount_runs_with_exactly_the_backend_the_plugin_sent(server, dirs):
    client = MounterClient(server.socket_path)
    env = {"PATH": "/plugin/bin", "HOME": "/root", "CHUNKFS_META": "redis://from-secret/1",
           "AWS_ACCESS_KEY_ID": "AK"}
    assert await client.mount(spec(dirs), env, 30) == Outcome(0)
    (got, got_env), = server.recorder.mounts
    assert got == spec(dirs)
    # the plugin's backend replaces the mounter's own; nothing else of the plugin's env
    assert got_env["CHUNKFS_META"] == "redis://from-secret/1" and got_env["AWS_ACCESS_KEY_ID"] == "AK"
    assert "AWS_SECRET_ACCESS_KEY" not in got_env
    assert got_env.get("PATH") != "/plugin/bin"
    assert server.mounted == {spec(dirs).staging_path}


async def test_failures_come_back_with_the_chunkfs_status_and_message(server, dirs):
    server.recorder.outcome = Outcome(2, "unknown mount option(s): bogus")
    outcome = await MounterClient(server.socket_path).mount(spec(dirs), {}, 30)
    assert outcome == Outcome(2, "unknown mount option(s): bogus")
    assert server.mounted == set()


@pytest.mark.parametrize(("changes", "why"), [
    ({"staging_path": "/etc/cron.d/x"}, "is not under"),
    ({"cache_dir": "/var/lib/other"}, "is not under"),
    ({"log_file": "/root/.bashrc"}, "is not under"),
    ({"volume_id": "../../etc"}, "volume_id"),
    ({"options": ["ro,suid"]}, "plain mount options"),
    ({"options": "ro"}, "plain mount options"),
    ({"cache_size": "1GiB --foreground"}, "bad cache_size"),
])
async def test_a_mount_outside_the_mounters_directories_is_refused(server, dirs, changes, why):
    outcome = await MounterClient(server.socket_path).mount(spec(dirs, **changes), {}, 30)
    assert outcome.rc == 2 and why in outcome.message
    assert server.recorder.mounts == []


@pytest.mark.parametrize(("line", "why"), [
    (b"not json\n", "malformed request"),
    (b"[1, 2]\n", "not a JSON object"),
    (b'{"version": 2, "op": "ping"}\n', "unsupported protocol version 2"),
    (b'{"version": 1, "op": "format"}\n', "unknown op"),
    (b'{"version": 1, "op": "mount", "spec": {"volume_id": "v"}}\n', "bad spec"),
    (b'{"version": 1, "op": "mount", "spec": {}, "timeout": -1}\n', "bad timeout"),
])
async def test_malformed_requests_are_refused_with_a_reason(server, line, why):
    reply = await raw(server.socket_path, line)
    assert reply["rc"] == 2 and why in reply["message"]


async def test_env_may_name_only_the_backend(server, dirs):
    line = json.dumps({"version": 1, "op": "mount", "spec": spec(dirs).__dict__,
                       "env": {"LD_PRELOAD": "/tmp/evil.so"}}).encode() + b"\n"
    reply = await raw(server.socket_path, line)
    assert reply["rc"] == 2 and "LD_PRELOAD" in reply["message"]
    assert server.recorder.mounts == []


async def test_an_oversized_request_is_refused_and_the_mounter_goes_on(server):
    try:
        reply = await raw(server.socket_path, b"x" * (2 << 20) + b"\n")
    except (ConnectionResetError, BrokenPipeError, json.JSONDecodeError):
        reply = {"rc": 2}  # refused before we finished sending: the reply may be lost
    assert reply["rc"] == 2
    assert (await MounterClient(server.socket_path).ping())["rc"] == 0


async def test_umount_only_of_a_chunkfs_mount_under_the_kubelet_dir(server, dirs):
    client = MounterClient(server.socket_path)
    outcome = await client.umount("/proc", 30)
    assert outcome.rc == 2 and "is not under" in outcome.message
    outcome = await client.umount(str(dirs["kubelet"] / "not-mounted"), 30)
    assert outcome.rc == 0 and "not a chunkfs mount" in outcome.message
    assert server.recorder.umounts == []


async def test_an_unreachable_mounter_is_unavailable_not_internal(tmp_path):
    client = MounterClient(str(tmp_path / "nobody.sock"))
    with pytest.raises(errors.CsiError) as err:
        await client.mount(MountSpec("v", "/k/v", "/c/v", "/s/v.log"), {}, 5)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert "is its pod running on this node" in err.value.message


def test_backend_env_keeps_only_backend_variables():
    assert backend_env({"AWS_REGION": "r", "CHUNKFS_META": "m", "PATH": "/bin",
                        "HOME": "/root"}) == {"AWS_REGION": "r", "CHUNKFS_META": "m"}
