"""Starting, finding and recovering chunkfs mounts on a node.

Protocol (what survives what)
-----------------------------
* NodeStageVolume runs ``chunkfs mount VOLUME STAGING --cache-dir CACHE/_shared
  --cache-size NODE_BOUND -o epoch=N[,ro][,volume-cache=SIZE]``: every mount of the node
  shares one cache directory and one bound (``chunkfs/cache.py``). The mount process
  detaches into its own session, so it outlives the plugin process; a plugin upgrade or
  crash does not touch running pods.
* NodePublishVolume bind-mounts STAGING onto the pod's target (then remounts the bind
  nosuid,nodev and read-only / with the requested flags).
* Before acting, every stage and publish is recorded as a JSON file under
  ``--state-dir`` (``csi/state.py``: written tmp + fsync + rename, mode 0600, never
  holding credentials). The record is removed only after the undo succeeded. So after
  any crash the records are a superset of what is mounted, and recovery converges by
  re-doing what is recorded. The credentials of a Secret's backend, which a re-mount
  needs, are kept in memory and on a memory filesystem only (``csi/secretstore.py``);
  without them a dead mount waits for the next NodeStageVolume.
* ``NodeMounts.recover`` (at start and then periodically) checks every recorded mount:
  a staging mount whose process died (statfs fails with ENOTCONN) is lazily unmounted
  and mounted again with the recorded epoch and options; each bind mount of it, now
  pointing at the dead FUSE connection, is bound again on top of the dead one (so that
  the new mount propagates into the pods' containers, which hold copies of the dead
  one; NodeUnpublish removes both layers). A live mount is
  never touched, and a hung one (statfs does not return) is reported, not remounted.
  The recorded epoch is reused as is: if the lease moved on meanwhile, the re-mounted
  volume is fenced exactly like the old one was.
* Pods see a re-established mount through the same target path; files they had open
  on the dead connection fail and must be reopened (in Kubernetes the pod needs
  ``mountPropagation: HostToContainer`` to see the new bind mount). In the chart the
  mount processes live in the mounter pod (``csi/mounter.py``), so this path is only
  taken when a mounter or a mount process dies, not when the node plugin does.

Concurrency: the node servicer holds the per-volume key (``KeyLocks``) around every
call into this module that changes a volume's mounts; ``recover`` waits for the same
key, so an RPC and a recovery never work on one volume at the same time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import errno
import functools
import logging
import os
import shutil
import sys
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from chunkfs.control import ControlError, query_status, send_credentials
from csi import errors, mountcalls, mountinfo, paths, validate
from csi.backends import overlay_env
from csi.launcher import ChildLauncher, Launcher, MountSpec
from csi.secretstore import SecretStore
from csi.state import PublishRecord, StageRecord, StateStore

log = logging.getLogger("chunkfs.csi.mounts")

MOUNT_TIMEOUT = 120.0    # chunkfs mount: connect, load the root, be ready
UNMOUNT_TIMEOUT = 300.0  # chunkfs umount flushes dirty data to S3 first
PROBE_TIMEOUT = 5.0      # a statfs that takes longer marks the mount as hung
CHUNKFS_EXIT_USAGE = 2            # the chunkfs CLI's exit status for bad input
FSTYPE = "fuse.chunkfs"          # in /proc/self/mountinfo, also for the bind mounts


class Health(enum.Enum):
    ALIVE = "alive"      # a chunkfs mount, and its process answers statfs
    DEAD = "dead"        # mounted, but the FUSE process is gone (ENOTCONN)
    HUNG = "hung"        # mounted, statfs does not return
    ABSENT = "absent"    # not a mount point


# --- the mount table ----------------------------------------------------------------

def mount_table() -> dict[str, str]:
    """Mount point -> filesystem type (the top mount wins)."""
    return {path: entry.fstype for path, entry in mountinfo.mounts().items()}


def volume_source(volume_id: str) -> str:
    """The mount source chunkfs gives a volume's FUSE mount (and so its bind mounts)."""
    return f"chunkfs:{volume_id}"


