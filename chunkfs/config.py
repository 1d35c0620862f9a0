"""Backend selection shared by the CLI, the CSI plugin, the tests and the benchmark.

Credentials only ever come from the environment (or, in the CSI plugin, from
Kubernetes secrets), never from argv, so they do not show up in ``ps``; ``redacted``
forms exist so that logs can name a backend without leaking its password.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from chunkfs.errors import InvalidArgument
from chunkfs.meta import redis_url

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4, "p": 1000**5, "pb": 1000**5,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4, "pi": 1024**5, "pib": 1024**5,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Parse ``10GiB``, ``500M``, ``1.5Ti`` or a plain byte count into bytes."""
    if isinstance(text, int):
        if text < 0:
            raise InvalidArgument(f"size must not be negative: {text}")
        return text
    match = _SIZE_RE.match(text or "")
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise InvalidArgument(
            f"invalid size {text!r}: expected a number with an optional unit such as 10GiB, 500M"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


_SECRET_PARAM = re.compile(r"(?i)([?&][a-z_]*(?:password|pass|pwd|secret|token)=)[^&#]*")


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs and error messages.

    The user info is split off at the last ``@`` by hand: ``urlsplit`` ends the
    authority at the first ``/``, ``?`` or ``#``, so a password holding one of them
    (not percent-encoded) would stay in the "path". Everything between the first ``:``
    of the user info and that ``@`` is hidden; a malformed URL may be over-redacted,
    never leaked. A ``password=`` query parameter (``sentinel_password=`` too) is hidden.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, hostpart = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}:***@{hostpart}" if colon else f"{userinfo}@{hostpart}"
    rest = _SECRET_PARAM.sub(r"\1***", rest)
    return f"{scheme}://{rest}" if sep else rest


def check_meta_url(url: str) -> str:
    """A metadata URL both Redis clients can honour (``chunkfs.meta.redis_url`` lists the
    forms); ``InvalidArgument`` naming what is wrong, never the password, else."""
    redis_url.parse(url)
    return url


@dataclass(frozen=True)
class StorageConfig:
    """Where blocks live: bucket + key prefix, and how to reach the S3 endpoint."""

    bucket: str
    prefix: str
    endpoint: str | None = None
    region: str = "us-east-1"
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    @classmethod
    def from_url(cls, url: str, env: Mapping[str, str] | None = None) -> StorageConfig:
        env = os.environ if env is None else env
        parts = urlsplit(url or "")
        if parts.scheme != "s3" or not parts.netloc or "@" in parts.netloc:
            raise InvalidArgument(
                f"invalid storage URL {url!r}: expected s3://bucket/prefix "
                "(credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
            )
        bucket = parts.netloc
        if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
            raise InvalidArgument(f"invalid bucket name {bucket!r} in storage URL")
        return cls(
            bucket=bucket,
            prefix=parts.path.strip("/"),
            endpoint=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            access_key=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
        )


def backend_from_env(
    meta: str | None, storage: str | None, env: Mapping[str, str] | None = None
) -> tuple[str, StorageConfig]:
    """Resolve ``--meta``/``--storage`` with ``CHUNKFS_META``/``CHUNKFS_STORAGE`` fallbacks."""
    env = os.environ if env is None else env
    meta = meta or env.get("CHUNKFS_META")
    storage = storage or env.get("CHUNKFS_STORAGE")
    if not meta:
        raise InvalidArgument("no metadata engine: pass --meta redis://host:port/db or set CHUNKFS_META")
    if not storage:
        raise InvalidArgument("no object storage: pass --storage s3://bucket/prefix or set CHUNKFS_STORAGE")
    return check_meta_url(meta), StorageConfig.from_url(storage, env)
