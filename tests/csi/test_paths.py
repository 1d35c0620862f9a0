"""csi/paths.py and csi/mountcalls.py on real directories and real mounts (root; no
Redis, no S3): symlinks are never followed, and a bind mount lands on the directory that
was checked even when the path is swapped for a symlink between check and mount."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import grpc
import pytest

from csi import errors, mountcalls, paths
from csi.mountinfo import mounts

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "kubelet/pods/p1/volumes").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside/secret").write_text("do not touch\n")
    return tmp_path


@pytest.fixture
def mounted(root: Path):
    """Mount a tmpfs somewhere; everything mounted under ``root`` is detached at the end."""
    def mount(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "paths-test", str(path)],
                       check=True)
        return path

    yield mount
    for point in sorted(mounts(), key=len, reverse=True):
        if point.startswith(str(root) + "/"):
            subprocess.run(["umount", "-l", point], check=False)


def test_canonical_paths_are_under_the_kubelet_dir(root: Path) -> None:
    os.symlink(root / "kubelet", root / "kubelet-link")  # the kubelet dir itself may be a link
    kubelet = paths.KubeletDir(str(root / "kubelet-link"))
    assert kubelet.canonical("p", f"{root}/kubelet-link/pods//p1/./x") == f"{root}/kubelet/pods/p1/x"
    assert kubelet.canonical("p", f"{root}/kubelet/pods/p1") == f"{root}/kubelet/pods/p1"
    for bad in ("relative/x", f"{root}/kubelet-link", f"{root}/kubelet/pods/../x",
                f"{root}/outside/x", "/etc/passwd", f"{root}/kubelet/\0x"):
        with pytest.raises(errors.CsiError) as err:
            kubelet.canonical("p", bad)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, bad


def test_inspect_refuses_every_symlink_and_never_follows_one(root: Path, mounted) -> None:
    pods = root / "kubelet/pods"
    os.symlink(root / "outside", pods / "final-link")
    os.symlink(pods / "p1", pods / "parent-link")   # even one that stays inside
    (pods / "file").write_text("x")
    assert paths.inspect(str(pods / "p1")) is paths.Kind.DIRECTORY
    assert paths.inspect(str(pods / "p1/missing")) is paths.Kind.MISSING
    assert paths.inspect(str(pods / "nope/missing")) is paths.Kind.MISSING
    assert paths.inspect(str(mounted(pods / "p1/mnt"))) is paths.Kind.MOUNTPOINT
    for bad, why in [(pods / "final-link", "final-link is a symlink"),
                     (pods / "parent-link/volumes", "parent-link is a symlink"),
                     (pods / "file", "not a directory"),
                     (pods / "file/x", "not a directory")]:
        with pytest.raises(paths.PathError) as err:
            paths.inspect(str(bad))
        assert why in err.value.reason
    with pytest.raises(paths.PathError):
        paths.make_dir(str(pods / "parent-link/new"))
    assert not (pods / "p1/new").exists()


def test_make_and_remove_dir_never_follow_symlinks(root: Path) -> None:
    pods = root / "kubelet/pods"
    paths.make_dir(str(pods / "p2/a/b"))
    assert (pods / "p2/a/b").is_dir()
    paths.remove_dir(str(pods / "p2/a/b"))
    assert not (pods / "p2/a/b").exists() and (pods / "p2/a").is_dir()
    paths.remove_dir(str(pods / "p2/a/b"))  # absent: fine
    os.symlink(root / "outside", pods / "p2/a/b")
    with pytest.raises(NotADirectoryError):
        paths.remove_dir(str(pods / "p2/a/b"))  # rmdir of a symlink: refused by the kernel
    assert (root / "outside/secret").exists()


def test_a_parent_inside_a_fuse_mount_is_refused(root: Path) -> None:
    table = {str(root / "kubelet/pods"): _entry("fuse.chunkfs")}
    with pytest.raises(paths.PathError) as err:
        paths.open_dir(str(root / "kubelet/pods/p1"), table=table)
    assert "inside the FUSE mount" in err.value.reason


def _entry(fstype: str):
    from csi.mountinfo import MountEntry

    return MountEntry("/x", "0:1", "/", frozenset({"rw"}), fstype, "chunkfs:v")


def test_bind_lands_on_the_checked_directory_even_if_swapped_for_a_symlink(root: Path,
                                                                            mounted) -> None:
    """The race of issue 6 item 15: check the target, an attacker renames it away and puts
    a symlink to /etc in its place, then the mount happens. The mount must land on the
    directory that was checked (now elsewhere), never on the symlink's target."""
    source = mounted(root / "kubelet/staging")
    (source / "volume-file").write_text("from the volume\n")
    target = root / "kubelet/pods/p1/volumes/mount"
    target.mkdir()
    with paths.opened(str(target)) as fd:
        moved = root / "kubelet/pods/p1/volumes/moved-away"
        os.rename(target, moved)
        os.symlink(root / "outside", target)
        mountcalls.bind(str(source), fd)
    table = mounts()
    assert str(moved) in table and str(root / "outside") not in table
    assert (moved / "volume-file").read_text() == "from the volume\n"
    assert (root / "outside/secret").read_text() == "do not touch\n"
    with pytest.raises(OSError):  # and an unmount through the symlink is refused too
        mountcalls.umount(str(target))
    assert str(moved) in mounts()
    mountcalls.umount(str(moved))
    assert str(moved) not in mounts()


def test_publish_flags_always_keep_nosuid_and_nodev(root: Path, mounted) -> None:
    source = mounted(root / "kubelet/staging")
    target = root / "kubelet/pods/p1/volumes/mount"
    bits = mountcalls.publish_flags(True, ["noexec", "exec", "noatime", "rw"])
    assert bits & mountcalls.MS_NOSUID and bits & mountcalls.MS_NODEV
    assert bits & mountcalls.MS_RDONLY and not bits & mountcalls.MS_NOEXEC
    for refused in ("suid", "dev", "bind", "remount"):
        with pytest.raises(ValueError):
            mountcalls.publish_flags(False, [refused])
    with paths.opened(str(target), create=True) as fd:
        mountcalls.bind(str(source), fd)
    with paths.opened(str(target)) as fd:
        mountcalls.remount(fd, mountcalls.publish_flags(False, ["noexec"]))
    assert {"rw", "nosuid", "nodev", "noexec"} <= mounts()[str(target)].options
    mountcalls.umount(str(target))
