"""Start and stop the real local backends: Redis and SeaweedFS (S3), on free loopback ports.

Setup code for tests, ``scripts/local-stack.sh`` and the benchmark; not part of the data
path, so it is plain ``subprocess`` + blocking clients (redis-py, botocore).

    redis = start_redis(data_dir / "redis")          # RedisService: .url .pid .stop() .pause()
    s3 = start_seaweedfs(data_dir / "seaweedfs")     # S3Service: .endpoint .env() .client()
    stack = LocalStack(data_dir).up()                 # both, recorded in data_dir/state.json
    stack.env()   # CHUNKFS_META, CHUNKFS_STORAGE, AWS_* for the CLI / CSI plugin / tests
    stack.down()

CLI: ``python -m devstack.localstack up|down|env|status [--dir DIR]`` (default DIR ./.local).

Every service runs in its own session (process group) with its data, config and log under
one directory. ``up`` is idempotent: services recorded in the state file whose PID is
alive (same process start time) and which answer are reused; the others are restarted with
the same data, credentials and, when still free, the same ports. ``down`` only signals
PIDs whose identity (start time + command line) matches the state file.

Secrets (S3 secret key, Redis password) never go to logs or reprs; they are in the state
file and the env file (both mode 0600) and in what ``env``/``up`` print on request.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REGION = "us-east-1"
BUCKET = "chunkfs"
DEFAULT_PREFIX = "vol"
LOOPBACK = "127.0.0.1"
STATE_VERSION = 1
READY_KEY = ".localstack/ready"

# weed server component -> flag; every listening port is passed explicitly so that nothing
# derives "port + 10000" or falls back to a fixed default port shared between stacks.
WEED_PORT_FLAGS = {
    "master": "-master.port",
    "master_grpc": "-master.port.grpc",
    "volume": "-volume.port",
    "volume_grpc": "-volume.port.grpc",
    "filer": "-filer.port",
    "filer_grpc": "-filer.port.grpc",
    "s3": "-s3.port",
    "s3_grpc": "-s3.port.grpc",
}
WEED_ROLES = ("master", "volume", "filer", "s3")


class ServiceError(RuntimeError):
    """A local service could not be started, found or stopped."""


# --------------------------------------------------------------------------- helpers


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """True if a server could listen on port now (SO_REUSEADDR, as servers set it, so
    that connections in TIME_WAIT from a previous run do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """n distinct free TCP ports (all bound at once, then released)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = LOOPBACK) -> int:
    return free_ports(1, host)[0]


def find_binary(name: str, env_var: str) -> str:
    """$env_var, then next to the running interpreter (venv bin), then $PATH."""
    explicit = os.environ.get(env_var)
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise ServiceError(f"{env_var}={explicit} is not an executable file")
        return explicit
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    raise ServiceError(f"{name} not found (set {env_var}, or run scripts/setup.sh)")


def _random_token(n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _log_tail(path: Path | None, lines: int = 15) -> str:
    if path is None:
        return ""
    try:
        data = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join(data)


def _proc_start_time(pid: int) -> int | None:
    """Start time of pid in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[0]


def _proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


# --------------------------------------------------------------------------- processes


@dataclass
class ManagedProcess:
    """A service process identified by PID + start time (guards against PID reuse)."""

    pid: int
    start_time: int | None
    log_path: Path | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def _reap(self) -> bool:
        """Reap the process if it is our exited child; True if it is gone."""
        if self.popen is not None:
            return self.popen.poll() is not None
        try:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
            return done == self.pid
        except ChildProcessError:
            return False

    def alive(self) -> bool:
        if self._reap():
            return False
        if _proc_start_time(self.pid) != self.start_time:
            return False  # gone, or the PID now belongs to another process
        return _proc_state(self.pid) not in (None, "Z", "X")

    def send_signal(self, sig: int) -> None:
        if not self.alive():
            raise ServiceError(f"process {self.pid} is not running")
        os.kill(self.pid, sig)

    def pause(self) -> None:
        """SIGSTOP: the service stops answering (fault injection)."""
        self.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.send_signal(signal.SIGCONT)

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (and SIGCONT in case it is paused), wait, then SIGKILL its group."""
        if not self.alive():
            return
        log.info("stopping pid %d", self.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
            os.kill(self.pid, signal.SIGCONT)
        if self.wait(timeout):
            return
        log.warning("pid %d did not exit %.0fs after SIGTERM; sending SIGKILL", self.pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(self.pid) == self.pid:
                os.killpg(self.pid, signal.SIGKILL)
            else:
                os.kill(self.pid, signal.SIGKILL)
        if not self.wait(10):
            raise ServiceError(f"pid {self.pid} survived SIGKILL")


def _spawn(args: list[str], *, cwd: Path, log_path: Path, die_with_parent: bool) -> ManagedProcess:
    with open(log_path, "ab") as logf:
        popen = subprocess.Popen(
            args,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            preexec_fn=_die_with_parent if die_with_parent else None,
        )
    # The child has its own session; it is "detached" as far as the caller is concerned.
    start = None
    for _ in range(100):
        start = _proc_start_time(popen.pid)
        if start is not None or popen.poll() is not None:
            break
        time.sleep(0.01)
    return ManagedProcess(pid=popen.pid, start_time=start, log_path=log_path, popen=popen)


# --------------------------------------------------------------------------- redis


@dataclass
class RedisService:
    """A redis-server bound to 127.0.0.1:port with AOF persistence under data_dir."""

    port: int
    data_dir: Path
    process: ManagedProcess
    password: str | None = field(default=None, repr=False)
    host: str = LOOPBACK

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return self.url_for_db(0)

    def url_for_db(self, db: int) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/{db}"

    def client(self, db: int = 0, **kwargs: Any):  # -> redis.Redis
        import redis

        opts: dict[str, Any] = {"socket_timeout": 5, "socket_connect_timeout": 2}
        opts.update(kwargs)
        return redis.Redis(host=self.host, port=self.port, db=db, password=self.password, **opts)

    def ping(self, timeout: float = 2.0) -> bool:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        try:
            with self.client(
                socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
            ) as c:
                return bool(c.ping())
        except Exception:
            return False

    def alive(self) -> bool:
        return self.process.alive()

    def pause(self) -> None:
        self.process.pause()

    def resume(self) -> None:
        self.process.resume()

    def stop(self, timeout: float = 30.0) -> None:
        self.process.stop(timeout)

    def to_state(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "start_time": self.process.start_time,
            "port": self.port,
            "password": self.password,
            "url": self.url,
            "data_dir": str(self.data_dir),
        }

    @classmethod
    def attach(cls, state: dict[str, Any]) -> RedisService | None:
        """The recorded service if its process is still the one we started, else None."""
        svc = cls(
            port=int(state["port"]),
            data_dir=Path(state["data_dir"]),
            password=state.get("password"),
            process=ManagedProcess(
                pid=int(state["pid"]),
                start_time=state.get("start_time"),
                log_path=Path(state["data_dir"]) / "redis.log",
            ),
        )
        ok = svc.alive() and "redis-server" in (cmd := _proc_cmdline(svc.pid))
        return svc if ok and f":{svc.port}" in cmd else None


def _redis_conf(port: int, data_dir: Path, password: str | None, databases: int) -> str:
    lines = [
        f"port {port}",
        f"bind {LOOPBACK}",
        "protected-mode yes",
        "daemonize no",
        'logfile ""',
        f"dir {data_dir}",
        'save ""',
        "appendonly yes",
        "appendfsync everysec",
        f"databases {databases}",
        "tcp-keepalive 60",
    ]
    if password:
        lines.append(f"requirepass {password}")
    return "\n".join(lines) + "\n"


def start_redis(
    data_dir: str | os.PathLike[str],
    *,
    port: int | None = None,
    password: str | None = None,
    databases: int = 256,
    timeout: float = 30.0,
    die_with_parent: bool = False,
) -> RedisService:
    """Start Debian's redis-server on a free loopback port; return once PING answers.

    The config (with the password, if any) is a 0600 file, not the command line.
    ``die_with_parent`` SIGKILLs the server when the calling thread exits (for tests).
    """
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    binary = find_binary("redis-server", "CHUNKFS_REDIS_SERVER")
    fixed_port = port is not None
    last_error = ""
    for _attempt in range(3):
        p = port if fixed_port else free_port()
        assert p is not None
        conf = data_dir / "redis.conf"
        _write_private(conf, _redis_conf(p, data_dir, password, databases))
        log_path = data_dir / "redis.log"
        proc = _spawn([binary, str(conf)], cwd=data_dir, log_path=log_path, die_with_parent=die_with_parent)
        svc = RedisService(port=p, data_dir=data_dir, password=password, process=proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                break
            if svc.ping(timeout=1.0):
                log.info("redis-server pid %d on %s:%d (data %s)", svc.pid, LOOPBACK, p, data_dir)
                return svc
            time.sleep(0.05)
        last_error = _log_tail(log_path)
        svc.stop(timeout=5)
        if fixed_port:
            break
        log.warning("redis-server did not come up on port %d, retrying", p)
    raise ServiceError(f"redis-server did not start in {data_dir}:\n{last_error}")


# --------------------------------------------------------------------------- seaweedfs


@dataclass
class S3Service:
    """``weed server -s3`` on loopback ports; S3 requests must be signed with the keys."""

    ports: dict[str, int]
    data_dir: Path
    process: ManagedProcess
    access_key: str
    secret_key: str = field(repr=False)
    region: str = REGION
    host: str = LOOPBACK
    _clients: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def port(self) -> int:
        return self.ports["s3"]

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """AWS_* variables that point a botocore/aiobotocore client at this gateway."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(
        self,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
    ):  # -> botocore S3 client
        """A synchronous botocore S3 client (path-style) for setup and test checks."""
        key = (access_key, secret_key, timeout, retries)
        if key not in self._clients:
            import botocore.session
            from botocore.config import Config

            session = botocore.session.get_session()
            self._clients[key] = session.create_client(
                "s3",
                endpoint_url=self.endpoint,
                region_name=self.region,
                aws_access_key_id=access_key or self.access_key,
                aws_secret_access_key=secret_key or self.secret_key,
                config=Config(
                    s3={"addressing_style": "path"},
                    connect_timeout=min(timeout, 5.0),
                    read_timeout=timeout,
                    retries={"max_attempts": retries, "mode": "standard"},
                ),
            )
        return self._clients[key]

    def create_bucket(self, name: str = BUCKET) -> None:
        """Create a bucket; an existing bucket owned by us is fine."""
        c = self.client()
        try:
            c.create_bucket(Bucket=name)
            log.info("created bucket %s", name)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        except c.exceptions.BucketAlreadyExists:
            pass

    def check(self, bucket: str = BUCKET, timeout: float = 5.0) -> bool:
        """True when a PUT + GET of a small object in ``bucket`` succeeds."""
        try:
            c = self.client(timeout=timeout, retries=1)
            body = f"ok {time.time()}".encode()
            c.put_object(Bucket=bucket, Key=READY_KEY, Body=body)
            return c.get_object(Bucket=bucket, Key=READY_KEY)["Body"].read() == body
        except Exception as e:
            log.debug("s3 check failed: %s", type(e).__name__)
            return False

    def alive(self) -> bool:
        return self.process.alive()

    def pause(self) -> None:
        self.process.pause()

    def resume(self) -> None:
        self.process.resume()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop weed. A clean shutdown takes ~16 s (the filer drains gRPC streams for 15 s);
        a shorter timeout SIGKILLs it, which loses nothing already acknowledged."""
        for c in self._clients.values():
            with contextlib.suppress(Exception):
                c.close()
        self._clients.clear()
        was_alive = self.process.alive()
        self.process.stop(timeout)
        if was_alive:
            # weed listens on /tmp/seaweedfs-<role>-grpc-<port>.sock too and does not always
            # remove them; they are named after the ports we just released.
            names = [f"seaweedfs-{r}-grpc-{self.ports[r + '_grpc']}.sock" for r in WEED_ROLES]
            names += [f"seaweedfs-{r}-{self.ports[r]}.sock" for r in ("filer", "s3")]
            for name in names:
                with contextlib.suppress(OSError):
                    Path("/tmp", name).unlink()

    def to_state(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "start_time": self.process.start_time,
            "ports": dict(self.ports),
            "endpoint": self.endpoint,
            "region": self.region,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "data_dir": str(self.data_dir),
        }

    @classmethod
    def attach(cls, state: dict[str, Any]) -> S3Service | None:
        svc = cls(
            ports={k: int(v) for k, v in state["ports"].items()},
            data_dir=Path(state["data_dir"]),
            access_key=state["access_key"],
            secret_key=state["secret_key"],
            region=state.get("region", REGION),
            process=ManagedProcess(
                pid=int(state["pid"]),
                start_time=state.get("start_time"),
                log_path=Path(state["data_dir"]) / "weed.log",
            ),
        )
        cmd = _proc_cmdline(svc.pid)
        ok = svc.alive() and "weed" in cmd and f"-s3.port={svc.port} " in cmd + " "
        return svc if ok else None


def _s3_identity_config(access_key: str, secret_key: str) -> str:
    return json.dumps(
        {
            "identities": [
                {
                    "name": "chunkfs",
                    "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        },
        indent=2,
    )


def new_s3_credentials() -> tuple[str, str]:
    access_key = "CFS" + _random_token(17, string.ascii_uppercase + string.digits)
    return access_key, _random_token(40)


def _weed_args(binary: str, data_dir: Path, ports: dict[str, int], volume_size_limit_mb: int) -> list[str]:
    conf_dir = data_dir / "conf"  # empty: no stray /etc/seaweedfs/*.toml gets picked up
    args = [
        binary,
        "-logtostderr",
        f"-config_dir={conf_dir}",
        "server",
        "-s3",
        "-filer",
        f"-dir={data_dir / 'data'}",
        f"-ip={LOOPBACK}",
        f"-ip.bind={LOOPBACK}",
        *(f"{flag}={ports[name]}" for name, flag in WEED_PORT_FLAGS.items()),
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={data_dir / 's3.json'}",
        "-master.telemetry=false",
        f"-master.volumeSizeLimitMB={volume_size_limit_mb}",
        "-master.electionTimeout=1s",  # a restart elects itself in ~1 s instead of ~15 s
        "-volume.max=0",
        "-volume.preStopSeconds=0",
    ]
    # Unix sockets next to the data when the path fits in sun_path (108 bytes).
    for role in ("filer", "s3"):
        sock = data_dir / f"{role}.sock"
        if len(str(sock)) < 100:
            args.append(f"-{role}.localSocket={sock}")
    return args


def start_seaweedfs(
    data_dir: str | os.PathLike[str],
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    ports: dict[str, int] | None = None,
    bucket: str | None = BUCKET,
    volume_size_limit_mb: int = 1024,
    timeout: float = 120.0,
    die_with_parent: bool = False,
) -> S3Service:
    """Start ``weed server -s3`` with a required identity; return once a PUT succeeds.

    Random credentials unless given. ``ports`` (all of WEED_PORT_FLAGS' keys) are reused
    when every one of them is free, otherwise fresh free ports are chosen. ``bucket`` is
    created (None: create none and probe readiness in a scratch bucket).
    """
    data_dir = Path(data_dir).resolve()
    (data_dir / "data").mkdir(parents=True, exist_ok=True)
    (data_dir / "conf").mkdir(parents=True, exist_ok=True)
    binary = find_binary("weed", "CHUNKFS_WEED")
    if access_key is None or secret_key is None:
        access_key, secret_key = new_s3_credentials()
    _write_private(data_dir / "s3.json", _s3_identity_config(access_key, secret_key))
    probe_bucket = bucket or "chunkfs-localstack-probe"
    last_error = ""
    for attempt in range(3):
        if attempt == 0 and ports and all(port_is_free(p) for p in ports.values()):
            chosen = {name: int(ports[name]) for name in WEED_PORT_FLAGS}
        else:
            chosen = dict(zip(WEED_PORT_FLAGS, free_ports(len(WEED_PORT_FLAGS)), strict=True))
        log_path = data_dir / "weed.log"
        proc = _spawn(
            _weed_args(binary, data_dir, chosen, volume_size_limit_mb),
            cwd=data_dir,
            log_path=log_path,
            die_with_parent=die_with_parent,
        )
        svc = S3Service(
            ports=chosen, data_dir=data_dir, process=proc,
            access_key=access_key, secret_key=secret_key,
        )  # fmt: skip
        t0 = time.monotonic()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                break
            try:
                svc.client(timeout=5, retries=1).create_bucket(Bucket=probe_bucket)
            except Exception as e:
                code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
                if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    time.sleep(0.25)
                    continue
            if svc.check(probe_bucket):
                log.info(
                    "seaweedfs pid %d, S3 at %s (ready in %.1fs, data %s)",
                    svc.pid, svc.endpoint, time.monotonic() - t0, data_dir,
                )  # fmt: skip
                return svc
            time.sleep(0.25)
        last_error = _log_tail(log_path)
        alive = proc.alive()
        svc.stop(timeout=5)
        if alive:  # answered nothing before the deadline: retrying will not help
            raise ServiceError(f"seaweedfs S3 not ready after {timeout:.0f}s:\n{last_error}")
        log.warning("weed exited during startup (attempt %d), retrying", attempt + 1)
    raise ServiceError(f"seaweedfs did not start in {data_dir}:\n{last_error}")


# --------------------------------------------------------------------------- the stack


class LocalStack:
    """Redis + SeaweedFS under one directory, recorded in ``<dir>/state.json``."""

    def __init__(self, data_dir: str | os.PathLike[str], *, die_with_parent: bool = False):
        self.data_dir = Path(data_dir).resolve()
        self.die_with_parent = die_with_parent
        self.redis: RedisService | None = None
        self.s3: S3Service | None = None
        self._state: dict[str, Any] = {}

    @property
    def state_path(self) -> Path:
        return self.data_dir / "state.json"

    @property
    def env_path(self) -> Path:
        return self.data_dir / "env"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _load_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable %s: %s", self.state_path, e)
            return {}
        return state if state.get("version") == STATE_VERSION else {}

    def _save_state(self) -> None:
        state: dict[str, Any] = {"version": STATE_VERSION, "bucket": BUCKET}
        for name in ("redis", "s3"):
            prev = {k: v for k, v in self._state.get(name, {}).items() if k not in ("pid",)}
            svc = getattr(self, name)
            state[name] = svc.to_state() if svc is not None else {**prev, "pid": None}
        self._state = state
        _write_private(self.state_path, json.dumps(state, indent=2) + "\n")

    def _attached(self, name: str) -> RedisService | S3Service | None:
        rec = self._state.get(name) or {}
        if not rec.get("pid"):
            return None
        cls = RedisService if name == "redis" else S3Service
        try:
            return cls.attach(rec)
        except (KeyError, TypeError, ValueError):
            return None

    def load(self) -> LocalStack:
        """Attach to the services recorded in the state file (those still running)."""
        self._state = self._load_state()
        self.redis = self._attached("redis")  # type: ignore[assignment]
        self.s3 = self._attached("s3")  # type: ignore[assignment]
        return self

    def up(self, *, timeout: float = 120.0) -> LocalStack:
        """Start what is not running (and answering); reuse what is."""
        with self._locked():
            self.load()
            if self.redis is not None and not self.redis.ping():
                log.warning("recorded redis pid %d does not answer; restarting", self.redis.pid)
                self.redis.stop(timeout=10)
                self.redis = None
            if self.redis is None:
                rec = self._state.get("redis") or {}
                port = rec.get("port")
                self.redis = start_redis(
                    self.data_dir / "redis",
                    port=port if port and port_is_free(port) else None,
                    password=rec.get("password"),
                    timeout=timeout,
                    die_with_parent=self.die_with_parent,
                )
            else:
                log.info("reusing redis pid %d on port %d", self.redis.pid, self.redis.port)
            self._save_state()

            if self.s3 is not None and not self.s3.check(BUCKET):
                log.warning("recorded seaweedfs pid %d does not answer; restarting", self.s3.pid)
                self.s3.stop(timeout=10)
                self.s3 = None
            if self.s3 is None:
                rec = self._state.get("s3") or {}
                self.s3 = start_seaweedfs(
                    self.data_dir / "seaweedfs",
                    access_key=rec.get("access_key"),
                    secret_key=rec.get("secret_key"),
                    ports=rec.get("ports"),
                    bucket=BUCKET,
                    timeout=timeout,
                    die_with_parent=self.die_with_parent,
                )
            else:
                log.info("reusing seaweedfs pid %d at %s", self.s3.pid, self.s3.endpoint)
            self._save_state()
        return self

    def down(self, *, timeout: float = 30.0) -> None:
        """Stop the recorded services (only PIDs whose identity matches the record)."""
        with self._locked():
            self.load()
            errors = []
            for name in ("s3", "redis"):
                svc = getattr(self, name)
                if svc is None:
                    continue
                try:
                    svc.stop(timeout=timeout)
                    setattr(self, name, None)
                except ServiceError as e:
                    errors.append(str(e))
            if self._state:
                self._save_state()
            if errors:
                raise ServiceError("; ".join(errors))

    def running(self) -> bool:
        return self.redis is not None and self.s3 is not None

    def env(self, *, prefix: str = DEFAULT_PREFIX, db: int = 0) -> dict[str, str]:
        """CHUNKFS_META, CHUNKFS_STORAGE (s3://chunkfs/<prefix>) and AWS_* for this stack."""
        if self.redis is None or self.s3 is None:
            raise ServiceError(f"local stack in {self.data_dir} is not running (run `up`)")
        return {
            "CHUNKFS_META": self.redis.url_for_db(db),
            "CHUNKFS_STORAGE": f"s3://{BUCKET}/{prefix}",
            **self.s3.env(),
        }

    def write_env_file(self, path: Path | None = None) -> Path:
        path = path or self.env_path
        _write_private(path, format_exports(self.env()))
        return path

    def status(self) -> dict[str, Any]:
        """What is running, without secrets."""
        return {
            "dir": str(self.data_dir),
            "redis": None
            if self.redis is None
            else {"pid": self.redis.pid, "port": self.redis.port, "answers": self.redis.ping()},
            "s3": None
            if self.s3 is None
            else {
                "pid": self.s3.pid,
                "endpoint": self.s3.endpoint,
                "answers": self.s3.check(BUCKET),
            },
        }


def format_exports(env: dict[str, str]) -> str:
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devstack.localstack",
        description="Run Redis + SeaweedFS (S3) locally for chunkfs.",
    )
    parser.add_argument(
        "command",
        choices=["up", "down", "env", "status"],
        help="up: start or reuse, write DIR/env, print exports; down: stop; "
        "env: print exports; status: JSON without secrets",
    )
    parser.add_argument("--dir", default=".local", help="data directory (default ./.local)")
    parser.add_argument("--timeout", type=float, default=120.0, help="start/stop timeout (s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s localstack: %(message)s",
        stream=sys.stderr,
    )
    stack = LocalStack(args.dir)
    try:
        if args.command == "up":
            stack.up(timeout=args.timeout)
            path = stack.write_env_file()
            log.info("environment written to %s (source it to use the stack)", path)
            sys.stdout.write(format_exports(stack.env()))
        elif args.command == "down":
            stack.down(timeout=args.timeout)
            log.info("local stack in %s stopped", stack.data_dir)
        elif args.command == "env":
            stack.load()
            sys.stdout.write(format_exports(stack.env()))
        else:
            stack.load()
            sys.stdout.write(json.dumps(stack.status(), indent=2) + "\n")
    except ServiceError as e:
        log.error("%s", e)
        return 1
    except OSError as e:
        if e.errno == errno.EACCES:
            log.error("%s (run as root?)", e)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
