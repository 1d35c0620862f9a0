"""Lua scripts: every metadata mutation of a volume is one atomic script.

A script checks the writer epoch (fencing), the snapshot freeze and the capacity in
the same atomic step as it mutates, so a stale writer can never commit and a crash
can never leave half an operation behind. All keys of one script share the volume's
hash tag. Errors come back as short codes (``ENOENT``, ``FENCED``, ...) that
``chunkfs.meta.redis_meta`` turns into typed exceptions.

Retries are exact: every mutation is built by ``_mutation`` and takes, as its last
KEY, a reply key unique to the caller's request (``Keys.reply``). The first run that
succeeds stores its result there for ``REPLY_TTL_MS``; a retry of the same request
(its reply was lost, or it arrived late through a slow network) returns that stored
result instead of running again. So a ``mkdir`` whose reply was lost does not fail
with EEXIST on retry, and an ``unlink`` cannot report ENOENT after succeeding.
Failed runs store nothing: they changed nothing, so running them again is exact too.

Upload protection (the GC protocol, ``docs/dev/gc.md``): before a block is uploaded,
``REGISTER`` counts it in the volume's ``pending`` hash under the mount's session;
``COMMIT`` (or ``SETTLE`` for uploads that were superseded) moves it to ``settled``
in the same atomic step that makes the block map reference it. GC reads both (in
bounded scans) and ``TOMBSTONE``s sessions that have been silent too long, after which
those sessions can neither register nor commit.
"""

from __future__ import annotations

from chunkfs.blocks.slices import PRUNE_MIN
from chunkfs.meta.schema import BYTES_PER_INODE, MAX_SLICE_BYTES, MIN_INODES, VOL_KEY, lua

REPLY_TTL_MS = 15 * 60 * 1000   # retries of one request stop long before this (io-timeout <= 600 s)
SESSION_TTL_MS = 120 * 1000     # a session not renewed for this long has expired
MAX_WALK = 1024                 # ancestors a directory rename checks (bounds its cost)

