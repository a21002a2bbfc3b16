-- wrk script: POST one AdmissionReview body on every request (keep-alive is wrk's default).
-- bench/run.py writes the compact body to a file and names it in BENCH_BODY, so the body is read
-- once here, at load time, and never per request.
local path = os.getenv("BENCH_BODY")
if path == nil then
  error("BENCH_BODY must name the request body file")
end
local file = assert(io.open(path, "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/json"
