-- Reserve a request's worst-case cost at every limit and its tokens at every bucket, or
-- change nothing. The decision mirrors store.decide(); keep the two in step. Reserving an
-- id that is already held (a retry whose first reply was lost) answers with the held
-- grant and changes nothing; reserving an id already settled (its cancel overtook it)
-- changes nothing and is refused with index -2.
-- KEYS: 1-F see common.lua, then n_lim limit counters, then bucket hashes (token, request).
-- ARGV: id, now_ms, expires_ms, prompt_tokens, prompt_cost, output_price, wanted, min_output,
--       n_lim, n_token_buckets, expire_batch, expired_keep_ms,
--       then limit_nano, ttl_s per limit, then capacity, refill_per_s per bucket.
-- Returns {grant, refused index (0-based over limits then buckets, -1 if admitted),
--          used per limit, level per bucket, reservations expired by this call} with
--          balances after the decision.
local id, now = ARGV[1], tonumber(ARGV[2])
local prompt_tokens, prompt_cost, price = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local grant, min_out = tonumber(ARGV[7]), tonumber(ARGV[8])
local n_lim, n_tok = tonumber(ARGV[9]), tonumber(ARGV[10])
local n_bkt = #KEYS - F - n_lim
local lim_arg, bkt_arg = 12, 12 + 2 * n_lim

local expired = expire_due(now, ARGV[11], tonumber(ARGV[12]))

local used, headroom, tightest = {}, nil, -1
for i = 1, n_lim do
  used[i] = tonumber(redis.call('GET', KEYS[F + i]) or '0')
  local h = tonumber(ARGV[lim_arg + 2 * i - 1]) - used[i]
  if headroom == nil or h < headroom then headroom, tightest = h, i - 1 end
end
local levels, stamps = {}, {}
for j = 1, n_bkt do
  levels[j], stamps[j] = level(KEYS[F + n_lim + j], tonumber(ARGV[bkt_arg + 2 * j - 1]),
                               tonumber(ARGV[bkt_arg + 2 * j]), now)
end

local held = redis.call('HGET', KEYS[1], id)
if held then
  return {tonumber(cjson.decode(held).g), -1, strings(used, '%.0f'), strings(levels, '%.17g'), expired}
end

if redis.call('ZSCORE', KEYS[5], id) then
  return {0, -2, strings(used, '%.0f'), strings(levels, '%.17g'), expired}
end

local refused = -1
if headroom ~= nil then
  local spare = headroom - prompt_cost
  if spare < grant * price then
    local g = -1
    if price > 0 then
      g = math.floor(spare / price)
      -- Division is in doubles; make g exactly floor(spare / price).
      if g * price > spare then g = g - 1 elseif (g + 1) * price <= spare then g = g + 1 end
    end
    if price == 0 or g < min_out then refused = tightest else grant = g end
  end
end
if refused < 0 then
  for j = 1, n_bkt do
    local need = 1
    if j <= n_tok then need = prompt_tokens + min_out end
    if levels[j] < need then refused = n_lim + j - 1 break end
    if j <= n_tok then grant = math.min(grant, math.floor(levels[j] - prompt_tokens)) end
  end
end

if refused < 0 then
  local reserved, keys = prompt_cost + grant * price, {}
  for i = 1, n_lim do
    charge(KEYS[F + i], reserved, ARGV[lim_arg + 2 * i])
    used[i] = used[i] + reserved
    keys[i] = KEYS[F + i]
  end
  for j = 1, n_bkt do
    if j <= n_tok then levels[j] = levels[j] - prompt_tokens - grant else levels[j] = levels[j] - 1 end
    put_bucket(KEYS[F + n_lim + j], levels[j], tonumber(ARGV[bkt_arg + 2 * j - 1]),
               tonumber(ARGV[bkt_arg + 2 * j]), now, stamps[j])
  end
  redis.call('HSET', KEYS[1], id, cjson.encode({r = int(reserved), t = int(prompt_tokens + grant), g = int(grant),
                                                l = keys}))
  redis.call('ZADD', KEYS[2], ARGV[3], id)
else
  grant = 0
end
return {grant, refused, strings(used, '%.0f'), strings(levels, '%.17g'), expired}
