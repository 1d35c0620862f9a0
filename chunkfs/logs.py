"""Structured (JSON lines) logging with secrets scrubbed.

Every record carries its ``extra`` fields as JSON keys; any value that looks like a
credential (a URL password, a key named like a secret) is redacted before it is
written, so logs can be shipped anywhere.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
# a key naming a secret value; "secrets" (a list of secret *names*, as CSI logs them) is fine
_SECRET_KEYS = re.compile(r"secret(?!s$)|password|passwd|token|credential|access.?key", re.I)
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]+@")


def scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\1***@", value)
    if isinstance(value, dict):
        return {k: ("***" if _SECRET_KEYS.search(str(k)) else scrub(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        extra = {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
        extra.update(extra.pop("fields", None) or {})  # extra={"fields": {...}} style too
        for key, value in extra.items():
            doc[key] = "***" if _SECRET_KEYS.search(key) else scrub(value)
        if record.exc_info:
            doc["exception"] = scrub(self.formatException(record.exc_info))
        return json.dumps(doc, default=str)


def setup(level: str = "info", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("botocore", "aiobotocore", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
