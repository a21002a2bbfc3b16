"""Would several server processes pay off? One `outrigger serve` against two, sharing the load,
with and without a CPU limit of one CPU (the chart's default), measured in one run.

`make bench-workers` (root: the CPU limit is a cgroup). Each process is the webhook as the
chart deploys it (decision log on) on a port of its own; wrk drives them all at once, its
connections split between them, so the pair takes the same offered load as the one. Under
the limit, the processes are put in one cgroup with a CPU quota of one CPU (cgroup v1's
`cpu.cfs_quota_us` or v2's `cpu.max`), as the kubelet puts a pod's containers.

Prints, per setting, the summed req/s, the worst p99 and the CPU time per request of all the
processes together. Exit status: 0 when it ran, 1 when it could not.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

from run import (
    BenchError,
    Server,
    Settings,
    Target,
    _check_webhook,
    _compact_request,
    _cpu_seconds,
    _find_wrk,
    _make_certs,
    _parse_wrk,
    _running,
    _wait_ready,
    _webhook_command,
    _wrk,
)

CGROUP_V1 = Path("/sys/fs/cgroup/cpu")
CGROUP_V2 = Path("/sys/fs/cgroup")
PERIOD_US = 100_000


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per measured run")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections in all")
    parser.add_argument("--distinct", action="store_true", help="a pod never seen per request")
    options = parser.parse_args(argv)
    try:
        _compare(options.duration, options.connections, options.distinct)
    except BenchError as error:
        print(f"bench-workers: {error}", file=sys.stderr)
        return 1
    return 0


def _compare(duration: int, connections: int, distinct: bool) -> None:
    wrk = _find_wrk()
    with tempfile.TemporaryDirectory(prefix="outrigger-workers-") as temporary:
        work = Path(temporary)
        certs = _make_certs(work / "certs")
        body = work / "request.json"
        body.write_bytes(_compact_request())
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        print(f"wrk -t1 -c{connections} in all, {duration}s per setting, distinct={distinct}")
        print(f"{'processes':>9} {'CPU limit':>9} {'req/s':>9} {'p99 ms':>7} {'CPU us/req':>10}")
        for cpu_limit in (1.0, None):
            for processes in (1, 2):
                with ExitStack() as stack:
                    servers = stack.enter_context(_servers(processes, certs, work, context, body))
                    stack.enter_context(_limited(servers, cpu_limit))
                    rps, p99, cpu = _load(wrk, servers, body, connections, duration, distinct)
                limit = f"{cpu_limit:g} CPU" if cpu_limit else "none"
                print(f"{processes:>9} {limit:>9} {rps:>9.0f} {p99:>7.2f} {cpu:>10.1f}", flush=True)


@contextmanager
def _servers(
    count: int, certs: Path, work: Path, context: ssl.SSLContext, body: Path
) -> Iterator[list[Server]]:
    with ExitStack() as stack:
        servers = [
            stack.enter_context(_running(_webhook_command(certs, "info"), f"webhook-{n}", work))
            for n in range(count)
        ]
        for server in servers:
            _wait_ready(server, context)
            _check_webhook(server, body.read_bytes(), context)
        yield servers


def _load(
    wrk: str, servers: list[Server], body: Path, connections: int, duration: int, distinct: bool
) -> tuple[float, float, float]:
    """Drive every server at once (a warm-up, then the measured run): summed req/s, worst
    p99 (ms) and the CPU time of all servers per request answered (us)."""
    settings = Settings(duration, 2, connections // len(servers), 1, 1, False, None)
    targets = [Target(server.name, server, distinct) for server in servers]

    def drive(seconds: int) -> list[str]:
        with ThreadPoolExecutor(len(targets)) as pool:
            return list(pool.map(lambda t: _wrk(wrk, t, body, settings, seconds), targets))

    drive(settings.warmup_s)
    cpu_before = sum(_cpu_seconds(server.process.pid) for server in servers)
    outputs = drive(duration)
    cpu = sum(_cpu_seconds(server.process.pid) for server in servers) - cpu_before
    runs = [
        _parse_wrk(output, target.name, 1, 0.0)
        for output, target in zip(outputs, targets, strict=True)
    ]
    if any(run.errors for run in runs):
        raise BenchError(f"errors under load: {[run.errors for run in runs]}")
    answered = sum(run.requests for run in runs)
    return (
        sum(run.requests_per_s for run in runs),
        max(run.p99_ms for run in runs),
        cpu * 1e6 / max(1, answered),
    )


@contextmanager
def _limited(servers: list[Server], cpus: float | None) -> Iterator[None]:
    """The servers in one cgroup with a quota of `cpus` CPUs (none: left as they are)."""
    if cpus is None:
        yield
        return
    if os.geteuid() != 0:
        raise BenchError("a CPU limit needs a cgroup of our own: run as root")
    v1 = (CGROUP_V1 / "cpu.cfs_quota_us").exists()
    group = (CGROUP_V1 if v1 else CGROUP_V2) / f"outrigger-bench-{os.getpid()}"
    group.mkdir()
    quota = int(cpus * PERIOD_US)
    try:
        if v1:
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        for server in servers:
            (group / "cgroup.procs").write_text(str(server.process.pid))
        yield
    finally:
        for server in servers:  # back to the root group, so that ours can go
            if server.process.poll() is None:
                (group.parent / "cgroup.procs").write_text(str(server.process.pid))
        group.rmdir()


if __name__ == "__main__":
    sys.exit(main())
