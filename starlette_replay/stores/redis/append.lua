-- One or several appends to one topic in one step (concurrent publishes coalesced),
-- each with its own idempotency key. KEYS: meta, log, idem, idemz.
-- ARGV: new epoch, history_size, ttl ms, channel, publish command ('PUBLISH', or 'SPUBLISH' on a
-- cluster: the channel shares the topic's slot), nseg, then per segment: key ('' none), n, type1, raw1, ...
-- Returns {epoch, ms, r1, r2, ...}: r is the segment's first offset, or {entries} for a known key.
local meta, log, idem, idemz = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  redis.call('DEL', log, idem, idemz)
  epoch = ARGV[1]
  redis.call('HSET', meta, 'epoch', epoch, 'head', 0)
end
local now = redis.call('TIME')
local ms = now[1] .. string.format('%03d', math.floor(tonumber(now[2]) / 1000))
local start = tonumber(redis.call('HGET', meta, 'head'))
local head = start
local out = {epoch, ms}
local parts = {}
local keyed = false
local pos = 7
for s = 1, tonumber(ARGV[6]) do
  local key, n = ARGV[pos], tonumber(ARGV[pos + 1])
  local seen = false
  if key ~= '' then
    keyed = true
    seen = redis.call('HGET', idem, key)
  end
  if seen then
    local a, b = string.match(seen, '^(%d+):(%d+)$')
    out[#out + 1] = redis.call('XRANGE', log, a, b)
  else
    -- XADD before the head moves: a script that fails is not rolled back, and only
    -- the first XADD can fail (an id at or below the stream's top), with nothing written yet.
    for i = 1, n do
      local etype, raw = ARGV[pos + 2 * i], ARGV[pos + 1 + 2 * i]
      redis.call('XADD', log, (head + i) .. '-0', 't', etype, 'd', raw, 'ms', ms)
      parts[#parts + 1] = #etype .. ':' .. etype .. #raw .. ':' .. raw
    end
    if key ~= '' then
      redis.call('HSET', idem, key, (head + 1) .. ':' .. (head + n))
      redis.call('ZADD', idemz, head + 1, key)
    end
    out[#out + 1] = head + 1
    head = head + n
  end
  pos = pos + 2 + 2 * n
end
if head == start then return out end
redis.call('HSET', meta, 'head', head)
redis.call('XTRIM', log, 'MAXLEN', ARGV[2])
if keyed or redis.call('EXISTS', idemz) == 1 then
  local first = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)
  local oldest = head + 1
  if #first > 0 then oldest = tonumber(string.match(first[1][1], '^(%d+)')) end
  while true do
    local stale = redis.call('ZRANGEBYSCORE', idemz, '-inf', '(' .. oldest, 'LIMIT', 0, 500)
    if #stale == 0 then break end
    redis.call('HDEL', idem, unpack(stale))
    redis.call('ZREM', idemz, unpack(stale))
  end
end
if ARGV[3] ~= '0' then
  redis.call('PEXPIRE', meta, ARGV[3])
  redis.call('PEXPIRE', log, ARGV[3])
  redis.call('PEXPIRE', idem, ARGV[3])
  redis.call('PEXPIRE', idemz, ARGV[3])
end
local header = epoch .. '|' .. (start + 1) .. '|' .. ms .. '|' .. (head - start) .. '|'
redis.call(ARGV[5], ARGV[4], header .. table.concat(parts))
return out
