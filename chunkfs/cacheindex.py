"""The shared index of a node's block cache: one SQLite file that every mount process
using the cache directory accounts in, so that the directory stays under one bound.

Why SQLite: the mounts of a node are separate processes (one per volume) that share
blocks by content address; they need one LRU order, one byte count and one owner per
file being written or deleted, all updated atomically and surviving a SIGKILL at any
instruction. A SQLite database in WAL mode gives exactly that: short ``BEGIN
IMMEDIATE`` transactions serialise the accounting across processes, triggers keep the
totals equal to the sum of the rows, and a killed process's transaction rolls back.

Everything here is blocking: ``chunkfs.cache`` calls it from one thread of its own,
never from the event loop.

Schema (``index.db`` in the cache directory):

    entries(name, size, atime, volume, state, owner)
        one row per block file the directory holds or is about to hold or drop; ``size``
        is its bytes on disk (block + CRC trailer), ``atime`` the last use (unix s; the
        LRU order across all volumes), ``volume`` the volume that used it last (the
        per-volume occupancy shown by status: each file counts for exactly one volume),
        ``state`` READY (the file is in place), WRITING (``owner`` reserved the bytes and
        is writing it) or DYING (``owner`` is unlinking it)
    totals(bytes, n)          sum and count of all rows, kept by triggers
    volumes(volume, bytes, n) the same per volume
    meta(k, v)                ``built``: the index was built from a scan of the directory

Protocol (the invariant: the bytes of the files under ``blocks/`` and ``tmp/`` never
exceed the sum of the rows, and that sum stays within the limit of whoever added to it):
- A put inserts a WRITING row (which reserves the bytes, and makes every other process
  refuse the same name: single flight across processes) only if the total stays within
  its limit; otherwise it first marks least-recently-used READY rows DYING, unlinks their
  files and deletes their rows, then tries again. Only then is the file written (tmp +
  rename), and its row becomes READY.
- Each process holds an exclusive ``flock`` on ``owners/<token>`` for its lifetime; the
  kernel drops it when the process dies, however it dies. A WRITING or DYING row whose
  owner's lock can be taken belongs to a dead process and is recovered: a WRITING row
  whose file is in place with its size becomes READY, anything else is unlinked and its
  row deleted; the dead owner's temporary files are removed.
- The first process to open the index when no other owner is alive reconciles it with
  the directory (rows without files are dropped, files without rows are adopted): this
  covers a power loss, where the directory and the index may each have lost their last
  changes. So does ``reconcile`` after the directory was deleted under a running mount.
- Uses of a block are recorded in memory and written in batches (LRU order across
  processes lags by at most the batch interval; within a process it is exact, since every
  reservation writes the pending batch first).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum

log = logging.getLogger(__name__)

READY, WRITING, DYING = 0, 1, 2
WAL_LIMIT = 1 << 20
SQLITE_FULL = 13

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries(
    name TEXT PRIMARY KEY, size INTEGER NOT NULL, atime REAL NOT NULL,
    volume TEXT NOT NULL, state INTEGER NOT NULL, owner TEXT);
CREATE INDEX IF NOT EXISTS entries_lru ON entries(state, atime);
CREATE INDEX IF NOT EXISTS entries_vol ON entries(volume, state, atime);
CREATE INDEX IF NOT EXISTS entries_owner ON entries(owner) WHERE owner IS NOT NULL;
CREATE TABLE IF NOT EXISTS totals(k INTEGER PRIMARY KEY CHECK (k = 0),
    bytes INTEGER NOT NULL, n INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES (0, 0, 0);
CREATE TABLE IF NOT EXISTS volumes(volume TEXT PRIMARY KEY, bytes INTEGER NOT NULL,
    n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v TEXT);
CREATE TRIGGER IF NOT EXISTS entries_ins AFTER INSERT ON entries BEGIN
    UPDATE totals SET bytes = bytes + NEW.size, n = n + 1;
    INSERT OR IGNORE INTO volumes VALUES (NEW.volume, 0, 0);
    UPDATE volumes SET bytes = bytes + NEW.size, n = n + 1 WHERE volume = NEW.volume;
END;
CREATE TRIGGER IF NOT EXISTS entries_del AFTER DELETE ON entries BEGIN
    UPDATE totals SET bytes = bytes - OLD.size, n = n - 1;
    UPDATE volumes SET bytes = bytes - OLD.size, n = n - 1 WHERE volume = OLD.volume;
    DELETE FROM volumes WHERE volume = OLD.volume AND n = 0;
END;
CREATE TRIGGER IF NOT EXISTS entries_upd AFTER UPDATE OF volume, size ON entries
WHEN OLD.volume != NEW.volume OR OLD.size != NEW.size BEGIN
    UPDATE totals SET bytes = bytes - OLD.size + NEW.size;
    UPDATE volumes SET bytes = bytes - OLD.size, n = n - 1 WHERE volume = OLD.volume;
    INSERT OR IGNORE INTO volumes VALUES (NEW.volume, 0, 0);
    UPDATE volumes SET bytes = bytes + NEW.size, n = n + 1 WHERE volume = NEW.volume;
    DELETE FROM volumes WHERE volume = OLD.volume AND n = 0;
END;
"""


