"""Concurrency: several processes on one mount, and two mounts (two nodes) of one volume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import (
    MiB,
    Mount,
    Mounter,
    file_sha256,
    rand_bytes,
    sha256,
    wait_until,
    write_file,
)

WRITER = r"""
import os, random, sys
root, w, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
d = os.path.join(root, f"w{w}")
os.makedirs(d, exist_ok=True)
for i in range(n):
    data = random.Random(f"{w}-{i}").randbytes(size)
    rng = random.Random(i)
    with open(os.path.join(d, f"f{i}"), "wb") as f:
        pos = 0
        while pos < size:  # uneven write sizes
            step = rng.randint(1, 300_000)
            f.write(data[pos:pos + step]); pos += step
    open(os.path.join(d, f"f{i}.done"), "wb").close()
"""

READER = r"""
import hashlib, os, random, sys, time
root, writers, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
todo = {(w, i) for w in range(writers) for i in range(n)}
deadline = time.time() + 120
bad = []
while todo and time.time() < deadline:
    for w, i in sorted(todo):
        p = os.path.join(root, f"w{w}", f"f{i}")
        if not os.path.exists(p + ".done"):
            continue
        with open(p, "rb") as f:
            got = hashlib.sha256(f.read()).hexdigest()
        want = hashlib.sha256(random.Random(f"{w}-{i}").randbytes(size)).hexdigest()
        if got != want:
            bad.append(p)
        todo.discard((w, i))
    time.sleep(0.02)
print(f"bad={bad} missing={sorted(todo)}")
sys.exit(1 if bad or todo else 0)
"""


def test_processes_write_and_read_different_files_concurrently(mnt: Mount) -> None:
    writers, n, size = 4, 3, 1_500_000
    root = str(mnt.path)
    procs = [subprocess.Popen([sys.executable, "-c", READER, root, str(writers), str(n), str(size)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    procs += [subprocess.Popen([sys.executable, "-c", WRITER, root, str(w), str(n), str(size)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for w in range(writers)]
    outputs = [(p.args[2:4], p.wait(timeout=180), p.stdout.read() if p.stdout else "") for p in procs]
    failed = [o for o in outputs if o[1] != 0]
    assert not failed, failed
    assert mnt.status()["errors"] == 0


def test_processes_write_disjoint_ranges_of_one_file(mnt: Mount) -> None:
    """Parallel downloaders and databases write one file from several processes with pwrite."""
    p = mnt / "shared"
    parts, part = 6, 700_000
    with open(p, "wb") as f:
        f.truncate(parts * part)
    code = (
        "import os,random,sys\n"
        "k,part=int(sys.argv[2]),int(sys.argv[3])\n"
        "fd=os.open(sys.argv[1], os.O_WRONLY)\n"
        "data=random.Random(k).randbytes(part)\n"
        "for off in range(0, part, 65536):\n"
        "    os.pwrite(fd, data[off:off+65536], k*part+off)\n"
        "os.fsync(fd); os.close(fd)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(p), str(k), str(part)])
             for k in range(parts)]
    assert [q.wait(timeout=120) for q in procs] == [0] * parts
    expected = b"".join(rand_bytes(part, k) for k in range(parts))
    assert file_sha256(p) == sha256(expected)


def _same(path: Path, data: bytes, what: str) -> None:
    got = Path(path).read_bytes()
    assert len(got) == len(data), f"{what}: read {len(got)} bytes, the file has {len(data)}"
    assert got == data, f"{what}: same length, different bytes"


def test_two_mounts_see_each_others_closed_files(mounter: Mounter, volume: str) -> None:
    a = mounter.mount(volume)
    b = mounter.mount(volume)  # another node: its own mount point and cache dir
    assert a.cache_dir != b.cache_dir
    v1 = rand_bytes(3 * MiB, "v1")
    write_file(a / "f", v1)
    _same(b / "f", v1, "b reads a new file written on a")
    # B rewrites it (shorter), A reads it again: A must not serve its cached copy
    v2 = rand_bytes(MiB + 5, "v2")
    write_file(b / "f", v2)
    _same(a / "f", v2, "a reads the file rewritten (shorter) on b")
    # same size, different content
    v3 = rand_bytes(MiB + 5, "v3")
    write_file(b / "f", v3)
    _same(a / "f", v3, "a reads the file rewritten (same size) on b")
    # longer again, written on A, read at once on B which knows the old (shorter) version
    v4 = rand_bytes(5 * MiB, "v4")
    write_file(a / "f", v4)
    _same(b / "f", v4, "b reads the file rewritten (longer) on a")
    # appends on one node are seen by the other
    with open(b / "f", "ab") as f:
        f.write(b"appended on b")
    _same(a / "f", v4 + b"appended on b", "a reads the file appended to on b")
    # namespace changes
    (a / "dir").mkdir()
    write_file(a / "dir" / "small", b"tiny inline file")
    assert (b / "dir" / "small").read_bytes() == b"tiny inline file"
    os.rename(b / "dir" / "small", b / "dir" / "renamed")
    wait_until(lambda: os.listdir(a / "dir") == ["renamed"], 5, what="the rename to show on a")
    assert (a / "dir" / "renamed").read_bytes() == b"tiny inline file"
    os.unlink(a / "dir" / "renamed")
    wait_until(lambda: not (b / "dir" / "renamed").exists(), 5, what="the unlink to show on b")
    assert a.status()["errors"] == 0 and b.status()["errors"] == 0


def test_two_mounts_writers_of_different_files(mounter: Mounter, volume: str) -> None:
    a = mounter.mount(volume)
    b = mounter.mount(volume)
    procs = []
    for m, tag in ((a, "a"), (b, "b")):
        code = (
            "import os,random,sys\n"
            "root, tag = sys.argv[1], sys.argv[2]\n"
            "for i in range(4):\n"
            "    with open(os.path.join(root, f'{tag}{i}'), 'wb') as f:\n"
            "        f.write(random.Random(f'{tag}{i}').randbytes(1_000_000))\n"
            "        f.flush(); os.fsync(f.fileno())\n"
        )
        procs.append(subprocess.Popen([sys.executable, "-c", code, str(m.path), tag]))
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    names = sorted(f"{t}{i}" for t in "ab" for i in range(4))
    for m in (a, b):
        assert sorted(os.listdir(m.path)) == names
        for name in names:
            assert file_sha256(Path(m.path, name)) == sha256(rand_bytes(1_000_000, name))


def test_open_sees_another_nodes_change_made_within_the_attribute_timeout(
        mounter: Mounter, volume: str) -> None:
    """Close-to-open holds however long the kernel may cache attributes: an open on A
    after B changed the file sees B's size and bytes, even while A's kernel still had
    the old attributes cached (found by fsx, two-mounts seed 5)."""
    a = mounter.mount(volume, options="attr-timeout=60,entry-timeout=60")
    b = mounter.mount(volume)
    write_file(a / "f", b"v1")
    assert (a / "f").stat().st_size == 2  # A's kernel now caches size 2, for a minute
    write_file(b / "f", b"rewritten on b")
    _same(a / "f", b"rewritten on b", "a opens the file b rewrote (longer)")
    os.truncate(b / "f", 3)
    with open(a / "f", "rb") as f:
        assert os.fstat(f.fileno()).st_size == 3, "fstat after open shows the cached size"
        assert f.read() == b"rew"
    with open(b / "f", "ab") as f:
        f.write(b"+appended")
    _same(a / "f", b"rew+appended", "a opens the file b appended to")


DIRECT_WRITER = r"""
import hashlib, os, random, sys
BS = 4 << 20
path, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
model = bytearray(3 * BS)
os.ftruncate(fd, 3 * BS)
def write(off, n):
    data = rng.randbytes(n)
    assert os.pwrite(fd, data, off) == n
    model.extend(bytes(max(0, off + n - len(model))))
    model[off:off + n] = data
