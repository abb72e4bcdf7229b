-- A request ended: its concurrent-request lease goes, and its token
-- reservation is replaced by what it used (the bucket gets the difference
-- back, or owes it; the quota counters of the reservation's day and month
-- are corrected).
--
-- KEYS[1] concurrent requests (zset), KEYS[2] tokens-per-minute bucket,
-- KEYS[3] the day counter, KEYS[4] the month counter
-- ARGV: 1 lease id, 2 reserved, 3 used, 4 tokens per minute, 5 per day,
-- 6 per month (0: no limit), 7 day counter ttl s, 8 month counter ttl s
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREM', KEYS[1], ARGV[1])
local reserved = tonumber(ARGV[2])
local used = tonumber(ARGV[3])
local tpm = tonumber(ARGV[4])
local diff = reserved - used
if diff == 0 or reserved == 0 then
  return 0
end
if tpm > 0 then
  local h = redis.call('HMGET', KEYS[2], 'b', 't')
  local b = tonumber(h[1]) or tpm
  local ts = tonumber(h[2]) or now
  b = math.min(tpm, b + math.max(0, now - ts) * tpm / 60000 + diff)
  redis.call('HSET', KEYS[2], 'b', tostring(b), 't', now)
  redis.call('PEXPIRE', KEYS[2], 120000)
end
if tonumber(ARGV[5]) > 0 then
  redis.call('DECRBY', KEYS[3], diff)
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[7]))
end
if tonumber(ARGV[6]) > 0 then
  redis.call('DECRBY', KEYS[4], diff)
  redis.call('EXPIRE', KEYS[4], tonumber(ARGV[8]))
end
return 1
