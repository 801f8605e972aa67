"""The Lua scripts of the Redis store: each state change is one script, so one atomic round trip.

A record is one hash at ``{namespace}:{<digest>}``. Field names are short and empty fields are never written: a store
keeps millions of records, and a small hash stays in Redis' compact listpack encoding.

==========  ==================  ==========  ====================================
field       meaning             field       meaning
==========  ==================  ==========  ====================================
``id``      id after the digest ``a``       attempts
``s``       scope               ``tok``     fencing token
``k``       key                 ``lo``      lease owner
``t``       task name           ``le``      lease expiry
``f``       fingerprint         ``c/u/x``   created / updated / expires
``st``      status p/r/s/f      ``np``      present while the message awaits publishing
``r``       result JSON         ``et/em``   error type / message (``em`` absent when empty)
``p``       the call (payload)  ``cr``      crashes (absent while none)
==========  ==================  ==========  ====================================

Redis keeps a hash as a listpack (one small allocation) only while every value is at most
``hash-max-listpack-value`` bytes (64 by default); one longer value turns the whole record into a hash table of
separately allocated entries, two to three times the size. So the values that can be long (``r``, ``p``, ``em``) are
cut into pieces of at most :data:`CHUNK` bytes, stored as ``r``, ``r2``, ``r3``… and joined on every read. Cuts fall
between UTF-8 characters, since redis-py decodes each value on its own. A key, scope or task name over 64 bytes still
makes the record a hash table, as do more than 128 fields (``hash-max-listpack-entries``: a result of about 7 KB, whose
own size then dominates); that costs memory, nothing else.

An operation id is the record's digest followed by 24 random hex characters; the digest is already in the key, so
``id`` holds only the rest (32 bytes less per record: enough to keep a typical record in a smaller allocation).
The scripts take and return that rest; :mod:`idemtasks.stores.redis` joins the two.

Times are integer microseconds since the epoch: a listpack stores an integer in 9 bytes instead of a 17-character
decimal, and integers compare exactly. They come from the server's ``TIME``, so leases do not depend on the clocks
of the machines that hold them. Expiry is kept both in ``x`` (checked by the scripts, so an expired record is absent
even while Redis still keeps it) and as the key's own expiry, ten minutes later (so nothing has to purge).
Arguments stay in seconds (what the Python side has); the scripts convert.

Recovery needs the operations that are pending, or running under a dead lease, without scanning the keyspace: two
sorted sets per namespace, ``{namespace}:pending`` and ``{namespace}:running``, hold the digests of the records in
that status. The scripts keep membership exact on every change of status; scores (time of the last change, lease
expiry) are only a lower bound, since renewing a lease or publishing does not touch the index: :data:`STALE` checks
each record and moves a member that is not yet stale to its true score. These keys are outside the records' hash
slots: on Redis Cluster (``RedisStore(cluster=True)``) the scripts are given only the record's key, keep no index,
and recovery scans the records instead.

redis-py resends a command whose reply was lost (timeout, dropped connection). A create or a claim resent that way
recognises its own earlier effect and answers as the first run did: a create finds its own fresh id (otherwise the
caller would take its own submission for somebody else's and never publish it), a claim its own owner on a live
lease (otherwise it would report itself busy). A finish stays strict, as the contract wants: a repeated one is refused.
"""

from __future__ import annotations

from .base import DUE_SLACK

__all__ = ["ABANDON", "ATTACH_PAYLOAD", "CHUNK", "CLAIM", "CREATE", "FINISH", "GET", "MARK_PUBLISHED", "RENEW",
           "REQUEUE", "STALE"]

#: The longest piece of a long value (Redis' default ``hash-max-listpack-value``).
CHUNK = 64

_DUE_SLACK_US = round(DUE_SLACK * 1_000_000)

