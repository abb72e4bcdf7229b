-- Pushes back the expiry of leases still in use (requests in flight on this
-- edge). A lease already dropped (expired while the store was away) is not
-- brought back: its slot may be someone else's by now.
--
-- KEYS: the zsets, one per lease; ARGV: 1 lease ttl ms, then the lease ids
-- in the order of KEYS. Returns how many were renewed.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local renewed = 0
for i, key in ipairs(KEYS) do
  renewed = renewed + redis.call('ZADD', key, 'XX', 'CH', now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl * 2)
end
return renewed
