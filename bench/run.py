"""Benchmark the webhook against the floor (bench/floor.py) on the same uvicorn + TLS setup.

One command (`make bench`): makes a dev CA and serving certificate, starts the floor and two
webhooks on free loopback ports (one as the chart deploys it, decision log on in JSON; one with
`--log-level warning`, decision log off), checks that each webhook really patches the request,
drives each with wrk over HTTPS keep-alive, for pods of one workload (alike) and for distinct
pods, prints req/s, p50 and p99 with the ratios to the floor against the targets and the
decision log's cost, and writes the figures to bench/results/latest.json. The servers are
always stopped at the end.

Exit status: 0 when the benchmark ran (a missed target prints MISS), 1 when it could not run or
a server answered errors under load, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
VENV_BIN = ROOT / ".venv" / "bin"
REQUEST_FILE = BENCH_DIR / "request.json"
LUA_SCRIPT = BENCH_DIR / "post.lua"
RESULTS_FILE = BENCH_DIR / "results" / "latest.json"

HOST = "127.0.0.1"  # load goes to loopback only
MUTATE_PATH = "/mutate"
HEALTH_PATH = "/healthz"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
CERT_FILES = ("ca.crt", "tls.crt", "tls.key")

# Targets (issue 22), as ratios to the floor in the same run: req/s for pods of one workload
# and for distinct pods, p99 within twice the floor's; the decision log costs under 5%.
MIN_RPS_RATIO = {"webhook": 0.6, "webhook-distinct": 0.4}
MAX_P99_RATIO = 2.0
MAX_LOG_COST = 0.05
# Resident memory after this many distinct large pods (issue 22).
LARGE_PODS = 10_000
MAX_RSS_MB = 100


class BenchError(Exception):
    """The benchmark cannot run (or its figures would mean nothing); the message says why."""


DISTINCT = "webhook-distinct"
# The same webhook with its decision log off: what the log costs is the difference.
NO_LOG = "-nolog"


@dataclass(frozen=True)
class Target:
    """What one wrk run loads: a server, fed alike pods or a distinct pod per request."""

    name: str
    server: Server
    distinct: bool


@dataclass(frozen=True)
class Settings:
    duration_s: int
    warmup_s: int
    connections: int
    threads: int
    rounds: int
    floor_only: bool
    cert_dir: Path | None


@dataclass(frozen=True)
class Server:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path


@dataclass(frozen=True)
class Best:
    server: str
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float


@dataclass(frozen=True)
class Run:
    server: str
    round: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int = 0
    # The server process's CPU time (user + system) over the run, per request answered: far
    # steadier than req/s on a machine whose two cores the load generator shares.
    cpu_us_per_request: float = 0.0


def main(argv: Sequence[str] | None = None) -> int:
    settings = _parse_args(argv)
    try:
        return _benchmark(settings)
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; servers stopped", file=sys.stderr)
        return 130


def _parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of warm-up per server")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive connections")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--rounds", type=int, default=2, help="measured runs per server")
    parser.add_argument("--floor-only", action="store_true", help="benchmark the floor alone")
    parser.add_argument(
        "--cert-dir", type=Path, help="use ca.crt, tls.crt, tls.key from here instead of new ones"
    )
    args = parser.parse_args(argv)
    if min(args.duration, args.warmup, args.connections, args.threads, args.rounds) < 1:
        parser.error("--duration, --warmup, --connections, --threads, --rounds must be >= 1")
    if args.connections < args.threads:
        parser.error("--connections must be >= --threads (each wrk thread needs one)")
    return Settings(
        args.duration,
        args.warmup,
        args.connections,
        args.threads,
        args.rounds,
        args.floor_only,
        # Absolute: the servers run from the repository root, not from the caller's directory.
        args.cert_dir.resolve() if args.cert_dir else None,
    )


def _benchmark(settings: Settings) -> int:
    wrk = _find_wrk()
    body = _compact_request()
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"bench: load average is {load:.2f} before starting: figures will be noisy")
    interpreter = _interpreter()
    print(f"bench: servers run on {interpreter}")
    with tempfile.TemporaryDirectory(prefix="outrigger-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        certs = _checked_certs(settings.cert_dir or _make_certs(work / "certs"))
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        commands = {"floor": _floor_command(certs)}
        if not settings.floor_only:
            commands["webhook"] = _webhook_command(certs, "info")
            commands["webhook" + NO_LOG] = _webhook_command(certs, "warning")
        servers = [stack.enter_context(_running(cmd, name, work)) for name, cmd in commands.items()]
        for server in servers:
            _wait_ready(server, context)
        targets = [Target("floor", servers[0], distinct=False)]
        for server in servers[1:]:
            _check_webhook(server, body, context)
            suffix = server.name.removeprefix("webhook")
            targets.append(Target("webhook" + suffix, server, distinct=False))
            targets.append(Target(DISTINCT + suffix, server, distinct=True))
        body_file = work / "request.json"
        body_file.write_bytes(body)
        runs = _measure(wrk, targets, body_file, settings)
        facts: dict[str, Any] = {
            "request_bytes": len(body),
            "loadavg_1m_before": load,
            "interpreter": interpreter,
        }
        if not settings.floor_only:
            large_file = work / "large.json"
            large_file.write_bytes(_large_request(body))
            facts |= _memory_after_large_pods(wrk, targets[1].server, large_file, settings)
    return _report(runs, settings, facts)


# What the servers' interpreter is: its build matters as much as the code (measured
# 2026-12-07: a new pod's review 47 us in process on a CPython built without
# --enable-optimizations and with a shared libpython, as pyenv builds by default, 37 us on
# Debian's python3.11, whose interpreter links libpython statically; the python image's is
# built with --enable-optimizations and --with-lto).
_DESCRIBE_INTERPRETER = """
import os, platform, sys, sysconfig
configured = sysconfig.get_config_var("CONFIG_ARGS") or ""
with open("/proc/self/maps") as maps:  # what it runs on, whatever sysconfig says
    shared = "libpython shared" if "libpython" in maps.read() else "libpython linked in"