# An expired record is absent to every script at once (``x``), but Redis keeps the key ten minutes longer
# (``KEEP_MS``): a claim that re-creates it then continues its fencing token, so no holder of the old record can
# share a token with the new one.
# The server clock in microseconds. Helpers are written out inline rather than as Lua functions: a closure per call
# is measurable next to the few microseconds a script costs. Numbers leave a script as text made by ``%d``, which
# Lua 5.1 formats as a C long: exact for these whole numbers (``tostring`` would round to 14 digits), and several
# times cheaper than ``%.0f``, which glibc prints through multi-precision arithmetic. A number handed to redis.call
# as it is would be printed with ``%.17g`` by the server: that is why PEXPIREAT and ZADD get text too. Callgrind on
# the server counted the claim at 188k instructions with ``%.0f`` and 166k with ``%d``.
# A key expires one millisecond after ``x`` rather than before it.
# The digest, the index's member, is what the record's key ends with: '{namespace}:{<32 hex>}'.
_CLOCK = """
local KEEP_MS = 600000
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local k = KEYS[1]
local d = string.sub(k, -33, -2)
"""


def _put_chunked(table: str, field: str, value: str) -> str:
    """Lua appending ``value`` to the field list ``table`` as ``field``, ``field2``, … of at most CHUNK bytes each.
    A cut that would fall inside a UTF-8 character (a continuation byte follows) moves back to its first byte."""
    return f"""
do
  local v, i, n = {value}, 1, 1
  while i <= #v do
    local e = i + {CHUNK - 1}
    while e < #v and string.byte(v, e + 1) >= 128 and string.byte(v, e + 1) < 192 do e = e - 1 end
    {table}[#{table} + 1] = n == 1 and '{field}' or '{field}' .. n
    {table}[#{table} + 1] = string.sub(v, i, e)
    i, n = e + 1, n + 1
  end
end
"""


def _hset_all(key: str, table: str) -> str:
    """Lua setting the field list ``table`` on ``key``. Lua's ``unpack`` gives at most about 8,000 values (its C
    stack), so a list of a long value's pieces (a 1 MiB result is 16,384 pieces, twice as many values) is set in
    batches, an even number of values each so that every batch starts with a field. One ``HSET`` when it fits."""
    return f"""
if #{table} <= {_UNPACK_BATCH} then redis.call('HSET', {key}, unpack({table})) else
  for i = 1, #{table}, {_UNPACK_BATCH} do
    redis.call('HSET', {key}, unpack({table}, i, math.min(i + {_UNPACK_BATCH - 1}, #{table})))
  end
end
"""


#: Values per ``HSET`` of a long list: even, and under Lua 5.1's limit of 8,000 (LUAI_MAXCSTACK).
_UNPACK_BATCH = 7000


# KEYS: record, pending index. ARGV: id, scope, key, task, fingerprint, ttl, payload ('' for none), delay (seconds
# until the message is due, which 'u' and the pending index's score are set ahead by)
#   ->  {'N', created, expires, updated}: created now (the caller knows the rest of the record)
#   ->  {'n' (created by an earlier run of this same call) | 'e' (existing), record}
# (Without index keys — Redis Cluster — the index is not kept and recovery scans instead.)
CREATE = _CLOCK + """
local h = redis.call('HGETALL', k)
if #h > 0 then
  local rec = {}
  for i = 1, #h, 2 do rec[h[i]] = h[i + 1] end
  if (tonumber(rec.x) or 0) > now then return {rec.id == ARGV[1] and 'n' or 'e', h} end
  redis.call('DEL', k)
end
local x = now + math.floor(ARGV[6] * 1000000 + 0.5)
local c, xs = string.format('%d', now), string.format('%d', x)
local u = string.format('%d', now + math.floor(ARGV[8] * 1000000 + 0.5))
local rec = {'id', ARGV[1], 's', ARGV[2], 'k', ARGV[3], 't', ARGV[4], 'f', ARGV[5], 'st', 'p', 'a', '0', 'tok', '0',
             'c', c, 'u', u, 'x', xs, 'np', '1'}
if ARGV[7] and ARGV[7] ~= '' then""" + _put_chunked("rec", "p", "ARGV[7]") + """end
""" + _hset_all("k", "rec") + """
redis.call('PEXPIREAT', k, string.format('%d', math.floor(x / 1000) + KEEP_MS))
if KEYS[2] then redis.call('ZADD', KEYS[2], u, d) end
return {'N', c, xs, u}
"""

