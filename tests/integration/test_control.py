"""What root on the node believes about a mount comes from the mount, never from a pod.

A pod that uses a volume can write everything in it: the status file's name is reserved
in every operation, and root's tools (``chunkfs status``/``umount``, the CSI node plugin)
read a mount's state from its control socket in a root-only directory, take its pid from
the kernel, and contain whatever nonsense a reply holds.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading

import pytest

from chunkfs import control
from chunkfs.control import ControlError
from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import Cli, Mount, Mounter, pid_gone, run_as, wait_until

ATTACK = r"""
import errno, os, sys
root = sys.argv[1]
status = os.path.join(root, '.chunkfs.status')
mine = os.path.join(root, 'fake-%d' % os.getpid())
with open(mine, 'w') as f:
    f.write('{"pid": 1, "fenced": true}')
out = []
for name, fn in [('rename', lambda: os.rename(mine, status)),
                 ('link', lambda: os.link(mine, status)),
                 ('symlink', lambda: os.symlink('/etc/shadow', status)),
                 ('unlink', lambda: os.unlink(status)),
                 ('mkdir', lambda: os.mkdir(status)),
                 ('mknod', lambda: os.mknod(status, 0o10644)),  # a FIFO: no privilege needed
                 ('create', lambda: open(status, 'x').close()),
                 ('rename_away', lambda: os.rename(status, mine + '.x'))]:
    try:
        fn()
        out.append(name + ':ok')
    except OSError as e:
        out.append(name + ':' + errno.errorcode[e.errno])
os.unlink(mine)
print(' '.join(out))
"""


def test_a_pod_cannot_take_the_status_files_name(mnt: Mount) -> None:
    proc = run_as(65534, 65534, ATTACK, str(mnt.path))
    assert proc.returncode == 0, proc.stderr
    results = dict(item.split(":") for item in proc.stdout.split())
    assert all(v != "ok" for v in results.values()), results
    doc = json.loads((mnt / ".chunkfs.status").read_bytes())  # still the mount's own
    assert doc["pid"] == mnt.pid and doc["fenced"] is False
    st = os.lstat(mnt / ".chunkfs.status")
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0


def test_status_and_umount_talk_to_the_mount_process_through_its_control_socket(
        cli: Cli, mounter: Mounter, volume: str) -> None:
    m = mounter.mount(volume)
    path = control.socket_path(str(m.path))
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) & 0o077 == 0
    assert m.status()["pid"] == m.pid  # the kernel's word (SO_PEERCRED)
    mounter.umount(m)
    assert pid_gone(m.pid) and not os.path.exists(path)


def test_a_socket_or_run_dir_others_can_write_is_refused(tmp_path, mounter: Mounter, volume: str) -> None:
    m = mounter.mount(volume)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ControlError, match="other users"):
        control.query_status(str(m.path), run_dir=str(shared))
    # a socket planted by another user in a private dir
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    planted = control.socket_path(str(m.path), str(private))
    srv = socket.socket(socket.AF_UNIX)
    with control._reachable(planted) as address:
        srv.bind(address)
    os.chown(planted, 65534, 65534)
    try:
        with pytest.raises(ControlError, match="not a control socket of ours"):
            control.query_status(str(m.path), run_dir=str(private))
    finally:
        srv.close()


@pytest.mark.parametrize("reply", [
    b"[" * 100000 + b"\n",                                   # deep nesting
    b'{"a":' * 50 + b"1" + b"}" * 50 + b"\n",                # deeper than the bound
    b"x" * (control.MAX_REPLY + 10),                         # no end, too long
    b"not json\n",
    b'["a list"]\n',
])
def test_a_mount_that_answers_nonsense_is_an_error_not_a_crash(tmp_path, reply: bytes) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    mountpoint = str(tmp_path / "mp")
    path = control.socket_path(mountpoint, str(run_dir))
    srv = socket.socket(socket.AF_UNIX)
    with control._reachable(path) as address:
        srv.bind(address)
    srv.listen(1)

    def answer() -> None:
        conn, _ = srv.accept()
        conn.recv(100)
        try:
            conn.sendall(reply)
        except OSError:
            pass
        conn.close()

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        with pytest.raises(ControlError):
            control.query_status(mountpoint, run_dir=str(run_dir), timeout=5)
    finally:
        t.join(5)
        srv.close()


def test_umount_of_a_mount_whose_process_died_clears_it(cli: Cli, mounter: Mounter, volume: str) -> None:
    m = mounter.mount(volume)
    os.kill(m.pid, 9)
    wait_until(lambda: pid_gone(m.pid), 10, what="the mount process to die")
    out = cli.run("umount", str(m.path))
    assert "stale" in out.stdout
    mounter.mounts.remove(m)


@pytest.mark.mount_log_allows("s3 retry", "block upload failed", "operation failed",
                              reason="the test hands the mount wrong S3 keys on purpose")
def test_rotated_credentials_reach_a_running_mount_and_bad_ones_are_refused_whole(
        cli: Cli, mounter: Mounter, volume: str) -> None:
    """Over the root-only socket (the CSI node plugin's rotation of a published volume):
    new S3 keys sign the very next request, refusals change nothing and never echo a
    credential. The Redis half (the next connection authenticates with the new
    password) is tested with a real ACL user in tests/csi/test_credentials.py."""
    m = mounter.mount(volume, options="io-timeout=5")
    path = str(m.path)
    env = cli.env
    right = {"access_key": env["AWS_ACCESS_KEY_ID"], "secret_key": env["AWS_SECRET_ACCESS_KEY"]}
    refused = [
        {"meta_url": "redis://127.0.0.1:1/0"},                      # another Redis
        {"meta_url": "not a url s3cr3t"},
        {"access_key": "only-one-key"},
        {"access_key": 5, "secret_key": "s3cr3t"},
        {},
    ]
    for doc in refused:
        with pytest.raises(ControlError) as err:
            control.send_credentials(path, doc)  # type: ignore[arg-type]
        assert "s3cr3t" not in str(err.value) and "only-one-key" not in str(err.value)
    (m / "before").write_bytes(os.urandom(5 << 20))  # still the old (right) keys
    control.send_credentials(path, {"access_key": "WRONGKEY", "secret_key": "s3cr3t-wrong"})
    with pytest.raises(OSError):  # the next upload is signed with them: S3 refuses it
        (m / "refused").write_bytes(os.urandom(5 << 20))
    control.send_credentials(path, {**right, "meta_url": env["CHUNKFS_META"]})
    data = os.urandom(5 << 20)
    (m / "after").write_bytes(data)
    log = m.log_file.read_text()
    assert "s3cr3t" not in log and env["AWS_SECRET_ACCESS_KEY"] not in log
    m = mounter.remount(m, cache_dir=mounter.new_dir("cache"))
    assert (m / "after").read_bytes() == data
