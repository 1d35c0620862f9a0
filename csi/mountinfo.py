"""The node's mount table, from /proc/self/mountinfo: parsed here and nowhere else in csi/.

Reading mountinfo never touches a mounted filesystem, so it answers "what is mounted
at this path" even when a FUSE mount is dead or hung (a stat or statfs would block).
"""

from __future__ import annotations

from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True)
class MountEntry:
    mount_point: str
    device: str        # "major:minor": a bind mount shares it with what it binds
    root: str          # the directory of the filesystem mounted there ("/" unless a sub-bind)
    options: frozenset[str]   # per-mount options: ro/rw, nosuid, nodev, noexec, atime flags
    fstype: str        # "fuse.chunkfs", "tmpfs", ...
    source: str        # chunkfs mounts: "chunkfs:<volume>"


def unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_line(line: str) -> MountEntry | None:
    left, sep, right = line.partition(" - ")
    parts, tail = left.split(), right.split()
    if not sep or len(parts) < 6 or len(tail) < 2:
        return None
    return MountEntry(mount_point=unescape(parts[4]), device=parts[2], root=unescape(parts[3]),
                      options=frozenset(parts[5].split(",")), fstype=tail[0],
                      source=unescape(tail[1]))


def mounts() -> dict[str, MountEntry]:
    """Mount point -> the entry mounted on top there (later lines stack over earlier)."""
    table: dict[str, MountEntry] = {}
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            entry = parse_line(line)
            if entry is not None:
                table[entry.mount_point] = entry
    return table
