"""Incremental backups (docs/dev/backup.md, "What a backup reads"), against real Redis +
SeaweedFS + FUSE.

A backup reads from Redis only the pages whose inodes changed since the last one, so
its correctness rests on one property: every write of a mutation script to an inode's
keys is noted. The tests check it the strong way: after random work, through the mount
and through the metadata API, an incremental backup names exactly the pages a full
backup of the same moment names, byte for byte, and restores to the same tree. Then the
cost: what a backup reads is bounded by the inodes changed, not by the volume; a
backup that fails after taking the changes loses none of them; a volume whose tracking
is gone, or whose last backup cannot be a base, gets a full one.
"""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path
from typing import Any

import pytest

from chunkfs import backup
from chunkfs.meta.schema import ROOT_INODE, Keys
from chunkfs.volumes import VolumeService
from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import Cli, KiB, MiB, Mounter, rand_bytes, write_file
from tests.integration.test_backup import tree
from tests.integration.test_volumes import meta_of, put_file, read_inline

GiB = 1 << 30


async def pages_of(svc: VolumeService, report: backup.BackupReport) -> list[list[Any]]:
    """The manifest's pages with their numbers: [number, digest, inodes, bytes]."""
    root = await backup.read_root(svc.store, report.key)
    return [[no, digest, count, size]
            for (digest, count), (no, size) in zip(root["pages"], root["pageinfo"], strict=True)]


async def incremental_then_full(svc: VolumeService, volume: str) -> backup.BackupReport:
    """An incremental backup and, of the same (idle) moment, a full one: both must name
    the same pages and count the same files and bytes."""
    inc = await svc.backup_volume(volume)
    assert inc.kind == "incremental", inc
    full = await svc.backup_volume(volume, full=True)
    assert full.kind == "full" and full.pages_written == 0, full  # nothing new to write
    assert await pages_of(svc, inc) == await pages_of(svc, full), \
        "an incremental backup differs from a full one of the same moment: a change was missed"
    assert (inc.files, inc.size_bytes) == (full.files, full.size_bytes)
    return inc


# --- through the mount: every kind of change a filesystem makes --------------------------------