def owner_of(entry: mountinfo.MountEntry) -> str | None:
    """The volume a mount table entry belongs to, or None when it is not a chunkfs mount."""
    if entry.fstype == FSTYPE and entry.source.startswith("chunkfs:"):
        return entry.source.removeprefix("chunkfs:")
    return None


def describe(entry: mountinfo.MountEntry) -> str:
    return f"{entry.fstype} ({entry.source})"


def is_mountpoint(path: str) -> bool:
    return path in mount_table()


def mount_pids(mountpoint: str) -> list[int]:
    """PIDs of chunkfs mount processes serving ``mountpoint`` (named in their argv)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv]
        if "mount" in words and mountpoint in words and any("chunkfs" in w for w in words):
            pids.append(int(entry))
    return pids


# --- probing without blocking the event loop ----------------------------------------

class Prober:
    """stat/statvfs/status reads of mount points in worker threads, one in flight per path.

    A FUSE mount whose process is stopped makes statfs block; the thread then stays
    stuck until the process resumes or dies. Allowing one probe per path and kind keeps
    such threads from piling up, and the caller gets HUNG (or TimeoutError) instead of
    waiting.
    """

    def __init__(self, workers: int = 8, run_dir: str | None = None) -> None:
        self.run_dir = run_dir  # where the mounts' control sockets are (chunkfs.control)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="mount-probe")
        self._pending: dict[tuple[str, str], concurrent.futures.Future[Any]] = {}
        self._lock = threading.Lock()  # the metrics thread probes too

    def _submit(self, kind: str, path: str, fn: Any) -> concurrent.futures.Future[Any]:
        with self._lock:
            fut = self._pending.get((kind, path))
            if fut is None or fut.done():
                fut = self._pending[(kind, path)] = self._pool.submit(fn, path)
            return fut

    async def _run(self, kind: str, path: str, fn: Any, seconds: float) -> Any:
        fut = asyncio.wrap_future(self._submit(kind, path, fn))
        return await asyncio.wait_for(asyncio.shield(fut), seconds)

    def run_blocking(self, kind: str, path: str, fn: Any, seconds: float) -> Any:
        try:
            return self._submit(kind, path, fn).result(seconds)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"{kind} of {path}") from None

    async def health(self, path: str, seconds: float = PROBE_TIMEOUT) -> Health:
        """statfs is never answered from the kernel's attribute cache (stat may be), so it
        reaches the mount process: ENOTCONN means the process is gone."""
        fstype = mount_table().get(path)
        if fstype is None:
            return Health.ABSENT
        try:
            await self._run("statvfs", path, os.statvfs, seconds)
        except TimeoutError:
            return Health.HUNG
        except OSError as exc:
            if is_dead_error(exc):
                return Health.DEAD
            raise
        return Health.ALIVE if fstype == FSTYPE else Health.DEAD

    async def statvfs(self, path: str, seconds: float = PROBE_TIMEOUT) -> os.statvfs_result:
        return await self._run("statvfs", path, os.statvfs, seconds)

    async def status(self, path: str, seconds: float = PROBE_TIMEOUT) -> dict[str, Any]:
        """The mount's own report (``chunkfs status --json``): dirty bytes, fenced, ..."""
        return await self._run("status", path,
                               functools.partial(read_status, run_dir=self.run_dir), seconds)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def is_dead_error(exc: OSError) -> bool:
    """The errors of a FUSE mount whose process has gone."""
    return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.ENODEV, errno.EIO)


def read_status(mountpoint: str, run_dir: str | None = None) -> dict[str, Any]:
    """A staging mount's own report, from its control socket in the root-only run dir
    (``chunkfs.control``): never from a file inside the volume, which pods can write."""
    return query_status(mountpoint, run_dir=run_dir)


# --- running mount commands ---------------------------------------------------------

