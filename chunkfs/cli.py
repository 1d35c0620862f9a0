"""The ``chunkfs`` command line: argument parsing only; the work is in the service layer.

Exit status: 0 success, 1 operational error (unreachable backend, failed mount),
2 bad usage or bad input. Every error is one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import logging
import os
import subprocess
import sys
import time
import types
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn

from chunkfs import eventloop, logs
from chunkfs.config import backend_from_env, format_size, parse_size
from chunkfs.control import Connection, ControlError, query_status
from chunkfs.errors import (
    ChunkfsError,
    InvalidArgument,
    SnapshotExists,
    SnapshotNotFound,
    VolumeExists,
    VolumeNotFound,
)
from chunkfs.meta.schema import GcRun

if TYPE_CHECKING:  # the volume service pulls in both backends' clients (~0.5 s of imports):
    # only the commands that use it import it, so that `chunkfs mount` handing its request
    # to a zygote (chunkfs.zygote) starts in a few tens of milliseconds
    from chunkfs.volumes import SnapshotInfo, VolumeDetails, VolumeInfo, VolumeService

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
STATUS_FILE = ".chunkfs.status"


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int_arg(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"seconds must be a finite number >= 0, got {text!r}")
    return value


def _directory_arg(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing directory")
    return text


def _parse_mount_options(text: str | None) -> dict[str, str]:
    opts: dict[str, str] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if part:
            key, _, value = part.partition("=")
            opts[key] = value
    return opts


# ---- volume commands ---------------------------------------------------------------
async def _with_service(args: argparse.Namespace,
                        action: Callable[[VolumeService], Awaitable[int]]) -> int:
    from chunkfs.volumes import VolumeService

    meta, storage = backend_from_env(args.meta, args.storage)
    svc = await VolumeService.open(meta, storage)
    try:
        return await action(svc)
    finally:
        await svc.close()


def _volume_doc(v: VolumeInfo) -> dict[str, Any]:
    return {"name": v.name, "id": v.id, "capacity": v.capacity, "used_bytes": v.used_bytes,
            "inodes": v.used_inodes, "created": v.created, "epoch": v.epoch,
            "writer": v.writer, "source": v.source, "block_size": v.block_size,
            "max_inodes": v.max_inodes}


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _gc_line(run: GcRun | None) -> str:
    if run is None:
        return "never (no garbage collection recorded in this metadata engine)"
    what = "dry run, would delete" if run.dry_run else "deleted"
    if run.ok:
        return (f"{_when(run.finished)}, ok: {what} {run.deleted} of {run.objects} objects "
                f"({format_size(run.deleted_bytes)}) in {run.seconds:.1f}s")
    last_ok = _when(run.success) if run.success else "never"
    return f"{_when(run.finished)}, FAILED: {run.error} (last success: {last_ok})"


def _backup_line(last: dict[str, Any] | None) -> str:
    if not last:
        return "never"
    return (f"{_when(float(last['finished']))} ({last.get('kind', 'full')}): "
            f"{last.get('files')} files, "
            f"{format_size(int(last.get('size_bytes', 0)))}, wrote "
            f"{last.get('pages_written')} of {last.get('pages')} pages "
            f"({format_size(int(last.get('bytes_written', 0)))}); {last.get('url')}")


def _print_volume(d: VolumeDetails, as_json: bool) -> None:
    v = d.info
    if as_json:
        print(json.dumps({**_volume_doc(v), "files": v.used_inodes, "snapshots": d.snapshots,
                          "clones": d.clones, "backups": d.backups, "last_backup": d.last_backup,
                          "last_gc": d.last_gc.as_dict() if d.last_gc else None}, indent=2))
        return
    print(f"name:       {v.name}\nid:         {v.id}\ncapacity:   {format_size(v.capacity)}"
          f" ({v.capacity} bytes)\nused:       {format_size(v.used_bytes)} ({v.used_bytes} bytes)"
          f"\nfiles:      {v.used_inodes} inodes of {v.max_inodes} (files, directories, links)"
          f"\nepoch:      {v.epoch}\nwriter:     {v.writer or '-'}"
          f"\nsource:     {v.source or '-'}\ncreated:    {_when(v.created)}"
          f"\nsnapshots:  {', '.join(d.snapshots) or '-'}"
          f"\nclones:     {', '.join(d.clones) or '-'}"
          f"\nbackups:    {len(d.backups)} ({', '.join(d.backups[-3:]) or '-'}"
          f"{', ...' if len(d.backups) > 3 else ''})"
          f"\nlast backup: {_backup_line(d.last_backup)}"
          f"\nlast gc:    {_gc_line(d.last_gc)}")


async def cmd_volume_create(args: argparse.Namespace) -> int:
    async def act(svc: VolumeService) -> int:
        try:
            info = await svc.create_volume(args.name, args.capacity,
                                           source_snapshot=args.from_snapshot,
                                           source_volume=args.from_volume,
                                           max_inodes=args.max_inodes)
        except VolumeExists as exc:
            raise CliError(f"volume {args.name!r} already exists", EXIT_ERROR) from exc
        print(f"created volume {info.name} ({format_size(info.capacity)})")
        return EXIT_OK
    return await _with_service(args, act)


async def cmd_volume_backup(args: argparse.Namespace) -> int:
    async def act(svc: VolumeService) -> int:
        report = await svc.backup_volume(args.name, keep=args.keep, full=args.full)
        if args.json:
            print(json.dumps(report.as_dict(), indent=2))
            return EXIT_OK
        of = f" of {report.base}" if report.base else ""
        print(f"backed up volume {report.volume} ({report.kind}{of}, read {report.captured} "
              f"inodes): {report.files} files, "
              f"{format_size(report.size_bytes)}; wrote {report.pages_written} of "
              f"{report.pages} pages ({format_size(report.bytes_written)}) in "
              f"{report.seconds:.1f}s; expired {len(report.expired)} old backup(s)")
        print(report.url)  # the last line: what `volume restore` takes
        return EXIT_OK
    return await _with_service(args, act)


def _restore_backend(args: argparse.Namespace, url: str) -> tuple[str, str, Any]:
    """(meta URL, manifest key, storage config) of a restore: the prefix is the URL's."""
    from chunkfs.backup import split_manifest_url
    from chunkfs.config import StorageConfig

    storage_url, key = split_manifest_url(url)
    given = args.storage or os.environ.get("CHUNKFS_STORAGE")
    if given and StorageConfig.from_url(given).url != StorageConfig.from_url(storage_url).url:
        raise InvalidArgument(f"the manifest is under {storage_url}, but the storage is "
                              f"{StorageConfig.from_url(given).url}: a volume's blocks stay "
                              "where its manifest is (drop --storage or make them agree)")
    meta, storage = backend_from_env(args.meta, storage_url)
    return meta, key, storage


