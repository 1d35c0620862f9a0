"""POSIX behaviour of a real chunkfs mount: what programs running on a volume rely on.

Most tests share one mount (``shared_mnt``) and work in a directory of their own
(``work``); tests that need a remount or a fresh volume use ``mounter``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import (
    Cli,
    GiB,
    KiB,
    MiB,
    Mount,
    Mounter,
    expect_errno,
    file_sha256,
    rand_bytes,
    run_as,
    sha256,
    wait_until,
    write_file,
)

# --------------------------------------------------------------------------- files & dirs


def test_regular_files_small_and_multi_block(work: Path) -> None:
    small, big = b"hello chunkfs\n", rand_bytes(9 * MiB + 123, "big")
    write_file(work / "small", small)
    write_file(work / "big", big)
    assert (work / "small").read_bytes() == small
    assert (work / "big").stat().st_size == len(big)
    assert file_sha256(work / "big") == sha256(big)
    # pread across a block boundary (blocks are 4 MiB)
    with open(work / "big", "rb") as f:
        assert os.pread(f.fileno(), 100, 4 * MiB - 50) == big[4 * MiB - 50:4 * MiB + 50]
    # overwrite in the middle of an existing block; the rest stays
    with open(work / "big", "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"X" * 1000)
    expected = big[:5 * MiB] + b"X" * 1000 + big[5 * MiB + 1000:]
    assert file_sha256(work / "big") == sha256(expected)


def test_empty_file_and_zero_length_write(work: Path) -> None:
    p = work / "empty"
    p.touch()
    assert p.stat().st_size == 0
    assert p.read_bytes() == b""
    with open(p, "wb") as f:
        f.write(b"")
    assert p.stat().st_size == 0
    assert stat.S_ISREG(p.stat().st_mode)


def test_directories(work: Path) -> None:
    (work / "a" / "b" / "c").mkdir(parents=True)
    (work / "a" / "f").write_bytes(b"1")
    assert sorted(os.listdir(work / "a")) == ["b", "f"]
    assert stat.S_ISDIR((work / "a" / "b").stat().st_mode)
    expect_errno(errno.EEXIST, os.mkdir, work / "a")
    expect_errno(errno.ENOTEMPTY, os.rmdir, work / "a" / "b")
    expect_errno(errno.ENOTDIR, os.rmdir, work / "a" / "f")
    expect_errno(errno.EISDIR, os.unlink, work / "a" / "b")
    expect_errno(errno.ENOENT, os.stat, work / "a" / "nope")
    expect_errno(errno.ENOTDIR, os.listdir, work / "a" / "f")
    os.rmdir(work / "a" / "b" / "c")
    os.rmdir(work / "a" / "b")
    assert os.listdir(work / "a") == ["f"]
    # ".." works and leads back to the parent
    assert os.stat(work / "a" / "..").st_ino == os.stat(work).st_ino


def test_directory_link_count_counts_subdirectories(work: Path) -> None:
    d = work / "d"
    d.mkdir()
    assert d.stat().st_nlink == 2
    (d / "x").mkdir()
    (d / "y").mkdir()
    (d / "file").write_bytes(b"")
    assert d.stat().st_nlink == 4
    os.rmdir(d / "y")
    assert d.stat().st_nlink == 3


def test_long_names_and_odd_bytes(work: Path) -> None:
    name = "n" * 255
    (work / name).write_bytes(b"ok")
    assert (work / name).read_bytes() == b"ok"
    expect_errno(errno.ENAMETOOLONG, open, work / ("n" * 256), "wb")
    odd = "sp ace-ünïcødé-\t-tab"
    (work / odd).write_bytes(b"odd")
    assert odd in os.listdir(work)
    raw = os.fsencode(str(work)) + b"/bad-\xff\xfe-utf8"
    with open(raw, "wb") as f:
        f.write(b"raw")
    assert b"bad-\xff\xfe-utf8" in os.listdir(os.fsencode(str(work)))


LONG_NAMES = [("n" * 256, "256 ASCII bytes"), ("\u00e9" * 128, "128 two-byte characters = 256 bytes"),
              ("x" * 1000, "1000 bytes"), ("y" * 1100, "1100 bytes (past the FUSE limit)")]


@pytest.mark.parametrize("long", [n for n, _ in LONG_NAMES], ids=[i for _, i in LONG_NAMES])
def test_names_longer_than_255_bytes_fail_with_enametoolong_everywhere(work: Path, long: str) -> None:
    """Every call that takes a name refuses one longer than NAME_MAX (255 bytes) with
    ENAMETOOLONG (not ENOENT, not success) and changes nothing (issue 6 item 11)."""
    (work / "file").write_bytes(b"data")
    (work / "dir").mkdir()
    (work / "empty").mkdir()
    before = sorted(os.listdir(work))
    calls = {
        "create": lambda: open(work / long, "wb"),  # noqa: SIM115 - it must fail
        "open": lambda: open(work / long, "rb"),  # noqa: SIM115
        "mknod": lambda: os.mknod(work / long, 0o644 | stat.S_IFIFO),
        "mkdir": lambda: os.mkdir(work / long),
        "symlink": lambda: os.symlink("file", work / long),
        "link": lambda: os.link(work / "file", work / long),
        "rename to": lambda: os.rename(work / "file", work / long),
        "rename dir to": lambda: os.rename(work / "empty", work / long),
        "rename from": lambda: os.rename(work / long, work / "other"),
        "stat": lambda: os.stat(work / long),
        "lstat": lambda: os.lstat(work / long),
        "access": lambda: os.access(work / long, os.R_OK) or os.stat(work / long),
        "unlink": lambda: os.unlink(work / long),
        "rmdir": lambda: os.rmdir(work / long),
        "chmod": lambda: os.chmod(work / long, 0o600),
        "truncate": lambda: os.truncate(work / long, 0),
        "getxattr": lambda: os.getxattr(work / long, "user.x"),
        "readlink": lambda: os.readlink(work / long),
        "a component in the middle": lambda: os.stat(work / long / "below"),
    }
    wrong = {}
    for what, call in calls.items():
        try:
            call()
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:
                wrong[what] = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        else:
            wrong[what] = "success"
    assert not wrong, f"expected ENAMETOOLONG for a name of {len(long.encode())} bytes: {wrong}"
    assert sorted(os.listdir(work)) == before, "a refused call changed the directory"
    assert (work / "file").read_bytes() == b"data"


def test_names_of_exactly_255_bytes_work_everywhere(work: Path) -> None:
    for name in ("m" * 255, "\u00e9" * 127 + "a"):
        assert len(name.encode()) == 255
        p = work / name
        p.write_bytes(b"ok")
        assert p.read_bytes() == b"ok" and p.stat().st_size == 2
        os.link(p, work / "hard")
        os.unlink(work / "hard")
        os.rename(p, work / "short")
        os.rename(work / "short", p)
        os.setxattr(p, "user.k", b"v")
        os.unlink(p)
        os.mkdir(p)
        os.symlink(name, p / name)
        assert os.readlink(p / name) == name
        os.unlink(p / name)
        os.mknod(p / name, 0o644 | stat.S_IFIFO)
        assert stat.S_ISFIFO(os.lstat(p / name).st_mode)
        os.unlink(p / name)
        os.rmdir(p)
    assert os.listdir(work) == []


def test_xattr_names_longer_than_255_bytes_are_refused(work: Path) -> None:
    """Linux bounds xattr names at 255 bytes in the VFS itself (ERANGE, as on ext4);
    no such name is ever stored."""
    p = work / "f"
    p.write_bytes(b"x")
    os.setxattr(p, "user." + "k" * 250, b"fits")  # 255 bytes
    assert os.getxattr(p, "user." + "k" * 250) == b"fits"
    for call in (lambda: os.setxattr(p, "user." + "k" * 251, b"v"),
                 lambda: os.getxattr(p, "user." + "k" * 251),
                 lambda: os.removexattr(p, "user." + "k" * 251)):
        expect_errno(errno.ERANGE, call)
    assert os.listxattr(p) == ["user." + "k" * 250]
    assert os.statvfs(work).f_namemax == 255


def test_symlinks(work: Path) -> None:
    (work / "target").write_bytes(b"pointed at")
    os.symlink("target", work / "rel")
    os.symlink("/nonexistent/dangling", work / "dangling")
    assert os.readlink(work / "rel") == "target"
    assert (work / "rel").read_bytes() == b"pointed at"
    st = os.lstat(work / "rel")
    assert stat.S_ISLNK(st.st_mode)
    assert st.st_size == len("target")
    assert os.readlink(work / "dangling") == "/nonexistent/dangling"
    expect_errno(errno.ENOENT, os.stat, work / "dangling")
    expect_errno(errno.EINVAL, os.readlink, work / "target")
    long_target = "x/" * 1000 + "end"
    os.symlink(long_target, work / "long")
    assert os.readlink(work / "long") == long_target
    os.unlink(work / "rel")
    assert (work / "target").exists()


def test_hard_links(work: Path) -> None:
    a, b = work / "a", work / "b"
    write_file(a, b"v1" * 100)
    os.link(a, b)
    assert a.stat().st_nlink == 2 and b.stat().st_nlink == 2
    assert a.stat().st_ino == b.stat().st_ino
    with open(b, "r+b") as f:
        f.write(b"V2")
    assert a.read_bytes()[:4] == b"V2v1"
    os.unlink(a)
    assert b.stat().st_nlink == 1
    assert b.read_bytes()[:4] == b"V2v1"
    (work / "d").mkdir()
    expect_errno(errno.EPERM, os.link, work / "d", work / "dlink")
    expect_errno(errno.EEXIST, os.link, b, b)


# --------------------------------------------------------------------------- rename


def test_rename_replaces_file_atomically(work: Path, shared_cli: Cli, shared_volume: str) -> None:
    dst, tmp = work / "config", work / "config.tmp"
    write_file(dst, rand_bytes(MiB, "old"))
    ino_old = dst.stat().st_ino
    used_before = shared_cli.used(shared_volume)
    write_file(tmp, b"new contents")
    os.rename(tmp, dst)
    assert dst.read_bytes() == b"new contents"
    assert not tmp.exists()
    assert dst.stat().st_ino != ino_old
    assert sorted(os.listdir(work)) == ["config"]
    # the replaced file's blocks no longer count
    wait_until(lambda: shared_cli.used(shared_volume) <= used_before - MiB + 1000, 10,
               what="used_bytes to drop after the replaced file went away")


def test_rename_replace_while_readers_see_old_or_new(work: Path) -> None:
    """A reader opening the name while it is being replaced sees a whole old or new file."""
    dst = work / "f"
    versions = {sha256(rand_bytes(300 * KiB, i)): i for i in range(6)}
    write_file(dst, rand_bytes(300 * KiB, 0))
    code = (
        "import hashlib,sys,time\n"
        "end=time.time()+float(sys.argv[2]); seen=[]\n"
        "while time.time()<end:\n"
        "    try: seen.append(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest())\n"
        "    except OSError as e: seen.append('ERROR:'+str(e))\n"
        "print('\\n'.join(seen))\n"
    )
    reader = subprocess.Popen([sys.executable, "-c", code, str(dst), "3"], stdout=subprocess.PIPE,
                              text=True)
    for i in range(1, 6):
        write_file(work / f"tmp{i}", rand_bytes(300 * KiB, i))
        os.rename(work / f"tmp{i}", dst)
    out, _ = reader.communicate(timeout=60)
    seen = out.splitlines()
    assert seen, "the reader read nothing"
    errors = sorted({s for s in seen if s.startswith("ERROR")})
    assert not errors, f"opening the name failed while it was being replaced: {errors}"
    assert set(seen) <= set(versions), "a reader saw a torn/mixed file"
    assert file_sha256(dst) == sha256(rand_bytes(300 * KiB, 5))


def test_rename_directories(work: Path) -> None:
    (work / "src" / "sub").mkdir(parents=True)
    (work / "src" / "sub" / "file").write_bytes(b"deep")
    (work / "other").mkdir()
    os.rename(work / "src", work / "other" / "moved")
    assert (work / "other" / "moved" / "sub" / "file").read_bytes() == b"deep"
    assert not (work / "src").exists()
    assert (work / "other").stat().st_nlink == 3
    # onto an empty directory: replaces it
    (work / "empty").mkdir()
    os.rename(work / "other" / "moved", work / "empty")
    assert (work / "empty" / "sub" / "file").read_bytes() == b"deep"
    # onto a non-empty directory: refused
    (work / "full").mkdir()
    (work / "full" / "x").write_bytes(b"")
    expect_errno(errno.ENOTEMPTY, os.rename, work / "empty", work / "full")
    # a directory into itself: refused
    expect_errno(errno.EINVAL, os.rename, work / "empty", work / "empty" / "sub" / "inside")
    # dir over file and file over dir
    (work / "plain").write_bytes(b"")
    expect_errno(errno.ENOTDIR, os.rename, work / "empty", work / "plain")
    expect_errno(errno.EISDIR, os.rename, work / "plain", work / "full")
    # rename to the same name is a no-op
    os.rename(work / "plain", work / "plain")
    assert (work / "plain").exists()


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.renameat2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    AT_FDCWD = -100
    if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(src))


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def test_rename_noreplace_and_exchange(work: Path) -> None:
    write_file(work / "a", b"AAA")
    write_file(work / "b", b"BBB")
    expect_errno(errno.EEXIST, _renameat2, work / "a", work / "b", RENAME_NOREPLACE)
    assert (work / "a").read_bytes() == b"AAA" and (work / "b").read_bytes() == b"BBB"
    _renameat2(work / "a", work / "c", RENAME_NOREPLACE)
    assert (work / "c").read_bytes() == b"AAA" and not (work / "a").exists()
    _renameat2(work / "b", work / "c", RENAME_EXCHANGE)
    assert (work / "c").read_bytes() == b"BBB" and (work / "b").read_bytes() == b"AAA"
    (work / "d").mkdir()
    (work / "d" / "in").write_bytes(b"in d")
    _renameat2(work / "b", work / "d", RENAME_EXCHANGE)  # file <-> directory
    assert (work / "b" / "in").read_bytes() == b"in d"
    assert (work / "d").read_bytes() == b"AAA"
    expect_errno(errno.ENOENT, _renameat2, work / "c", work / "missing", RENAME_EXCHANGE)


# --------------------------------------------------------------------------- unlink / truncate


def test_unlink_open_file_readable_until_close(work: Path, shared_cli: Cli,
                                               shared_volume: str) -> None:
    p = work / "doomed"
    data = rand_bytes(2 * MiB, "doomed")
    write_file(p, data)
    used_with_file = shared_cli.used(shared_volume)
    with open(p, "rb") as f:
        os.unlink(p)
        assert not p.exists()
        assert "doomed" not in os.listdir(work)
        assert os.fstat(f.fileno()).st_nlink == 0
        assert f.read() == data  # still readable: cold, not from the page cache
        # the name can be reused at once
        write_file(p, b"new file")
        assert p.read_bytes() == b"new file"
        assert shared_cli.used(shared_volume) >= used_with_file  # still held while open
    wait_until(lambda: shared_cli.used(shared_volume) <= used_with_file - 2 * MiB + 100, 10,
               what="the space of the unlinked file to be freed after close")


def test_unlink_open_file_writable_until_close(work: Path) -> None:
    p = work / "w"
    with open(p, "w+b") as f:
        f.write(b"before")
        f.flush()
        os.unlink(p)
        f.write(b"-after")
        f.flush()
        os.fsync(f.fileno())
        f.seek(0)
        assert f.read() == b"before-after"


def test_truncate_down_then_extend_reads_zeros(work: Path) -> None:
    p = work / "t"
    data = rand_bytes(6 * MiB, "t")
    write_file(p, data)
    os.truncate(p, 4 * MiB + 100)  # inside the second block
    assert p.stat().st_size == 4 * MiB + 100
    os.truncate(p, 9 * MiB)
    got = p.read_bytes()
    assert len(got) == 9 * MiB
    assert got[:4 * MiB + 100] == data[:4 * MiB + 100]
    assert got[4 * MiB + 100:] == bytes(9 * MiB - 4 * MiB - 100), "stale bytes after truncate+extend"
    # the same with an open file: ftruncate, then write past the hole
    with open(p, "r+b") as f:
        os.ftruncate(f.fileno(), 1000)
        f.seek(3000)
        f.write(b"tail")
    got = p.read_bytes()
    assert got == data[:1000] + bytes(2000) + b"tail"


def test_truncate_small_inline_file(work: Path) -> None:
    p = work / "s"
    write_file(p, b"0123456789" * 10)
    os.truncate(p, 5)
    assert p.read_bytes() == b"01234"
    os.truncate(p, 50)
    assert p.read_bytes() == b"01234" + bytes(45)
    os.truncate(p, 100 * KiB)  # grows past the inline limit
    assert p.read_bytes() == b"01234" + bytes(100 * KiB - 5)
    os.truncate(p, 0)
    assert p.read_bytes() == b""


def test_truncate_survives_remount(mounter: Mounter, volume: str) -> None:
    m = mounter.mount(volume)
    data = rand_bytes(5 * MiB, "tr")
    write_file(m / "f", data)
    os.truncate(m / "f", 4 * MiB + 7)
    os.truncate(m / "f", 6 * MiB)
    m = mounter.remount(m, cache_dir=mounter.new_dir("cache"))
    got = (m / "f").read_bytes()
    assert got == data[:4 * MiB + 7] + bytes(6 * MiB - 4 * MiB - 7)


# --------------------------------------------------------------------------- sparse / large


def test_sparse_file_holes_read_zeros_and_cost_nothing(mounter: Mounter, cli: Cli,
                                                       volume: str) -> None:
    m = mounter.mount(volume)
    p = m / "sparse"
    with open(p, "wb") as f:
        f.seek(100 * MiB)
        f.write(b"end")
        f.flush()
        os.fsync(f.fileno())
    assert p.stat().st_size == 100 * MiB + 3
    with open(p, "rb") as f:
        assert os.pread(f.fileno(), 4096, 50 * MiB) == bytes(4096)
        assert os.pread(f.fileno(), 10, 100 * MiB - 7) == bytes(7) + b"end"
    assert cli.used(volume) < MiB, "holes must not count as used bytes"
    os.truncate(p, 300 * MiB)  # a hole made by truncate
    assert cli.used(volume) < MiB
    with open(p, "rb") as f:
        assert os.pread(f.fileno(), 4096, 299 * MiB) == bytes(4096)


def test_sparse_file_larger_than_capacity(mounter: Mounter, cli: Cli) -> None:
    """Holes cost nothing: a sparse file may be larger than the volume (like ext4, xfs)."""
    cli.create_volume("small", "64MiB")
    m = mounter.mount("small")
    with open(m / "img", "wb") as f:
        f.seek(1 * GiB)
        f.write(b"x")
        f.flush()
        os.fsync(f.fileno())
    assert (m / "img").stat().st_size == GiB + 1
    assert cli.used("small") < MiB


def test_file_larger_than_4GiB(mounter: Mounter, cli: Cli) -> None:
    cli.create_volume("huge", "20GiB")
    m = mounter.mount("huge")
    p = m / "big"
    off = 5 * GiB + 3
    with open(p, "wb") as f:
        f.write(b"head")
        f.seek(4 * GiB - 2)
        f.write(b"ACROSS")  # straddles the 4 GiB boundary (32-bit offsets would wrap)
        f.seek(off)
        f.write(b"tail-after-5GiB")
        f.flush()
        os.fsync(f.fileno())
    size = off + len(b"tail-after-5GiB")
    assert p.stat().st_size == size
    # the holes cost nothing; only the block holding "ACROSS" is a whole (4 MiB) block
    assert cli.used("huge") < 5 * MiB
    m = mounter.remount(m, cache_dir=mounter.new_dir("cache"))
    with open(m / "big", "rb") as f:
        fd = f.fileno()
        assert os.pread(fd, 4, 0) == b"head"
        assert os.pread(fd, 6, 4 * GiB - 2) == b"ACROSS"
        assert os.pread(fd, 15, off) == b"tail-after-5GiB"
        assert os.pread(fd, 100, 4 * GiB + 100) == bytes(100)
        assert os.pread(fd, 100, off + 15) == b""
        assert os.lseek(fd, 0, os.SEEK_END) == size
    os.truncate(m / "big", 4 * GiB + 2)
    assert (m / "big").stat().st_size == 4 * GiB + 2
    with open(m / "big", "rb") as f:
        assert os.pread(f.fileno(), 10, 4 * GiB - 2) == b"ACRO"


# --------------------------------------------------------------------------- attributes


def test_chmod_chown_utimens(work: Path) -> None:
    p = work / "f"
    p.write_bytes(b"x")
    os.chmod(p, 0o640)
    assert stat.S_IMODE(p.stat().st_mode) == 0o640
    assert stat.S_ISREG(p.stat().st_mode)
    os.chmod(p, 0o4755)
    assert stat.S_IMODE(p.stat().st_mode) == 0o4755
    os.chown(p, 1234, 5678)
    st = p.stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(p, -1, 42)
    assert (p.stat().st_uid, p.stat().st_gid) == (1234, 42)
    ns_a, ns_m = 1_500_000_000_123_456_789, 1_600_000_000_987_654_321
    os.utime(p, ns=(ns_a, ns_m))
    st = p.stat()
    assert st.st_mtime_ns == ns_m
    assert st.st_atime_ns == ns_a
    (work / "d").mkdir()
    os.chmod(work / "d", 0o700)
    assert stat.S_IMODE((work / "d").stat().st_mode) == 0o700
    assert stat.S_ISDIR((work / "d").stat().st_mode)
    os.symlink("f", work / "l")
    os.utime(work / "l", ns=(ns_a, ns_a), follow_symlinks=False)
    assert os.lstat(work / "l").st_mtime_ns == ns_a


def test_mtime_and_ctime_advance_on_write(work: Path) -> None:
    p = work / "f"
    p.write_bytes(b"x")
    os.utime(p, ns=(10**18, 10**18))
    before = p.stat()
    with open(p, "ab") as f:
        f.write(b"y")
    after = p.stat()
    assert after.st_mtime_ns != before.st_mtime_ns
    assert after.st_ctime_ns >= before.st_ctime_ns
    t0 = time.time_ns()
    (work / "new").write_bytes(b"")
    st = (work / "new").stat()
    assert abs(st.st_mtime_ns - t0) < 60 * 10**9


def test_attributes_survive_remount(mounter: Mounter, volume: str) -> None:
    m = mounter.mount(volume)
    p = m / "f"
    p.write_bytes(b"x")
    os.chmod(p, 0o600)
    os.chown(p, 1001, 1002)
    os.utime(p, ns=(1_000_000_000, 2_000_000_000))
    os.setxattr(p, "user.k", b"v")
    m = mounter.remount(m)
    st = (m / "f").stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (1001, 1002)
    assert st.st_mtime_ns == 2_000_000_000
    assert os.getxattr(m / "f", "user.k") == b"v"


def test_xattrs(work: Path) -> None:
    p = work / "f"
    p.write_bytes(b"x")
    os.setxattr(p, "user.one", b"1")
    os.setxattr(p, "user.bin", bytes(range(256)))
    os.setxattr(p, "user.empty", b"")
    assert os.getxattr(p, "user.one") == b"1"
    assert os.getxattr(p, "user.bin") == bytes(range(256))
    assert os.getxattr(p, "user.empty") == b""
    assert sorted(os.listxattr(p)) == ["user.bin", "user.empty", "user.one"]
    os.setxattr(p, "user.one", b"one")
    assert os.getxattr(p, "user.one") == b"one"
    expect_errno(errno.EEXIST, os.setxattr, p, "user.one", b"x", os.XATTR_CREATE)
    expect_errno(errno.ENODATA, os.setxattr, p, "user.nope", b"x", os.XATTR_REPLACE)
    os.removexattr(p, "user.one")
    expect_errno(errno.ENODATA, os.getxattr, p, "user.one")
    expect_errno(errno.ENODATA, os.removexattr, p, "user.one")
    assert sorted(os.listxattr(p)) == ["user.bin", "user.empty"]
    big = rand_bytes(60 * KiB, "x")
    os.setxattr(p, "user.big", big)
    assert os.getxattr(p, "user.big") == big
    (work / "d").mkdir()
    os.setxattr(work / "d", "user.dir", b"on a dir")
    assert os.getxattr(work / "d", "user.dir") == b"on a dir"
    # the command-line tools agree
    out = subprocess.run(["getfattr", "--absolute-names", "-n", "user.dir", "--only-values",
                          str(work / "d")], capture_output=True, check=True).stdout
    assert out == b"on a dir"


# --------------------------------------------------------------------------- open flags


def test_o_append(work: Path) -> None:
    p = work / "log"
    p.write_bytes(b"start\n")
    fd1 = os.open(p, os.O_WRONLY | os.O_APPEND)
    fd2 = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd1, b"one\n")
        os.write(fd2, b"two\n")
        os.lseek(fd1, 0, os.SEEK_SET)  # O_APPEND ignores the position
        os.write(fd1, b"three\n")
    finally:
        os.close(fd1)
        os.close(fd2)
    assert p.read_bytes() == b"start\none\ntwo\nthree\n"
    # appending to a multi-block file
    big = rand_bytes(4 * MiB + 10, "ap")
    write_file(work / "big", big)
    with open(work / "big", "ab") as f:
        f.write(b"appended")
    assert file_sha256(work / "big") == sha256(big + b"appended")


def test_o_append_from_several_processes(work: Path) -> None:
    """Four processes append lines to one log, syncing and reopening now and then (a close
    flushes while the others keep appending); three rounds, since a race may need a few."""
    code = (
        "import os,sys,time\n"
        "fd=os.open(sys.argv[1], os.O_WRONLY|os.O_APPEND)\n"
        "while time.time() < float(sys.argv[3]): pass\n"
        "for i in range(100):\n"
        "    os.write(fd, (sys.argv[2]*63+'\\n').encode())\n"
        "    if i % 20 == 9: os.fsync(fd)\n"
        "    if i % 20 == 19:\n"
        "        os.close(fd); fd=os.open(sys.argv[1], os.O_WRONLY|os.O_APPEND)\n"
        "os.close(fd)\n"
    )
    for round_ in range(3):
        p = work / f"shared{round_}.log"
        p.write_bytes(b"")
        start = str(time.time() + 0.5)  # all four start appending at the same moment
        procs = [subprocess.Popen([sys.executable, "-c", code, str(p), c, start]) for c in "abcd"]
        for proc in procs:
            assert proc.wait(timeout=60) == 0
        data = p.read_bytes()
        lines = data.splitlines()
        good = sum(1 for line in lines if len(line) == 63 and len(set(line)) == 1)
        summary = (f"round {round_}: size {len(data)} (expected {400 * 64}), "
                   f"{data.count(0)} zero bytes, {good} good lines of 400")
        assert b"\0" not in data, f"zeros in an append-only file: {summary}"
        assert len(lines) == 400, f"appends were lost: {summary}"
        assert good == 400, f"interleaved appends: {summary}"


def test_o_trunc_and_o_excl(work: Path) -> None:
    p = work / "f"
    write_file(p, rand_bytes(5 * MiB, "tr"))
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    assert os.fstat(fd).st_size == 0
    os.write(fd, b"short")
    os.close(fd)
    assert p.read_bytes() == b"short"
    expect_errno(errno.EEXIST, os.open, p, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    fd = os.open(work / "new", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    assert stat.S_IMODE((work / "new").stat().st_mode) == 0o600
    expect_errno(errno.ENOENT, os.open, work / "missing", os.O_RDONLY)
    os.symlink("new", work / "link")
    expect_errno(errno.EEXIST, os.open, work / "link", os.O_CREAT | os.O_EXCL | os.O_WRONLY)


def test_exclusive_create_race_has_one_winner(work: Path) -> None:
    code = (
        "import os,sys\n"
        "try:\n"
        "    os.close(os.open(sys.argv[1], os.O_CREAT|os.O_EXCL|os.O_WRONLY)); print('won')\n"
        "except FileExistsError: print('lost')\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(work / "lockfile")],
                              stdout=subprocess.PIPE, text=True) for _ in range(6)]
    results = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(results) == ["lost"] * 5 + ["won"]


# --------------------------------------------------------------------------- mmap


def test_mmap_read(work: Path) -> None:
    data = rand_bytes(5 * MiB, "mr")
    write_file(work / "f", data)
    with open(work / "f", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        assert mm[:100] == data[:100]
        assert mm[4 * MiB - 10:4 * MiB + 10] == data[4 * MiB - 10:4 * MiB + 10]
        assert sha256(mm[:]) == sha256(data)


def test_mmap_write_shared_msync_survives_remount(mounter: Mounter, volume: str) -> None:
    m = mounter.mount(volume)
    p = m / "f"
    base = rand_bytes(5 * MiB, "mw")
    write_file(p, base)
    with open(p, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        mm[10:20] = b"0123456789"
        mm[4 * MiB - 3:4 * MiB + 3] = b"ABCDEF"
        mm.flush()  # msync(MS_SYNC)
    expected = bytearray(base)
    expected[10:20] = b"0123456789"
    expected[4 * MiB - 3:4 * MiB + 3] = b"ABCDEF"
    assert file_sha256(p) == sha256(bytes(expected))
    m = mounter.remount(m, cache_dir=mounter.new_dir("cache"))
    assert file_sha256(m / "f") == sha256(bytes(expected))


# --------------------------------------------------------------------------- locks


LOCK_HOLDER = """
import fcntl, os, sys, time
kind, path = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR)
if kind == 'flock':
    fcntl.flock(fd, fcntl.LOCK_EX)
