"""Every benchmark workload runs on a plain local directory (no services, no mount, no
root): a broken workload fails here, in CI, instead of in the middle of a benchmark run.
And each one's verification catches what it is there to catch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import apps, workloads

ROOT = Path(__file__).resolve().parents[2]
FILES = 60

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("bench") / "scratch"
    info = apps.prepare(str(path), FILES, seed=5)
    assert info["files"] == FILES and info["pack_bytes"] > 0 and info["tar_bytes"] > info["bytes"]
    return str(path)


def test_the_source_tree_is_deterministic_and_source_like():
    a, b = apps.tree_layout(500, seed=3), apps.tree_layout(500, seed=3)
    assert a == b and a != apps.tree_layout(500, seed=4)
    assert len({p for p, _, _ in a}) == 500
    assert len({os.path.dirname(p) for p, _, _ in a}) > 10  # spread over directories
    assert max(p.count("/") for p, _, _ in a) <= apps.MAX_DEPTH
    assert {k for _, _, k in a} == {"text", "script", "binary"}


def test_git_clone_status_and_removal(scratch, tmp_path):
    dest = str(tmp_path / "m" / "clone")
    spec = {"scratch": scratch, "dest": dest}
    assert apps.git("clone", **spec)["clone"]["ops"] == FILES
    assert apps.git("verify", **spec)["files"] == FILES
    assert os.access(next(Path(dest).rglob("*.sh")), os.X_OK)  # modes survive the round trip
    status = apps.git("status", drop=False, **spec)
    assert status["status_cold"]["seconds"] > 0 and status["status_warm"]["seconds"] > 0
    apps.git("remove", **spec)
    assert not os.path.exists(dest)


def test_git_verification_catches_a_wrong_checkout(scratch, tmp_path):
    dest = tmp_path / "clone"
    apps.git("clone", scratch, str(dest))
    paths = (Path(scratch) / "paths.txt").read_text().split()
    sampled, unsampled = dest / paths[0], dest / paths[1]
    unsampled.write_bytes(unsampled.read_bytes() + b"!")
    apps.git("verify", scratch, str(dest))  # a sample only ...
    with pytest.raises(RuntimeError, match="not clean"):  # ... but git status sees every file
        apps.git("status", scratch, str(dest), drop=False)
    data = sampled.read_bytes()
    sampled.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit off
    with pytest.raises(RuntimeError, match="content differs"):
        apps.git("verify", scratch, str(dest))
    sampled.unlink()
    with pytest.raises(RuntimeError, match=f"{FILES - 1} files"):
        apps.git("verify", scratch, str(dest))


def test_untar_then_sync_and_its_verification(scratch, tmp_path):
    dest = tmp_path / "untar"
    res = apps.untar("extract", scratch, str(dest))
    assert res["files"] == FILES and res["seconds"] >= res["sync_s"] > 0
    assert apps.untar("verify", scratch, str(dest))["files"] == FILES
    next(p for p in dest.rglob("*") if p.is_file()).unlink()
    with pytest.raises(RuntimeError, match="extracted"):
        apps.untar("verify", scratch, str(dest))


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_sqlite_commits_in_both_journal_modes(tmp_path, mode):
    res = apps.sqlite(str(tmp_path / "db.sqlite"), mode, 25)
    assert res["mode"] == mode and res["ops"] == 25 and res["ops_s"] > 0 and res["p99_ms"] >= res["p50_ms"]


def test_sqlite_refuses_an_unknown_journal_mode(tmp_path):
    with pytest.raises(ValueError):
        apps.sqlite(str(tmp_path / "db.sqlite"), "memory", 5)


@pytest.mark.parametrize(("record", "sync"), [(120, "fsync"), (4096, "fdatasync")])
def test_durable_appends_write_exactly_their_records(tmp_path, record, sync):
    path = tmp_path / "log"
    res = apps.append(str(path), 40, record, sync)
    assert res["ops"] == 40 and path.stat().st_size == 40 * record
    lines = path.read_bytes().splitlines()
    assert len(lines) == 40 and lines[7].startswith(b"0000000007 ")
    with pytest.raises(FileExistsError):  # a log is always a new file
        apps.append(str(path), 1, record, sync)


def test_page_overwrites_land_where_they_should(tmp_path):
    path = str(tmp_path / "pages.db")
    spec = {"path": path, "size": 4 << 20, "n": 30, "seed": 2, "salt": 3}
    assert apps.pages("fill", **spec)["bytes"] == 4 << 20
    res = apps.pages("overwrite", **spec)
    assert res["ops"] == 30 and os.path.getsize(path) == 4 << 20
    with pytest.raises(RuntimeError, match="expected"):  # a file of the wrong size is refused
        apps.pages("overwrite", **{**spec, "size": 8 << 20})


def test_the_streaming_small_file_and_metadata_workloads(tmp_path):
    big = str(tmp_path / "big")
    spec = {"path": big, "size": 4 << 20, "seed": 9, "salt": 1}
    assert workloads.seqwrite(**spec)["bytes"] == 4 << 20
    assert workloads.seqread(**spec)["verified"]
    assert workloads.randread(count=50, **spec)["verified"]
    d = str(tmp_path / "small")
    for phase in ("create", "stat", "read", "delete"):
        assert workloads.small(phase, d, 20, seed=9, salt=2)["ops"] == 20
    assert workloads.meta(str(tmp_path / "meta"), 20, drop=False)["total"]["ops"] == 100


def test_sequential_read_verification_catches_a_wrong_chunk(tmp_path):
    spec = {"path": str(tmp_path / "big"), "size": 4 << 20, "seed": 9, "salt": 1}
    workloads.seqwrite(**spec)
    with pytest.raises(RuntimeError, match="read back wrong"):
        workloads.seqread(**{**spec, "salt": 2})


def _child(spec: dict) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench.workloads", json.dumps(spec)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_the_child_process_entry_runs_application_workloads_and_prints_json(tmp_path):
    proc = _child({"op": "append", "path": str(tmp_path / "log"), "n": 5, "record": 120})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["ops"] == 5


def test_the_child_process_entry_refuses_an_unknown_workload():
    proc = _child({"op": "nope"})
    assert proc.returncode == 2 and "unknown workload 'nope'" in proc.stderr
