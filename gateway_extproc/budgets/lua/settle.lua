-- Settle a reservation to its actual cost, once: charge (actual - reserved) at every limit,
-- return unused tokens to the token buckets and add the actual tokens to the tallies
-- (saturating: common.lua, tally). A
-- reservation that expired unsettled (charged at its worst case) is corrected the same
-- way, without a token refund (its bucket has refilled since). Anything else (settled
-- before, unknown, forgotten) is a no-op, so a retried settle never charges twice; the id
-- is then remembered as settled (keep_ms), so that a reserve arriving after its own cancel
-- is refused rather than held.
-- KEYS: 1-F see common.lua, then n_lim limit counters, n_bkt token bucket hashes, tallies.
-- ARGV: id, actual_cost, actual_tokens, now_ms, n_lim, n_bkt, then ttl_s per limit,
--       then capacity, refill_per_s per token bucket, then ttl_s per tally, then keep_ms.
-- Returns 1 settled, 2 settled after expiry (late), 0 nothing to settle.
local id, now, n_lim, n_bkt = ARGV[1], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local outcome = 1
local raw = redis.call('HGET', KEYS[1], id)
if raw then
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
else
  raw = redis.call('HGET', KEYS[3], id)
  if not raw then
    redis.call('ZADD', KEYS[5], int(now), id)
    redis.call('PEXPIRE', KEYS[5], ARGV[#ARGV])
    return 0
  end
  outcome = 2
  redis.call('HDEL', KEYS[3], id)
  redis.call('ZREM', KEYS[4], id)
end
local rec = cjson.decode(raw)
local delta = tonumber(ARGV[2]) - tonumber(rec.r)
local refund = 0
if outcome == 1 then refund = tonumber(rec.t) - tonumber(ARGV[3]) end
for i = 1, n_lim do charge(KEYS[F + i], delta, ARGV[6 + i]) end
local bkt_arg = 6 + n_lim
if refund ~= 0 then
  for j = 1, n_bkt do
    local key = KEYS[F + n_lim + j]
    local cap, rate = tonumber(ARGV[bkt_arg + 2 * j - 1]), tonumber(ARGV[bkt_arg + 2 * j])
    local v, ts = level(key, cap, rate, now)
    put_bucket(key, math.max(0, v + refund), cap, rate, now, ts)
  end
end
local tally_arg = bkt_arg + 2 * n_bkt
for k = 1, #KEYS - F - n_lim - n_bkt do
  tally(KEYS[F + n_lim + n_bkt + k], tonumber(ARGV[3]), ARGV[tally_arg + k])
end
return outcome
