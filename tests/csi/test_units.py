"""Unit tests of the plugin's building blocks (no Redis, no S3, no FUSE)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile

import grpc
import pytest

from chunkfs import errors as cf
from csi import backends, errors, observe, secret_backend, validate
from csi.mountinfo import parse_line, unescape
from csi.rpc import KeyLocks, exclusive, require
from csi.secret_backend import AddressPolicy, parse_networks
from csi.secretstore import SecretStore, filesystem_of
from csi.state import MAX_BAD, PublishRecord, StageRecord, StateStore, backend_identity
from csi.v1 import csi_pb2

from .conftest import Mode, block_cap, mount_cap

# --- validate -----------------------------------------------------------------------


@pytest.mark.parametrize("cap, problem", [
    (mount_cap(), None),
    (mount_cap(fs_type="chunkfs"), None),
    (mount_cap(Mode.MULTI_NODE_MULTI_WRITER), None),
    (block_cap(), "block"),
    (mount_cap(fs_type="xfs"), "fs_type"),
    (mount_cap(Mode.MULTI_NODE_SINGLE_WRITER), "not supported"),
    (mount_cap(Mode.UNKNOWN), "not supported"),
])
def test_capability_problem(cap, problem) -> None:
    found = validate.capability_problem(cap)
    assert (found is None) if problem is None else (problem in found)


def test_mount_flags_split_between_bind_and_chunkfs() -> None:
    bind, options = validate.split_mount_flags(["noexec,ro", "buffer-size=64MiB", " nosuid "])
    assert bind == ["noexec", "ro", "nosuid"]
    assert options == ["buffer-size=64MiB"]
    for bad in ("epoch=3", "a b", "x;rm -rf /", "suid", "dev", "nosuid,dev", "bind"):
        with pytest.raises(errors.CsiError) as err:
            validate.split_mount_flags([bad])
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("value, ok", [
    ("pvc-0b1c2d3e-aaaa-bbbb-cccc-0123456789ab", True), ("snap.1_x", True),
    ("", False), ("../x", False), (".hidden", False), ("a/b", False), ("x" * 129, False),
])
def test_check_id(value, ok) -> None:
    if ok:
        assert validate.check_id("volume_id", value) == value
    else:
        with pytest.raises(errors.CsiError):
            validate.check_id("volume_id", value)


def test_choose_capacity() -> None:
    rules = validate.CapacityRules(default=100, minimum=10, maximum=1000)
    assert validate.choose_capacity(0, 0, rules) == 100
    assert validate.choose_capacity(0, 50, rules) == 50
    assert validate.choose_capacity(5, 0, rules) == 10
    assert validate.choose_capacity(20, 0, rules, floor=30) == 30
    for required, limit, floor in ((0, 5, 0), (2000, 0, 0), (20, 25, 30)):
        with pytest.raises(errors.CsiError) as err:
            validate.choose_capacity(required, limit, rules, floor)
        assert err.value.code == grpc.StatusCode.OUT_OF_RANGE


def test_capacity_range() -> None:
    assert validate.capacity_range(None) == (0, 0)
    assert validate.capacity_range(csi_pb2.CapacityRange(required_bytes=5, limit_bytes=9)) \
        == (5, 9)
    with pytest.raises(errors.CsiError) as err:
        validate.capacity_range(csi_pb2.CapacityRange(required_bytes=-1))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(errors.CsiError) as err:
        validate.capacity_range(csi_pb2.CapacityRange(required_bytes=9, limit_bytes=5))
    assert err.value.code == grpc.StatusCode.OUT_OF_RANGE


def test_pages() -> None:
    names = ["a", "b", "c", "d", "e"]
    assert validate.page(names, "", 0) == (0, 5, "")
    start, end, token = validate.page(names, "", 2)
    assert (start, end) == (0, 2) and token
    assert validate.page(names, token, 2)[:2] == (2, 4)
    assert validate.page(names, validate.next_token("bb"), 0)[:2] == (2, 5)  # deleted entry
    assert validate.page(names, validate.next_token("e"), 2) == (5, 5, "")
    for bad in ("x", "after:", "1"):
        with pytest.raises(errors.CsiError) as err:
            validate.page(names, bad, 0)
        assert err.value.code == grpc.StatusCode.ABORTED


def test_volume_options() -> None:
    assert validate.volume_options({"cache-size": "1GiB", "csi.storage.k8s.io/pv/name": "x"}) \
        == {"cache-size": "1GiB"}
    for params in ({"access-key-id": "AK"}, {"storage": "s3://b/p"}, {"nope": "1"}):
        with pytest.raises(errors.CsiError) as err:
            validate.volume_options(params)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


# --- errors -------------------------------------------------------------------------

@pytest.mark.parametrize("exc, code", [
    (cf.VolumeNotFound("v"), grpc.StatusCode.NOT_FOUND),
    (cf.SnapshotNotFound("s"), grpc.StatusCode.NOT_FOUND),
    (cf.VolumeExists("v"), grpc.StatusCode.ALREADY_EXISTS),
    (cf.InvalidArgument("bad"), grpc.StatusCode.INVALID_ARGUMENT),
    (cf.NoSpace("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (cf.Fenced("old epoch"), grpc.StatusCode.FAILED_PRECONDITION),
    (cf.MetaUnavailable("down"), grpc.StatusCode.UNAVAILABLE),
    (cf.StorageUnavailable("down"), grpc.StatusCode.UNAVAILABLE),
    (cf.CorruptObject("bad hash"), grpc.StatusCode.DATA_LOSS),
    (cf.FsError(5), grpc.StatusCode.INTERNAL),
    (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
    (RuntimeError("bug"), grpc.StatusCode.INTERNAL),
    (errors.busy("volume", "v"), grpc.StatusCode.ABORTED),
])
def test_to_status(exc, code) -> None:
    assert errors.to_status(exc)[0] == code


# --- rpc plumbing -------------------------------------------------------------------

class _Servicer:
    def __init__(self) -> None:
        self.locks = KeyLocks()
        self.gate = asyncio.Event()

    @require("volume_id", "volume_capability", "capacity_range.required_bytes")
    @exclusive("volume", lambda r: r.volume_id)
    async def Expand(self, request, context):
        await self.gate.wait()
        return "done"


async def test_require_and_exclusive() -> None:
    svc = _Servicer()
    full = csi_pb2.ControllerExpandVolumeRequest(
        volume_id="v", volume_capability=mount_cap(),
        capacity_range=csi_pb2.CapacityRange(required_bytes=1))
    for field in ("volume_id", "volume_capability", "capacity_range"):
        req = csi_pb2.ControllerExpandVolumeRequest()
        req.CopyFrom(full)
        req.ClearField(field)
        with pytest.raises(errors.CsiError) as err:
            await svc.Expand(req, None)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.message
    first = asyncio.create_task(svc.Expand(full, None))
    await asyncio.sleep(0)
    with pytest.raises(errors.CsiError) as err:
        await svc.Expand(full, None)
    assert err.value.code == grpc.StatusCode.ABORTED
    svc.gate.set()
    assert await first == "done"
    assert await svc.Expand(full, None) == "done"  # released


async def test_background_work_makes_rpcs_wait_not_abort() -> None:
    locks = KeyLocks()
    order = []

    async def background() -> None:
        async with locks.background("volume", "v"):
            await asyncio.sleep(0.05)
            order.append("background")

    async def rpc() -> None:
        async with locks.rpc("volume", "v"):
            order.append("rpc")

    task = asyncio.create_task(background())
    await asyncio.sleep(0)
    await rpc()
    await task
    assert order == ["background", "rpc"]
    assert not locks.busy("volume", "v")


# --- backends -----------------------------------------------------------------------

BASE = {"CHUNKFS_META": "redis://127.0.0.1:6379/0", "CHUNKFS_STORAGE": "s3://bucket/p",
        "AWS_ACCESS_KEY_ID": "env-ak", "AWS_SECRET_ACCESS_KEY": "env-sk",
        "AWS_ENDPOINT_URL_S3": "http://env:8333", "AWS_REGION": "eu-north-1",
        "AWS_SESSION_TOKEN": "env-token", "AWS_PROFILE": "node-profile", "PATH": "/bin"}
SECRET = {"meta-url": "redis://:pw-Zq81@r2:6380/1", "storage": "s3://other/x",
          "endpoint": "http://s3:9000", "access-key-id": "AK-Zq81",
          "secret-access-key": "SK-Zq81-very-secret"}
LOCAL = {**SECRET, "meta-url": "redis://:pw-Zq81@127.0.0.1:6380/1",
         "endpoint": "http://127.0.0.1:9000"}  # hosts that resolve here


def test_backend_from_environment_and_secrets() -> None:
    default = backends.resolve({}, BASE)
    assert default.meta_url == BASE["CHUNKFS_META"] and not default.from_secrets
    assert default.storage.access_key == "env-ak"
    assert default.storage.endpoint == "http://env:8333"
    assert default.env(BASE) == BASE  # the default backend: the environment as it is
    other = backends.resolve({**SECRET, "unrelated": "ignored"}, BASE)
    assert other.storage.bucket == "other" and other.storage.endpoint == "http://s3:9000"
    assert (other.storage.access_key, other.storage.secret_key) == ("AK-Zq81",
                                                                     "SK-Zq81-very-secret")
    assert other.storage.region == "us-east-1"  # not the environment's eu-north-1
    assert "pw-Zq81" not in other.describe() and "SK-Zq81" not in repr(other.storage)
    env = other.env(BASE)
    assert env["CHUNKFS_META"] == SECRET["meta-url"] and env["PATH"] == "/bin"
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert env["AWS_EC2_METADATA_DISABLED"] == "true"
    for leaked in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        assert leaked not in env  # nothing of the node's backend mixes with the Secret's
    assert other != default and hash(other) != hash(default)
    assert backends.resolve({**SECRET, "region": "ap-south-2"}, BASE).storage.region \
        == "ap-south-2"
    with pytest.raises(cf.InvalidArgument):
        backends.resolve({}, {})


@pytest.mark.parametrize("missing", secret_backend.REQUIRED)
def test_a_partial_secret_is_refused_and_never_completed_from_the_environment(missing) -> None:
    partial = {k: v for k, v in SECRET.items() if k != missing}
    with pytest.raises(errors.CsiError) as err:
        backends.resolve(partial, BASE)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"missing {missing}" in err.value.message
    _no_values(err.value.message)
    with pytest.raises(errors.CsiError):  # an empty value is missing too
        backends.resolve({**SECRET, missing: ""}, BASE)


def test_a_single_backend_key_is_refused() -> None:
    for key in secret_backend.KEYS:
        with pytest.raises(errors.CsiError) as err:
            backends.resolve({key: SECRET.get(key, "us-east-1")}, BASE)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, key


def _no_values(message: str) -> None:
    for value in ("pw-Zq81", "AK-Zq81", "SK-Zq81", "evil.example", "hunter2"):
        assert value not in message, message


@pytest.mark.parametrize("key, value, why", [
    ("meta-url", "unix:///var/run/docker.sock", "unix://"),
    ("meta-url", "unix://:hunter2@/run/redis.sock", "unix://"),
    ("meta-url", "rediss://:hunter2@evil.example:6380/0?ssl_ca_certs=/etc/kubernetes/pki/ca.crt",
     "files on the node"),
    ("meta-url", "rediss://:hunter2@evil.example/0?ssl_certfile=/var/lib/kubelet/pki/k.pem",
     "files on the node"),
    ("meta-url", "http://evil.example:6379/0", "redis://"),
    ("meta-url", "redis://:hunter2@evil.example:6379/0#x", "percent-encode"),
    ("meta-url", "redis+cluster://:hunter2@evil.example:7000/3", "one database"),
    ("meta-url", "redis://:hunter2@evil.example:6379/0?ssl=true", "query"),
    ("meta-url", "redis://:hunter2@evil.example:99999/0", "port"),
    ("meta-url", "redis://:hunter2@evil.example:6379/0\nx", "control"),
    ("storage", "file:///etc/evil.example", "s3://"),
    ("storage", "s3://hunter2@evil.example/p", "s3://"),
    ("storage", "s3://A_B/p", "bucket"),
    ("endpoint", "ftp://evil.example/", "http"),
    ("endpoint", "file:///etc/passwd", "http"),
    ("endpoint", "http://user:hunter2@evil.example/", "credentials"),
    ("endpoint", "https://evil.example/?token=hunter2", "query"),
    ("endpoint", "http:///nohost", "host"),
    ("access-key-id", "AK with blanks", "printable"),
    ("secret-access-key", "SK\nhunter2", "printable"),
    ("region", "Evil Region", "region"),
])
def test_secret_backend_values_are_checked(key, value, why) -> None:
    with pytest.raises(errors.CsiError) as err:
        backends.resolve({**SECRET, key: value}, BASE)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert key in err.value.message and why in err.value.message, err.value.message
    _no_values(err.value.message)


@pytest.mark.parametrize("key, value", [
    ("endpoint", "http://169.254.169.254/latest/meta-data/"),
    ("endpoint", "http://[fd00:ec2::254]/"),
    ("endpoint", "http://[fe80::1]:9000/"),
    ("endpoint", "http://[::ffff:169.254.169.254]/"),
    ("endpoint", "http://2852039166/"),          # 169.254.169.254 in decimal
    ("endpoint", "http://0xa9.254.169.254/"),    # and in hex
    ("meta-url", "redis://169.254.10.1:6379/0"),
    ("meta-url", "redis+cluster://127.0.0.1:7000,169.254.10.1:7001"),   # any seed of a list
    ("meta-url", "redis+sentinel://127.0.0.1,[fe80::1]:26379/primary/0"),
])
async def test_link_local_and_metadata_addresses_are_refused(key, value) -> None:
    with pytest.raises(errors.CsiError) as err:
        await backends.resolve_checked({**LOCAL, key: value}, AddressPolicy(), BASE)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert key in err.value.message and "resolves to an address in" in err.value.message
    for allowed in (AddressPolicy(deny=()), AddressPolicy(parse_networks(["10.0.0.0/8"]))):
        backend = await backends.resolve_checked({**LOCAL, key: value}, allowed, BASE)
        assert backend.from_secrets


async def test_public_and_loopback_hosts_are_allowed_by_default() -> None:
    ok = {**LOCAL, "endpoint": "http://localhost:8333", "meta-url": "redis://[::1]:6379/2"}
    assert (await backends.resolve_checked(ok, AddressPolicy(), BASE)).from_secrets
    for meta in ("rediss://:pw@localhost:6380/1", "rediss://localhost/0?ssl_cert_reqs=none",
                 "redis+sentinel://:pw@127.0.0.1:26379,localhost:26380/primary/3",
                 "redis+cluster://:pw@127.0.0.1:7000,127.0.0.1:7001"):
        backend = await backends.resolve_checked({**LOCAL, "meta-url": meta}, AddressPolicy(),
                                                 BASE)
        assert backend.meta_url == meta
    unresolvable = {**LOCAL, "endpoint": "http://no-such-host.invalid:9000"}
    with pytest.raises(errors.CsiError) as err:
        await backends.resolve_checked(unresolvable, AddressPolicy(), BASE)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


async def test_service_cache_opens_once_and_closes_the_oldest() -> None:
    opened, closed = [], []

    class Svc:
        def __init__(self, meta: str) -> None:
            self.meta = meta

        async def close(self) -> None:
            closed.append(self.meta)

    async def opener(meta, storage):
        opened.append(meta)
        await asyncio.sleep(0.01)
        return Svc(meta)

    cache = backends.ServiceCache(opener, size=2)
    b1, b2, b3 = (backends.resolve({**SECRET, "meta-url": f"redis://h:1/{i}"}, BASE)
                  for i in range(3))
    got = await asyncio.gather(cache.get(b1), cache.get(b1))
    assert got[0] is got[1] and opened == ["redis://h:1/0"]
    await cache.get(b2)
    await cache.get(b3)
    assert closed == ["redis://h:1/0"]
    await cache.close()
    assert sorted(closed) == ["redis://h:1/0", "redis://h:1/1", "redis://h:1/2"]


# --- observe ------------------------------------------------------------------------

def test_secrets_are_stripped_and_scrubbed() -> None:
    req = csi_pb2.NodeStageVolumeRequest(
        volume_id="v", staging_target_path="/s", secrets={"secret-access-key": "TOPSECRET"},
        volume_capability=mount_cap())
    stripped, names = observe.strip_secrets(req)
    assert names == ["secret-access-key"]
    assert not stripped.secrets and stripped.volume_id == "v"
    assert req.secrets["secret-access-key"] == "TOPSECRET"  # the request is untouched
    assert observe.secret_values(req) == ["TOPSECRET"]
    assert observe.scrub("auth failed for TOPSECRET", ["TOPSECRET"]) == "auth failed for ***"


def test_json_log_lines() -> None:
    record = logging.LogRecord("chunkfs.csi.rpc", logging.INFO, __file__, 1, "%s OK",
                               ("CreateVolume",), None)
    record.fields = {"method": "CreateVolume", "duration_ms": 1.5}
    doc = json.loads(observe.JsonFormatter().format(record))
    assert doc["msg"] == "CreateVolume OK" and doc["method"] == "CreateVolume"
    assert doc["level"] == "info" and doc["time"].endswith("Z")


def test_status_numbers_are_flattened_for_metrics() -> None:
    doc = {"dirty_bytes": 5, "fenced": False, "volume": "v", "cache": {"hits": 3},
           "s3": {"requests": {"GET": 2}}}
    assert dict(observe._numbers("chunkfs_mount", doc)) == {
        "chunkfs_mount_dirty_bytes": 5.0, "chunkfs_mount_fenced": 0.0,
        "chunkfs_mount_cache_hits": 3.0, "chunkfs_mount_s3_requests_get": 2.0}


# --- mounts: records and the mount table --------------------------------------------

def test_state_store_round_trip(tmp_path) -> None:
    store = StateStore(str(tmp_path / "state"))
    stage = StageRecord("pvc-1", "/k/staging", Mode.SINGLE_NODE_WRITER, False, 7,
                        ["buffer-size=64MiB"], "1GiB", "redis://h:6379/0 s3://b/p")
    pub = PublishRecord("pvc-1", "/k/pods/x/mount", "/k/staging", Mode.SINGLE_NODE_WRITER,
                        True, ["noexec"])
    store.save_stage(stage)
    store.save_publish(pub)
    (tmp_path / "state/staged/.tmp-interrupted").write_text("{")  # a torn write
    (tmp_path / "state/published/junk.json").write_text("not json")
    again = StateStore(str(tmp_path / "state"))
    assert again.staged == {"pvc-1": stage}
    assert again.published == {"/k/pods/x/mount": pub}
    assert again.publishes_of("pvc-1") == [pub]
    assert not (tmp_path / "state/staged/.tmp-interrupted").exists()
    assert (tmp_path / "state/published/junk.json.bad").exists()
    assert not (tmp_path / "state/published/junk.json").exists()
    mode = os.stat(tmp_path / "state/staged/pvc-1.json").st_mode & 0o777
    assert mode == 0o600
    again.drop_publish(pub.target_path)
    again.drop_stage("pvc-1")
    assert StateStore(str(tmp_path / "state")).staged == {}


def _all_bytes(root) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_version_1_records_lose_their_credentials_to_the_secret_store(tmp_path) -> None:
    """Records written before this version held the Secret's values in `env`."""
    staged = tmp_path / "state/staged"
    staged.mkdir(parents=True)
    env = {"CHUNKFS_META": "redis://:hunter2-v1@r:6379/3", "CHUNKFS_STORAGE": "s3://b/p",
           "AWS_SECRET_ACCESS_KEY": "sk-v1-secret", "AWS_ACCESS_KEY_ID": "ak"}
    (staged / "pvc-1.json").write_text(json.dumps({
        "version": 1, "volume_id": "pvc-1", "staging_path": "/k/s", "mode": 1,
        "readonly": False, "epoch": 3, "options": [], "cache_size": None, "env": env,
        "created": 1.0}))
    moved: dict[str, dict[str, str]] = {}
    store = StateStore(str(tmp_path / "state"), migrate=lambda v, e: moved.update({v: e}))
    assert moved == {"pvc-1": env}
    rec = store.staged["pvc-1"]
    assert rec.backend == "redis://r:6379/3 s3://b/p" and rec.epoch == 3
    assert b"hunter2-v1" not in _all_bytes(tmp_path) and b"sk-v1" not in _all_bytes(tmp_path)
    assert StateStore(str(tmp_path / "state")).staged == {"pvc-1": rec}  # v2 now


