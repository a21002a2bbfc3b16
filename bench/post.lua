-- wrk script: POST one AdmissionReview body on every request (keep-alive is wrk's default).
-- bench/run.py writes the compact body to a file and names it in BENCH_BODY, so the body is read
-- once here, at load time, and never per request.
-- With BENCH_DISTINCT=1 every request carries a different pod, as a new revision of a workload
-- makes it (`kubectl rollout restart`): a counter in a kubectl.kubernetes.io/restartedAt
-- annotation and in front of its pod-template-hash label. The webhook memoises on what the
-- injector reads, which leaves out a pod's name and the labels no rule selects on but keeps
-- every annotation, so its memo of recent pods never answers: the cost of a pod never seen
-- before. Without it, every pod is alike, as the replicas of one workload are.
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
  -- The labels come before the annotations in the benchmark pod.
  local head, rest = split(wrk.body, '"pod-template-hash":"')
  local middle, tail = split(rest, '"annotations":{')
  local counter = math.random(1, 1000000000)
  request = function()
    counter = counter + 1
    local restarted = '"kubectl.kubernetes.io/restartedAt":"' .. counter .. '",'
    return wrk.format(nil, nil, nil, head .. counter .. "-" .. middle .. restarted .. tail)
  end
end