PRELUDE = lua(rf"""
local vol = KEYS[1]
local MIN_INODES, BYTES_PER_INODE, MAX_WALK = {MIN_INODES}, {BYTES_PER_INODE}, {MAX_WALK}
local MAX_SLICE_BYTES, PRUNE_MIN = {MAX_SLICE_BYTES}, {PRUNE_MIN}
local function I(x) return string.format('%d', x) end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function guard(epoch)
  local st = redis.call('HMGET', vol, V.epoch, V.frozen, V.kind)
  if not st[3] then return 'NOVOL' end
  if st[3] == 'snapshot' then return 'EROFS' end
  if epoch ~= '' and st[1] ~= epoch then return 'FENCED' end
  if st[2] and tonumber(st[2]) > now_ms() then return 'FROZEN' end
  return nil
end
local function kind(mode)
  if not mode then return nil end
  local f = math.floor(tonumber(mode) / 4096) % 16
  if f == 4 then return 'dir' elseif f == 10 then return 'lnk' end
  return 'file'
end
-- a block map value: '<extent>|' then slices 'ref:off:length:pos' joined by ';', oldest
-- first (chunkfs/blocks/slices.py: the encoding, its meaning, the same operations in
-- Python). The extent up front lets an append cost what it appends, not the list.
local function body_of(v)
  local h = string.find(v, '|', 1, true)
  if h then return string.sub(v, h + 1) end
  return v
end
local function slice_list(v)
  local out = {{}}
  if not v or v == '' then return out end
  for part in string.gmatch(body_of(v), '[^;]+') do
    local ref, off, len, pos = string.match(part, '^(.*):(%d+):(%d+):(%d+)$')
    out[#out + 1] = {{ref, tonumber(off), tonumber(len), tonumber(pos), part}}
  end
  return out
end
local function list_extent(list)
  local m = 0
  for _, x in ipairs(list) do
    if x[3] > 0 and x[4] + x[3] > m then m = x[4] + x[3] end
  end
  return m
end
local function join_slices(list)
  if #list == 0 then return '' end
  local t = {{}}
  for i, x in ipairs(list) do t[i] = x[5] end
  return I(list_extent(list)) .. '|' .. table.concat(t, ';')
end
local function extent_of(v)
  if not v or v == '' then return 0 end
  local h = string.find(v, '|', 1, true)
  if h then return tonumber(string.sub(v, 1, h - 1)) end
  return list_extent(slice_list(v))
end
-- a list of nothing but zero slices ('0' refs) reads as a hole: store none
local function only_zeros(list)
  for _, x in ipairs(list) do if x[1] ~= '0' then return false end end
  return true
end
local function normalized(v)
  if only_zeros(slice_list(v)) then return '' end
  return v
end
-- ``new`` on top of ``old``. A new slice of PRUNE_MIN bytes or more drops every old slice
-- it covers entirely; small ones are appended as they are (a merge cleans up later), so
-- a small commit costs what it appends, whatever the block's history.
local function append_slices(old, new)
  local n, big = slice_list(new), false
  local added = {{}}
  for _, y in ipairs(n) do
    if y[3] > 0 then added[#added + 1] = y end
    if y[3] >= PRUNE_MIN then big = true end
  end
  if #added == 0 then return old, {{}} end
  if not big then
    if old == '' then
      if only_zeros(added) then return '', {{}} end
      return join_slices(added), {{}}
    end
    local ext = math.max(extent_of(old), list_extent(added))
    local t = {{}}
    for i, y in ipairs(added) do t[i] = y[5] end
    return I(ext) .. '|' .. body_of(old) .. ';' .. table.concat(t, ';'), {{}}
  end
  local keep, gone = {{}}, {{}}
  for _, x in ipairs(slice_list(old)) do
    local covered = false
    for _, y in ipairs(added) do
      if y[3] >= PRUNE_MIN and y[4] <= x[4] and x[4] + x[3] <= y[4] + y[3] then
        covered = true
        break
      end
    end
    if covered then gone[#gone + 1] = x else keep[#keep + 1] = x end
  end
  for _, y in ipairs(added) do keep[#keep + 1] = y end
  if only_zeros(keep) then
    for _, x in ipairs(keep) do gone[#gone + 1] = x end
    return '', gone
  end
  return join_slices(keep), gone
end
-- the block cut at ``keep`` bytes from its start
local function trim_slices(v, keep)
  local out, gone = {{}}, {{}}
  for _, x in ipairs(slice_list(v)) do
    if x[4] >= keep or x[3] <= 0 then gone[#gone + 1] = x
    elseif x[4] + x[3] > keep then
      local l = keep - x[4]
      out[#out + 1] = {{x[1], x[2], l, x[4], x[1] .. ':' .. I(x[2]) .. ':' .. I(l) .. ':' .. I(x[4])}}
    else out[#out + 1] = x end
  end
  return join_slices(out), gone
end
-- the slices of ``old`` that ``new`` no longer names (set or compare-and-set ops)
local function vanished(old, new)
  local still, gone = {{}}, {{}}
  for _, y in ipairs(slice_list(new)) do still[y[1]] = true end
  for _, x in ipairs(slice_list(old)) do if not still[x[1]] then gone[#gone + 1] = x end end
  return gone
end
-- inline slices whose bytes live in the inode's slices_key hash; a slice leaving its list takes
-- its bytes with it unless ``keep`` (ref -> true: every slice the file still has) names its
-- id: one small flush stores its ranges of a block under one id that several slices name,
-- and a commit applied twice re-appends the same inline slice
local function free_inline(ykey, gone, keep)
  local freed = 0
  for _, x in ipairs(gone) do
    if string.sub(x[1], 1, 1) == '@' and not keep[x[1]] then
      local id = string.sub(x[1], 2)
      freed = freed + redis.call('HSTRLEN', ykey, id)
      redis.call('HDEL', ykey, id)
    end
  end
  if freed > 0 then redis.call('HINCRBY', vol, V.slicebytes, -freed) end
end
-- metadata costs space too (names, symlink targets, xattrs): one tenant must not be able
-- to fill the Redis every volume shares while its usage stays 0
local function room_for(delta)
  if delta <= 0 then return true end
  local st = redis.call('HMGET', vol, V.used, V.capacity)
  return tonumber(st[1]) + delta <= tonumber(st[2])
end
local function inode_room()
  local st = redis.call('HMGET', vol, V.inodes, V.max_inodes, V.capacity)
  local limit = tonumber(st[2]) or math.max(MIN_INODES, math.floor(tonumber(st[3]) / BYTES_PER_INODE))
  return tonumber(st[1]) < limit
end
local function xattr_bytes(xkey)
  local n, flat = 0, redis.call('HGETALL', xkey)
  for i = 1, #flat do n = n + #flat[i] end
  return n
end
local function destroy(prefix, ino)
  local ikey = inode_key(prefix, ino)
  local bkey = blocks_key(prefix, ino)
  local freed = 0
  local d = redis.call('HGET', ikey, F.data)
  if d then freed = freed + #d end
  local l = redis.call('HGET', ikey, F.target)
  if l then freed = freed + #l end
  freed = freed + xattr_bytes(xattr_key(prefix, ino))
  for _, e in ipairs(redis.call('HVALS', bkey)) do freed = freed + extent_of(e) end
  local ykey, stored = slices_key(prefix, ino), 0
  for _, b in ipairs(redis.call('HVALS', ykey)) do stored = stored + #b end
  if stored > 0 then redis.call('HINCRBY', vol, V.slicebytes, -stored) end
  redis.call('DEL', ikey, bkey, xattr_key(prefix, ino), dir_key(prefix, ino), ykey)
  redis.call('SREM', idx_key(prefix), ino)
  redis.call('HDEL', orphans_key(prefix), ino)
  redis.call('HINCRBY', vol, V.inodes, -1)
  if freed > 0 then redis.call('HINCRBY', vol, V.used, I(-freed)) end
end
-- drop one link of a non-directory; keep it as an orphan while it is open somewhere
local function drop_link(prefix, ino, now, keep, session)
  local ikey = inode_key(prefix, ino)
  local n = redis.call('HINCRBY', ikey, F.nlink, -1)
  redis.call('HSET', ikey, F.ctime, now)
  if n <= 0 then
    if keep == '1' then redis.call('HSET', orphans_key(prefix), ino, session)
    else destroy(prefix, ino) end
  end
  return n
end
-- a session tombstoned by GC ('dead:<ms>') may no longer register or commit uploads
local function session_dead(sessions, session)
  local v = redis.call('HGET', sessions, session)
  return v ~= false and string.sub(v, 1, 5) == 'dead:'
end
-- one registration of an upload by ``session`` is no longer needed: its block is
-- referenced by a block map now (or was superseded); GC runs that started before this
-- instant still count it as live
local function settle(pending, settled, session, objkey, now)
  local f = objkey .. ' ' .. session
  if redis.call('HINCRBY', pending, f, -1) <= 0 then redis.call('HDEL', pending, f) end
  redis.call('HSET', settled, objkey, now)
end
""")


