"""The HTTP layer: FastAPI around `webhook.admission.review`. It knows HTTP; nothing else does.

`POST /mutate` is answered by `AdmissionEndpoint`, a bare ASGI app in front of FastAPI, not by
a FastAPI route: the API server calls it for every pod, and FastAPI's per-request machinery
(telemetry hooks, middleware, route matching, dependency solving, response classes) costs more
than the mutation itself. Every other request goes on to the FastAPI app and its routes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from functools import partial

from fastapi import FastAPI
from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from webhook.admission.review import (
    AdmissionRequest,
    Verdict,
    bad_request_verdict,
    is_heavy,
    parse,
    respond_with_verdict,
)
from webhook.core.policy import Policy
from webhook.serving.decisions import log_decision
from webhook.serving.logs import Throttled
from webhook.serving.memory import release_free_pages
from webhook.serving.metrics import TEXT_FORMAT, Metrics

MUTATE_PATH = "/mutate"
# The API server sends objects of at most ~3 MiB; anything far larger is not a review.
MAX_BODY_BYTES = 8 * 1024 * 1024
# Bodies past this are decoded off the event loop too (an API server's pod is a few KiB).
INLINE_BODY_BYTES = 256 * 1024
# The bytes of request bodies held at once, all requests together: a review's decoding and
# answer take about three times its body, so this bounds them near 100 MiB (the chart's
# memory limit is 256Mi). One body alone is always admitted, whatever its size.
BODY_BUDGET_BYTES = 32 * 1024 * 1024
# After a large body, when the heap's free pages go back to the system (`release_free_pages`).
RELEASE_AFTER_SECONDS = 1.0
_JSON = "application/json"
_TOO_LARGE = b'{"error":"request body too large"}'
BUSY = b'{"error":"too many large requests at once; retry"}'
_NOT_ALLOWED = b'{"error":"method not allowed; use POST"}'


# Runs for the app's lifetime, such as the policy file's poller (`PolicyFile.watching`).
Background = Callable[[], AbstractAsyncContextManager[None]]


# Told of every review once answered (request, verdict, policy version, the compiled policy's
# version), on the event loop: must return at once (`webhook.cluster.events` queues).
DecisionObserver = Callable[[AdmissionRequest | None, Verdict, str, str], None]


def create_app(
    policy: Callable[[], Policy],
    *,
    metrics: Metrics | None = None,
    background: Background | None = None,
    observer: DecisionObserver | None = None,
    own_namespace: str = "",
) -> AdmissionEndpoint:
    """`policy` returns the policy in force, so a reload takes effect on the next request.

    `metrics` (a fresh set by default) is served at `/metrics` and reports `policy()`'s version;
    `background` is entered at startup and left at shutdown (the ASGI lifespan); `observer`
    is told of each decision after the decision log; `own_namespace`, the webhook's, is never
    injected into ("": none).
    """
    metrics = Metrics() if metrics is None else metrics
    metrics.follow_policy(policy)
    app = _fastapi_app(policy, metrics, background)
    return AdmissionEndpoint(app, policy, metrics, observer, own_namespace)


def _fastapi_app(
    policy: Callable[[], Policy], metrics: Metrics, background: Background | None
) -> FastAPI:
    app = FastAPI(
        title="Outrigger",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=None if background is None else (lambda _app: background()),
    )

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type=_JSON)

    @app.get("/readyz")
    async def readyz() -> Response:
        # Ready once a valid policy is in force. A reloading policy always has one: a bad new
        # version is rejected and the last good one keeps serving, so readiness stays.
        policy()
        return Response(b'{"status":"ready"}', media_type=_JSON)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        # A handful of samples: microseconds of work, not worth a hop to the thread pool.
        return Response(metrics.exposition(), media_type=TEXT_FORMAT)

    return app


class BodyBudget:
    """The bytes of request bodies held at once, against `BODY_BUDGET_BYTES`. A request takes
    its share before its body is read (its Content-Length, or chunk by chunk) and gives it
    back once answered; one that does not fit is answered 503 at once, unread."""

    def __init__(self, limit: int = BODY_BUDGET_BYTES) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        if self.held and self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give_back(self, size: int) -> None:
        self.held -= size


class _Busy(Exception):
    """A body that does not fit the budget."""


class _Share:
    """What one request holds of the budget: grown as its body is known, given back whole."""

    def __init__(self, budget: BodyBudget) -> None:
        self._budget = budget
        self._held = 0
        self.asked = 0  # the most bytes asked for, held or not

    def hold(self, size: int) -> None:
        """Hold at least `size` bytes; raises `_Busy` when the budget has no room for them."""
        self.asked = max(self.asked, size)
        if size > self._held:
            if not self._budget.take(size - self._held):
                raise _Busy
            self._held = size

    def give_back(self) -> None:
        self._budget.give_back(self._held)
        self._held = 0


class AdmissionEndpoint:
    """Answers `POST /mutate`; passes every other request (and lifespan) on to FastAPI."""

    def __init__(
        self,
        app: ASGIApp,
        policy: Callable[[], Policy],
        metrics: Metrics | None = None,
        observer: DecisionObserver | None = None,
        own_namespace: str = "",
    ) -> None:
        self.app = app
        self.policy = policy
        self.own_namespace = own_namespace
        self.metrics = Metrics() if metrics is None else metrics
        self.observer = observer
        self.budget = BodyBudget()
        self._release: asyncio.TimerHandle | None = None
        self._busy_warning = Throttled(
            "request bodies at their budget (%d bytes held at once): answered %d request(s) "
            "503 since the last such line"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != MUTATE_PATH:
            await self.app(scope, receive, send)
        elif scope["method"] != "POST":
            await _respond(send, 405, _NOT_ALLOWED, ((b"allow", b"POST"),))
        else:
            share = _Share(self.budget)  # given back once answered
            try:
                body = await _read_body(scope, receive, share)
                if body is None:
                    await _respond(send, 413, _TOO_LARGE)
                else:
                    await _respond(send, *await self._review(body))
            except _Busy:
                self.refused_busy()
                await _respond(send, 503, BUSY, ((b"retry-after", b"1"),))
            finally:
                share.give_back()
                if share.asked > INLINE_BODY_BYTES:
                    self._release_memory_soon()

    def _release_memory_soon(self) -> None:
        """Give the heap's free pages back to the system a second after a large body (once
        for a burst of them: `release_free_pages`), so that a burst does not leave the
        process near its memory limit."""
        if self._release is None:
            loop = asyncio.get_running_loop()
            self._release = loop.call_later(RELEASE_AFTER_SECONDS, self._released)

    def _released(self) -> None:
        self._release = None
        release_free_pages()

    def hold_body(self, size: int) -> bool:
        """Take `size` bytes of the body budget for a review answered without ASGI
        (`webhook.serving.protocol`); False, counted and warned, when they do not fit. The
        caller gives them back to `budget` once answered."""
        if self.budget.take(size):
            return True
        self.refused_busy()
        return False

    def refused_busy(self) -> None:
        self.metrics.count_busy()
        self._busy_warning.note(self.budget.limit)

    async def _review(self, body: bytes) -> Answer:
        """The answer to a review that came through ASGI (large or chunked bodies, and the
        rare request that is pipelined behind another): large bodies are decoded in a thread."""
        if len(body) > INLINE_BODY_BYTES:
            return await self.answer_in_thread(partial(self._reviewed_in_full, body))
        outcome = self.review(body)
        return await self.answer_in_thread(outcome) if callable(outcome) else outcome

    def review(self, body: bytes) -> Answer | Callable[[], Reviewed]:
        """The answer to `body`, or, for a heavy pod, the work that makes it: to be run in a
        thread (so that the event loop keeps answering the other reviews and the probes) by
        `answer_in_thread`.

        Small reviews are answered on the event loop (microseconds, mostly memoised: a hop to
        a thread would cost more). Every review is counted, timed and, unless it is a plain
        skip, logged (`webhook.serving.decisions`)."""
        outcome = self._decided(body)
        return outcome if callable(outcome) else self.account(*outcome)

    async def answer_in_thread(self, work: Callable[[], Reviewed]) -> Answer:
        """`work` done in a thread, then accounted for back on the event loop."""
        return self.account(*await asyncio.to_thread(work))

    def _decided(self, body: bytes) -> Reviewed | Callable[[], Reviewed]:
        """What was decided about `body`, or the work that decides it (a heavy pod)."""
        started = time.perf_counter()
        policy = self.policy()
        request = parse(body, policy.selector_label_keys)
        if not isinstance(request, AdmissionRequest):  # the refusal (400)
            return request, bad_request_verdict(request), None, policy, started
        if is_heavy(request, policy):
            return partial(_reviewed, request, policy, self.own_namespace, started)
        return _reviewed(request, policy, self.own_namespace, started)

    def _reviewed_in_full(self, body: bytes) -> Reviewed:
        """`_decided`, heavy or not (in a thread already)."""
        outcome = self._decided(body)
        return outcome() if callable(outcome) else outcome

    def account(
        self,
        answer: Answer,
        verdict: Verdict,
        request: AdmissionRequest | None,
        policy: Policy,
        started: float,
    ) -> Answer:
        """Count, time and log a review, and tell the observer (on the event loop: the
        decision log's writer and the Events' queue are not shared with threads); returns
        its answer."""
        seconds = time.perf_counter() - started
        self.metrics.observe_review(verdict.outcome, verdict.reason, verdict.sidecars, seconds)
        compiled = self.metrics.compiled_version
        log_decision(request, verdict, policy.version, seconds, compiled)
        if self.observer is not None:
            self.observer(request, verdict, policy.version, compiled)
        return answer


Answer = tuple[int, bytes]  # HTTP status and body
Reviewed = tuple[Answer, Verdict, AdmissionRequest | None, Policy, float]


def _reviewed(
    request: AdmissionRequest, policy: Policy, own_namespace: str, started: float
) -> Reviewed:
    answer, verdict = respond_with_verdict(request, policy, own_namespace)
    return answer, verdict, request, policy, started


async def _read_body(scope: Scope, receive: Receive, share: _Share) -> bytes | None:
    """The body, or None past the limit (also for chunked bodies that declare no length).
    Its bytes are held in `share` before they are read (its Content-Length first, else as
    they come); raises `_Busy` when they do not fit."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit():
            declared = int(value)
            if declared > MAX_BODY_BYTES:
                return None
            share.hold(declared)
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return b""  # the client is gone; an empty body is answered with a 400 no one reads
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        share.hold(size)  # chunked, or more than declared (which the parser refuses)
        chunks.append(chunk)
        more = message.get("more_body", False)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _respond(
    send: Send, status: int, body: bytes, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
