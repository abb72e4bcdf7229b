-- One request's per-key limits, checked and taken together (atomic: Redis
-- runs a script alone). Nothing is taken unless everything fits.
--
-- KEYS[1] requests-per-minute bucket (hash b, t)
-- KEYS[2] concurrent requests (zset: lease id -> expiry ms)
-- KEYS[3] tokens-per-minute bucket (hash b, t)
-- KEYS[4] tokens used today (counter, reservations included)
-- KEYS[5] tokens used this month (counter, reservations included)
-- ARGV: 1 rpm, 2 max_concurrent, 3 lease id, 4 lease ttl ms, 5 tokens to
-- reserve, 6 tokens per minute, 7 per day, 8 per month (0: no limit),
-- 9 day counter ttl s, 10 month counter ttl s
--
-- Returns {0, requests left, tokens left} when admitted, else
-- {reason, retry after ms, detail}: 1 concurrency (detail: in flight),
-- 2 requests per minute, 3 tokens per minute (detail: tokens left),
-- 4 day quota, 5 month quota (detail: used).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm = tonumber(ARGV[1])
local maxc = tonumber(ARGV[2])
local ttl = tonumber(ARGV[4])
local tokens = tonumber(ARGV[5])
local tpm = tonumber(ARGV[6])
local per_day = tonumber(ARGV[7])
local per_month = tonumber(ARGV[8])

local function bucket(key, size)
  local h = redis.call('HMGET', key, 'b', 't')
  local b = tonumber(h[1]) or size
  local ts = tonumber(h[2]) or now
  return math.min(size, b + math.max(0, now - ts) * size / 60000)
end

if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  local n = redis.call('ZCARD', KEYS[2])
  if n >= maxc then
    return {1, 1000, n}
  end
end
local rb = 0
if rpm > 0 then
  rb = bucket(KEYS[1], rpm)
  if rb < 1 then
    return {2, math.ceil((1 - rb) * 60000 / rpm), 0}
  end
end
local tb = 0
if tpm > 0 and tokens > 0 then
  tb = bucket(KEYS[3], tpm)
  if tokens > tb then
    local wait = 60000
    if tokens <= tpm then
      wait = math.ceil((tokens - tb) * 60000 / tpm)
    end
    return {3, wait, math.floor(math.max(tb, 0))}
  end
end
if per_day > 0 and tokens > 0 then
  local used = tonumber(redis.call('GET', KEYS[4]) or '0')
  if used + tokens > per_day then
    return {4, 0, used}
  end
end
if per_month > 0 and tokens > 0 then
  local used = tonumber(redis.call('GET', KEYS[5]) or '0')
  if used + tokens > per_month then
    return {5, 0, used}
  end
end

if maxc > 0 then
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ttl * 2)
end
if rpm > 0 then
  rb = rb - 1
  redis.call('HSET', KEYS[1], 'b', tostring(rb), 't', now)
  redis.call('PEXPIRE', KEYS[1], 120000)
end
if tpm > 0 and tokens > 0 then
  tb = tb - tokens
  redis.call('HSET', KEYS[3], 'b', tostring(tb), 't', now)
  redis.call('PEXPIRE', KEYS[3], 120000)
end
if per_day > 0 and tokens > 0 then
  redis.call('INCRBY', KEYS[4], tokens)
  redis.call('EXPIRE', KEYS[4], tonumber(ARGV[9]))
end
if per_month > 0 and tokens > 0 then
  redis.call('INCRBY', KEYS[5], tokens)
  redis.call('EXPIRE', KEYS[5], tonumber(ARGV[10]))
end
return {0, math.floor(rb), math.floor(math.max(tb, 0))}
