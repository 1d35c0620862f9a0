"""The metadata URL: which Redis, in which shape, and how to reach it.

One parser for every client (the hot-path client in ``resp.py``, the redis-py admin
client in ``redis_meta.connect``, the checks of the CLI and of the CSI plugin), so that
a URL means the same thing everywhere:

    redis://[[user]:password@]host[:port][/db]                  standalone, plain TCP
    rediss://[[user]:password@]host[:port][/db][?ssl_...]       standalone over TLS
    unix://[:password@]/path/to/redis.sock                      standalone, a local socket
    redis+sentinel://[[user]:password@]h1[:p1][,h2[:p2]...]/master-name[/db][?...]
    redis+cluster://[[user]:password@]h1[:p1][,h2[:p2]...][?...]   Redis Cluster seed list

Credentials in the user info are the data nodes' (``AUTH [user] password``; an ACL user
when a user name is given). Ports default to 6379, sentinels' to 26379. Query options:

    ssl_ca_certs=PATH         rediss: CA bundle that signed the server's certificate
                              (default: the system's trust store)
    ssl_certfile, ssl_keyfile rediss: a client certificate (mutual TLS)
    ssl_cert_reqs=required|none   rediss: ``none`` skips verification (tests only)
    ssl_check_hostname=true|false rediss: match the certificate against the host name
    sentinel_password=SECRET  sentinel: the sentinels' own password, if they have one
    sentinel_username=NAME    sentinel: and user
    wait_replicas=N           sentinel: replicas that must hold a mutation before it is
                              acknowledged (default 1; 0 trades failover safety for speed)

Percent-encode ``/ ? # @ ,`` in a password. Unknown options are refused: a typo must
not silently drop TLS verification or replication safety.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, unquote

from chunkfs.errors import InvalidArgument

if TYPE_CHECKING:  # ssl is imported where a context is made: the CLI parses URLs without it
    import ssl

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
SCHEMES = {"redis": "standalone", "rediss": "standalone", "unix": "unix",
           "redis+sentinel": "sentinel", "redis+cluster": "cluster"}
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs",
                "ssl_check_hostname")
_SENTINEL_OPTIONS = ("sentinel_password", "sentinel_username", "wait_replicas")
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


@dataclass(frozen=True)
class TlsOptions:
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    verify: bool = True
    check_hostname: bool = True

    def context(self) -> ssl.SSLContext:
        """A client context; certificate files are read now (a missing file is an error
        at mount, not at the first request)."""
        import ssl

        ctx = ssl.create_default_context(cafile=self.ca_certs)
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx.check_hostname = self.check_hostname
        if self.certfile:
            ctx.load_cert_chain(self.certfile, self.keyfile)
        return ctx

    def redis_py(self) -> dict[str, object]:
        """The same settings as redis-py connection arguments."""
        return {"ssl": True, "ssl_ca_certs": self.ca_certs, "ssl_certfile": self.certfile,
                "ssl_keyfile": self.keyfile,
                "ssl_cert_reqs": "required" if self.verify else "none",
                "ssl_check_hostname": self.verify and self.check_hostname}


@dataclass(frozen=True)
class RedisTarget:
    """A parsed metadata URL. ``nodes``: the server (standalone), the sentinels, or the
    cluster's seed nodes."""

    kind: str                                   # standalone | unix | sentinel | cluster
    nodes: tuple[tuple[str, int], ...] = ()
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TlsOptions | None = None
    unix_path: str | None = None
    master: str | None = None                   # the sentinels' name of the primary
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    wait_replicas: int = 0

    @property
    def host(self) -> str:
        return self.nodes[0][0] if self.nodes else ""

    @property
    def port(self) -> int:
        return self.nodes[0][1] if self.nodes else 0


class BadMetaUrl(InvalidArgument):
    """A malformed metadata URL; ``reason`` names the rule and no value of the URL."""

    def __init__(self, url: str, reason: str) -> None:
        from chunkfs.config import redact_url

        super().__init__(f"invalid metadata URL {redact_url(url)!r}: {reason}")
        self.reason = reason


def _bad(url: str, why: str) -> BadMetaUrl:
    return BadMetaUrl(url, why)


