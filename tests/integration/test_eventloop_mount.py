"""A mount runs on the event loop $CHUNKFS_EVENT_LOOP names, uvloop by default
(chunkfs/eventloop.py): the mount process has uvloop's extension loaded, or not."""

from __future__ import annotations

from pathlib import Path

from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import Mounter, make_env


def _runs_uvloop(pid: int) -> bool:
    return "uvloop" in Path(f"/proc/{pid}/maps").read_text()


def test_a_mount_runs_on_uvloop_unless_asked_for_asyncio(mounter: Mounter, volume: str) -> None:
    m = mounter.mount(volume)
    assert _runs_uvloop(m.pid)
    (m.path / "f").write_bytes(b"on uvloop")
    mounter.umount(m)
    env = make_env(mounter.cli.env, CHUNKFS_EVENT_LOOP="asyncio")
    m = mounter.mount(volume, env=env, flags=("--no-zygote",))
    assert not _runs_uvloop(m.pid)
    assert (m.path / "f").read_bytes() == b"on uvloop"
    mounter.umount(m)