# Change tracking for incremental backups (docs/dev/backup.md). In a mutation script every
# ``redis.call`` is ``call``, which notes the inode of each per-inode key a write names;
# once the body has run, the noted inodes join the volume's ``changed`` set if it exists
# (a backup has started tracking). Seeing the writes themselves, instead of asking each
# script to say what it changed, means no script can forget an inode; a script that writes
# with a command missing from TRACKED_WRITES fails tests/unit/test_schema.py.
TRACKED_WRITES = ("HSET", "HSETNX", "HDEL", "HINCRBY", "DEL", "SET", "SADD", "SREM", "COPY")
_TRACK = lua(rf"""
if string.sub(KEYS[1], -{len(VOL_KEY)}) ~= '{VOL_KEY}' then
  return redis.error_reply('BADKEYS the first key of a mutation must be its volume key')
end
local P = string.sub(KEYS[1], 1, #KEYS[1] - {len(VOL_KEY)})
local WRITES = {{{", ".join(f"{c} = true" for c in TRACKED_WRITES)}}}
local touched = {{}}
local function mark(k)
  if string.sub(k, 1, #P) == P then
    local ino = string.match(k, '^' .. PER_INODE_CLASS .. '(%d+)$', #P + 1)
    if ino then touched[ino] = true end
  end
end
local function call(cmd, ...)
  if WRITES[cmd] then
    if cmd == 'DEL' then
      for i = 1, select('#', ...) do mark((select(i, ...))) end
    else mark((...)) end
  end
  return redis.call(cmd, ...)
end
local function note_changes()
  if next(touched) == nil then return end
  local ck = changed_key(P)
  if redis.call('EXISTS', ck) == 0 then return end
  local t = {{}}
  for ino in pairs(touched) do t[#t + 1] = ino end
  redis.call('SADD', ck, unpack(t))
end
""")


def _mutation(body: str) -> str:
    """A mutating script: ``body`` runs at most once per reply key (the last KEY), and
    the inodes it wrote are noted for the next backup."""
    tracked = (PRELUDE + "local function body()\n" + body + "\nend\n" + rf"""
local reply = KEYS[#KEYS]
local prev = redis.call('GET', reply)
if prev then return cjson.decode(prev) end
local res = body()
note_changes()
if type(res) == 'table' and res.err then return res end
redis.call('SET', reply, cjson.encode(res), 'PX', {REPLY_TTL_MS})
return res
""").replace("redis.call(", "call(")
    return lua(_TRACK + tracked)


# KEYS: dir ; ARGV: name, prefix  ->  {ino, {attr fields}} or nil
LOOKUP = lua(r"""
local ino = redis.call('HGET', KEYS[1], ARGV[1])
if not ino then return nil end
return {ino, redis.call('HMGET', inode_key(ARGV[2], ino), ATTR_FIELDS)}
""")

