-- Settle a reservation to its actual cost: charge (actual - reserved) at every limit,
-- return unused tokens to the token buckets and add the actual tokens to the tallies. A
-- reservation already released by expiry is charged its actual cost in full. Anything else
-- (settled before, unknown) is a no-op.
-- KEYS: 1-3 see common.lua, then n_lim limit counters, n_bkt token bucket hashes, tallies.
-- ARGV: id, actual_cost, actual_tokens, now_ms, n_lim, n_bkt, then ttl_s per limit,
--       then capacity, refill_per_s per token bucket, then ttl_s per tally.
local id, now, n_lim, n_bkt = ARGV[1], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local delta, refund
local raw = redis.call('HGET', KEYS[1], id)
if raw then
  local rec = cjson.decode(raw)
  delta, refund = tonumber(ARGV[2]) - tonumber(rec.r), tonumber(rec.t) - tonumber(ARGV[3])
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
elseif redis.call('ZREM', KEYS[3], id) == 1 then
  delta, refund = tonumber(ARGV[2]), 0
else
  return 0
end
for i = 1, n_lim do charge(KEYS[3 + i], delta, ARGV[6 + i]) end
local bkt_arg = 6 + n_lim
if refund ~= 0 then
  for j = 1, n_bkt do
    local key = KEYS[3 + n_lim + j]
    local cap, rate = tonumber(ARGV[bkt_arg + 2 * j - 1]), tonumber(ARGV[bkt_arg + 2 * j])
    local v, ts = level(key, cap, rate, now)
    put_bucket(key, math.max(0, v + refund), cap, rate, now, ts)
  end
end
local tally_arg = bkt_arg + 2 * n_bkt
for k = 1, #KEYS - 3 - n_lim - n_bkt do
  charge(KEYS[3 + n_lim + n_bkt + k], tonumber(ARGV[3]), ARGV[tally_arg + k])
end
return 1