# KEYS: record, pending index, running index. ARGV: id, scope, key, task, fingerprint, owner, lease, ttl, payload,
# grace (seconds)
#   ->  {'c', id, task, created, attempts, token, lease expiry, updated, expires, payload, crashes}: claimed (the
#       caller knows the rest)
#   ->  {'b' | 'd' | 'm', record}: busy (held, suspected, or pending and not due yet), done, mismatch
# A lapsed lease is taken in two phases with REQUEUE's mark (u >= le; see Store.claim): the first claim marks it and
# answers busy, and only a mark at least ``grace`` old with no renewal since lets a claim win; taking it over counts
# its holder's death in 'cr'.
CLAIM = _CLOCK + """
local r = redis.call('HMGET', k, 'x', 'f', 'st', 'le', 'lo', 'id', 't', 'c', 'a', 'tok', 'u', 'np', 'p', 'p2', 'cr')
local w
if (tonumber(r[1]) or 0) > now then
  if r[2] ~= ARGV[5] then return {'m', redis.call('HGETALL', k)} end
  if r[3] == 's' or r[3] == 'f' then return {'d', redis.call('HGETALL', k)} end
  -- pending but not due (a retry's countdown, a scheduled submit): busy until DUE_SLACK before its time
  if r[3] == 'p' and (tonumber(r[11]) or 0) > now + """ + str(_DUE_SLACK_US) + """ then
    return {'b', redis.call('HGETALL', k)}
  end
  -- A long payload's other pieces: only a claim answers the payload (a replay answers the whole record).
  if r[14] then
    local parts, i = {r[13], r[14]}, 3
    while true do
      local piece = redis.call('HGET', k, 'p' .. i)
      if not piece then break end
      parts[i], i = piece, i + 1
    end
    r[13] = table.concat(parts)
  end
  if r[3] == 'r' then
    local le = tonumber(r[4]) or 0
    if le > now then
      if r[5] == ARGV[6] then
        -- This claim sent again, its answer lost: it landed. Its lease starts again from now, as a claim's does:
        -- what was left of it may end before the holder's first renewal (see decide_claim).
        local le2 = string.format('%d', now + math.floor(ARGV[7] * 1000000 + 0.5))
        local x2 = now + math.floor(ARGV[8] * 1000000 + 0.5)
        redis.call('HSET', k, 'le', le2, 'x', string.format('%d', x2))
        redis.call('PEXPIREAT', k, string.format('%d', math.floor(x2 / 1000) + KEEP_MS))
        if KEYS[3] then redis.call('ZADD', KEYS[3], le2, d) end
        return {'c', r[6], r[7], r[8], r[9], r[10], le2, r[11], string.format('%d', x2), r[13], r[15] or '0'}
      end
      return {'b', redis.call('HGETALL', k)}
    end
    local marked = tonumber(r[11]) or 0
    if marked < le then
      redis.call('HSET', k, 'u', string.format('%d', now))
      return {'b', redis.call('HGETALL', k)}
    end
    if marked > now - math.floor(ARGV[10] * 1000000 + 0.5) then return {'b', redis.call('HGETALL', k)} end
  end
  -- pending, or running under a lease that lapsed and stayed unrenewed through the grace: take it with the next
  -- fencing token
  if r[12] then redis.call('HDEL', k, 'np') end
  w = {}
  if r[3] == 'r' then
    r[15] = string.format('%d', (tonumber(r[15]) or 0) + 1)
    w[1], w[2] = 'cr', r[15]
  elseif r[15] and r[9] == '0' then
    -- never claimed, so no deaths: left by a release that predates the count (see decide_claim)
    redis.call('HDEL', k, 'cr')
    r[15] = false
  end
else
  -- absent or expired: a message whose record is gone, or a task sent without submit
  if r[1] then redis.call('DEL', k) end
  -- An expired record's token carries on: a holder of the old record can never share a token with the new one.
  r[6], r[7], r[8], r[9], r[10], r[13] = ARGV[1], ARGV[4], string.format('%d', now), 0, tonumber(r[10]) or 0, false
  r[15] = false
  w = {'id', ARGV[1], 's', ARGV[2], 'k', ARGV[3], 't', ARGV[4], 'f', ARGV[5], 'c', r[8]}
  if ARGV[9] ~= '' then
    r[13] = ARGV[9]""" + _put_chunked("w", "p", "ARGV[9]") + """  end
end
local x = now + math.floor(ARGV[8] * 1000000 + 0.5)
local lease = now + math.floor(ARGV[7] * 1000000 + 0.5)
local a, tok = string.format('%d', r[9] + 1), string.format('%d', r[10] + 1)
local le, u, xs = string.format('%d', lease), string.format('%d', now), string.format('%d', x)
local n = #w
w[n + 1], w[n + 2], w[n + 3], w[n + 4], w[n + 5], w[n + 6], w[n + 7] = 'st', 'r', 'a', a, 'tok', tok, 'lo'
w[n + 8], w[n + 9], w[n + 10], w[n + 11], w[n + 12], w[n + 13], w[n + 14] = ARGV[6], 'le', le, 'u', u, 'x', xs
""" + _hset_all("k", "w") + """
redis.call('PEXPIREAT', k, string.format('%d', math.floor(x / 1000) + KEEP_MS))
if KEYS[2] then redis.call('ZREM', KEYS[2], d) end
if KEYS[3] then redis.call('ZADD', KEYS[3], le, d) end
return {'c', r[6], r[7], r[8], a, tok, le, u, xs, r[13], r[15] or '0'}
"""

