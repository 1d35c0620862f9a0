"""What a Kubernetes Secret may name as a volume's backend.

With per-namespace Secrets (``${pvc.namespace}`` in the StorageClass), a Secret is
written by a tenant, and the plugin that acts on it runs as root next to the node's
sockets and with the cluster's default credentials. So a Secret that names any backend
key must name a **complete** backend, and nothing of it is taken from the plugin's
environment:

    meta-url            redis://, rediss://, redis+sentinel://, redis+cluster://   required
                        (chunkfs/meta/redis_url.py lists the forms)
    storage             s3://bucket[/prefix]                         required
    endpoint            http(s)://host[:port][/path]                 required
    access-key-id       S3 credentials                               required
    secret-access-key                                                required
    region              S3 region (default us-east-1)                optional

* ``unix://`` meta URLs are refused (they reach sockets of the node). ``rediss://``
  is allowed, but not its ``ssl_ca_certs`` / ``ssl_certfile`` / ``ssl_keyfile``
  options: they name files of the node. A Secret's TLS Redis must present a
  certificate that the plugin's trust store accepts.
* Hosts of ``meta-url`` (every sentinel or cluster seed of a list) and ``endpoint``
  are resolved, and an address in the denied
  networks (by default link-local and cloud metadata addresses: ``169.254.0.0/16``,
  ``fe80::/10``, ``fd00:ec2::254``; ``--secret-deny-networks``) is refused. This is
  checked when the request arrives; DNS that changes its answer later (rebinding) is
  beyond it: block those addresses for the plugin pods with a network policy too.
* Error messages name the key and the rule, never a value.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit

from chunkfs.meta import redis_url
from chunkfs.meta.redis_url import RedisTarget
from csi import errors

REQUIRED = ("meta-url", "storage", "endpoint", "access-key-id", "secret-access-key")
OPTIONAL = ("region",)
KEYS = REQUIRED + OPTIONAL
DEFAULT_REGION = "us-east-1"
DEFAULT_DENY = ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128")
RESOLVE_TIMEOUT = 5.0

_REGION_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_CREDENTIAL_RE = re.compile(r"^[\x21-\x7e]{1,1024}$")  # printable ASCII, no blanks

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _bad(key: str, why: str) -> errors.CsiError:
    return errors.invalid(f"secret {key!r}", why)


@dataclass(frozen=True)
class AddressPolicy:
    """Networks that hosts named by a Secret must not resolve to."""

    deny: tuple[Network, ...] = field(default_factory=lambda: parse_networks(DEFAULT_DENY))

    def denied(self, address: str) -> Network | None:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone index
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return next((n for n in self.deny if ip.version == n.version and ip in n), None)


def parse_networks(items: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(i.strip(), strict=False) for i in items if i.strip())


def names_backend(secrets: Mapping[str, str]) -> bool:
    return any(key in secrets for key in KEYS)


def check(secrets: Mapping[str, str]) -> dict[str, str]:
    """The backend keys of a Secret, complete and well-formed (INVALID_ARGUMENT else)."""
    missing = [k for k in REQUIRED if not secrets.get(k)]
    if missing:
        given = sorted(k for k in KEYS if secrets.get(k))
        raise errors.invalid("secrets", (
            f"a Secret that names a backend must name all of it: missing {', '.join(missing)}"
            f" (given: {', '.join(given) or 'none'}); nothing is taken from the plugin's "
            "default backend"))
    _check_meta_url(secrets["meta-url"])
    _check_storage(secrets["storage"])
    _check_endpoint(secrets["endpoint"])
    for key in ("access-key-id", "secret-access-key"):
        if not _CREDENTIAL_RE.match(secrets[key]):
            raise _bad(key, "must be 1-1024 printable ASCII characters without blanks")
    region = secrets.get("region") or DEFAULT_REGION
    if not _REGION_RE.match(region):
        raise _bad("region", "must be lower-case letters, digits and '-' (e.g. us-east-1)")
    return {k: (secrets.get(k) or DEFAULT_REGION) if k == "region" else secrets[k]
            for k in KEYS}


def _printable(key: str, url: str) -> None:
    if any(ord(c) < 0x21 or ord(c) == 0x7f for c in url):
        raise _bad(key, "must not contain blanks or control characters")


def _split(key: str, url: str) -> SplitResult:
    _printable(key, url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise _bad(key, "is not a valid URL (bad port or brackets; percent-encode '/', '?', "
                   "'#' and '@' in a password)") from None
    return parts


def _check_meta_url(url: str) -> RedisTarget:
    _printable("meta-url", url)
    try:
        target = redis_url.parse(url)
    except redis_url.BadMetaUrl as exc:
        raise _bad("meta-url", f"{exc.reason} (percent-encode '/', '?', '#', '@' and ',' in "
                   "a password)") from None
    if target.kind == "unix":
        raise _bad("meta-url", "unix:// sockets are not allowed from a Secret (they reach "
                   "sockets of the node); use redis://host:port/db")
    tls = target.tls
    if tls is not None and (tls.ca_certs or tls.certfile or tls.keyfile):
        raise _bad("meta-url", "ssl_ca_certs, ssl_certfile and ssl_keyfile name files on the "
                   "node and are not allowed from a Secret: the server's certificate must be "
                   "signed by a CA that the plugin trusts")
    return target


def _check_storage(url: str) -> None:
    parts = _split("storage", url)
    if parts.scheme != "s3" or "@" in parts.netloc or parts.query or parts.fragment:
        raise _bad("storage", "must be s3://bucket/prefix (credentials go in "
                   "access-key-id and secret-access-key)")
    if not _BUCKET_RE.match(parts.netloc):
        raise _bad("storage", "names an invalid bucket")


def _check_endpoint(url: str) -> None:
    parts = _split("endpoint", url)
    if parts.scheme.lower() not in ("http", "https"):
        raise _bad("endpoint", "must be an http:// or https:// URL")
    if not parts.hostname:
        raise _bad("endpoint", "has no host")
    if "@" in parts.netloc or parts.query or parts.fragment:
        raise _bad("endpoint", "must not carry credentials, a query or a fragment")


async def check_addresses(backend: Mapping[str, str], policy: AddressPolicy) -> None:
    """Refuse hosts (of meta-url and endpoint) that resolve into a denied network."""
    if not policy.deny:
        return
    parts = urlsplit(backend["endpoint"])
    hosts = [("meta-url", host, port) for host, port in _check_meta_url(backend["meta-url"]).nodes]
    hosts.append(("endpoint", parts.hostname or "", parts.port or 0))
    for key, host, port in hosts:
        for address in await _resolve(key, host, port):
            net = policy.denied(address)
            if net is not None:
                raise _bad(key, f"its host resolves to an address in {net}, which Secrets may "
                           "not name (link-local / cloud metadata; --secret-deny-networks)")


async def _resolve(key: str, host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise errors.backend_unresolvable(key, type(exc).__name__) from None
    return sorted({info[4][0] for info in infos})