def churn(root: Path, rng: random.Random, steps: int, held: list[int]) -> None:
    """Random namespace and data changes, as applications make them."""
    dirs = [root] + [p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()]
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    for step in range(steps):
        op = rng.choice(["mkdir", "create", "create", "big", "append", "overwrite",
                         "truncate", "rename", "rename_dir", "unlink", "rmdir", "link",
                         "symlink", "chmod", "utime", "xattr", "rmxattr", "hold"])
        d = rng.choice(dirs)
        name = f"{op}{step}-{rng.randrange(1 << 20):05x}"
        try:
            if op == "mkdir":
                (d / name).mkdir()
                dirs.append(d / name)
            elif op == "create":
                write_file(d / name, rand_bytes(rng.randrange(1, 20 * KiB), name), fsync=False)
                files.append(d / name)
            elif op == "big":
                write_file(d / name, rand_bytes(rng.randrange(5 * MiB), name))
                files.append(d / name)
            elif files and op in ("append", "overwrite", "truncate"):
                f = rng.choice(files)
                with open(f, "r+b") as fh:
                    if op == "append":
                        fh.seek(0, os.SEEK_END)
                        fh.write(rand_bytes(rng.randrange(1, 8 * KiB), name))
                    elif op == "overwrite":
                        fh.seek(rng.randrange(max(1, f.stat().st_size)))
                        fh.write(rand_bytes(4 * KiB, name))
                    else:
                        fh.truncate(rng.randrange(6 * MiB))
                    if rng.random() < 0.5:
                        os.fsync(fh.fileno())
            elif files and op == "rename":
                f = files.pop(rng.randrange(len(files)))
                target = rng.choice(files) if files and rng.random() < 0.3 else d / name
                if target in files:
                    files.remove(target)
                f.rename(target)
                files.append(target)
            elif op == "rename_dir" and len(dirs) > 1:
                src = rng.choice(dirs[1:])
                if d == src or src in d.parents:
                    continue
                src.rename(d / name)
                dirs = [root] + [p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()]
                files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
            elif files and op == "unlink":
                files.pop(rng.randrange(len(files))).unlink()
            elif op == "rmdir" and len(dirs) > 1:
                victim = rng.choice(dirs[1:])
                if not any(victim.iterdir()):
                    victim.rmdir()
                    dirs.remove(victim)
            elif files and op == "link":
                os.link(rng.choice(files), d / name)
                files.append(d / name)
            elif op == "symlink":
                os.symlink(f"../target/{name}", d / name)
            elif op in ("chmod", "utime", "xattr", "rmxattr") and files:
                f = rng.choice(files)
                if op == "chmod":
                    f.chmod(rng.choice([0o600, 0o644, 0o755]))
                elif op == "utime":
                    os.utime(f, ns=(rng.randrange(1 << 40), rng.randrange(1 << 40)))
                elif op == "xattr":
                    os.setxattr(f, f"user.k{rng.randrange(3)}", rand_bytes(rng.randrange(64), name))
                elif os.listxattr(f):
                    os.removexattr(f, rng.choice(os.listxattr(f)))
            elif files and op == "hold":  # open, then unlinked: an orphan until closed
                f = files.pop(rng.randrange(len(files)))
                held.append(os.open(f, os.O_RDWR))
                f.unlink()
        except FileNotFoundError:  # a path a rename above moved away
            dirs = [root] + [p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()]
            files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def test_incremental_backups_of_random_work_equal_full_ones_and_restore_the_tree(
        mounter: Mounter, cli: Cli) -> None:
    cli.create_volume("vol")
    rng = random.Random(20261202)
    m = mounter.mount("vol")
    for i in range(40):
        write_file(m.path / f"base{i}", rand_bytes(3 * KiB, f"base{i}"), fsync=False)
    mounter.umount(m)
    first = cli.call(lambda svc: svc.backup_volume("vol"))
    assert first.kind == "full"
    backups = []
    for _ in range(4):
        m = mounter.mount("vol")
        held: list[int] = []
        churn(m.path, rng, 60, held)
        for fd in held:
            os.close(fd)
        expected = tree(m.path)
        mounter.umount(m)  # idle: the full backup sees the same moment as the incremental
        backups.append(cli.call(lambda svc: incremental_then_full(svc, "vol")))
    cli.run("volume", "restore", backups[-1].url, "back")
    r = mounter.mount("back")
    assert tree(r.path) == expected, "the restored incremental backup differs from the volume"
    mounter.umount(r)


# --- through the metadata API: cost and failures ----------------------------------------------


async def _volume_of_files(svc: VolumeService, name: str, dirs: int,
                           per_dir: int) -> tuple[Any, dict[tuple[int, int], int]]:
    info = await svc.create_volume(name, GiB)
    meta = meta_of(svc, info.id)
    files = {}
    for d in range(dirs):
        parent = (await meta.create(ROOT_INODE, f"d{d:03d}".encode(), stat.S_IFDIR | 0o755,
                                    0, 0)).ino
        for i in range(per_dir):
            files[d, i] = await put_file(meta, parent, f"f{i:03d}".encode(), f"{d} {i}".encode())
    return meta, files


async def _reads(svc: VolumeService) -> int:
    """Hash reads the Redis server has executed (scripts' calls included)."""
    stats = await svc.r.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0))
               for c in ("hgetall", "copy", "hvals", "hmget"))


async def test_what_a_backup_reads_is_bounded_by_the_inodes_changed_not_the_volume(
        svc: VolumeService) -> None:
    meta, files = await _volume_of_files(svc, "many", 30, 100)  # 3,031 inodes
    before = await _reads(svc)
    first = await svc.backup_volume("many")
    full_reads = await _reads(svc) - before
    assert first.kind == "full" and first.captured == first.files == 3031
    changed = [files[3, 3], files[17, 50], files[29, 99]]
    for n, ino in enumerate(changed):
        await meta.commit(ino, size=3, inline=f"v{n}!".encode()[:3])
    before = await _reads(svc)
    second = await svc.backup_volume("many")
    inc_reads = await _reads(svc) - before
    assert second.kind == "incremental" and second.base == first.id
    assert second.captured <= len(changed) * backup.PAGE_INODES, second
    assert second.pages_written == len(changed) and second.files == 3031
    assert inc_reads * 20 < full_reads, (inc_reads, full_reads)
    assert second.bytes_written * 5 < first.bytes_written
    third = await svc.backup_volume("many")  # nothing changed: nothing read but settings
    assert third.captured == 0 and third.pages_written == 0 and third.pages == first.pages
    await svc.r.flushdb()  # the volume is the URL: all three restore
    back, _ = await svc.restore_volume(backup.split_manifest_url(third.url)[1], "back")
    rmeta = meta_of(svc, back.id)
    d17 = (await rmeta.lookup(ROOT_INODE, b"d017")).ino
    assert await read_inline(rmeta, d17, b"f050") == b"v1!"
    assert await read_inline(rmeta, d17, b"f051") == b"17 51"
    assert back.used_inodes == 3031


