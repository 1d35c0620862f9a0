"""The S3 client's timestamp parser: botocore's answers, without dateutil's cost."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from botocore.utils import parse_timestamp

from chunkfs.objstore import _timestamp

SAMPLES = [
    "Wed, 02 Dec 2026 05:01:55 GMT",       # Last-Modified, Date (RFC 1123)
    "Mon, 29 Feb 2016 23:59:59 GMT",
    "2026-12-02T05:01:55.000Z",            # ListObjectsV2 <LastModified>
    "2026-12-02T05:01:55Z",
    "2026-12-02T05:01:55.123456Z",
    "2026-12-02T07:01:55+02:00",
    "1970-01-01T00:00:00.000Z",
]


@pytest.mark.parametrize("value", SAMPLES)
def test_the_forms_s3_sends_parse_as_botocore_parses_them(value: str) -> None:
    ours, theirs = _timestamp(value), parse_timestamp(value)
    assert ours == theirs and ours.utcoffset() == theirs.utcoffset()
    assert ours.timestamp() == theirs.timestamp()


@pytest.mark.parametrize("value", ["2026-12-02T05:01:55", 1764651715, "1764651715", "Dec 2 2026"])
def test_anything_else_is_botocores(value: object) -> None:
    """A naive ISO time (botocore assumes the local zone), an epoch number, other text."""
    assert _timestamp(value) == parse_timestamp(value)


def test_garbage_fails_as_botocore_fails() -> None:
    with pytest.raises(ValueError):
        parse_timestamp("not a time")
    with pytest.raises(ValueError):
        _timestamp("not a time")


def test_results_are_aware_and_exact() -> None:
    assert _timestamp("Wed, 02 Dec 2026 05:01:55 GMT") == datetime(2026, 12, 2, 5, 1, 55, tzinfo=UTC)
    got = _timestamp("2026-12-02T07:01:55.5+02:00")
    assert got.utcoffset() == timedelta(hours=2)
    assert got == datetime(2026, 12, 2, 5, 1, 55, 500000, tzinfo=timezone.utc)  # noqa: UP017
