"""Structured logs never carry secrets."""

from __future__ import annotations

import io
import json
import logging

from chunkfs import logs


def test_json_logs_scrub_secrets_in_messages_and_fields() -> None:
    stream = io.StringIO()
    logs.setup("info", stream)
    log = logging.getLogger("t")
    log.info("connecting to redis://:hunter2@db:6379/0",
             extra={"secret_access_key": "SK123", "url": "redis://u:pw@h:1/0", "volume": "v1",
                    "nested": {"password": "p", "ok": 1}})
    doc = json.loads(stream.getvalue().strip())
    text = stream.getvalue()
    for secret in ("hunter2", "SK123", ":pw@", '"p"'):
        assert secret not in text
    assert doc["volume"] == "v1" and doc["level"] == "info" and doc["nested"]["ok"] == 1
