"""Real Redis servers in every production shape, on free loopback ports (test support).

    acl = start_acl_redis(dir)          # requirepass + a least-privilege ACL user
    tls = start_tls_redis(dir)          # TLS only, certificates from a throwaway CA
    sen = start_sentinel_set(dir)       # a primary, a replica, three sentinels
    clu = start_cluster(dir)            # three primaries, slots spread evenly

Every process runs in its own session and dies with the test process
(PR_SET_PDEATHSIG); ``stop()`` signals exactly the PIDs started here. Configuration
files (passwords inside) are 0600, never command lines.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from devstack.localstack import (
    LOOPBACK,
    ManagedProcess,
    ServiceError,
    _log_tail,
    _spawn,
    _write_private,
    find_binary,
    free_ports,
)

ACL_USER = "chunkfs"
# what a mount, the CSI plugin and GC need, and nothing else: their keys (cfs*), their
# sync channel, data commands, scripts, and the few server commands they read
ACL_RULES = ("on resetkeys ~cfs* resetchannels &cfs:* -@all +@read +@write +@scripting "
             "+@connection +@transaction +@keyspace +info +time +wait +role +publish "
             "+cluster|slots +cluster|shards +cluster|nodes +cluster|info +config|get "
             "-flushall -flushdb -keys")


def _wait(what: str, ready: Callable[[], bool], process: ManagedProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            break
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(0.05)
    tail = _log_tail(process.log_path)
    process.stop(timeout=2)
    raise ServiceError(f"{what} did not start:\n{tail}")


@dataclass
class Server:
    """One redis-server (or sentinel) process."""

    port: int
    process: ManagedProcess
    data_dir: Path
    password: str | None = field(default=None, repr=False)
    tls: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def client(self, **kwargs: Any) -> redis.Redis:
        opts: dict[str, Any] = {"socket_timeout": 5, "socket_connect_timeout": 2,
                                "password": self.password, **self.tls}
        opts.update(kwargs)
        return redis.Redis(host=LOOPBACK, port=self.port, **opts)

    def ping(self) -> bool:
        with self.client(socket_timeout=1, socket_connect_timeout=1) as c:
            return bool(c.ping())

    def kill(self) -> None:
        """SIGKILL: the server dies without a word (a crashed host)."""
        import signal

        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        self.process.stop(timeout=5)

    def restart(self, timeout: float = 30) -> None:
        """Start the same server again (same port, configuration and data)."""
        assert self.process.popen is not None, "only servers started here can be restarted"
        args = [str(a) for a in self.process.popen.args]  # type: ignore[union-attr]
        self.stop()
        self.process = _spawn(args, cwd=self.data_dir,
                              log_path=self.data_dir / "server.log", die_with_parent=True)
        _wait(f"redis-server in {self.data_dir} (restart)", self.ping, self.process, timeout)


def _conf(port: int, data_dir: Path, *extra: str) -> list[str]:
    return [f"port {port}", f"bind {LOOPBACK}", "protected-mode yes", "daemonize no",
            'logfile ""', f"dir {data_dir}", 'save ""', "appendonly yes",
            "appendfsync everysec", *extra]


def start_server(data_dir: Path, port: int, lines: list[str], *, sentinel: bool = False,
                 password: str | None = None, tls: dict[str, Any] | None = None,
                 ready: Callable[[Server], bool] | None = None, timeout: float = 30) -> Server:
    data_dir.mkdir(parents=True, exist_ok=True)
    conf = data_dir / ("sentinel.conf" if sentinel else "redis.conf")
    _write_private(conf, "\n".join(lines) + "\n")
    binary = find_binary("redis-server", "CHUNKFS_REDIS_SERVER")
    args = [binary, str(conf), *(["--sentinel"] if sentinel else [])]
    proc = _spawn(args, cwd=data_dir, log_path=data_dir / "server.log", die_with_parent=True)
    server = Server(port, proc, data_dir, password, tls or {})
    _wait(f"redis-server in {data_dir}", lambda: (ready or Server.ping)(server), proc, timeout)
    return server


# --------------------------------------------------------------------------- ACL


@dataclass
class AclRedis:
    server: Server
    user_password: str = field(repr=False)

    def password_url(self, db: int = 0) -> str:
        """The default user, authenticated by ``requirepass``."""
        return f"redis://:{self.server.password}@{self.server.address}/{db}"

    def user_url(self, db: int = 0, password: str | None = None) -> str:
        """The least-privilege ACL user (``ACL_RULES``)."""
        return f"redis://{ACL_USER}:{password or self.user_password}@{self.server.address}/{db}"

    def stop(self) -> None:
        self.server.stop()


def start_acl_redis(data_dir: Path) -> AclRedis:
    password, user_password = secrets.token_hex(12), secrets.token_hex(12)
    (port,) = free_ports(1)
    lines = _conf(port, data_dir, "databases 64", f"requirepass {password}",
                  f"user {ACL_USER} {ACL_RULES} >{user_password}")
    return AclRedis(start_server(data_dir, port, lines, password=password), user_password)


# --------------------------------------------------------------------------- TLS


@dataclass
class Pki:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost, a client
    certificate, and an unrelated second CA (which must not be trusted)."""

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise ServiceError("openssl not found (apt-get install openssl)")
    proc = subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise ServiceError(f"openssl {args[0]} failed: {proc.stderr.strip()[-500:]}")


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days",
                 "2", "-subj", f"/CN=chunkfs test {ca}", cwd=directory)
    for name, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        (directory / f"{name}.ext").write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
            f"extendedKeyUsage={usage}\n")
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
                 f"/CN={name}", cwd=directory)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile",
                 f"{name}.ext", cwd=directory)
    for key in directory.glob("*.key"):
        key.chmod(0o600)
    d = directory
    return Pki(d, d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt",
               d / "client.key", d / "other-ca.crt")