async def cmd_volume_restore(args: argparse.Namespace) -> int:
    from chunkfs.volumes import VolumeService

    meta, key, storage = _restore_backend(args, args.url)
    svc = await VolumeService.open(meta, storage)
    try:
        try:
            info, checked = await svc.restore_volume(key, args.name, capacity=args.capacity)
        except VolumeExists as exc:
            raise CliError(f"volume {args.name!r} already exists") from exc
    finally:
        await svc.close()
    print(f"restored volume {info.name} from {args.url}: {info.used_inodes} files, "
          f"{format_size(info.used_bytes)}, {checked} block objects read and verified")
    return EXIT_OK


async def _list_from(args: argparse.Namespace) -> int:
    """What a prefix can restore, read from the object store alone (no Redis)."""
    from chunkfs.backup import restore_points
    from chunkfs.config import StorageConfig
    from chunkfs.objstore import ObjectStore

    store = await ObjectStore.create(StorageConfig.from_url(args.from_url), deadline=15.0)
    try:
        points, bad = await restore_points(store)
    finally:
        await store.close()
    if args.json:
        print(json.dumps({"restorable": [p.as_dict() for p in points], "unreadable": bad},
                         indent=2))
        return EXIT_OK
    print(f"{'KIND':<9} {'NAME':<30} {'CREATED':<20} {'SIZE':>10} {'FILES':>8} URL")
    for p in points:
        print(f"{p.kind:<9} {p.name:<30} {_when(p.created):<20} "
              f"{format_size(p.size_bytes):>10} {p.files:>8} {p.url}")
    for key in bad:
        print(f"chunkfs: manifest {key} is unreadable", file=sys.stderr)
    return EXIT_ERROR if bad else EXIT_OK


async def cmd_volume_list(args: argparse.Namespace) -> int:
    if args.from_url:
        return await _list_from(args)

    async def act(svc: VolumeService) -> int:
        vols = await svc.list_volumes()
        if args.json:
            print(json.dumps([_volume_doc(v) for v in vols], indent=2))
            return EXIT_OK
        print(f"{'NAME':<40} {'CAPACITY':>10} {'USED':>10} {'INODES':>8} WRITER")
        for v in vols:
            print(f"{v.name:<40} {format_size(v.capacity):>10} {format_size(v.used_bytes):>10} "
                  f"{v.used_inodes:>8} {v.writer or '-'}")
        return EXIT_OK
    return await _with_service(args, act)


async def cmd_volume_info(args: argparse.Namespace) -> int:
    async def act(svc: VolumeService) -> int:
        _print_volume(await svc.volume_details(args.name), args.json)
        return EXIT_OK
    return await _with_service(args, act)


async def cmd_volume_resize(args: argparse.Namespace) -> int:
    async def act(svc: VolumeService) -> int:
        info = await svc.resize_volume(args.name, args.capacity)
        print(f"resized volume {info.name} to {format_size(info.capacity)}")
        return EXIT_OK
    return await _with_service(args, act)


