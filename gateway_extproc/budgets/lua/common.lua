-- Helpers shared by reserve.lua, settle.lua and usage.lua; redis_store.py prepends this
-- file to each script. KEYS[1..3] of every script are the reservation hash (id -> record),
-- the expiry zset (id scored by expiry ms) and the released zset (id scored by release ms).
-- Every key shares the store's hash tag, so undeclared keys read from records (the limit
-- keys of an expired reservation) live in the same cluster slot as the declared ones.

-- Integers as exact decimal strings: tostring() would print 1e+13, which INCRBY rejects.
local function int(x) return string.format('%.0f', x) end

-- Add to a budget counter; a new counter gets its TTL (window end + a day).
local function charge(key, amount, ttl)
  redis.call('INCRBY', key, int(amount))
  if redis.call('TTL', key) < 0 then redis.call('EXPIRE', key, ttl) end
end

-- A bucket's level after refilling to `now`, and the time its state was last written.
-- No key means a full bucket.
local function level(key, cap, rate, now)
  local s = redis.call('HMGET', key, 'v', 'ts')
  if not s[1] then return cap, now end
  local ts = tonumber(s[2])
  return math.min(cap, tonumber(s[1]) + math.max(0, now - ts) / 1000 * rate), ts
end

-- Store a bucket level. The state expires when the bucket would be full again, and its
-- timestamp never moves backwards when replicas' clocks disagree.
local function put_bucket(key, v, cap, rate, now, ts)
  if v >= cap then redis.call('DEL', key) return end
  local as_of = math.max(now, ts)
  redis.call('HSET', key, 'v', string.format('%.17g', v), 'ts', int(as_of))
  redis.call('PEXPIRE', key, int(as_of - now + math.ceil((cap - v) / rate * 1000)))
end

-- Return the amounts of up to `batch` reservations that expired unsettled (their replica
-- died) to every limit they were reserved at; remember their ids so a late settle can
-- still charge the actual cost.
local function release_expired(now, batch, keep_ms)
  local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', int(now), 'LIMIT', 0, batch)
  for _, id in ipairs(ids) do
    local raw = redis.call('HGET', KEYS[1], id)
    if raw then
      local rec = cjson.decode(raw)
      for _, key in ipairs(rec.l) do
        if redis.call('EXISTS', key) == 1 then redis.call('DECRBY', key, rec.r) end
      end
      redis.call('HDEL', KEYS[1], id)
      redis.call('ZADD', KEYS[3], int(now), id)
    end
    redis.call('ZREM', KEYS[2], id)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', int(now - keep_ms))
  if #ids > 0 then redis.call('PEXPIRE', KEYS[3], int(keep_ms)) end
end

local function strings(xs, fmt)
  local out = {}
  for i, x in ipairs(xs) do out[i] = string.format(fmt, x) end
  return out
end
