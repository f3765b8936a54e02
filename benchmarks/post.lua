-- wrk script for benchmarks/serve_speed.py: POST the JSON body in $WRK_BODY on every
-- request and print one line of JSON at the end. With $WRK_THINK_MS each connection waits
-- an exponential think time (that mean, in ms) before each request, so 32 connections
-- send a paced, Poisson-like load instead of wrk's flat-out closed loop.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local file = assert(io.open(os.getenv("WRK_BODY"), "r"))
wrk.body = file:read("*a")
file:close()
local think_ms = tonumber(os.getenv("WRK_THINK_MS") or "0")

function init(args)
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
end

if think_ms > 0 then
  function delay()
    return math.floor(-think_ms * math.log(1 - math.random()))
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "seconds": %.3f, "p50_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f, "errors": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(99) / 1e3,
    latency.max / 1e3, e.connect + e.read + e.write + e.status + e.timeout))
end
