"""Application workloads: what real programs do to a volume, the same code for every
filesystem (run through ``python -m bench.workloads '<json>'`` like the others).

- ``git``: clone a local repository (``git clone file://...``: the pack transport, as from
  a server, so the clone writes a pack, indexes it and checks out every file), then ``git
  status`` with cold caches and again warm, then ``rm -rf`` of the clone.
- ``untar``: ``tar -xf`` of an archive of the same tree, then ``syncfs`` of the volume.
- ``sqlite``: one row inserted per transaction, each ``COMMIT`` durable (``synchronous=
  FULL``), with a rollback journal (``journal_mode=DELETE``, SQLite's default) or in WAL
  mode.
- ``append``: a log growing by ``record`` bytes per ``write``, each followed by ``fsync``
  (or ``fdatasync``): a service's log (120 B lines) or a database's write-ahead log (4 KiB).
- ``pages``: random 4 KiB page overwrites, each followed by ``fsync``, in a large file
  (a database's data file).

The source tree, its repository and its archive are built once per run on local disk
(``prepare``), from a seed: nothing is fetched from anywhere. Every workload verifies what
it wrote or read (untimed), so that a broken filesystem or a broken workload fails loudly
instead of reporting a figure; where verification or set-up would cost as much as the
work itself, it is a phase of its own (``git verify``, ``untar verify``, ``pages fill``),
which bench.run runs outside the measured window. The caller deletes what a workload
leaves behind.
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.workloads import KiB, MiB, Pattern, drop_caches, timed, write_all

BINARY_SHARE = 0.03  # share of files that are incompressible "assets"
SCRIPT_SHARE = 0.05  # share of files checked in as executable
MAX_DEPTH = 5


# --------------------------------------------------------------------------- helpers


def git_env(home: str | os.PathLike[str]) -> dict[str, str]:
    """An environment in which git reads no system or user configuration, so that the
    same git runs the same way whoever starts the benchmark."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update({
        "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
        "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost",
        "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
        "LC_ALL": "C",
    })  # fmt: skip
    return env


def _run(args: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> str:
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-2:]
        raise RuntimeError(f"{' '.join(args[:3])} failed ({proc.returncode}): {' | '.join(tail)}")
    return proc.stdout