named = "named" if "--enable-optimizations" in configured else "not named"
print(f"{platform.python_implementation()} {platform.python_version()} "
      f"({os.path.realpath(sys.executable)}; "
      f"{shared}; --enable-optimizations {named} in its configure arguments)")
"""


def _interpreter() -> str:
    """The servers' interpreter: version, path and build, as one line."""
    described = subprocess.run(
        [str(VENV_BIN / "python"), "-c", _DESCRIBE_INTERPRETER],
        capture_output=True,
        text=True,
        check=True,
    )
    return described.stdout.strip()


def _find_wrk() -> str:
    """Debian's wrk; installed on the spot when missing and we are root (machines are fresh)."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BenchError("wrk not found: install it (Debian: apt-get install -y wrk)")
    print("bench: wrk not found; installing it with apt-get", file=sys.stderr)
    install = ["apt-get", "install", "-y", "-qq", "wrk"]
    if subprocess.run(install, timeout=300, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], timeout=300, check=False)
        subprocess.run(install, timeout=300, check=False)
    found = shutil.which("wrk")
    if not found:
        raise BenchError("wrk is missing and apt-get could not install it")
    return found


def _compact_request() -> bytes:
    """The request as the API server sends it: compact JSON, not the readable file."""
    review = json.loads(REQUEST_FILE.read_text(encoding="utf-8"))
    return json.dumps(review, separators=(",", ":")).encode()


def _large_request(body: bytes) -> bytes:
    """The request with three more containers of 120 environment variables each (about
    34 KB): a pod too large for the webhook's memos, which must not grow it."""
    review = json.loads(body)
    containers = review["request"]["object"]["spec"]["containers"]
    for index in range(3):
        env = [{"name": f"SETTING_{index}_{n}", "value": "x" * 40} for n in range(120)]
        containers.append({**containers[0], "name": f"worker-{index}", "env": env})
    return json.dumps(review, separators=(",", ":")).encode()