else:
    fcntl.lockf(fd, fcntl.LOCK_EX)
print('locked', flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("kind", ["flock", "fcntl"])
def test_locks_contend_between_processes(work: Path, kind: str) -> None:
    p = work / "lock"
    p.write_bytes(b"")
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, kind, str(p)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "locked"
        fd = os.open(p, os.O_RDWR)
        try:
            lock = fcntl.flock if kind == "flock" else fcntl.lockf
            with pytest.raises(BlockingIOError):
                lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if kind == "fcntl":  # F_GETLK reports the holder's pid
                import struct
                req = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
                res = fcntl.fcntl(fd, fcntl.F_GETLK, req)
                assert struct.unpack("hhqqi", res)[4] == holder.pid
            holder.stdin.write("release\n")
            holder.stdin.flush()
            assert holder.wait(timeout=30) == 0
            lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free now
        finally:
            os.close(fd)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_sqlite_database(work: Path) -> None:
    db = work / "app.db"
    con = sqlite3.connect(db)
    con.execute("create table t (k integer primary key, v text)")
    with con:
        con.executemany("insert into t values (?, ?)", [(i, f"v{i}" * 50) for i in range(3000)])
    con.execute("pragma journal_mode=wal")
    with con:
        con.execute("update t set v='changed' where k % 2 = 0")
    con.close()
    con = sqlite3.connect(db)
    assert con.execute("pragma integrity_check").fetchone()[0] == "ok"
    assert con.execute("select count(*) from t where v='changed'").fetchone()[0] == 1500
    con.close()


# --------------------------------------------------------------------------- statfs


def test_statfs_and_df_show_capacity_and_use(mounter: Mounter, cli: Cli) -> None:
    cli.create_volume("sized", "3GiB")
    m = mounter.mount("sized")
    st = os.statvfs(m.path)
    assert st.f_blocks * st.f_frsize == 3 * GiB
    assert st.f_bavail * st.f_frsize > 3 * GiB - MiB
    assert st.f_namemax == 255
    write_file(m / "f", rand_bytes(3 * MiB, "df"))
    st = os.statvfs(m.path)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    assert 3 * MiB <= used < 4 * MiB
    out = subprocess.run(["df", "-B1", "--output=source,size,used,avail", str(m.path)],
                         capture_output=True, text=True, check=True).stdout.splitlines()[1].split()
    assert out[0] == "chunkfs:sized"
    assert int(out[1]) == 3 * GiB
    assert 3 * MiB <= int(out[2]) < 4 * MiB
    assert int(out[3]) == 3 * GiB - int(out[2])


# --------------------------------------------------------------------------- read-only


def test_read_only_mount(mounter: Mounter, volume: str) -> None:
    m = mounter.mount(volume)
    write_file(m / "f", b"data")
    (m / "d").mkdir()
    m = mounter.remount(m, options="ro")
    assert (m / "f").read_bytes() == b"data"
    assert os.statvfs(m.path).f_flag & os.ST_RDONLY
    expect_errno(errno.EROFS, open, m / "f", "r+b")
    expect_errno(errno.EROFS, open, m / "new", "wb")
    expect_errno(errno.EROFS, os.mkdir, m / "d2")
    expect_errno(errno.EROFS, os.unlink, m / "f")
    expect_errno(errno.EROFS, os.rename, m / "f", m / "g")
    expect_errno(errno.EROFS, os.chmod, m / "f", 0o600)
    expect_errno(errno.EROFS, os.setxattr, m / "f", "user.x", b"1")
    assert sorted(os.listdir(m.path)) == ["d", "f"]


# --------------------------------------------------------------------------- other users


PROBE = r"""
import errno, json, os, sys
def attempt(fn, *a):
    try:
        r = fn(*a)
        return r.decode(errors='replace') if isinstance(r, bytes) else 'ok'
    except OSError as e:
        return errno.errorcode[e.errno]
def write(p, data=b'mine'):
    with open(p, 'wb') as f: f.write(data)
def read(p):
    with open(p, 'rb') as f: return f.read()
ops = {'write': write, 'read': read, 'chmod': lambda p: os.chmod(p, 0o600),
       'chown': lambda p: os.chown(p, 0, 0), 'mkdir': os.mkdir, 'unlink': os.unlink,
       'rename': lambda p: os.rename(p, p + '.moved'),
       'stat_gid': lambda p: str(os.stat(p).st_gid).encode(),
       'stat_mode': lambda p: oct(os.stat(p).st_mode).encode(),
       'stat_uid': lambda p: str(os.stat(p).st_uid).encode(),
       'listdir': lambda p: ','.join(sorted(os.listdir(p))).encode()}
print(json.dumps([attempt(ops[op], path) for op, path in zip(sys.argv[1::2], sys.argv[2::2])]))
"""


def probe(user: tuple[int, int], *ops: tuple[str, Path]) -> list[str]:
    args = [str(x) for op in ops for x in op]
    proc = run_as(user[0], user[1], PROBE, *args)
    assert proc.returncode == 0, proc.stderr
    import json
    return json.loads(proc.stdout)


def test_nonroot_user_creates_files_in_volume_root(shared_mnt: Mount, nonroot_user) -> None:
    root = shared_mnt.path
    me = (nonroot_user.uid, nonroot_user.gid)
    name = f"nonroot-{os.getpid()}-{time.monotonic_ns()}"
    res = probe(me, ("write", root / name), ("read", root / name), ("stat_uid", root / name),
                ("mkdir", root / f"{name}.d"), ("write", root / f"{name}.d" / "inner"),
                ("read", root / f"{name}.d" / "inner"))
    assert res == ["ok", "mine", str(nonroot_user.uid), "ok", "ok", "mine"]
    st = (root / name).stat()
    assert (st.st_uid, st.st_gid) == me


def test_the_volume_root_is_sticky_users_keep_their_own_files(shared_mnt: Mount, nonroot_user) -> None:
    """Every uid sharing a volume can create at its root, none can remove or rename what
    another created (the root is 1777, as /tmp is)."""
    root = shared_mnt.path
    assert stat.S_IMODE(root.stat().st_mode) == 0o1777
    me, other = (nonroot_user.uid, nonroot_user.gid), (65534, 65534)
    name = str(root / f"sticky-{os.getpid()}-{time.monotonic_ns()}")
    assert probe(me, ("write", name)) == ["ok"]
    assert probe(other, ("unlink", name), ("rename", name), ("write", name + ".theirs")) == [
        "EPERM", "EPERM", "ok"]
    assert probe(me, ("unlink", name + ".theirs"), ("rename", name)) == ["EPERM", "ok"]
    assert probe(me, ("unlink", name + ".moved")) == ["ok"]


def test_a_setgid_directory_gives_new_entries_its_group(work: Path, nonroot_user) -> None:
    """What fsGroup relies on: files made in a setgid directory belong to its group, and
    directories made there are setgid too."""
    shared = work / "team"
    shared.mkdir()
    os.chown(shared, 0, 4242)
    os.chmod(shared, 0o2777)
    me = (nonroot_user.uid, nonroot_user.gid)
    res = probe(me, ("write", shared / "f"), ("stat_gid", shared / "f"), ("mkdir", shared / "d"),
                ("stat_gid", shared / "d"), ("stat_mode", shared / "d"),
                ("write", shared / "d" / "g"), ("stat_gid", shared / "d" / "g"))
    assert res[:4] == ["ok", "4242", "ok", "4242"], res
    assert int(res[4], 8) & stat.S_ISGID, res
    assert res[5:] == ["ok", "4242"], res
    plain = work / "plain"
    plain.mkdir(mode=0o777)
    os.chmod(plain, 0o777)
    assert probe(me, ("write", plain / "f"), ("stat_gid", plain / "f")) == ["ok", str(nonroot_user.gid)]


def test_permission_checks_between_users(work: Path, nonroot_user) -> None:
    me = (nonroot_user.uid, nonroot_user.gid)
    other = (65534, 65534)  # nobody
    os.chmod(work, 0o777)
    private = work / "private"
    assert probe(me, ("write", private), ("chmod", private)) == ["ok", "ok"]
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    # another user can neither read nor write it, nor chown it; the owner can
    assert probe(other, ("read", private), ("write", private), ("chown", private)) == [
        "EACCES", "EACCES", "EPERM"]
    assert probe(me, ("read", private), ("chown", private)) == ["mine", "EPERM"]
    # root's 0600 file is closed to others; a 0755 root-owned dir refuses their creates
    secret = work / "rootonly"
    write_file(secret, b"root secret")
    os.chmod(secret, 0o600)
    (work / "rootdir").mkdir(mode=0o755)
    os.chmod(work / "rootdir", 0o755)
    res = probe(me, ("read", secret), ("write", work / "rootdir" / "x"))
    assert res == ["EACCES", "EACCES"]
    # a 0700 directory cannot be listed by others
    (work / "closed").mkdir()
    os.chmod(work / "closed", 0o700)
    assert probe(me, ("listdir", work / "closed")) == ["EACCES"]