async def test_a_backup_that_fails_after_taking_the_changes_loses_none_of_them(
        svc: VolumeService, monkeypatch: pytest.MonkeyPatch) -> None:
    meta, files = await _volume_of_files(svc, "v", 4, 40)
    first = await svc.backup_volume("v")
    await meta.commit(files[1, 1], size=3, inline=b"one")
    real_put = svc.store.put

    async def manifest_fails(key: str, body: bytes, *args: Any, **kw: Any) -> Any:
        if key.endswith(backup.MANIFEST):
            raise OSError("the object store went away")
        return await real_put(key, body, *args, **kw)

    monkeypatch.setattr(svc.store, "put", manifest_fails)
    with pytest.raises(OSError):
        await svc.backup_volume("v")
    monkeypatch.setattr(svc.store, "put", real_put)
    ns = (await svc.get_volume("v")).id
    assert await svc.r.hget(Keys(ns).backup, "temp") is None  # its copy is gone
    await meta.commit(files[2, 2], size=3, inline=b"two")
    second = await incremental_then_full(svc, "v")
    assert second.base == first.id  # relative to the last backup that was made
    assert second.pages_written == 2  # both changes: the failed backup's and the new one
    await svc.r.flushdb()
    back, _ = await svc.restore_volume(backup.split_manifest_url(second.url)[1], "back")
    rmeta = meta_of(svc, back.id)
    for (d, i), body in (((1, 1), b"one"), ((2, 2), b"two"), ((3, 3), b"3 3")):
        parent = (await rmeta.lookup(ROOT_INODE, f"d{d:03d}".encode())).ino
        assert await read_inline(rmeta, parent, f"f{i:03d}".encode()) == body


async def test_without_tracking_or_a_usable_base_the_backup_is_full_and_still_right(
        svc: VolumeService) -> None:
    meta, files = await _volume_of_files(svc, "v", 2, 20)
    ns = (await svc.get_volume("v")).id
    first = await svc.backup_volume("v")
    await meta.commit(files[0, 0], size=1, inline=b"a")
    await svc.r.delete(Keys(ns).changed)  # tracking lost (an operator, an old release)
    second = await svc.backup_volume("v")
    assert second.kind == "full" and second.captured == 43
    await meta.commit(files[0, 1], size=1, inline=b"b")
    await svc.store.put(second.key, b"not a manifest")  # the base is unreadable
    third = await svc.backup_volume("v")
    assert third.kind == "full" and third.files == 43
    fourth = await incremental_then_full(svc, "v")  # and incremental again after that
    assert fourth.base == third.id
    root = await backup.read_root(svc.store, fourth.key)
    assert root["base"] == third.id and first.id not in (second.base, third.base)


async def test_an_orphan_leaves_the_backup_when_unlinked_and_its_purge_is_noted(
        svc: VolumeService) -> None:
    meta, files = await _volume_of_files(svc, "v", 1, 20)
    await svc.backup_volume("v")
    parent = (await meta.lookup(ROOT_INODE, b"d000")).ino
    await meta.unlink(parent, b"f005", is_dir=False, keep_if_open=True)  # still open
    held = await incremental_then_full(svc, "v")
    assert held.files == 21
    await meta.purge(files[0, 5])  # closed at last
    gone = await incremental_then_full(svc, "v")
    assert gone.files == 21 and gone.captured <= backup.PAGE_INODES
