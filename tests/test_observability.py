"""Metrics per decision and the decision log, through the real `outrigger serve` over HTTPS.

Reviews of every outcome are sent; then `/metrics` is parsed with prometheus-client's own
parser and every count checked, and the JSON log lines are parsed and their fields checked
(a 1 MiB annotation value must not be echoed).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import admission_review
from tests.test_https import Server, _stop, start_server
from webhook.cli import main
from webhook.serving.metrics import Metrics


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server, process = start_server(tmp_path_factory.mktemp("observe"), "--log-format", "json")
    try:
        yield server
    finally:
        _stop(process)


def pod(annotations: dict[str, str], name: str) -> dict[str, Any]:
    return {
        "metadata": {
            "generateName": name,
            "annotations": annotations,
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "web-7d",
                    "uid": "u",
                    "controller": True,
                }
            ],
        },
        "spec": {"containers": [{"name": "app", "image": "registry.example.com/app:1"}]},
    }


BIG = "/" + "a" * (1 << 20)
INJECT = "outrigger.dev/inject"
JSON = {"content-type": "application/json"}


def body(annotations: dict[str, str] | None, uid: str, **review: Any) -> bytes:
    sent = None if annotations is None else pod(annotations, f"{uid}-")
    return orjson.dumps(admission_review(sent, uid=uid, **review))


BOTH = {INJECT: "log-watcher,ambassador", "outrigger.dev/ambassador-upstream": "x.example.com:80"}
REVIEWS: list[tuple[bytes, tuple[str, str]]] = [
    (body({INJECT: "log-watcher"}, "u-1"), ("injected", "injected")),
    (body({INJECT: "log-watcher"}, "u-10"), ("injected", "injected")),  # summarised with u-1
    (body(BOTH, "u-2"), ("injected", "injected")),
    (body({}, "u-3"), ("unchanged", "not-requested")),
    (body({INJECT: "false"}, "u-4"), ("unchanged", "opted-out")),
    (
        body({INJECT: "log-watcher"}, "u-5", namespace="kube-system"),
        ("unchanged", "namespace-excluded"),
    ),
    (
        body({INJECT: "log-watcher", "outrigger.dev/status": "{}"}, "u-6"),
        ("injected", "reinjected"),
    ),
    (body({INJECT: "bogus"}, "u-7"), ("denied", "invalid-annotation")),
    (
        body({INJECT: "log-watcher", "outrigger.dev/log-path": BIG}, "u-8"),
        ("denied", "invalid-annotation"),
    ),
    (body(None, "u-9", operation="DELETE"), ("unchanged", "not-a-pod-creation")),
    (b"{not json", ("bad_request", "malformed")),
]


def samples(server: Server) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with httpx.Client(verify=server.trusting_ca(), timeout=5) as client:
        text = client.get(f"{server.url}/metrics").text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_every_decision_is_counted_timed_and_logged(server: Server) -> None:
    before = samples(server)
    with httpx.Client(verify=server.trusting_ca(), timeout=10) as client:
        for sent, _ in REVIEWS:
            headers = {"content-type": "application/json"}
            client.post(f"{server.url}/mutate", content=sent, headers=headers)
    after = samples(server)

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    expected: dict[tuple[str, str], int] = {}
    for _, outcome_reason in REVIEWS:
        expected[outcome_reason] = expected.get(outcome_reason, 0) + 1
    for (outcome, reason), count in expected.items():
        assert (
            delta("outrigger_admission_reviews_total", outcome=outcome, reason=reason) == count
        ), (outcome, reason)
    assert delta("outrigger_sidecars_injected_total", sidecar="log-watcher") == 4
    assert delta("outrigger_sidecars_injected_total", sidecar="ambassador") == 1
    assert delta("outrigger_admission_review_duration_seconds_count") == len(REVIEWS)
    assert delta("outrigger_admission_review_duration_seconds_bucket", le="0.1") == len(REVIEWS)
    assert (
        "outrigger_admission_reviews_total",
        frozenset({("outcome", "error"), ("reason", "internal")}),
    ) in after
    assert ("outrigger_policy_info", frozenset({("version", _policy_version(after))})) in after

    lines = _decision_lines(server, expect=6)  # u-1 and u-10 share a summary
    summaries = [line for line in lines if "pods" in line]
    assert all(line["count"] == len(line["pods"]) for line in summaries)
    wanted = ("injected", ["log-watcher"])
    (alike,) = [line for line in summaries if (line["reason"], line["sidecars"]) == wanted]
    assert [pod["uid"] for pod in alike["pods"]] == ["u-1", "u-10"], alike
    assert alike["message"] == "injected 2 pods of ReplicaSet/web-7d in default"
    by_uid = {line["uid"]: line for line in _per_pod(lines) if line.get("uid")}
    injected = by_uid["u-2"]
    assert injected["outcome"] == "injected" and injected["reason"] == "injected"
    assert injected["sidecars"] == ["log-watcher", "ambassador"]
    assert (injected["namespace"], injected["pod"], injected["owner"]) == (
        "default",
        "u-2-",
        "ReplicaSet/web-7d",
    )
    assert injected["policy"] == _policy_version(after) and injected["duration_ms"] > 0
    assert injected["level"] == "INFO" and injected["logger"] == "outrigger.decisions"
    assert by_uid["u-6"]["reason"] == "reinjected"
    assert by_uid["u-7"]["outcome"] == "denied" and "bogus" in by_uid["u-7"]["detail"]
    assert "u-3" not in by_uid and "u-4" not in by_uid and "u-9" not in by_uid  # plain skips
    big = by_uid["u-8"]
    assert big["outcome"] == "denied" and len(json.dumps(big)) < 3000  # not the 1 MiB value
    assert any(line["outcome"] == "bad_request" for line in lines)
    assert "a" * 200 not in server.log.read_text()


def _per_pod(lines: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The decision lines with each injection summary's pods as lines of their own."""
    for line in lines:
        shared = {key: value for key, value in line.items() if key not in ("pods", "count")}
        yield from ({**shared, **pod} for pod in line["pods"]) if "pods" in line else (line,)