# KEYS: dir ; ARGV: name, prefix, listing limit
#   ->  {ino or false, {attr fields} or false, entries in the dir, listing or false}
# The listing (name, ino, {attr fields}, name, ...) comes with the answer when the directory
# has at most ``limit`` entries: a mount then answers the lookups of its other names from
# memory (``chunkfs.metacache``), for a price close to one lookup's.
LOOKUP_DIR = lua(r"""
local ino = redis.call('HGET', KEYS[1], ARGV[1])
local attrs = false
if ino then attrs = redis.call('HMGET', inode_key(ARGV[2], ino), ATTR_FIELDS) end
local n = redis.call('HLEN', KEYS[1])
local listing = false
if n <= tonumber(ARGV[3]) then
  listing = {}
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    listing[#listing + 1] = all[i]
    listing[#listing + 1] = all[i + 1]
    listing[#listing + 1] = redis.call('HMGET', inode_key(ARGV[2], all[i + 1]), ATTR_FIELDS)
  end
end
return {ino or false, attrs, n, listing}
""")

# KEYS: dir ; ARGV: cursor, count, prefix  ->  {next cursor, {name, ino, {attr fields}, ...}}
# One step of a directory's listing with attributes (HSCAN: bounded work per call, so a
# big directory never stalls the Redis that every volume shares).
DIR_PAGE = lua(r"""
local res = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', tonumber(ARGV[2]))
local out, flat = {}, res[2]
for i = 1, #flat, 2 do
  out[#out + 1] = flat[i]
  out[#out + 1] = flat[i + 1]
  out[#out + 1] = redis.call('HMGET', inode_key(ARGV[3], flat[i + 1]), ATTR_FIELDS)
end
return {res[1], out}
""")

# KEYS: vol, parent dir, parent inode, idx, reply
# ARGV: epoch, name, mode, uid, gid, rdev, now, symlink target, prefix, is_dir, parent ino, inline
#   ->  {ino, mode, gid} (a setgid parent gives its group, and to directories its setgid bit)
CREATE = _mutation(r"""
local g = guard(ARGV[1]); if g then return redis.error_reply(g) end
local parent = redis.call('HMGET', KEYS[3], F.mode, F.gid)
if kind(parent[1]) ~= 'dir' then return redis.error_reply('ENOENT') end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return redis.error_reply('EEXIST') end
local cost = #ARGV[2] + #ARGV[8]
if not inode_room() or not room_for(cost) then return redis.error_reply('ENOSPC') end
local ino = redis.call('HINCRBY', vol, V.next_ino, 1)
local ikey = inode_key(ARGV[9], ino)
local now = ARGV[7]
local isdir = ARGV[10] == '1'
local mode, gid = tonumber(ARGV[3]), ARGV[5]
if bit.band(tonumber(parent[1]), 1024) ~= 0 then  -- a setgid directory: its group is inherited
  gid = parent[2]
  if isdir then mode = bit.bor(mode, 1024) end
end
redis.call('HSET', ikey, F.mode, mode, F.uid, ARGV[4], F.gid, gid, F.nlink, isdir and 2 or 1,
           F.size, #ARGV[8], F.atime, now, F.mtime, now, F.ctime, now, F.rdev, ARGV[6])
if isdir then redis.call('HSET', ikey, F.parent, ARGV[11]) end
if ARGV[8] ~= '' then redis.call('HSET', ikey, F.target, ARGV[8]) end
if ARGV[12] == '1' then redis.call('HSET', ikey, F.data, '') end
redis.call('HSET', KEYS[2], ARGV[2], ino)
redis.call('SADD', KEYS[4], ino)
redis.call('HINCRBY', vol, V.inodes, 1)
redis.call('HSET', KEYS[3], F.mtime, now, F.ctime, now)
if isdir then redis.call('HINCRBY', KEYS[3], F.nlink, 1) end
redis.call('HINCRBY', vol, V.used, cost)
return {ino, mode, tonumber(gid)}
""")

# KEYS: vol, parent dir, parent inode, target inode, reply ; ARGV: epoch, name, ino, now
LINK = _mutation(r"""
local g = guard(ARGV[1]); if g then return redis.error_reply(g) end
if kind(redis.call('HGET', KEYS[3], F.mode)) ~= 'dir' then return redis.error_reply('ENOENT') end
local k = kind(redis.call('HGET', KEYS[4], F.mode))
if not k then return redis.error_reply('ENOENT') end
if k == 'dir' then return redis.error_reply('EPERM') end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return redis.error_reply('EEXIST') end
if not room_for(#ARGV[2]) then return redis.error_reply('ENOSPC') end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('HINCRBY', vol, V.used, #ARGV[2])
local n = redis.call('HINCRBY', KEYS[4], F.nlink, 1)
redis.call('HSET', KEYS[4], F.ctime, ARGV[4])
redis.call('HSET', KEYS[3], F.mtime, ARGV[4], F.ctime, ARGV[4])
return n
""")

