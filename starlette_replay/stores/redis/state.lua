-- A topic's epoch, head, oldest retained offset and (optionally) a page of entries.
-- KEYS: meta, log, idem, idemz
-- ARGV: epoch to create when missing ('' to create nothing), ttl ms, first offset to read, limit
-- Returns {epoch ('' none), head, oldest, entries}.
local meta, log = KEYS[1], KEYS[2]
local m = redis.call('HMGET', meta, 'epoch', 'head')
if not m[1] then
  if ARGV[1] == '' then return {'', 0, 1, {}} end
  redis.call('DEL', log, KEYS[3], KEYS[4])
  redis.call('HSET', meta, 'epoch', ARGV[1], 'head', 0)
  if ARGV[2] ~= '0' then redis.call('PEXPIRE', meta, ARGV[2]) end
  return {ARGV[1], 0, 1, {}}
end
local head = tonumber(m[2])
local oldest = head + 1
local first = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)
if #first > 0 then oldest = tonumber(string.match(first[1][1], '^(%d+)')) end
local entries = {}
if tonumber(ARGV[4]) > 0 then
  entries = redis.call('XRANGE', log, ARGV[3], '+', 'COUNT', ARGV[4])
end
return {m[1], head, oldest, entries}
