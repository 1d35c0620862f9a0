"""The mount's metadata cache (``chunkfs.metacache``) through FUSE, over real Redis and S3.

What users rely on: a mount always sees its own changes at once, however long the
timeouts; another node's changes show within the timeouts; a name created on another
node is visible at once where this mount never looked it up; lookups of many names in
one directory cost a few round trips, not one each.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import Mount, Mounter, wait_until, write_file

LONG = "attr-timeout=60,entry-timeout=60"


def drop_dentries() -> None:
    """Make the kernel forget names and attributes: what it asks next, the mount answers."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")


def redis_ops(m: Mount) -> dict[str, int]:
    return m.status()["redis"]["by_op"]


def test_own_changes_show_at_once_whatever_the_timeouts(mounter: Mounter, volume: str) -> None:
    m = mounter.mount(volume, options=LONG)
    d = Path(m) / "d"
    d.mkdir()
    write_file(d / "f", b"12345")
    os.stat(d / "f")                  # everything below is cached for a minute now
    drop_dentries()                   # the kernel forgot it: the mount's cache answers
    assert os.stat(d / "f").st_size == 5
    os.chmod(d / "f", 0o600)
    drop_dentries()
    assert os.stat(d / "f").st_mode & 0o777 == 0o600
    before = os.stat(d / "f")
    with open(d / "f", "ab") as f:
        f.write(b"678")
    drop_dentries()
    after = os.stat(d / "f")
    assert after.st_size == 8 and after.st_mtime_ns >= before.st_mtime_ns
    os.truncate(d / "f", 2)
    drop_dentries()
    assert os.stat(d / "f").st_size == 2
    os.link(d / "f", d / "g")
    drop_dentries()
    assert os.stat(d / "f").st_nlink == 2
    os.unlink(d / "g")
    drop_dentries()
    assert os.stat(d / "f").st_nlink == 1
    with pytest.raises(FileNotFoundError):
        os.stat(d / "g")
    os.rename(d / "f", d / "h")
    drop_dentries()
    with pytest.raises(FileNotFoundError):
        os.stat(d / "f")
    assert os.stat(d / "h").st_size == 2
    (d / "sub").mkdir()
    drop_dentries()
    assert os.stat(d).st_nlink == 3
    assert sorted(os.listdir(d)) == ["h", "sub"], "the listing read before is not served"
    os.setxattr(d / "h", "user.k", b"v")
    assert os.getxattr(d / "h", "user.k") == b"v"
    assert m.status()["errors"] == 0


def test_a_negative_entry_gives_way_to_a_name_created_on_this_mount(
        mounter: Mounter, volume: str) -> None:
    m = mounter.mount(volume, options=LONG + ",negative-timeout=60")
    path = Path(m) / "later"
    for _ in range(3):
        assert not path.exists()
    lookups = redis_ops(m).get("lookup_dir", 0)
    assert not path.exists()
    assert redis_ops(m).get("lookup_dir", 0) == lookups, "the kernel keeps the negative entry"
    write_file(path, b"now")
    assert path.read_bytes() == b"now"
    (Path(m) / "dir_later").exists()
    os.mkdir(Path(m) / "dir_later")
    assert os.path.isdir(Path(m) / "dir_later")


def test_another_nodes_changes_show_within_the_timeouts(mounter: Mounter, volume: str) -> None:
    a = mounter.mount(volume, options="attr-timeout=0.5,entry-timeout=0.5")
    b = mounter.mount(volume)
    write_file(Path(b) / "f", b"v1")
    assert os.stat(Path(a) / "f").st_size == 2
    assert not (Path(a) / "g").exists()            # a negative entry on a
    write_file(Path(b) / "f", b"rewritten")
    write_file(Path(b) / "g", b"new")
    wait_until(lambda: os.stat(Path(a) / "f").st_size == 9, 10, what="the new size on a")
    wait_until(lambda: (Path(a) / "g").exists(), 10, what="the new name on a")
    os.unlink(Path(b) / "f")
    wait_until(lambda: not (Path(a) / "f").exists(), 10, what="the unlink on a")