# KEYS: vol, parent dir, parent inode, reply ; ARGV: epoch, name, is_dir, now, prefix, keep, session
UNLINK = _mutation(r"""
local g = guard(ARGV[1]); if g then return redis.error_reply(g) end
local prefix = ARGV[5]
local ino = redis.call('HGET', KEYS[2], ARGV[2])
if not ino then return redis.error_reply('ENOENT') end
local k = kind(redis.call('HGET', inode_key(prefix, ino), F.mode))
if ARGV[3] == '1' and k ~= 'dir' then return redis.error_reply('ENOTDIR') end
if ARGV[3] ~= '1' and k == 'dir' then return redis.error_reply('EISDIR') end
if k == 'dir' and redis.call('HLEN', dir_key(prefix, ino)) > 0 then
  return redis.error_reply('ENOTEMPTY')
end
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('HINCRBY', vol, V.used, -#ARGV[2])
redis.call('HSET', KEYS[3], F.mtime, ARGV[4], F.ctime, ARGV[4])
if not k then return {ino, 0} end
if k == 'dir' then
  redis.call('HINCRBY', KEYS[3], F.nlink, -1)
  destroy(prefix, ino)
  return {ino, 0}
end
return {ino, drop_link(prefix, ino, ARGV[4], ARGV[6], ARGV[7])}
""")

# KEYS: vol, src dir, dst dir, src parent inode, dst parent inode, reply
# ARGV: epoch, src name, dst name, flags (1 noreplace, 2 exchange), now, prefix, keep, session,
#       src parent ino, dst parent ino
RENAME = _mutation(r"""
local g = guard(ARGV[1]); if g then return redis.error_reply(g) end
local prefix, now, flags = ARGV[6], ARGV[5], tonumber(ARGV[4])
local ino = redis.call('HGET', KEYS[2], ARGV[2])
if not ino then return redis.error_reply('ENOENT') end
if kind(redis.call('HGET', KEYS[5], F.mode)) ~= 'dir' then return redis.error_reply('ENOENT') end
local sk = kind(redis.call('HGET', inode_key(prefix, ino), F.mode))
local cross = ARGV[9] ~= ARGV[10]
-- is ``anc`` an ancestor of (or) directory ``p``? bounded: a deeper tree is refused
local function under(p, anc)
  for _ = 1, MAX_WALK do
    if not p or p == '1' then return false end
    if p == anc then return true end
    p = redis.call('HGET', inode_key(prefix, p), F.parent)
  end
  return nil
end
if sk == 'dir' and cross then
  local u = under(ARGV[10], ino)
  if u == nil then return redis.error_reply('ELOOP') end
  if u then return redis.error_reply('EINVAL') end
end
local dino = redis.call('HGET', KEYS[3], ARGV[3])
if dino == ino then return {0, 0} end
local dk = dino and kind(redis.call('HGET', inode_key(prefix, dino), F.mode))
if flags == 2 then
  if not dino then return redis.error_reply('ENOENT') end
  if dk == 'dir' and cross then
    local u = under(ARGV[9], dino)
    if u == nil then return redis.error_reply('ELOOP') end
    if u then return redis.error_reply('EINVAL') end
  end
  redis.call('HSET', KEYS[2], ARGV[2], dino)
  redis.call('HSET', KEYS[3], ARGV[3], ino)
  if cross then
    if sk == 'dir' then
      redis.call('HSET', inode_key(prefix, ino), F.parent, ARGV[10])
      redis.call('HINCRBY', KEYS[4], F.nlink, -1); redis.call('HINCRBY', KEYS[5], F.nlink, 1)
    end
    if dk == 'dir' then
      redis.call('HSET', inode_key(prefix, dino), F.parent, ARGV[9])
      redis.call('HINCRBY', KEYS[5], F.nlink, -1); redis.call('HINCRBY', KEYS[4], F.nlink, 1)
    end
  end
  redis.call('HSET', inode_key(prefix, ino), F.ctime, now)
  redis.call('HSET', inode_key(prefix, dino), F.ctime, now)
  redis.call('HSET', KEYS[4], F.mtime, now, F.ctime, now)
  redis.call('HSET', KEYS[5], F.mtime, now, F.ctime, now)
  return {0, 0}
end
local left = 0
if not dino and not room_for(#ARGV[3] - #ARGV[2]) then return redis.error_reply('ENOSPC') end
if dino then
  if flags == 1 then return redis.error_reply('EEXIST') end
  if sk == 'dir' and dk and dk ~= 'dir' then return redis.error_reply('ENOTDIR') end
  if sk ~= 'dir' and dk == 'dir' then return redis.error_reply('EISDIR') end
  if dk == 'dir' then
    if redis.call('HLEN', dir_key(prefix, dino)) > 0 then return redis.error_reply('ENOTEMPTY') end
    destroy(prefix, dino)
    redis.call('HINCRBY', KEYS[5], F.nlink, -1)
  elseif dk then
    left = drop_link(prefix, dino, now, ARGV[7], ARGV[8])
  end
end
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[3], ino)
-- the source entry goes; the destination entry is new unless it replaced one
redis.call('HINCRBY', vol, V.used, (dino and 0 or #ARGV[3]) - #ARGV[2])
if sk == 'dir' and cross then
  redis.call('HINCRBY', KEYS[4], F.nlink, -1)
  redis.call('HINCRBY', KEYS[5], F.nlink, 1)
  redis.call('HSET', inode_key(prefix, ino), F.parent, ARGV[10])
end
if sk then redis.call('HSET', inode_key(prefix, ino), F.ctime, now) end
redis.call('HSET', KEYS[4], F.mtime, now, F.ctime, now)
redis.call('HSET', KEYS[5], F.mtime, now, F.ctime, now)
return {dino or 0, left}
""")

