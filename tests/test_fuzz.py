"""Seeded mutation of the golden AdmissionReviews through the whole envelope (bounded).

Each case takes a golden request and changes a few things at random: a value replaced by one
of another type or a hostile string (control characters, huge, deeply nested, numbers past
every limit), a key deleted, an outrigger.dev/ annotation added. Whatever comes in: never a
5xx, never `status.code` 500, never an error logged (no traceback), the uid echoed, and every
patch applies and re-injects to nothing.
"""

from __future__ import annotations

import base64
import copy
import logging
import random
from typing import Any

import jsonpatch
import orjson
import pytest
import yaml

from tests.conftest import FIXTURES
from webhook.admission.review import review
from webhook.core.policy import Policy, default_policy, load_policy

SEED = 20261201
CASES = 4000
POLICIES = [default_policy(), load_policy(FIXTURES / "policies" / "good-platform-team.yaml")]
REQUESTS = [
    yaml.safe_load(path.read_text())
    for path in sorted(FIXTURES.glob("*.yaml"))
    if not path.name.endswith(".injected.yaml")
]
KEYS = [
    "outrigger.dev/inject",
    "outrigger.dev/log-path",
    "outrigger.dev/ambassador-upstream",
    "outrigger.dev/ambassador-port",
    "outrigger.dev/ambassador-config",
    "outrigger.dev/status",
    "outrigger.dev/log-volume-size",
    "outrigger.dev/log-watcher-stop-delay",
]
HOSTILE: list[Any] = [
    None, True, 0, -1, 2**64, 1.5, "", " ", "\n", "\x00", "a\nb", "/var/log\n/", "--8081",
    "9" * 5000, "x" * 70_000, "[" * 3000, "{a: " * 500, "&a [1]", "*a", "log-watcher,",
    "ambassador", "log-watcher,ambassador", "true", "false", "a.com\n:80", "[fe80::1%eth0]:80",
    "upstreams: {a: {address: 'a:80', port: 9000, timeouts: {connect: 0s}}}",
    "upstreams: {a: {address: 'a:80', port: 99999}}", '{"injected":["log-watcher"]}',
    [], {}, [1, "a"], {"a": {"b": []}}, "é", "\u202e", "/proc/self", "1Ti",
]  # fmt: skip


def mutate(value: Any, rng: random.Random, depth: int = 0) -> Any:
    """`value` with one change somewhere inside (maybe at the top)."""
    if depth > 6 or not isinstance(value, (dict, list)) or not value or rng.random() < 0.15:
        return copy.deepcopy(rng.choice(HOSTILE))
    if isinstance(value, dict):
        result = dict(value)
        key = rng.choice(list(result))
        if rng.random() < 0.2:
            del result[key]
        else:
            result[key] = mutate(result[key], rng, depth + 1)
        return result
    result_list = list(value)
    index = rng.randrange(len(result_list))
    result_list[index] = mutate(result_list[index], rng, depth + 1)
    return result_list


def case(rng: random.Random) -> dict[str, Any]:
    request = copy.deepcopy(rng.choice(REQUESTS))
    pod = request["request"].get("object")
    if isinstance(pod, dict) and rng.random() < 0.6:
        annotations = pod.setdefault("metadata", {}).setdefault("annotations", {})
        for _ in range(rng.randint(1, 3)):
            annotations[rng.choice(KEYS)] = rng.choice([v for v in HOSTILE if isinstance(v, str)])
        return request
    for _ in range(rng.randint(1, 3)):
        request = mutate(request, rng)
    return request if isinstance(request, dict) else {"request": request}


def check(request: dict[str, Any], policy: Policy) -> None:
    status, body = review(orjson.dumps(request), policy)
    assert status in (200, 400), (status, body[:300])
    if status == 400:
        assert b"Traceback" not in body
        return
    answer = orjson.loads(body)
    response = answer["response"]
    assert response["uid"] == request["request"]["uid"]
    if not response["allowed"]:
        assert response["status"]["code"] == 400, response
        return
    if "patch" in response:
        pod = jsonpatch.apply_patch(
            request["request"]["object"], orjson.loads(base64.b64decode(response["patch"]))
        )
        again = {**request, "request": {**request["request"], "object": pod}}
        status, body = review(orjson.dumps(again), policy)
        assert status == 200 and "patch" not in orjson.loads(body)["response"], body[:500]


def test_mutated_reviews_never_fail_the_webhook(caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(SEED)
    with caplog.at_level(logging.WARNING):
        for _ in range(CASES):
            request = case(rng)
            try:
                body = orjson.dumps(request)
            except TypeError:  # an integer past 64 bits: not JSON orjson can write; skip
                continue
            del body
            check(request, rng.choice(POLICIES))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
