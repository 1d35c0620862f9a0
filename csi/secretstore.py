"""Where a node keeps the credentials of staged volumes whose backend comes from a Secret.

Never on the node's disk. A mount needs its backend's credentials again whenever it is
re-established (its process died, the plugin container restarted), and kubelet does not
repeat NodeStageVolume for that. So the credentials are kept

* in the plugin's memory, and in the environment of the chunkfs mount process;
* in ``--secrets-dir`` (default ``/run/chunkfs-csi``) **only if that directory is on a
  memory filesystem** (tmpfs/ramfs: on the host, ``/run`` usually is; the chart mounts
  it as a hostPath so that it outlives plugin containers): one ``<volume>.json`` per
  volume, mode 0600 in a 0700 directory, removed at NodeUnstageVolume. It survives
  plugin and container restarts and vanishes with a reboot, which also ends the mounts
  (kubelet stages everything again after a reboot, with the secrets).

If ``--secrets-dir`` is not on a memory filesystem, nothing is written: a restarted
plugin then cannot re-establish a dead mount of a Secret's backend until kubelet calls
NodeStageVolume again (the volume's condition says so), and a warning at start says why.

Each entry also holds the digest of the credentials its running mount was started with,
so that a NodeStageVolume with rotated credentials can tell whether the mount still runs
with the old ones (``csi/mounts.py`` decides what to do about it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping

from csi.mountinfo import mounts

log = logging.getLogger("chunkfs.csi.secrets")

MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
VERSION = 1


def digest(env: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(env), sort_keys=True).encode()).hexdigest()


def filesystem_of(path: str) -> str:
    """The type of the filesystem ``path`` (or its nearest existing parent) lives on."""
    probe = os.path.realpath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    table = mounts()
    best = max((m for m in table if probe == m or probe.startswith(m.rstrip("/") + "/")),
               key=len, default="/")
    return table[best].fstype if best in table else ""


class SecretStore:
    """volume id -> the backend environment of its Secret (memory, optionally tmpfs)."""

    def __init__(self, directory: str | None) -> None:
        self.dir = directory
        self._env: dict[str, dict[str, str]] = {}
        self._mounted: dict[str, str] = {}  # volume -> digest of its running mount's env
        fstype = filesystem_of(directory) if directory else ""
        self.persistent = fstype in MEMORY_FILESYSTEMS
        if directory and not self.persistent:
            log.warning("--secrets-dir %s is on %s, not on a memory filesystem: credentials "
                        "of Secret backends are kept in memory only (a restarted plugin "
                        "re-mounts those volumes only at their next NodeStageVolume)",
                        directory, fstype or "an unknown filesystem")
        if self.persistent:
            assert directory is not None
            os.makedirs(directory, mode=0o700, exist_ok=True)
            os.chmod(directory, 0o700)
            self._load()

    def _path(self, volume_id: str) -> str:
        assert self.dir is not None
        return os.path.join(self.dir, volume_id + ".json")

    def _load(self) -> None:
        assert self.dir is not None
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            if not name.endswith(".json"):
                with contextlib.suppress(OSError):
                    os.unlink(path)  # an interrupted write
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    doc = json.load(f)
                if doc.get("version") != VERSION:
                    raise ValueError("unknown version")
                self._env[name[:-5]] = {str(k): str(v) for k, v in doc["env"].items()}
                if doc.get("mounted"):
                    self._mounted[name[:-5]] = str(doc["mounted"])
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                log.error("dropping unreadable credentials file %s: %s", path,
                          type(exc).__name__)
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def _save(self, volume_id: str) -> None:
        if not self.persistent:
            return
        assert self.dir is not None
        doc = {"version": VERSION, "env": self._env[volume_id],
               "mounted": self._mounted.get(volume_id, "")}
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.dir)  # mode 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, sort_keys=True)
            os.replace(tmp, self._path(volume_id))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def get(self, volume_id: str) -> dict[str, str] | None:
        env = self._env.get(volume_id)
        return dict(env) if env is not None else None

    def put(self, volume_id: str, env: Mapping[str, str]) -> None:
        self._env[volume_id] = dict(env)
        self._save(volume_id)

    def mounted_with(self, volume_id: str, env: Mapping[str, str]) -> None:
        """Remember that the volume's (new) mount process runs with ``env``."""
        self._mounted[volume_id] = digest(env)
        if volume_id in self._env:
            self._save(volume_id)

    def mount_is_current(self, volume_id: str) -> bool:
        """Whether the running mount was started with the stored credentials."""
        env = self._env.get(volume_id)
        return env is None or self._mounted.get(volume_id) == digest(env)

    def drop(self, volume_id: str) -> None:
        self._env.pop(volume_id, None)
        self._mounted.pop(volume_id, None)
        if self.persistent:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(volume_id))

    def volumes(self) -> list[str]:
        return sorted(self._env)
