"""Checks of request values shared by the servicers; each raises a ``CsiError``.

What the driver supports, in one place: filesystem (mount) volumes only, the access
modes below, the StorageClass parameters below, ids safe to use as file names, and the
capacity rules of CreateVolume and ControllerExpandVolume. (Paths: ``csi/paths.py``.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from chunkfs.config import parse_size
from chunkfs.errors import InvalidArgument
from csi import errors
from csi.v1 import csi_pb2

Mode = csi_pb2.VolumeCapability.AccessMode

# Publishing a volume in one of these modes hands the node the writer lease (fencing).
SINGLE_WRITER_MODES = frozenset({
    Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_SINGLE_WRITER, Mode.SINGLE_NODE_MULTI_WRITER,
})
READ_ONLY_MODES = frozenset({Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY})
# Modes whose volume may be published to one node at a time (ControllerPublishVolume).
SINGLE_NODE_MODES = SINGLE_WRITER_MODES | {Mode.SINGLE_NODE_READER_ONLY}
SUPPORTED_MODES = SINGLE_WRITER_MODES | READ_ONLY_MODES | {Mode.MULTI_NODE_MULTI_WRITER}
# Modes whose volume may be published at one target per node only (spec, NodePublishVolume).
ONE_TARGET_MODES = frozenset({Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_SINGLE_WRITER,
                              Mode.SINGLE_NODE_READER_ONLY})
FS_TYPES = frozenset({"", "chunkfs", "fuse.chunkfs"})

# What ValidateVolumeCapabilities says when it confirms MULTI_NODE_MULTI_WRITER (one line:
# update it when the data path merges concurrent writers of one file; docs/dev/csi.md).
MULTI_NODE_MULTI_WRITER_NOTE = (
    "MULTI_NODE_MULTI_WRITER: nodes may create, replace, rename, delete and write files "
    "concurrently; writers of one file keep each other's bytes (commits append slices; "
    "for the same bytes the last commit wins); close-to-open consistency: a node sees "
    "another's writes when it next opens the file")

# Mount flags that apply to the publish bind mount; any other flag is a chunkfs mount
# option, passed to `chunkfs mount -o` at NodeStageVolume. Publish mounts are always
# nosuid,nodev: "suid" and "dev" would let a pod run setuid binaries or open device
# nodes found in a volume (which another tenant or pod may have written), so they are
# refused, as is anything that changes the kind of mount.
BIND_FLAGS = frozenset({
    "ro", "rw", "nosuid", "nodev", "noexec", "exec", "noatime", "atime",
    "nodiratime", "diratime", "relatime", "norelatime", "strictatime", "nostrictatime",
})
_REFUSED_FLAGS = {
    "suid": "publish mounts are always nosuid (setuid binaries in a volume must not run "
            "with their owner's rights)",
    "dev": "publish mounts are always nodev (device nodes in a volume must not open "
           "devices of the node)",
    "bind": "the driver makes the bind mount itself", "rbind": "the driver makes the bind "
    "mount itself", "remount": "the driver makes the bind mount itself",
}
_RESERVED_OPTIONS = frozenset({"epoch"})  # set by the driver only: it is the fencing token
_OPTION_RE = re.compile(r"^[A-Za-z0-9_.:/+-]+(=[A-Za-z0-9_.:/+-]*)?$")

# StorageClass parameters (carried to NodeStageVolume in volume_context). chunkfs mount
# options (buffer-size, io-timeout, ...) come from the StorageClass's mountOptions, which
# reach the driver as mount_flags. Backend settings are refused: secrets only.
PARAMETERS = ("cache-size",)
BACKEND_KEYS = frozenset({"meta-url", "storage", "endpoint", "region", "access-key-id",
                          "secret-access-key"})
_IGNORED_PREFIX = "csi.storage.k8s.io/"  # external-provisioner metadata, not ours

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_ID = 128  # bytes; the spec's size limit for strings
_NODE_ID_RE = re.compile(r"^[^\x00-\x20\x7f]{1,128}$")


def access_mode(cap: csi_pb2.VolumeCapability) -> int:
    return cap.access_mode.mode


def capability_problem(cap: csi_pb2.VolumeCapability) -> str | None:
    """Why a capability is not supported, or None when it is."""
    if cap.HasField("block"):
        return "block volumes are not supported, only mount volumes"
    if not cap.HasField("mount"):
        return "access_type (mount) is required"
    if cap.mount.fs_type not in FS_TYPES:
        return f"fs_type {cap.mount.fs_type!r} is not supported (leave it empty or 'chunkfs')"
    if not cap.HasField("access_mode"):
        return "access_mode is required"
    if cap.access_mode.mode not in SUPPORTED_MODES:
        return f"access mode {Mode.Mode.Name(cap.access_mode.mode)} is not supported"
    return None


def check_capabilities(caps: Iterable[csi_pb2.VolumeCapability]) -> None:
    for cap in caps:
        problem = capability_problem(cap)
        if problem:
            raise errors.unsupported_capability(problem)
        split_mount_flags(cap.mount.mount_flags)


def split_mount_flags(flags: Iterable[str]) -> tuple[list[str], list[str]]:
    """(flags for the bind mount, options for `chunkfs mount -o`)."""
    bind: list[str] = []
    options: list[str] = []
    for flag in flags:
        for item in flag.split(","):
            item = item.strip()
            if not item:
                continue
            if not _OPTION_RE.match(item):
                raise errors.invalid("mount_flags", f"{item!r} is not a mount option")
            if item.split("=", 1)[0] in _RESERVED_OPTIONS:
                raise errors.invalid("mount_flags", f"{item!r} is set by the driver only")
            if item in _REFUSED_FLAGS:
                raise errors.invalid("mount_flags", f"{item!r} is refused: "
                                     f"{_REFUSED_FLAGS[item]}")
            (bind if item in BIND_FLAGS else options).append(item)
    return bind, options


def is_id(value: str) -> bool:
    """Whether ``value`` has the shape of a volume or snapshot id (``check_id``)."""
    return len(value.encode()) <= MAX_ID and bool(_ID_RE.match(value))


def check_id(field: str, value: str) -> str:
    """Volume and snapshot ids double as file names on the node: keep them plain."""
    if len(value.encode()) > MAX_ID or not _ID_RE.match(value):
        raise errors.invalid(
            field, f"{value!r} must be 1-{MAX_ID} characters of [A-Za-z0-9._-], "
            "starting with a letter or digit")
    return value


def check_node_id(field: str, value: str) -> str:
    """Node ids are the CO's (Kubernetes node names): printable, no blanks, <= 128 bytes."""
    if len(value.encode()) > MAX_ID or not _NODE_ID_RE.match(value):
        raise errors.invalid(field, f"{value!r} must be 1-{MAX_ID} printable characters "
                             "without blanks")
    return value


