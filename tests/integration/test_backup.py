"""Backups and restores from the object store alone (chunkfs/backup.py, docs/dev/backup.md),
against real Redis + SeaweedFS: byte-for-byte restores of snapshots and backups into an
empty Redis, every object verified (a missing or corrupt one fails the restore and
leaves nothing), incremental backups, retention, and GC with backups."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from chunkfs import backup
from chunkfs.errors import VolumeExists
from chunkfs.meta.schema import ROOT_INODE, Keys
from chunkfs.volumes import VolumeService
from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import (
    Cli,
    KiB,
    MiB,
    Mounter,
    assert_one_line_error,
    make_env,
    rand_bytes,
    wait_until,
    write_file,
)
from tests.integration.test_volumes import meta_of, put_file, read_inline

GiB = 1 << 30


# --- helpers ------------------------------------------------------------------------------


def tree(root: Path) -> dict[str, Any]:
    """Everything a user can see of a tree: types, modes, sizes, contents, link targets,
    xattrs, and which names are hard links of one another."""
    out: dict[str, Any] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            doc: dict[str, Any] = {"mode": st.st_mode, "uid": st.st_uid, "nlink": st.st_nlink,
                                   "mtime": st.st_mtime_ns}
            if stat.S_ISLNK(st.st_mode):
                doc["target"] = os.readlink(path)
            else:
                doc["xattr"] = {a: os.getxattr(path, a) for a in sorted(os.listxattr(path))}
            if stat.S_ISREG(st.st_mode):
                doc["size"] = st.st_size
                doc["data"] = path.read_bytes()
                doc["same_as"] = inodes.setdefault(st.st_ino, rel)
            out[rel] = doc
    return out


def populate(root: Path) -> None:
    """Small and big files, a sparse one, a symlink, hard links, xattrs, nested dirs."""
    (root / "d" / "e").mkdir(parents=True)
    write_file(root / "tiny", b"tiny file, stored inline")
    write_file(root / "d" / "medium", rand_bytes(300 * KiB, "medium"))
    write_file(root / "d" / "e" / "big", rand_bytes(9 * MiB, "big"))  # three blocks
    with open(root / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(20 * MiB)
        f.write(b"tail")
        f.truncate(30 * MiB)
        os.fsync(f.fileno())
    os.symlink("d/medium", root / "link")
    os.link(root / "d" / "medium", root / "hard")
    os.setxattr(root / "d" / "medium", "user.color", b"blue")
    os.setxattr(root / "d", "user.dir", b"\x00\x01binary")
    write_file(root / "empty", b"")


def run_backup(cli: Cli, volume: str, keep: int = 24) -> backup.BackupReport:
    async def go(svc: VolumeService) -> backup.BackupReport:
        return await svc.backup_volume(volume, keep=keep)
    return cli.call(go)


def lose_redis(cli: Cli) -> None:
    async def flush(svc: VolumeService) -> None:
        await svc.r.flushdb()
    cli.call(flush)


def redis_keys(cli: Cli) -> int:
    async def size(svc: VolumeService) -> int:
        return await svc.r.dbsize()
    return cli.call(size)


def storage_url(cli: Cli) -> str:
    return cli.env["CHUNKFS_STORAGE"]


# --- restores, byte for byte ------------------------------------------------------------------


def test_a_snapshot_and_a_backup_restore_byte_for_byte_into_an_empty_redis(
        mounter: Mounter, cli: Cli) -> None:
    cli.create_volume("vol")
    m = mounter.mount("vol")
    populate(m.path)
    big = m.path / "d" / "e" / "big"
    fd = os.open(big, os.O_RDWR)  # a durable 4 KiB overwrite: an inline slice in Redis
    try:
        os.pwrite(fd, rand_bytes(4 * KiB, "page"), 5 * MiB + 100)
        os.fsync(fd)
        ino = os.fstat(fd).st_ino

        async def snapshot_and_backup(svc: VolumeService) -> tuple[str, str, int, int]:
            ns = (await svc.get_volume("vol")).id
            inline = await svc.r.hlen(Keys(ns).slices(ino))
            await svc.create_snapshot("vol", "snap")
            snap_ns = (await svc.get_snapshot("snap")).id
            report = await svc.backup_volume("vol")
            return svc.snapshot_url("snap"), report.url, inline, \
                await svc.r.hlen(Keys(snap_ns).slices(ino))

        snap_url, backup_url, inline, snap_inline = cli.call(snapshot_and_backup)
    finally:
        os.close(fd)
    assert inline >= 1 and snap_inline == inline, "the test needs an inline slice"
    expected = tree(m.path)
    mounter.umount(m)
    # `snapshot create` names its manifest on its last line
    out = cli.run("snapshot", "create", "vol", "snap2").stdout.strip().splitlines()
    assert out[-1] == f"{storage_url(cli)}/snapshots/snap2/manifest.json.gz"
    assert snap_url == f"{storage_url(cli)}/snapshots/snap/manifest.json.gz"
    assert backup_url.startswith(f"{storage_url(cli)}/backups/vol/")

    lose_redis(cli)
    assert redis_keys(cli) == 0
    nowhere = make_env(cli.env, CHUNKFS_META="redis://127.0.0.1:1/0")  # no Redis at all
    listing = Cli(nowhere).run("volume", "list", "--from", storage_url(cli), "--json")
    points = json.loads(listing.stdout)["restorable"]
    by_url = {p["url"]: p for p in points}
    assert {snap_url, backup_url} <= set(by_url)
    assert by_url[backup_url]["kind"] == "backup" and by_url[snap_url]["kind"] == "snapshot"
    assert by_url[backup_url]["files"] == by_url[snap_url]["files"] == 9  # hard link: one
    assert by_url[backup_url]["size_bytes"] > 9 * MiB and by_url[backup_url]["created"] > 0
    table = Cli(nowhere).run("volume", "list", "--from", storage_url(cli)).stdout
    assert "backup" in table and "snap2" in table

    for url, name in ((snap_url, "from-snap"), (backup_url, "from-backup")):
        out = cli.run("volume", "restore", url, name).stdout
        assert "verified" in out, out
        r = mounter.mount(name)
        assert tree(r.path) == expected, f"{name} differs from the volume it was made of"
        mounter.umount(r)
    assert cli.info("from-backup")["used_bytes"] == cli.info("from-snap")["used_bytes"]


def test_a_missing_or_corrupt_object_fails_the_restore_and_leaves_no_volume(
        mounter: Mounter, cli: Cli) -> None:
    cli.create_volume("vol")
    m = mounter.mount("vol")
    write_file(m.path / "a", rand_bytes(200 * KiB, "a"))
    write_file(m.path / "b", rand_bytes(5 * MiB, "b"))
    mounter.umount(m)
    url = run_backup(cli, "vol").url
    snap = cli.run("snapshot", "create", "vol", "s").stdout.strip().splitlines()[-1]

    async def objects(svc: VolumeService) -> dict[str, int]:
        return {k: n async for k, n, _ in svc.store.list("blocks/")}

    blocks = cli.call(objects)
    lose_redis(cli)
    victim = sorted(blocks)[0]
    body = cli.call(lambda svc: svc.store.get(victim))

    def restore_fails(source: str, *needles: str, code: int = 1) -> None:
        proc = cli.run("volume", "restore", source, "new", check=False)
        assert proc.returncode == code, proc.stdout + proc.stderr
        assert_one_line_error(proc, *needles)
        assert redis_keys(cli) == 0, "a failed restore left something in Redis"

    cli.call(lambda svc: svc.store.delete(victim))
    restore_fails(url, victim, "missing")
    restore_fails(snap, victim, "missing")
    flipped = bytes([body[0] ^ 1]) + body[1:]
    cli.call(lambda svc: svc.store.put(victim, flipped))
    restore_fails(url, victim, "corrupt")
    cli.call(lambda svc: svc.store.put(victim, body))  # repaired

    async def pages(svc: VolumeService) -> list[str]:
        return [k async for k, _, _ in svc.store.list("backups/vol/pages/")]

    page = cli.call(pages)[0]
    page_body = cli.call(lambda svc: svc.store.get(page))
    cli.call(lambda svc: svc.store.put(page, page_body[:-8] + b"garbage!"))
    restore_fails(url, page, "corrupt")
    cli.call(lambda svc: svc.store.delete(page))
    restore_fails(url, page, "missing")
    cli.call(lambda svc: svc.store.put(page, page_body))
    key = backup.split_manifest_url(url)[1]
    cli.call(lambda svc: svc.store.put(key, b"not gzip at all"))
    restore_fails(url, key, "corrupt")
    restore_fails(url.replace("/manifest.json.gz", "x/manifest.json.gz"), "not a manifest URL",
                  code=2)
    other = make_env(cli.env, CHUNKFS_STORAGE=storage_url(cli) + "-elsewhere")
    proc = Cli(other).run("volume", "restore", snap, "new", check=False)
    assert proc.returncode == 2 and "the manifest is under" in proc.stderr
    small = cli.run("volume", "restore", snap, "new", "--capacity", "1KiB", check=False)
    assert small.returncode == 2 and "smaller than" in small.stderr and redis_keys(cli) == 0

    cli.run("volume", "restore", snap, "new")  # the snapshot is intact: restores
    assert cli.volume_names() == ["new"]


# --- incremental backups, retention ----------------------------------------------------------


async def test_a_backup_after_a_small_change_writes_a_fraction_of_a_full_one(
        svc: VolumeService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backup, "_PAGES_PER_ROUND", 10)  # pages go out in many rounds
    info = await svc.create_volume("many", GiB)
    meta = meta_of(svc, info.id)
    files = {}
    for d in range(40):
        parent = (await meta.create(ROOT_INODE, f"d{d:02d}".encode(), stat.S_IFDIR | 0o755,
                                    0, 0)).ino
        for i in range(50):
            files[d, i] = await put_file(meta, parent, f"f{i:02d}".encode(),
                                         f"content {d} {i} ".encode() * 20)
    first = await svc.backup_volume("many", keep=2)
    assert first.files == 2041 and first.pages == first.pages_written >= 2041 // backup.PAGE_INODES

    async def page_objects() -> dict[str, int]:
        return {k: n async for k, n, _ in svc.store.list("backups/many/pages/")}

    before = await page_objects()
    assert len(before) == first.pages
    changed = b"changed after the first backup"
    await meta.commit(files[7, 7], size=len(changed), inline=changed)  # one file of 2000
    second = await svc.backup_volume("many", keep=2)
    assert second.files == 2041 and second.pages_written == 1, second
    assert second.bytes_written * 10 < first.bytes_written, (first, second)  # the manifest, mostly
    after = await page_objects()
    assert len(after) - len(before) == second.pages_written
    assert sum(after.values()) - sum(before.values()) <= second.bytes_written

    third = await svc.backup_volume("many", keep=2)  # nothing changed: no page written
    assert third.pages_written == 0 and third.expired == [first.id]
    assert await backup.backup_ids(svc.store, "many") == [second.id, third.id]
    remaining = await page_objects()
    assert len(remaining) == second.pages  # pages only the first backup named are gone
    details = await svc.volume_details("many")
    assert details.backups == [second.id, third.id]
    assert details.last_backup is not None and details.last_backup["url"] == third.url

    await svc.r.flushdb()
    restored, _ = await svc.restore_volume(backup.split_manifest_url(second.url)[1], "back")
    rmeta = meta_of(svc, restored.id)
    d07 = (await rmeta.lookup(ROOT_INODE, b"d07")).ino
    assert await read_inline(rmeta, d07, b"f07") == changed
    assert await read_inline(rmeta, d07, b"f08") == b"content 7 8 " * 20
    assert restored.used_inodes == 2041


async def test_a_second_backup_at_the_same_time_is_refused_and_a_restore_may_sit_beside_its_source(
        svc: VolumeService) -> None:
    await svc.create_volume("v", GiB)
    async with backup.backup_lock(svc.r, "v"):
        with pytest.raises(backup.BackupBusy):
            await svc.backup_volume("v")
    report = await svc.backup_volume("v")
    assert report.files == 1
    # into the Redis that still has the volume: under another name, once
    key = backup.split_manifest_url(report.url)[1]
    copy, _ = await svc.restore_volume(key, "v-copy")
    assert copy.id != (await svc.get_volume("v")).id and copy.used_inodes == 1
    with pytest.raises(VolumeExists):
        await svc.restore_volume(key, "v-copy")
    assert sorted(v.name for v in await svc.list_volumes()) == ["v", "v-copy"]


async def test_deleting_a_volume_deletes_its_backups(svc: VolumeService) -> None:
    info = await svc.create_volume("gone", GiB)
    await put_file(meta_of(svc, info.id), ROOT_INODE, b"x", b"y")
    await svc.backup_volume("gone")
    await svc.create_volume("stays", GiB)
    await svc.backup_volume("stays")
    await svc.delete_volume("gone")
    keys = [k async for k, _, _ in svc.store.list("backups/")]
    assert keys and all(k.startswith("backups/stays/") for k in keys)


# --- GC and backups ---------------------------------------------------------------------------


def test_gc_keeps_what_a_backup_needs_and_frees_what_only_expired_backups_held(
        mounter: Mounter, cli: Cli) -> None:
    cli.create_volume("vol")
    m = mounter.mount("vol")
    write_file(m.path / "old", rand_bytes(5 * MiB, "old"))
    write_file(m.path / "keep", rand_bytes(100 * KiB, "keep"))
    mounter.umount(m)

    async def objects(svc: VolumeService) -> set[str]:
        return {k async for k, _, _ in svc.store.list("blocks/")}

    everything = cli.call(objects)
    first = run_backup(cli, "vol", keep=1)
    m = mounter.mount("vol")
    os.unlink(m.path / "old")
    mounter.umount(m)
    cli.run("gc", "--grace", "0")
    assert cli.call(objects) == everything, "GC deleted blocks the backup needs"
    second = run_backup(cli, "vol", keep=1)
    assert second.expired == [first.id]
    cli.run("gc", "--grace", "0")
    left = cli.call(objects)
    assert left < everything and len(everything - left) >= 2  # "old"'s blocks went
    m = mounter.mount("vol")  # a mount's status shows the last backup
    status = wait_until(lambda: m.status_direct()["last_backup"], 15, what="last_backup")
    assert status["url"] == second.url and status["files"] == 2 and status["age_s"] >= 0
    mounter.umount(m)
    info = cli.info("vol")
    assert info["backups"] == [second.id] and info["last_backup"]["url"] == second.url
    lose_redis(cli)
    out = cli.run("volume", "restore", second.url, "back").stdout
    assert "verified" in out


async def test_gc_refuses_to_run_while_a_backup_names_a_page_that_is_missing(
        svc: VolumeService) -> None:
    from chunkfs.gc import GcRefused, collect_garbage

    info = await svc.create_volume("v", GiB)
    await put_file(meta_of(svc, info.id), ROOT_INODE, b"x", b"y")
    report = await svc.backup_volume("v")
    assert (await collect_garbage(svc.r, svc.store, grace=0)).manifests == 1
    page = [k async for k, _, _ in svc.store.list("backups/v/pages/")][0]
    await svc.store.delete(page)
    with pytest.raises(GcRefused, match=page):
        await collect_garbage(svc.r, svc.store, grace=0)
    await svc.store.delete(report.key)  # the broken backup removed: GC runs again
    assert (await collect_garbage(svc.r, svc.store, grace=0)).manifests == 0


async def test_an_unreadable_old_backup_keeps_every_page_until_retention_drops_it(
        svc: VolumeService) -> None:
    info = await svc.create_volume("v", GiB)
    meta = meta_of(svc, info.id)
    ino = await put_file(meta, ROOT_INODE, b"f", b"one")
    first = await svc.backup_volume("v", keep=3)
    await meta.commit(ino, size=3, inline=b"two")
    await svc.backup_volume("v", keep=3)
    await svc.store.put(first.key, b"rotten")

    async def pages() -> set[str]:
        return {k async for k, _, _ in svc.store.list("backups/v/pages/")}

    before = await pages()
    await meta.commit(ino, size=5, inline=b"three")
    third = await svc.backup_volume("v", keep=3)  # the rotten manifest fails nothing
    assert before <= await pages()  # its pages are unknown: none was deleted
    last = await svc.backup_volume("v", keep=1)  # the rotten one expires with the others
    assert last.expired[0] == first.id and await backup.backup_ids(svc.store, "v") == [last.id]
    assert len(await pages()) == last.pages and third.pages == last.pages


async def test_freezes_nest_so_a_backup_ending_does_not_thaw_a_snapshot_still_copying(
        svc: VolumeService) -> None:
    """A periodic backup and a snapshot may copy one volume at once: the first to finish
    must not let writers in while the other still copies."""
    from chunkfs.meta import namespace as nsops

    info = await svc.create_volume("v", GiB)
    vol = Keys(info.id).vol
    meta = meta_of(svc, info.id)
    await nsops.freeze(svc.r, info.id, "snapshot")
    await nsops.freeze(svc.r, info.id, "backup")
    await nsops.thaw(svc.r, info.id, "backup")
    waiting = asyncio.create_task(meta.create(ROOT_INODE, b"during", stat.S_IFREG | 0o644,
                                              0, 0))
    await asyncio.sleep(0.5)
    assert not waiting.done(), "one thaw ended both freezes: a writer got in"
    await nsops.thaw(svc.r, info.id, "snapshot")
    await asyncio.wait_for(waiting, 10)  # through once the last freezer thawed
    assert not [f for f in await svc.r.hkeys(vol) if f.startswith(b"frozen")]
    await svc.backup_volume("v")  # and a copy of the volume carries no freeze along
    snap = await svc.create_snapshot("v", "s")
    assert not [f for f in await svc.r.hkeys(Keys(snap.id).vol) if f.startswith(b"frozen")]
