"""Backups of live volumes, and restores from the object store alone.

The durable state of a volume is a URL: a snapshot's manifest
(``snapshots/<name>/manifest.json.gz``) or a backup's
(``backups/<volume>/<id>/manifest.json.gz``), under the volume's storage prefix. A
restore reads that document, every page and every block object it names, checks
each against its content hash, and only then writes the volume into Redis.

A backup is incremental by content addressing (docs/dev/backup.md): the exported
namespace is cut into pages of ``PAGE_INODES`` consecutive inode numbers, each page
stored once under the hash of its canonical JSON
(``backups/<volume>/pages/<sha256>.json.gz``); the backup's own manifest lists its
pages. A page whose inodes did not change has the same hash as in the last backup
and is not written again, so a backup of a volume with many files and few changes
writes a few pages and one small manifest.

Invariants (the proofs are in docs/dev/backup.md):

* a manifest is written after every page it names; pages and manifests are
  immutable;
* only a backup of the same volume, holding that volume's backup lock, deletes
  pages (retention), and only pages no remaining manifest names; deleting a volume
  deletes its backups, also under the lock;
* while a backup is being made, its blocks are protected by a namespace in Redis
  (the point-in-time copy it exports); GC reads the backup's manifest after it
  scanned the namespaces, so the protection never lapses.
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import contextlib
import gzip
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit

import redis.asyncio as aioredis

from chunkfs.blocks import slices
from chunkfs.errors import BackupBusy, InvalidArgument, NoSuchObject, RestoreFailed
from chunkfs.meta import namespace as nsops
from chunkfs.meta.schema import ROOT_INODE
from chunkfs.objstore import ObjectStore, block_key

PAGE_INODES = 16         # inode numbers per manifest page: a change rewrites one page
DEFAULT_KEEP = 24        # backups kept per volume (the newest ones)
VERIFY_PARALLEL = 8      # block objects read at once by a restore's verification
PAGES_PARALLEL = 8       # pages written or read at once
_PAGES_PER_ROUND = 256   # pages encoded, then written, per round
LOCK_MS = 120_000        # a backup lock not renewed for this long is free again
MANIFEST = "manifest.json.gz"
SNAPSHOTS_DIR = "snapshots/"
BACKUPS_DIR = "backups/"
_ID_RE = re.compile(r"^\d{8}T\d{9}Z-[0-9a-f]{6}$")
_ROOT_RE = re.compile(r"^(snapshots/[^/]+|backups/[^/]+/\d{8}T\d{9}Z-[0-9a-f]{6})/"
                      + re.escape(MANIFEST) + "$")
_PAGE_RE = re.compile(r"^backups/[^/]+/pages/([0-9a-f]{64})\.json\.gz$")


T = TypeVar("T")
log = logging.getLogger(__name__)
__all__ = ["BackupBusy", "RestoreFailed"]  # raised here, defined in chunkfs.errors


# ---- where things are -------------------------------------------------------------
def snapshot_manifest_key(snapshot: str) -> str:
    """The manifest of a snapshot; the CSI snapshot id is the snapshot's name."""
    return f"{SNAPSHOTS_DIR}{quote(snapshot, safe='')}/{MANIFEST}"


def backups_of(volume: str) -> str:
    return f"{BACKUPS_DIR}{quote(volume, safe='')}/"


def backup_manifest_key(volume: str, backup_id: str) -> str:
    return f"{backups_of(volume)}{backup_id}/{MANIFEST}"


def page_key(volume: str, digest: str) -> str:
    return f"{backups_of(volume)}pages/{digest}.json.gz"


def is_manifest_key(key: str) -> bool:
    return bool(_ROOT_RE.match(key))


def new_backup_id(after: str | None = None, now: float | None = None) -> str:
    """``<UTC time to the millisecond>Z-<random>``, later than ``after`` (the volume's
    newest backup): key order is the order the backups were made in."""
    ms = int((time.time() if now is None else now) * 1000)
    if after is not None:
        ms = max(ms, _id_ms(after) + 1)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ms // 1000)) + f"{ms % 1000:03d}Z"
    return f"{stamp}-{secrets.token_hex(3)}"


