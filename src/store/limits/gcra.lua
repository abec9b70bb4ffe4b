-- GCRA over several keys at once, atomically: the same decisions as the in-process store (gcra.rs).
--
-- ARGV[1]: "1" when KEYS[1] is a ban record to look up first (CreateChatToken): if it exists the script
--   decides nothing, spends nothing and answers the record (a string), so a banned user spends no budget
--   and the ban check costs no round trip of its own. "0": no ban key.
-- KEYS[b+i] (b = 1 with a ban key, else 0): the state of check i, its theoretical arrival time (TAT) in
--   microseconds since the Unix epoch.
-- ARGV[1+3i-2], ARGV[1+3i-1], ARGV[1+3i]: check i's emission interval T and tolerance B*T in microseconds,
--   and "1" when it is a shadow check.
-- Returns one integer per check: 0 when admitted, else the microseconds until it would be.
--
-- Time comes from this Redis server, never from the callers, so replicas with skewed clocks agree.
-- Microseconds since the epoch stay below 2^53, exact in Lua's doubles.
local base = 0
if ARGV[1] == '1' then
  local ban = redis.call('GET', KEYS[1])
  if ban then
    return ban
  end
  base = 1
end
local count = #KEYS - base

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

local function decide(tat, interval, tolerance)
  if tat == nil or tat < now then
    tat = now
  end
  local new_tat = tat + interval
  local ahead = new_tat - now
  if ahead <= tolerance then
    return new_tat, 0
  end
  return nil, ahead - tolerance
end

-- A key lives exactly until it is fully recovered: then it carries no information.
local function store(key, new_tat)
  local ttl_ms = math.ceil((new_tat - now) / 1000)
  redis.call('SET', key, string.format('%d', new_tat), 'PX', string.format('%d', ttl_ms))
end

local verdicts = {}
-- Enforced checks first, all or nothing. A key checked twice in one call counts twice.
local pending = {}
local admitted = {}
local all_admitted = true
for i = 1, count do
  if ARGV[1 + 3 * i] ~= '1' then
    local key = KEYS[base + i]
    local tat = pending[key] or tonumber(redis.call('GET', key))
    local new_tat, wait = decide(tat, tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i]))
    verdicts[i] = wait
    if new_tat then
      pending[key] = new_tat
      admitted[#admitted + 1] = key
    else
      all_admitted = false
    end
  end
end
if all_admitted then
  for _, key in ipairs(admitted) do
    if pending[key] then
      store(key, pending[key])
      pending[key] = nil
    end
  end
end
-- Shadow checks commit on their own and never change the enforced outcome.
for i = 1, count do
  if ARGV[1 + 3 * i] == '1' then
    local key = KEYS[base + i]
    local new_tat, wait = decide(tonumber(redis.call('GET', key)), tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i]))
    verdicts[i] = wait
    if new_tat then
      store(key, new_tat)
    end
  end
end
return verdicts
