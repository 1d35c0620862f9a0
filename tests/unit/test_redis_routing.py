"""Pure parts of the Redis shapes: cluster slot hashing and routing keys, and the
durability verdicts the mount reports (the servers themselves: tests/integration)."""

from __future__ import annotations

import pytest

from chunkfs.meta import scripts
from chunkfs.meta.durability import _risks
from chunkfs.meta.resp import _crc16, command_key, key_slot
from chunkfs.meta.schema import GC_DOOMED, GC_STATE, Keys


def test_slots_are_redis_clusters_crc16_of_the_hash_tag() -> None:
    assert _crc16(b"123456789") == 0x31C3  # the CRC16/XMODEM check value Redis documents
    assert key_slot("foo") == 12182 and key_slot(b"bar") == 5061
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers")
    assert key_slot("foo{}{bar}") == _crc16(b"foo{}{bar}") % 16384  # empty tag: whole key
    assert key_slot("foo{{bar}}zap") == key_slot("{bar")


def test_every_key_of_a_volume_and_of_gc_shares_one_slot() -> None:
    k = Keys("0123456789abcdef")
    keys = [k.vol, k.idx, k.orphans, k.sessions, k.pending, k.settled, k.publications,
            k.reply("x.1"), *k.per_inode(1), *k.per_inode(987654)]
    assert {key_slot(key) for key in keys} == {key_slot(k.vol)}
    assert key_slot(GC_STATE) == key_slot(GC_DOOMED)


def test_commands_are_routed_by_their_first_key() -> None:
    assert command_key(("HMGET", "cfs{a}:i1", "m")) == "cfs{a}:i1"
    assert command_key(("EVALSHA", b"sha", 2, "cfs{a}:vol", "cfs{a}:d1", "arg")) == "cfs{a}:vol"
    assert command_key(("EVAL", scripts.DOOMED, 0, "arg")) is None
    assert command_key(("PING",)) is None and command_key(("TIME",)) is None


@pytest.mark.parametrize("aof, policy, replicated, risk", [
    ("1", "always", False, None),
    ("1", "everysec", True, None),
    ("1", "everysec", False, "last second"),
    ("1", "no", True, "appendfsync no"),
    ("0", "always", True, "appendonly is off"),
    ("1", None, False, "cannot read appendfsync"),
    (None, None, False, "INFO refused"),
])
def test_durability_verdicts(aof, policy, replicated, risk) -> None:
    found = _risks("h:1", aof, policy, replicated)
    assert (found == []) if risk is None else (len(found) == 1 and risk in found[0]), found
