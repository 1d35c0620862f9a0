"""Process wiring of a mount: backends, cache, FUSE session, signals, shutdown.

Lifetimes are explicit in an ``AsyncExitStack``; SIGTERM and SIGINT end the FUSE
loop through ``pyfuse3.terminate``; on the way out every dirty file is flushed (so a
clean unmount loses nothing) before the filesystem is unmounted.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyfuse3

from chunkfs import fuse_asyncio, rotation
from chunkfs.blocks.budget import WriteBudget
from chunkfs.blocks.store import BlockStore
from chunkfs.config import StorageConfig
from chunkfs.control import ControlError, ControlServer, socket_path
from chunkfs.errors import (
    InvalidArgument,
    MetaUnavailable,
    StorageClaimed,
    VolumeNotFound,
)
from chunkfs.fs import ChunkFS, MountOptions
from chunkfs.hotset import HotSet, Prefetcher, read_hot_set
from chunkfs.hotset import cancel as cancel_task
from chunkfs.meta.redis_meta import VolumeMeta
from chunkfs.mountstatus import MountState
from chunkfs.startup import Timeline, connect_backends

log = logging.getLogger(__name__)


@dataclass
class MountConfig:
    volume: str
    mountpoint: str
    meta_url: str
    storage: StorageConfig
    cache_dir: str
    cache_size: int  # bound of the whole cache directory (shared by the node's mounts)
    volume_cache: int | None = None  # what this volume may hold of it (None: no own cap)
    hot_set: int = 1000  # blocks read recently, kept in Redis for a warm start elsewhere
    prefetch: int = 1 << 30  # bytes of the hot set prefetched at mount start (0: off)
    read_only: bool = False
    epoch: str | None = None
    buffer_size: int = 256 * 1024 * 1024
    memory_cache: int = 64 * 1024 * 1024
    io_timeout: float = 60.0
    attr_timeout: float = 1.0
    entry_timeout: float = 1.0
    negative_timeout: float = 0.0  # how long the kernel may keep "no such name"
    readahead_blocks: int = 4
    inline_limit: int = 16 * 1024
    allow_other: bool = True
    kernel_readahead_kb: int = 4096
    run_dir: str | None = None  # where the control socket lives (chunkfs.control)
    extra: dict[str, str] = field(default_factory=dict)


def check_mountpoint(path: str) -> None:
    """A mountpoint must be an existing, empty directory (a stale FUSE mount is cleared)."""
    try:
        entries = os.listdir(path)
    except FileNotFoundError:
        raise InvalidArgument(f"mountpoint {path} does not exist") from None
    except NotADirectoryError:
        raise InvalidArgument(f"mountpoint {path} is not a directory") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:  # a dead chunkfs left its mount behind
            subprocess.run(["fusermount3", "-u", "-z", path], check=False, capture_output=True)
            return check_mountpoint(path)
        raise InvalidArgument(f"mountpoint {path}: {exc.strerror}") from None
    if os.path.ismount(path):
        raise InvalidArgument(f"mountpoint {path} is already a mount point")
    if entries:
        raise InvalidArgument(f"mountpoint {path} is not an empty directory")


async def run_mount(cfg: MountConfig, on_ready: Callable[[str | None], None],
                    clock: Timeline | None = None) -> int:
    """Mount and serve until unmounted or signalled. ``on_ready(None)`` once ready,
    ``on_ready(message)`` if mounting failed. ``clock`` times the startup (logged with
    ``mounted``); it starts now unless the caller started it earlier."""
    clock = clock or Timeline()
    fuse_asyncio.enable()
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        try:
            check_mountpoint(cfg.mountpoint)
            backends = await connect_backends(cfg, stack, clock)
        except (MetaUnavailable, VolumeNotFound, InvalidArgument, StorageClaimed) as exc:
            on_ready(str(exc))
            return 1
        except Exception as exc:
            on_ready(f"{type(exc).__name__}: {exc}")
            return 1
        store, meta, cache, state = backends.store, backends.meta, backends.cache, backends.state
        cache.start_upkeep()
        stack.push_async_callback(cache.close)
        hot = HotSet(meta.keys.hot, cfg.hot_set)
        warm = Prefetcher(cache, store, budget=min(cfg.prefetch, cache.limit // 2))

        def on_read(name: str) -> None:
            hot.saw(name)
            warm.saw(name)

        cache.on_read = on_read
        blocks = BlockStore(store, cache, meta, memory_limit=cfg.memory_cache)
        stack.push_async_callback(blocks.drain)
        options = MountOptions(read_only=meta.read_only, attr_timeout=cfg.attr_timeout,
                               entry_timeout=cfg.entry_timeout, inline_limit=cfg.inline_limit,
                               negative_timeout=cfg.negative_timeout,
                               readahead_blocks=cfg.readahead_blocks,
                               block_size=state.block_size)

        state_of_mount = MountState(meta)

        def extra() -> dict[str, Any]:
            return {"mountpoint": cfg.mountpoint, "cache": cache.summary(),
                    "warm": warm.stats.as_dict(), "hot_set": hot.as_dict(),
                    "s3": store.stats.as_dict(), "session": meta.session,
                    "redis_durability": backends.durable.as_dict(),
                    **state_of_mount.document(fs.state.record, read_only=meta.read_only,
                                              fenced=fs.state.fenced)}

        fs = ChunkFS(meta, blocks, options, state, extra)
        fs.attach_budget(WriteBudget(cfg.buffer_size, stall_timeout=cfg.io_timeout))
        fuse_opts = set(pyfuse3.default_options)
        fuse_opts |= {f"fsname=chunkfs:{cfg.volume}", "subtype=chunkfs"}
        if cfg.allow_other:
            fuse_opts.add("allow_other")
        if meta.read_only:
            fuse_opts.add("ro")
        try:
            pyfuse3.init(fs, cfg.mountpoint, fuse_opts)
        except Exception as exc:
            on_ready(f"cannot mount {cfg.mountpoint}: {exc}")
            return 1
        clock.mark("fuse mounted")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, pyfuse3.terminate)
        tuning = asyncio.create_task(_tune_after_init(fs, cfg.mountpoint, cfg.kernel_readahead_kb))
        control = ControlServer(
            socket_path(cfg.mountpoint, cfg.run_dir), fs.status_document, pyfuse3.terminate,
            rotate=lambda doc: rotation.apply(doc, redis=meta.r, store=store))
        try:
            await control.start()
        except (OSError, ControlError) as exc:
            pyfuse3.close(unmount=True)
            on_ready(f"cannot open the control socket in {os.path.dirname(control.path)}: {exc}")
            return 1
        refresher = asyncio.create_task(fs.state.run(
            tick=lambda: state_of_mount.refresh(fs.unflushed()),
            on_dead=lambda why: setattr(fs.status, "last_error", why)))
        housekeeping = asyncio.create_task(_reap_orphans(meta))
        prefetch = asyncio.create_task(_warm_start(warm, meta, hot, cfg))
        publisher = asyncio.create_task(hot.keep_publishing(meta.r)) if cfg.hot_set > 0 else None
        clock.mark("ready")
        log.info("mounted", extra={"volume": cfg.volume, "mountpoint": cfg.mountpoint,
                                   "epoch": meta.epoch, "session": meta.session,
                                   "startup_ms": clock.as_dict()})
        on_ready(None)
        clean = False
        try:
            await pyfuse3.main(min_tasks=4, max_tasks=64)
            clean = True
        finally:
            refresher.cancel()
            housekeeping.cancel()
            await cancel_task(prefetch)
            await cancel_task(publisher)
            tuning.cancel()
            try:
                await fs.flush_all()
            except Exception as exc:
                log.error("flush at unmount failed", extra={"error": str(exc)})
                clean = False
            if cfg.hot_set > 0 and not fs.state.fenced:  # after the data: advisory, and bounded
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(hot.publish_quietly(meta.r), 5.0)
            try:  # housekeeping: what it leaves behind expires with the session
                await fs.purge_orphans()
                await meta.end_session()
            except Exception as exc:
                log.warning("ending the session failed; it expires by itself",
                            extra={"error": str(exc)})
            pyfuse3.close(unmount=True)
            log.info("unmounted", extra={"mountpoint": cfg.mountpoint})
            await control.close(clean=clean)
        return 0 if clean else 1


async def _warm_start(warm: Prefetcher, meta: VolumeMeta, hot: HotSet, cfg: MountConfig) -> None:
    """Prefetch what the volume's last mounts read most recently (``chunkfs.hotset``):
    background work that no read waits for, started once the mount serves."""
    if cfg.hot_set <= 0 or warm.stats.budget <= 0:
        warm.stats.state = "off"
        return
    try:
        names = await read_hot_set(meta.r, hot.key, cfg.hot_set)
    except Exception as exc:  # advisory: the mount serves cold
        warm.stats.state = "failed"
        log.info("hot set unreadable: no warm start", extra={"error": str(exc)})
        return
    await warm.run(names)


async def _reap_orphans(meta: VolumeMeta) -> None:
    """Purge what mounts that died left unlinked-but-open: housekeeping that no read
    waits for, so it runs once the mount serves."""
    if meta.read_only:
        return
    try:
        reaped = await meta.reap_orphans()
    except Exception as exc:  # the next mount tries again
        log.warning("reaping orphans of dead mounts failed", extra={"error": str(exc)})
        return
    if reaped:
        log.info("reaped orphans of dead mounts", extra={"count": reaped})


async def _tune_after_init(fs: ChunkFS, mountpoint: str, kb: int) -> None:
    """The kernel sets a FUSE mount's readahead when it receives the answer to its INIT
    (to what it proposed at mount time: 128 KiB), so a value written before is lost.
    This runs once the answer went out (``ChunkFS.init`` is called just before it)."""
    await fs.initialized.wait()
    tune_kernel_readahead(mountpoint, kb)


def tune_kernel_readahead(mountpoint: str, kb: int) -> None:
    """Let the kernel read ahead ``kb`` on this mount (FUSE's default is 128 KiB); only
    after the kernel's INIT was answered (``_tune_after_init``).

    Sequential readers then reach us in requests of up to 1 MiB instead of 128 KiB,
    which divides the per-request cost in Python by eight. The device number comes from
    /proc/self/mountinfo: a stat() of the mountpoint would wait on ourselves.
    """
    if kb <= 0:
        return
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[4] == mountpoint:
                    device = fields[2]
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write(str(kb))
    except (OSError, UnboundLocalError) as exc:
        log.warning("could not raise the kernel readahead", extra={"error": str(exc)})