# KEYS: vol, inode, reply ; ARGV: epoch, field, value, field, value, ...
SETATTR = _mutation(r"""
local g = guard(ARGV[1]); if g then return redis.error_reply(g) end
if redis.call('EXISTS', KEYS[2]) == 0 then return redis.error_reply('ENOENT') end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
return 1
""")

# KEYS: vol, inode, blocks, inline slices, reply ; ARGV: epoch, new size, block size, now
TRUNCATE = _mutation(r"""
local g = guard(ARGV[1]); if g then return redis.error_reply(g) end
if redis.call('EXISTS', KEYS[2]) == 0 then return redis.error_reply('ENOENT') end
local size, bs = tonumber(ARGV[2]), tonumber(ARGV[3])
local delta = 0
local d = redis.call('HGET', KEYS[2], F.data)
if d then
  local nd
  if size <= #d then nd = string.sub(d, 1, size) else nd = d .. string.rep('\0', size - #d) end
  delta = #nd - #d
  if delta > 0 then
    local st = redis.call('HMGET', vol, V.used, V.capacity)
    if tonumber(st[1]) + delta > tonumber(st[2]) then return redis.error_reply('ENOSPC') end
  end
  redis.call('HSET', KEYS[2], F.data, nd)
else
  -- one inline id may be named by several slices (the ranges of one small flush): its
  -- bytes go only when no slice the file keeps names it any more
  local all = redis.call('HGETALL', KEYS[3])
  local gone_all, kept = {}, {}
  for i = 1, #all, 2 do
    local v = all[i + 1]
    local keep = size - tonumber(all[i]) * bs
    local before = extent_of(v)
    if before > keep then
      local gone
      v, gone = trim_slices(v, math.max(keep, 0))
      v = normalized(v)
      if v == '' then redis.call('HDEL', KEYS[3], all[i]) else redis.call('HSET', KEYS[3], all[i], v) end
      for _, x in ipairs(gone) do gone_all[#gone_all + 1] = x end
      delta = delta + extent_of(v) - before
    end
    kept[#kept + 1] = v
  end
  if #gone_all > 0 then
    local named = {}
    for _, v in ipairs(kept) do
      for _, x in ipairs(slice_list(v)) do named[x[1]] = true end
    end
    free_inline(KEYS[4], gone_all, named)
  end
end
redis.call('HSET', KEYS[2], F.size, ARGV[2], F.mtime, ARGV[4], F.ctime, ARGV[4])
if delta ~= 0 then redis.call('HINCRBY', vol, V.used, I(delta)) end
return 1
""")

