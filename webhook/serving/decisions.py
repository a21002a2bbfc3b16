"""The decision log: one line per review that is not a plain skip (an injection, a denial, a
refused request, an error), with what a platform team asks first: which pod, whose, what was
decided and why, which sidecars, under which policy version, and how long it took.

Values are bounded: a denial's message is cut at 1 KiB (it echoes at most a prefix of a bad
value), and no annotation value is written. With `--log-format json` each line is one JSON
object, the fields below at its top level.

A line is written once per pod created in the cluster, so it must cost little beside the
review (issue 22: through `logging` and python-json-logger it cost 28 us, a third of the
throughput). Once `outrigger serve` has configured its log (`write_directly`), each line is
built here with the handler's fields, encoded by orjson and written to the log's file
descriptor in one write (atomic, so it never interleaves with another line); without that
(an embedding program, in-process tests) lines go through `logging` as any other.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import time
from contextlib import AbstractContextManager
from typing import Any, TextIO

import orjson

from webhook.admission.review import AdmissionRequest, Verdict
from webhook.limits import printable

log = logging.getLogger("outrigger.decisions")
# Outcomes logged at info; an unchanged pod (opted out, not requested, excluded, already
# injected, not a pod creation) is a plain skip: counted in /metrics only.
_LOGGED = {"injected": logging.INFO, "denied": logging.INFO, "bad_request": logging.WARNING}


def log_decision(
    request: AdmissionRequest | None,
    verdict: Verdict,
    policy_version: str,
    seconds: float,
    compiled_version: str = "",
) -> None:
    """`compiled_version`: the policy the API server's matchConditions and guard come from
    (as this replica last published them; "" when it does not publish them)."""
    level = logging.ERROR if verdict.outcome == "error" else _LOGGED.get(verdict.outcome)
    if level is None or not log.isEnabledFor(level):
        return
    if request is None:
        uid = namespace = pod = owner = ""
        where = "request"
    else:
        uid, namespace, pod, owner = request.uid, request.namespace, request.name, request.owner
        where = f"{namespace}/{pod}"
    fields = {
        "uid": uid,
        "namespace": namespace,
        "pod": pod,
        "owner": owner,
        "outcome": verdict.outcome,
        "reason": verdict.reason,
        "sidecars": verdict.sidecars,
        "policy": policy_version,
        "conditions_policy": compiled_version,
        "duration_ms": round(seconds * 1000, 3),
    }
    if verdict.message:
        fields["detail"] = verdict.message
    if _direct is not None and _direct.json:
        # The handler's order: `time`, `level`, `logger`, `message` (what and where, for a
        # reader's eye; the fields say it all), then the fields.
        message = f"{verdict.outcome} {where}"
        record = {"time": _direct.asctime(), "level": _LEVELS[level], "logger": _NAME,
                  "message": message, **fields}  # fmt: skip
        _direct.add(_json_line(record))
        return
    text = (
        f"{verdict.outcome} {where} owner={owner or '-'} reason={verdict.reason} "
        f"sidecars={','.join(verdict.sidecars) or '-'} policy={policy_version} "
        f"conditions={compiled_version or '-'} {fields['duration_ms']}ms"
    )
    if verdict.message:
        text += f": {verdict.message}"
    if _direct is not None:
        _direct.write_text(level, text)
    else:
        fields["sidecars"] = list(verdict.sidecars)
        log.log(level, text, extra=fields)


class DirectLines:
    """Decision lines written straight to a file descriptor, with what the handler of
    `webhook.serving.logs` would write: JSON (`time`, `level`, `logger`, `message`, then the
    fields; ASCII only, as its encoder writes it) or escaped text.

    The lines of one turn of the event loop (the reviews answered together under load) go
    out in one write, made at the end of that turn: a write per line cost as much as the
    rest of the line. Written under the handler's lock, so no other log line (from another
    thread) lands inside them; a line made outside the event loop is written at once."""

    def __init__(
        self, descriptor: int, json_lines: bool, lock: AbstractContextManager[Any]
    ) -> None:
        self._descriptor = descriptor
        self.json = json_lines
        self._lock = lock
        self._pending: list[bytes] = []
        self._millisecond = -1
        self._second = -1
        self._stamp = ""
        self._second_stamp = ""

    def write_text(self, level: int, text: str) -> None:
        self.add(f"{self.asctime()} {_LEVELS[level]} {_NAME} {printable(text)}\n".encode())

    def add(self, line: bytes) -> None:
        if not self._pending:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no event loop in this thread: now
                self._pending.append(line)
                self.flush()
                return
        self._pending.append(line)

    def flush(self) -> None:
        data = b"".join(self._pending)
        self._pending.clear()
        with self._lock:
            while data:  # a blocking descriptor writes it whole, bar a signal
                data = data[os.write(self._descriptor, data) :]

    def asctime(self) -> str:
        """`logging`'s default asctime ("2026-12-07 03:09:18,413"), made once a millisecond
        (under load several lines share one)."""
        now = time.time()
        millisecond = int(now * 1000)
        if millisecond != self._millisecond:
            self._millisecond = millisecond
            second = millisecond // 1000
            if second != self._second:
                self._second = second
                self._second_stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._stamp = f"{self._second_stamp},{millisecond % 1000:03d}"
        return self._stamp


_NAME = log.name
_LEVELS = {level: logging.getLevelName(level) for level in (logging.INFO, logging.WARNING,
                                                            logging.ERROR)}  # fmt: skip


def _json_line(record: dict[str, Any]) -> bytes:
    try:
        line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:  # a lone surrogate: the handler's encoder escapes it
        line = b""
    if line.isascii() and line:
        return line
    return (json.dumps(record) + "\n").encode()  # non-ASCII as \u escapes, like the handler


# Set by `write_directly` when `outrigger serve` configures its log.
_direct: DirectLines | None = None


def write_directly(handler: logging.StreamHandler[TextIO], json_lines: bool) -> None:
    """Write decision lines straight to the descriptor of `handler`'s stream from now on
    (`DirectLines`), flushed at exit; a stream without one (a test's capture) keeps them on
    `logging`."""
    global _direct
    if _direct is not None:
        _direct.flush()
    try:
        descriptor = handler.stream.fileno()
    except (AttributeError, OSError, ValueError):
        _direct = None
        return
    assert handler.lock is not None  # made by Handler.__init__
    _direct = DirectLines(descriptor, json_lines, handler.lock)
    atexit.register(_direct.flush)
