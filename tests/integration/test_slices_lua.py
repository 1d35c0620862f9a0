"""The Lua scripts and chunkfs.blocks.slices do the same to a slice list (real Redis).

A mount applies a commit to its own view of a block with the Python functions while the
COMMIT/TRUNCATE scripts apply it in Redis; both must agree, slice for slice, or the
mount would read something else than what it committed.
"""

from __future__ import annotations

import random

import pytest
import redis

from chunkfs.blocks import slices as sl
from chunkfs.blocks.slices import Slice
from chunkfs.meta import scripts

HARNESS = scripts.PRELUDE + r"""
local op = ARGV[1]
if op == 'append' then
  local v, gone = append_slices(ARGV[2], ARGV[3])
  local g = {}
  for i, x in ipairs(gone) do g[i] = x[5] end
  return {normalized(v), table.concat(g, ';')}
elseif op == 'trim' then
  local v, gone = trim_slices(ARGV[2], tonumber(ARGV[3]))
  return {normalized(v), ''}
elseif op == 'extent' then
  return {tostring(extent_of(ARGV[2])), ''}
end
"""
BS = 4 << 20


def rand_slices(rng: random.Random, n: int) -> list[Slice]:
    out = []
    for _ in range(n):
        pos = rng.randrange(BS)
        length = rng.randint(1, BS - pos)
        kind = rng.random()
        ref = sl.ZERO if kind < 0.1 else (f"@s{rng.randrange(10**6)}.{rng.randrange(99)}"
                                          if kind < 0.4 else f"{rng.randrange(16**64):064x}_{BS}")
        out.append(Slice(ref, rng.randrange(1000), length, pos))
    return out


def python_normalized(block: list[Slice]) -> str:
    return "" if all(s.ref == sl.ZERO for s in block) else sl.encode(block)


@pytest.mark.parametrize("seed", range(25))
def test_lua_and_python_agree_on_append_trim_and_extent(redis_url: str, seed: int) -> None:
    rng = random.Random(seed)
    r = redis.Redis.from_url(redis_url)
    harness = r.register_script(HARNESS)
    block: list[Slice] = rand_slices(rng, rng.randint(0, 6))
    for _ in range(20):
        value = sl.encode(block)
        if rng.random() < 0.3:
            keep = rng.randrange(BS + 1)
            lua, _ = harness(args=["trim", value, keep])
            block = sl.trim(block, keep)
            assert lua.decode() == python_normalized(block)
        else:
            new = rand_slices(rng, rng.randint(1, 3))
            lua, gone = harness(args=["append", value, sl.encode(new)])
            after = sl.append(block, new)
            assert lua.decode() == python_normalized(after)
            expected_gone = [s for s in block if s not in after or block.count(s) > after.count(s)]
            assert sl.parse(gone) == [s for s in block if s not in after] or \
                sl.parse(gone) == expected_gone
            block = after
        (ext, _) = harness(args=["extent", sl.encode(block)])
        assert int(ext) == sl.extent(block)
    r.close()