@dataclass(frozen=True)
class CapacityRules:
    default: int = 1 << 30      # CreateVolume without a capacity range
    minimum: int = 1 << 20
    maximum: int = 1 << 50      # 1 PiB: S3 has no size, the quota needs a bound


def capacity_range(cr: csi_pb2.CapacityRange | None) -> tuple[int, int]:
    """(required, limit) with 0 meaning unset; negative values are INVALID_ARGUMENT."""
    if cr is None:
        return 0, 0
    if cr.required_bytes < 0 or cr.limit_bytes < 0:
        raise errors.invalid("capacity_range", "bytes must not be negative")
    if cr.limit_bytes and cr.required_bytes > cr.limit_bytes:
        raise errors.capacity_out_of_range(
            f"required_bytes {cr.required_bytes} exceeds limit_bytes {cr.limit_bytes}")
    return cr.required_bytes, cr.limit_bytes


def choose_capacity(required: int, limit: int, rules: CapacityRules, floor: int = 0) -> int:
    """The size of a new volume: at least ``required`` and ``floor`` (a snapshot's size),
    at most ``limit``; OUT_OF_RANGE when no size satisfies both the request and the rules."""
    want = required or (min(rules.default, limit) if limit else rules.default)
    want = max(want, rules.minimum, floor)
    if limit and want > limit:
        why = (f"the source needs {floor} bytes" if floor > max(required, rules.minimum)
               else f"the minimum volume size is {rules.minimum} bytes")
        raise errors.capacity_out_of_range(f"limit_bytes {limit} is too small: {why}")
    if want > rules.maximum:
        raise errors.capacity_out_of_range(
            f"{want} bytes exceeds the maximum volume size {rules.maximum}")
    return want


def volume_options(parameters: Mapping[str, str]) -> dict[str, str]:
    """StorageClass parameters -> the volume_context NodeStageVolume mounts with."""
    options: dict[str, str] = {}
    for key, value in parameters.items():
        if key.startswith(_IGNORED_PREFIX):
            continue
        if key in BACKEND_KEYS:
            raise errors.credential_in_parameters(key)
        if key == "cache-size":
            try:
                parse_size(value)
            except InvalidArgument as exc:
                raise errors.invalid("parameter cache-size", str(exc)) from None
        else:
            raise errors.unknown_parameter(key, list(PARAMETERS))
        options[key] = value
    return options


TOKEN_PREFIX = "after:"


def next_token(name: str) -> str:
    """Pagination tokens name the last entry returned: listings are sorted by name, so a
    token stays valid when that entry is deleted between pages."""
    return TOKEN_PREFIX + name


def page(names: list[str], starting_token: str, max_entries: int) -> tuple[int, int, str]:
    """(start, end, next_token) of one page of a name-sorted listing."""
    if max_entries < 0:
        raise errors.invalid("max_entries", "must not be negative")
    start = 0
    if starting_token:
        if not starting_token.startswith(TOKEN_PREFIX) or len(starting_token) == len(
                TOKEN_PREFIX):
            raise errors.bad_token(starting_token)
        after = starting_token[len(TOKEN_PREFIX):]
        start = next((i for i, n in enumerate(names) if n > after), len(names))
    end = len(names) if not max_entries else min(len(names), start + max_entries)
    token = next_token(names[end - 1]) if end < len(names) and end > start else ""
    return start, end, token
