"""The mount's metadata cache: what it serves, for how long, and what forgets it.

A fake clock drives it: the cache's promise is about time (nothing older than the
configured timeouts is ever handed to the kernel) and about this mount's own changes
(never hidden by an answer that predates them).
"""

from __future__ import annotations

import pytest

from chunkfs.meta.schema import Attr
from chunkfs.metacache import BIG_DIR, MISSES_TO_LIST, SMALL_DIR, MetaCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def attr(ino: int, size: int = 0) -> Attr:
    return Attr(ino, 0o100644, 0, 0, 1, size, 1, 2, 3)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(clock: Clock) -> MetaCache:
    return MetaCache(attr_timeout=1.0, entry_timeout=2.0, clock=clock)


def test_attributes_are_served_until_the_timeout_counted_from_the_request(
        cache: MetaCache, clock: Clock) -> None:
    sent = clock.now
    clock.now += 0.25  # the answer took a while
    cache.put_attr(attr(5, 42), sent)
    clock.now += 0.25
    hit = cache.attr(5)
    assert hit is not None and hit[0].size == 42
    assert hit[1] == pytest.approx(0.5), "the kernel gets the timeout minus the answer's age"
    clock.now = sent + 1.0
    assert cache.attr(5) is None, "expired exactly at attr-timeout after the request was sent"


def test_an_entry_expires_at_the_entry_timeout_and_with_its_attributes(
        cache: MetaCache, clock: Clock) -> None:
    cache.put_entry(1, b"f", attr(7), clock.now)
    hit = cache.entry(1, b"f")
    assert hit is not None
    found, entry_left, attr_left = hit
    assert (found.ino, entry_left, attr_left) == (7, 2.0, 1.0)
    clock.now += 1.0  # the attributes expire first: the entry cannot be answered alone
    assert cache.entry(1, b"f") is None
    listed = clock.now
    cache.put_entry(1, b"g", attr(8), listed)
    clock.now += 1.5
    cache.put_attr(attr(8), clock.now)  # attributes refreshed by a getattr
    assert cache.entry(1, b"g") is not None
    clock.now = listed + 2.0
    assert cache.entry(1, b"g") is None, "the name itself expires at entry-timeout"


def test_an_answer_sent_before_a_change_on_this_mount_is_not_stored(
        cache: MetaCache, clock: Clock) -> None:
    sent = clock.now           # a getattr leaves
    clock.now += 0.01
    cache.forget(5)            # this mount changes the inode meanwhile (chmod, write)
    clock.now += 0.01
    cache.put_attr(attr(5, 1), sent)  # the getattr's answer may predate the change
    assert cache.attr(5) is None
    cache.put_attr(attr(5, 2), clock.now)  # a request sent after the change is stored
    hit = cache.attr(5)
    assert hit is not None and hit[0].size == 2


def test_a_name_changed_here_is_forgotten_and_a_racing_lookup_is_not_stored(
        cache: MetaCache, clock: Clock) -> None:
    cache.put_entry(1, b"f", attr(7), clock.now)
    sent = clock.now
    clock.now += 0.01
    cache.forget_entry(1, b"f")  # unlinked or renamed here
    assert cache.entry(1, b"f") is None
    cache.put_entry(1, b"f", attr(7), sent)
    assert cache.entry(1, b"f") is None
    assert cache.entry_ino(1, b"f") is None


def test_an_older_answer_does_not_replace_a_newer_one(cache: MetaCache, clock: Clock) -> None:
    cache.put_attr(attr(5, 2), clock.now)
    cache.put_attr(attr(5, 1), clock.now - 0.5)  # a slow reply to an earlier request
    hit = cache.attr(5)
    assert hit is not None and hit[0].size == 2


def test_a_complete_listing_serves_opendir_until_the_directory_changes_here(
        cache: MetaCache, clock: Clock) -> None:
    cache.put_listing(1, [(b"b", attr(3)), (b"a", attr(2))], clock.now, complete=True)
    listed = cache.listing(1)
    assert listed is not None
    assert listed[0] == [(b"a", 2), (b"b", 3)] and listed[1] == 2.0
    assert cache.entry(1, b"a") is not None, "its entries answer lookups too"
    cache.forget(1)  # a create, unlink or rename in the directory on this mount
    assert cache.listing(1) is None
    cache.put_listing(1, [(b"a", attr(2))], clock.now - 0.1, complete=True)
    assert cache.listing(1) is None, "a listing sent before the change is not kept"


def test_a_listing_expires_at_the_entry_timeout(cache: MetaCache, clock: Clock) -> None:
    cache.put_listing(1, [(b"a", attr(2))], clock.now, complete=True)
    clock.now += 2.0
    assert cache.listing(1) is None


