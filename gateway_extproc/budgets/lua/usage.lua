-- Balances as of now_ms, after expiring due reservations (common.lua, expire_due).
-- KEYS: 1-F see common.lua, then n_lim limit counters, then bucket hashes.
-- ARGV: now_ms, expire_batch, expired_keep_ms, n_lim, then capacity, refill_per_s per bucket.
-- Returns {used per limit, level per bucket, reservations expired by this call, held}.
local now, n_lim = tonumber(ARGV[1]), tonumber(ARGV[4])
local expired = expire_due(now, ARGV[2], tonumber(ARGV[3]))
local used, levels = {}, {}
for i = 1, n_lim do used[i] = tonumber(redis.call('GET', KEYS[F + i]) or '0') end
for j = 1, #KEYS - F - n_lim do
  levels[j] = level(KEYS[F + n_lim + j], tonumber(ARGV[3 + 2 * j]), tonumber(ARGV[4 + 2 * j]), now)
end
return {strings(used, '%.0f'), strings(levels, '%.17g'), expired, redis.call('HLEN', KEYS[1])}