class Reserved(Enum):
    OK = "ok"            # a WRITING row is ours: write the file, then ``commit``
    EXISTS = "exists"    # the block is cached already
    BUSY = "busy"        # another put of it (here or in another process) is in flight
    FULL = "full"        # no room within the limit (reservations of others hold it)


@dataclass
class Totals:
    bytes: int = 0
    entries: int = 0
    volume_bytes: int = 0
    volume_entries: int = 0


def private_dir(path: str) -> None:
    """The cache holds the blocks of every volume that used it: only its owner may read
    it (a pod's user on the node, or another tenant's process, must not). A directory we
    own is tightened to 0700 whatever made it; everything in it is created 0600."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid == os.geteuid() and st.st_mode & 0o077:
        os.chmod(path, 0o700)


def _private_file(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    st = os.fstat(fd)
    if st.st_uid == os.geteuid() and st.st_mode & 0o077:
        os.fchmod(fd, 0o600)
    return fd


class CacheIndex:
    """This process's handle on the shared index of the cache directory ``root``."""

    def __init__(self, root: str, volume: str) -> None:
        self.root = root
        self.volume = volume
        self.blocks = os.path.join(root, "blocks")
        self.tmp = os.path.join(root, "tmp")
        self.owners = os.path.join(root, "owners")
        self.db_path = os.path.join(root, "index.db")
        self.token = ""
        self.totals = Totals()
        self.reconciles = 0
        self.recovered = 0
        self.evicted = 0  # files this process evicted
        self._conn: sqlite3.Connection | None = None
        self._db_id: tuple[int, int] | None = None
        self._owner_fd: int | None = None
        self._lock = threading.Lock()  # one thread at a time on the connection
        self._alive: dict[str, float] = {}  # owner token -> when it was last seen alive

    def path(self, name: str) -> str:
        return os.path.join(self.blocks, name[:2], name)

    def tmp_path(self, name: str) -> str:
        return os.path.join(self.tmp, f"{name}.{self.token}.{secrets.token_hex(4)}")

    # ---- opening ---------------------------------------------------------------------
    def open(self) -> bool:
        """Open (or create) the index; True if it was rebuilt from the directory."""
        with self._lock:
            return self._open()

    def _open(self) -> bool:
        self._close()
        private_dir(self.root)
        for sub in (self.blocks, self.tmp, self.owners):
            os.makedirs(sub, mode=0o700, exist_ok=True)
        self._claim_owner()
        lock_fd = _private_file(os.path.join(self.root, "index.lock"))
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)  # one opener builds or repairs at a time
            try:
                conn = self._connect()
            except sqlite3.OperationalError:
                raise
            except sqlite3.DatabaseError:  # not a database (any more): start a new one
                log.warning("cache index was unreadable: rebuilding it from the directory")
                self._unlink_db()
                conn = self._connect()
            st = os.stat(self.db_path)
            self._conn, self._db_id = conn, (st.st_dev, st.st_ino)
            built = conn.execute("SELECT v FROM meta WHERE k = 'built'").fetchone()
            alone = not self._others_alive()
            if built is None or alone:
                self._reconcile()
                with self._txn() as c:
                    c.execute("INSERT OR REPLACE INTO meta VALUES ('built', ?)", (str(time.time()),))
            else:
                self._recover()
        finally:
            os.close(lock_fd)
        self._read_totals()
        return built is None or alone

    def _connect(self) -> sqlite3.Connection:
        os.close(_private_file(self.db_path))  # 0600 before SQLite creates it (and its WAL)
        conn = sqlite3.connect(self.db_path, timeout=10.0, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # a power loss may lose the last transactions (the first opener afterwards
            # reconciles with the directory) but never corrupts; a small, reused WAL
            # keeps working on a disk that filled up
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA wal_autocheckpoint=64")
            conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
            conn.executescript(_SCHEMA)
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def _unlink_db(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.db_path + suffix)

    def _claim_owner(self) -> None:
        if self._owner_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._owner_fd)
        self.token = secrets.token_hex(8)
        fd = _private_file(os.path.join(self.owners, self.token))
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._owner_fd = fd

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._close()
            if self._owner_fd is not None:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.owners, self.token))
                os.close(self._owner_fd)
                self._owner_fd = None

    def _current(self) -> sqlite3.Connection:
        """The connection, reopened if the directory (and the index in it) was deleted or
        replaced under us; a reopened index is rebuilt from what the directory holds."""
        try:
            st = os.stat(self.db_path)
            same = self._conn is not None and (st.st_dev, st.st_ino) == self._db_id
        except FileNotFoundError:
            same = False
        if not same or not os.path.exists(os.path.join(self.owners, self.token)):
            log.info("cache index gone (directory deleted?): reopening it")
            self._open()
        assert self._conn is not None
        return self._conn

    def reset(self) -> None:
        """Start a new index after a corrupt one (``sqlite3.DatabaseError``)."""
        with self._lock:
            self._close()
            self._unlink_db()
            log.warning("cache index was unreadable: rebuilt from the directory")
            self._open()

    @contextlib.contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # (also when COMMIT itself failed: a full disk)
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    def _read_totals(self) -> Totals:
        assert self._conn is not None
        total, n = self._conn.execute("SELECT bytes, n FROM totals").fetchone()
        row = self._conn.execute("SELECT bytes, n FROM volumes WHERE volume = ?",
                                 (self.volume,)).fetchone() or (0, 0)
        self.totals = Totals(total, n, row[0], row[1])
        return self.totals

    # ---- owners ----------------------------------------------------------------------
    def _owner_alive(self, token: str | None) -> bool:
        if not token:
            return False
        if token == self.token:
            return True
        seen = self._alive.get(token)
        if seen is not None and time.monotonic() - seen < 1.0:
            return True
        try:
            fd = os.open(os.path.join(self.owners, token), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                self._alive[token] = time.monotonic()
                return True
            raise
        finally:
            os.close(fd)
        return False

    def _others_alive(self) -> bool:
        return any(self._owner_alive(e.name) for e in os.scandir(self.owners)
                   if e.name != self.token)

    # ---- recovery --------------------------------------------------------------------
    def recover(self) -> int:
        """Recover the rows and temporary files of owners that died; how many rows."""
        with self._lock:
            self._current()
            n = self._recover()
            self._read_totals()
            return n

    def _recover(self) -> int:
        assert self._conn is not None
        owners = [o for (o,) in self._conn.execute(
            "SELECT DISTINCT owner FROM entries WHERE owner IS NOT NULL")]
        dead = [o for o in owners if not self._owner_alive(o)]
        fixed = 0
        for owner in dead:
            with self._txn() as c:
                rows = c.execute("SELECT name, size, state FROM entries WHERE owner = ?",
                                 (owner,)).fetchall()
                for name, size, state in rows:
                    fixed += 1
                    self._settle_dead_row(c, name, size, state)
        self._sweep_owners()
        if fixed:
            self.recovered += fixed
            log.info("cache rows of dead mounts recovered", extra={"rows": fixed})
        return fixed

    def _settle_dead_row(self, c: sqlite3.Connection, name: str, size: int, state: int) -> None:
        path = self.path(name)
        if state == WRITING:
            with contextlib.suppress(OSError):
                if os.stat(path).st_size == size:
                    c.execute("UPDATE entries SET state = ?, owner = NULL WHERE name = ?",
                              (READY, name))
                    return
        with contextlib.suppress(OSError):
            os.unlink(path)
        c.execute("DELETE FROM entries WHERE name = ?", (name,))

    def _sweep_owners(self) -> None:
        """Remove the temporary files and lock files of owners that are gone."""
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.tmp):
                parts = entry.name.rsplit(".", 2)
                if len(parts) == 3 and self._owner_alive(parts[1]):
                    continue
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.owners):
                if entry.name != self.token and not self._owner_alive(entry.name):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    def reconcile(self) -> None:
        """Make the index say what the directory holds (after a wipe, or on request)."""
        with self._lock:
            self._current()
            self._reconcile()
            self._read_totals()

    def _reconcile(self) -> None:
        self._recover()
        on_disk: dict[str, tuple[int, float]] = {}
        for sub in os.scandir(self.blocks):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(sub.path):
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    on_disk[entry.name] = (st.st_size, st.st_mtime)
        with self._txn() as c:
            rows = {name: (size, state) for name, size, state in
                    c.execute("SELECT name, size, state FROM entries")}
            for name, (size, state) in rows.items():
                if state != READY:
                    continue  # a live owner's: it settles it
                disk = on_disk.get(name)
                if disk is None:
                    c.execute("DELETE FROM entries WHERE name = ?", (name,))
                elif disk[0] != size:
                    c.execute("UPDATE entries SET size = ? WHERE name = ?", (disk[0], name))
            c.executemany(
                "INSERT INTO entries VALUES (?, ?, ?, ?, ?, NULL)",
                [(name, size, mtime, self.volume, READY)
                 for name, (size, mtime) in on_disk.items() if name not in rows])
        self.reconciles += 1

    # ---- uses ------------------------------------------------------------------------
    def touch(self, uses: Sequence[tuple[str, float]]) -> Totals:
        """Record uses (name, when) of READY files by this volume; refresh the totals."""
        with self._lock:
            self._current()
            if uses:
                with self._txn() as c:
                    self._touch(c, uses)
            return self._read_totals()

    def _touch(self, c: sqlite3.Connection, uses: Sequence[tuple[str, float]]) -> None:
        c.executemany("UPDATE entries SET atime = ?, volume = ? WHERE name = ? AND state = ?",
                      [(when, self.volume, name, READY) for name, when in uses])

    # ---- puts ------------------------------------------------------------------------
    def reserve(self, name: str, size: int, limit: int, cap: int | None,
                uses: Sequence[tuple[str, float]] = ()) -> Reserved:
        """Reserve ``size`` bytes for block file ``name`` within ``limit`` (and this
        volume's ``cap``), evicting least-recently-used files to make room."""
        if size > limit or (cap is not None and size > cap):
            return Reserved.FULL
        with self._lock:
            self._current()
            for attempt in range(4):
                outcome, victims = self._try_reserve(name, size, limit, cap,
                                                     uses if attempt == 0 else (),
                                                     recover=attempt > 0)
                if not victims:
                    self._read_totals()
                    return outcome
                self.evicted += len(victims)
                self._drop_dying(victims)
            self._read_totals()
            return Reserved.FULL

    def _try_reserve(self, name: str, size: int, limit: int, cap: int | None,
                     uses: Sequence[tuple[str, float]], *,
                     recover: bool) -> tuple[Reserved, list[str]]:
        if recover:
            self._recover()
        with self._txn() as c:
            if uses:
                self._touch(c, uses)
            row = c.execute("SELECT size, state, owner FROM entries WHERE name = ?",
                            (name,)).fetchone()
            if row is not None:
                if row[1] == READY and os.path.exists(self.path(name)):
                    return Reserved.EXISTS, []
                if row[1] != READY and self._owner_alive(row[2]):
                    return Reserved.BUSY, []
                # a file deleted behind our back, or a dead owner's: settle it first
                self._settle_dead_row(c, name, row[0], row[1] if row[1] == WRITING else DYING)
                if c.execute("SELECT 1 FROM entries WHERE name = ?", (name,)).fetchone():
                    return Reserved.EXISTS, []  # the dead owner had finished writing it
            total = c.execute("SELECT bytes FROM totals").fetchone()[0]
            victims = self._victims(c, total + size - limit, None)
            if cap is not None:
                # (a victim of the global pass may be this volume's too: then this pass
                # frees a little more than it must, never less)
                mine = c.execute("SELECT bytes FROM volumes WHERE volume = ?",
                                 (self.volume,)).fetchone()
                victims += self._victims(c, (mine[0] if mine else 0) + size - cap,
                                         self.volume, exclude=set(victims))
            if victims:
                c.executemany("UPDATE entries SET state = ?, owner = ? WHERE name = ?",
                              [(DYING, self.token, v) for v in victims])
                return Reserved.FULL, victims
            if total + size > limit:
                return Reserved.FULL, []  # what is left is others' reservations
            if cap is not None:
                mine = c.execute("SELECT bytes FROM volumes WHERE volume = ?",
                                 (self.volume,)).fetchone()
                if (mine[0] if mine else 0) + size > cap:
                    return Reserved.FULL, []  # this volume's own writes in flight hold it
            c.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?)",
                      (name, size, time.time(), self.volume, WRITING, self.token))
            return Reserved.OK, []

    def _victims(self, c: sqlite3.Connection, excess: int, volume: str | None,
                 exclude: set[str] | None = None) -> list[str]:
        if excess <= 0:
            return []
        if volume is None:
            rows = c.execute("SELECT name, size FROM entries WHERE state = ? "
                             "ORDER BY atime, rowid", (READY,))
        else:
            rows = c.execute("SELECT name, size FROM entries WHERE volume = ? AND state = ? "
                             "ORDER BY atime, rowid", (volume, READY))
        victims: list[str] = []
        for name, size in rows:
            if exclude and name in exclude:
                continue
            victims.append(name)
            excess -= size
            if excess <= 0:
                break
        return victims

    def _drop_dying(self, names: Sequence[str]) -> None:
        """Unlink files this process marked DYING, then forget their rows."""
        for name in names:
            with contextlib.suppress(OSError):
                os.unlink(self.path(name))
        with self._txn() as c:
            c.executemany("DELETE FROM entries WHERE name = ? AND state = ? AND owner = ?",
                          [(n, DYING, self.token) for n in names])

    def commit(self, name: str, size: int) -> bool:
        """The file of a reservation is in place: it becomes READY. False if the index
        no longer knew the reservation (rebuilt meanwhile) and the file was adopted or
        was not there."""
        with self._lock:
            self._current()
            with self._txn() as c:
                done = c.execute("UPDATE entries SET state = ?, owner = NULL, atime = ? "
                                 "WHERE name = ? AND owner = ? AND state = ?",
                                 (READY, time.time(), name, self.token, WRITING)).rowcount
                if not done:
                    try:
                        on_disk = os.stat(self.path(name)).st_size
                    except FileNotFoundError:
                        on_disk = None
                    if on_disk is not None:
                        c.execute("INSERT OR IGNORE INTO entries VALUES (?, ?, ?, ?, ?, NULL)",
                                  (name, on_disk, time.time(), self.volume, READY))
            self._read_totals()
            return bool(done)

    def release(self, name: str) -> None:
        """Give up a reservation whose file could not be written."""
        with self._lock:
            self._current()
            with self._txn() as c:
                c.execute("DELETE FROM entries WHERE name = ? AND owner = ? AND state = ?",
                          (name, self.token, WRITING))
            self._read_totals()

    def evict(self, nbytes: int) -> int:
        """Free at least ``nbytes`` (a full disk): evict least-recently-used files."""
        with self._lock:
            self._current()
            with self._txn() as c:
                victims = self._victims(c, nbytes, None)
                c.executemany("UPDATE entries SET state = ?, owner = ? WHERE name = ?",
                              [(DYING, self.token, v) for v in victims])
            if victims:
                self.evicted += len(victims)
                self._drop_dying(victims)
            self._read_totals()
            return len(victims)

    def shrink(self, limit: int, cap: int | None) -> int:
        """Evict until the directory is within ``limit`` and this volume within ``cap``."""
        with self._lock:
            self._current()
            with self._txn() as c:
                total = c.execute("SELECT bytes FROM totals").fetchone()[0]
                victims = self._victims(c, total - limit, None)
                if cap is not None:
                    row = c.execute("SELECT bytes FROM volumes WHERE volume = ?",
                                    (self.volume,)).fetchone()
                    victims += self._victims(c, (row[0] if row else 0) - cap, self.volume,
                                             exclude=set(victims))
                c.executemany("UPDATE entries SET state = ?, owner = ? WHERE name = ?",
                              [(DYING, self.token, v) for v in victims])
            if victims:
                self.evicted += len(victims)
                self._drop_dying(victims)
            self._read_totals()
            return len(victims)

    def relieve(self, nbytes: int) -> int:
        """The disk is so full that the index cannot write: unlink least-recently-used
        files first, then forget their rows. (The one place that unlinks before the row
        says so: a crash in between leaves rows without files, which the next put of
        the name or reconcile drops; counted but absent, never the other way round.)"""
        with self._lock:
            conn = self._current()
            victims: list[str] = []
            for name, size in conn.execute("SELECT name, size FROM entries WHERE state = ? "
                                           "ORDER BY atime, rowid", (READY,)):
                victims.append(name)
                nbytes -= size
                if nbytes <= 0:
                    break
            for name in victims:
                with contextlib.suppress(OSError):
                    os.unlink(self.path(name))
            with self._txn() as c:
                c.executemany("DELETE FROM entries WHERE name = ? AND state = ?",
                              [(n, READY) for n in victims])
            self.evicted += len(victims)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._read_totals()
            return len(victims)

    def drop(self, name: str) -> None:
        """Forget a READY file found corrupt or missing (and unlink it)."""
        with self._lock:
            self._current()
            with self._txn() as c:
                marked = c.execute("UPDATE entries SET state = ?, owner = ? "
                                   "WHERE name = ? AND state = ?",
                                   (DYING, self.token, name, READY)).rowcount
            if marked:
                self._drop_dying([name])
            self._read_totals()

    # ---- diagnostics -----------------------------------------------------------------
    def entries(self) -> dict[str, int]:
        with self._lock:
            conn = self._current()
            return {name: size for name, size in conn.execute(
                "SELECT name, size FROM entries ORDER BY atime, rowid")}

    def volumes(self) -> dict[str, int]:
        with self._lock:
            conn = self._current()
            return dict(conn.execute("SELECT volume, bytes FROM volumes"))

    def contains(self, names: Sequence[str]) -> set[str]:
        """Which of ``names`` are READY (for the prefetcher: what not to fetch)."""
        with self._lock:
            conn = self._current()
            found: set[str] = set()
            for i in range(0, len(names), 500):
                part = list(names[i:i + 500])
                marks = ",".join("?" * len(part))
                found.update(n for (n,) in conn.execute(
                    f"SELECT name FROM entries WHERE state = {READY} AND name IN ({marks})", part))
            return found
