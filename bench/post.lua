-- wrk script: POST one AdmissionReview body on every request (keep-alive is wrk's default).
-- bench/run.py writes the compact body to a file and names it in BENCH_BODY, so the body is read
-- once here, at load time, and never per request.
-- With BENCH_DISTINCT=1 every request carries a pod of a shape never seen: its app container is
-- named with a counter (`app-<n>`), as the pods of distinct workloads differ in what the
-- injector reads. The webhook memoises on that alone (its name, the labels no rule selects on
-- and the annotations not Outrigger's are left out, so a workload's replicas and revisions
-- share an answer), so its memo never answers: the cost of a pod never seen before. Without
-- it, every pod is alike, as the replicas of one workload are.
local path = os.getenv("BENCH_BODY")
if path == nil then
  error("BENCH_BODY must name the request body file")
end
local file = assert(io.open(path, "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/json"

-- The body cut just after `marker`, where a counter goes.
local function split(body, marker)
  local at = assert(string.find(body, marker, 1, true), "the body has no " .. marker)
  return string.sub(body, 1, at + #marker - 1), string.sub(body, at + #marker)
end

if os.getenv("BENCH_DISTINCT") == "1" then
  local head, tail = split(wrk.body, '"containers":[{"name":"app')
  local counter = math.random(1, 1000000000)
  request = function()
    counter = counter + 1
    return wrk.format(nil, nil, nil, head .. "-" .. counter .. tail)
  end
end
