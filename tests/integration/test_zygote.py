"""A mount forked from a zygote is a mount like any other, and shares nothing with its
siblings; ``chunkfs mount`` starts the mount itself whenever no zygote takes it.

Every test runs its own ``chunkfs zygote`` (a private run dir, like a node plugin's),
with real Redis, SeaweedFS and FUSE mounts; the mount command is the ordinary CLI.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from chunkfs import zygote as zygote_mod
from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import (
    Cli,
    MiB,
    Mount,
    Mounter,
    assert_one_line_error,
    pid_gone,
    rand_bytes,
    wait_until,
    write_file,
)


@dataclass
class Zygote:
    proc: subprocess.Popen[bytes]
    run_dir: Path
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def socket(self) -> Path:
        # this test process runs the same interpreter and chunkfs as the zygote
        return Path(zygote_mod.socket_path(str(self.run_dir)))


def start_zygote(env: dict[str, str], run_dir: Path, log: Path) -> Zygote:
    with open(log, "ab") as out:
        proc = subprocess.Popen(["chunkfs", "zygote", "--run-dir", str(run_dir), "--lifeline"],
                                env=env, stdin=subprocess.PIPE, stdout=out, stderr=out,
                                start_new_session=True)
    z = Zygote(proc, run_dir, log)
    wait_until(lambda: (zygote_mod.ping(str(run_dir)) or {}).get("pid") == proc.pid
               or proc.poll() is not None, 60, what="the zygote to answer")
    assert proc.poll() is None, log.read_text()
    return z


def stop(z: Zygote) -> None:
    if z.proc.poll() is None:
        z.proc.terminate()
    z.proc.wait(20)


@pytest.fixture
def zenv(cli: Cli, tmp_path: Path) -> dict[str, str]:
    """The test's backend, with a private root-only run dir (control sockets, zygote)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    return {**cli.env, "CHUNKFS_RUN_DIR": str(run_dir)}


@pytest.fixture
def zygote(zenv: dict[str, str], tmp_path: Path) -> Iterator[Zygote]:
    z = start_zygote(zenv, Path(zenv["CHUNKFS_RUN_DIR"]), tmp_path / "zygote.log")
    try:
        yield z
    finally:
        stop(z)


@pytest.fixture
def zmounter(zenv: dict[str, str], mount_base: Path, mount_logs: Path) -> Iterator[Mounter]:
    m = Mounter(Cli(zenv), mount_base, mount_logs)
    try:
        yield m
    finally:
        problems = m.cleanup()
        if problems:
            pytest.fail("mount teardown: " + "; ".join(problems), pytrace=False)


def proc_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    raise KeyError(name)


def parent(pid: int) -> int:
    return int(proc_field(pid, "PPid"))