def _memory_after_large_pods(
    wrk: str, server: Server, large: Path, settings: Settings
) -> dict[str, float]:
    """Send at least LARGE_PODS distinct large pods to the webhook (after its runs) and read
    its resident memory: its peak and what it holds after, in MB, against MAX_RSS_MB."""
    target = Target("webhook-large", server, distinct=True)
    sent = 0
    while sent < LARGE_PODS:
        run = _parse_wrk(_wrk(wrk, target, large, settings, 5), target.name, 1, 0.0)
        if run.errors:
            raise BenchError(f"{run.errors} errors answering large pods")
        sent += run.requests
    rss, peak = _memory_mb(server.process.pid, "VmRSS"), _memory_mb(server.process.pid, "VmHWM")
    verdict = "PASS" if peak < MAX_RSS_MB else "MISS"
    print(
        f"\nafter {sent} distinct {large.stat().st_size}-byte pods: RSS {rss:.0f} MB, "
        f"peak {peak:.0f} MB (target < {MAX_RSS_MB} MB)  {verdict}"
    )
    return {"large_pods": sent, "rss_mb_after_large_pods": rss, "peak_rss_mb": peak}


def _memory_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no {field} in /proc/{pid}/status")


def _outrigger() -> Path:
    path = VENV_BIN / "outrigger"
    if not path.exists():
        raise BenchError(f"{path} not found: run `make bench` (or pip install -e .) first")
    return path


