"""What /proc shows of a forked mount process: its own command line and environment.

A process forked from the zygote (``chunkfs.zygote``) keeps the zygote's memory, and
``/proc/PID/cmdline`` and ``/proc/PID/environ`` are two areas of that memory: the
argument and environment strings the kernel laid out when the zygote was executed. But
people and tools find a mount by its command line (``ps``, ``pgrep -f``, the node
plugin's checks) and read its environment to see which backend it serves, so the mount
process writes its own argv and environment into those areas, NUL-separated as the
kernel laid them out.

The areas cannot grow (a longer title would have to run the arguments together into one
string, the kernel's setproctitle convention), so the zygote reserves room when it
starts: ``reserve`` re-executes the zygote once with a padding argument and a padding
variable, and the zygote then shows its own short command line in the space. A title
that still does not fit is cut at an argument (or variable) boundary; the process's
real environment (``os.environ``) is complete whatever /proc shows.

The environment area may be overwritten only once the C library no longer points into
it: ``set_title`` first moves every variable to the heap (``os.environ`` clear and
update: unsetenv and setenv), then writes the area.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping

ARGV_ROOM = 8 << 10     # bytes of command line a forked mount can show in full
ENV_ROOM = 32 << 10     # bytes of environment likewise
ROOM_VARIABLE = "CHUNKFS_PROC_ROOM"
ROOM_FLAG = "--room"


def areas() -> tuple[int, int, int, int]:
    """(arg_start, arg_end, env_start, env_end) of this process (proc(5), fields 48-51)."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    arg_start, arg_end, env_start, env_end = (int(x) for x in fields[45:49])
    return arg_start, arg_end, env_start, env_end


def _room() -> tuple[int, int]:
    arg_start, arg_end, env_start, env_end = areas()
    return arg_end - arg_start, env_end - env_start


def reserve() -> None:
    """Re-execute this process with room for forked titles, unless it has it already.
    Call it before importing anything heavy: the imports happen again after the exec."""
    argv_room, env_room = _room()
    if argv_room >= ARGV_ROOM and env_room >= ENV_ROOM:
        return
    argv = [a for a in sys.orig_argv if not a.startswith(ROOM_FLAG + "=")]
    env = {k: v for k, v in os.environ.items() if k != ROOM_VARIABLE}
    argv.append(f"{ROOM_FLAG}={'.' * ARGV_ROOM}")
    env[ROOM_VARIABLE] = "." * ENV_ROOM
    os.execve(sys.executable, argv, env)


def _pack(items: list[str], room: int) -> bytes:
    """NUL-terminated items, as many whole ones as fit in ``room``, NUL-padded to it."""
    out = bytearray()
    for item in items:
        raw = item.encode(errors="surrogateescape") + b"\0"
        if len(out) + len(raw) > room:
            break
        out += raw
    return bytes(out) + bytes(room - len(out))


def set_title(argv: list[str], env: Mapping[str, str]) -> None:
    """Make this process's environment ``env`` and show ``argv`` and ``env`` in /proc."""
    os.environ.clear()  # unsetenv: the C library lets go of the strings in the area
    os.environ.update(env)  # setenv: copies on the heap
    arg_start, arg_end, env_start, env_end = areas()
    ctypes.memmove(arg_start, _pack(argv, arg_end - arg_start), arg_end - arg_start)
    items = [f"{k}={v}" for k, v in env.items()]
    ctypes.memmove(env_start, _pack(items, env_end - env_start), env_end - env_start)