def test_by_default_a_name_another_node_creates_is_found_at_once_after_a_miss(
        mounter: Mounter, volume: str) -> None:
    """negative-timeout defaults to 0 (as JuiceFS's): a miss is not remembered, so a path
    another node just created opens, truncates and stats here at once."""
    a = mounter.mount(volume, options=LONG)
    b = mounter.mount(volume)
    for _ in range(3):
        assert not (Path(a) / "late").exists()
    write_file(Path(b) / "late", b"from b")
    os.truncate(Path(a) / "late", 2)
    assert (Path(a) / "late").read_bytes() == b"fr"


def test_a_name_created_on_another_node_shows_at_once_where_it_was_never_looked_up(
        mounter: Mounter, volume: str) -> None:
    a = mounter.mount(volume, options=LONG)
    b = mounter.mount(volume)
    (Path(b) / "d").mkdir()
    for i in range(5):
        write_file(Path(b) / "d" / f"f{i}", b"x")
    assert os.stat(Path(a) / "d" / "f0").st_size == 1   # a now holds the directory's listing
    assert sorted(os.listdir(Path(a) / "d")) == [f"f{i}" for i in range(5)]
    write_file(Path(b) / "d" / "new", b"hello")
    assert (Path(a) / "d" / "new").read_bytes() == b"hello", \
        "a listing says which names existed, never which did not"


def test_stat_of_every_file_of_a_big_directory_costs_a_few_round_trips(
        mounter: Mounter, volume: str) -> None:
    writer = mounter.mount(volume)
    n = 400  # bigger than a lookup's own listing (chunkfs.metacache.SMALL_DIR)
    (Path(writer) / "big").mkdir()
    for i in range(n):
        with open(Path(writer) / "big" / f"f{i:04d}", "wb") as f:
            f.write(b"x" * (i % 7))
    m = mounter.mount(volume)  # knows none of the names yet
    d = Path(m) / "big"
    before = redis_ops(m)
    sizes = [os.stat(d / f"f{i:04d}").st_size for i in range(n)]
    after = redis_ops(m)
    assert sizes == [i % 7 for i in range(n)]
    lookups = after.get("lookup_dir", 0) - before.get("lookup_dir", 0)
    pages = after.get("dir_page", 0) - before.get("dir_page", 0)
    assert pages >= 1, "the directory was listed"
    assert lookups < n // 4, f"{lookups} lookups for {n} names"


def test_writes_ask_redis_for_no_xattr_and_xattr_changes_show_as_attributes_do(
        mounter: Mounter, volume: str) -> None:
    """The kernel asks for ``security.capability`` before every write (to drop set-uid
    privileges): the mount answers from its cache, so small durable writes (SQLite's WAL:
    four writes per commit) cost no Redis round trip each. Its own xattr changes show at
    once; another node's within attr-timeout, as attributes do."""
    a = mounter.mount(volume, options="attr-timeout=0.5,entry-timeout=0.5")
    b = mounter.mount(volume)
    p = Path(a) / "wal"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"x" * 4096, 0)
        before = redis_ops(a).get("getxattr", 0)
        t0 = time.monotonic()
        for i in range(1, 41):
            os.pwrite(fd, b"y" * 24, i * 4096)
            os.pwrite(fd, b"z" * 4096, i * 4096 + 24)
            if i % 10 == 0:
                os.fsync(fd)
        windows = 1 + int((time.monotonic() - t0) / 0.5)  # attr-timeout periods they took
    finally:
        os.close(fd)
    asked = redis_ops(a).get("getxattr", 0) - before
    assert asked <= windows, f"80 writes asked Redis for {asked} xattrs (one per attr-timeout)"
    os.setxattr(p, "user.k", b"v1")
    assert os.getxattr(p, "user.k") == b"v1", "this mount's own change shows at once"
    os.setxattr(p, "user.k", b"v2")
    assert os.getxattr(p, "user.k") == b"v2"
    os.removexattr(p, "user.k")
    with pytest.raises(OSError):
        os.getxattr(p, "user.k")
    os.setxattr(Path(b) / "wal", "user.from_b", b"hello")
    wait_until(lambda: "user.from_b" in os.listxattr(p), 10, what="the new name on a")
    wait_until(lambda: _xattr(p, "user.from_b") == b"hello", 10, what="the value on a")
    os.setxattr(Path(b) / "wal", "user.from_b", b"changed")
    wait_until(lambda: _xattr(p, "user.from_b") == b"changed", 10, what="the new value on a")
    assert a.status()["errors"] == 0


def _xattr(p: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(p, name)
    except OSError:
        return None