def _id_ms(backup_id: str) -> int:
    stamp = backup_id.partition("Z")[0]
    whole = time.strptime(stamp[:15], "%Y%m%dT%H%M%S")
    return int(calendar.timegm(whole)) * 1000 + int(stamp[15:18])


def split_manifest_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix/snapshots/ID/manifest.json.gz`` -> (storage URL, key)."""
    parts = urlsplit(url or "")
    path = parts.path.strip("/")
    if parts.scheme == "s3" and parts.netloc:
        for marker in ("snapshots/", "backups/"):
            head, sep, tail = ("/" + path).rpartition("/" + marker)
            if sep and is_manifest_key(marker + tail):
                prefix = head.strip("/")
                return f"s3://{parts.netloc}/{prefix}".rstrip("/"), marker + tail
    raise InvalidArgument(
        f"not a manifest URL: {url!r}; expected s3://bucket/prefix/snapshots/<snapshot>/"
        f"{MANIFEST} or s3://bucket/prefix/backups/<volume>/<backup id>/{MANIFEST}")


def manifest_url(storage_url: str, key: str) -> str:
    return f"{storage_url.rstrip('/')}/{key}"


# ---- pages ------------------------------------------------------------------------
def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def encode_page(inodes: dict[str, Any]) -> tuple[str, bytes]:
    """(sha256 of the page's canonical JSON, its gzip body; deterministic)."""
    raw = _canonical({"format": nsops.FORMAT, "inodes": inodes})
    return hashlib.sha256(raw).hexdigest(), gzip.compress(raw, compresslevel=6, mtime=0)


def decode_page(digest: str, body: bytes) -> dict[str, Any]:
    """A page's inodes; raises ValueError unless it has exactly the content its name
    promises (the hash covers the canonical JSON, not the gzip bytes)."""
    try:
        raw = gzip.decompress(body)
    except (OSError, EOFError) as exc:
        raise ValueError(f"not gzip ({type(exc).__name__})") from None
    if hashlib.sha256(raw).hexdigest() != digest:
        raise ValueError("content does not match its hash")
    return json.loads(raw)["inodes"]


def paginate(inodes: dict[str, Any]) -> list[dict[str, Any]]:
    """Inodes grouped by ``ino // PAGE_INODES`` (a change touches one group), in order."""
    pages: dict[int, dict[str, Any]] = {}
    for ino, node in inodes.items():
        pages.setdefault(int(ino) // PAGE_INODES, {})[ino] = node
    return [pages[p] for p in sorted(pages)]


@dataclass
class BackupReport:
    volume: str
    id: str
    key: str
    url: str
    created: float
    files: int
    size_bytes: int
    pages: int
    pages_written: int
    bytes_written: int
    kind: str = "full"          # full | incremental (of ``base``)
    base: str = ""
    captured: int = 0           # inodes read from Redis for this backup
    expired: list[str] = field(default_factory=list)   # backup ids retention removed
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PageRef:
    """One page as a manifest names it: ``pages`` holds [digest, inodes] (what every
    reader needs), ``pageinfo`` the same position's [page number, bytes charged]."""

    number: int
    digest: str
    inodes: int
    size: int


@dataclass(frozen=True)
class Base:
    """The backup an incremental one starts from: its pages by page number."""

    id: str
    pages: dict[int, PageRef]


def _page_refs(root: dict[str, Any]) -> list[PageRef]:
    """The pages of a backup manifest with their numbers; ValueError if it predates
    ``pageinfo`` (such a manifest cannot be a base: the next backup is full)."""
    info = root.get("pageinfo")
    if not isinstance(info, list) or len(info) != len(root["pages"]):
        raise ValueError("the manifest has no page numbers")
    return [PageRef(int(no), str(digest), int(count), int(size))
            for (digest, count), (no, size) in zip(root["pages"], info, strict=True)]


async def read_base(store: ObjectStore, volume: str, backup_id: str) -> Base | None:
    """The manifest of ``volume``'s backup ``backup_id`` as a base, or None when it
    cannot be one (gone, unreadable, of an older format): the backup is then full."""
    key = backup_manifest_key(volume, backup_id)
    try:
        root = await read_root(store, key)
        if root.get("kind") != "backup" or root.get("volume") != volume:
            raise ValueError("not a backup of this volume")
        pages = {p.number: p for p in _page_refs(root)}
    except (NoSuchObject, ValueError, KeyError, TypeError) as exc:
        log.info("the last backup cannot be a base: this backup is full",
                 extra={"volume": volume, "backup": backup_id, "reason": str(exc)[:200]})
        return None
    return Base(backup_id, pages)


async def write_backup(store: ObjectStore, volume: str, doc: dict[str, Any], *,
                       base: Base | None = None,
                       changed_pages: set[int] | None = None) -> BackupReport:
    """Write the pages a backup needs that the prefix lacks, then its manifest. Full:
    ``doc`` is the whole exported namespace. Incremental: ``doc`` holds the inodes of
    ``changed_pages`` (all of them, as they are now), every other page is ``base``'s.
    The caller holds the volume's backup lock."""
    earlier = await backup_ids(store, volume)
    backup_id = new_backup_id(earlier[-1] if earlier else None)
    if base is None:
        have = {m.group(1) async for key, _, _ in store.list(backups_of(volume) + "pages/")
                if (m := _PAGE_RE.match(key))}
        pages: dict[int, PageRef] = {}
    else:  # base's pages exist while base does (the lock: no retention meanwhile)
        have = {p.digest for p in base.pages.values()}
        pages = {no: p for no, p in base.pages.items() if no not in (changed_pages or set())}
    written = out_bytes = 0
    groups = paginate(doc["inodes"])
    for start in range(0, len(groups), _PAGES_PER_ROUND):  # bounded memory: a round at a time
        part = groups[start:start + _PAGES_PER_ROUND]
        encoded = await asyncio.to_thread(lambda part=part: [encode_page(p) for p in part])
        todo: dict[str, bytes] = {}
        for (digest, body), inodes in zip(encoded, part, strict=True):
            number = int(next(iter(inodes))) // PAGE_INODES
            size = sum(nsops.node_bytes(node) for node in inodes.values())
            pages[number] = PageRef(number, digest, len(inodes), size)
            if digest not in have:
                todo[digest] = body
                have.add(digest)
        await _bounded([lambda d=d, b=b: store.put(page_key(volume, d), b)
                        for d, b in todo.items()])
        written += len(todo)
        out_bytes += sum(len(b) for b in todo.values())
    ordered = [pages[no] for no in sorted(pages)]
    files = sum(p.inodes for p in ordered)
    size = sum(p.size for p in ordered)
    root = {"format": nsops.FORMAT, "kind": "backup", "volume": volume, "id": backup_id,
            "created": doc["created"], "settings": doc["settings"], "files": files,
            "size_bytes": size, "base": base.id if base else "",
            "pages": [[p.digest, p.inodes] for p in ordered],
            "pageinfo": [[p.number, p.size] for p in ordered]}
    body = gzip.compress(_canonical(root), mtime=0)
    key = backup_manifest_key(volume, backup_id)
    await store.put(key, body)
    return BackupReport(volume=volume, id=backup_id, key=key,
                        url=manifest_url(store.config.url, key), created=doc["created"],
                        files=files, size_bytes=size, pages=len(ordered),
                        pages_written=written, bytes_written=out_bytes + len(body),
                        kind="incremental" if base else "full", base=base.id if base else "",
                        captured=len(doc["inodes"]))


async def _bounded(calls: list[Callable[[], Awaitable[T]]],
                   parallel: int = PAGES_PARALLEL) -> list[T]:
    """Run ``calls`` at most ``parallel`` at a time; results in order; the first error
    propagates once the calls in flight are done."""
    results: list[Any] = [None] * len(calls)
    queue = iter(enumerate(calls))
    failed: list[BaseException] = []

    async def worker() -> None:
        for i, call in queue:
            if failed:
                return
            try:
                results[i] = await call()
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the others
                failed.append(exc)
                return

    await asyncio.gather(*(worker() for _ in range(min(parallel, len(calls)))))
    if failed:
        raise failed[0]
    return results


async def backup_ids(store: ObjectStore, volume: str) -> list[str]:
    """The backups of ``volume`` in the prefix, oldest first."""
    prefix = backups_of(volume)
    found = []
    async with contextlib.aclosing(store.list(prefix)) as listing:
        async for key, _, _ in listing:
            if key.startswith(prefix + "pages/"):
                break  # after every id in key order ("2..." < "pages/"): not worth listing
            rest = key[len(prefix):]
            bid, sep, name = rest.partition("/")
            if sep and name == MANIFEST and _ID_RE.match(bid):
                found.append(bid)
    return sorted(found)


async def read_root(store: ObjectStore, key: str) -> dict[str, Any]:
    """A manifest document (snapshot or backup root); NoSuchObject if it is gone,
    ValueError if it is not a readable manifest."""
    body = await store.get(key)
    try:
        return nsops.decode_manifest(body)
    except (OSError, EOFError, ValueError) as exc:
        raise ValueError(f"{type(exc).__name__}") from None


async def expire(store: ObjectStore, volume: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` backups of ``volume``, then the pages no
    remaining backup names (also those of backups that died before their manifest).
    When no backup expires, nothing is swept: a page only loses its last name when a
    manifest goes. The caller holds the volume's backup lock."""
    ids = await backup_ids(store, volume)
    gone = ids[:-keep] if keep > 0 else ids
    if not gone:
        return []
    for bid in gone:
        await store.delete(backup_manifest_key(volume, bid))

    async def pages_of(bid: str) -> list[str] | None:
        try:
            root = await read_root(store, backup_manifest_key(volume, bid))
            return [entry[0] for entry in root["pages"]]
        except (NoSuchObject, ValueError, KeyError, TypeError, IndexError):
            return None

    kept = ids[len(gone):]
    named = await _bounded([lambda bid=bid: pages_of(bid) for bid in kept])
    if any(pages is None for pages in named):
        # its pages are unknown: delete none (restores and GC report it by name)
        log.warning("backup manifest unreadable: no page of the volume is deleted",
                    extra={"volume": volume,
                           "backup": next(b for b, p in zip(kept, named, strict=True) if p is None)})
        return gone
    needed = {digest for pages in named if pages for digest in pages}
    stale = [key async for key, _, _ in store.list(backups_of(volume) + "pages/")
             if (m := _PAGE_RE.match(key)) is None or m.group(1) not in needed]
    await store.delete_many(stale)
    return gone


async def delete_backups(store: ObjectStore, volume: str) -> int:
    """Every backup of ``volume`` (manifests first, then pages); returns how many."""
    gone = await expire(store, volume, 0)
    return len(gone)


def parse_record(raw: dict[bytes, bytes]) -> dict[str, Any] | None:
    """A volume's last backup as recorded in ``cfs{ID}:backup`` (None: none yet)."""
    if b"finished" not in raw:
        return None
    text = {k.decode(): v.decode() for k, v in raw.items() if k != b"temp"}
    ints = ("files", "size_bytes", "pages", "pages_written", "bytes_written", "captured")
    floats = ("created", "finished", "seconds")
    return {k: int(v) if k in ints else float(v) if k in floats else v for k, v in text.items()}


# ---- the backup lock -------------------------------------------------------------
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def lock_key(volume: str) -> str:
    return f"cfs:backup:{volume}"


@contextlib.asynccontextmanager
async def backup_lock(r: aioredis.Redis, volume: str, *, wait: float = 0.0) -> AsyncIterator[None]:
    """One backup (or backup deletion) of a volume at a time, across processes; the
    lock is renewed while held and ends by itself if its holder dies."""
    token = secrets.token_hex(8)
    key = lock_key(volume)
    deadline = time.monotonic() + wait
    while not await r.set(key, token, nx=True, px=LOCK_MS):
        if time.monotonic() >= deadline:
            raise BackupBusy(f"a backup of volume {volume!r} is already in progress")
        await asyncio.sleep(0.2)

    async def renew() -> None:
        while True:
            await asyncio.sleep(LOCK_MS / 4000)
            with contextlib.suppress(Exception):
                await r.set(key, token, xx=True, px=LOCK_MS)

    renewer = asyncio.create_task(renew())
    try:
        yield
    finally:
        renewer.cancel()
        with contextlib.suppress(Exception):
            await r.eval(_RELEASE, 1, key, token)


# ---- restore ---------------------------------------------------------------------
async def load(store: ObjectStore, key: str) -> dict[str, Any]:
    """The namespace document of a manifest (a backup's pages read and checked against
    their hashes), in manifest FORMAT; RestoreFailed names what is missing or corrupt."""
    try:
        doc = await read_root(store, key)
    except NoSuchObject:
        raise RestoreFailed(f"manifest {key} not found in {store.config.url}") from None
    except ValueError as exc:
        raise RestoreFailed(f"manifest {key} is corrupt ({exc})") from None
    try:
        return await _document(store, key, doc)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RestoreFailed(f"manifest {key} is malformed ({type(exc).__name__}: "
                            f"{str(exc)[:100]})") from None


async def _document(store: ObjectStore, key: str, doc: dict[str, Any]) -> dict[str, Any]:
    if doc.get("format") not in (1, nsops.FORMAT):
        raise RestoreFailed(f"manifest {key} has unsupported format {doc.get('format')!r}")
    if "pages" in doc:
        inodes: dict[str, Any] = {}
        numbers = [no for no, _ in doc["pageinfo"]] if "pageinfo" in doc else \
            [None] * len(doc["pages"])
        pages = await _bounded([lambda d=d, n=n, no=no: _page(store, key, doc["volume"], d, n, no)
                                for (d, n), no in zip(doc["pages"], numbers, strict=True)])
        for page in pages:
            inodes.update(page)
        doc = {"format": doc["format"], "namespace": doc.get("volume"),
               "created": doc["created"], "settings": doc["settings"], "inodes": inodes}
    if doc["format"] == 1:
        for node in doc["inodes"].values():
            node["blocks"] = {i: slices.from_legacy(e) for i, e in node.get("blocks", {}).items()}
        doc["format"] = nsops.FORMAT
    return doc


async def _page(store: ObjectStore, key: str, volume: str, digest: str,
                count: int, number: int | None) -> dict[str, Any]:
    pkey = page_key(volume, digest)
    try:
        page = decode_page(digest, await store.get(pkey))
    except NoSuchObject:
        raise RestoreFailed(f"backup page {pkey} (named by {key}) is missing") from None
    except ValueError as exc:
        raise RestoreFailed(f"backup page {pkey} is corrupt: {exc}") from None
    if len(page) != count:
        raise RestoreFailed(f"backup page {pkey} holds {len(page)} inodes, {key} says {count}")
    if number is not None and any(int(ino) // PAGE_INODES != number for ino in page):
        raise RestoreFailed(f"backup page {pkey} holds inodes of another page than {key}'s "
                            f"page {number}")
    return page


def _structure_problems(doc: dict[str, Any]) -> Iterable[str]:
    """What would make the restored namespace inconsistent, without reading objects."""
    inodes = doc["inodes"]
    if str(ROOT_INODE) not in inodes:
        yield "the root directory is missing"
    for ino, node in inodes.items():
        for name, child in node.get("dir", {}).items():
            if str(child) not in inodes:
                yield f"entry {name!r} of inode {ino} names inode {child}, which is missing"
        stored = node.get("slices", {})
        for index, raw in node.get("blocks", {}).items():
            for s in slices.parse(raw):
                if s.inline and s.inline_id not in stored:
                    yield f"block {index} of inode {ino} names inline slice {s.ref}, missing"
                if s.inline and s.inline_id in stored:
                    have = len(base64.b64decode(stored[s.inline_id]))
                    if s.off + s.length > have:
                        yield f"inline slice {s.ref} of inode {ino} is {have} bytes, too short"


def _objects(doc: dict[str, Any]) -> set[tuple[str, int]]:
    return {(d, n) for node in doc["inodes"].values()
            for raw in node.get("blocks", {}).values() for d, n in slices.object_refs(raw)}


async def verify(store: ObjectStore, doc: dict[str, Any], *,
                 parallel: int = VERIFY_PARALLEL) -> int:
    """Read every block object ``doc`` names and check its size and sha256; returns how
    many objects. RestoreFailed lists what is missing or corrupt (the first few)."""
    problems = list(_structure_problems(doc))
    wanted = sorted(_objects(doc))
    queue = iter(wanted)

    async def check(digest: str, size: int) -> None:
        key = block_key(digest, size)
        try:
            body = await store.get(key)
        except NoSuchObject:
            problems.append(f"block object {key} is missing")
            return
        if len(body) != size:
            problems.append(f"block object {key} is {len(body)} bytes, not {size}")
        elif await asyncio.to_thread(lambda: hashlib.sha256(body).hexdigest()) != digest:
            problems.append(f"block object {key} is corrupt (its content does not match "
                            "its hash)")

    async def worker() -> None:
        for digest, size in queue:
            await check(digest, size)

    await asyncio.gather(*(worker() for _ in range(max(1, parallel))))
    if problems:
        shown = "; ".join(sorted(problems)[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise RestoreFailed(f"cannot restore: {len(problems)} problem(s): {shown}{more}")
    return len(wanted)


# ---- what a prefix holds -----------------------------------------------------------
@dataclass(frozen=True)
class RestorePoint:
    """A manifest a volume can be restored from (``volume list --from``)."""

    kind: str            # snapshot | backup
    name: str            # the snapshot's name, or the backed-up volume's
    id: str              # the snapshot's name, or the backup's id
    url: str
    created: float
    size_bytes: int
    files: int
    source_volume: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _point(store: ObjectStore, key: str, doc: dict[str, Any]) -> RestorePoint:
    url = manifest_url(store.config.url, key)
    settings = doc.get("settings", {})
    if doc.get("kind") == "backup":
        return RestorePoint("backup", doc["volume"], doc["id"], url, float(doc["created"]),
                            int(doc["size_bytes"]), int(doc["files"]), doc["volume"])
    name = unquote(key[len(SNAPSHOTS_DIR):].partition("/")[0])
    inodes = doc.get("inodes", {})
    size = sum(nsops.node_bytes(n) for n in inodes.values()) if doc.get("format") == 2 \
        else int(settings.get("used", 0))
    return RestorePoint("snapshot", name, name, url, float(doc.get("created", 0)), size,
                        len(inodes), str(settings.get("source_volume", "")))


async def restore_points(store: ObjectStore) -> tuple[list[RestorePoint], list[str]]:
    """Every snapshot and backup manifest of the prefix (sorted by kind, name, time),
    and the keys of manifests that could not be read."""
    points, bad = [], []
    for top in (SNAPSHOTS_DIR, BACKUPS_DIR):
        keys = [key async for key, _, _ in store.list(top) if is_manifest_key(key)]
        for key in keys:
            try:
                points.append(_point(store, key, await read_root(store, key)))
            except NoSuchObject:
                continue
            except (ValueError, KeyError, TypeError):
                bad.append(key)
    points.sort(key=lambda p: (p.kind, p.name, p.created))
    return points, bad


async def manifest_refs(store: ObjectStore, key: str, seen_pages: set[str]) -> list[str]:
    """The block object keys a manifest names (GC's marks). A backup page already in
    ``seen_pages`` is not read again. NoSuchObject: the manifest, or a page of it
    together with the manifest, is gone (deleted meanwhile); ValueError: unreadable."""
    doc = await read_root(store, key)
    nodes: list[dict[str, Any]] = []
    if "pages" in doc:
        for digest, *_ in doc["pages"]:
            pkey = page_key(doc["volume"], digest)
            if pkey in seen_pages:
                continue
            try:
                nodes.extend(decode_page(digest, await store.get(pkey)).values())
            except NoSuchObject:
                if await store.exists(key):
                    raise ValueError(f"its page {pkey} is missing") from None
                raise
            seen_pages.add(pkey)
    else:
        nodes = list(doc["inodes"].values())
    refs = []
    for node in nodes:
        for raw in node.get("blocks", {}).values():
            if doc.get("format") == 1:
                raw = slices.from_legacy(raw)
            refs.extend(block_key(d, n) for d, n in slices.object_refs(raw))
    return refs
