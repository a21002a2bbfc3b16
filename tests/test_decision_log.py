"""The decision log's direct path (`webhook.serving.decisions.DirectLines`): what `outrigger
serve` writes for each decision, without the logging machinery, into a real pipe."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Iterator
from typing import TextIO

import pytest

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


def direct(pipe: Pipe, json_lines: bool) -> logging.StreamHandler[TextIO]:
    """Decision lines straight to the pipe (returned: the handler holds its stream)."""
    handler = logging.StreamHandler(os.fdopen(pipe.descriptor, "w", closefd=False))
    decisions.write_directly(handler, json_lines)
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