def test_unreadable_records_are_quarantined_bounded_and_without_content(tmp_path) -> None:
    staged = tmp_path / "state/staged"
    staged.mkdir(parents=True)
    for i in range(20):  # e.g. torn version 1 records, credentials included
        (staged / f"pvc-{i}.json").write_text('{"version": 1, "env": {"AWS_SECRET_ACCESS_K'
                                              'EY": "sk-torn-secret"')
        os.utime(staged / f"pvc-{i}.json", (1000 + i, 1000 + i))
    for i in range(3):
        (staged / f"old-{i}.json.bad").write_text("sk-torn-secret")  # earlier versions'
    StateStore(str(tmp_path / "state"))
    bad = sorted(p.name for p in staged.iterdir())
    assert len(bad) == MAX_BAD and all(n.endswith(".json.bad") for n in bad)
    assert b"sk-torn-secret" not in _all_bytes(tmp_path)
    note = json.loads((staged / bad[0]).read_text())
    assert note["error"] == "JSONDecodeError" and note["size"] > 0
    StateStore(str(tmp_path / "state"))  # and they do not pile up across restarts
    assert len(list(staged.iterdir())) == MAX_BAD


def test_quarantined_records_of_older_versions_lose_their_content(tmp_path) -> None:
    staged = tmp_path / "state/staged"
    staged.mkdir(parents=True)
    (staged / "pvc-1.json.bad").write_text('{"env": {"AWS_SECRET_ACCESS_KEY": "sk-old"}}')
    StateStore(str(tmp_path / "state"))
    assert [p.name for p in staged.iterdir()] == ["pvc-1.json.bad"]
    assert b"sk-old" not in _all_bytes(tmp_path)


