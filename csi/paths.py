"""Paths from the CO (staging, target and volume paths), checked without following symlinks.

A staging or target path that is, or passes through, a symlink could aim a root-owned
bind mount, unmount or rmdir at any place on the node (``.../mount -> /etc``). So:

1. ``KubeletDir.canonical`` (lexical, no filesystem access): the path must be absolute,
   contain no ``..`` and lie strictly under ``--kubelet-dir``; it is rewritten under the
   kubelet dir's real path (that directory itself may be a symlink, resolved once).
2. ``open_dir`` / ``inspect`` walk the canonical path from ``/`` one component at a time,
   each opened with ``O_PATH | O_NOFOLLOW | O_DIRECTORY`` relative to the previous one:
   a symlink anywhere (the final component included) is refused, and so is a parent that
   is a FUSE mount (its contents belong to whoever serves it, and it may hang). Nothing
   is resolved twice, so swapping a directory for a symlink between check and use
   cannot redirect the operation.
3. Callers then act on what they verified: bind mounts are made onto the ``O_PATH``
   descriptor (``csi/mountcalls.py``), unmounts refuse a final symlink
   (``UMOUNT_NOFOLLOW``) and only touch mounts of the request's volume (mount table),
   and directories are created and removed relative to a verified parent descriptor.

The chunkfs FUSE mount itself is made by ``chunkfs mount`` at the verified path string:
the window between the check and that mount can only be used by someone who can write
kubelet's plugin directory (root on the node); the mount is checked afterwards (the
mount table must show this volume at exactly that path).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import stat
from collections.abc import Iterator, Mapping

from csi import errors
from csi.mountinfo import MountEntry, mounts

_OPEN = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
DIR_MODE = 0o750


class PathError(Exception):
    """A path that must not be used (a symlink, not a directory, inside a FUSE mount)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Kind(enum.Enum):
    MISSING = "missing"
    DIRECTORY = "directory"      # a plain directory, nothing mounted on it
    MOUNTPOINT = "mountpoint"    # something is mounted there (see the mount table)


class KubeletDir:
    """The directory every staging and target path must be under."""

    def __init__(self, root: str | None) -> None:
        self.given = os.path.normpath(root or "/")
        self.real = os.path.realpath(self.given)

    def canonical(self, field: str, path: str) -> str:
        """The path under the kubelet dir's real path; INVALID_ARGUMENT when it is not
        absolute, contains ``..`` or is not strictly under the kubelet dir."""
        if not path.startswith("/") or "\0" in path:
            raise errors.invalid(field, f"{path!r} is not an absolute path")
        if ".." in path.split("/"):
            raise errors.invalid(field, f"{path!r} must not contain '..'")
        norm = os.path.normpath(path)
        for prefix in dict.fromkeys((self.given, self.real)):
            if prefix == "/" and norm != "/":
                return norm
            if norm.startswith(prefix + "/"):
                return os.path.join(self.real, norm[len(prefix) + 1:])
        raise errors.path_outside(field, path, self.given)


def _components(path: str) -> list[str]:
    return [c for c in path.split("/") if c]


def _refuse(dir_fd: int, name: str, shown: str) -> PathError:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        return PathError(f"{shown} cannot be checked: {exc.strerror}")
    if stat.S_ISLNK(st.st_mode):
        return PathError(f"{shown} is a symlink; symlinks are never followed")
    return PathError(f"{shown} is not a directory")


def open_dir(path: str, *, create: bool = False, table: Mapping[str, MountEntry] | None = None
             ) -> int:
    """An ``O_PATH`` descriptor of the directory ``path`` (absolute, normalised), reached
    without following any symlink. Missing components are created (``create``) or raise
    FileNotFoundError. The caller closes the descriptor."""
    table = mounts() if table is None else table
    parts = _components(path)
    fd = os.open("/", _OPEN)
    try:
        for i, name in enumerate(parts):
            shown = "/" + "/".join(parts[:i + 1])
            if i < len(parts) - 1 and shown in table and table[shown].fstype.startswith("fuse"):
                raise PathError(f"{path} lies inside the FUSE mount at {shown}")
            try:
                child = os.open(name, _OPEN, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):  # raced with another creator
                    os.mkdir(name, DIR_MODE, dir_fd=fd)
                child = _open_child(fd, name, shown)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _refuse(fd, name, shown) from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_child(fd: int, name: str, shown: str) -> int:
    try:
        return os.open(name, _OPEN, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _refuse(fd, name, shown) from None
        raise


@contextlib.contextmanager
def opened(path: str, *, create: bool = False,
           table: Mapping[str, MountEntry] | None = None) -> Iterator[int]:
    fd = open_dir(path, create=create, table=table)
    try:
        yield fd
    finally:
        os.close(fd)


def inspect(path: str, table: Mapping[str, MountEntry] | None = None) -> Kind:
    """What is at ``path``, never following a symlink and never touching what is mounted
    there (a dead or hung FUSE mount must not block the check). Raises PathError."""
    table = mounts() if table is None else table
    if path in table:  # a mount point is never a symlink; its parents are checked here
        with opened(os.path.dirname(path), table=table):
            return Kind.MOUNTPOINT
    try:
        parent = open_dir(os.path.dirname(path), table=table)
    except FileNotFoundError:
        return Kind.MISSING
    try:
        st = os.stat(os.path.basename(path), dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return Kind.MISSING
    finally:
        os.close(parent)
    if stat.S_ISLNK(st.st_mode):
        raise PathError(f"{path} is a symlink; symlinks are never followed")
    if not stat.S_ISDIR(st.st_mode):
        raise PathError(f"{path} is not a directory")
    return Kind.DIRECTORY


def make_dir(path: str) -> None:
    """Create ``path`` (and missing parents) without following symlinks."""
    with opened(path, create=True):
        pass


def remove_dir(path: str) -> None:
    """rmdir ``path`` relative to its verified parent; absent is fine, a non-empty or
    non-directory entry is left alone (OSError ENOTEMPTY / ENOTDIR)."""
    try:
        parent = open_dir(os.path.dirname(path))
    except FileNotFoundError:
        return
    try:
        os.rmdir(os.path.basename(path), dir_fd=parent)
    except FileNotFoundError:
        pass
    finally:
        os.close(parent)
