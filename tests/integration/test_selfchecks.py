"""The suite's self-checks can fail: fsck --objects finds a volume broken behind the
mount's back, and the log check reports what a mount logged (fs_fixtures.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devstack.localstack import BUCKET
from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import (
    KNOWN_DEFECTS,
    Cli,
    MiB,
    Mounter,
    cache_block_files,
    fsck_problems,
    log_problems,
    rand_bytes,
    write_file,
)


def _record(level: str, msg: str, **extra: str) -> str:
    return json.dumps({"time": "t", "level": level, "logger": "chunkfs.x", "msg": msg, **extra})


def test_log_check_flags_warnings_errors_and_stray_lines_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    defect = "a defect outside the tests' reach"
    monkeypatch.setitem(KNOWN_DEFECTS, defect, ("InvalidStateError", "its diagnosis"))
    log = tmp_path / "mount.log"
    log.write_text("\n".join([
        _record("info", "mounted"),
        _record("debug", "chatter"),
        _record("warning", "block upload failed", error="boom"),
        _record("error", "operation failed", op="read"),
        _record("error", "allowed one"),
        _record("error", "Future exception was never retrieved\nfuture: <Future ...>"),
        _record("error", defect, exception="... InvalidStateError: invalid state"),
        _record("error", defect, exception="... some other error"),
        "Traceback (most recent call last):",
        _record("warning", "half a line"),
    ]) + "\n" + _record("error", "incomplete, still being written"))
    allowed = {"allowed one": "why", "Future exception was never retrieved": "why"}
    problems, end = log_problems(log, 0, allowed)
    text = "\n".join(problems)
    assert len(problems) == 5, text
    for needle in ("block upload failed", "operation failed", "some other error",
                   "not a log record: Traceback", "half a line"):
        assert needle in text
    assert "mounted" not in text and "allowed one" not in text and "incomplete" not in text
    # the incomplete last line is left for the next check
    assert log.read_bytes()[end:].startswith(b'{"time"')
    assert log_problems(log, end, {})[0] == []


@pytest.mark.fsck_allows(r"object \w+ is missing",
                         reason="the test deletes a block object to see fsck find it")
def test_fsck_check_finds_a_block_object_deleted_behind_the_volume(
        mounter: Mounter, cli: Cli, volume: str, s3_client) -> None:
    m = mounter.mount(volume)
    write_file(m / "f", rand_bytes(MiB, "selfcheck"))
    mounter.umount(m)
    assert fsck_problems(cli, _Unmarked()) == []
    prefix = cli.env["CHUNKFS_STORAGE"].removeprefix(f"s3://{BUCKET}/") + "/blocks/"
    (obj,) = s3_client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]
    s3_client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    found = fsck_problems(cli, _Unmarked())
    assert len(found) == 1 and "is missing" in found[0], found


@pytest.mark.mount_log_allows("corrupt cache block removed",
                              reason="the test corrupts a cache file to see the log check report it")
def test_log_check_reports_what_a_real_mount_logged(mounter: Mounter, volume: str) -> None:
    m = mounter.mount(volume, options="memory-cache=0")
    write_file(m / "f", rand_bytes(MiB, "logged"))
    m = mounter.remount(m)
    (block,) = cache_block_files(m.cache_dir)
    raw = bytearray(block.read_bytes())
    raw[10] ^= 0xFF
    block.write_bytes(bytes(raw))
    assert (m / "f").read_bytes() == rand_bytes(MiB, "logged")  # refetched from S3
    problems, _ = log_problems(m.log_file, 0, {})
    assert any("corrupt cache block removed" in p for p in problems), problems


class _Unmarked:
    """A stand-in node with no allow-list marks."""

    nodeid = "selfcheck"

    def iter_markers(self, name: str):  # noqa: ANN201 - mirrors pytest's Node API
        return iter(())