def _make_certs(out: Path) -> Path:
    command = [str(_outrigger()), "certs", "--dns", "localhost", "--ip", HOST, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise BenchError(f"`outrigger certs` failed:\n{done.stderr.strip()}")
    return out


def _checked_certs(directory: Path) -> Path:
    missing = [name for name in CERT_FILES if not (directory / name).is_file()]
    if missing:
        raise BenchError(f"{directory} lacks {', '.join(missing)}")
    return directory


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _floor_command(certs: Path) -> list[str]:
    return [
        str(VENV_BIN / "python"),
        "-m",
        "uvicorn",
        "bench.floor:app",
        "--host",
        HOST,
        "--port",
        "{port}",
        "--ssl-certfile",
        str(certs / "tls.crt"),
        "--ssl-keyfile",
        str(certs / "tls.key"),
        "--http",
        "httptools",
        "--loop",
        "uvloop",
        "--no-access-log",
        "--log-level",
        "warning",
    ]


def _webhook_command(certs: Path, log_level: str) -> list[str]:
    # As the chart deploys it (JSON lines); at info its decision log is part of its cost.
    return [
        str(_outrigger()),
        "serve",
        "--host",
        HOST,
        "--port",
        "{port}",
        "--cert-dir",
        str(certs),
        "--log-format",
        "json",
        "--log-level",
        log_level,
    ]


@contextmanager
def _running(template: list[str], name: str, work: Path) -> Iterator[Server]:
    """Start a server on a free port, its output to a log file; stop it however we leave."""
    port = _free_port()
    command = [part.replace("{port}", str(port)) for part in template]
    log = work / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield Server(name, f"https://{HOST}:{port}", process, log)
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_ready(server: Server, context: ssl.SSLContext) -> None:
    """Poll over HTTPS, trusting only our CA, until the server answers anything at all."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise BenchError(
                f"{server.name} exited with {server.process.returncode}" + _tail(server)
            )
        try:
            _request(server, "GET", HEALTH_PATH, b"", context)
            return
        except (OSError, http.client.HTTPException):
            time.sleep(0.1)
    raise BenchError(f"{server.name} did not answer within {READY_TIMEOUT_S:.0f}s" + _tail(server))


def _tail(server: Server) -> str:
    lines = server.log.read_text(encoding="utf-8", errors="replace").splitlines()[-20:]
    return "; last lines of its log:\n" + "\n".join(lines) if lines else ""


def _request(
    server: Server, method: str, path: str, body: bytes, context: ssl.SSLContext
) -> tuple[int, bytes]:
    host, port = server.url.removeprefix("https://").split(":")
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=5)
    try:
        headers = {"Content-Type": "application/json"} if body else {}
        connection.request(method, path, body=body or None, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _check_webhook(server: Server, body: bytes, context: ssl.SSLContext) -> None:
    """Refuse to benchmark a webhook that does not patch this pod: its figures would be moot."""
    status, answer = _request(server, "POST", MUTATE_PATH, body, context)
    uid = json.loads(body)["request"]["uid"]
    try:
        review = json.loads(answer)
        response = review["response"]
        problems = _review_problems(review, response, uid)
    except (ValueError, KeyError, TypeError) as error:
        problems = [f"unreadable response ({error!r})"]
    if status != 200 or problems:
        detail = "; ".join(problems) or "no detail"
        raise BenchError(f"webhook answered HTTP {status}: {detail}\n{answer[:500]!r}")


def _review_problems(review: dict[str, Any], response: dict[str, Any], uid: str) -> list[str]:
    expected = {
        "apiVersion": (review.get("apiVersion"), "admission.k8s.io/v1"),
        "kind": (review.get("kind"), "AdmissionReview"),
        "response.uid": (response.get("uid"), uid),
        "response.allowed": (response.get("allowed"), True),
        "response.patchType": (response.get("patchType"), "JSONPatch"),
    }
    problems = [
        f"{key} is {got!r}, not {want!r}" for key, (got, want) in expected.items() if got != want
    ]
    encoded = response.get("patch")
    if not encoded:
        return [*problems, "response.patch is missing"]
    patch = json.loads(base64.b64decode(encoded))
    if not isinstance(patch, list) or not patch:
        problems.append("response.patch has no operations")
    return problems


def _measure(wrk: str, targets: list[Target], body: Path, settings: Settings) -> list[Run]:
    """Warm each server up, then alternate the targets round by round.

    Alternating (floor, webhook, webhook-distinct, floor, ...) spreads slow drift on this
    shared 2-core machine over every target instead of penalising whichever ran last.
    """
    for target in targets:
        print(f"  {target.name:<17} warm-up {settings.warmup_s}s", flush=True)
        _wrk(wrk, target, body, settings, settings.warmup_s)
    runs = []
    for round_ in range(1, settings.rounds + 1):
        for target in targets:
            cpu_before = _cpu_seconds(target.server.process.pid)
            output = _wrk(wrk, target, body, settings, settings.duration_s)
            cpu = _cpu_seconds(target.server.process.pid) - cpu_before
            run = _parse_wrk(output, target.name, round_, cpu)
            print(
                f"  {run.server:<22} round {round_}: {run.requests_per_s:9.1f} req/s  "
                f"p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms  "
                f"CPU {run.cpu_us_per_request:6.1f} us/req  errors {run.errors}",
                flush=True,
            )
            runs.append(run)
    return runs


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wrk(wrk: str, target: Target, body: Path, settings: Settings, seconds: int) -> str:
    command = [
        wrk,
        f"-t{settings.threads}",
        f"-c{settings.connections}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        str(LUA_SCRIPT),
        target.server.url + MUTATE_PATH,
    ]
    env = {**os.environ, "BENCH_BODY": str(body), "BENCH_DISTINCT": "1" if target.distinct else ""}
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=seconds + 30, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"wrk failed on {target.name}: {done.stderr.strip() or done.stdout}")
    return done.stdout


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _parse_wrk(output: str, server: str, round_: int, cpu_seconds: float) -> Run:
    """Read req/s, the 50% and 99% lines of `--latency`, and every kind of error wrk counts."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    total = re.search(r"^\s+(\d+) requests in", output, re.MULTILINE)
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.MULTILINE)
    if not (rps and p50 and p99 and total):
        raise BenchError(f"cannot read wrk's output for {server}:\n{output}")
    socket_errors = re.search(r"Socket errors: (.*)", output)
    status_errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = sum(int(n) for n in re.findall(r"\d+", socket_errors.group(1))) if socket_errors else 0
    errors += int(status_errors.group(1)) if status_errors else 0
    return Run(
        server,
        round_,
        float(rps.group(1)),
        float(p50.group(1)) * _UNIT_MS[p50.group(2)],
        float(p99.group(1)) * _UNIT_MS[p99.group(2)],
        errors,
        int(total.group(1)),
        cpu_seconds * 1e6 / max(1, int(total.group(1))),
    )