write(rng.randint(0, 1000), 3 << 20)           # blocks 0 and 1: 6 MiB of partial buffers
write(BS + rng.randint(0, 1000), 3 << 20)
write(2 * BS + 1537826, 1770)                  # block 2: a small dirty buffer
write(2 * BS + rng.randint(1 << 20, BS - 1), rng.randint(2 << 20, 3 << 20))  # one write, 2 -> 3
os.fsync(fd)
os.close(fd)
print(hashlib.sha256(model).hexdigest(), len(model), flush=True)
"""


class LostWrite(AssertionError):
    """Bytes of an acknowledged write are missing, or the write never returned."""


def test_one_direct_write_sent_as_parallel_requests_keeps_every_byte(
        mounter: Mounter, volume: str) -> None:
    m = mounter.mount(volume, options="buffer-size=8MiB,io-timeout=20")
    for seed in range(4):
        path = m / f"direct{seed}"
        try:
            proc = subprocess.run([sys.executable, "-c", DIRECT_WRITER, str(path), str(seed)],
                                  capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            mounter.kill(m)  # the writer sits in the kernel until its mount goes away
            raise LostWrite(f"seed {seed}: the O_DIRECT writer was still blocked after 60 s "
                            f"(dirty data: none left to upload)") from None
        assert proc.returncode == 0, proc.stderr
        digest, size = proc.stdout.split()
        assert path.stat().st_size == int(size)
        if file_sha256(path) != digest:
            raise LostWrite(f"seed {seed}: the file differs from what was written")
    m = mounter.remount(m, cache_dir=mounter.new_dir("cache"))