async def cmd_volume_delete(args: argparse.Namespace) -> int:
    async def act(svc: VolumeService) -> int:
        await svc.delete_volume(args.name)
        print(f"deleted volume {args.name} (its blocks are reclaimed by 'chunkfs gc')")
        return EXIT_OK
    return await _with_service(args, act)


# ---- snapshot commands -------------------------------------------------------------
def _print_snapshot(s: SnapshotInfo) -> None:
    print(f"{s.name:<40} {s.source_volume:<30} {format_size(s.size_bytes):>10} "
          f"{'ready' if s.ready_to_use else 'pending'}")


async def cmd_snapshot_create(args: argparse.Namespace) -> int:
    async def act(svc: VolumeService) -> int:
        try:
            snap = await svc.create_snapshot(args.volume, args.name)
        except SnapshotExists as exc:
            raise CliError(f"snapshot {args.name!r} already exists") from exc
        print(f"created snapshot {snap.name} of {snap.source_volume}")
        print(svc.snapshot_url(snap.name))  # the last line: what `volume restore` takes
        return EXIT_OK
    return await _with_service(args, act)


async def cmd_snapshot_list(args: argparse.Namespace) -> int:
    async def act(svc: VolumeService) -> int:
        snaps = await svc.list_snapshots(args.volume)
        if args.json:
            print(json.dumps([vars(s) for s in snaps], indent=2, default=str))
            return EXIT_OK
        print(f"{'NAME':<40} {'SOURCE':<30} {'SIZE':>10} STATE")
        for s in snaps:
            _print_snapshot(s)
        return EXIT_OK
    return await _with_service(args, act)


async def cmd_snapshot_delete(args: argparse.Namespace) -> int:
    async def act(svc: VolumeService) -> int:
        await svc.delete_snapshot(args.name)
        print(f"deleted snapshot {args.name}")
        return EXIT_OK
    return await _with_service(args, act)


# ---- mount / umount / status --------------------------------------------------------
def _mount_config(args: argparse.Namespace) -> Any:
    from chunkfs.mount import MountConfig

    meta, storage = backend_from_env(args.meta, args.storage)
    opts = _parse_mount_options(args.options)
    known = {"ro", "rw", "epoch", "buffer-size", "io-timeout", "attr-timeout", "entry-timeout",
             "negative-timeout", "readahead", "inline", "memory-cache", "allow_other", "noallow_other",
             "kernel-readahead", "volume-cache", "hot-set", "prefetch"}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise InvalidArgument(f"unknown mount option(s): {', '.join(unknown)}")
    def option(key: str, default: str, convert: Callable[[str], Any]) -> Any:
        value = opts.get(key, default)
        try:
            return convert(value)
        except (ValueError, InvalidArgument) as exc:
            raise InvalidArgument(f"bad value for mount option {key}={value!r}: {exc}") from None

    cfg = MountConfig(
        volume=args.name, mountpoint=os.path.abspath(args.mountpoint), meta_url=meta,
        storage=storage, cache_dir=os.path.abspath(args.cache_dir), cache_size=args.cache_size,
        read_only="ro" in opts, epoch=opts.get("epoch") or None,
        buffer_size=option("buffer-size", "256MiB", parse_size),
        memory_cache=option("memory-cache", "64MiB", parse_size),
        io_timeout=option("io-timeout", "60", float),
        attr_timeout=option("attr-timeout", "1", float),
        entry_timeout=option("entry-timeout", "1", float),
        negative_timeout=option("negative-timeout", "0", float),
        readahead_blocks=option("readahead", "4", int),
        inline_limit=option("inline", "16KiB", parse_size),
        allow_other="noallow_other" not in opts, run_dir=args.run_dir,
        kernel_readahead_kb=option("kernel-readahead", "4MiB", parse_size) // 1024,
        volume_cache=option("volume-cache", "0", parse_size) or None,
        hot_set=option("hot-set", "1000", int),
        prefetch=option("prefetch", "1GiB", parse_size))
    if (min(cfg.io_timeout, cfg.attr_timeout, cfg.entry_timeout, cfg.negative_timeout) < 0
            or cfg.readahead_blocks < 0
            or cfg.hot_set < 0):
        raise InvalidArgument("mount option values must not be negative")
    if not 0 < cfg.io_timeout <= 600:
        # a retried metadata request must end long before its stored reply expires
        raise InvalidArgument(f"io-timeout must be between 0 and 600 seconds, got {cfg.io_timeout}")
    if cfg.epoch is not None and not cfg.epoch.isdigit():
        raise InvalidArgument(f"epoch must be a number, got {cfg.epoch!r}")
    if cfg.buffer_size < 8 << 20:
        raise InvalidArgument("buffer-size must be at least 8MiB")
    return cfg


def _ready_reporter(ready_fd: int | None) -> Callable[[str | None], None]:
    """How the mount process tells ``chunkfs mount`` it is ready (or why it failed)."""

    def on_ready(error: str | None) -> None:
        if ready_fd is None:
            if error:
                print(f"chunkfs: {error}", file=sys.stderr)
            return
        with contextlib.suppress(OSError):
            os.write(ready_fd, (f"error: {error}\n" if error else "ok\n").encode())
            os.close(ready_fd)

    return on_ready