def _best(runs: list[Run], server: str) -> Best:
    """Each figure's best over the rounds: noise from other processes only ever worsens one."""
    mine = [run for run in runs if run.server == server]
    return Best(
        server,
        max(run.requests_per_s for run in mine),
        min(run.p50_ms for run in mine),
        min(run.p99_ms for run in mine),
        min(run.cpu_us_per_request for run in mine),
    )


def _report(runs: list[Run], settings: Settings, facts: dict[str, Any]) -> int:
    """Print the best run of each target and the verdicts; save everything as JSON."""
    names = list(dict.fromkeys(run.server for run in runs))
    best = {name: _best(runs, name) for name in names}
    print(
        f"\nbest of {settings.rounds} x {settings.duration_s}s, wrk -t{settings.threads} "
        f"-c{settings.connections}, {facts['request_bytes']:.0f}-byte AdmissionReview, "
        f"{os.cpu_count()} CPUs shared by wrk and the server"
    )
    print(f"{'target':<24}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}")
    for run in best.values():
        print(
            f"{run.server:<24}{run.requests_per_s:>10.1f}{run.p50_ms:>9.2f}{run.p99_ms:>9.2f}"
            f"{run.cpu_us_per_request:>12.1f}"
        )
    verdicts = {}
    if not settings.floor_only:
        for name in ("webhook", DISTINCT):
            verdicts[name] = _verdicts(name, best["floor"], best[name], best[name + NO_LOG])
    results = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {**asdict(settings), "cert_dir": str(settings.cert_dir or "")},
        "machine": {"cpus": os.cpu_count(), **facts},
        "runs": [asdict(run) for run in runs],
        "best": {name: asdict(run) for name, run in best.items()},
        "targets": verdicts,
    }
    RESULTS_FILE.parent.mkdir(exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {RESULTS_FILE.relative_to(ROOT)}")
    errors = sum(run.errors for run in runs)
    if errors:
        print(f"bench: INVALID: {errors} errors under load (see wrk's counts)", file=sys.stderr)
        return 1
    return 0


def _verdicts(name: str, floor: Best, webhook: Best, no_log: Best) -> dict[str, dict[str, Any]]:
    """Compare one webhook target to the floor, and to itself without the decision log,
    against the targets, and print it."""
    rps = webhook.requests_per_s
    # The log's cost in server CPU per request (the throughput it takes when CPU-bound).
    log_cost = 1 - no_log.cpu_us_per_request / webhook.cpu_us_per_request
    verdicts = {
        "rps_ratio": _verdict(rps / floor.requests_per_s, ">=", MIN_RPS_RATIO[name]),
        "p99_ratio": _verdict(webhook.p99_ms / floor.p99_ms, "<=", MAX_P99_RATIO),
        "log_cost": _verdict(log_cost, "<=", MAX_LOG_COST),
    }
    print(f"\n{name + '/floor':<24}{'ratio':>7}{'target':>10}  verdict")
    labels = ("req/s", "p99", "decision log (CPU)")
    for label, verdict in zip(labels, verdicts.values(), strict=True):
        mark = "PASS" if verdict["pass"] else "MISS"
        print(f"{label:<24}{verdict['value']:>7.2f}{verdict['target']:>10}  {mark}")
    return verdicts


def _verdict(ratio: float, comparison: str, target: float) -> dict[str, Any]:
    passed = ratio >= target if comparison == ">=" else ratio <= target
    return {"value": round(ratio, 3), "target": f"{comparison} {target}", "pass": passed}


if __name__ == "__main__":
    sys.exit(main())
