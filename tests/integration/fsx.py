"""fsx: a randomized file-operation tester (the driver process).

A seeded generator picks file operations (writes aligned and not, across 4 MiB block
boundaries, far past the end; small random preads, direct reads; truncates up and down
into holes and into the middle of blocks; mmap reads and writes with msync;
copy_file_range; fsync and fdatasync; close and reopen; several files and handles at
once, on one or two mounts) and applies each to the files on the chunkfs mount(s) and
to a twin file on local disk, the model. After every step it compares the outcome
(bytes, byte counts, errno), the size of every open file, and the bytes around the
range the step touched, read past the page cache; at ``verify`` and ``remount`` steps,
whole files. The pytest side (``test_fsx.py``) mounts, remounts on a wiped cache,
and shrinks a failing sequence to a short one.

This file is stdlib only and runs as its own process (``python fsx.py SPEC.json``):
an mmap read that hits an I/O error raises SIGBUS, which must kill the driver, not
pytest; a step stuck in the kernel must not stall the test process either. The driver
holds no file of the mount when it asks for a remount.

Protocol: one JSON object per line on stdout.
  {"ev": "step", "i": N, "op": {...}}        before step N (the op log, as it runs)
  {"ev": "remount"}                           all files closed; waits for "go" on stdin
  {"ev": "fail", "i": N, "kind": K, "msg": M} and exit status 1
  {"ev": "done", "steps": N}                  and exit status 0
Ops are JSON objects; a step that does not apply in the current state (a handle that is
not open, a file open on the other mount) is skipped on both sides, so every
subsequence of a log is a valid log: that is what shrinking relies on.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

KiB = 1024
MiB = 1024 * KiB
BS = 4 * MiB  # chunkfs's block size (fixed; chunkfs/volumes.py DEFAULT_BLOCK_SIZE)
MAX_SIZE = 3 * BS + 512 * KiB  # a few blocks: every boundary case, little data
PAGE = mmap.PAGESIZE
WINDOW = 8 * KiB  # bytes checked on each side of the range a step touched

Op = dict[str, Any]


class Failure(Exception):
    def __init__(self, kind: str, msg: str) -> None:
        super().__init__(msg)
        self.kind = kind
        self.msg = msg


# --------------------------------------------------------------------------- describing


def describe(op: Op) -> str:
    """One readable line per op (the op log printed on failure)."""
    kind = op["op"]
    h = f"h{op['h']}" if op.get("h") is not None else ""
    if kind == "open":
        flags = "".join(f"|{f}" for f in op.get("flags", []))
        return f"open {h} = f{op['f']} on mount {op.get('m', 0)} (O_RDWR|O_CREAT{flags})"
    if kind in ("write", "mwrite"):
        what = "zeros" if op.get("zero") else f"data seed {op['seed']}"
        return f"{kind} {h} off={op['off']} len={op['len']} ({what}){_where(op['off'], op['len'])}"
    if kind in ("read", "mread"):
        direct = " O_DIRECT" if op.get("direct") else ""
        return f"{kind} {h} off={op['off']} len={op['len']}{direct}{_where(op['off'], op['len'])}"
    if kind == "trunc":
        via = h if op.get("h") is not None else f"path f{op['f']} on mount {op.get('m', 0)}"
        return f"truncate {via} to {op['size']}{_where(op['size'], 0)}"
    if kind == "copy":
        return (f"copy_file_range h{op['h']}@{op['off']} -> h{op['h2']}@{op['off2']} "
                f"len={op['len']}")
    if kind == "sync":
        return f"{'fdatasync' if op.get('data') else 'fsync'} {h}"
    if kind == "drop":
        return f"fadvise DONTNEED {h} (drop its page cache)"
    if kind == "verify":
        return f"verify f{op['f']} on mount {op.get('m', 0)}"
    return json.dumps(op)


def _where(off: int, n: int) -> str:
    first, last = off // BS, max(off, off + n - 1) // BS
    inner = off - first * BS
    return f" [block {first}+{inner}" + (f"..block {last}]" if last != first else "]")


# --------------------------------------------------------------------------- state


@dataclass
class Slot:
    f: int
    m: int
    fd: int
    model_fd: int
    flags: tuple[str, ...]


class Runner:
    """Applies ops to the real files and to the model, and checks after each."""

    def __init__(self, mounts: list[str], subdir: str, model_dir: str, files: int,
                 slots: int, *, enospc: bool = False) -> None:
        self.mounts = mounts
        self.enospc = enospc  # a small volume: a write may fail with ENOSPC
        self.subdir = subdir
        self.model_dir = model_dir
        self.nfiles = files
        self.slots: list[Slot | None] = [None] * slots
        self.step = 0
        for m in mounts:
            os.makedirs(os.path.join(m, subdir), exist_ok=True)
        os.makedirs(model_dir, exist_ok=True)
        global ORIGIN
        ORIGIN = self.origin

    def origin(self, needle: bytes) -> str:
        """Where the model holds ``needle`` (stale, shifted or another file's bytes)."""
        if len(needle) < 16 or needle == bytes(len(needle)):
            return ""
        found = []
        for f in range(self.nfiles):
            try:
                with open(self.model_path(f), "rb") as fh:
                    data = fh.read()
            except FileNotFoundError:
                continue
            at = data.find(needle)
            if at >= 0:
                found.append(f"f{f}'s bytes at {at}")
        return f" = {', '.join(found)} in the model" if found else " found nowhere in the model"

    # ---- paths and state ----------------------------------------------------------
    def real_path(self, f: int, m: int) -> str:
        return os.path.join(self.mounts[m], self.subdir, f"f{f}")

    def model_path(self, f: int) -> str:
        return os.path.join(self.model_dir, f"f{f}")

    def model_size(self, f: int) -> int:
        try:
            return os.stat(self.model_path(f)).st_size
        except FileNotFoundError:
            return -1

    def mount_of(self, f: int) -> int | None:
        """The mount on which ``f`` has open handles (at most one: close-to-open)."""
        for s in self.slots:
            if s is not None and s.f == f:
                return s.m
        return None

    def slot_of(self, f: int) -> Slot | None:
        for s in self.slots:
            if s is not None and s.f == f:
                return s
        return None

    def close_all(self) -> None:
        for h, s in enumerate(self.slots):
            if s is not None:
                self.apply({"op": "close", "h": h})

    # ---- applying ops -------------------------------------------------------------
    def apply(self, op: Op) -> bool:
        """Run ``op`` on both sides; False if it does not apply now (skipped)."""
        kind = op["op"]
        handler = getattr(self, f"_op_{kind}", None)
        if handler is None:
            raise Failure("bad-op", f"unknown op {kind!r}")
        return handler(op) is not False

    def _slot(self, op: Op, key: str = "h") -> Slot | None:
        h = op.get(key)
        if h is None or not 0 <= h < len(self.slots):
            return None
        return self.slots[h]

    def _op_open(self, op: Op) -> bool:
        h, f, m = op["h"], op["f"], op.get("m", 0)
        if self.slots[h] is not None or m >= len(self.mounts) or self.mount_of(f) not in (None, m):
            return False
        flags = tuple(op.get("flags", ()))
        base = os.O_RDWR | os.O_CREAT
        base |= os.O_TRUNC if "trunc" in flags else 0
        base |= os.O_APPEND if "append" in flags else 0
        real = outcome(lambda: os.open(self.real_path(f, m),
                                       base | (os.O_DIRECT if "direct" in flags else 0), 0o644))
        model = outcome(lambda: os.open(self.model_path(f), base, 0o644))
        if isinstance(real, int) and isinstance(model, int):
            self.slots[h] = Slot(f, m, real, model, flags)
            self._check_range(self.slots[h], 0, 0)
            return True
        for fd in (real, model):
            if isinstance(fd, int):
                os.close(fd)
        same(real if isinstance(real, OSError) else "opened",
             model if isinstance(model, OSError) else "opened", "open")
        return True

    def _op_close(self, op: Op) -> bool:
        s = self._slot(op)
        if s is None:
            return False
        self.slots[op["h"]] = None
        real = outcome(lambda: os.close(s.fd))
        os.close(s.model_fd)
        if real is not None:
            raise Failure("errno", f"close: {_fmt(real)} (the file's data could not be stored)")
        return True

    def _op_write(self, op: Op) -> bool:
        s = self._slot(op)
        if s is None:
            return False
        data = payload(op)
        before = os.fstat(s.model_fd).st_size
        real = outcome(lambda: os.pwrite(s.fd, data, op["off"]))
        if self._refused(real):
            return True
        if self.enospc and isinstance(real, int) and real < len(data):
            data = data[:real]  # the volume filled up during a write split into requests
        model = outcome(lambda: os.pwrite(s.model_fd, data, op["off"]))
        same(real, model, "pwrite")
        start = before if "append" in s.flags else op["off"]
        self._check_range(s, start, len(data))
        return True

    def _op_read(self, op: Op) -> bool:
        s = self._slot(op)
        if s is None:
            return False
        if op.get("direct"):
            with direct(s.fd):
                real = outcome(lambda: os.pread(s.fd, op["len"], op["off"]))
        else:
            real = outcome(lambda: os.pread(s.fd, op["len"], op["off"]))
        model = outcome(lambda: os.pread(s.model_fd, op["len"], op["off"]))
        same(real, model, "pread", base=op["off"])
        return True

    def _map_range(self, s: Slot, op: Op) -> tuple[int, int] | None:
        size = os.fstat(s.model_fd).st_size
        off, end = op["off"], min(op["off"] + op["len"], size)
        if off >= end:
            return None
        return off - off % PAGE, end

    def _op_mread(self, op: Op) -> bool:
        s = self._slot(op)
        rng = self._map_range(s, op) if s is not None else None
        if s is None or rng is None:
            return False
        start, end = rng
        expected = os.pread(s.model_fd, end - op["off"], op["off"])
        got = outcome(lambda: _mmap_read(s.fd, start, end, op["off"]))
        same(got, expected, "mmap read", base=op["off"])
        return True

    def _op_mwrite(self, op: Op) -> bool:
        s = self._slot(op)
        rng = self._map_range(s, op) if s is not None else None
        if s is None or rng is None:
            return False
        start, end = rng
        data = payload(op)[:end - op["off"]]
        real = outcome(lambda: _mmap_write(s.fd, start, end, op["off"], data))
        _mmap_write(s.model_fd, start, end, op["off"], data)
        same(real, None, "mmap write + msync")
        self._check_range(s, op["off"], len(data))
        return True

    def _op_trunc(self, op: Op) -> bool:
        size = op["size"]
        s = self._slot(op)
        if op.get("h") is not None:
            if s is None:
                return False
            f = s.f
            real = outcome(lambda: os.ftruncate(s.fd, size))
        else:
            f, m = op["f"], op.get("m", 0)
            if m >= len(self.mounts) or self.mount_of(f) not in (None, m):
                return False
            real = outcome(lambda: os.truncate(self.real_path(f, m), size))
        before = self.model_size(f)
        model = outcome(lambda: os.truncate(self.model_path(f), size))
        same(real, model, "truncate")
        if s is None:
            s = self.slot_of(f)
        if s is not None and before >= 0:
            self._check_range(s, min(before, size), abs(before - size))
        elif before >= 0:
            self._check_file(f, op.get("m", 0), around=[(min(before, size), abs(before - size))])
        return True

    def _op_copy(self, op: Op) -> bool:
        src, dst = self._slot(op), self._slot(op, "h2")
        if src is None or dst is None or src.m != dst.m:
            return False
        real = outcome(lambda: os.copy_file_range(src.fd, dst.fd, op["len"], op["off"], op["off2"]))
        if self._refused(real):
            return True
        # a copy may legitimately be short: the model copies what the mount copied
        n = real if isinstance(real, int) else op["len"]
        model = outcome(lambda: os.copy_file_range(src.model_fd, dst.model_fd, n, op["off"],
                                                   op["off2"]))
        same(real, model, "copy_file_range")
        if isinstance(real, int):
            self._check_range(dst, op["off2"], real)
        return True

    def _refused(self, real: Any) -> bool:
        """A write refused for lack of space changed nothing: legal on a small volume
        (and only for writes: committing and freeing space must never say ENOSPC)."""
        if not (isinstance(real, OSError) and real.errno == errno.ENOSPC):
            return False
        if not self.enospc:
            raise Failure("errno", "ENOSPC on a volume with room to spare")
        return True

    def _op_sync(self, op: Op) -> bool:
        s = self._slot(op)
        if s is None:
            return False
        call = os.fdatasync if op.get("data") else os.fsync
        real = outcome(lambda: call(s.fd))
        same(real, None, call.__name__)
        return True

    def _op_drop(self, op: Op) -> bool:
        s = self._slot(op)
        if s is None:
            return False
        os.posix_fadvise(s.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True

    def _op_verify(self, op: Op) -> bool:
        f = op["f"]
        self._check_file(f, op.get("m", 0))
        return True

    # ---- checks -------------------------------------------------------------------
    def check_sizes(self) -> None:
        for h, s in enumerate(self.slots):
            if s is None:
                continue
            real = outcome(lambda s=s: os.fstat(s.fd).st_size)
            model = os.fstat(s.model_fd).st_size
            if real != model:
                raise Failure("size", f"h{h} (f{s.f}): size {_fmt(real)} on the mount, "
                                      f"{model} in the model")

    def _check_range(self, s: Slot, off: int, n: int) -> None:
        """The bytes around [off, off+n) (and the size), read past the page cache."""
        size = os.fstat(s.model_fd).st_size
        off = min(off, size)  # a range past the end: check the end (and that nothing follows)
        lo = max(0, off - WINDOW)
        hi = min(size, off + n) + WINDOW
        with direct(s.fd):
            got = outcome(lambda: os.pread(s.fd, hi - lo, lo))
        expected = os.pread(s.model_fd, hi - lo, lo)
        try:
            same(got, expected, "check read (O_DIRECT)", base=lo)
        except Failure as exc:  # is it a race that settles, or what the file now holds?
            time.sleep(0.5)
            with direct(s.fd):
                again = outcome(lambda: os.pread(s.fd, hi - lo, lo))
            later = ("right" if again == expected else "the same wrong" if again == got
                     else "other wrong")
            raise Failure(exc.kind, f"{exc.msg}; read again 0.5 s later: {later} bytes") from None

    def _check_file(self, f: int, m: int, around: list[tuple[int, int]] | None = None) -> None:
        """The whole file (or the ranges ``around``) through its open handle or a new one."""
        s = self.slot_of(f)
        if s is not None:
            if around is None:
                self._check_range(s, 0, os.fstat(s.model_fd).st_size)
            else:
                for off, n in around:
                    self._check_range(s, off, n)
            return
        if m >= len(self.mounts):
            return
        try:
            model = open(self.model_path(f), "rb").read()  # noqa: SIM115 - small file
        except FileNotFoundError:
            model = None
        real_fd = outcome(lambda: os.open(self.real_path(f, m), os.O_RDONLY | os.O_DIRECT))
        if model is None or not isinstance(real_fd, int):
            if isinstance(real_fd, int):
                os.close(real_fd)
            missing = OSError(errno.ENOENT, "No such file or directory")
            same(real_fd if isinstance(real_fd, OSError) else "exists",
                 missing if model is None else "exists", f"open f{f} on mount {m} to verify")
            return
        try:
            size = outcome(lambda: os.fstat(real_fd).st_size)
            if size != len(model):
                raise Failure("size", f"f{f} on mount {m}: size {_fmt(size)}, model {len(model)}")
            ranges = around or [(0, len(model))]
            for off, n in ranges:
                lo, hi = max(0, off - WINDOW), min(len(model), off + n + WINDOW)
                got = read_all(real_fd, lo, hi - lo)
                same(got, model[lo:hi], f"verify f{f} on mount {m}", base=lo)
        finally:
            os.close(real_fd)

    def verify_all(self) -> None:
        for f in range(self.nfiles):
            for m in range(len(self.mounts)):
                self._check_file(f, m)


# --------------------------------------------------------------------------- helpers


def outcome(fn: Any) -> Any:
    """The value of ``fn()``, or the OSError it raised (compared like a value)."""
    try:
        return fn()
    except OSError as exc:
        return exc


def _fmt(value: Any) -> str:
    if isinstance(value, OSError):
        return f"error {errno.errorcode.get(value.errno or 0, value.errno)} ({value.strerror})"
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    return repr(value)


def same(real: Any, model: Any, what: str, base: int = 0) -> None:
    if isinstance(real, OSError) or isinstance(model, OSError):
        r = real.errno if isinstance(real, OSError) else None
        m = model.errno if isinstance(model, OSError) else None
        if r != m:
            raise Failure("errno", f"{what}: mount gave {_fmt(real)}, model gave {_fmt(model)}")
        return
    if isinstance(real, bytes) and isinstance(model, bytes):
        if real != model:
            raise Failure("data", f"{what}: {diff(real, model, base)}")
        return
    if real != model:
        raise Failure("result", f"{what}: mount returned {_fmt(real)}, model {_fmt(model)}")


def diff(got: bytes, want: bytes, base: int) -> str:
    """Where two byte strings first differ, and what the mount returned there."""
    if len(got) != len(want):
        prefix = f"{len(got)} bytes instead of {len(want)}"
        if got != want[:len(got)]:
            prefix += "; " + diff(got[:len(want)], want[:len(got)], base)
        return prefix
    first = next(i for i in range(len(got)) if got[i] != want[i])
    last = len(got) - next(i for i in range(len(got)) if got[-1 - i] != want[-1 - i])
    span = got[first:last]
    looks = "zeros" if span == bytes(len(span)) else "data"
    if looks == "data" and want[first:last] == bytes(last - first):
        looks = "data where the model has zeros (a hole)"
    if looks != "zeros" and ORIGIN is not None:
        looks += ORIGIN(span[:64])
    return (f"bytes differ at file offsets {base + first}..{base + last} "
            f"({last - first} bytes; the mount returned {looks}){_where(base + first, last - first)}")


# set by the Runner: where else the model holds some bytes (" = f1's bytes at 123")
ORIGIN: Any = None


class direct:
    """Temporarily O_DIRECT on an fd: reads reach the filesystem, not the page cache."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.flags = 0

    def __enter__(self) -> None:
        self.flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, self.flags | os.O_DIRECT)

    def __exit__(self, *exc: object) -> None:
        fcntl.fcntl(self.fd, fcntl.F_SETFL, self.flags)


def read_all(fd: int, off: int, n: int) -> Any:
    out = bytearray()
    while len(out) < n:
        try:
            chunk = os.pread(fd, min(MiB, n - len(out)), off + len(out))
        except OSError as exc:
            return exc
        if not chunk:
            break
        out += chunk
    return bytes(out)


def payload(op: Op) -> bytes:
    if op.get("zero"):
        return bytes(op["len"])
    return random.Random(op["seed"]).randbytes(op["len"])


def _mmap_read(fd: int, start: int, end: int, off: int) -> bytes:
    with mmap.mmap(fd, end - start, offset=start) as mm:
        return bytes(mm[off - start:end - start])


def _mmap_write(fd: int, start: int, end: int, off: int, data: bytes) -> None:
    with mmap.mmap(fd, end - start, offset=start) as mm:
        mm[off - start:off - start + len(data)] = data
        mm.flush()


# --------------------------------------------------------------------------- generating


WEIGHTS = {"open": 10, "close": 7, "write": 26, "read": 14, "mread": 4, "mwrite": 4,
           "trunc": 8, "copy": 4, "sync": 6, "drop": 3, "verify": 4}


class Generator:
    """Seeded choice of the next op, aimed at boundaries: it looks at the model's sizes."""

    def __init__(self, seed: int, runner: Runner) -> None:
        self.rng = random.Random(seed)
        self.r = runner
        self.n = 0

    def next(self) -> Op:
        self.n += 1
        open_slots = [h for h, s in enumerate(self.r.slots) if s is not None]
        free = [h for h, s in enumerate(self.r.slots) if s is None]
        kinds = [k for k in WEIGHTS if open_slots or k in ("open", "trunc", "verify")]
        if self.r.enospc:  # page writeback into a hole has no write() that could refuse it
            kinds = [k for k in kinds if k != "mwrite"]
        if not free:
            kinds.remove("open")
        kind = self.rng.choices(kinds, [WEIGHTS[k] for k in kinds])[0]
        if kind == "open":
            return self._open(free)
        if kind in ("trunc", "verify") and (not open_slots or self.rng.random() < 0.3):
            f = self.rng.randrange(self.r.nfiles)
            m = self.r.mount_of(f)
            m = self.rng.randrange(len(self.r.mounts)) if m is None else m
            if kind == "verify":
                return {"op": "verify", "f": f, "m": m}
            return {"op": "trunc", "h": None, "f": f, "m": m, "size": self._size(f)}
        h = self.rng.choice(open_slots)
        s = self.r.slots[h]
        assert s is not None
        size = max(0, os.fstat(s.model_fd).st_size)
        if kind == "verify":
            return {"op": "verify", "f": s.f, "m": s.m}
        if kind == "close":
            return {"op": "close", "h": h}
        if kind == "sync":
            return {"op": "sync", "h": h, "data": self.rng.random() < 0.5}
        if kind == "drop":
            return {"op": "drop", "h": h}
        if kind == "trunc":
            return {"op": "trunc", "h": h, "size": self._size(s.f)}
        if kind in ("write", "mwrite"):
            off, n = self._write_range(size) if kind == "write" else self._read_range(size)
            op = {"op": kind, "h": h, "off": off, "len": n, "seed": self.rng.randrange(1 << 30)}
            if self.rng.random() < 0.1:
                op["zero"] = True
            return op
        if kind in ("read", "mread"):
            off, n = self._read_range(size)
            op = {"op": kind, "h": h, "off": off, "len": n}
            if kind == "read" and self.rng.random() < 0.5:
                op["direct"] = True
            return op
        # copy
        h2 = self.rng.choice([x for x in open_slots if self.r.slots[x].m == s.m])  # type: ignore[union-attr]
        dst = self.r.slots[h2]
        assert dst is not None
        off, n = self._read_range(size)
        n = self.rng.choice([n, self.rng.randint(1, 2 * MiB)])
        return {"op": "copy", "h": h, "h2": h2, "off": off, "len": n,
                "off2": self._write_range(os.fstat(dst.model_fd).st_size)[0]}

    def _open(self, free: list[int]) -> Op:
        f = self.rng.randrange(self.r.nfiles)
        m = self.r.mount_of(f)
        m = self.rng.randrange(len(self.r.mounts)) if m is None else m
        flags = []
        if self.rng.random() < 0.1:
            flags.append("trunc")
        if self.rng.random() < 0.08:
            flags.append("append")
        if self.rng.random() < 0.15:
            flags.append("direct")
        return {"op": "open", "h": self.rng.choice(free), "f": f, "m": m, "flags": flags}

    def _len(self) -> int:
        pick = self.rng.random()
        if pick < 0.25:
            return self.rng.randint(1, 64)
        if pick < 0.55:
            return self.rng.randint(1, 64 * KiB)
        if pick < 0.8:
            return PAGE * self.rng.randint(1, 64)
        if pick < 0.95:
            return self.rng.randint(64 * KiB, MiB)
        return self.rng.randint(MiB, BS + MiB // 2)

    def _boundary(self) -> int:
        """An offset near something interesting: a block edge, a page, the inline limit."""
        k = self.rng.randint(0, 3)
        return max(0, k * BS + self.rng.choice([0, -1, 1, -PAGE, PAGE, -self.rng.randint(1, 64 * KiB),
                                                self.rng.randint(1, 64 * KiB)]))

    def _write_range(self, size: int) -> tuple[int, int]:
        n = self._len()
        pick = self.rng.random()
        if pick < 0.2:
            off = size  # append
        elif pick < 0.45 and size:
            off = self.rng.randrange(size)  # overwrite inside
        elif pick < 0.6:
            off = PAGE * self.rng.randrange(max(1, (size + 2 * MiB) // PAGE))  # aligned
            n = max(PAGE, n - n % PAGE)
        elif pick < 0.8:
            off = self._boundary()  # across a block boundary
        elif pick < 0.9:
            off = size + self.rng.randint(1, 5 * MiB)  # far past the end: a hole
        else:
            off = self.rng.randint(0, 20 * KiB)  # around the inline threshold
        if off + n > MAX_SIZE:
            off = max(0, MAX_SIZE - n - self.rng.randint(0, 64 * KiB))
            n = min(n, MAX_SIZE - off)
        return off, n

    def _read_range(self, size: int) -> tuple[int, int]:
        pick = self.rng.random()
        if pick < 0.4:  # small random reads: the random-reader path of the mount
            return self.rng.randint(0, max(0, size + 64 * KiB)), self.rng.choice([1, 512, PAGE, 2 * PAGE])
        if pick < 0.6:
            return self._boundary(), self.rng.randint(1, 256 * KiB)
        if pick < 0.75:  # at and past the end
            return max(0, size - self.rng.randint(0, 2 * PAGE)), self.rng.randint(1, 3 * PAGE)
        off = self.rng.randint(0, max(0, size))
        return off, self._len()

    def _size(self, f: int) -> int:
        size = max(0, self.r.model_size(f))
        pick = self.rng.random()
        if pick < 0.1:
            return 0
        if pick < 0.3:
            return min(MAX_SIZE, self._boundary())  # at / around a block edge
        if pick < 0.5:  # into the middle of a block
            return min(MAX_SIZE, self.rng.randrange(4) * BS + self.rng.randint(1, BS - 1))
        if pick < 0.7:  # up, leaving a hole
            return min(MAX_SIZE, size + self.rng.randint(1, 6 * MiB))
        if pick < 0.85 and size:
            return self.rng.randrange(size)  # down
        return self.rng.randint(0, 24 * KiB)  # around the inline threshold


# --------------------------------------------------------------------------- main


def emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def remount(runner: Runner) -> None:
    """Close everything, let the test remount on a wiped cache, then check every file."""
    runner.close_all()
    emit(ev="remount")
    if sys.stdin.readline().strip() != "go":
        raise Failure("harness", "remount was not confirmed")
    runner.verify_all()


def run(spec: dict[str, Any]) -> int:
    runner = Runner(spec["mounts"], spec["dir"], spec["model"], spec.get("files", 3),
                    spec.get("slots", 4), enospc=spec.get("enospc", False))
    gen = Generator(spec["seed"], runner) if spec.get("ops") is None else None
    ops: list[Op] | None = spec.get("ops")
    count = spec.get("count", 100) if ops is None else len(ops)
    remount_every = spec.get("remount_every", 0)
    i = 0
    try:
        while i < count:
            if gen is not None:
                op = ({"op": "remount"} if remount_every and i and i % remount_every == 0
                      else gen.next())
            else:
                assert ops is not None
                op = ops[i]
            emit(ev="step", i=i, op=op)
            runner.step = i
            if op["op"] == "remount":
                remount(runner)
            elif runner.apply(op):
                runner.check_sizes()
            i += 1
        if spec.get("final_remount", True):
            emit(ev="step", i=i, op={"op": "remount"})
            remount(runner)
            i += 1
    except Failure as exc:
        emit(ev="fail", i=i, kind=exc.kind, msg=exc.msg)
        return 1
    except Exception as exc:  # noqa: BLE001 - a bug in the tester, reported as such
        emit(ev="fail", i=i, kind="harness", msg=f"the tester itself failed: {exc!r}")
        raise
    emit(ev="done", steps=i)
    return 0


if __name__ == "__main__":
    with open(sys.argv[1]) as spec_file:
        sys.exit(run(json.load(spec_file)))