def cmd_mount(args: argparse.Namespace) -> int:
    try:
        eventloop.chosen()
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if args.foreground:
        from chunkfs.mount import run_mount

        cfg = _mount_config(args)
        logs.setup(args.log_level)
        os.makedirs(cfg.cache_dir, exist_ok=True)
        return eventloop.run(run_mount(cfg, _ready_reporter(args.ready_fd)))
    if not args.no_zygote:
        code = _mount_through_zygote(args)
        if code is not None:
            return code
    from chunkfs.mount import run_mount

    cfg, log_path = _prepare_detached(args)
    read_end, write_end = os.pipe()
    if args.in_process or _without_backend_flags(args.raw_argv) != args.raw_argv:
        # a fresh interpreter whose argv carries no backend URL (it may hold a password)
        pid = _spawn_mount_process(args, cfg, log_path, write_end)
    else:
        # fork: the mount process starts with everything imported, about half a second
        # sooner than a new interpreter (time to first byte on a new node)
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            _run_detached(args, cfg, log_path, _ready_reporter(write_end), run_mount)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        line = ready.readline().decode().strip()
    if line == "ok":
        print(_mounted_line(args, cfg, pid, log_path))
        if not args.in_process:
            _leave(EXIT_OK)
        return EXIT_OK
    code = _wait_exit(pid, 30)
    raise CliError(line.removeprefix("error: ") if line.startswith("error: ")
                   else f"mount process exited with status {code}; see {log_path}")


def _leave(code: int) -> NoReturn:
    """Exit without tearing the interpreter down: once the mount process is ready, this
    one has nothing left to do, and unloading every backend library it imported to fork
    it costs a few hundred milliseconds of the mount command's time (its output is
    flushed; it holds nothing else)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _mounted_line(args: argparse.Namespace, cfg: Any, pid: int, log_path: str) -> str:
    return f"mounted {args.name} at {cfg.mountpoint} (pid {pid}, log {log_path})"


def _prepare_detached(args: argparse.Namespace) -> tuple[Any, str]:
    """What a detached mount checks before its process starts: (config, log path)."""
    cfg = _mount_config(args)
    from chunkfs.mount import check_mountpoint

    check_mountpoint(cfg.mountpoint)
    os.makedirs(cfg.cache_dir, exist_ok=True)
    return cfg, args.log_file or os.path.join(cfg.cache_dir, f"mount-{args.name}.log")


def _mount_through_zygote(args: argparse.Namespace) -> int | None:
    """Hand the mount to this installation's zygote (``chunkfs.zygote``), if one answers:
    its fork is the mount process, with everything imported already. None: no zygote
    took it, so this process starts the mount itself."""
    from chunkfs import zygote

    meta, storage = backend_from_env(args.meta, args.storage)
    # as for a spawned mount: the backends in the environment, never in the argv
    env = {**os.environ, "CHUNKFS_META": meta, "CHUNKFS_STORAGE": storage.url}
    argv = _without_backend_flags(args.raw_argv)
    launcher = ([sys.executable, "-m", "chunkfs.cli"] if args.in_process
                else sys.orig_argv[:len(sys.orig_argv) - len(args.raw_argv)])
    reply = zygote.request_mount(args.run_dir, argv, title=[*launcher, *argv], env=env)
    if reply is None:
        return None
    if reply.rc != EXIT_OK:
        raise CliError(reply.message or f"mount failed with status {reply.rc}", reply.rc)
    print(reply.message)
    return EXIT_OK


@functools.cache
def forked_mount_parser() -> argparse.ArgumentParser:
    """The parser a zygote's forks use (built once, in the zygote)."""
    return build_parser(_RaisingParser)


def run_forked_mount(argv: list[str], report: Callable[[dict[str, Any]], None]) -> int:
    """``chunkfs mount ARGV`` in a process the zygote forked for it: check the request as
    the command would, then become the detached mount process (never returns once it
    is one). ``report`` sends the zygote protocol's lines to the client."""
    try:
        args = forked_mount_parser().parse_args(argv)
        if args.run is not cmd_mount or args.foreground:
            raise CliError("the zygote only starts detached mounts", EXIT_USAGE)
        args.raw_argv, args.in_process = list(argv), False
        cfg, log_path = _prepare_detached(args)
    except Exception as exc:  # noqa: BLE001 - each reported as the command would
        code, message = _failure(exc)
        report({"rc": code, "error": message})
        return code
    report({"started": os.getpid(), "log": log_path})

    def on_ready(error: str | None) -> None:
        if error:
            report({"rc": EXIT_ERROR, "error": error})
        else:
            report({"rc": EXIT_OK, "pid": os.getpid(),
                    "message": _mounted_line(args, cfg, os.getpid(), log_path)})

    from chunkfs.mount import run_mount

    _run_detached(args, cfg, log_path, on_ready, run_mount)


