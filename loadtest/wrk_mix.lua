-- wrk script for the sweep: rows with a controlled cache-hit ratio, every response counted.
-- The payloads (pool bodies, the pre-drawn choices, templates of fresh rows) are written
-- by loadtest/bench.py into the Lua file named by WRK_PAYLOADS; nothing is built per
-- request but the one fresh row a miss needs. done() prints one line: "WRKJSON {...}".
local data = dofile(os.getenv("WRK_PAYLOADS"))
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  position = (tid * 7919) % #data.choices
  counter = 0
  statuses, cache, served = {}, {}, {}
end

function request()
  position = position % #data.choices + 1
  local choice = data.choices[position]
  local body
  if choice >= 0 then
    body = data.pool[choice + 1]
  else
    counter = counter + 1
    body = data.fresh_head .. tid .. "." .. string.format("%09d", counter) .. data.tails[counter % #data.tails + 1]
  end
  return wrk.format(nil, data.path, nil, body)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  -- An answer of the balancer's L1 carries the headers of the replica answer it keeps:
  -- count it as L1, and as served by nginx.
  local l1 = headers["X-L1-Cache"] == "HIT"
  local state = l1 and "L1" or headers["X-Cache"] or "none"
  cache[state] = (cache[state] or 0) + 1
  local replica = l1 and "nginx (L1)" or headers["X-Served-By"] or "none"
  served[replica] = (served[replica] or 0) + 1
end

local function merge(into, from)
  for key, count in pairs(from or {}) do
    into[tostring(key)] = (into[tostring(key)] or 0) + count
  end
end

local function encode(map)
  local parts = {}
  for key, count in pairs(map) do
    table.insert(parts, string.format("%q:%d", key, count))
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

function done(summary, latency, requests)
  local all_statuses, all_cache, all_served = {}, {}, {}
  for _, thread in ipairs(threads) do
    merge(all_statuses, thread:get("statuses"))
    merge(all_cache, thread:get("cache"))
    merge(all_served, thread:get("served"))
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f},' ..
    '"statuses":%s,"cache":%s,"served_by":%s}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    encode(all_statuses), encode(all_cache), encode(all_served)))
end