# KEYS: record, pending index, running index.
# ARGV: id, token, status (s/f/p), result ('' for none), error type, error message, ttl, delay (a release: seconds
# until the retry is due, which ``u`` and the pending index's score are set ahead by), crashed ('1': a release by a
# holder going away mid-body, counted in 'cr' if the record is still running), payload (a release: the call that
# replaces the stored one; '' keeps it)  ->  1 | 0
# Running under the token, or pending with it still (given back by REQUEUE, and not claimed since: its holder may
# still complete it; see _finish in stores.base).
FINISH = _CLOCK + """
local rec = redis.call('HMGET', k, 'id', 'st', 'tok', 'x', 'np')
if rec[1] ~= ARGV[1] or (rec[2] ~= 'r' and rec[2] ~= 'p') or rec[3] ~= ARGV[2] or (tonumber(rec[4]) or 0) <= now then
  return 0
end
local st = ARGV[3]
local x = now + math.floor(ARGV[7] * 1000000 + 0.5)
local u = string.format('%d', now)
if st == 'p' and ARGV[8] then u = string.format('%d', now + math.floor(ARGV[8] * 1000000 + 0.5)) end
local w = {'st', st, 'u', u, 'x', string.format('%d', x)}
if st == 's' and ARGV[4] ~= '' then""" + _put_chunked("w", "r", "ARGV[4]") + """end
if st == 'f' then
  w[7], w[8] = 'et', ARGV[5]
  if ARGV[6] ~= '' then""" + _put_chunked("w", "em", "ARGV[6]") + """  end
end
if st == 'p' and ARGV[10] and ARGV[10] ~= '' then
  -- a new call replaces every piece of the old one: a shorter call must not end with the old one's tail
  -- (one HDEL each: a 1 MiB call has more pieces than unpack can give one command)
  local i = 2
  redis.call('HDEL', k, 'p')
  while redis.call('HDEL', k, 'p' .. i) == 1 do i = i + 1 end""" + _put_chunked("w", "p", "ARGV[10]") + """end
""" + _hset_all("k", "w") + """
-- a final record has no message left to publish (one failed before any claim kept the flag)
if st ~= 'p' and rec[5] then redis.call('HDEL', k, 'lo', 'le', 'np') else redis.call('HDEL', k, 'lo', 'le') end
if st == 'p' and ARGV[9] == '1' and rec[2] == 'r' then redis.call('HINCRBY', k, 'cr', 1) end
redis.call('PEXPIREAT', k, string.format('%d', math.floor(x / 1000) + KEEP_MS))
if KEYS[3] then redis.call('ZREM', KEYS[3], d) end
if st == 'p' and KEYS[2] then redis.call('ZADD', KEYS[2], u, d) end
if st ~= 'p' and rec[2] == 'p' and KEYS[2] then redis.call('ZREM', KEYS[2], d) end
return 1
"""

# KEYS: record. ARGV: id, token, lease, ttl  ->  1 | 0
RENEW = _CLOCK + """
local rec = redis.call('HMGET', k, 'id', 'st', 'tok', 'x')
local x = tonumber(rec[4]) or 0
if rec[1] ~= ARGV[1] or rec[2] ~= 'r' or rec[3] ~= ARGV[2] or x <= now then return 0 end
local le = string.format('%d', now + math.floor(ARGV[3] * 1000000 + 0.5))
local want = now + math.floor(ARGV[4] * 1000000 + 0.5)
if want > x then
  redis.call('HSET', k, 'le', le, 'x', string.format('%d', want))
  redis.call('PEXPIREAT', k, string.format('%d', math.floor(want / 1000) + KEEP_MS))
else
  redis.call('HSET', k, 'le', le)
end
return 1
"""

