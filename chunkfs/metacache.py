"""Attributes and directory entries a mount read from Redis, served again while fresh.

The kernel caches what a lookup or getattr returns for ``entry-timeout`` /
``attr-timeout``; this cache keeps the same promise on the mount's side, so that work the
kernel forgot (dropped dentries, a ``git status`` after ``drop_caches``, an ``lstat`` of
every file of a directory) costs no Redis round trip per name:

* every answer read from Redis is remembered with the time its request was *sent*;
* a hit is served with the kernel timeout reduced by its age, so what an application
  sees is never older than the configured timeout, exactly as without this cache;
* a lookup in a small directory brings the whole listing with attributes in the same
  round trip (``opendir`` then reads it from here); repeated misses in a bigger one
  fetch its listing in bounded pages;
* a listing only says which names existed: a name it lacks is asked of Redis (a name
  created on another node is visible at once, as it was before this cache);
* every change this mount makes forgets what it touches (the inode, the names, the
  parent directory's attributes), so this mount always sees its own changes;
* ``open`` reads the attributes afresh (close-to-open) and stores what it read;
* extended attributes, found or missing, are kept for ``attr-timeout`` too: the kernel
  asks for ``security.capability`` before every write to a file (to drop privileges of
  a set-uid file), and without this each of those would be a Redis round trip (four per
  SQLite commit in WAL mode). Only this mount's own xattr changes forget them (not every
  flush: writing data leaves xattrs alone).

Negative lookups are left to the kernel (it caches them for ``entry-timeout`` and drops
them itself when this mount creates the name); this cache holds positive entries only.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from chunkfs.meta.schema import Attr

SMALL_DIR = 128        # a lookup in a directory this small returns its whole listing
BIG_DIR = 100_000      # bigger directories are never listed for lookups
PAGE = 1000            # entries per page of a listing
MISSES_TO_LIST = 2     # misses in one directory within entry-timeout before it is listed


Key = int | tuple[int, bytes]  # an inode, or a name in a directory


class MetaCache:
    def __init__(self, attr_timeout: float, entry_timeout: float,
                 clock: Callable[[], float] = time.monotonic, limit: int = 200_000) -> None:
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout
        self.clock = clock
        self.limit = limit
        self._attrs: OrderedDict[int, tuple[Attr, float]] = OrderedDict()
        self._entries: OrderedDict[tuple[int, bytes], tuple[int, float]] = OrderedDict()
        # directory -> (time, every (name, ino)): a complete listing, for opendir
        self._listed: OrderedDict[int, tuple[float, list[tuple[bytes, int]]]] = OrderedDict()
        # inode -> (time of its newest answer, xattr name -> (its value, None if it has
        # none; time of the request)), least recently answered first
        self._xattrs: OrderedDict[int, tuple[float, dict[bytes, tuple[bytes | None, float]]]] \
            = OrderedDict()
        self._xattrs_changed: dict[int, float] = {}  # inode -> when this mount changed its xattrs
        # when this mount last changed an inode or a name: answers to requests sent
        # before that are not stored (they may predate the change)
        self._changed: dict[Key, float] = {}
        # directory -> (misses, time of the first one): when to fetch its listing
        self._misses: dict[int, tuple[int, float]] = {}
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.attr_timeout > 0 and self.entry_timeout > 0

    @property
    def horizon(self) -> float:
        return max(self.attr_timeout, self.entry_timeout)

    # ---- reads ---------------------------------------------------------------------
    def attr(self, ino: int) -> tuple[Attr, float] | None:
        """The cached attributes and how much longer the kernel may keep them."""
        found = self._attrs.get(ino)
        if found is None:
            return None
        attr, at = found
        left = at + self.attr_timeout - self.clock()
        if left <= 0:
            del self._attrs[ino]
            return None
        return attr, left

    def entry(self, parent: int, name: bytes) -> tuple[Attr, float, float] | None:
        """A cached positive entry: its attributes and the entry and attribute timeouts
        left; None when unknown or stale (then ask Redis)."""
        found = self._entries.get((parent, name))
        attr = None
        if found is not None:
            entry_left = found[1] + self.entry_timeout - self.clock()
            attr = self.attr(found[0]) if entry_left > 0 else None
            if attr is None:
                del self._entries[(parent, name)]
        if attr is None:
            self.misses += 1
            return None
        self.hits += 1
        return attr[0], entry_left, attr[1]

    def listing(self, parent: int) -> tuple[list[tuple[bytes, int]], float] | None:
        """A complete listing of a directory (sorted) and how much longer its names may be
        trusted; None if there is none, or it is stale, or this mount changed the directory
        since."""
        found = self._listed.get(parent)
        if found is None:
            return None
        left = found[0] + self.entry_timeout - self.clock()
        if left <= 0:
            del self._listed[parent]
            return None
        return found[1], left

    def xattr(self, ino: int, name: bytes) -> tuple[bytes | None] | None:
        """A cached answer for an extended attribute: ``(value,)``, ``(None,)`` when the
        inode has no such attribute; None when unknown or stale (then ask Redis)."""
        names = self._xattrs.get(ino)
        found = None if names is None else names[1].get(name)
        if found is None:
            return None
        if found[1] + self.attr_timeout <= self.clock():
            del names[1][name]  # type: ignore[index]
            return None
        return (found[0],)

    def entry_ino(self, parent: int, name: bytes) -> int | None:
        """The inode a cached entry names, however old (to forget what a change touches)."""
        found = self._entries.get((parent, name))
        return None if found is None else found[0]

    def should_list(self, parent: int, count: int) -> bool:
        """After a miss in a directory of ``count`` entries: is fetching its listing worth
        it? Yes from the ``MISSES_TO_LIST``-th miss within entry-timeout."""
        if not self.enabled or count <= SMALL_DIR or count > BIG_DIR:
            return False
        now = self.clock()
        n, first = self._misses.get(parent, (0, now))
        if now - first > self.entry_timeout:
            n, first = 0, now
        if n + 1 >= MISSES_TO_LIST:
            self._misses.pop(parent, None)
            return True
        self._misses[parent] = (n + 1, first)
        return False

    # ---- answers from Redis ------------------------------------------------------------
    def _storable(self, key: Key, at: float) -> bool:
        changed = self._changed.get(key)
        return self.enabled and (changed is None or at >= changed) and at + self.horizon > self.clock()

    def put_attr(self, attr: Attr, at: float) -> None:
        """Attributes Redis returned to a request sent at ``at`` (``clock()`` time)."""
        old = self._attrs.get(attr.ino)
        if (old is not None and old[1] > at) or not self._storable(attr.ino, at):
            return
        self._attrs[attr.ino] = (attr, at)
        self._attrs.move_to_end(attr.ino)
        self._trim()

    def put_entry(self, parent: int, name: bytes, attr: Attr, at: float) -> None:
        key = (parent, name)
        old = self._entries.get(key)
        if (old is None or old[1] <= at) and self._storable(key, at):
            self._entries[key] = (attr.ino, at)
            self._entries.move_to_end(key)
        self.put_attr(attr, at)

    def put_listing(self, parent: int, listing: Iterable[tuple[bytes, Attr]], at: float, *,
                    complete: bool = False) -> None:
        """Entries of a directory; ``complete``: every entry it had (opendir may use it)."""
        listing = list(listing)
        for name, attr in listing:
            self.put_entry(parent, name, attr, at)
        if complete and self._storable(parent, at):
            self._listed[parent] = (at, sorted((name, attr.ino) for name, attr in listing))
            self._listed.move_to_end(parent)

    def put_xattr(self, ino: int, name: bytes, value: bytes | None, at: float) -> None:
        """What Redis answered for xattr ``name`` of ``ino`` (None: it has none) to a
        request sent at ``at``."""
        changed = self._xattrs_changed.get(ino)
        if not (self.enabled and (changed is None or at >= changed)
                and at + self.attr_timeout > self.clock()):
            return
        newest, names = self._xattrs.pop(ino, (at, {}))
        old = names.get(name)
        if old is None or old[1] <= at:
            names[name] = (value, at)
        self._xattrs[ino] = (max(newest, at), names)
        self._trim()

    # ---- this mount's own changes ------------------------------------------------------
    def forget(self, *inos: int) -> None:
        """Inodes this mount changes (or is about to): the next getattr asks Redis, and an
        answer sent before now (it may predate the change) is not stored."""
        now = self.clock()
        for ino in inos:
            self._attrs.pop(ino, None)
            self._listed.pop(ino, None)
            self._changed[ino] = now
        self._trim_changed(now)

    def forget_xattrs(self, ino: int) -> None:
        """This mount changes (or is about to change) an xattr of ``ino``, or removes the
        inode: its xattrs are asked of Redis again, and an answer to a request sent
        before now is not stored."""
        now = self.clock()
        self._xattrs.pop(ino, None)
        self._xattrs_changed[ino] = now
        if len(self._xattrs_changed) > 4096:
            cutoff = now - self.attr_timeout
            self._xattrs_changed = {k: t for k, t in self._xattrs_changed.items() if t >= cutoff}

    def forget_entry(self, parent: int, name: bytes) -> None:
        """A name this mount changes (created, removed, renamed, replaced)."""
        now = self.clock()
        self._entries.pop((parent, name), None)
        self._changed[(parent, name)] = now
        self._trim_changed(now)

    def clear(self) -> None:
        self._attrs.clear()
        self._entries.clear()
        self._listed.clear()
        self._misses.clear()
        self._xattrs.clear()

    # ---- bounds ------------------------------------------------------------------------
    def _trim(self) -> None:
        """Drop what expired (oldest first) and keep at most ``limit`` of each kind."""
        cutoff = self.clock() - self.horizon
        while self._attrs and (len(self._attrs) > self.limit
                               or next(iter(self._attrs.values()))[1] < cutoff):
            self._attrs.popitem(last=False)
        while self._entries and (len(self._entries) > self.limit
                                 or next(iter(self._entries.values()))[1] < cutoff):
            self._entries.popitem(last=False)
        stale = self.clock() - self.attr_timeout  # an inode's newest answer older than
        while self._xattrs and (len(self._xattrs) > self.limit  # this: all of it is stale
                                or next(iter(self._xattrs.values()))[0] <= stale):
            self._xattrs.popitem(last=False)
        while self._listed and (len(self._listed) > self.limit // 100
                                or next(iter(self._listed.values()))[0] < cutoff):
            self._listed.popitem(last=False)

    def _trim_changed(self, now: float) -> None:
        """A change older than the horizon guards nothing: an answer sent before it is
        too old to be stored anyway."""
        if len(self._changed) > 4096:
            cutoff = now - self.horizon
            self._changed = {k: t for k, t in self._changed.items() if t >= cutoff}