def _spawn_mount_process(args: argparse.Namespace, cfg: Any, log_path: str, write_end: int) -> int:
    argv = [sys.executable, "-m", "chunkfs.cli", *_without_backend_flags(args.raw_argv),
            "--foreground", "--ready-fd", str(write_end)]
    # the backends travel in the environment, never in argv: a URL may carry a password
    child_env = {**os.environ, "CHUNKFS_META": cfg.meta_url, "CHUNKFS_STORAGE": cfg.storage.url}
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(argv, env=child_env, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=log_file, pass_fds=(write_end,), start_new_session=True,
                                close_fds=True)
    return proc.pid


def _run_detached(args: argparse.Namespace, cfg: Any, log_path: str,
                  on_ready: Callable[[str | None], None],
                  run_mount: Callable[..., Awaitable[int]]) -> NoReturn:
    """The forked mount process: its own session, logs to the log file; never returns."""

    code = 1
    try:
        os.setsid()
        _redirect_std(log_path)
        logs.setup(args.log_level)
        code = eventloop.run(run_mount(cfg, on_ready))
    except BaseException:  # noqa: BLE001 - report, then leave without unwinding the parent's stack
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _redirect_std(log_path: str) -> None:
    """Standard input from /dev/null, output and errors to the log. Either may open as
    descriptor 0-2 (a forking parent may have closed one): both are moved above those
    first, so that no dup2 overwrites the other."""
    import fcntl

    opened = [os.open(os.devnull, os.O_RDONLY),
              os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)]
    null_fd, log_fd = (fcntl.fcntl(fd, fcntl.F_DUPFD, 3) for fd in opened)
    for fd in opened:
        os.close(fd)
    os.dup2(null_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(null_fd)
    os.close(log_fd)


def _wait_exit(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    return None


def _without_backend_flags(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--meta", "--storage"):
            skip = True
        elif not arg.startswith(("--meta=", "--storage=")):
            out.append(arg)
    return out


def _read_status(mountpoint: str, run_dir: str | None) -> dict[str, Any]:
    """The mount's state from its control socket (never from the volume: see
    chunkfs.control); a caller who may not use the socket reads the virtual file."""
    try:
        return query_status(mountpoint, run_dir=run_dir)
    except ControlError as exc:
        if os.geteuid() == 0:
            raise _not_a_mount(mountpoint, exc) from None
    return _read_status_file(mountpoint)


def _not_a_mount(mountpoint: str, exc: ControlError) -> CliError:
    if not os.path.ismount(mountpoint):
        return CliError(f"{mountpoint} is not a chunkfs mount", EXIT_USAGE)
    try:
        os.statvfs(mountpoint)
    except OSError as err:
        if err.errno == errno.ENOTCONN:
            return CliError(f"{mountpoint}: the chunkfs process is gone (stale mount)")
    return CliError(str(exc))


def _read_status_file(mountpoint: str) -> dict[str, Any]:
    """For unprivileged users: what the mount shows everyone (bounded, no symlinks)."""
    try:
        fd = os.open(os.path.join(mountpoint, STATUS_FILE), os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise CliError(f"{mountpoint} is not a chunkfs mount", EXIT_USAGE) from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise CliError(f"{mountpoint}: the chunkfs process is gone (stale mount)") from None
        raise CliError(f"{mountpoint}: {exc.strerror}") from None
    try:
        data = os.read(fd, 256 * 1024)
    finally:
        os.close(fd)
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise CliError(f"{mountpoint}: unreadable status") from None
    if not isinstance(doc, dict):
        raise CliError(f"{mountpoint}: unreadable status")
    return doc


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def cmd_umount(args: argparse.Namespace) -> int:
    """Ask the mount process to flush, unmount and exit, and wait until it has. Its pid
    comes from the kernel (the control socket's peer), never from the volume."""
    mountpoint = os.path.abspath(args.mountpoint)
    try:
        with Connection(mountpoint, run_dir=args.run_dir, timeout=10) as conn:
            conn.send("unmount")
            conn.receive()
            try:
                final = conn.receive(timeout=args.timeout)
            except ControlError as exc:  # gone without a word: its exit status tells
                if "closed the connection" not in str(exc):
                    raise CliError(f"mount process {conn.peer_pid} did not exit within "
                                   f"{args.timeout:.0f}s (data still uploading?)") from None
                final = {"clean": not os.path.ismount(mountpoint)}
            pid = conn.peer_pid
    except ControlError as exc:
        err = _not_a_mount(mountpoint, exc)
        if "stale mount" in str(err):
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False)
            print(f"cleared stale mount {mountpoint}")
            return EXIT_OK
        raise err from None
    deadline = time.monotonic() + 30
    while pid and _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if not final.get("clean", False):
        raise CliError(f"unmounted {mountpoint}, but flushing its data failed (see its log)")
    print(f"unmounted {mountpoint}")
    return EXIT_OK


def _durability_lines(report: dict[str, Any]) -> str:
    """What ``chunkfs.meta.durability`` found at mount: one line, plus one per risk."""
    if not report:
        return ""
    servers = ", ".join(f"{s['server']} appendonly {s['appendonly']} appendfsync "
                        f"{s['appendfsync']}" for s in report.get("servers", []))
    head = f"durability:    {'ok' if report.get('ok') else 'AT RISK'} ({report.get('shape')}"
    if report.get("wait_replicas"):
        head += f", mutations wait for {report['wait_replicas']} replica(s)"
    lines = [f"{head}; {servers})"]
    lines += [f"  warning:     {w}" for w in report.get("warnings", [])]
    return "\n".join(lines) + "\n"


def _latency_line(stats: dict[str, Any], requests: int) -> str:
    lat = stats.get("latency", {})
    line = (f"{requests} requests, avg {stats.get('avg_latency_ms', 0)} ms, recent "
            f"{lat.get('recent_ms', 0)} ms, max {lat.get('max_ms', 0)} ms, "
            f"{stats.get('errors', 0)} errors")
    if lat.get("last_error"):
        line += f" (last: {lat['last_error']} at {_when(lat.get('last_error_at', 0))})"
    return line


def _lease_line(lease: dict[str, Any]) -> str:
    holder = lease.get("holder") or "no single writer"
    return (f"{holder}, epoch {lease.get('epoch')} "
            f"({'this mount writes' if lease.get('writes') else 'this mount does not write'})")


def _status_gc_line(doc: dict[str, Any] | None) -> str:
    if not doc:
        return _gc_line(None)
    return _gc_line(GcRun(**{k: v for k, v in doc.items() if k != "age_s"}))


def _warm_line(warm: dict[str, Any]) -> str:
    if not warm or warm.get("state") in ("off", "idle"):
        return warm.get("state", "off") if warm else "-"
    return (f"{warm.get('state')}: {warm.get('prefetched', 0)} blocks "
            f"({format_size(warm.get('prefetched_bytes', 0))}) of {warm.get('planned', 0)} "
            f"planned, {warm.get('progress', 0):.0%}; {warm.get('cached', 0)} of "
            f"{warm.get('listed', 0)} hot blocks were cached already")


def cmd_status(args: argparse.Namespace) -> int:
    status = _read_status(os.path.abspath(args.mountpoint), args.run_dir)
    if args.json:
        print(json.dumps(status, indent=2))
        return EXIT_OK
    cache, s3, redis = status.get("cache", {}), status.get("s3", {}), status.get("redis", {})
    print(f"volume:        {status.get('volume')}  (pid {status.get('pid')}, epoch "
          f"{status.get('epoch')}{', FENCED' if status.get('fenced') else ''})\n"
          f"dirty bytes:   {status.get('dirty_bytes')} in {status.get('dirty_files', 0)} files"
          f", oldest {status.get('dirty_age_s', 0)}s\n"
          f"writer lease:  {_lease_line(status.get('lease', {}))}\n"
          f"cache:         {format_size(cache.get('volume_bytes', 0))} of this volume, "
          f"{format_size(cache.get('bytes', 0))} of {format_size(cache.get('limit', 0))} on the node"
          f", hit ratio {cache.get('hit_ratio', 0):.2%} ({cache.get('hits', 0)} hits, "
          f"{cache.get('misses', 0)} misses, {cache.get('corrupt', 0)} corrupt)\n"
          f"warm start:    {_warm_line(status.get('warm', {}))}\n"
          f"s3:            {_latency_line(s3, sum(s3.get('requests', {}).values()))}\n"
          f"redis:         {_latency_line(redis, redis.get('requests', 0))}\n"
          f"{_durability_lines(status.get('redis_durability', {}))}"
          f"last gc:       {_status_gc_line(status.get('last_gc'))}\n"
          f"last backup:   {_backup_line(status.get('last_backup'))}\n"
          f"errors:        {status.get('errors', 0)} {status.get('last_error', '')}")
    return EXIT_OK


def cmd_zygote(args: argparse.Namespace) -> int:
    from chunkfs import zygote

    logs.setup(args.log_level)
    return zygote.serve(args.run_dir, lifeline=0 if args.lifeline else None)


# ---- maintenance ---------------------------------------------------------------------
async def cmd_gc(args: argparse.Namespace) -> int:
    from chunkfs.gc import collect_garbage
    from chunkfs.progress import TerminalProgress

    async def act(svc: VolumeService) -> int:
        progress = TerminalProgress(sys.stderr)
        try:
            report = await collect_garbage(svc.r, svc.store, grace=args.grace,
                                           dry_run=args.dry_run,
                                           session_grace=args.session_grace,
                                           work_dir=args.work_dir, progress=progress)
        finally:
            progress.close()
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{report.objects} block objects, {report.referenced} referenced by "
              f"{report.namespaces} namespaces and {report.manifests} manifests, "
              f"{report.protected} protected as uploads in flight; {verb} {report.deleted} "
              f"({format_size(report.deleted_bytes)}); kept {report.young} objects younger "
              f"than the grace period and {report.reprieved} uploaded again while GC ran "
              f"({report.seconds:.1f}s)")
        return EXIT_OK
    return await _with_service(args, act)


async def cmd_fsck(args: argparse.Namespace) -> int:
    from chunkfs.fsck import check_namespace

    async def act(svc: VolumeService) -> int:
        try:
            ns = (await svc.get_volume(args.name)).id
        except VolumeNotFound:
            try:
                ns = (await svc.get_snapshot(args.name)).id
            except SnapshotNotFound:
                raise VolumeNotFound(f"no volume or snapshot named {args.name!r}") from None
        problems = await check_namespace(svc.r, ns, svc.store if args.objects else None)
        for line in problems:
            print(line)
        print(f"{args.name}: {len(problems)} problem(s) found")
        return EXIT_ERROR if problems else EXIT_OK
    return await _with_service(args, act)


# ---- parser --------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """Usage errors are one line too (``--help`` shows the usage)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


class _RaisingParser(OneLineParser):
    """For argv that did not come from a terminal (a zygote's request): errors raise."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{self.prog}: error: {message}", EXIT_USAGE)


def build_parser(parser_class: type[OneLineParser] = OneLineParser) -> argparse.ArgumentParser:
    backend = argparse.ArgumentParser(add_help=False)
    backend.add_argument("--meta", help="metadata engine URL, redis://[:password@]host:port/db "
                         "(default: $CHUNKFS_META)")
    backend.add_argument("--storage", help="object storage, s3://bucket/prefix (default: "
                         "$CHUNKFS_STORAGE; endpoint and credentials from AWS_* variables)")
    parser = parser_class(prog="chunkfs", description="A POSIX filesystem whose data "
                                     "lives in S3 and whose metadata lives in Redis.")
    sub = parser.add_subparsers(dest="command", required=True)

    vol = sub.add_parser("volume", help="create, list, inspect, resize and delete volumes")
    vsub = vol.add_subparsers(dest="action", required=True)
    p = vsub.add_parser("create", parents=[backend], help="create a volume")
    p.add_argument("name")
    p.add_argument("--capacity", type=_size_arg, required=True, help="e.g. 10GiB")
    p.add_argument("--max-inodes", type=_positive_int_arg, default=None,
                   help="files, directories and links the volume may hold (default: one per "
                        "4 KiB of capacity, at least 10000)")
    p.add_argument("--from-snapshot", help="clone the volume from this snapshot")
    p.add_argument("--from-volume", help="clone the volume from this volume")
    p.set_defaults(run=cmd_volume_create)
    p = vsub.add_parser("list", parents=[backend], help="list volumes")
    p.add_argument("--json", action="store_true")
    p.add_argument("--from", dest="from_url", metavar="s3://bucket/prefix",
                   help="list the snapshots and backups this prefix can restore, from the "
                        "object store alone (no Redis needed)")
    p.set_defaults(run=cmd_volume_list)
    p = vsub.add_parser("backup", parents=[backend],
                        help="back a volume up to the object store (incremental); prints the "
                             "backup's s3:// URL on its last line")
    p.add_argument("name")
    p.add_argument("--keep", type=_positive_int_arg, default=24,
                   help="backups of the volume to keep, the newest (default 24)")
    p.add_argument("--full", action="store_true",
                   help="read the whole volume instead of what changed since the last backup "
                        "(writers wait while it is copied); the result is the same")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_volume_backup)
    p = vsub.add_parser("restore", parents=[backend],
                        help="recreate a volume from a snapshot's or backup's manifest URL, "
                             "every byte verified (works on an empty Redis)")
    p.add_argument("url", help="s3://bucket/prefix/snapshots/<snapshot>/manifest.json.gz or "
                               "s3://bucket/prefix/backups/<volume>/<id>/manifest.json.gz")
    p.add_argument("name")
    p.add_argument("--capacity", type=_size_arg, default=None,
                   help="the new volume's capacity (default: the manifest's)")
    p.set_defaults(run=cmd_volume_restore)
    p = vsub.add_parser("info", parents=[backend], help="show one volume")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_volume_info)
    p = vsub.add_parser("resize", parents=[backend], help="change a volume's capacity (live)")
    p.add_argument("name")
    p.add_argument("--capacity", type=_size_arg, required=True)
    p.set_defaults(run=cmd_volume_resize)
    p = vsub.add_parser("delete", parents=[backend], help="delete a volume")
    p.add_argument("name")
    p.set_defaults(run=cmd_volume_delete)

    snap = sub.add_parser("snapshot", help="snapshots of volumes (metadata copies)")
    ssub = snap.add_subparsers(dest="action", required=True)
    p = ssub.add_parser("create", parents=[backend], help="snapshot a volume")
    p.add_argument("volume")
    p.add_argument("name")
    p.set_defaults(run=cmd_snapshot_create)
    p = ssub.add_parser("list", parents=[backend], help="list snapshots")
    p.add_argument("--volume")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_snapshot_list)
    p = ssub.add_parser("delete", parents=[backend], help="delete a snapshot")
    p.add_argument("name")
    p.set_defaults(run=cmd_snapshot_delete)

    p = sub.add_parser("mount", parents=[backend], help="mount a volume")
    p.add_argument("--run-dir", default=None,
                   help="root-only directory of the mounts' control sockets (default: "
                        "$CHUNKFS_RUN_DIR, else /run/chunkfs)")
    p.add_argument("name")
    p.add_argument("mountpoint")
    p.add_argument("--cache-dir", required=True, help="local block cache directory (node NVMe)")
    p.add_argument("--cache-size", type=_size_arg, default=parse_size("10GiB"))
    p.add_argument("-o", dest="options", help="ro, epoch=N, buffer-size=256MiB, io-timeout=60, "
                   "attr-timeout=1, entry-timeout=1, negative-timeout=0, readahead=4 (blocks), "
                   "inline=16KiB, "
                   "memory-cache=64MiB, kernel-readahead=4MiB")
    p.add_argument("--foreground", "-f", action="store_true", help="do not detach")
    p.add_argument("--log-file", help="where a detached mount logs (default: in the cache dir)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--no-zygote", action="store_true",
                   help="start a new mount process even when a zygote (chunkfs zygote) runs")
    p.set_defaults(run=cmd_mount)

    p = sub.add_parser("zygote", help="keep a pre-imported mount process ready: `chunkfs mount` "
                       "forks it instead of starting Python (faster mounts on a new node)")
    p.add_argument("--run-dir", default=None,
                   help="root-only directory for its socket (default: $CHUNKFS_RUN_DIR, "
                        "else /run/chunkfs); `chunkfs mount --run-dir` must name the same")
    p.add_argument("--lifeline", action="store_true",
                   help="exit when standard input reaches its end (its starter died)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--room", default=None, help=argparse.SUPPRESS)  # chunkfs.proctitle
    p.set_defaults(run=cmd_zygote)

    p = sub.add_parser("umount", help="flush, unmount, and wait for the mount process to exit")
    p.add_argument("--run-dir", default=None,
                   help="root-only directory of the mounts' control sockets (default: "
                        "$CHUNKFS_RUN_DIR, else /run/chunkfs)")
    p.add_argument("mountpoint")
    p.add_argument("--timeout", type=float, default=300.0)
    p.set_defaults(run=cmd_umount)

    p = sub.add_parser("gc", parents=[backend], help="delete block objects nothing references")
    p.add_argument("--grace", type=_seconds_arg, default=3600.0,
                   help="never delete objects younger than this many seconds (default 3600); "
                        "uploads that no commit references yet are kept whatever the grace")
    p.add_argument("--session-grace", type=_seconds_arg, default=600.0,
                   help="a mount silent this many seconds past its session's expiry is declared "
                        "dead: its uncommitted uploads are collected (default 600)")
    p.add_argument("--dry-run", action="store_true",
                   help="find what would be deleted, delete and forget nothing")
    p.add_argument("--work-dir", type=_directory_arg, default=None,
                   help="where the run keeps its sorted sets of object keys (about 100 bytes "
                        "per object; default: $TMPDIR or /tmp)")
    p.set_defaults(run=cmd_gc)

    p = sub.add_parser("fsck", parents=[backend],
                       help="check the metadata invariants of a volume or a snapshot")
    p.add_argument("name")
    p.add_argument("--objects", action="store_true", help="also check every block object exists")
    p.set_defaults(run=cmd_fsck)

    p = sub.add_parser("status", help="show a mount's state")
    p.add_argument("--run-dir", default=None,
                   help="root-only directory of the mounts' control sockets (default: "
                        "$CHUNKFS_RUN_DIR, else /run/chunkfs)")
    p.add_argument("mountpoint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    # a command reports its outcome itself, in one line; a mount process sets up JSON logs
    logging.getLogger().addHandler(logging.NullHandler())
    parser = build_parser()
    args = parser.parse_args(argv)
    args.raw_argv = list(sys.argv[1:] if argv is None else argv)
    args.in_process = argv is not None
    try:
        result = args.run(args)
        if isinstance(result, types.CoroutineType):
            import asyncio

            result = asyncio.run(result)
        return int(result)
    except (CliError, ChunkfsError) as exc:
        code, message = _failure(exc)
        print(f"chunkfs: {message}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        return 130


def _failure(exc: BaseException) -> tuple[int, str]:
    """The exit status and the one line of a failed command."""
    if isinstance(exc, CliError):
        return exc.code, str(exc)
    if isinstance(exc, InvalidArgument):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, ChunkfsError):
        return EXIT_ERROR, str(exc)
    return EXIT_ERROR, f"{type(exc).__name__}: {exc}"


if __name__ == "__main__":
    sys.exit(main())
