"""The node's records of what it staged and published (``--state-dir``, a hostPath).

    STATE/staged/<volume>.json              StageRecord
    STATE/published/<sha256(target)>.json   PublishRecord
    STATE/*/<name>.bad                      an unreadable record, quarantined (no content)

Records are written tmp + fsync + rename (mode 0600, directories 0700) before acting and
removed after the undo succeeded (the protocol is at the top of ``csi/mounts.py``).

**No credentials are ever written here.** A stage record of a volume whose backend
comes from a Secret holds only ``backend``, the identity of that backend (Redis
host:port/db, bucket/prefix, endpoint, region: no user name, password or key); the
credentials live in ``csi/secretstore.py``. Version 1 records carried the Secret's
values in ``env``: they are migrated when loaded (the values move to the secret store,
the new record replaces the old one atomically, then the old file is overwritten with
zeros).

Unreadable records are quarantined as ``<name>.bad`` holding only the error, the size
and the time, never the content (it may hold credentials of a version 1 record); the
newest ``MAX_BAD`` per directory are kept, older ones deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("chunkfs.csi.state")

STATE_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_BAD = 8


@dataclass
class StageRecord:
    volume_id: str
    staging_path: str
    mode: int                         # VolumeCapability.AccessMode.Mode
    readonly: bool
    epoch: int | None                 # writer epoch from ControllerPublishVolume
    options: list[str] = field(default_factory=list)   # extra `chunkfs mount -o` options
    cache_size: str | None = None
    backend: str = ""                 # a Secret's backend (identity only), "" = default
    created: float = field(default_factory=time.time)

    def same_request(self, other: StageRecord) -> bool:
        keys = ("volume_id", "staging_path", "mode", "readonly", "epoch", "options",
                "cache_size", "backend")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


@dataclass
class PublishRecord:
    volume_id: str
    target_path: str
    staging_path: str
    mode: int
    readonly: bool
    flags: list[str] = field(default_factory=list)     # bind mount flags
    created: float = field(default_factory=time.time)

    def same_request(self, other: PublishRecord) -> bool:
        keys = ("volume_id", "target_path", "staging_path", "mode", "readonly", "flags")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


def backend_identity(env: Mapping[str, str]) -> str:
    """Where a Secret's backend is, without any credential: two stages of one volume
    with the same identity are the same backend, whatever passwords and keys say."""
    if not env:
        return ""
    meta = urlsplit(env.get("CHUNKFS_META", ""))
    try:
        port = meta.port or 6379
    except ValueError:
        port = 0
    return (f"redis://{meta.hostname or ''}:{port}/{meta.path.strip('/') or '0'} "
            f"{env.get('CHUNKFS_STORAGE', '')} {env.get('AWS_ENDPOINT_URL', '')} "
            f"{env.get('AWS_REGION', '')}").strip()


Migrate = Callable[[str, dict[str, str]], None]  # (volume id, env) -> keep it elsewhere


class StateStore:
    """The JSON records under ``--state-dir``, loaded once and kept in memory.

    ``migrate`` receives the credentials found in version 1 stage records.
    """

    def __init__(self, state_dir: str, migrate: Migrate | None = None) -> None:
        self.dir = state_dir
        self._staged_dir = os.path.join(state_dir, "staged")
        self._published_dir = os.path.join(state_dir, "published")
        self._migrate = migrate
        for d in (state_dir, self._staged_dir, self._published_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
            os.chmod(d, 0o700)
        self.staged: dict[str, StageRecord] = {
            r.volume_id: r for r in self._load(self._staged_dir, StageRecord)}
        self.published: dict[str, PublishRecord] = {
            r.target_path: r for r in self._load(self._published_dir, PublishRecord)}

    def _load(self, directory: str, kind: type) -> list[Any]:
        records = []
        names = {f.name for f in dataclasses.fields(kind)}
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if not name.endswith(".json"):
                if name.startswith(".tmp-"):
                    _scrub(path)  # an interrupted write: the old record (if any) stands
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    doc = json.load(f)
                if not isinstance(doc, dict) or doc.pop("version", None) not in \
                        READABLE_VERSIONS:
                    raise ValueError("unknown state version")
                env = doc.pop("env", None) or {}
                record = kind(**{k: v for k, v in doc.items() if k in names})
            except (OSError, ValueError, TypeError) as exc:
                self._quarantine(path, exc)
                continue
            if env and isinstance(record, StageRecord):
                self._migrate_secrets(path, record, env)
            records.append(record)
        self._prune_bad(directory)
        return records

    def _migrate_secrets(self, path: str, rec: StageRecord, env: dict[str, str]) -> None:
        env = {str(k): str(v) for k, v in env.items()}
        if self._migrate is not None:
            self._migrate(rec.volume_id, env)
        rec.backend = backend_identity(env)
        with open(path, "r+b") as old:  # the old inode, to be zeroed once replaced
            self._write(path, rec)
            _zero(old)
        log.warning("volume %s: moved the credentials of its stage record off the disk",
                    rec.volume_id)

    def _quarantine(self, path: str, exc: Exception, source: str | None = None) -> None:
        """Replace the unreadable ``source`` (default ``path``) by ``path``.bad, a note."""
        source = source or path
        try:
            size = os.path.getsize(source)
        except OSError:
            size = -1
        log.error("quarantining unreadable state file %s (%d bytes): %s", source, size,
                  type(exc).__name__)
        note = {"error": f"{type(exc).__name__}", "size": size, "quarantined": time.time(),
                "note": "content discarded: it may have held credentials"}
        _scrub(source)
        with contextlib.suppress(OSError):
            self._write_doc(path + ".bad", note)

    def _prune_bad(self, directory: str) -> None:
        bad = [os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".bad")]
        bad.sort(key=lambda p: os.stat(p).st_mtime, reverse=True)
        for old in bad[MAX_BAD:]:
            _scrub(old)
        for kept in bad[:MAX_BAD]:
            if not _is_note(kept):  # an older version renamed the record itself to .bad
                self._quarantine(kept.removesuffix(".bad"), ValueError("old quarantine"),
                                 source=kept)

    def _write(self, path: str, record: Any) -> None:
        self._write_doc(path, {"version": STATE_VERSION, **dataclasses.asdict(record)})

    @staticmethod
    def _write_doc(path: str, doc: dict[str, Any]) -> None:
        directory = os.path.dirname(path)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(directory)

    def _unlink(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            _fsync_dir(os.path.dirname(path))

    def _publish_file(self, target: str) -> str:
        digest = hashlib.sha256(target.encode()).hexdigest()[:40]
        return os.path.join(self._published_dir, digest + ".json")

    def save_stage(self, rec: StageRecord) -> None:
        self._write(os.path.join(self._staged_dir, rec.volume_id + ".json"), rec)
        self.staged[rec.volume_id] = rec

    def drop_stage(self, volume_id: str) -> None:
        self._unlink(os.path.join(self._staged_dir, volume_id + ".json"))
        self.staged.pop(volume_id, None)

    def save_publish(self, rec: PublishRecord) -> None:
        self._write(self._publish_file(rec.target_path), rec)
        self.published[rec.target_path] = rec

    def drop_publish(self, target: str) -> None:
        self._unlink(self._publish_file(target))
        self.published.pop(target, None)

    def publishes_of(self, volume_id: str) -> list[PublishRecord]:
        return [p for p in self.published.values() if p.volume_id == volume_id]


def _is_note(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(4096))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and "quarantined" in doc and "env" not in doc


def _zero(f: Any) -> None:
    """Overwrite an open file with zeros (best effort: a filesystem may keep old blocks)."""
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    f.write(b"\0" * size)
    f.flush()
    os.fsync(f.fileno())


def _scrub(path: str) -> None:
    """Zero a file, then delete it."""
    with contextlib.suppress(OSError), open(path, "r+b") as f:
        _zero(f)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