def test_records_compare_requests_not_secrets() -> None:
    a = StageRecord("v", "/s", 1, False, 3, [], None, "redis://h:6379/0 s3://b/p")
    b = StageRecord("v", "/s", 1, False, 3, [], None, "redis://h:6379/0 s3://b/p")
    assert a.same_request(b)
    assert not a.same_request(StageRecord("v", "/s", 1, False, 4))
    assert not a.same_request(StageRecord("v", "/s", 1, False, 3, [], None, ""))


def test_backend_identity_has_no_credentials() -> None:
    rotated = [{"CHUNKFS_META": f"redis://user{i}:pw{i}@h:6380/2", "CHUNKFS_STORAGE": "s3://b/p",
                "AWS_ENDPOINT_URL": "http://s3:9000", "AWS_REGION": "us-east-1",
                "AWS_ACCESS_KEY_ID": f"ak{i}", "AWS_SECRET_ACCESS_KEY": f"sk{i}"}
               for i in range(2)]
    first, second = (backend_identity(e) for e in rotated)
    assert first == second == "redis://h:6380/2 s3://b/p http://s3:9000 us-east-1"
    assert backend_identity({}) == ""


def test_secret_store_keeps_credentials_in_memory_off_memory_filesystems(tmp_path) -> None:
    store = SecretStore(str(tmp_path / "secrets"))  # tmp_path is not a tmpfs here
    assert not store.persistent or filesystem_of(str(tmp_path)) in ("tmpfs", "ramfs")
    store.put("pvc-1", {"AWS_SECRET_ACCESS_KEY": "sk"})
    assert store.get("pvc-1") == {"AWS_SECRET_ACCESS_KEY": "sk"}
    if not store.persistent:
        assert not (tmp_path / "secrets").exists()


