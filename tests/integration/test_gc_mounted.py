"""GC next to live mounts: what an open file, a clone or a snapshot may still reference
is never deleted, whatever the grace period, while GC runs as often as it likes."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from pathlib import Path

from chunkfs.gc import collect_garbage
from chunkfs.volumes import VolumeService
from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures (see __all__)
from tests.integration.fs_fixtures import Cli, MiB, Mount, Mounter

# S3 times have whole seconds: an object becomes a candidate of `--grace 0` a second later
AGE = 1.1


def gc(cli: Cli) -> None:
    """In this process (see ``Cli.call``): a subprocess would flush our open files."""
    cli.call(lambda svc: collect_garbage(svc.r, svc.store, grace=0))


def fsck_clean(cli: Cli, name: str) -> None:
    out = cli.run("fsck", name, "--objects", check=False)
    assert out.returncode == 0, f"fsck {name}:\n{out.stdout}{out.stderr}"


def test_blocks_of_a_file_held_open_survive_gc_until_its_close(cli: Cli, mnt: Mount, volume: str) -> None:
    """The issue's repro: a full block is uploaded at once but referenced only at close."""
    data = os.urandom(4 * MiB + 4)
    with open(mnt / "log", "wb") as f:
        f.write(data)  # block 0 is full: it is uploaded now, committed at close
        time.sleep(AGE)
        gc(cli)
        gc(cli)
    fsck_clean(cli, volume)
    assert (mnt / "log").read_bytes() == data


def test_gc_in_a_loop_beside_writers_clones_and_snapshots(cli: Cli, mounter: Mounter, volume: str) -> None:
    """Writers with files held open, full rewrites, appends with fsync, deletions; clones
    and snapshots made and dropped; GC with no grace in a loop. Afterwards every file of
    every volume and snapshot is intact and reads back byte for byte."""
    src = mounter.mount(volume, options="buffer-size=16MiB")
    rng = random.Random(1234)
    stop = threading.Event()
    errors: list[str] = []
    stable = {f"stable{i}": os.urandom(rng.choice([3000, 2 * MiB, 5 * MiB])) for i in range(4)}
    for name, body in stable.items():
        (src / name).write_bytes(body)
    final: dict[str, bytes] = dict(stable)
    lock = threading.Lock()

    def guarded(fn):
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(f"{fn.__name__}: {type(exc).__name__}: {exc}")
                stop.set()
        return run

    @guarded
    def appender() -> None:  # a log held open across many GC runs, fsynced now and then
        body = bytearray()
        with open(src / "journal", "wb") as f:
            while not stop.is_set():
                chunk = os.urandom(rng.choice([100, 4096, 1 * MiB]))
                f.write(chunk)
                body += chunk
                if rng.random() < 0.3:
                    f.flush()
                    os.fsync(f.fileno())
                time.sleep(0.05)
        with lock:
            final["journal"] = bytes(body)

    @guarded
    def rewriter() -> None:  # whole-file rewrites and deletions
        n = 0
        while not stop.is_set():
            name = f"rw{n % 3}"
            body = os.urandom(rng.choice([1000, 4 * MiB + 17, 6 * MiB]))
            if rng.random() < 0.2 and (src / name).exists():
                (src / name).unlink()
                with lock:
                    final.pop(name, None)
            else:
                with open(src / name, "wb") as f:
                    f.write(body)
                with lock:
                    final[name] = body
            n += 1
            time.sleep(0.1)

    @guarded
    def collector() -> None:
        while not stop.is_set():
            gc(cli)

    copies: list[tuple[str, str]] = []  # (kind, name) made during the run and kept

    async def copy_round(svc: VolumeService, n: int) -> None:
        await svc.create_snapshot(volume, f"snap{n}")
        await svc.create_volume(f"clone{n}", 1 << 30, source_volume=volume)
        copies.extend([("snapshot", f"snap{n}"), ("volume", f"clone{n}")])
        if n % 2 == 0:  # drop some again: their blocks may go, the others' must stay
            await svc.delete_snapshot(f"snap{n - 1}")
            await svc.delete_volume(f"clone{n - 1}")
            copies.remove(("snapshot", f"snap{n - 1}"))
            copies.remove(("volume", f"clone{n - 1}"))

    @guarded
    def copier() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            cli.call(lambda svc: copy_round(svc, n))  # noqa: B023 - called at once
            time.sleep(0.5)

    threads = [threading.Thread(target=t, daemon=True)
               for t in (appender, rewriter, collector, copier)]
    for t in threads:
        t.start()
    stop.wait(25)
    stop.set()
    for t in threads:
        t.join(120)
    assert not errors, errors
    time.sleep(AGE)
    gc(cli)

    fsck_clean(cli, volume)
    for name, body in final.items():
        assert hashlib.sha256((src / name).read_bytes()).digest() == hashlib.sha256(body).digest(), name
    assert sorted(p.name for p in Path(src).iterdir() if not p.name.startswith(".")) == sorted(final)
    assert copies
    for _kind, name in copies:
        fsck_clean(cli, name)
    # one clone and one snapshot (through a clone of it) read back completely on a cold cache
    clone = next(name for kind, name in copies if kind == "volume")
    snap = next(name for kind, name in copies if kind == "snapshot")
    cli.run("volume", "create", "from-snap", "--capacity", "1GiB", "--from-snapshot", snap)
    for name in (clone, "from-snap"):
        m = mounter.mount(name)
        for entry in Path(m).iterdir():
            if entry.name.startswith("."):
                continue
            data = entry.read_bytes()
            if entry.name in stable:
                assert data == stable[entry.name], f"{name}/{entry.name}"
        mounter.umount(m)