# KEYS: record. ARGV: id, token, delay (seconds until the message is due, which 'u' is set ahead by), backoff
# (recovery's copies: seconds after that before recovery may publish it again, kept in a pending record's 'le'; 0
# leaves 'le' alone)  ->  1
# The pending index keeps its score: STALE moves a member whose 'u' turns out later than the score to its true place.
# Only while the token is the publisher's: a claim since (a late mark) may have given the record back with a later
# due time, which the mark must not undo.
MARK_PUBLISHED = _CLOCK + """
local rec = redis.call('HMGET', k, 'id', 'st', 'x', 'tok')
if rec[1] == ARGV[1] and rec[2] == 'p' and (tonumber(rec[3]) or 0) > now and rec[4] == ARGV[2] then
  local u = now + math.floor(ARGV[3] * 1000000 + 0.5)
  redis.call('HSET', k, 'u', string.format('%d', u))
  local backoff = math.floor((tonumber(ARGV[4]) or 0) * 1000000 + 0.5)
  if backoff > 0 then redis.call('HSET', k, 'le', string.format('%d', u + backoff)) end
  redis.call('HDEL', k, 'np')
end
return 1
"""

# KEYS: record  ->  the record's fields and values, or {} if it is absent or expired.
# Expired by the server's clock, as every other script judges it: the key outlives its expiry by KEEP_MS, and a
# reader's own clock, ahead or behind, would show a live record as gone or an expired one as live for as long.
GET = """
local t = redis.call('TIME')
local x = tonumber(redis.call('HGET', KEYS[1], 'x'))
if not x or x <= t[1] * 1000000 + t[2] then return {} end
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: record. ARGV: id, token, payload  ->  1 | 0
# Only a live record: an expired one is absent, and a claim re-creating it must not inherit another call.
ATTACH_PAYLOAD = _CLOCK + """
local rec = redis.call('HMGET', k, 'id', 'tok', 'x', 'p')
if rec[1] ~= ARGV[1] or rec[2] ~= ARGV[2] or (tonumber(rec[3]) or 0) <= now or rec[4] then return 0 end
local w = {}""" + _put_chunked("w", "p", "ARGV[3]") + _hset_all("k", "w") + """
return 1
"""

# KEYS: record, pending index. ARGV: id, within (seconds)  ->  1
# Only while still flagged unpublished ('np'): a duplicate's submit or recovery that published it since has a message
# on the broker. And only within 'within' of its creation, on this clock: past ACCEPT_WINDOW a duplicate may publish
# it and answer its client with its id before its mark lands, and this delete may arrive later than it was decided.
ABANDON = _CLOCK + """
local rec = redis.call('HMGET', k, 'id', 'st', 'a', 'np', 'c')
if rec[1] == ARGV[1] and rec[2] == 'p' and rec[3] == '0' and rec[4]
   and (tonumber(rec[5]) or 0) > now - math.floor(ARGV[2] * 1000000 + 0.5) then
  redis.call('DEL', k)
  if KEYS[2] then redis.call('ZREM', KEYS[2], d) end
end
return 1
"""

# KEYS: record, pending index, running index. ARGV: id, token, confirm_after (seconds)
#   ->  1 requeued | 2 suspected (marked now, or marked less than confirm_after ago) | 0 alive
# Two-phase takeover (see Store.requeue): a running record's 'u' is set by the claim and left alone by RENEW, so
# u < le until a first call marks it with u = now (>= the lapsed le); a renewal then sets le above u again, which
# cancels the mark. Only a mark at least confirm_after old, with no renewal since, gives the operation back.
# Marking leaves 'le' and the running index alone: STALE keeps returning the record, so a later sweep can confirm.
REQUEUE = _CLOCK + """
local rec = redis.call('HMGET', k, 'id', 'st', 'tok', 'x', 'le', 'u')
local le = tonumber(rec[5]) or 0
if rec[1] ~= ARGV[1] or rec[2] ~= 'r' or rec[3] ~= ARGV[2] or (tonumber(rec[4]) or 0) <= now
   or le > now then return 0 end