def test_secret_store_on_tmpfs_survives_a_restart_and_tracks_rotation() -> None:
    directory = tempfile.mkdtemp(dir="/dev/shm")
    try:
        store = SecretStore(directory + "/s")
        assert store.persistent
        store.put("pvc-1", {"K": "v1"})
        store.mounted_with("pvc-1", {"K": "v1"})
        assert store.mount_is_current("pvc-1")
        store.put("pvc-1", {"K": "v2"})  # rotated: the running mount still has v1
        again = SecretStore(directory + "/s")
        assert again.get("pvc-1") == {"K": "v2"} and not again.mount_is_current("pvc-1")
        assert os.stat(directory + "/s").st_mode & 0o777 == 0o700
        assert os.stat(directory + "/s/pvc-1.json").st_mode & 0o777 == 0o600
        again.drop("pvc-1")
        assert os.listdir(directory + "/s") == [] and again.get("pvc-1") is None
    finally:
        shutil.rmtree(directory)


def test_mountinfo_unescape() -> None:
    assert unescape(r"/var/lib/with\040space\011tab") == "/var/lib/with space\ttab"
    assert unescape("/plain") == "/plain"
    assert unescape("/ends\\04") == "/ends\\04"


def test_mountinfo_line() -> None:
    line = ("36 35 0:52 / /k/pods/x/mount ro,nosuid,nodev,relatime shared:1 master:2 - "
            "fuse.chunkfs chunkfs:pvc-1 rw,user_id=0,group_id=0,allow_other\n")
    entry = parse_line(line)
    assert entry is not None
    assert (entry.mount_point, entry.device, entry.fstype, entry.source) == (
        "/k/pods/x/mount", "0:52", "fuse.chunkfs", "chunkfs:pvc-1")
    assert {"ro", "nosuid", "nodev"} <= entry.options
    assert parse_line("garbage") is None