@dataclass
class TlsRedis:
    server: Server
    pki: Pki

    def url(self, db: int = 0, *, ca: Path | None = None, host: str = LOOPBACK,
            client_cert: bool = False) -> str:
        query = f"ssl_ca_certs={ca or self.pki.ca}"
        if client_cert:
            query += f"&ssl_certfile={self.pki.client_cert}&ssl_keyfile={self.pki.client_key}"
        return f"rediss://:{self.server.password}@{host}:{self.server.port}/{db}?{query}"

    def stop(self) -> None:
        self.server.stop()


def start_tls_redis(data_dir: Path) -> TlsRedis:
    """TLS only (no plain port); client certificates are optional but, when presented,
    must come from the CA."""
    pki = make_pki(data_dir / "pki")
    password = secrets.token_hex(12)
    (port,) = free_ports(1)
    lines = _conf(0, data_dir, "databases 64", f"requirepass {password}", f"tls-port {port}",
                  f"tls-cert-file {pki.server_cert}", f"tls-key-file {pki.server_key}",
                  f"tls-ca-cert-file {pki.ca}", "tls-auth-clients optional")
    lines = [line for line in lines if line not in (f"bind {LOOPBACK}",)] + [f"bind {LOOPBACK}"]
    tls = {"ssl": True, "ssl_ca_certs": str(pki.ca)}
    server = start_server(data_dir, port, lines, password=password, tls=tls)
    return TlsRedis(server, pki)


# --------------------------------------------------------------------------- Sentinel

MASTER_NAME = "chunkfs"


