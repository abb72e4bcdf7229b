-- One slot of an upstream (its max_in_flight across all edges): leases
-- whose expiry passed are dropped first, so a crashed edge's come back.
--
-- KEYS[1] the upstream's leases (zset: lease id -> expiry ms)
-- ARGV: 1 max_in_flight, 2 lease id, 3 lease ttl ms
-- Returns 1 with the lease taken, 0 when every slot is held.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return 1
