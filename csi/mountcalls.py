"""mount(2) and umount2(2) for the publish bind mounts, called directly (ctypes).

Not the ``mount``/``umount`` commands: they resolve (canonicalize) their arguments and
follow symlinks, whereas here

* the target of a bind mount is an ``O_PATH`` descriptor of a directory that was opened
  without following any symlink (``csi/paths.py``), passed as ``/proc/self/fd/N``: the
  kernel mounts on exactly that directory, whatever the path names by then;
* unmounts use ``UMOUNT_NOFOLLOW``: a final component that became a symlink is refused
  by the kernel, never followed;
* every publish mount gets ``nosuid,nodev`` (the flags ``suid`` and ``dev`` are refused
  earlier, in ``csi/validate.py``).

The calls block (the kernel may wait for the filesystem): callers run them in a thread.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable

_libc = ctypes.CDLL(None, use_errno=True)

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

ALWAYS = MS_NOSUID | MS_NODEV  # publish mounts never honour setuid bits or device nodes
# flag -> (bit, set it?) for the per-mount flags a publish may ask for
_FLAGS = {
    "nosuid": (MS_NOSUID, True), "nodev": (MS_NODEV, True),
    "noexec": (MS_NOEXEC, True), "exec": (MS_NOEXEC, False),
    "noatime": (MS_NOATIME, True), "atime": (MS_NOATIME, False),
    "nodiratime": (MS_NODIRATIME, True), "diratime": (MS_NODIRATIME, False),
    "relatime": (MS_RELATIME, True), "norelatime": (MS_RELATIME, False),
    "strictatime": (MS_STRICTATIME, True), "nostrictatime": (MS_STRICTATIME, False),
}


def publish_flags(readonly: bool, flags: Iterable[str]) -> int:
    """The MS_* bits of a publish mount: ``nosuid,nodev`` always, then the flags in order
    (``ro``/``rw`` are decided by ``readonly``)."""
    bits = ALWAYS | (MS_RDONLY if readonly else 0)
    for flag in flags:
        if flag in ("ro", "rw"):
            continue
        if flag not in _FLAGS:
            raise ValueError(f"mount flag {flag!r} is not allowed on a publish mount")
        bit, on = _FLAGS[flag]
        bits = bits | bit if on else bits & ~bit
    return bits | ALWAYS


def fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), what)


def bind(source: str, target_fd: int) -> None:
    """Bind-mount ``source`` onto the directory ``target_fd`` refers to."""
    _check(_libc.mount(os.fsencode(source), os.fsencode(fd_path(target_fd)), None,
                       MS_BIND, None), source)


def remount(mount_fd: int, bits: int) -> None:
    """Set the per-mount flags of the bind mount whose root ``mount_fd`` refers to."""
    _check(_libc.mount(None, os.fsencode(fd_path(mount_fd)), None,
                       MS_REMOUNT | MS_BIND | bits, None), "remount")


def umount(path: str, *, lazy: bool = False) -> None:
    """Unmount the mount at ``path``, refusing (EINVAL) a final component that is a symlink;
    ``lazy`` detaches it even while busy or dead."""
    _check(_libc.umount2(os.fsencode(path), UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)),
           path)
