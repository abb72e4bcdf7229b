-- One batch of an edge's hourly usage rows, added to the fleet's ledger
-- once: an edge that got no answer sends the same batch (same id) again,
-- and a batch already applied is skipped, so a write that timed out after
-- the store applied it is not counted twice.
--
-- KEYS[1] the batch's marker; KEYS[2..] the hours' hashes
-- ARGV: 1 marker ttl s, 2 hash ttl s, then triplets
-- (index into KEYS, field, amount)
-- Returns 1 when applied, 0 when it had been already.
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[1])) then
  return 0
end
for i = 3, #ARGV, 3 do
  redis.call('HINCRBY', KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2])
end
for k = 2, #KEYS do
  redis.call('EXPIRE', KEYS[k], tonumber(ARGV[2]))
end
return 1
