"""The decision log's direct path (`webhook.serving.decisions.DirectLines`): what `outrigger
serve` writes for each decision, without the logging machinery, into a real pipe."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import TextIO

import pytest

from tests.conftest import replaced
from webhook.admission.review import AdmissionRequest, Verdict
from webhook.serving import decisions
from webhook.serving.decisions import log_decision

REQUEST = AdmissionRequest("uid-1", "shop", None, "web-7d4b9c-", "ReplicaSet/web-7d4b9c")
INJECTED = Verdict("injected", "injected", ("log-watcher", "ambassador"))


class Pipe:
    """A real pipe: decision lines go into `descriptor`; `written()` closes it and returns the
    chunks the reader got, one per write."""

    def __init__(self) -> None:
        self._read_end, self.descriptor = os.pipe()
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._drain)
        self._reader.start()

    def _drain(self) -> None:
        while chunk := os.read(self._read_end, 1 << 20):
            self._chunks.append(chunk)

    def lines(self, count: int) -> list[bytes]:
        """The next `count` lines written (waiting for the reader thread to have them)."""
        deadline = time.monotonic() + 10
        while b"".join(self._chunks).count(b"\n") < count and time.monotonic() < deadline:
            time.sleep(0.001)
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data.splitlines()

    def written(self) -> list[bytes]:
        if decisions._direct is not None:
            decisions._direct.flush()
        os.close(self.descriptor)
        self._reader.join(timeout=10)
        os.close(self._read_end)
        return self._chunks


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    made = Pipe()
    yield made
    decisions._direct = None
    root.setLevel(level)


def direct(
    pipe: Pipe, json_lines: bool, summary_seconds: float = 0.0
) -> logging.StreamHandler[TextIO]:
    """Decision lines straight to the pipe (returned: the handler holds its stream)."""
    handler = logging.StreamHandler(os.fdopen(pipe.descriptor, "w", closefd=False))
    decisions.write_directly(handler, json_lines, summary_seconds)
    return handler


def test_json_lines_carry_every_field_and_a_turn_is_one_write(
    pipe: Pipe,
) -> None:
    _handler = direct(pipe, json_lines=True)

    async def one_turn() -> None:
        for _ in range(3):
            log_decision(REQUEST, INJECTED, "5b993bd8fc59", 0.000214, "5b993bd8fc59")
        await asyncio.sleep(0)  # the turn ends: its lines go out together

    asyncio.run(one_turn())
    chunks = pipe.written()
    assert len(chunks) == 1, chunks
    lines = chunks[0].decode().splitlines()
    assert len(lines) == 3
    record = json.loads(lines[0])
    assert list(record)[:4] == ["time", "level", "logger", "message"]
    assert record["level"] == "INFO" and record["logger"] == "outrigger.decisions"
    assert record["message"] == "injected shop/web-7d4b9c-"
    expected = {"uid": "uid-1", "namespace": "shop", "pod": "web-7d4b9c-",
                "owner": "ReplicaSet/web-7d4b9c", "outcome": "injected", "reason": "injected",
                "sidecars": ["log-watcher", "ambassador"], "policy": "5b993bd8fc59",
                "conditions_policy": "5b993bd8fc59", "duration_ms": 0.214}  # fmt: skip
    assert expected.items() <= record.items()


def test_json_lines_are_ascii_whatever_the_pod_is_named(pipe: Pipe) -> None:
    _handler = direct(pipe, json_lines=True)
    for name in ("café-", "web-\ud800", "web-\u202e"):
        hostile = AdmissionRequest("u", "shop", None, name, "")
        log_decision(hostile, Verdict("denied", "invalid-annotation", message="no"), "v", 0.001)
    data = b"".join(pipe.written())
    assert data.isascii()
    pods = [json.loads(line)["pod"] for line in data.splitlines()]
    assert pods == ["café-", "web-\ud800", "web-\u202e"]


def test_text_lines_escape_what_is_not_printable(pipe: Pipe) -> None:
    _handler = direct(pipe, json_lines=False)
    hostile = AdmissionRequest("u", "shop", None, "web-\n2026 INFO forged\x1b[2J", "")
    log_decision(hostile, INJECTED, "v", 0.001)
    (line,) = b"".join(pipe.written()).decode().splitlines()
    assert " INFO outrigger.decisions injected shop/web-\\x0a2026 INFO forged\\x1b[2J " in line
    assert "sidecars=log-watcher,ambassador policy=v conditions=- 1.0ms" in line


def test_lines_below_the_level_are_not_written(pipe: Pipe) -> None:
    _handler = direct(pipe, json_lines=True)
    logging.getLogger().setLevel(logging.WARNING)
    log_decision(REQUEST, INJECTED, "v", 0.001)  # info: off
    log_decision(None, Verdict("bad_request", "malformed", message="not JSON"), "v", 0.001)
    (line,) = b"".join(pipe.written()).decode().splitlines()
    assert json.loads(line)["level"] == "WARNING"


def test_every_review_is_accounted_for_on_the_event_loop() -> None:
    """Large bodies are decoded, and heavy pods answered, in a thread; what is decided is
    counted, logged and handed to the observer (the Events' queue, not thread-safe) back on
    the event loop's thread, whichever way the review came."""
    from tests.conftest import admission_review
    from webhook.core.policy import default_policy
    from webhook.serving.app import INLINE_BODY_BYTES, create_app

    seen: list[int] = []
    policy = default_policy()
    endpoint = create_app(lambda: policy, observer=lambda *_: seen.append(threading.get_ident()))
    pod = {
        "metadata": {"name": "p", "annotations": {"outrigger.dev/inject": "log-watcher"}},
        "spec": {"containers": [{"name": "app", "image": "registry.example.com/app:1"}]},
    }
    small = json.dumps(admission_review(pod)).encode()
    heavy = json.loads(small)
    heavy["request"]["object"]["metadata"]["annotations"]["padding"] = "x" * INLINE_BODY_BYTES
    # Large, but the part the injector reads is small: decoded in a thread, answered there.
    env = [{"name": f"E{n}", "value": "x" * 100} for n in range(INLINE_BODY_BYTES // 100)]
    large = json.loads(small)
    large["request"]["object"]["spec"]["containers"][0]["env"] = env
    bodies = [small, json.dumps(heavy).encode(), json.dumps(large).encode()]
    bodies.append(b"[" + b" " * INLINE_BODY_BYTES + b"not json")

    async def reviews() -> list[int]:
        answers = [await endpoint._review(body) for body in bodies]
        assert [status for status, _ in answers] == [200, 200, 200, 400]
        return [threading.get_ident()] * len(answers)

    loop_thread = asyncio.run(reviews())
    assert seen == loop_thread


# Injections summarised (`outrigger serve --decision-log-interval`) --------------------------

OTHER = AdmissionRequest("uid-3", "shop", None, "api-5f6d-", "ReplicaSet/api-5f6d")
DENIED = Verdict("denied", "invalid-annotation", message="annotation outrigger.dev/inject: no")


def test_injections_are_summarised_per_owner_within_the_interval(pipe: Pipe) -> None:
    _handler = direct(pipe, json_lines=True, summary_seconds=0.05)
    second = replaced(REQUEST, uid="uid-2")

    async def injections() -> list[bytes]:
        log_decision(REQUEST, INJECTED, "v1", 0.000214, "c1")
        log_decision(OTHER, INJECTED, "v1", 0.0003, "c1")
        log_decision(second, INJECTED, "v1", 0.0001, "c1")
        log_decision(REQUEST, DENIED, "v1", 0.0002, "c1")  # a line of its own, at once
        await asyncio.sleep(0)  # the end of the turn
        at_once = pipe.lines(1)
        await asyncio.sleep(0.2)  # past the interval
        return at_once

    at_once = asyncio.run(injections())
    assert [json.loads(line)["outcome"] for line in at_once] == ["denied"]
    lines = [json.loads(line) for line in b"".join(pipe.written()).splitlines()]
    assert [line["owner"] for line in lines] == ["ReplicaSet/web-7d4b9c", "ReplicaSet/api-5f6d"]
    web = lines[0]
    assert list(web)[:4] == ["time", "level", "logger", "message"]
    assert web["message"] == "injected 2 pods of ReplicaSet/web-7d4b9c in shop"
    expected = {"namespace": "shop", "outcome": "injected", "reason": "injected",
                "sidecars": ["log-watcher", "ambassador"], "policy": "v1",
                "conditions_policy": "c1", "count": 2}  # fmt: skip
    assert expected.items() <= web.items()
    assert web["pods"] == [
        {"pod": "web-7d4b9c-", "uid": "uid-1", "duration_ms": 0.214},
        {"pod": "web-7d4b9c-", "uid": "uid-2", "duration_ms": 0.1},
    ]
    assert lines[1]["message"] == "injected 1 pod of ReplicaSet/api-5f6d in shop"


def test_summaries_part_on_anything_a_platform_team_tells_apart(pipe: Pipe) -> None:
    """Namespace, owner, reason, sidecars, policy and compiled policy each part a summary."""
    _handler = direct(pipe, json_lines=True, summary_seconds=60)
    variants = [
        (REQUEST, INJECTED, "v1", "c1"),
        (replaced(REQUEST, namespace="shop-2"), INJECTED, "v1", "c1"),
        (replaced(REQUEST, owner=""), INJECTED, "v1", "c1"),
        (REQUEST, replaced(INJECTED, reason="reinjected"), "v1", "c1"),
        (REQUEST, replaced(INJECTED, sidecars=("log-watcher",)), "v1", "c1"),
        (REQUEST, INJECTED, "v2", "c1"),
        (REQUEST, INJECTED, "v1", "c2"),
    ]

    async def injections() -> None:
        for request, verdict, policy, compiled in [*variants, *variants]:
            log_decision(request, verdict, policy, 0.001, compiled)

    asyncio.run(injections())
    assert decisions._direct is not None
    decisions._direct.close()  # as at exit
    lines = [json.loads(line) for line in b"".join(pipe.written()).splitlines()]
    assert [line["count"] for line in lines] == [2] * len(variants)
    assert lines[2]["owner"] == "" and lines[2]["message"] == "injected 2 pods in shop"


def test_a_full_summary_is_written_at_once_and_waiting_pods_are_bounded(pipe: Pipe) -> None:
    _handler = direct(pipe, json_lines=True, summary_seconds=60)

    async def injections() -> tuple[list[bytes], list[bytes]]:
        for n in range(200):
            log_decision(replaced(REQUEST, uid=f"w{n}"), INJECTED, "v", 0.001)
        await asyncio.sleep(0)
        full = pipe.lines(2)  # two summaries filled: written without waiting for the timer
        written = sum(json.loads(line)["count"] for line in full)
        # Pods of many owners, none filling its summary: all written at PODS_WAITING.
        for n in range(decisions.PODS_WAITING - (200 - written)):
            log_decision(replaced(OTHER, owner=f"ReplicaSet/o{n % 500}"), INJECTED, "v", 0.001)
        await asyncio.sleep(0)
        return full, pipe.lines(501)

    full, bounded = asyncio.run(injections())
    lines = [json.loads(line) for line in full]
    assert all(len(line) < 8 * 1024 for line in full)
    uids = [pod["uid"] for line in lines for pod in line["pods"]]
    assert uids == [f"w{n}" for n in range(len(uids))] and len(uids) < 200
    lines = [json.loads(line) for line in bounded]
    assert sum(line["count"] for line in lines) == decisions.PODS_WAITING  # w199 among them
    assert len(lines) == 501 and lines[0]["pods"][-1]["uid"] == "w199"
    assert pipe.written() == []  # nothing was left waiting


def test_an_injection_outside_the_event_loop_is_written_at_once(pipe: Pipe) -> None:
    _handler = direct(pipe, json_lines=False, summary_seconds=60)
    hostile = AdmissionRequest("u-\x1b[2J", "shop", None, "web-\n2026 INFO forged", "")
    log_decision(hostile, INJECTED, "v", 0.001)
    (line,) = b"".join(pipe.written()).decode().splitlines()
    assert " INFO outrigger.decisions injected 1 pod in shop owner=- reason=injected " in line
    assert "sidecars=log-watcher,ambassador policy=v conditions=-: " in line
    assert "web-\\x0a2026 INFO forged (u-\\x1b[2J, 1.0ms)" in line


@pytest.mark.parametrize("name", ["w" * 253, "wé" * 126], ids=["longest-name", "non-ascii"])
def test_a_summary_line_stays_under_what_container_runtimes_split(pipe: Pipe, name: str) -> None:
    """CRI-O reads a container's output 8 KiB at a time (containerd cuts at 16 KiB) and
    writes a longer line in parts: a summary of pods with the longest names is written
    before it gets there, whatever its characters encode to."""
    _handler = direct(pipe, json_lines=True, summary_seconds=60)

    async def injections() -> None:
        for n in range(100):
            log_decision(replaced(REQUEST, name=name, uid=f"{n:036d}"), INJECTED, "v", 0.001)
        assert decisions._direct is not None
        decisions._direct.write_summaries()

    asyncio.run(injections())
    lines = b"".join(pipe.written()).splitlines()
    assert len(lines) > 1 and all(len(line) < 8 * 1024 for line in lines)
    uids = [pod["uid"] for line in lines for pod in json.loads(line)["pods"]]
    assert uids == [f"{n:036d}" for n in range(100)]
