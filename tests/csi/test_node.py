"""Node service conformance with real chunkfs FUSE mounts, over a real gRPC channel."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time

import grpc
import pytest

from csi.mounts import mount_pids, mount_table
from csi.v1 import csi_pb2

from .conftest import Mode, block_cap, mount_cap

MiB = 1 << 20
RPC = csi_pb2.NodeServiceCapability.RPC


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    return err.value.code()


def make_volume(plugin, name: str = "pvc-1", mode: int = Mode.SINGLE_NODE_WRITER,
                node_id: str = "node-a", capacity: int = 64 * MiB) -> dict[str, str]:
    """CreateVolume + ControllerPublishVolume; returns the publish_context."""
    cap = mount_cap(mode)
    plugin.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=name, volume_capabilities=[cap],
        capacity_range=csi_pb2.CapacityRange(required_bytes=capacity)))
    return dict(plugin.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
        volume_id=name, node_id=node_id, volume_capability=cap)).publish_context)


def stage(plugin, volume_id: str, staging: str, ctx: dict[str, str] | None = None,
          cap=None) -> None:
    plugin.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=staging, volume_capability=cap or mount_cap(),
        publish_context=ctx or {}))


def unstage(plugin, volume_id: str, staging: str) -> None:
    plugin.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=volume_id, staging_target_path=staging))


def publish(plugin, volume_id: str, staging: str, target: str, cap=None,
            readonly: bool = False) -> None:
    plugin.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id, staging_target_path=staging, target_path=target,
        volume_capability=cap or mount_cap(), readonly=readonly))


def unpublish(plugin, volume_id: str, target: str) -> None:
    plugin.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=volume_id, target_path=target))


def mount_options(path: str) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        rows = [line.split() for line in f]
    opts = [row[5] for row in rows if row[4] == path]
    assert opts, f"{path} is not mounted"
    return set(opts[-1].split(","))


@pytest.fixture
def staged(plugin, kubelet):
    """pvc-1, published to node-a by the controller and staged there: (staging, ctx)."""
    ctx = make_volume(plugin)
    staging = kubelet.staging("pvc-1")
    stage(plugin, "pvc-1", staging, ctx)
    return staging, ctx


# --- about the node -----------------------------------------------------------------

def test_node_capabilities(plugin) -> None:
    resp = plugin.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
    assert {c.rpc.type for c in resp.capabilities} == {
        RPC.STAGE_UNSTAGE_VOLUME, RPC.GET_VOLUME_STATS, RPC.EXPAND_VOLUME,
        RPC.VOLUME_CONDITION, RPC.SINGLE_NODE_MULTI_WRITER}


def test_node_info(plugin) -> None:
    resp = plugin.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert resp.node_id == "node-a"
    assert resp.max_volumes_per_node == 64
    assert not resp.HasField("accessible_topology")


# --- NodeStageVolume / NodeUnstageVolume --------------------------------------------

def test_stage_mounts_chunkfs_with_the_epoch_and_is_idempotent(plugin, kubelet) -> None:
    ctx = make_volume(plugin)
    staging = kubelet.staging("pvc-1")
    stage(plugin, "pvc-1", staging, ctx)
    assert os.stat(staging).st_ino == 1
    assert mount_table()[staging] == "fuse.chunkfs"
    pids = mount_pids(staging)
    assert len(pids) == 1
    with open(f"/proc/{pids[0]}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert f"epoch={ctx['epoch']}".encode() in b",".join(argv)
    assert os.path.isdir(os.path.join(plugin.cache_dir, "_shared", "blocks"))  # the node's cache
    stage(plugin, "pvc-1", staging, ctx)  # repeat: OK, nothing new
    assert mount_pids(staging) == pids
    unstage(plugin, "pvc-1", staging)
    assert staging not in mount_table()
    assert not mount_pids(staging)
    unstage(plugin, "pvc-1", staging)  # repeat: OK


def test_volumes_on_one_node_share_one_cache_under_the_node_bound(cluster) -> None:
    """Every mount gets the node's one cache dir and the node's --cache-size; a legacy
    per-volume cache of an older version is removed at start (it is outside the bound)."""
    legacy = cluster.root / "node-a" / "cache" / "pvc-old" / "blocks" / "ab"
    legacy.mkdir(parents=True)
    (legacy / ("ab" * 32 + "_3")).write_bytes(b"old")
    plugin = cluster.start("node-a", "all", extra=["--cache-size", "8MiB"])
    assert not legacy.parent.parent.exists()
    stagings = {}
    for name in ("pvc-1", "pvc-2"):
        ctx = make_volume(plugin, name)
        stagings[name] = plugin.kubelet.staging(name)
        stage(plugin, name, stagings[name], ctx)
    for staging in stagings.values():
        (pid,) = mount_pids(staging)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode() for a in f.read().split(b"\0")]
        assert argv[argv.index("--cache-dir") + 1] == str(plugin.cache_dir / "_shared")
        assert argv[argv.index("--cache-size") + 1] == "8MiB"
    for staging in stagings.values():
        for i in range(4):
            with open(os.path.join(staging, f"f{i}"), "wb") as f:
                f.write(os.urandom(MiB))
                os.fsync(f.fileno())
    blocks = [p for p in (plugin.cache_dir / "_shared" / "blocks").glob("*/*")]
    assert 0 < sum(p.stat().st_size for p in blocks) <= 8 * MiB
    for name, staging in stagings.items():
        unstage(plugin, name, staging)


def _children(pid: int, word: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                words = f.read().decode(errors="replace").split("\0")
        except (OSError, ValueError):
            continue
        if ppid == pid and word in words:
            found.append(int(entry))
    return found


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def test_stage_forks_the_mount_from_the_plugins_zygote_and_it_outlives_both(plugin,
                                                                           kubelet) -> None:
    """The node plugin keeps a zygote: a staged volume's mount process is forked from it
    (a warm interpreter: the first byte of a volume on a new node comes sooner), is a
    mount like any other, and survives the plugin and the zygote dying."""
    zygote = _wait(lambda: _children(plugin.pid, "zygote"), 60, "the plugin's zygote")[0]
    plugin.wait_for_log(f"chunkfs zygote {zygote} ready", timeout=60)
    ctx = make_volume(plugin)
    staging = kubelet.staging("pvc-1")
    stage(plugin, "pvc-1", staging, ctx)
    pids = mount_pids(staging)
    assert len(pids) == 1
    with open(f"/proc/{pids[0]}/stat") as f:
        assert int(f.read().rsplit(")", 1)[1].split()[1]) == zygote
    with open(f"/proc/{pids[0]}/cmdline", "rb") as f:
        assert f"epoch={ctx['epoch']}".encode() in f.read()
    with open(os.path.join(staging, "f"), "wb") as f:
        f.write(b"staged through a zygote")
        f.flush()
        os.fsync(f.fileno())
    plugin.kill()  # SIGKILL: its zygote goes with it (its lifeline closes) ...
    _wait(lambda: not os.path.exists(f"/proc/{zygote}/cmdline")
          or not open(f"/proc/{zygote}/cmdline", "rb").read(), 20, "the zygote to exit")
    with open(os.path.join(staging, "f"), "rb") as f:  # ... the mount does not
        assert f.read() == b"staged through a zygote"
    assert mount_pids(staging) == pids
    plugin.start()
    _wait(lambda: _children(plugin.pid, "zygote"), 60, "the restarted plugin's zygote")
    unstage(plugin, "pvc-1", staging)
    assert staging not in mount_table() and not mount_pids(staging)


@pytest.mark.parametrize("field", ["volume_id", "staging_target_path", "volume_capability"])
def test_stage_missing_field_is_invalid_argument(plugin, kubelet, field) -> None:
    req = csi_pb2.NodeStageVolumeRequest(volume_id="pvc-1",
                                         staging_target_path=kubelet.staging("pvc-1"),
                                         volume_capability=mount_cap())
    req.ClearField(field)
    assert code_of(plugin.node.NodeStageVolume, req) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("path", ["relative/path", "/etc/chunkfs-stage", "KUBELET/../../x",
                                  "KUBELET"])
def test_stage_path_outside_the_kubelet_dir_is_invalid_argument(plugin, kubelet, path) -> None:
    make_volume(plugin)
    path = path.replace("KUBELET", str(kubelet.root))
    with pytest.raises(grpc.RpcError) as err:
        stage(plugin, "pvc-1", path)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not os.path.exists("/etc/chunkfs-stage")


def test_stage_unknown_volume_is_not_found(plugin, kubelet) -> None:
    assert code_of(stage, plugin, "pvc-nope", kubelet.staging("pvc-nope")) \
        == grpc.StatusCode.NOT_FOUND


def test_stage_block_volume_is_invalid_argument(plugin, kubelet) -> None:
    make_volume(plugin)
    assert code_of(stage, plugin, "pvc-1", kubelet.staging("pvc-1"), cap=block_cap()) \
        == grpc.StatusCode.INVALID_ARGUMENT


def test_stage_bad_epoch_is_invalid_argument(plugin, kubelet) -> None:
    make_volume(plugin)
    assert code_of(stage, plugin, "pvc-1", kubelet.staging("pvc-1"), {"epoch": "x"}) \
        == grpc.StatusCode.INVALID_ARGUMENT


def test_stage_again_with_other_arguments(plugin, kubelet, staged) -> None:
    staging, ctx = staged
    assert code_of(stage, plugin, "pvc-1", staging, ctx, mount_cap(Mode.MULTI_NODE_READER_ONLY)) \
        == grpc.StatusCode.ALREADY_EXISTS
    other = kubelet.staging("pvc-1-elsewhere")
    assert code_of(stage, plugin, "pvc-1", other, ctx) == grpc.StatusCode.FAILED_PRECONDITION
    assert other not in mount_table()


def test_unstage_while_published_is_failed_precondition(plugin, kubelet, staged) -> None:
    staging, _ = staged
    target = kubelet.target("pvc-1")
    publish(plugin, "pvc-1", staging, target)
    assert code_of(unstage, plugin, "pvc-1", staging) == grpc.StatusCode.FAILED_PRECONDITION
    assert os.stat(target).st_ino == 1  # untouched
    unpublish(plugin, "pvc-1", target)
    unstage(plugin, "pvc-1", staging)


def test_unstage_flushes_data(plugin, kubelet, staged) -> None:
    staging, ctx = staged
    with open(os.path.join(staging, "data.bin"), "wb") as f:
        f.write(os.urandom(3 * MiB))  # no fsync: the unmount must flush it
    expected = open(os.path.join(staging, "data.bin"), "rb").read()
    unstage(plugin, "pvc-1", staging)
    stage(plugin, "pvc-1", staging, ctx)
    assert open(os.path.join(staging, "data.bin"), "rb").read() == expected


# --- NodePublishVolume / NodeUnpublishVolume ----------------------------------------

def test_publish_bind_mounts_and_is_idempotent(plugin, kubelet, staged) -> None:
    staging, _ = staged
    target = kubelet.target("pvc-1")
    publish(plugin, "pvc-1", staging, target)
    publish(plugin, "pvc-1", staging, target)
    with open(os.path.join(target, "hello"), "w") as f:
        f.write("through the bind mount")
    assert open(os.path.join(staging, "hello")).read() == "through the bind mount"
    unpublish(plugin, "pvc-1", target)
    assert not os.path.exists(target)  # the plugin removes what it created
    unpublish(plugin, "pvc-1", target)  # repeat: OK


def test_publish_readonly_and_mount_flags(plugin, kubelet, staged) -> None:
    staging, _ = staged
    ro_target, flag_target = kubelet.target("pvc-1"), kubelet.target("pvc-1")
    cap = mount_cap(Mode.SINGLE_NODE_MULTI_WRITER)
    publish(plugin, "pvc-1", staging, ro_target, cap=cap, readonly=True)
    publish(plugin, "pvc-1", staging, flag_target,
            cap=mount_cap(Mode.SINGLE_NODE_MULTI_WRITER, flags=("noexec", "nosuid")))
    assert "ro" in mount_options(ro_target)
    with pytest.raises(OSError) as err:
        open(os.path.join(ro_target, "nope"), "w")
    assert err.value.errno == errno.EROFS
    assert {"rw", "noexec", "nosuid"} <= mount_options(flag_target)
    for target in (ro_target, flag_target):
        unpublish(plugin, "pvc-1", target)


@pytest.mark.parametrize("field", ["volume_id", "target_path", "volume_capability"])
def test_publish_missing_field_is_invalid_argument(plugin, kubelet, field) -> None:
    req = csi_pb2.NodePublishVolumeRequest(
        volume_id="pvc-1", staging_target_path=kubelet.staging("pvc-1"),
        target_path=kubelet.target("pvc-1"), volume_capability=mount_cap())
    req.ClearField(field)
    assert code_of(plugin.node.NodePublishVolume, req) == grpc.StatusCode.INVALID_ARGUMENT


def test_publish_without_stage_is_failed_precondition(plugin, kubelet) -> None:
    make_volume(plugin)
    target = kubelet.target("pvc-1")
    assert code_of(publish, plugin, "pvc-1", kubelet.staging("pvc-1"), target) \
        == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(publish, plugin, "pvc-1", "", target) == grpc.StatusCode.FAILED_PRECONDITION


def test_publish_target_outside_the_kubelet_dir_is_invalid_argument(plugin, staged) -> None:
    staging, _ = staged
    assert code_of(publish, plugin, "pvc-1", staging, "/tmp/not-kubelet/mount") \
        == grpc.StatusCode.INVALID_ARGUMENT
    assert not os.path.exists("/tmp/not-kubelet")


def test_publish_same_target_other_arguments_is_already_exists(plugin, kubelet, staged) -> None:
    staging, _ = staged
    target = kubelet.target("pvc-1")
    publish(plugin, "pvc-1", staging, target)
    assert code_of(publish, plugin, "pvc-1", staging, target, readonly=True) \
        == grpc.StatusCode.ALREADY_EXISTS
    unpublish(plugin, "pvc-1", target)


@pytest.mark.parametrize("mode, second_ok", [
    (Mode.SINGLE_NODE_SINGLE_WRITER, False),
    (Mode.SINGLE_NODE_WRITER, False),
    (Mode.SINGLE_NODE_MULTI_WRITER, True),
    (Mode.MULTI_NODE_MULTI_WRITER, True),
])
def test_publish_second_target_per_access_mode(plugin, kubelet, mode, second_ok) -> None:
    ctx = make_volume(plugin, mode=mode)
    staging = kubelet.staging("pvc-1")
    cap = mount_cap(mode)
    stage(plugin, "pvc-1", staging, ctx, cap)
    first, second = kubelet.target("pvc-1"), kubelet.target("pvc-1")
    publish(plugin, "pvc-1", staging, first, cap)
    if second_ok:
        publish(plugin, "pvc-1", staging, second, cap)
        unpublish(plugin, "pvc-1", second)
    else:
        assert code_of(publish, plugin, "pvc-1", staging, second, cap) \
            == grpc.StatusCode.FAILED_PRECONDITION
    unpublish(plugin, "pvc-1", first)


@pytest.mark.parametrize("field", ["volume_id", "target_path"])
def test_unpublish_missing_field_is_invalid_argument(plugin, kubelet, field) -> None:
    req = csi_pb2.NodeUnpublishVolumeRequest(volume_id="pvc-1",
                                             target_path=kubelet.target("pvc-1"))
    req.ClearField(field)
    assert code_of(plugin.node.NodeUnpublishVolume, req) == grpc.StatusCode.INVALID_ARGUMENT


# --- NodeGetVolumeStats / NodeExpandVolume ------------------------------------------

def stats(plugin, volume_id: str, path: str) -> csi_pb2.NodeGetVolumeStatsResponse:
    return plugin.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=volume_id, volume_path=path))


def test_volume_stats_bytes_and_inodes(plugin, kubelet, staged) -> None:
    staging, _ = staged
    target = kubelet.target("pvc-1")
    publish(plugin, "pvc-1", staging, target)
    with open(os.path.join(target, "f"), "wb") as f:
        f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())
    resp = stats(plugin, "pvc-1", target)
    usage = {u.unit: u for u in resp.usage}
    Unit = csi_pb2.VolumeUsage
    assert usage[Unit.BYTES].total == 64 * MiB
    assert usage[Unit.BYTES].used >= MiB
    assert usage[Unit.INODES].used >= 2
    assert not resp.volume_condition.abnormal
    assert stats(plugin, "pvc-1", staging).usage  # the staging path works too
    unpublish(plugin, "pvc-1", target)


def test_volume_stats_errors(plugin, kubelet, staged) -> None:
    assert code_of(stats, plugin, "pvc-1", kubelet.target("pvc-1")) == grpc.StatusCode.NOT_FOUND
    assert code_of(stats, plugin, "pvc-2", staged[0]) == grpc.StatusCode.NOT_FOUND
    assert code_of(stats, plugin, "", staged[0]) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(stats, plugin, "pvc-1", "") == grpc.StatusCode.INVALID_ARGUMENT


def test_volume_stats_report_a_dead_mount(cluster) -> None:
    plugin = cluster.start("node-a", "all", extra=("--recover-interval", "0"))
    ctx = make_volume(plugin)
    staging = plugin.kubelet.staging("pvc-1")
    stage(plugin, "pvc-1", staging, ctx)
    for pid in mount_pids(staging):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:
        resp = stats(plugin, "pvc-1", staging)
        if resp.volume_condition.abnormal:
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert "dead" in resp.volume_condition.message
    # A repeated NodeStageVolume brings it back.
    stage(plugin, "pvc-1", staging, ctx)
    assert not stats(plugin, "pvc-1", staging).volume_condition.abnormal


def test_expand_is_seen_live_by_the_mount(plugin, kubelet, staged) -> None:
    staging, _ = staged
    target = kubelet.target("pvc-1")
    publish(plugin, "pvc-1", staging, target)
    resp = plugin.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id="pvc-1", capacity_range=csi_pb2.CapacityRange(required_bytes=128 * MiB)))
    assert not resp.node_expansion_required
    deadline = time.monotonic() + 10
    while os.statvfs(target).f_blocks * os.statvfs(target).f_frsize != 128 * MiB:
        assert time.monotonic() < deadline, "the mount never saw the new size"
        time.sleep(0.2)
    node = plugin.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
        volume_id="pvc-1", volume_path=target,
        capacity_range=csi_pb2.CapacityRange(required_bytes=128 * MiB)))
    assert node.capacity_bytes == 128 * MiB
    assert code_of(plugin.node.NodeExpandVolume, csi_pb2.NodeExpandVolumeRequest(
        volume_id="pvc-1", volume_path=kubelet.target("pvc-1"))) == grpc.StatusCode.NOT_FOUND
    unpublish(plugin, "pvc-1", target)


def test_concurrent_stage_of_one_volume_is_aborted(plugin, kubelet, local_services) -> None:
    ctx = make_volume(plugin)
    staging = kubelet.staging("pvc-1")
    req = csi_pb2.NodeStageVolumeRequest(volume_id="pvc-1", staging_target_path=staging,
                                         volume_capability=mount_cap(), publish_context=ctx)
    local_services.redis.pause()  # the first call waits for Redis, holding the volume
    try:
        first = plugin.node.NodeStageVolume.future(req)
        deadline = time.monotonic() + 10
        while plugin.metric("chunkfs_csi_rpc_inflight", method="NodeStageVolume") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert code_of(plugin.node.NodeStageVolume, req) == grpc.StatusCode.ABORTED
    finally:
        local_services.redis.resume()
    first.result(timeout=60)
    plugin.node.NodeStageVolume(req)  # and now a plain repeat


def test_metrics_per_rpc_and_per_mount(plugin, staged) -> None:
    staging, _ = staged
    with open(os.path.join(staging, "f"), "wb") as f:
        f.write(b"x" * 1000)
    text = plugin.metrics()
    assert 'chunkfs_csi_rpc_total{code="OK",method="NodeStageVolume"} 1.0' in text
    assert 'chunkfs_csi_rpc_duration_seconds_count{method="NodeStageVolume"} 1.0' in text
    assert plugin.metric("chunkfs_csi_staged_volumes") == 1
    assert plugin.metric("chunkfs_csi_mount_up", volume="pvc-1") == 1
    for name in ("dirty_bytes", "cache_hits", "cache_misses", "s3_errors", "redis_errors",
                 "fenced", "dirty_files", "dirty_age_s", "lease_epoch", "lease_writes",
                 "cache_bytes", "cache_limit", "s3_latency_recent_ms", "s3_latency_max_ms",
                 "s3_latency_le_ms_inf", "redis_latency_recent_ms", "redis_latency_le_ms_50",
                 "redis_latency_last_error_at", "cache_volume_bytes", "cache_volume_entries",
                 "cache_nospace", "warm_prefetched", "warm_prefetched_bytes", "warm_progress",
                 "warm_listed", "hot_set_entries"):
        assert f'chunkfs_mount_{name}{{volume="pvc-1"}}' in text, name
    assert plugin.metric("chunkfs_mount_fenced", volume="pvc-1") == 0
    assert plugin.metric("chunkfs_mount_lease_writes", volume="pvc-1") == 1
    # the plugin's controller side collected garbage at its start: the mount shows it
    deadline = time.monotonic() + 40
    while plugin.metric("chunkfs_mount_last_gc_finished", volume="pvc-1") == 0:
        assert time.monotonic() < deadline, "the mount never showed the last GC run"
        time.sleep(0.5)
    assert plugin.metric("chunkfs_mount_last_gc_ok", volume="pvc-1") == 1


def test_stage_with_an_unknown_chunkfs_option_is_invalid_argument(plugin, kubelet) -> None:
    ctx = make_volume(plugin)
    staging = kubelet.staging("pvc-1")
    with pytest.raises(grpc.RpcError) as err:
        stage(plugin, "pvc-1", staging, ctx, mount_cap(flags=("frobnicate=1",)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "frobnicate" in err.value.details()
    assert staging not in mount_table()
    stage(plugin, "pvc-1", staging, ctx, mount_cap(flags=("noatime", "io-timeout=30")))
    unstage(plugin, "pvc-1", staging)


def test_unstage_and_unpublish_of_an_unknown_volume_are_not_found(plugin, kubelet) -> None:
    assert code_of(unpublish, plugin, "pvc-nope", kubelet.target("pvc-nope")) \
        == grpc.StatusCode.NOT_FOUND
    assert code_of(unstage, plugin, "pvc-nope", kubelet.staging("pvc-nope")) \
        == grpc.StatusCode.NOT_FOUND
    make_volume(plugin)  # exists, but not staged or published here: nothing to undo, OK
    unpublish(plugin, "pvc-1", kubelet.target("pvc-1"))
    unstage(plugin, "pvc-1", kubelet.staging("pvc-1"))


# --- NodeGetVolumeStats / NodeExpandVolume: NOT_FOUND unless the volume is mounted there --

def expand(plugin, volume_id: str, path: str) -> csi_pb2.NodeExpandVolumeResponse:
    return plugin.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
        volume_id=volume_id, volume_path=path))


@pytest.mark.parametrize("call", [stats, expand], ids=["stats", "expand"])
def test_stats_and_expand_of_an_unknown_volume_or_path_are_not_found(plugin, kubelet, staged,
                                                                      call) -> None:
    staging, _ = staged
    target = kubelet.target("pvc-1")
    publish(plugin, "pvc-1", staging, target)
    for volume_id, path in [
        ("pvc-nope", "some/path"),            # csi-sanity: unknown volume, relative path
        ("pvc-nope", target),                 # unknown volume at a real publish
        ("pvc-1", "some/path"),               # csi-sanity: known volume, not that path
        ("pvc-1", "/etc"),                    # outside the kubelet dir
        ("pvc-1", kubelet.target("pvc-1")),   # under the kubelet dir, never published
        ("pvc-1", target + "/.."),            # not a path this plugin mounted
    ]:
        with pytest.raises(grpc.RpcError) as err:
            call(plugin, volume_id, path)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, (volume_id, path)
    assert call(plugin, "pvc-1", target)  # and the real publish answers
    unpublish(plugin, "pvc-1", target)


@pytest.mark.parametrize("call", [stats, expand], ids=["stats", "expand"])
def test_stats_and_expand_where_the_volume_is_no_longer_mounted_are_not_found(cluster,
                                                                              call) -> None:
    plugin = cluster.start("node-a", "all", extra=("--recover-interval", "0"))
    ctx = make_volume(plugin)
    staging, target = plugin.kubelet.staging("pvc-1"), plugin.kubelet.target("pvc-1")
    stage(plugin, "pvc-1", staging, ctx)
    publish(plugin, "pvc-1", staging, target)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", staging], check=True)  # over the volume
    with pytest.raises(grpc.RpcError) as err:
        call(plugin, "pvc-1", staging)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "tmpfs" in err.value.details()
    subprocess.run(["umount", staging], check=True)
    subprocess.run(["umount", target], check=True)  # behind the plugin's back
    with pytest.raises(grpc.RpcError) as err:
        call(plugin, "pvc-1", target)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nothing is mounted" in err.value.details()
    assert call(plugin, "pvc-1", staging)


# --- paths: symlinks are never followed, foreign mounts never touched ---------------

@pytest.fixture
def victim(csi_root):
    """A directory outside the kubelet dir that a symlink may point at (think /etc)."""
    path = csi_root / "victim"
    path.mkdir()
    (path / "passwd").write_text("root:x:0:0\n")
    return path


def _untouched(victim) -> None:
    assert str(victim) not in mount_table()
    assert (victim / "passwd").read_text() == "root:x:0:0\n"


def test_stage_at_a_symlink_is_refused(plugin, kubelet, victim) -> None:
    ctx = make_volume(plugin)
    staging = kubelet.staging("pvc-1")
    os.rmdir(staging)
    os.symlink(victim, staging)
    with pytest.raises(grpc.RpcError) as err:
        stage(plugin, "pvc-1", staging, ctx)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "symlink" in err.value.details()
    _untouched(victim)
    assert code_of(unstage, plugin, "pvc-1", staging) == grpc.StatusCode.INVALID_ARGUMENT


def test_stage_below_a_symlinked_directory_is_refused(plugin, kubelet) -> None:
    """Even a symlink that stays inside the kubelet dir: nothing is resolved twice."""
    ctx = make_volume(plugin)
    real = kubelet.root / "real-dir"
    real.mkdir()
    os.symlink(real, kubelet.root / "linked")
    with pytest.raises(grpc.RpcError) as err:
        stage(plugin, "pvc-1", str(kubelet.root / "linked" / "globalmount"), ctx)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "linked is a symlink" in err.value.details()
    assert not os.listdir(real)


@pytest.mark.parametrize("where", ["target", "parent"])
def test_publish_at_a_symlink_is_refused(plugin, kubelet, staged, victim, where) -> None:
    staging, _ = staged
    target = kubelet.target("pvc-1")
    if where == "target":
        os.symlink(victim, target)
    else:
        parent = os.path.dirname(target)
        os.rmdir(parent)
        os.symlink(victim, parent)
    with pytest.raises(grpc.RpcError) as err:
        publish(plugin, "pvc-1", staging, target)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "symlink" in err.value.details()
    _untouched(victim)
    assert not os.path.exists(victim / "mount")
    assert code_of(unpublish, plugin, "pvc-1", target) == grpc.StatusCode.INVALID_ARGUMENT
    link = target if where == "target" else os.path.dirname(target)
    assert os.path.islink(link) and (victim / "passwd").exists()


def test_unpublish_of_a_symlink_to_a_mount_does_not_unmount_it(plugin, kubelet, staged) -> None:
    staging, _ = staged
    target = kubelet.target("pvc-1")
    publish(plugin, "pvc-1", staging, target)
    link = kubelet.target("pvc-1")
    os.symlink(target, link)  # a path that leads to the live publish
    assert code_of(unpublish, plugin, "pvc-1", link) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(stats, plugin, "pvc-1", link) == grpc.StatusCode.NOT_FOUND
    assert target in mount_table()
    unpublish(plugin, "pvc-1", target)


@pytest.mark.parametrize("path", ["KUBELET/pods/../plugins/x", "KUBELET/./pods/../../x"])
def test_paths_with_dot_dot_are_refused(plugin, kubelet, path) -> None:
    ctx = make_volume(plugin)
    with pytest.raises(grpc.RpcError) as err:
        stage(plugin, "pvc-1", path.replace("KUBELET", str(kubelet.root)), ctx)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and ".." in err.value.details()


@pytest.fixture
def tmpfs_at():
    mounted: list[str] = []

    def mount(path: str) -> str:
        os.makedirs(path, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "chunkfs-test-tmpfs", path],
                       check=True)
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", path], check=False, capture_output=True)


def test_foreign_mounts_are_never_mounted_over_or_unmounted(plugin, kubelet, tmpfs_at) -> None:
    ctx = make_volume(plugin)
    staging = tmpfs_at(kubelet.staging("pvc-1"))
    assert code_of(stage, plugin, "pvc-1", staging, ctx) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(unstage, plugin, "pvc-1", staging) == grpc.StatusCode.FAILED_PRECONDITION
    assert mount_table()[staging] == "tmpfs"
    target = tmpfs_at(kubelet.target("pvc-1"))
    assert code_of(unpublish, plugin, "pvc-1", target) == grpc.StatusCode.FAILED_PRECONDITION
    assert mount_table()[target] == "tmpfs"


def test_publish_onto_a_foreign_mount_or_the_staging_path_is_refused(plugin, kubelet, staged,
                                                                     tmpfs_at) -> None:
    staging, ctx = staged
    target = tmpfs_at(kubelet.target("pvc-1"))
    with pytest.raises(grpc.RpcError) as err:
        publish(plugin, "pvc-1", staging, target)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "tmpfs" in err.value.details()
    assert mount_table()[target] == "tmpfs"
    assert code_of(publish, plugin, "pvc-1", staging, staging) \
        == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(unpublish, plugin, "pvc-1", staging) == grpc.StatusCode.INVALID_ARGUMENT
    make_volume(plugin, "pvc-2")  # another volume's staging mount is foreign too
    other = kubelet.staging("pvc-2")
    stage(plugin, "pvc-2", other, {})
    assert code_of(publish, plugin, "pvc-1", staging, other) \
        == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(unpublish, plugin, "pvc-1", other) == grpc.StatusCode.FAILED_PRECONDITION
    assert mount_table()[other] == "fuse.chunkfs" and mount_table()[staging] == "fuse.chunkfs"
    unstage(plugin, "pvc-2", other)


# --- mount flags: publish mounts are always nosuid,nodev -----------------------------

@pytest.mark.parametrize("flags, readonly", [((), False), (("exec", "noatime"), False),
                                             (("nosuid",), True)])
def test_publish_mounts_are_always_nosuid_and_nodev(plugin, kubelet, staged, flags,
                                                    readonly) -> None:
    staging, _ = staged
    target = kubelet.target("pvc-1")
    publish(plugin, "pvc-1", staging, target,
            cap=mount_cap(Mode.SINGLE_NODE_MULTI_WRITER, flags=flags), readonly=readonly)
    options = mount_options(target)  # the real mount table
    assert {"nosuid", "nodev", "ro" if readonly else "rw"} <= options, options
    assert "noexec" not in options
    if "noatime" in flags:
        assert "noatime" in options
    unpublish(plugin, "pvc-1", target)


@pytest.mark.parametrize("flag", ["suid", "dev", "bind", "remount"])
def test_suid_dev_and_mount_kind_flags_are_invalid_argument(plugin, kubelet, staged,
                                                            flag) -> None:
    staging, ctx = staged
    target = kubelet.target("pvc-1")
    cap = mount_cap(flags=("noatime", flag))
    with pytest.raises(grpc.RpcError) as err:
        publish(plugin, "pvc-1", staging, target, cap=cap)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert flag in err.value.details()
    assert target not in mount_table()
    assert code_of(stage, plugin, "pvc-2", kubelet.staging("pvc-2"), ctx, cap) \
        == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(plugin.controller.CreateVolume, csi_pb2.CreateVolumeRequest(
        name="pvc-3", volume_capabilities=[cap])) == grpc.StatusCode.INVALID_ARGUMENT