def test_a_partial_listing_answers_lookups_but_not_opendir(cache: MetaCache, clock: Clock) -> None:
    cache.put_listing(1, [(b"a", attr(2))], clock.now)
    assert cache.entry(1, b"a") is not None
    assert cache.listing(1) is None


def test_big_directories_are_listed_after_repeated_misses_within_the_timeout(
        cache: MetaCache, clock: Clock) -> None:
    count = SMALL_DIR * 4
    answers = [cache.should_list(1, count) for _ in range(MISSES_TO_LIST)]
    assert answers == [False] * (MISSES_TO_LIST - 1) + [True]
    assert not cache.should_list(2, SMALL_DIR), "small ones come with the lookup already"
    assert not any(cache.should_list(3, BIG_DIR + 1) for _ in range(5)), "huge ones never"
    for _ in range(MISSES_TO_LIST - 1):
        assert not cache.should_list(4, count)
        clock.now += 2.5  # misses spread wider than the timeout do not add up
    assert not cache.should_list(4, count)


def test_zero_timeouts_disable_the_cache(clock: Clock) -> None:
    cache = MetaCache(attr_timeout=0, entry_timeout=0, clock=clock)
    cache.put_entry(1, b"f", attr(7), clock.now)
    cache.put_listing(1, [(b"f", attr(7))], clock.now, complete=True)
    assert cache.attr(7) is None and cache.entry(1, b"f") is None and cache.listing(1) is None
    assert not cache.should_list(1, SMALL_DIR * 4)


def test_the_cache_is_bounded(clock: Clock) -> None:
    cache = MetaCache(attr_timeout=60, entry_timeout=60, clock=clock, limit=100)
    for i in range(1000):
        cache.put_entry(1, b"f%d" % i, attr(10 + i), clock.now)
    assert cache.attr(10) is None and cache.entry(1, b"f0") is None, "oldest dropped first"
    assert cache.entry(1, b"f999") is not None
    assert len(cache._attrs) <= 100 and len(cache._entries) <= 100


def test_xattr_answers_found_or_missing_are_served_until_the_attribute_timeout(
        cache: MetaCache, clock: Clock) -> None:
    sent = clock.now
    clock.now += 0.25
    cache.put_xattr(5, b"security.capability", None, sent)
    cache.put_xattr(5, b"user.k", b"v", sent)
    assert cache.xattr(5, b"security.capability") == (None,), "a missing xattr is an answer too"
    assert cache.xattr(5, b"user.k") == (b"v",)
    assert cache.xattr(5, b"user.other") is None, "a name never asked is unknown"
    assert cache.xattr(6, b"user.k") is None
    clock.now = sent + 1.0
    assert cache.xattr(5, b"security.capability") is None, "expired at attr-timeout after the request"
    assert cache.xattr(5, b"user.k") is None


def test_only_this_mounts_xattr_changes_forget_xattrs_and_older_answers_stay_out(
        cache: MetaCache, clock: Clock) -> None:
    cache.put_xattr(5, b"user.k", None, clock.now)
    cache.forget(5)  # a flush, a truncate, a chmod: the data or attributes changed
    assert cache.xattr(5, b"user.k") == (None,), "writing data leaves the xattrs cached"
    sent = clock.now
    clock.now += 0.1
    cache.forget_xattrs(5)  # setxattr on this mount
    assert cache.xattr(5, b"user.k") is None
    cache.put_xattr(5, b"user.k", None, sent)
    assert cache.xattr(5, b"user.k") is None, "an answer sent before the change may predate it"
    cache.put_xattr(5, b"user.k", b"new", clock.now)
    assert cache.xattr(5, b"user.k") == (b"new",)
    cache.put_xattr(5, b"user.k", b"older", sent + 0.05)
    assert cache.xattr(5, b"user.k") == (b"new",), "an older answer never replaces a newer one"


def test_xattrs_are_not_cached_when_the_timeouts_are_zero(clock: Clock) -> None:
    off = MetaCache(attr_timeout=0.0, entry_timeout=0.0, clock=clock)
    off.put_xattr(5, b"user.k", b"v", clock.now)
    assert off.xattr(5, b"user.k") is None


def test_the_xattr_cache_is_bounded_and_drops_what_expired(clock: Clock) -> None:
    small = MetaCache(attr_timeout=1.0, entry_timeout=1.0, clock=clock, limit=3)
    for ino in range(10):
        small.put_xattr(ino, b"security.capability", None, clock.now)
    assert len(small._xattrs) == 3
    assert small.xattr(9, b"security.capability") == (None,), "the newest are kept"
    clock.now += 2.0
    small.put_xattr(20, b"user.k", b"v", clock.now)
    assert list(small._xattrs) == [20], "inodes whose answers all expired are dropped"
