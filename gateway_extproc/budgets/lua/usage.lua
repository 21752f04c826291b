-- Balances as of now_ms, after releasing expired reservations.
-- KEYS: 1-3 see common.lua, then n_lim limit counters, then bucket hashes.
-- ARGV: now_ms, release_batch, released_keep_ms, n_lim, then capacity, refill_per_s per bucket.
-- Returns {used per limit, level per bucket}.
local now, n_lim = tonumber(ARGV[1]), tonumber(ARGV[4])
release_expired(now, ARGV[2], tonumber(ARGV[3]))
local used, levels = {}, {}
for i = 1, n_lim do used[i] = tonumber(redis.call('GET', KEYS[3 + i]) or '0') end
for j = 1, #KEYS - 3 - n_lim do
  levels[j] = level(KEYS[3 + n_lim + j], tonumber(ARGV[3 + 2 * j]), tonumber(ARGV[4 + 2 * j]), now)
end
return {strings(used, '%.0f'), strings(levels, '%.17g')}
