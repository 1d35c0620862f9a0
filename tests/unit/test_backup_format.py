"""The backup formats (chunkfs/backup.py): manifest URLs, deterministic content-addressed
pages, ids in the order backups were made, and a restore's structural checks."""

from __future__ import annotations

import pytest

from chunkfs import backup
from chunkfs.errors import InvalidArgument


@pytest.mark.parametrize(("url", "storage", "key"), [
    ("s3://b-1/p/q/snapshots/snap-1/manifest.json.gz", "s3://b-1/p/q",
     "snapshots/snap-1/manifest.json.gz"),
    ("s3://bkt/snapshots/s/manifest.json.gz", "s3://bkt", "snapshots/s/manifest.json.gz"),
    ("s3://bkt/pre/backups/pvc-1/20261202T004522594Z-8a7bdb/manifest.json.gz", "s3://bkt/pre",
     "backups/pvc-1/20261202T004522594Z-8a7bdb/manifest.json.gz"),
    # a prefix that itself contains "snapshots/": the last one counts
    ("s3://bkt/snapshots/x/snapshots/s/manifest.json.gz", "s3://bkt/snapshots/x",
     "snapshots/s/manifest.json.gz"),
])
def test_a_manifest_url_splits_into_its_storage_prefix_and_key(url, storage, key) -> None:
    assert backup.split_manifest_url(url) == (storage, key)
    assert backup.manifest_url(storage, key) == url


@pytest.mark.parametrize("url", [
    "", "s3://bkt/prefix", "http://bkt/snapshots/s/manifest.json.gz",
    "s3://bkt/snapshots/s/other.json.gz", "s3://bkt/backups/v/not-an-id/manifest.json.gz",
    "s3://bkt/backups/v/pages/" + "0" * 64 + ".json.gz", "s3:///snapshots/s/manifest.json.gz",
])
def test_anything_else_is_refused_with_the_forms_it_takes(url) -> None:
    with pytest.raises(InvalidArgument, match="expected s3://bucket/prefix/snapshots/"):
        backup.split_manifest_url(url)


def test_a_page_is_the_same_bytes_for_the_same_inodes_and_checks_its_hash() -> None:
    inodes = {"5": {"attr": {"m": "33188", "s": "3"}, "data": "YWJj"}, "1": {"attr": {}}}
    digest, body = backup.encode_page(inodes)
    again = backup.encode_page(dict(reversed(list(inodes.items()))))
    assert again == (digest, body)  # order and time do not matter: content addressing
    assert backup.decode_page(digest, body) == inodes
    other, _ = backup.encode_page({**inodes, "6": {"attr": {}}})
    with pytest.raises(ValueError, match="does not match"):
        backup.decode_page(other, body)
    with pytest.raises(ValueError, match="not gzip"):
        backup.decode_page(digest, b"plain")


def test_pages_group_inode_numbers_so_a_change_touches_one_page() -> None:
    n = backup.PAGE_INODES
    inodes = {str(i): {"attr": {}} for i in (1, 2, n - 1, n, 20 * n, n + 1)}
    pages = backup.paginate(inodes)
    assert [sorted(map(int, p)) for p in pages] == [[1, 2, n - 1], [n, n + 1], [20 * n]]


def test_backup_ids_sort_in_the_order_they_were_made_even_within_a_millisecond() -> None:
    first = backup.new_backup_id(now=1_800_000_000.5)
    ids = [first]
    for _ in range(5):
        ids.append(backup.new_backup_id(ids[-1], now=1_800_000_000.5))
    assert ids == sorted(ids) and len(set(ids)) == 6
    assert first.startswith("20270115T080000500Z-")
    older_clock = backup.new_backup_id(ids[-1], now=1_700_000_000)  # a clock that went back
    assert older_clock > ids[-1]


def test_a_restore_finds_what_would_make_the_namespace_inconsistent() -> None:
    good = {"inodes": {"1": {"attr": {}, "dir": {"f": 2}},
                       "2": {"attr": {}, "blocks": {"0": "5|@a:0:5:0"},
                             "slices": {"a": "aGVsbG8="}}}}
    assert list(backup._structure_problems(good)) == []  # noqa: SLF001
    bad = {"inodes": {"2": {"attr": {}, "dir": {"x": 9},
                            "blocks": {"0": "9|@a:0:9:0;@b:0:1:0"},
                            "slices": {"a": "aGVsbG8="}}}}
    problems = list(backup._structure_problems(bad))  # noqa: SLF001
    assert any("root directory is missing" in p for p in problems)
    assert any("names inode 9" in p for p in problems)
    assert any("@b" in p and "missing" in p for p in problems)
    assert any("@a" in p and "too short" in p for p in problems)
