"""The decision log: every review that is not a plain skip (an injection, a denial, a refused
request, an error), with what a platform team asks first: which pod, whose, what was decided
and why, which sidecars, under which policy version, and how long it took.

A denial, a refused request and an error are one line each, at once. Injections are written
by `outrigger serve` as summaries (`--decision-log-interval`, default 1 s): one line per owner,
reason, sidecars and policy, listing each pod (name, uid, duration), written at most that
interval after its first pod (or once 5 KiB of them, about 50, wait); with an interval of 0,
a line per injection.

Values are bounded: a denial's message is cut at 1 KiB (it echoes at most a prefix of a bad
value), and no annotation value is written. With `--log-format json` each line is one JSON
object, the fields below at its top level.

The log is written for every pod created in the cluster, so it must cost little beside the
review (issue 22: through `logging` and python-json-logger a line cost 28 us, a third of the
throughput; a line per injection, built and written as below, still cost 12-15%: 4.4 us in
process, against 1.5 us for a pod's share of a summary). Once `outrigger serve` has
configured its log (`write_directly`), each line is built here with the handler's fields,
encoded by orjson and written to the log's file descriptor in one write (atomic, so it never
interleaves with another line); without that (an embedding program, in-process tests) a line
per decision goes through `logging`.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, asynccontextmanager
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
    direct = _direct
    if (
        direct is not None
        and direct.summary_seconds
        and verdict.outcome == "injected"
        and log.isEnabledFor(logging.INFO)
    ):
        assert request is not None  # only a request's review injects
        group = (request.namespace, request.owner, verdict.reason, verdict.sidecars,
                 policy_version, compiled_version)  # fmt: skip
        direct.summarise(group, (request.name, request.uid, seconds))
        return
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
        "duration_ms": _milliseconds(seconds),
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


# A summary lists pods in at most about this many bytes (a full one is written at once), and
# at most this many pods wait in all (then every summary is written): what waits stays small,
# and a line stays under 8 KiB: CRI-O (conmon) reads a container's output 8 KiB at a time and
# containerd cuts lines at 16 KiB, writing the parts of a longer line as partial lines that
# not every log pipeline joins again. About 50 pods of usual names fill a summary.
SUMMARY_BYTES = 5 * 1024
PODS_WAITING = 1000
_POD_ENTRY_BYTES = 48  # a pod's entry but its name and uid: {"pod":"","uid":"",...}

Group = tuple[str, str, str, tuple[str, ...], str, str]  # what a summary's pods share
Summarised = tuple[str, str, float]  # a pod's name, uid and review seconds


class _Summary:
    """The pods of one group waiting for their line, and the bytes their entries will take."""

    __slots__ = ("pods", "size")

    def __init__(self) -> None:
        self.pods: list[Summarised] = []
        self.size = 0


def _entry_bytes(pod: Summarised) -> int:
    name, uid, _seconds = pod
    size = len(name) + len(uid)
    if not (name.isascii() and uid.isascii()):
        size *= 6  # at worst every character a \uXXXX escape (the API server refuses such
        # names, but only after the admission webhooks)
    return size + _POD_ENTRY_BYTES


class DirectLines:
    """Decision lines written straight to a file descriptor, with what the handler of
    `webhook.serving.logs` would write: JSON (`time`, `level`, `logger`, `message`, then the
    fields; ASCII only, as its encoder writes it) or escaped text.

    The lines of one turn of the event loop (the reviews answered together under load) go
    out in one write, made at the end of that turn: a write per line cost as much as the
    rest of the line. Written under the handler's lock, so no other log line (from another
    thread) lands inside them; a line made outside the event loop is written at once.

    With `summary_seconds`, injections are gathered by `Group` and written as summaries
    (`summarise`), at most that long after the first pod that waits."""

    def __init__(
        self,
        descriptor: int,
        json_lines: bool,
        lock: AbstractContextManager[Any],
        summary_seconds: float = 0.0,
    ) -> None:
        self._descriptor = descriptor
        self.json = json_lines
        self._lock = lock
        self.summary_seconds = summary_seconds
        self._pending: list[bytes] = []
        self._groups: dict[Group, _Summary] = {}
        self._waiting = 0
        self._timer_loop: asyncio.AbstractEventLoop | None = None  # where a timer is set
        self._millisecond = -1
        self._second = -1
        self._stamp = ""
        self._second_stamp = ""

    def write_text(self, level: int, text: str) -> None:
        self.add(f"{self.asctime()} {_LEVELS[level]} {_NAME} {printable(text)}\n".encode())

    def add(self, line: bytes) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop in this thread (at exit, an embedding program)
            self._write(line)
            return
        if not self._pending:
            loop.call_soon(self.flush)
        self._pending.append(line)

    def flush(self) -> None:
        data = b"".join(self._pending)
        self._pending.clear()
        self._write(data)

    def _write(self, data: bytes) -> None:
        with self._lock:
            while data:  # a blocking descriptor writes it whole, bar a signal
                data = data[os.write(self._descriptor, data) :]

    def summarise(self, group: Group, pod: Summarised) -> None:
        """Count an injected pod into its group's summary (on the event loop: a pod's share
        of a line is a tuple appended; outside it, a summary of the one pod at once)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write(self._summary(group, [pod]))
            return
        summary = self._groups.get(group)
        if summary is None:
            summary = self._groups[group] = _Summary()
            if self._timer_loop is not loop:  # no timer set (or only on a closed loop)
                self._timer_loop = loop
                loop.call_later(self.summary_seconds, self._on_timer)
        summary.pods.append(pod)
        summary.size += _entry_bytes(pod)
        self._waiting += 1
        if summary.size >= SUMMARY_BYTES:
            del self._groups[group]
            self._waiting -= len(summary.pods)
            self.add(self._summary(group, summary.pods))
        elif self._waiting >= PODS_WAITING:
            self.write_summaries()

    def _on_timer(self) -> None:
        self._timer_loop = None
        self.write_summaries()

    def write_summaries(self) -> None:
        """Write every summary now (a pod waits no longer than `summary_seconds`: a group
        that starts while the timer runs is written with the others, early)."""
        groups, self._groups, self._waiting = self._groups, {}, 0
        for group, summary in groups.items():
            self.add(self._summary(group, summary.pods))

    def close(self) -> None:
        """Write what waits, and from now on a line per injection (at shutdown; a timer
        still set then finds nothing to write)."""
        self.summary_seconds = 0.0
        self.write_summaries()
        self.flush()

    def _summary(self, group: Group, pods: list[Summarised]) -> bytes:
        namespace, owner, reason, sidecars, policy, conditions = group
        count = f"{len(pods)} pod{'s' if len(pods) > 1 else ''}"
        whose = f" of {owner}" if owner else ""
        if self.json:
            record = {"time": self.asctime(), "level": _LEVELS[logging.INFO], "logger": _NAME,
                      "message": f"injected {count}{whose} in {namespace}",
                      "namespace": namespace, "owner": owner, "outcome": "injected",
                      "reason": reason, "sidecars": sidecars, "policy": policy,
                      "conditions_policy": conditions, "count": len(pods),
                      "pods": [{"pod": name, "uid": uid, "duration_ms": _milliseconds(seconds)}
                               for name, uid, seconds in pods]}  # fmt: skip
            return _json_line(record)
        listed = ", ".join(
            f"{name} ({uid}, {_milliseconds(seconds)}ms)" for name, uid, seconds in pods
        )
        text = (
            f"injected {count} in {namespace} owner={owner or '-'} reason={reason} "
            f"sidecars={','.join(sidecars) or '-'} policy={policy} "
            f"conditions={conditions or '-'}: {listed}"
        )
        return f"{self.asctime()} INFO {_NAME} {printable(text)}\n".encode()

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


