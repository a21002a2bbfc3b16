-- wrk script: POST one AdmissionReview body on every request (keep-alive is wrk's default).
-- bench/run.py writes the compact body to a file and names it in BENCH_BODY, so the body is read
-- once here, at load time, and never per request.
-- With BENCH_DISTINCT=1 every request carries a different pod (a counter is put in front of its
-- pod-template-hash label, which the webhook reads: a pod's name is not part of what it
-- memoises), so the webhook's memo of recent pods never answers: the cost of a pod never
-- seen before. Without it, every pod is alike, as the replicas of one workload are.
local path = os.getenv("BENCH_BODY")
if path == nil then
  error("BENCH_BODY must name the request body file")
end
local file = assert(io.open(path, "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/json"

if os.getenv("BENCH_DISTINCT") == "1" then
  local marker = '"pod-template-hash":"'
  local at = assert(string.find(wrk.body, marker, 1, true), "the body has no pod-template-hash")
  local head = string.sub(wrk.body, 1, at + #marker - 1)
  local tail = string.sub(wrk.body, at + #marker)
  local counter = math.random(1, 1000000000)
  request = function()
    counter = counter + 1
    return wrk.format(nil, nil, nil, head .. counter .. "-" .. tail)
  end
end