@dataclass
class SentinelSet:
    """A primary and a replica watched by three sentinels (quorum 2), with short
    failure detection (``down-after-milliseconds`` 1000) so failovers take seconds."""

    primary: Server
    replica: Server
    sentinels: list[Server]
    password: str = field(repr=False)

    def url(self, db: int = 0, **options: str) -> str:
        hosts = ",".join(s.address for s in self.sentinels)
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return (f"redis+sentinel://:{self.password}@{hosts}/{MASTER_NAME}/{db}"
                + (f"?{query}" if query else ""))

    def primary_address(self) -> str:
        with self.sentinels[0].client() as c:
            host, port = c.execute_command("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
        return f"{host.decode()}:{int(port)}"

    def wait_replica_synced(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                with self.replica.client() as c:
                    info = c.info("replication")
                if info.get("master_link_status") == "up":
                    with self.sentinels[0].client() as s:
                        replicas = s.execute_command("SENTINEL", "replicas", MASTER_NAME)
                    if replicas:
                        return
            time.sleep(0.1)
        raise ServiceError("the replica did not sync with the primary")

    def stop(self) -> None:
        for server in (*self.sentinels, self.replica, self.primary):
            server.stop()


def start_sentinel_set(data_dir: Path) -> SentinelSet:
    password = secrets.token_hex(12)
    p_primary, p_replica, *p_sentinels = free_ports(5)
    auth = (f"requirepass {password}", f"masterauth {password}")
    primary = start_server(data_dir / "primary", p_primary,
                           _conf(p_primary, data_dir / "primary", *auth), password=password)
    replica = start_server(data_dir / "replica", p_replica,
                           _conf(p_replica, data_dir / "replica", *auth,
                                 f"replicaof {LOOPBACK} {p_primary}"), password=password)
    sentinels = []
    for port in p_sentinels:
        d = data_dir / f"sentinel-{port}"
        lines = [f"port {port}", f"bind {LOOPBACK}", "daemonize no", 'logfile ""', f"dir {d}",
                 f"sentinel monitor {MASTER_NAME} {LOOPBACK} {p_primary} 2",
                 f"sentinel auth-pass {MASTER_NAME} {password}",
                 f"sentinel down-after-milliseconds {MASTER_NAME} 1000",
                 f"sentinel failover-timeout {MASTER_NAME} 4000",
                 f"sentinel parallel-syncs {MASTER_NAME} 1"]
        sentinels.append(start_server(d, port, lines, sentinel=True))
    sset = SentinelSet(primary, replica, sentinels, password)
    try:
        sset.wait_replica_synced()
    except ServiceError:
        sset.stop()
        raise
    return sset


# --------------------------------------------------------------------------- Cluster


@dataclass
class Cluster:
    """Three primaries, no replicas, slots spread evenly (``redis-cli --cluster create``)."""

    nodes: list[Server]
    password: str = field(repr=False)

    @property
    def url(self) -> str:
        seeds = ",".join(n.address for n in self.nodes)
        return f"redis+cluster://:{self.password}@{seeds}"

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host=LOOPBACK, port=self.nodes[0].port, password=self.password,
                                  socket_timeout=5)

    def node_of_slot(self, slot: int) -> Server:
        with self.nodes[0].client() as c:
            for start, end, primary, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return next(n for n in self.nodes if n.port == int(primary[1]))
        raise LookupError(slot)

    def flush(self) -> None:
        for node in self.nodes:
            with node.client() as c:
                c.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _cluster_ok(nodes: list[Server]) -> bool:
    for node in nodes:
        with node.client() as c:
            if c.execute_command("CLUSTER", "INFO").decode().find("cluster_state:ok") < 0:
                return False
    return True


def start_cluster(data_dir: Path, primaries: int = 3, timeout: float = 30) -> Cluster:
    password = secrets.token_hex(12)
    ports = free_ports(2 * primaries)  # a client port and a bus port each
    nodes = []
    try:
        for port, bus in zip(ports[:primaries], ports[primaries:], strict=True):
            d = data_dir / f"node-{port}"
            lines = _conf(port, d, "cluster-enabled yes", f"cluster-port {bus}",
                          f"cluster-config-file {d / 'nodes.conf'}",
                          "cluster-node-timeout 2000", f"requirepass {password}",
                          f"masterauth {password}")
            nodes.append(start_server(d, port, lines, password=password))
        cli = find_binary("redis-cli", "CHUNKFS_REDIS_CLI")
        proc = subprocess.run(
            [cli, "--cluster", "create", *(n.address for n in nodes), "--cluster-replicas",
             "0", "--cluster-yes"], env={"REDISCLI_AUTH": password, "PATH": "/usr/bin:/bin"},
            capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode:
            raise ServiceError(f"redis-cli --cluster create failed: {proc.stdout[-800:]}"
                               f"{proc.stderr[-800:]}")
        deadline = time.monotonic() + timeout
        while not _cluster_ok(nodes):
            if time.monotonic() > deadline:
                raise ServiceError("the cluster did not reach cluster_state:ok")
            time.sleep(0.1)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return Cluster(nodes, password)
