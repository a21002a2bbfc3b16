"""Seeded mutation of the golden AdmissionReviews through the whole envelope (bounded).

Each case takes a golden request and changes a few things at random: a value replaced by one
of another type or a hostile string (control characters, huge, deeply nested, numbers past
every limit), a key deleted, an outrigger.dev/ annotation added. Whatever comes in: never a
5xx, never `status.code` 500, never an error logged (no traceback), the uid echoed, and every
patch applies and re-injects to nothing.

A second fuzz writes what `orjson` cannot: JSON bodies with strings that are not UTF-8-safe
(lone and reversed surrogate escapes, bytes that are no UTF-8, overlong and surrogate
encodings) and terminal-hostile characters (controls, ESC sequences, 8-bit CSI, bidi
overrides, zero-width) in any string of the review, key or value, and most often where the
webhook reads or echoes them (userInfo, the pod's names and owner, annotation keys and values,
the status annotation), and values replaced by about a thousand nested arrays or objects.
Every answer is JSON: a 400 with a printable message, or the review's answer with its uid and
printable warnings and messages; never an internal error, never an ERROR or a traceback logged.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

import jsonpatch
import orjson
import pytest
import yaml

from tests.conftest import FIXTURES, fields
from webhook.admission import review as review_module
from webhook.admission.review import AdmissionRequest, BadReview, decode_review, review
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


# Not UTF-8-safe: what a JSON escape can say but no UTF-8 string holds (lone surrogates), and
# characters a terminal acts on.
UNSAFE_TEXT = [
    "\ud800", "\udfff", "a\udc00b", "\udc00\ud800", "\ud800\ud800", "x\ud83d", "\ud83d\ude00",
    "\x00", "\n", "\r\n", "\x1b[31m", "\x1b]8;;https://x.example\x07", "\x9b31m", "\x7f",
    "\u202e", "\u2066", "\u200b", "\u2028", "\ufeff", "\uffff", "\U0010ffff", "\ufffd",
]  # fmt: skip
# Raw bytes in a JSON string: not UTF-8, overlong, a surrogate encoded, past U+10FFFF, cut.
UNSAFE_BYTES = [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xe2\x80"]
BYTES_MARK = "OutriggerFuzzBytes"
DEEP_MARK = "OutriggerFuzzDeep"
UNSAFE_CASES = 4000
# Where the webhook reads or echoes strings: chosen half of the time.
ECHOED = (("request", "userInfo"), ("request", "object", "metadata"), ("request", "namespace"))
STATUS = "outrigger.dev/status"


def strings(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], bool]]:
    """The path of every string in `value`, key (True) or value (False)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*path, key), True
            yield from strings(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from strings(item, (*path, index))
    elif isinstance(value, str):
        yield path, False


def values(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every value below `value`."""
    if isinstance(value, (dict, list)):
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            yield (*path, key)
            yield from values(item, (*path, key))


def spoiled(text: str, rng: random.Random) -> tuple[str, bytes | None]:
    """`text` with an unsafe string in it, and the raw bytes its mark stands for, if any."""
    raw = rng.choice(UNSAFE_BYTES) if rng.random() < 0.3 else None
    bad = BYTES_MARK if raw is not None else rng.choice(UNSAFE_TEXT)
    at = rng.choice([0, len(text) // 2, len(text)])
    return (bad if rng.random() < 0.3 else text[:at] + bad + text[at:]), raw


def unsafe_case(rng: random.Random) -> tuple[dict[str, Any], bytes]:
    """A golden request with unsafe strings or a deep value in it, and its body."""
    request = copy.deepcopy(rng.choice(REQUESTS))
    review_request = request["request"]
    review_request["userInfo"] = {
        **review_request.get("userInfo", {}),
        "uid": "1001",
        "groups": ["system:authenticated"],
        "extra": {"example.com/team": ["shop"]},
    }
    pod = review_request.get("object")
    if isinstance(pod, dict):
        metadata = pod.setdefault("metadata", {})
        annotations = metadata.setdefault("annotations", {})
        if rng.random() < 0.4:
            annotations.setdefault(STATUS, '{"injected":["log-watcher"],"policy":"0"}')
        if rng.random() < 0.3:
            annotations["outrigger.dev/log-pth"] = "/var/log/app"  # a warning quotes its key
        if rng.random() < 0.3:
            metadata["ownerReferences"] = [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1", "controller": True}
            ]
    raws: list[bytes] = []
    if rng.random() < 0.2:
        deep = rng.choice(list(values(request)))
        _put(request, deep, DEEP_MARK)
    else:
        for _ in range(rng.randint(1, 3)):
            paths = list(strings(request))
            echoed = [p for p in paths if any(p[0][: len(e)] == e for e in ECHOED)]
            path, is_key = rng.choice(echoed if echoed and rng.random() < 0.5 else paths)
            text, raw = spoiled(str(path[-1]) if is_key else _get(request, path), rng)
            if is_key:
                parent = _get(request, path[:-1])
                parent[text] = parent.pop(path[-1])
            else:
                _put(request, path, text)
            if raw is not None:
                raws.append(raw)
    body = json.dumps(request).encode()  # lone surrogates as \\ud800 escapes: orjson refuses them
    for raw in raws:
        body = body.replace(BYTES_MARK.encode(), raw, 1)
    depth = rng.randint(900, 1100)
    opening, closing = (
        (b"[" * depth, b"]" * depth) if rng.random() < 0.5 else (b'{"a":' * depth, b"}" * depth)
    )
    body = body.replace(json.dumps(DEEP_MARK).encode(), opening + b"1" + closing)
    return request, body


def _get(value: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        value = value[key]
    return value


def _put(value: Any, path: tuple[Any, ...], item: Any) -> None:
    _get(value, path[:-1])[path[-1]] = item


def check_unsafe(request: dict[str, Any], body: bytes, policy: Policy) -> int:
    status, answer = review(body, policy)
    assert status in (200, 400), (status, answer[:300])
    document = orjson.loads(answer)
    if status == 400:
        assert document["error"] and document["error"].isprintable(), document
        return status
    response = document["response"]
    # As JSON reads it: an escaped surrogate pair is one character.
    assert response["uid"] == json.loads(json.dumps(request["request"]["uid"]))
    if not response["allowed"]:
        assert response["status"]["code"] == 400, response
        assert response["status"]["message"].isprintable(), response
    assert all(warning.isprintable() for warning in response.get("warnings", ())), response
    return status


def test_unsafe_strings_and_deep_values_never_fail_the_webhook(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = random.Random(SEED + 1)
    answered = {200: 0, 400: 0}
    with caplog.at_level(logging.WARNING):
        for _ in range(UNSAFE_CASES):
            request, body = unsafe_case(rng)
            answered[check_unsafe(request, body, rng.choice(POLICIES))] += 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    # Both kinds of answer are exercised: the mutations do not all make bad bodies.
    assert answered[200] > UNSAFE_CASES // 10 and answered[400] > UNSAFE_CASES // 10, answered


# The one-pass decode agrees with the two passes ---------------------------------------------


def decoded(
    body: bytes, decode: Callable[[bytes], AdmissionRequest] = decode_review
) -> dict[str, Any] | str:
    """The request's fields as `decode` reads them, with the pod of an injected one as the
    check reads it: its labels, annotations and spec (the one pass skips the rest of it; the
    two passes keep it, and it only passes through)."""
    try:
        request = decode(body)
    except BadReview as error:
        return f"BadReview: {error}"
    read = fields(request)
    if isinstance(request.pod, dict):
        metadata = request.pod.get("metadata") or {}
        kept = {key: metadata.get(key) for key in ("labels", "annotations")}
        read["pod"] = {"metadata": kept, "spec": request.pod.get("spec")}
    return read


def test_the_one_pass_decode_answers_as_the_two_passes() -> None:
    """`decode_review` reads the common cases, a pod created and an injected one coming back,
    in one typed pass and leaves the rest to the two passes (the review, then the pod from
    its raw bytes).
    For every body of both fuzzers, both golden and spoiled, the result is the same as the two
    passes alone give, and the one pass does take the common case."""
    rng = random.Random(SEED + 2)
    bodies = [orjson.dumps(request) for request in REQUESTS]
    for _ in range(1500):
        try:
            bodies.append(orjson.dumps(case(rng)))
        except TypeError:  # an integer past 64 bits
            continue
        bodies.append(unsafe_case(rng)[1])
    fast = [decoded(body) for body in bodies]
    taken = sum(review_module._created_in_one_pass(body, None) is not None for body in bodies)
    assert [decoded(body, review_module.decode_in_two_passes) for body in bodies] == fast
    assert taken > len(REQUESTS) // 2, taken
