-- Helpers shared by reserve.lua, settle.lua and usage.lua; redis_store.py prepends this
-- file to each script. KEYS[1..F] of every script are the fixed reservation keys: held
-- reservations (HASH id -> record), their deadlines (ZSET id by expiry ms), reservations
-- that expired unsettled (HASH id -> record) and when they expired (ZSET id by ms).
-- Every key shares the store's hash tag, so undeclared keys read from records (the limit
-- keys of a reservation) live in the same cluster slot as the declared ones.
local F = 5

-- Integers as exact decimal strings: tostring() would print 1e+13, which INCRBY rejects.
local function int(x) return string.format('%.0f', x) end

-- Add to a budget counter; a new counter gets its TTL (window end + a day).
local function charge(key, amount, ttl)
  redis.call('INCRBY', key, int(amount))
  if redis.call('TTL', key) < 0 then redis.call('EXPIRE', key, ttl) end
end

-- Add tokens to a tally, saturating at 2^53 - 1 (store.MAX_NANO): past it a Lua number is
-- no longer exact, and INCRBY past 2^63 fails, which failed every later settle and read.
local function tally(key, amount, ttl)
  local max = 9007199254740991
  if tonumber(redis.call('GET', key) or '0') + amount >= max then
    redis.call('SET', key, int(max), 'KEEPTTL')
  else
    redis.call('INCRBY', key, int(amount))
  end
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

-- Up to `batch` reservations whose deadline passed unsettled (their replica died, or every
-- settle retry failed) stay charged at their reserved worst case: nothing is returned to
-- the counters. Their records move aside so a late settle can still correct the charge to
-- the actual cost; records older than keep_ms are forgotten. Returns how many expired.
local function expire_due(now, batch, keep_ms)
  local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', int(now), 'LIMIT', 0, batch)
  local n = 0
  for _, id in ipairs(ids) do
    local raw = redis.call('HGET', KEYS[1], id)
    if raw then
      redis.call('HDEL', KEYS[1], id)
      redis.call('HSET', KEYS[3], id, raw)
      redis.call('ZADD', KEYS[4], int(now), id)
      n = n + 1
    end
    redis.call('ZREM', KEYS[2], id)
  end
  local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', int(now - keep_ms), 'LIMIT', 0, batch)
  if #old > 0 then
    redis.call('HDEL', KEYS[3], unpack(old))
    redis.call('ZREM', KEYS[4], unpack(old))
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', int(now - keep_ms))
  if n > 0 then
    redis.call('PEXPIRE', KEYS[3], int(keep_ms))
    redis.call('PEXPIRE', KEYS[4], int(keep_ms))
  end
  return n
end

local function strings(xs, fmt)
  local out = {}
  for i, x in ipairs(xs) do out[i] = string.format(fmt, x) end
  return out
end