def _policy_version(after: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> str:
    (version,) = [
        dict(labels)["version"] for name, labels in after if name == "outrigger_policy_info"
    ]
    return version


def _decision_lines(server: Server, expect: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        lines = []
        for raw in server.log.read_text().splitlines():
            if raw.startswith("{"):
                line = json.loads(raw)
                if line.get("logger") == "outrigger.decisions":
                    lines.append(line)
        if len(lines) >= expect or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def test_review_tally_is_exposed_as_counters_and_a_histogram() -> None:
    """The per-review series, counted without prometheus-client's objects, read by its parser:
    a duration on a bucket's bound counts in that bucket (`le`), the count is the +Inf bucket,
    and a series appears (with its `_created`) at its first count."""
    metrics = Metrics()
    for seconds in (0.00005, 0.00006, 0.1, 0.2):
        metrics.observe_review("injected", "injected", ("log-watcher",), seconds)
    metrics.observe_review("denied", "invalid-annotation", (), 0.001)
    text = metrics.exposition().decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    duration = "outrigger_admission_review_duration_seconds"
    names = ("outrigger_admission_reviews", "outrigger_sidecars_injected", duration)
    found = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for name in names
        for sample in families[name].samples
    }
    reviews = "outrigger_admission_reviews_total"
    assert found[(reviews, (("outcome", "injected"), ("reason", "injected")))] == 4
    assert found[(reviews, (("outcome", "denied"), ("reason", "invalid-annotation")))] == 1
    assert found[("outrigger_sidecars_injected_total", (("sidecar", "log-watcher"),))] == 4
    assert 'outrigger_sidecars_injected_created{sidecar="log-watcher"}' in text
    assert found[(f"{duration}_bucket", (("le", "5e-05"),))] == 1
    assert found[(f"{duration}_bucket", (("le", "0.0001"),))] == 2
    assert found[(f"{duration}_bucket", (("le", "0.001"),))] == 3
    assert found[(f"{duration}_bucket", (("le", "0.1"),))] == 4
    assert found[(f"{duration}_bucket", (("le", "+Inf"),))] == 5
    assert found[(f"{duration}_count", ())] == 5
    assert found[(f"{duration}_sum", ())] == pytest.approx(0.30111)


def test_summaries_waiting_at_sigterm_are_written(tmp_path: Path) -> None:
    server, process = start_server(
        tmp_path, "--log-format", "json", "--decision-log-interval", "60"
    )
    try:
        with httpx.Client(verify=server.trusting_ca(), timeout=10) as client:
            for sent, _ in REVIEWS[:2]:
                client.post(f"{server.url}/mutate", content=sent, headers=JSON)
            client.get(f"{server.url}/metrics")  # answered after both reviews were accounted
        waiting = _decision_lines(server, expect=0)
    finally:
        _stop(process)  # SIGTERM, as the kubelet stops a pod
    assert waiting == []  # a minute to go
    (summary,) = _decision_lines(server, expect=1)
    assert [pod["uid"] for pod in summary["pods"]] == ["u-1", "u-10"]


@pytest.mark.parametrize("seconds", ["-1", "61", "nan"])
def test_serve_refuses_a_decision_log_interval_out_of_bounds(
    capsys: pytest.CaptureFixture[str], seconds: str
) -> None:
    assert main(["serve", "--port", "1", "--decision-log-interval", seconds]) == 2
    assert "--decision-log-interval must be 0 to 60 seconds" in capsys.readouterr().err


def test_serve_never_injects_its_own_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$POD_NAMESPACE (the chart's downward API), read by `outrigger serve` at its start."""
    monkeypatch.setenv("POD_NAMESPACE", "default")
    server, process = start_server(tmp_path, "--log-format", "json")
    try:
        with httpx.Client(verify=server.trusting_ca(), timeout=10) as client:
            sent = body({INJECT: "log-watcher"}, "u-own")  # namespace "default"
            own = client.post(f"{server.url}/mutate", content=sent, headers=JSON).json()
            other = body({INJECT: "log-watcher"}, "u-other", namespace="shop")
            elsewhere = client.post(f"{server.url}/mutate", content=other, headers=JSON).json()
        after = samples(server)
    finally:
        _stop(process)
    assert own["response"]["allowed"] and "patch" not in own["response"]
    assert "patch" in elsewhere["response"]
    excluded = frozenset({("outcome", "unchanged"), ("reason", "namespace-excluded")})
    assert after[("outrigger_admission_reviews_total", excluded)] == 1