# KEYS: vol, inode, blocks, pending, settled, sessions, inline slices, reply
# ARGV: epoch, now, size, mode ('I' inline body or 'B' blocks; with 'X' the file becomes
#       exactly ``size`` bytes, otherwise at least that large; with 'K' the times stay:
#       a move or compaction stores the same bytes otherwise), inline body,
#       session, n (uploads to settle), n object keys,
#       m (block changes), m times: block index, op, value, expected, where op is
#         'A' append the slices of ``value`` on top of the block,
#         'S' set the block to ``value`` ('' makes it a hole),
#         'C' the same, only if the block is ``expected`` now (else CONFLICT: nothing
#             changes; background moves and compactions must not overwrite a newer write)
#       k (inline slices to store), k times: id, bytes (their slices name them '@id')
COMMIT = _mutation(r"""
local g = guard(ARGV[1]); if g then return redis.error_reply(g) end
if redis.call('EXISTS', KEYS[2]) == 0 then return redis.error_reply('ENOENT') end
local session, nsettle = ARGV[6], tonumber(ARGV[7])
if nsettle > 0 and session_dead(KEYS[6], session) then return redis.error_reply('SESSION') end
local inline, exact = string.sub(ARGV[4], 1, 1) == 'I', string.find(ARGV[4], 'X', 1, true) ~= nil
local newsize = tonumber(ARGV[3])
local at = 8 + nsettle
local nblocks = tonumber(ARGV[at]); at = at + 1
local ops = {}
for _ = 1, nblocks do
  ops[#ops + 1] = {ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]}
  at = at + 4
end
local nstore = tonumber(ARGV[at]); at = at + 1
local stored = 0
for i = 0, nstore - 1 do stored = stored + #ARGV[at + 2 * i + 1] end
-- the new block values, computed before anything changes (checks first, then writes)
local delta, new, gone = 0, {}, {}
local d = redis.call('HGET', KEYS[2], F.data)
if inline then delta = #ARGV[5] - (d and #d or 0) elseif d then delta = -#d end
local function current(idx)
  if new[idx] ~= nil then return new[idx] end
  return redis.call('HGET', KEYS[3], idx) or ''
end
for _, op in ipairs(ops) do
  local idx, old = op[1], current(op[1])
  local v, lost
  if op[2] == 'A' then v, lost = append_slices(old, op[3])
  else
    if op[2] == 'C' and old ~= op[4] then return redis.error_reply('CONFLICT') end
    v, lost = normalized(op[3]), vanished(old, op[3])
  end
  new[idx] = v
  for _, x in ipairs(lost) do gone[#gone + 1] = x end
end
if exact then  -- blocks past the new end go, the one across it is cut
  local bs = tonumber(redis.call('HGET', vol, V.block_size))
  for _, idx in ipairs(redis.call('HKEYS', KEYS[3])) do
    local keep = newsize - tonumber(idx) * bs
    local v = current(idx)
    if inline or keep <= 0 then
      for _, x in ipairs(slice_list(v)) do gone[#gone + 1] = x end
      new[idx] = ''
    elseif extent_of(v) > keep then
      local t, lost = trim_slices(v, keep)
      new[idx] = normalized(t)
      for _, x in ipairs(lost) do gone[#gone + 1] = x end
    end
  end
end
for idx, v in pairs(new) do
  delta = delta + extent_of(v) - extent_of(redis.call('HGET', KEYS[3], idx) or '')
end
if delta > 0 then
  local st = redis.call('HMGET', vol, V.used, V.capacity)
  if tonumber(st[1]) + delta > tonumber(st[2]) then return redis.error_reply('ENOSPC') end
end
if stored > 0 then
  local st = redis.call('HMGET', vol, V.slicebytes, V.maxslicebytes, V.capacity)
  local limit = tonumber(st[2]) or math.min(MAX_SLICE_BYTES, math.floor(tonumber(st[3]) / 64))
  if (tonumber(st[1]) or 0) + stored > limit then return redis.error_reply('SLICEFULL') end
end
-- now write
if inline then redis.call('HSET', KEYS[2], F.data, ARGV[5])
elseif d then redis.call('HDEL', KEYS[2], F.data) end
for i = 0, nstore - 1 do
  local id, bytes = ARGV[at + 2 * i], ARGV[at + 2 * i + 1]
  stored = stored - redis.call('HSTRLEN', KEYS[7], id)  -- stored already (applied twice)
  redis.call('HSET', KEYS[7], id, bytes)
end
if stored ~= 0 then redis.call('HINCRBY', vol, V.slicebytes, stored) end
for idx, v in pairs(new) do
  if v == '' then redis.call('HDEL', KEYS[3], idx) else redis.call('HSET', KEYS[3], idx, v) end
end
if #gone > 0 then
  local named = {}
  for _, v in pairs(new) do
    for _, x in ipairs(slice_list(v)) do named[x[1]] = true end
  end
  free_inline(KEYS[7], gone, named)
end
local now = now_ms()
for i = 8, 7 + nsettle do settle(KEYS[4], KEYS[5], session, ARGV[i], now) end
local size = tonumber(redis.call('HGET', KEYS[2], F.size))
if exact or newsize > size then redis.call('HSET', KEYS[2], F.size, ARGV[3]) end
if not string.find(ARGV[4], 'K', 1, true) then  -- 'K': the same bytes, stored otherwise
  redis.call('HSET', KEYS[2], F.mtime, ARGV[2], F.ctime, ARGV[2])
end
if delta ~= 0 then redis.call('HINCRBY', vol, V.used, I(delta)) end
return delta  -- what the volume's usage grew by (an integer reply)
""")