def _hosts(url: str, text: str, default_port: int, many: bool) -> tuple[tuple[str, int], ...]:
    nodes = []
    for item in text.split(","):
        if item.startswith("["):  # [v6]:port
            host, _, rest = item[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
            if rest and not rest.startswith(":"):
                raise _bad(url, "a bracketed IPv6 host must be followed by :port or nothing")
        else:
            host, _, port_text = item.partition(":")
        if not host:
            raise _bad(url, "a host is missing")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError:
            raise _bad(url, "a port is not a number") from None
        if not 0 < port < 65536:
            raise _bad(url, "a port is out of range")
        nodes.append((host, port))
    if len(nodes) > 1 and not many:
        raise _bad(url, "several hosts need redis+sentinel:// or redis+cluster://")
    return tuple(nodes)


def _db(url: str, text: str) -> int:
    if not text:
        return 0
    if not text.isdigit() or int(text) > 100_000:
        raise _bad(url, "the database must be a number")
    return int(text)


def parse(url: str) -> RedisTarget:
    """Parse a metadata URL; ``InvalidArgument`` (password never in the message) else."""
    scheme, sep, rest = (url or "").partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise _bad(url, "expected redis://, rediss://, unix://, redis+sentinel:// or "
                   "redis+cluster:// (e.g. redis://[:password@]host:port/db)")
    kind = SCHEMES[scheme]
    at = rest.rfind("@")
    userinfo, rest = (rest[:at], rest[at + 1:]) if at >= 0 else ("", rest)
    rest, _, fragment = rest.partition("#")
    location, _, query = rest.partition("?")
    if fragment:
        raise _bad(url, "a fragment ('#') is not allowed (percent-encode '#' in a password)")
    username = password = None
    if userinfo:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    try:
        options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    except ValueError:
        raise _bad(url, "malformed query string") from None
    allowed = {"rediss": _TLS_OPTIONS, "redis+sentinel": _SENTINEL_OPTIONS}.get(scheme, ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise _bad(url, f"unknown query option {unknown[0][:40]!r} for {scheme}:// (allowed: "
                   f"{', '.join(allowed) or 'none'})")
    if kind == "unix":
        if not location.startswith("/"):
            raise _bad(url, "expected unix:///path/to/redis.sock")
        return RedisTarget("unix", unix_path=location, password=password, username=username)
    hosts, _, path = location.partition("/")
    if not hosts:
        raise _bad(url, "a host is missing (percent-encode '/', '?', '#', '@' in a password)")
    if kind == "sentinel":
        master, _, db_text = path.partition("/")
        if not master or "/" in db_text:
            raise _bad(url, "expected redis+sentinel://host:port[,host:port]/master-name[/db]")
        try:
            wait = int(options.get("wait_replicas", "1"))
        except ValueError:
            wait = -1
        if not 0 <= wait <= 16:
            raise _bad(url, "wait_replicas must be a number from 0 to 16")
        return RedisTarget("sentinel", _hosts(url, hosts, DEFAULT_SENTINEL_PORT, True),
                           _db(url, db_text), username, password, master=unquote(master),
                           sentinel_username=options.get("sentinel_username") or None,
                           sentinel_password=options.get("sentinel_password") or None,
                           wait_replicas=wait)
    if kind == "cluster":
        if path:
            raise _bad(url, "Redis Cluster has one database: no /db in redis+cluster://")
        return RedisTarget("cluster", _hosts(url, hosts, DEFAULT_PORT, True), 0, username,
                           password)
    if "/" in path:
        raise _bad(url, "expected redis://host:port/db")
    tls = _tls(url, options) if scheme == "rediss" else None
    return RedisTarget("standalone", _hosts(url, hosts, DEFAULT_PORT, False), _db(url, path),
                       username, password, tls=tls)


def _tls(url: str, options: dict[str, str]) -> TlsOptions:
    reqs = options.get("ssl_cert_reqs", "required").lower()
    if reqs not in ("required", "none"):
        raise _bad(url, "ssl_cert_reqs must be 'required' or 'none'")
    check = options.get("ssl_check_hostname", "true").lower()
    if check not in _BOOLS:
        raise _bad(url, "ssl_check_hostname must be true or false")
    for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if key in options and not options[key].startswith("/"):
            raise _bad(url, f"{key} must be an absolute path")
    if "ssl_keyfile" in options and "ssl_certfile" not in options:
        raise _bad(url, "ssl_keyfile needs ssl_certfile")
    return TlsOptions(options.get("ssl_ca_certs"), options.get("ssl_certfile"),
                      options.get("ssl_keyfile"), reqs == "required", _BOOLS[check])