local marked = tonumber(rec[6]) or 0
if marked < le then
  redis.call('HSET', k, 'u', string.format('%d', now))
  return 2
end
if marked > now - math.floor(ARGV[3] * 1000000 + 0.5) then return 2 end
local u = string.format('%d', now)
redis.call('HSET', k, 'st', 'p', 'u', u)
redis.call('HDEL', k, 'lo', 'le')
redis.call('HINCRBY', k, 'cr', 1)  -- its holder died: one crash
if KEYS[3] then redis.call('ZREM', KEYS[3], d) end
if KEYS[2] then redis.call('ZADD', KEYS[2], u, d) end
return 1
"""

#: The pieces of a call the sweep script answers with its record (16: 1 KiB), and the piece that says a call is longer
#: and read on its own (see STALE).
_STALE_CALL_PIECES = ["p", *(f"p{n}" for n in range(2, 17))]
_LONG_CALL = "p17"
_STALE_FIELDS = ", ".join(f"'{field}'" for field in [*_STALE_CALL_PIECES, _LONG_CALL])

# KEYS: pending index, running index. ARGV: record key prefix ('{namespace}:{'), pending_after, limit
#   ->  {record, record, ...}: up to ``limit`` stale records of each kind (the caller merges and cuts)
# Reads records by names built here rather than passed in KEYS: their digests are what the index holds. Each member
# looked at is returned, moved to its true score, or dropped (record gone, expired or in another status), so the
# next range read starts after what was returned; the work per call is bounded even if the index has much to shed.
# A running record is scored by its lease expiry 'le', which REQUEUE's mark leaves alone: a suspected record stays
# due here until a renewal moves its lease on (then it is re-scored) or a later sweep confirms and requeues it. A
# pending record's 'le' is the back-off of recovery's last copy (see MARK_PUBLISHED): it is due at the later of 'u'
# plus pending_after and 'le', so scored at the later of 'u' and 'le' less pending_after. That score follows this
# caller's pending_after: a sweeper with a longer one (another app sharing the namespace) finds the record later by
# the difference, and an older sweeper, which ignores 'le', once its back-off is over. Late, never lost.
# Only the fields recovery reads are read (HMGET), and a call longer than 16 pieces (1 KiB) is left out, marked 'p+':
# a few hundred stale records with calls near the size limit would otherwise be read whole within this one script,
# and the server would answer nobody else for seconds. The caller reads each of those records by itself.
STALE = f"""
local FIELDS = {{'id', 's', 'k', 't', 'f', 'st', 'a', 'tok', 'lo', 'le', 'c', 'u', 'x', 'np', 'cr', {_STALE_FIELDS}}}
local LONG = '{_LONG_CALL}'""" + """
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local prefix, limit = ARGV[1], tonumber(ARGV[3])
local after = math.floor(ARGV[2] * 1000000 + 0.5)
local out = {}
local function sweep(idx, status, max, field)
  local found, budget = 0, 4 * limit + 100
  while found < limit and budget > 0 do
    local batch = redis.call('ZRANGEBYSCORE', idx, '-inf', max, 'LIMIT', found, limit - found)
    if #batch == 0 then break end
    budget = budget - #batch
    for _, d in ipairs(batch) do
      local v = redis.call('HMGET', prefix .. d .. '}', unpack(FIELDS))
      local rec = {}
      for i, f in ipairs(FIELDS) do rec[f] = v[i] end
      local at = tonumber(rec[field])
      if at and status == 'p' and rec.le then at = math.max(at, tonumber(rec.le) - after) end
      if rec.st ~= status or (tonumber(rec.x) or 0) <= now or not at then
        redis.call('ZREM', idx, d)
      elseif at > max then
        redis.call('ZADD', idx, at, d)
      else
        found = found + 1
        local h = {'d', d}  -- the id's head, which the record itself does not hold
        for i, f in ipairs(FIELDS) do
          if rec[f] and f ~= LONG and not (rec[LONG] and string.sub(f, 1, 1) == 'p') then
            h[#h + 1] = f; h[#h + 1] = rec[f]
          end
        end
        if rec[LONG] then h[#h + 1] = 'p+'; h[#h + 1] = '1' end
        out[#out + 1] = h
      end
    end
  end
end
sweep(KEYS[1], 'p', now - after, 'u')
sweep(KEYS[2], 'r', now, 'le')
return out
"""
