-- A server-side cursor: forward-only within an epoch, another epoch replaces it.
-- KEYS: cursor key. ARGV: epoch, offset, ttl ms, time of the event at offset ('' when unknown)
local cur = redis.call('HMGET', KEYS[1], 'e', 'o')
if cur[1] == ARGV[1] and tonumber(cur[2]) >= tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 0
end
redis.call('HSET', KEYS[1], 'e', ARGV[1], 'o', ARGV[2])
if ARGV[4] == '' then
  redis.call('HDEL', KEYS[1], 't')
else
  redis.call('HSET', KEYS[1], 't', ARGV[4])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