def syncfs(path: str | os.PathLike[str]) -> None:
    """syncfs(2) on the filesystem holding path (Python's os has no wrapper)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}", str(path))
    finally:
        os.close(fd)


def _latencies(lat_ns: list[int]) -> dict[str, float]:
    s = sorted(lat_ns)
    n = len(s)
    if not n:
        return {}
    return {"p50_ms": s[n // 2] / 1e6, "p99_ms": s[min(n - 1, int(n * 0.99))] / 1e6, "max_ms": s[-1] / 1e6}


def _count_files(root: str) -> tuple[int, int]:
    files = total = 0
    for dirpath, dirs, names in os.walk(root):
        if ".git" in dirs:
            dirs.remove(".git")
        for name in names:
            files += 1
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return files, total


def _check_sample(expected_root: str, actual_root: str, rel_paths: list[str], every: int = 25) -> None:
    """Compare every ``every``-th file (and the last one) byte for byte."""
    for rel in rel_paths[::every] + rel_paths[-1:]:
        with open(os.path.join(expected_root, rel), "rb") as f:
            want = f.read()
        with open(os.path.join(actual_root, rel), "rb") as f:
            got = f.read()
        if got != want:
            raise RuntimeError(f"{rel}: content differs ({len(got)} bytes, expected {len(want)})")


# --------------------------------------------------------------------------- the source tree


def tree_layout(files: int, seed: int) -> list[tuple[str, int, str]]:
    """(relative path, size, kind) of every file of a source-like tree: a few hundred
    directories up to MAX_DEPTH deep, sizes log-normal around 2.5 KiB (a long tail up to
    256 KiB), mostly text, a few binary assets and executable scripts. Pure and
    deterministic in (files, seed)."""
    rng = random.Random(seed)
    dirs = [""]
    depth = {"": 0}
    for i in range(max(1, files // 15)):
        parent = rng.choice([d for d in dirs[-200:] if depth[d] < MAX_DEPTH] or [""])
        name = f"{parent}/d{i:04d}" if parent else f"d{i:04d}"
        dirs.append(name)
        depth[name] = depth[parent] + 1
    out = []
    for i in range(files):
        d = rng.choice(dirs)
        r = rng.random()
        kind = "binary" if r < BINARY_SHARE else "script" if r < BINARY_SHARE + SCRIPT_SHARE else "text"
        size = int(min(256 * KiB, max(64, rng.lognormvariate(7.8, 1.0))))
        ext = {"binary": ".bin", "script": ".sh", "text": ".py"}[kind]
        name = f"f{i:05d}{ext}"
        out.append((f"{d}/{name}" if d else name, size, kind))
    return out


def _corpus(rng: random.Random) -> list[bytes]:
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz_", k=rng.randint(2, 10))) for _ in range(2000)]
    lines = []
    for _ in range(4096):
        indent = b"    " * rng.randint(0, 3)
        lines.append(indent + " ".join(rng.choices(words, k=rng.randint(3, 12))).encode() + b"\n")
    return lines


def write_tree(root: str | os.PathLike[str], files: int, seed: int, generation: int = 0) -> list[str]:
    """Create the tree of ``tree_layout`` under root; ``generation`` > 0 rewrites one file
    in 20 (a later commit). Returns the relative paths."""
    layout = tree_layout(files, seed)
    rng = random.Random(seed * 1000 + generation)
    corpus = _corpus(random.Random(seed))
    root = Path(root)
    paths = []
    for i, (rel, size, kind) in enumerate(layout):
        paths.append(rel)
        if generation and rng.random() >= 0.05:
            continue
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if kind == "binary":
            data = rng.randbytes(size)
        else:
            head = f"# {rel} generation {generation} ({i})\n".encode()
            body = b"".join(rng.choices(corpus, k=size // 40 + 1))
            data = (head + body)[:size]
        p.write_bytes(data)
        os.chmod(p, 0o755 if kind == "script" else 0o644)
    return paths


def prepare(scratch: str, files: int, seed: int, **_: Any) -> dict[str, Any]:
    """Build, under scratch: ``src/`` (the tree, in a git repository with three commits,
    repacked), ``src.git`` (a bare clone of it: what the workload clones) and ``src.tar``
    (an archive of the tree without .git). Idempotent per (files, seed)."""
    base = Path(scratch)
    src = base / "src"
    shutil.rmtree(base, ignore_errors=True)
    src.mkdir(parents=True)
    env = git_env(base)
    t0 = time.perf_counter()
    _run(["git", "init", "-q", "-b", "main", str(src)], env)
    for gen in range(3):
        paths = write_tree(src, files, seed, gen)
        _run(["git", "add", "-A"], env, str(src))
        _run(["git", "commit", "-q", "-m", f"generation {gen}"], env, str(src))
    _run(["git", "repack", "-adq"], env, str(src))
    _run(["git", "clone", "-q", "--bare", str(src), str(base / "src.git")], env)
    _run(["tar", "-cf", str(base / "src.tar"), "--exclude=.git", "--sort=name", "-C", str(src), "."])
    count, size = _count_files(str(src))
    (base / "paths.txt").write_text("\n".join(paths) + "\n")
    pack = sum(p.stat().st_size for p in (base / "src.git" / "objects" / "pack").iterdir())
    return {
        "files": count, "bytes": size, "pack_bytes": pack, "tar_bytes": (base / "src.tar").stat().st_size,
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def _paths(scratch: str) -> list[str]:
    return (Path(scratch) / "paths.txt").read_text().split()


# --------------------------------------------------------------------------- git


def git(phase: str, scratch: str, dest: str, drop: bool = True, **_: Any) -> dict[str, Any]:
    """One phase of the repository workload on dest:

    - ``clone``: ``git clone file://scratch/src.git dest`` (timed);
    - ``verify``: the file count and a sample of contents match the source (untimed);
    - ``status``: ``git status --porcelain`` with cold caches (dropped first unless
      ``drop`` is false), then again warm; both must report a clean tree;
    - ``remove``: ``rm -rf dest``.
    """
    env = git_env(scratch)
    paths = _paths(scratch)
    n = len(paths)
    if phase == "clone":
        if os.path.exists(dest):
            raise RuntimeError(f"{dest} exists")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        url = "file://" + str(Path(scratch, "src.git").resolve())
        return {"files": n, "clone": timed(n, lambda: _run(["git", "clone", "-q", url, dest], env))}
    if phase == "verify":
        count, size = _count_files(dest)
        if count != n:
            raise RuntimeError(f"clone has {count} files, expected {n}")
        _check_sample(str(Path(scratch, "src")), dest, paths)
        return {"files": count, "bytes": size, "verified": True}
    if phase == "status":
        if drop:
            drop_caches()
        out: list[str] = []

        def status() -> None:
            out.append(_run(["git", "status", "--porcelain"], env, dest))

        res = {"files": n, "status_cold": timed(n, status), "status_warm": timed(n, status)}
        if any(o.strip() for o in out):
            raise RuntimeError(f"git status of a fresh clone is not clean: {out[0][:200]!r}")
        return res
    if phase == "remove":
        res = {"files": n, "remove": timed(n, lambda: _run(["rm", "-rf", "--", dest]))}
        if os.path.lexists(dest):
            raise RuntimeError(f"{dest} still exists after rm -rf")
        return res
    raise ValueError(f"unknown git phase {phase!r}")


# --------------------------------------------------------------------------- tar


def untar(phase: str, scratch: str, dest: str, **_: Any) -> dict[str, Any]:
    """``extract``: ``tar -xf scratch/src.tar`` into dest, then syncfs (seconds of each and
    in total); ``verify``: the file count and a sample of contents match the source."""
    paths = _paths(scratch)
    if phase == "extract":
        os.makedirs(dest)
        t0 = time.perf_counter()
        _run(["tar", "-xf", str(Path(scratch, "src.tar")), "-C", dest])
        t1 = time.perf_counter()
        syncfs(dest)
        t2 = time.perf_counter()
        total = t2 - t0
        return {
            "files": len(paths), "extract_s": t1 - t0, "sync_s": t2 - t1, "seconds": total,
            "files_s": len(paths) / total if total > 0 else float("inf"),
        }  # fmt: skip
    if phase == "verify":
        count, size = _count_files(dest)
        if count != len(paths):
            raise RuntimeError(f"extracted {count} files, expected {len(paths)}")
        _check_sample(str(Path(scratch, "src")), dest, paths)
        return {"files": count, "bytes": size, "verified": True}
    raise ValueError(f"unknown untar phase {phase!r}")


# --------------------------------------------------------------------------- sqlite


def sqlite(path: str, mode: str, n: int, row_bytes: int = 200, seed: int = 1, **_: Any) -> dict[str, Any]:
    """``n`` transactions of one INSERT each (and an UPDATE of an earlier row every
    tenth, so that pages in the middle change too), each COMMIT durable; commits/s and
    commit latency. ``mode``: "delete" (rollback journal) or "wal". Verifies the row
    count and ``PRAGMA integrity_check``; the caller deletes the database."""
    if mode not in ("delete", "wal"):
        raise ValueError(f"unknown sqlite journal mode {mode!r}")
    rng = random.Random(seed)
    payloads = [rng.randbytes(row_bytes) for _ in range(64)]
    con = sqlite3.connect(path, isolation_level=None)
    try:
        got = con.execute(f"PRAGMA journal_mode={mode}").fetchone()[0]
        if got.lower() != mode:
            raise RuntimeError(f"sqlite refused journal_mode={mode} (got {got})")
        con.execute("PRAGMA synchronous=FULL")
        con.execute("CREATE TABLE kv (id INTEGER PRIMARY KEY, k TEXT UNIQUE, v BLOB, n INTEGER)")
        lat = [0] * n
        clock = time.perf_counter_ns
        t0 = clock()
        for i in range(n):
            s = clock()
            con.execute("BEGIN")
            con.execute("INSERT INTO kv (k, v, n) VALUES (?, ?, 0)", (f"key-{i:08d}", payloads[i % 64]))
            if i % 10 == 9:
                con.execute("UPDATE kv SET n = n + 1 WHERE id = ?", (rng.randrange(1, i + 1),))
            con.execute("COMMIT")
            lat[i] = clock() - s
        total = (clock() - t0) / 1e9
        rows = con.execute("SELECT count(*) FROM kv").fetchone()[0]
        check = con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()
    if rows != n or check != "ok":
        raise RuntimeError(f"sqlite ({mode}): {rows} rows (expected {n}), integrity_check: {check}")
    return {"mode": mode, "ops": n, "seconds": total, "ops_s": n / total, **_latencies(lat)}


# --------------------------------------------------------------------------- logs


def _records(n: int, size: int, seed: int) -> list[bytes]:
    """n distinct log records of ``size`` bytes: an index, random hex, a newline (so a
    120 B record is a log line)."""
    if size < 16:
        raise ValueError(f"record size {size} is below 16 bytes")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        head = f"{i:010d} ".encode()
        out.append(head + rng.randbytes(size // 2).hex().encode()[: size - len(head) - 1] + b"\n")
    return out


def append(
    path: str, n: int, record: int, sync: str = "fsync", seed: int = 1, salt: int = 1, **_: Any
) -> dict[str, Any]:
    """Append ``n`` records of ``record`` bytes to a new file (O_APPEND), each followed by
    ``fsync`` or ``fdatasync``; appends/s and latency. Verifies the file (the caller
    deletes it)."""
    sync_fn = {"fsync": os.fsync, "fdatasync": os.fdatasync}[sync]
    records = _records(n, record, seed * 7919 + salt)
    lat = [0] * n
    clock = time.perf_counter_ns
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
    try:
        t0 = clock()
        for i, rec in enumerate(records):
            s = clock()
            write_all(fd, memoryview(rec))
            sync_fn(fd)
            lat[i] = clock() - s
        total = (clock() - t0) / 1e9
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        data = f.read()
    if data != b"".join(records):
        raise RuntimeError(f"{path}: {len(data)} bytes read back differ from the {n * record} appended")
    return {"ops": n, "record": record, "sync": sync, "seconds": total, "ops_s": n / total, **_latencies(lat)}


# --------------------------------------------------------------------------- pages


def pages(
    phase: str, path: str, size: int, n: int, seed: int, salt: int, page: int = 4 * KiB, rseed: int = 11,
    **_: Any,
) -> dict[str, Any]:  # fmt: skip
    """A database's data file. ``fill``: create a ``size``-byte file (1 MiB writes, fsync).
    ``overwrite``: ``n`` random ``page``-aligned pages overwritten, each followed by fsync
    (overwrites/s and latency); then every overwritten page (its last version) and one
    untouched page are verified. The caller deletes the file."""
    pat = Pattern(seed, salt)
    if phase == "fill":
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for i in range(size // MiB):
                write_all(fd, pat.chunk(i))
            os.fsync(fd)
        finally:
            os.close(fd)
        return {"bytes": size, "seconds": time.perf_counter() - t0}
    if phase != "overwrite":
        raise ValueError(f"unknown pages phase {phase!r}")
    rng = random.Random(rseed)
    offsets = [rng.randrange(size // page) * page for _ in range(n)]
    touched = set(offsets)
    untouched = next(o for o in range(0, size, page) if o not in touched)
    untouched_data = pat.expect(untouched, page)
    writes = []
    for k, off in enumerate(offsets):
        head = f"page {off} version {k} ".encode()
        writes.append((off, head + rng.randbytes(page - len(head))))
    lat = [0] * n
    clock = time.perf_counter_ns
    fd = os.open(path, os.O_RDWR)
    try:
        if os.fstat(fd).st_size != size:
            raise RuntimeError(f"{path} is {os.fstat(fd).st_size} bytes, expected {size}")
        t0 = clock()
        for k, (off, data) in enumerate(writes):
            s = clock()
            if os.pwrite(fd, data, off) != page:
                raise RuntimeError(f"short pwrite at {off}")
            os.fsync(fd)
            lat[k] = clock() - s
        total = (clock() - t0) / 1e9
        for off, data in dict(writes).items():
            if os.pread(fd, page, off) != data:
                raise RuntimeError(f"page at {off} reads back wrong")
        if os.pread(fd, page, untouched) != untouched_data:
            raise RuntimeError(f"untouched page at {untouched} changed")
    finally:
        os.close(fd)
    return {"ops": n, "file_size": size, "seconds": total, "ops_s": n / total, **_latencies(lat)}


OPS = {
    "apps_prepare": prepare,
    "git": git,
    "untar": untar,
    "sqlite": sqlite,
    "append": append,
    "pages": pages,
}