def chunkfs_command() -> list[str]:
    """The chunkfs CLI: next to this interpreter (a venv) first, then on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "chunkfs")
    if os.access(here, os.X_OK):
        return [here]
    found = shutil.which("chunkfs")
    return [found] if found else [sys.executable, "-m", "chunkfs.cli"]


async def _run(argv: list[str], seconds: float = 60.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), seconds)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise errors.timed_out(" ".join(argv[:3])) from None
    return proc.returncode or 0, err.decode(errors="replace").strip()


class Mounter:
    """The mount primitives: chunkfs mounts (through a ``Launcher``) and bind mounts.

    ``launcher`` decides where the chunkfs mount processes run (``csi/launcher.py``): as
    children of this process (default) or in the mounter, outside the plugin's container.
    ``default_cache_size`` bounds the node's cache, which every mount shares (a
    StorageClass's ``cache-size`` caps one volume's share of it: ``volume-cache=``).
    """

    def __init__(self, log_dir: str, chunkfs: list[str] | None = None,
                 prober: Prober | None = None, launcher: Launcher | None = None,
                 default_cache_size: str | None = None) -> None:
        self.chunkfs = chunkfs or chunkfs_command()
        self.launcher = launcher or ChildLauncher(
            self.chunkfs, zygote_log=os.path.join(log_dir, "zygote.log"))
        self.default_cache_size = default_cache_size
        self.log_dir = log_dir
        self.prober = prober or Prober()
        os.makedirs(log_dir, mode=0o700, exist_ok=True)

    def log_path(self, volume_id: str) -> str:
        return os.path.join(self.log_dir, volume_id + ".log")

    async def mount_chunkfs(self, rec: StageRecord, cache_dir: str,
                            env: dict[str, str]) -> None:
        await asyncio.to_thread(paths.make_dir, rec.staging_path)
        options = list(rec.options)
        if rec.epoch is not None:
            options.insert(0, f"epoch={rec.epoch}")
        if rec.readonly:
            options.insert(0, "ro")
        if rec.cache_size:  # the StorageClass's cache-size: this volume's share of the node's
            options.append(f"volume-cache={rec.cache_size}")
        spec = MountSpec(volume_id=rec.volume_id, staging_path=rec.staging_path,
                         cache_dir=cache_dir, log_file=self.log_path(rec.volume_id),
                         options=options, cache_size=self.default_cache_size)
        outcome = await self.launcher.mount(spec, env, MOUNT_TIMEOUT)
        if outcome.timed_out:
            await self.force_unmount(rec.staging_path)
            raise errors.timed_out(f"chunkfs mount of {rec.volume_id}")
        if outcome.rc != 0:
            if outcome.rc == CHUNKFS_EXIT_USAGE:  # bad input, e.g. an unknown mount option
                raise errors.mount_rejected(rec.volume_id, outcome.message)
            raise errors.mount_failed(rec.volume_id, outcome.message)
        health = await self.prober.health(rec.staging_path)
        entry = mountinfo.mounts().get(rec.staging_path)
        if health is not Health.ALIVE or entry is None or owner_of(entry) != rec.volume_id:
            raise errors.mount_failed(
                rec.volume_id, f"chunkfs mount succeeded but {rec.staging_path} is "
                f"{health.value}" + (f" ({describe(entry)})" if entry else ""))

    async def unmount_chunkfs(self, path: str) -> None:
        """Flush and unmount a staging mount; a dead one is just detached."""
        health = await self.prober.health(path)
        if health is Health.ABSENT:
            return
        if health is Health.HUNG:
            raise errors.unmount_failed(path, "the chunkfs mount does not respond; "
                                        "dirty data would be lost, not unmounting")
        if health is Health.DEAD:
            await self.force_unmount(path)
            return
        outcome = await self.launcher.umount(path, UNMOUNT_TIMEOUT)
        if outcome.timed_out:
            raise errors.timed_out(f"chunkfs umount {path}")
        if outcome.rc != 0 and is_mountpoint(path):
            raise errors.unmount_failed(path, outcome.message
                                        or f"chunkfs umount exited with {outcome.rc}")

    async def bind(self, source: str, target: str, readonly: bool,
                   flags: Iterable[str]) -> None:
        """Bind ``source`` onto ``target`` (created if missing, no symlink followed) with
        ``nosuid,nodev`` always and the requested per-mount flags."""
        try:
            await asyncio.to_thread(_bind_at, source, target)
        except paths.PathError as exc:
            raise errors.unsafe_path("target_path", target, exc.reason) from None
        except OSError as exc:
            raise errors.mount_failed(os.path.basename(source),
                                      f"bind mount onto {target}: {exc.strerror}") from None
        await self.set_flags(source, target, readonly, flags)

    async def set_flags(self, source: str, target: str, readonly: bool,
                        flags: Iterable[str]) -> None:
        """Remount the bind mount at ``target`` with exactly these per-mount flags (and
        check the mount table); on failure the bind mount is detached."""
        bits = mountcalls.publish_flags(readonly, flags)
        try:
            await asyncio.to_thread(_remount_at, target, bits)
        except (OSError, paths.PathError) as exc:
            await self.force_unmount(target)
            why = exc.reason if isinstance(exc, paths.PathError) else exc.strerror
            raise errors.mount_failed(os.path.basename(source), f"remount of {target} with "
                                      f"{_flag_names(bits)}: {why}") from None
        entry = mountinfo.mounts().get(target)
        want = {"ro" if readonly else "rw", "nosuid", "nodev"}
        if entry is None or not want <= entry.options:
            await self.force_unmount(target)
            raise errors.mount_failed(os.path.basename(source),
                                      f"{target} is not mounted with {','.join(sorted(want))}")

    async def unmount(self, path: str) -> None:
        """Unmount a bind mount and the dead ones a recovery stacked it over; detach
        lazily what is dead or busy."""
        while is_mountpoint(path):
            health = await self.prober.health(path)
            if health is not Health.ALIVE:
                await self.force_unmount(path)
                return
            try:
                await asyncio.to_thread(mountcalls.umount, path)
            except OSError as exc:
                if is_mountpoint(path):
                    log.warning("umount %s failed (%s); detaching it lazily", path, exc.strerror)
                    await self.force_unmount(path)
                    return

    async def force_unmount(self, path: str) -> None:
        while is_mountpoint(path):
            try:
                await asyncio.to_thread(mountcalls.umount, path, lazy=True)
            except OSError as exc:
                if is_mountpoint(path):
                    raise errors.unmount_failed(path, exc.strerror or str(exc)) from None


def _bind_at(source: str, target: str) -> None:
    with paths.opened(target, create=True) as fd:
        mountcalls.bind(source, fd)


def _remount_at(target: str, bits: int) -> None:
    with paths.opened(target) as fd:  # now the root of the new bind mount
        mountcalls.remount(fd, bits)


def _flag_names(bits: int) -> str:
    names = [("ro", mountcalls.MS_RDONLY), ("nosuid", mountcalls.MS_NOSUID),
             ("nodev", mountcalls.MS_NODEV), ("noexec", mountcalls.MS_NOEXEC)]
    return ",".join(n for n, b in names if bits & b) or "rw"


# --- the node's mounts --------------------------------------------------------------

SHARED_CACHE = "_shared"  # not a volume id (those start with a letter or a digit)


def drop_legacy_cache(cache_dir: str, name: str) -> None:
    """Remove ``cache_dir/name`` if it is a per-volume cache of an older version: a
    directory named like a volume id holding ``blocks/`` or ``tmp/``; nothing else."""
    path = os.path.join(cache_dir, name)
    if (name == SHARED_CACHE or not validate.is_id(name) or os.path.islink(path)
            or not os.path.isdir(path)):
        return
    if not any(os.path.isdir(os.path.join(path, sub)) for sub in ("blocks", "tmp")):
        return
    shutil.rmtree(path, ignore_errors=True)
    log.info("removed the per-volume cache of an older version: %s", path)


class NodeMounts:
    """Stage / publish / recover, keeping the records and the mount table in step."""

    def __init__(self, state_dir: str, cache_dir: str, mounter: Mounter | None = None,
                 locks: Any = None, secrets: SecretStore | None = None) -> None:
        self.secrets = secrets or SecretStore(None)
        self.store = StateStore(state_dir, migrate=self.secrets.put)
        self.cache_dir = cache_dir
        self.mounter = mounter or Mounter(os.path.join(state_dir, "logs"))
        # the mounts' control sockets: root-only, under the state dir that the node plugin
        # and the mounter share at the same path
        self.run_dir = os.path.join(state_dir, "control")
        self.mounter.prober.run_dir = self.run_dir
        launcher = self.mounter.launcher
        if isinstance(launcher, ChildLauncher) and launcher.run_dir is None:
            launcher.run_dir = self.run_dir  # (the mounter derives the same from its state dir)
        self.locks = locks
        self.health: dict[str, str] = {}  # volume -> outcome of its last check (metrics)

    @property
    def prober(self) -> Prober:
        return self.mounter.prober

    def staged(self, volume_id: str) -> StageRecord | None:
        return self.store.staged.get(volume_id)

    def publication(self, target: str) -> PublishRecord | None:
        return self.store.published.get(target)

    def publishes_of(self, volume_id: str) -> list[PublishRecord]:
        return self.store.publishes_of(volume_id)

    def cache_dir_of(self, volume_id: str) -> str:
        """The node's one cache directory, shared by every volume staged here under one
        bound (``chunkfs.cache``); the same for every volume, so a clone's blocks are warm."""
        return os.path.join(self.cache_dir, SHARED_CACHE)

    async def drop_legacy_cache(self, volume_id: str) -> None:
        """Delete the per-volume cache directory an older version kept for ``volume_id``
        (``CACHE/<volume id>``): outside the node's bound, and never read again."""
        await asyncio.to_thread(drop_legacy_cache, self.cache_dir, volume_id)

    async def drop_legacy_caches(self) -> None:
        """At start: delete the legacy per-volume caches of volumes not staged here (a
        staged volume's mount may be an older one still using its own; it goes at unstage)."""
        staged = set(self.store.staged)

        def drop_all() -> None:
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(self.cache_dir):
                    if entry.name not in staged:
                        drop_legacy_cache(self.cache_dir, entry.name)

        await asyncio.to_thread(drop_all)

    def knows(self, volume_id: str, path: str) -> bool:
        stage = self.staged(volume_id)
        pub = self.publication(path)
        return bool((stage and stage.staging_path == path)
                    or (pub and pub.volume_id == volume_id))

    # -- stage --

    def check_owned(self, volume_id: str, field: str, path: str) -> bool:
        """Whether ``path`` is a mount point of ``volume_id``; FAILED_PRECONDITION when
        something else is mounted there (never mount over it, never unmount it)."""
        entry = mountinfo.mounts().get(path)
        if entry is None:
            return False
        if owner_of(entry) != volume_id:
            raise errors.mounted_by_other(field, path, describe(entry))
        return True

    async def stage(self, rec: StageRecord, env: dict[str, str]) -> None:
        """Record and mount a new stage; ``env`` is its Secret's backend ({}: default)."""
        if self.check_owned(rec.volume_id, "staging_target_path", rec.staging_path):
            log.warning("%s is a mount of %s that is not recorded; unmounting it first",
                        rec.staging_path, rec.volume_id)
            await self.mounter.unmount_chunkfs(rec.staging_path)
        if rec.backend:
            self.secrets.put(rec.volume_id, env)
        self.store.save_stage(rec)
        try:
            await self._mount(rec)
        except BaseException:
            self.store.drop_stage(rec.volume_id)
            self.secrets.drop(rec.volume_id)
            raise
        self.health[rec.volume_id] = "alive"

    async def restage(self, rec: StageRecord, env: dict[str, str]) -> None:
        """A repeated NodeStageVolume: keep the (possibly rotated) credentials, re-mount a
        dead mount, and bring a running mount onto rotated credentials: re-mounted when
        no pod uses it, handed them over its control socket when published (its next
        connections use them; ``chunkfs.rotation``)."""
        if rec.backend:
            self.secrets.put(rec.volume_id, env)
        await self.ensure_staged(rec)
        if self.secrets.mount_is_current(rec.volume_id):
            return
        live = self.prune_publishes(rec.volume_id)
        if live:
            env = self._env_of(rec)
            doc = {"meta_url": env.get("CHUNKFS_META", ""),
                   "access_key": env.get("AWS_ACCESS_KEY_ID", ""),
                   "secret_key": env.get("AWS_SECRET_ACCESS_KEY", "")}
            try:
                await asyncio.to_thread(send_credentials, rec.staging_path,
                                        {k: v for k, v in doc.items() if v},
                                        run_dir=self.run_dir)
            except (ControlError, OSError) as exc:
                log.warning("volume %s: credentials rotated; the running mount keeps the "
                            "previous ones until it is re-mounted (published at %s): %s",
                            rec.volume_id, ", ".join(p.target_path for p in live), exc)
                return
            self.secrets.mounted_with(rec.volume_id, env)
            log.info("volume %s: credentials rotated; the running mount uses them from its "
                     "next connection (published at %s)", rec.volume_id,
                     ", ".join(p.target_path for p in live))
            return
        log.info("volume %s: credentials rotated; re-mounting (no pod uses it)",
                 rec.volume_id)
        await self.mounter.unmount_chunkfs(rec.staging_path)
        await self._mount(rec)

    def can_remount(self, volume_id: str) -> bool:
        rec = self.staged(volume_id)
        return rec is None or not rec.backend or self.secrets.get(volume_id) is not None

    def _env_of(self, rec: StageRecord) -> dict[str, str]:
        if not rec.backend:
            return {}
        env = self.secrets.get(rec.volume_id)
        if env is None:
            raise errors.credentials_unavailable(rec.volume_id)
        return env

    async def _mount(self, rec: StageRecord) -> None:
        env = self._env_of(rec)
        await self.mounter.mount_chunkfs(rec, self.cache_dir_of(rec.volume_id),
                                         overlay_env(dict(os.environ), env))
        if rec.backend:
            self.secrets.mounted_with(rec.volume_id, env)

    async def ensure_staged(self, rec: StageRecord) -> Health:
        """Re-mount a recorded staging mount whose process died; return its health before."""
        self.check_owned(rec.volume_id, "staging_target_path", rec.staging_path)
        health = await self.prober.health(rec.staging_path)
        if health in (Health.DEAD, Health.ABSENT):
            self._env_of(rec)  # without its credentials, leave the dead mount as it is
        if health is Health.DEAD:
            log.warning("volume %s: the chunkfs mount at %s is dead; mounting it again",
                        rec.volume_id, rec.staging_path)
            await self.mounter.force_unmount(rec.staging_path)
        if health in (Health.DEAD, Health.ABSENT):
            await self._mount(rec)
        return health

    async def unstage(self, volume_id: str, staging_path: str) -> None:
        rec = self.staged(volume_id)
        await self.mounter.unmount_chunkfs(staging_path)
        await self.drop_legacy_cache(volume_id)
        if rec is not None and rec.staging_path == staging_path:
            self.store.drop_stage(volume_id)
            self.secrets.drop(volume_id)
            self.health.pop(volume_id, None)

    # -- publish --

    async def publish(self, rec: PublishRecord) -> None:
        table = mountinfo.mounts()
        entry, staging = table.get(rec.target_path), table.get(rec.staging_path)
        if entry is not None and (staging is None or entry.device != staging.device):
            raise errors.mounted_by_other("target_path", rec.target_path, describe(entry))
        self.store.save_publish(rec)
        try:
            if entry is not None:  # a bind of this very staging mount, not recorded
                log.warning("%s: adopting the unrecorded bind mount of %s", rec.target_path,
                            rec.volume_id)
                await self.mounter.set_flags(rec.staging_path, rec.target_path, rec.readonly,
                                             rec.flags)
            else:
                await self._bind(rec)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.mounter.unmount(rec.target_path)
            self.store.drop_publish(rec.target_path)
            raise

    async def _bind(self, rec: PublishRecord) -> None:
        await self.mounter.bind(rec.staging_path, rec.target_path, rec.readonly, rec.flags)

    async def ensure_published(self, rec: PublishRecord) -> Health:
        """Re-make a recorded bind mount that is missing or points at a dead mount."""
        self.check_owned(rec.volume_id, "target_path", rec.target_path)
        health = await self.prober.health(rec.target_path)
        parent = os.path.dirname(rec.target_path)
        if health is Health.ABSENT and not await asyncio.to_thread(os.path.isdir, parent):
            log.warning("volume %s: dropping the record of %s: the pod directory is gone",
                        rec.volume_id, rec.target_path)
            self.store.drop_publish(rec.target_path)
            return health
        if health is Health.DEAD:
            # Bind over the dead mount instead of detaching it first: a pod's container
            # holds a copy of the dead mount, and only a mount made on top of it propagates
            # into the container (mountPropagation: HostToContainer). unmount() later
            # removes both layers.
            log.warning("volume %s: binding the re-established mount over the dead one at "
                        "%s", rec.volume_id, rec.target_path)
            await self.mounter.bind(rec.staging_path, rec.target_path, rec.readonly,
                                    rec.flags)
        elif health is Health.ABSENT:
            log.warning("volume %s: re-making the bind mount at %s", rec.volume_id,
                        rec.target_path)
            await self._bind(rec)
        return health

    async def unpublish(self, target: str) -> None:
        await self.mounter.unmount(target)
        try:  # the spec: remove what NodePublishVolume created
            await asyncio.to_thread(paths.remove_dir, target)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.ENOTDIR, errno.EBUSY):
                raise
            log.warning("not removing %s: %s", target, exc.strerror)
        self.store.drop_publish(target)

    def prune_publishes(self, volume_id: str) -> list[PublishRecord]:
        """The recorded publishes of a volume that are still mounted (drops the others)."""
        table = mount_table()
        live = []
        for rec in self.publishes_of(volume_id):
            if rec.target_path in table:
                live.append(rec)
            else:
                log.warning("dropping the record of %s: it is no longer mounted",
                            rec.target_path)
                self.store.drop_publish(rec.target_path)
        return live

    # -- recovery --

    async def recover(self) -> dict[str, str]:
        """Re-establish every recorded mount that died; return volume -> outcome.

        Healthy volumes are checked without the volume's key, so that routine checks
        never delay an RPC; a volume needing repair is re-checked and repaired holding it.
        """
        outcome: dict[str, str] = {}
        for volume_id in list(self.store.staged):
            if await self._healthy(volume_id):
                outcome[volume_id] = "alive"
            else:
                lock = (self.locks.background("volume", volume_id) if self.locks is not None
                        else contextlib.nullcontext())
                async with lock:
                    outcome[volume_id] = await self._recover_volume(volume_id)
            self.health[volume_id] = ("alive" if outcome[volume_id] in ("alive", "recovered")
                                      else outcome[volume_id])
        for gone in set(self.health) - set(self.store.staged):
            del self.health[gone]
        return outcome

    async def _healthy(self, volume_id: str) -> bool:
        rec = self.staged(volume_id)
        if rec is None:
            return True
        paths = [rec.staging_path] + [p.target_path for p in self.publishes_of(volume_id)]
        for path in paths:
            if await self.prober.health(path) is not Health.ALIVE:
                return False
        return True

    async def _recover_volume(self, volume_id: str) -> str:
        rec = self.staged(volume_id)
        if rec is None:
            return "unstaged"
        try:
            before = await self.ensure_staged(rec)
            if before is Health.HUNG:
                log.warning("volume %s: the mount at %s does not respond", volume_id,
                            rec.staging_path)
                return "hung"
            remade = 0
            for pub in self.publishes_of(volume_id):
                if await self.ensure_published(pub) is not Health.ALIVE:
                    remade += 1
        except Exception as exc:  # noqa: BLE001 - logged, retried at the next round
            outcome = f"failed: {exc}"
            if self.health.get(volume_id) != outcome:  # once per new outcome, not per round
                log.error("volume %s: recovery failed: %s", volume_id, exc)
            return outcome
        if before is Health.ALIVE and not remade:
            return "alive"
        log.info("volume %s: recovered (staging was %s, %d bind mounts re-made)",
                 volume_id, before.value, remade)
        return "recovered"

    async def recover_forever(self, interval: float) -> None:
        while True:
            try:
                await self.recover()
            except Exception:  # noqa: BLE001 - keep the loop alive
                log.exception("mount recovery round failed")
            await asyncio.sleep(interval)

    def close(self) -> None:
        self.prober.close()
