-- Keeps a watched topic's history alive (never brings back a topic that is gone).
-- KEYS: meta, log, idem, idemz. ARGV: ttl ms.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
return 1