# KEYS: vol, inode, xattrs, reply ; ARGV: epoch, name, value, flags (1 create, 2 replace), now, remove
XATTR = _mutation(r"""
local g = guard(ARGV[1]); if g then return redis.error_reply(g) end
if redis.call('EXISTS', KEYS[2]) == 0 then return redis.error_reply('ENOENT') end
local old = redis.call('HGET', KEYS[3], ARGV[2])
local exists = old ~= false
local before = exists and #ARGV[2] + #old or 0
if ARGV[6] == '1' then
  if not exists then return redis.error_reply('ENODATA') end
  redis.call('HDEL', KEYS[3], ARGV[2])
  redis.call('HINCRBY', vol, V.used, -before)
else
  if ARGV[4] == '1' and exists then return redis.error_reply('EEXIST') end
  if ARGV[4] == '2' and not exists then return redis.error_reply('ENODATA') end
  local delta = #ARGV[2] + #ARGV[3] - before
  if not room_for(delta) then return redis.error_reply('ENOSPC') end
  redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
  redis.call('HINCRBY', vol, V.used, delta)
end
redis.call('HSET', KEYS[2], F.ctime, ARGV[5])
return 1
""")

# KEYS: vol, reply ; ARGV: epoch, prefix, ino  -- remove an orphan once its last local
# opener closed it; fenced and frozen like every other mutation
PURGE = _mutation(r"""
local g = guard(ARGV[1]); if g then return redis.error_reply(g) end
local n = tonumber(redis.call('HGET', inode_key(ARGV[2], ARGV[3]), F.nlink))
if n and n <= 0 then destroy(ARGV[2], ARGV[3]) return 1 end
return 0
""")

# KEYS: vol, sessions, reply ; ARGV: session  -- keep a mount's session alive
HEARTBEAT = _mutation(rf"""
if session_dead(KEYS[2], ARGV[1]) then return redis.error_reply('SESSION') end
redis.call('HSET', KEYS[2], ARGV[1], I(now_ms() + {SESSION_TTL_MS}))
return 1
""")

# KEYS: vol, pending, sessions, reply ; ARGV: session, object keys...
# Protect uploads that no block map references yet (called before each PUT). Registering
# also renews the session: a mount that uploads is alive.
REGISTER = _mutation(rf"""
if session_dead(KEYS[3], ARGV[1]) then return redis.error_reply('SESSION') end
redis.call('HSET', KEYS[3], ARGV[1], I(now_ms() + {SESSION_TTL_MS}))
for i = 2, #ARGV do redis.call('HINCRBY', KEYS[2], ARGV[i] .. ' ' .. ARGV[1], 1) end
return 1
""")

# KEYS: vol, pending, settled, reply ; ARGV: session, object keys... ('*' alone: every
# registration of the session, at unmount)
SETTLE = _mutation(r"""
local now = now_ms()
if ARGV[2] == '*' then
  local suffix = ' ' .. ARGV[1]
  local flat = redis.call('HGETALL', KEYS[2])
  for i = 1, #flat, 2 do
    local f = flat[i]
    if string.sub(f, -#suffix) == suffix then
      redis.call('HDEL', KEYS[2], f)
      redis.call('HSET', KEYS[3], string.sub(f, 1, #f - #suffix), now)
    end
  end
  return 1
end
for i = 2, #ARGV do settle(KEYS[2], KEYS[3], ARGV[1], ARGV[i], now) end
return 1
""")

# KEYS: sessions ; ARGV: session, grace (ms)  ->  1 if the session is dead (now or before)
# GC declares a session dead when it has not been renewed for its expiry plus ``grace``
# (or never registered); atomic with HEARTBEAT/REGISTER/COMMIT, which refuse dead ones,
# so what a dead session registered can be dropped afterwards without racing its commit.
TOMBSTONE = lua(PRELUDE + r"""
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v and string.sub(v, 1, 5) == 'dead:' then return 1 end
local now = now_ms()
if v and tonumber(v) + tonumber(ARGV[2]) > now then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], 'dead:' .. I(now))
return 1
""")

# KEYS: doomed, gc state ; ARGV: object key  ->  {GC generation, 1 if GC is deleting the key}
DOOMED = lua(PRELUDE + r"""
local st = redis.call('HMGET', KEYS[2], G.gen, G.lease)
local doomed = 0
if tonumber(st[2] or '0') > now_ms() and redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then
  doomed = 1
end
return {st[1] or '0', doomed}
""")
