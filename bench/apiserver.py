"""What the webhook adds to a pod creation, through a real kube-apiserver (issue 22).

`make bench-apiserver` (or `.venv/bin/python bench/apiserver.py`, with OUTRIGGER_KUBE_ASSETS
naming the Kubernetes binaries, as for the tests) starts etcd and kube-apiserver, then:

- `outrigger serve` (the embedded policy), registered for one namespace;
- `bench/replay.py`, a webhook that does no work but answers the very response Outrigger gave
  for the benchmark pod (the same patch, so the API server applies the same change), on the
  same uvicorn and TLS as the floor, registered for a second namespace;
- a third namespace that no webhook selects.

It creates the benchmark pod (`bench/request.json`'s, without the token volume the API server
gives each pod a name of its own) with `dryRun=All` in the three, in turn,
ROUNDS times over one keep-alive connection, and reports per series the median and mean time
of a creation, what each webhook adds to the creation without one, and the ratio of
Outrigger's addition to the replay's (target <= 1.15). The pods of one series are alike (one
workload's replicas) or each differs from the others:

- `--distinct`: its app container has a name of its own (pods of distinct workloads, each of
  a shape the webhook has never seen: it memoises on what its injector reads);
- `--replicas`: its own StatefulSet pod-name and pod-index labels (a StatefulSet's replicas);
- `--revisions`: its own pod-template-hash label and kubectl.kubernetes.io/restartedAt
  annotation (the revisions `kubectl rollout restart` makes).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.kube_env import ControlPlane, KubeUnavailable, find_assets, start_control_plane  # noqa: E402
from tests.kube_webhook import LABEL, configuration, registered  # noqa: E402
from tests.test_https import _free_port, start_server, stop_server  # noqa: E402
from webhook.admission.review import parse, respond_with_verdict  # noqa: E402
from webhook.core.policy import default_policy  # noqa: E402

REQUEST_FILE = ROOT / "bench" / "request.json"
MAX_RATIO = 1.15
SERIES = ("none", "outrigger", "replay")
# What `kubectl rollout restart` sets on a workload's pod template (the revisions series).
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
# The series other than pods alike: what the report calls them, and how each pod differs.
KINDS = {
    "distinct": ("distinct pods", "a workload of its own per pod: its own app container name"),
    "replicas": ("a StatefulSet's replicas", "their own pod-name and pod-index labels"),
    "revisions": ("revisions of one workload", "their own pod-template-hash and restartedAt"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=300, help="creations per series")
    kinds = parser.add_mutually_exclusive_group()
    for kind, (described, meaning) in KINDS.items():
        kinds.add_argument(f"--{kind}", action="store_true", help=f"{described}: {meaning}")
    args = parser.parse_args(argv)
    try:
        assets = find_assets()
    except KubeUnavailable as missing:
        print(f"bench-apiserver: {missing}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="outrigger-bench-") as folder, ExitStack() as stack:
        work = Path(folder)
        plane = start_control_plane(assets, work / "kube")
        stack.callback(plane.stop)
        pod = _as_templated(json.loads(REQUEST_FILE.read_text())["request"]["object"])
        namespaces = _namespaces(plane, stack, work, pod)
        times = _create(plane, pod, namespaces, args.rounds, _kind(args))
        calls, outcomes = _reviews(namespaces["outrigger-url"])
    creations = args.rounds + 20
    print(f"Outrigger answered {calls[0] / creations:.2f} reviews per creation, in "
          f"{calls[1] / calls[0] * 1e6:.0f} us each on average (its own measure): "
          f"{outcomes}")  # fmt: skip
    return _report(times, args)


def _reviews(url: str) -> tuple[tuple[float, float], str]:
    """Outrigger's count of reviews and their seconds, and its reviews by outcome and
    reason (`injected/injected 320, unchanged/already-injected 320`), from its /metrics."""
    import ssl
    import urllib.request

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # loopback, our own
    text = urllib.request.urlopen(url + "/metrics", context=context).read().decode()
    found, outcomes = {}, []
    for line in text.splitlines():
        for suffix in ("count", "sum"):
            if line.startswith(f"outrigger_admission_review_duration_seconds_{suffix} "):
                found[suffix] = float(line.split()[1])
        if line.startswith("outrigger_admission_reviews_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            if count := float(line.split()[-1]):
                outcomes.append(f"{labels['outcome']}/{labels['reason']} {count:.0f}")
    return (found["count"], found["sum"]), ", ".join(outcomes)


def _namespaces(
    plane: ControlPlane, stack: ExitStack, work: Path, pod: dict[str, Any]
) -> dict[str, str]:
    """The namespace of each series, its webhook running and registered."""
    outrigger, process = start_server(work / "outrigger", "--log-format", "json")
    stack.callback(stop_server, outrigger, process)
    replay_url = stack.enter_context(_replay(work, outrigger.cert_dir, pod))
    namespaces = {"none": plane.namespace("none"), "outrigger-url": outrigger.ip_url}
    for name, url in (("outrigger", outrigger.ip_url), ("replay", replay_url)):
        body = configuration(url + "/mutate", outrigger.cert_dir / "ca.crt", name, name=name)
        stack.enter_context(registered(plane, body))
        namespaces[name] = plane.namespace(name, {LABEL: name})
    time.sleep(2)  # the API server's webhook configuration cache
    return namespaces


@contextmanager
def _replay(work: Path, certs: Path, pod: dict[str, Any]) -> Iterator[str]:
    """bench/replay.py answering Outrigger's response for `pod` (the embedded policy)."""
    review = json.loads(REQUEST_FILE.read_text())
    review["request"]["uid"] = "UID"
    status, answer = respond_with_verdict(parse(json.dumps(review).encode()), default_policy())[0]
    assert status == 200 and b'"patch"' in answer, answer[:200]
    response = work / "replay.json"
    response.write_bytes(answer)
    port = _free_port()
    command = [sys.executable, "-m", "uvicorn", "bench.replay:app", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--ssl-certfile", str(certs / "tls.crt")]
    command += ["--ssl-keyfile", str(certs / "tls.key"), "--http", "httptools"]
    command += ["--loop", "uvloop", "--no-access-log", "--log-level", "warning"]
    token = next(v["name"] for v in review["request"]["object"]["spec"]["volumes"])
    env = {**os.environ, "REPLAY_RESPONSE": str(response), "REPLAY_TOKEN_VOLUME": token}
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    try:
        time.sleep(2)
        if process.poll() is not None:
            raise SystemExit("bench-apiserver: the replay webhook did not start")
        yield f"https://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def _as_templated(pod: dict[str, Any]) -> dict[str, Any]:
    """The benchmark pod as a controller creates it from its template: without the token
    volume and mounts the request file holds, which the API server adds to each pod under a
    name of its own (`kube-api-access-` and five random characters)."""
    spec = pod["spec"]
    token = {v["name"] for v in spec["volumes"] if v["name"].startswith("kube-api-access-")}
    containers = [
        {**c, "volumeMounts": [m for m in c["volumeMounts"] if m["name"] not in token]}
        for c in spec["containers"]
    ]
    for container in containers:
        if not container["volumeMounts"]:
            del container["volumeMounts"]
    volumes = [v for v in spec["volumes"] if v["name"] not in token]
    spec = {**spec, "containers": containers, "volumes": volumes}
    if not volumes:
        del spec["volumes"]
    return {**pod, "spec": spec}


def _kind(args: argparse.Namespace) -> str:
    return next((kind for kind in KINDS if getattr(args, kind)), "alike")


def _create(
    plane: ControlPlane, pod: dict[str, Any], namespaces: dict[str, str], rounds: int,
    kind: str,
) -> dict[str, list[float]]:  # fmt: skip
    """Seconds per dry-run creation, per series, the series taking turns."""
    connection = http.client.HTTPSConnection(
        "127.0.0.1", int(plane.url.rsplit(":", 1)[1]), context=plane.ssl_context()
    )
    times: dict[str, list[float]] = {name: [] for name in SERIES}
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    for index in range(-20, rounds):  # 20 to warm up every connection and cache
        for name in SERIES:
            body = _pod(pod, namespaces[name], kind, index)
            data = json.dumps(body).encode()
            path = f"/api/v1/namespaces/{namespaces[name]}/pods?dryRun=All"
            started = time.perf_counter()
            connection.request("POST", path, data, headers)
            answer = connection.getresponse()
            text = answer.read()
            elapsed = time.perf_counter() - started
            if answer.status != 201:
                raise SystemExit(f"bench-apiserver: {name}: {answer.status} {text[:300]!r}")
            injected = b"outrigger.dev/status" in text
            if injected != (name != "none"):
                raise SystemExit(f"bench-apiserver: {name}: injected={injected}, unexpected")
            if index >= 0:
                times[name].append(elapsed)
    return times


def _pod(pod: dict[str, Any], namespace: str, kind: str, index: int) -> dict[str, Any]:
    """The benchmark pod in `namespace`, as the `index`th pod of its kind of series."""
    metadata = {**pod["metadata"], "namespace": namespace}
    labels, annotations = metadata["labels"], metadata["annotations"]
    spec = pod["spec"]
    if kind == "distinct":  # the app container of a workload of its own
        app = {**spec["containers"][0], "name": f"app-{index + 20}"}
        spec = {**spec, "containers": [app, *spec["containers"][1:]]}
    elif kind == "replicas":  # as a StatefulSet's controller labels each of its pods
        replica = f"web-{index + 20}"
        labels = {**labels, "statefulset.kubernetes.io/pod-name": replica}
        labels["apps.kubernetes.io/pod-index"] = str(index + 20)
    elif kind == "revisions":  # a new revision, as `kubectl rollout restart` makes one
        labels = {**labels, "pod-template-hash": f"h{index + 20}"}
        annotations = {**annotations, RESTARTED_AT: str(index)}
    metadata.update(labels=labels, annotations=annotations)
    return {**pod, "metadata": metadata, "spec": spec}


def _report(times: dict[str, list[float]], args: argparse.Namespace) -> int:
    kind = KINDS[_kind(args)][0] if _kind(args) in KINDS else "pods of one workload"
    print(f"{args.rounds} dry-run creations per series, {kind}, interleaved")
    print(f"{'series':<12}{'median ms':>11}{'mean ms':>10}{'added, median':>15}{'mean':>8}")
    base = {f: f(times["none"]) for f in (statistics.median, statistics.fmean)}
    added = {}
    for name in SERIES:
        median, mean = statistics.median(times[name]), statistics.fmean(times[name])
        added[name] = (median - base[statistics.median], mean - base[statistics.fmean])
        print(
            f"{name:<12}{median * 1e3:>11.3f}{mean * 1e3:>10.3f}"
            f"{added[name][0] * 1e3:>15.3f}{added[name][1] * 1e3:>8.3f}"
        )
    ratio = added["outrigger"][0] / added["replay"][0]
    verdict = "PASS" if ratio <= MAX_RATIO else "MISS"
    print(f"\nOutrigger adds {ratio:.2f}x what the replay webhook adds (median; target <= "
          f"{MAX_RATIO}): {verdict}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