def _milliseconds(seconds: float) -> float:
    """To the microsecond (as round(seconds * 1000, 3), in a quarter of its time)."""
    return int(seconds * 1_000_000 + 0.5) / 1000


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


@asynccontextmanager
async def summaries_written() -> AsyncIterator[None]:
    """A lifespan hook: the summaries that wait are written when the server shuts down (after
    its connections are drained). Not at exit alone: uvicorn ends the process on SIGTERM by
    raising the signal again once it has shut down, and no exit handler runs then."""
    try:
        yield
    finally:
        if _direct is not None:
            _direct.close()


# Set by `write_directly` when `outrigger serve` configures its log.
_direct: DirectLines | None = None


def write_directly(
    handler: logging.StreamHandler[TextIO], json_lines: bool, summary_seconds: float = 0.0
) -> None:
    """Write decision lines straight to the descriptor of `handler`'s stream from now on
    (`DirectLines`; injections summarised every `summary_seconds`, 0: a line each), written
    out at exit; a stream without one (a test's capture) keeps a line per decision on
    `logging`."""
    global _direct
    if _direct is not None:
        _direct.close()
    try:
        descriptor = handler.stream.fileno()
    except (AttributeError, OSError, ValueError):
        _direct = None
        return
    assert handler.lock is not None  # made by Handler.__init__
    _direct = DirectLines(descriptor, json_lines, handler.lock, summary_seconds)
    atexit.register(_direct.close)