def cmdline(pid: int) -> list[str]:
    return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def socket_inodes(pid: int) -> set[str]:
    """The sockets and pipes a process holds (their kernel object names)."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("socket:", "pipe:")):
            out.add(target)
    return out


def session_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])


# --- a forked mount is a mount ----------------------------------------------------------

def test_a_mount_forked_by_the_zygote_is_a_complete_mount(zygote, zmounter, zenv) -> None:
    cli = Cli(zenv)
    volume = cli.create_volume("zvol", "1GiB")
    m = zmounter.mount(volume)
    assert parent(m.pid) == zygote.pid, "the mount was not forked by the zygote"
    assert session_of(m.pid) == m.pid  # its own session: it outlives the zygote and the CLI
    data = rand_bytes(5 * MiB + 123, "z")  # two blocks and a bit
    write_file(m / "f", data)
    with open(m / "small", "w") as f:
        f.write("x")
        f.flush()
        os.fsync(f.fileno())
    assert (m / "f").read_bytes() == data
    status = m.status()  # `chunkfs status` over the control socket in the run dir
    assert status["pid"] == m.pid and status["volume"] == volume
    assert status["mountpoint"] == str(m.path) and status["s3"]["requests"]
    argv = cmdline(m.pid)  # what ps shows: its own command line, not the zygote's
    assert argv[argv.index("mount"):][:3] == ["mount", volume, str(m.path)]
    assert "zygote" not in argv
    env = environ(m.pid)
    assert env["CHUNKFS_META"] == zenv["CHUNKFS_META"]
    assert env["AWS_SECRET_ACCESS_KEY"] == zenv["AWS_SECRET_ACCESS_KEY"]
    assert "CHUNKFS_PROC_ROOM" not in env
    text = m.log_file.read_text()
    mounted = [json.loads(line) for line in text.splitlines()
               if '"mounted"' in line]
    assert mounted and mounted[-1]["mountpoint"] == str(m.path), text
    assert mounted[-1]["startup_ms"]["ready"] > 0
    zmounter.umount(m)  # flushes, the process exits, the control socket goes away
    assert not any(p.name.endswith(".sock") and not p.name.startswith("zygote-")
                   for p in Path(zenv["CHUNKFS_RUN_DIR"]).iterdir())
    again = zmounter.mount(volume, flags=("--no-zygote",))  # a normal mount reads it all back
    assert parent(again.pid) != zygote.pid
    assert (again / "f").read_bytes() == data and (again / "small").read_text() == "x"


def test_one_zygote_forks_many_mounts_that_share_nothing(zygote, zmounter, zenv,
                                                         tmp_path) -> None:
    cli = Cli(zenv)
    mounts = []
    for name, umask in (("za", 0o027), ("zb", 0o077)):
        cli.create_volume(name, "1GiB")
        home = tmp_path / f"cwd-{name}"
        home.mkdir()
        mp, cache = zmounter.new_dir("mp"), zmounter.new_dir("cache")
        log = tmp_path / f"{name}.log"
        proc = subprocess.run(
            ["chunkfs", "mount", name, str(mp), "--cache-dir", str(cache), "--log-file", str(log)],
            env={**zenv, "CHUNKFS_TEST_MARK": name}, cwd=home, umask=umask,
            capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        pid = json.loads((mp / ".chunkfs.status").read_bytes())["pid"]
        zmounter.mounts.append(Mount(name, mp, cache, pid, log, zmounter.cli))
        mounts.append((name, umask, home, mp, pid, log))
    (a, ua, home_a, mp_a, pid_a, log_a), (b, ub, home_b, mp_b, pid_b, log_b) = mounts
    assert pid_a != pid_b and parent(pid_a) == parent(pid_b) == zygote.pid
    for name, umask, home, _mp, pid, _log in mounts:
        assert os.readlink(f"/proc/{pid}/cwd") == str(home)  # the client's, not the zygote's
        assert int(proc_field(pid, "Umask"), 8) == umask
        assert environ(pid)["CHUNKFS_TEST_MARK"] == name
        assert session_of(pid) == pid
    # no descriptor crosses over: not the zygote's socket or lifeline, not a sibling's
    assert not socket_inodes(pid_a) & socket_inodes(pid_b)
    assert not socket_inodes(zygote.pid) & (socket_inodes(pid_a) | socket_inodes(pid_b))
    sessions = {json.loads((m[3] / ".chunkfs.status").read_bytes())["session"] for m in mounts}
    assert len(sessions) == 2
    write_file(mp_a / "only-a", b"a")
    write_file(mp_b / "only-b", b"b")
    assert os.listdir(mp_a) == ["only-a"] and os.listdir(mp_b) == ["only-b"]
    # each mount logs to its own file, the zygote to its own
    assert str(mp_a) in log_a.read_text() and str(mp_b) not in log_a.read_text()
    assert str(mp_b) in log_b.read_text() and str(mp_a) not in log_b.read_text()
    assert '"mounted"' not in zygote.log.read_text()
    assert zygote.proc.poll() is None and len(os.listdir(f"/proc/{zygote.pid}/task")) == 1


def test_mounts_outlive_their_zygote(zygote, zmounter, zenv) -> None:
    volume = Cli(zenv).create_volume("zlive", "1GiB")
    m = zmounter.mount(volume)
    zygote.proc.kill()  # SIGKILL: no clean up at all
    zygote.proc.wait(10)
    write_file(m / "after", b"still here")
    assert (m / "after").read_bytes() == b"still here"
    assert m.status()["pid"] == m.pid


# --- no zygote, a dead one, a refusal: the mount starts by itself ---------------------------

def test_a_dead_zygote_is_not_used(zygote, zmounter, zenv) -> None:
    volume = Cli(zenv).create_volume("zdead", "1GiB")
    zygote.proc.kill()
    zygote.proc.wait(10)
    assert zygote.socket.exists()  # what a killed zygote leaves behind
    m = zmounter.mount(volume)
    assert parent(m.pid) != zygote.pid
    write_file(m / "f", b"fallback")
    assert (m / "f").read_bytes() == b"fallback"


def test_the_zygote_refuses_what_it_cannot_fork_and_keeps_serving(zygote) -> None:
    def ask(doc: dict) -> dict:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(zygote.socket))
            s.sendall(json.dumps(doc).encode() + b"\n")
            return json.loads(s.makefile().readline())

    assert "fallback" in ask({"version": 99, "op": "mount"})
    assert "fallback" in ask({"version": 1, "op": "mount", "argv": ["umount", "/x"],
                              "title": [], "env": {}, "cwd": "/", "umask": 18})
    assert "fallback" in ask({"version": 1, "op": "mount", "argv": ["mount"], "title": [],
                              "env": {"A": 1}, "cwd": "/", "umask": 18})
    assert ask({"version": 1, "op": "ping"}) == {"ok": True, "pid": zygote.pid,
                                                "identity": zygote_mod.identity()}


@pytest.mark.parametrize("through", ["zygote", "its own process"])
def test_a_mount_that_fails_reports_why_either_way(through, request, zenv, mount_base,
                                                   tmp_path) -> None:
    if through == "zygote":
        request.getfixturevalue("zygote")
    Cli(zenv).create_volume("zfail", "1GiB")
    mp = mount_base / f"zfail-{tmp_path.name}"
    mp.mkdir()
    cache = str(tmp_path / "cache")

    def mount(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["chunkfs", "mount", *args, "--cache-dir", cache], env=zenv,
                              capture_output=True, text=True, timeout=120)

    bad_option = mount("zfail", str(mp), "-o", "bogus=1")
    assert bad_option.returncode == 2
    assert_one_line_error(bad_option, "unknown mount option", "bogus")
    missing = mount("nope", str(mp))
    assert missing.returncode == 1
    assert_one_line_error(missing, "volume 'nope' not found")
    (mp / "stray").write_text("x")
    full = mount("zfail", str(mp))
    assert full.returncode == 2
    assert_one_line_error(full, "not an empty directory")
    (mp / "stray").unlink()
    ok = mount("zfail", str(mp))
    assert ok.returncode == 0, ok.stderr
    try:
        pid = json.loads((mp / ".chunkfs.status").read_bytes())["pid"]
        if through == "zygote":
            assert parent(pid) == request.getfixturevalue("zygote").pid
    finally:
        subprocess.run(["chunkfs", "umount", str(mp)], env=zenv, check=True, timeout=120,
                       capture_output=True)


def test_a_mount_process_that_dies_before_it_is_ready_is_reported(zygote, zenv, mount_base,
                                                                  tmp_path) -> None:
    silent = socket.socket()  # a "Redis" that accepts and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    mp = mount_base / f"zdie-{tmp_path.name}"
    mp.mkdir()
    log = tmp_path / "dies.log"
    env = {**zenv, "CHUNKFS_META": f"redis://127.0.0.1:{silent.getsockname()[1]}/0"}
    client = subprocess.Popen(["chunkfs", "mount", "vol", str(mp), "--cache-dir",
                               str(tmp_path / "c"), "--log-file", str(log)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def forked() -> list[int]:
            return [int(p) for p in os.listdir("/proc") if p.isdigit()
                    and _ppid(int(p)) == zygote.pid]
        pids = wait_until(forked, 30, what="the zygote to fork the mount process")
        os.kill(pids[0], signal.SIGKILL)
        _, err = client.communicate(timeout=60)
    finally:
        silent.close()
        if client.poll() is None:
            client.kill()
    assert client.returncode == 1
    assert "exited before it was ready" in err and str(log) in err
    assert len(err.strip().splitlines()) == 1, err


def _ppid(pid: int) -> int:
    try:
        return parent(pid)
    except (OSError, KeyError):
        return 0


# --- the zygote's own life --------------------------------------------------------------

def test_the_zygote_stops_cleanly_on_sigterm_and_when_its_starter_goes(zenv, tmp_path) -> None:
    run_dir = Path(zenv["CHUNKFS_RUN_DIR"])
    z = start_zygote(zenv, run_dir, tmp_path / "z1.log")
    assert len(os.listdir(f"/proc/{z.pid}/task")) == 1  # no thread: safe to fork
    assert cmdline(z.pid)[-3:] == ["--run-dir", str(run_dir), "--lifeline"]
    assert "CHUNKFS_PROC_ROOM" not in environ(z.pid)
    z.proc.send_signal(signal.SIGTERM)
    assert z.proc.wait(20) == 0
    assert not z.socket.exists()
    z = start_zygote(zenv, run_dir, tmp_path / "z2.log")
    assert z.proc.stdin is not None
    z.proc.stdin.close()  # the lifeline: its starter is gone
    assert z.proc.wait(20) == 0
    assert not z.socket.exists()
    wait_until(lambda: pid_gone(z.pid), 10, what="the zygote to be gone")
