"""Every error the CSI plugins return: the message strings and their gRPC codes.

Handlers raise ``CsiError`` (built by the helpers below) or let a typed chunkfs error
escape; the interceptor in ``csi/observe.py`` turns either into a gRPC status through
``to_status``, the only place where chunkfs errors meet gRPC codes. The codes follow
the error tables of the CSI spec v1.12.0 for each RPC.
"""

from __future__ import annotations

import grpc

from chunkfs import errors as cf


class CsiError(Exception):
    """An error with the gRPC status code the spec prescribes for it."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _err(code: grpc.StatusCode, message: str) -> CsiError:
    return CsiError(code, message)


# --- INVALID_ARGUMENT: the caller must fix the request ------------------------------

def missing(field: str) -> CsiError:
    return _err(grpc.StatusCode.INVALID_ARGUMENT, f"{field} is required")


def invalid(field: str, why: str) -> CsiError:
    return _err(grpc.StatusCode.INVALID_ARGUMENT, f"invalid {field}: {why}")


def unsupported_capability(why: str) -> CsiError:
    return _err(grpc.StatusCode.INVALID_ARGUMENT, f"unsupported volume capability: {why}")


def unknown_parameter(key: str, known: list[str]) -> CsiError:
    return _err(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"unknown parameter {key!r}; supported: {', '.join(known) or 'none'}",
    )


def credential_in_parameters(key: str) -> CsiError:
    return _err(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"parameter {key!r} names a backend setting: backend settings and credentials come "
        "only from the CSI secrets (csi.storage.k8s.io/*-secret-name), never from parameters",
    )


def path_outside(field: str, path: str, root: str) -> CsiError:
    return _err(grpc.StatusCode.INVALID_ARGUMENT, f"{field} {path!r} is not under {root}")


def unsafe_path(field: str, path: str, why: str) -> CsiError:
    return _err(grpc.StatusCode.INVALID_ARGUMENT, f"refusing {field} {path!r}: {why}")


# --- NOT_FOUND ----------------------------------------------------------------------

def volume_not_found(volume_id: str) -> CsiError:
    return _err(grpc.StatusCode.NOT_FOUND, f"volume {volume_id!r} does not exist")


def snapshot_not_found(snapshot_id: str) -> CsiError:
    return _err(grpc.StatusCode.NOT_FOUND, f"snapshot {snapshot_id!r} does not exist")


def node_not_found(node_id: str) -> CsiError:
    return _err(grpc.StatusCode.NOT_FOUND,
                f"node {node_id!r} does not exist: no node plugin registered with that id "
                "(NodeGetInfo's node_id) in the default backend")


def not_mounted_at(volume_id: str, path: str, why: str = "") -> CsiError:
    return _err(grpc.StatusCode.NOT_FOUND,
                f"volume {volume_id!r} is not staged or published at {path!r}"
                + (f": {why}" if why else ""))


# --- ALREADY_EXISTS: same name, different request -----------------------------------

def volume_exists_incompatible(name: str, why: str) -> CsiError:
    return _err(grpc.StatusCode.ALREADY_EXISTS,
                f"volume {name!r} already exists with different arguments: {why}")


def snapshot_exists_incompatible(name: str, source: str) -> CsiError:
    return _err(grpc.StatusCode.ALREADY_EXISTS,
                f"snapshot {name!r} already exists for another volume ({source!r})")


def published_incompatible(volume_id: str, where: str, why: str) -> CsiError:
    return _err(grpc.StatusCode.ALREADY_EXISTS,
                f"volume {volume_id!r} is already published at {where} with {why}")


# --- FAILED_PRECONDITION ------------------------------------------------------------

def published_elsewhere(volume_id: str, node_id: str) -> CsiError:
    return _err(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"volume {volume_id!r} is published for writing at node {node_id!r}; "
        "ControllerUnpublishVolume it there first",
    )


def volume_in_use(volume_id: str, why: str) -> CsiError:
    return _err(grpc.StatusCode.FAILED_PRECONDITION, f"volume {volume_id!r} is in use: {why}")


def not_staged(volume_id: str, staging_path: str) -> CsiError:
    return _err(grpc.StatusCode.FAILED_PRECONDITION,
                f"volume {volume_id!r} is not staged at {staging_path!r}; call NodeStageVolume")


def staged_elsewhere(volume_id: str, staging_path: str) -> CsiError:
    return _err(grpc.StatusCode.FAILED_PRECONDITION,
                f"volume {volume_id!r} is already staged on this node at {staging_path!r}")


def single_writer_published(volume_id: str, target: str) -> CsiError:
    return _err(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"volume {volume_id!r} has a single-writer access mode and is already published "
        f"at {target!r}",
    )


def staged_read_only(volume_id: str) -> CsiError:
    return _err(grpc.StatusCode.FAILED_PRECONDITION,
                f"volume {volume_id!r} is staged read-only; it cannot be published read-write")


def mounted_by_other(field: str, path: str, what: str) -> CsiError:
    return _err(grpc.StatusCode.FAILED_PRECONDITION,
                f"{field} {path!r} is a mount point of {what}; refusing to mount over or "
                "unmount what this plugin did not mount for the volume")


def credentials_unavailable(volume_id: str) -> CsiError:
    return _err(grpc.StatusCode.FAILED_PRECONDITION,
                f"volume {volume_id!r} needs the credentials of its Secret to be mounted "
                "again, and this node no longer has them (kept in memory only, see "
                "--secrets-dir); the next NodeStageVolume brings them")


def mount_unhealthy(message: str) -> CsiError:
    return _err(grpc.StatusCode.FAILED_PRECONDITION, message)


def plugin_not_healthy(why: str) -> CsiError:
    return _err(grpc.StatusCode.FAILED_PRECONDITION, f"plugin not healthy: {why}")


# --- OUT_OF_RANGE / ABORTED / others ------------------------------------------------

def capacity_out_of_range(why: str) -> CsiError:
    return _err(grpc.StatusCode.OUT_OF_RANGE, f"unsupported capacity range: {why}")


def busy(kind: str, key: str) -> CsiError:
    return _err(grpc.StatusCode.ABORTED,
                f"an operation on {kind} {key!r} is already in progress; retry later")


def bad_token(token: str) -> CsiError:
    return _err(grpc.StatusCode.ABORTED,
                f"invalid starting_token {token!r}; restart the listing without a token")


def mount_rejected(volume_id: str, why: str) -> CsiError:
    return _err(grpc.StatusCode.INVALID_ARGUMENT, f"chunkfs refused to mount {volume_id!r}: {why}")


def mount_failed(volume_id: str, why: str) -> CsiError:
    return _err(grpc.StatusCode.INTERNAL, f"mounting volume {volume_id!r} failed: {why}")


def unmount_failed(path: str, why: str) -> CsiError:
    return _err(grpc.StatusCode.INTERNAL, f"unmounting {path!r} failed: {why}")


def mounter_unavailable(socket_path: str, why: str) -> CsiError:
    return _err(grpc.StatusCode.UNAVAILABLE,
                f"the chunkfs mounter at {socket_path} is not reachable ({why}); is its pod "
                "running on this node?")


def backend_unresolvable(key: str, why: str) -> CsiError:
    return _err(grpc.StatusCode.UNAVAILABLE,
                f"the host named by secret {key!r} cannot be resolved ({why}); retry later")


def timed_out(what: str) -> CsiError:
    return _err(grpc.StatusCode.DEADLINE_EXCEEDED, f"{what} timed out")


# --- chunkfs errors -> gRPC codes (the one place) -----------------------------------

_CODES: list[tuple[type[cf.ChunkfsError], grpc.StatusCode]] = [
    (cf.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (cf.VolumeNotFound, grpc.StatusCode.NOT_FOUND),
    (cf.SnapshotNotFound, grpc.StatusCode.NOT_FOUND),
    (cf.VolumeExists, grpc.StatusCode.ALREADY_EXISTS),
    (cf.SnapshotExists, grpc.StatusCode.ALREADY_EXISTS),
    (cf.NoSpace, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (cf.Fenced, grpc.StatusCode.FAILED_PRECONDITION),
    (cf.ReadOnly, grpc.StatusCode.FAILED_PRECONDITION),
    (cf.LeaseHeld, grpc.StatusCode.FAILED_PRECONDITION),
    (cf.BackupBusy, grpc.StatusCode.ABORTED),
    (cf.MetaUnavailable, grpc.StatusCode.UNAVAILABLE),
    (cf.StorageUnavailable, grpc.StatusCode.UNAVAILABLE),
    (cf.CorruptObject, grpc.StatusCode.DATA_LOSS),
    (cf.NoSuchObject, grpc.StatusCode.DATA_LOSS),
]


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and message for an exception that escaped a handler."""
    if isinstance(exc, CsiError):
        return exc.code, exc.message
    if isinstance(exc, cf.ChunkfsError):
        for kind, code in _CODES:
            if isinstance(exc, kind):
                return code, str(exc) or kind.__name__
        return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "operation timed out"
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}: {exc})"
