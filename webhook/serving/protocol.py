"""uvicorn's httptools protocol with the two things a webhook server needs and uvicorn lacks.

- **Read timeouts.** A request must arrive whole (headers and body) within
  `REQUEST_READ_SECONDS` of its first byte, or of the connection (the API server's webhook
  timeout is 10 s by default, at most 30): a client that sends part of its headers, a chunked
  body without its end or less body than its Content-Length is answered 408 and disconnected,
  instead of holding a connection (and its memory) for ever.
- **Draining shutdown.** uvicorn closes idle keep-alive connections at once on SIGTERM, so a
  request the API server wrote to one a moment before is lost (Go's client does not retry a
  POST). Here a connection that is idle at shutdown stays open for `DRAIN_IDLE_SECONDS`: a
  request that arrives on it is answered, with `Connection: close`; responses in flight carry
  `Connection: close` too. Then it is closed. uvicorn bounds the whole shutdown
  (`timeout_graceful_shutdown`).
- **Bounded pipelining.** uvicorn queues pipelined requests and reads on after every answer,
  so a client that pipelines without reading the answers grows the queue without bound (ten
  such clients took the process past 1.4 GiB). Here reading stays paused while any request
  waits in the queue, at most `READ_AHEAD_BYTES` of TLS records are read ahead, and a client
  with more than `MAX_PIPELINED` requests queued is disconnected (Go's client, the API
  server's, never pipelines).
- **Reviews answered in place.** A `POST /mutate` with a small body (the API server's every
  review) is answered here, from the parser's callbacks, without uvicorn's ASGI cycle (a task,
  an event, scope and message dicts per request, which cost as much as the review itself):
  `ReviewCycle` stands for that cycle, with the fields the rest of this class reads. Anything
  else (other paths, chunked or large bodies, a request pipelined behind one in progress)
  goes through ASGI as before.
- **No upgrades.** A request asking to switch protocols (`Connection: upgrade`, such as
  `h2c` or a WebSocket) is answered 400 and the connection closed: the rest of what the
  client sends, its body included, is never read as another request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from webhook.serving.app import (
    BUSY,
    INLINE_BODY_BYTES,
    MUTATE_PATH,
    AdmissionEndpoint,
    Answer,
    Reviewed,
)
from webhook.serving.metrics import ConnectionClosed, Metrics
from webhook.serving.writes import HeldWrites, TurnWrites

log = logging.getLogger("outrigger.server")

REQUEST_READ_SECONDS = 5.0
DRAIN_IDLE_SECONDS = 2.0
ABORT_SECONDS = 1.0
MAX_PIPELINED = 16
# Bytes of TLS records read ahead per connection before reading pauses (uvloop's default is
# 256 KiB; a review is a few KiB, and a thousand connections must fit the memory limit).
READ_AHEAD_BYTES = 64 * 1024
_DRAINING = "outrigger_draining"
_TURN_WRITES = "outrigger_turn_writes"
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"content-length: 48\r\nconnection: close\r\n\r\n"
    b'{"error":"request not received within the time"}'
)
_INTERNAL_ERROR = b'{"error":"internal error"}'
_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}
_MUTATE = MUTATE_PATH.encode()
_JSON_LENGTH = b"content-type: application/json\r\ncontent-length: "
_UPGRADE_REFUSED = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
    b"content-length: 47\r\nconnection: close\r\n\r\n"
    b'{"error":"protocol upgrades are not supported"}'
)


class _NoEvent:
    """uvicorn sets its cycle's event when the connection is lost; nothing waits on ours."""

    @staticmethod
    def set() -> None:
        pass


class ReviewCycle:
    """A review answered in place: what uvicorn's `RequestResponseCycle` tells the protocol
    (and the connection gate) about a request, and the body's chunks."""

    __slots__ = ("chunks", "disconnected", "held", "keep_alive", "more_body", "response_complete")
    response_started = False  # the answer is written whole, once
    message_event = _NoEvent()

    def __init__(self, keep_alive: bool, held: int) -> None:
        self.chunks: list[bytes] = []
        self.held = held  # bytes of the body budget, given back once answered
        self.keep_alive = keep_alive
        self.more_body = True
        self.response_complete = False
        self.disconnected = False


class WebhookHttpProtocol(HttpToolsProtocol):
    cycle: RequestResponseCycle | ReviewCycle  # type: ignore[assignment]
    _read_timer: asyncio.TimerHandle | None = None
    _drain_timer: asyncio.TimerHandle | None = None
    _abort_timer: asyncio.TimerHandle | None = None
    _held: HeldWrites
    _draining = False
    # Set when the connection is being dropped: what is still parsed is ignored.
    _refusing = False
    # Responses completed on this connection (the connection cap spares answered ones).
    answered = 0

    def __init__(
        self,
        *args: Any,
        metrics: Metrics | None = None,
        endpoint: AdmissionEndpoint | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._metrics = metrics
        self._endpoint = endpoint

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        turn = getattr(self.server_state, _TURN_WRITES, None)
        if turn is None:  # one for the server's connections, all on its event loop
            turn = TurnWrites(self.loop)
            setattr(self.server_state, _TURN_WRITES, turn)
        # Answers leave at the end of the loop's turn, all connections' together (`writes`).
        self._held = HeldWrites(transport, turn)
        super().connection_made(self._held)  # type: ignore[arg-type]
        # uvloop's TLS transport: how far it reads ahead of what the parser was fed.
        transport.set_read_buffer_limits(high=READ_AHEAD_BYTES)  # type: ignore[attr-defined]
        # Accepted in the moment between SIGTERM and the listener's closing: drain it too.
        self._draining = getattr(self.server_state, _DRAINING, False)
        self._arm_read_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        if type(cycle) is ReviewCycle and self._endpoint is not None:
            self._endpoint.budget.give_back(cycle.held)  # left before its body was whole
            cycle.held = 0
        self._cancel(self._read_timer)
        self._cancel(self._drain_timer)
        self._cancel(self._abort_timer)
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._cancel(self._drain_timer)
        if self._read_timer is None:
            self._arm_read_timer()

    def on_headers_complete(self) -> None:
        if self._refusing:
            return
        if self.parser.should_upgrade():
            self._refuse(_UPGRADE_REFUSED, "upgrade")
            return
        declared = self._review_in_place()
        if declared is not None:
            self._begin_review(declared)
            return
        super().on_headers_complete()
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False  # answered, then closed
        if len(self.pipeline) > MAX_PIPELINED:
            self._refuse(None, "pipelining")

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if type(cycle) is ReviewCycle:
            if not cycle.response_complete:
                cycle.chunks.append(body)
        elif not self._refusing:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refusing:
            return
        cycle = self.cycle
        if type(cycle) is ReviewCycle:
            cycle.more_body = False
        else:
            super().on_message_complete()
        self._cancel(self._read_timer)
        self._read_timer = None
        if type(cycle) is ReviewCycle and not cycle.response_complete:
            self._answer_review(cycle)

    # Reviews answered in place ----------------------------------------------------------

    def _review_in_place(self) -> int | None:
        """The body's declared length when this request is a review to answer in place:
        `POST /mutate`, a Content-Length within the inline size, nothing before it still
        being answered on this connection (answers leave in order), no `Expect`, and the
        client reading its answers: past the transport's write buffer, requests queue as
        uvicorn's do, so that one pipelining without reading is disconnected."""
        if (
            self._endpoint is None
            or self.expect_100_continue
            or self.flow.write_paused
            or self._held.holding()  # pipelined behind an answer still held: queued, as below
            or (self.cycle is not None and not self.cycle.response_complete)
            or self.parser.get_method() != b"POST"
            or self.url.partition(b"?")[0] != _MUTATE
        ):
            return None
        declared = None
        for name, value in self.headers:
            if name == b"content-length":
                if declared is not None or not value.isdigit():
                    return None  # let uvicorn's path refuse it
                declared = int(value)
            elif name == b"transfer-encoding":
                return None
        return declared if declared is not None and declared <= INLINE_BODY_BYTES else None

    def _begin_review(self, declared: int) -> None:
        assert self._endpoint is not None
        keep_alive = (
            not self._draining
            and self.parser.get_http_version() != "1.0"
            and self.parser.should_keep_alive()
        )
        admitted = self._endpoint.hold_body(declared)
        cycle = ReviewCycle(keep_alive, declared if admitted else 0)
        self.cycle = cycle
        if not admitted:  # answered unread; the body that follows is skipped
            self._write_answer(cycle, 503, BUSY, b"retry-after: 1\r\n")

    def _answer_review(self, cycle: ReviewCycle) -> None:
        assert self._endpoint is not None
        body = cycle.chunks[0] if len(cycle.chunks) == 1 else b"".join(cycle.chunks)
        cycle.chunks = []
        try:
            outcome = self._endpoint.review(body)
        except Exception as error:  # a bug must not take the connection down unanswered
            outcome = _failed(error)
        if callable(outcome):
            # A heavy pod: answered from a thread; nothing more is read meanwhile.
            self.flow.pause_reading()
            task = self.loop.create_task(self._answer_from_thread(cycle, outcome))
            task.add_done_callback(self.tasks.discard)
            self.tasks.add(task)
        else:
            self._write_answer(cycle, *outcome)

    async def _answer_from_thread(self, cycle: ReviewCycle, work: Callable[[], Reviewed]) -> None:
        assert self._endpoint is not None
        try:
            answer = await self._endpoint.answer_in_thread(work)
        except Exception as error:
            answer = _failed(error)
        self._write_answer(cycle, *answer)

    def _write_answer(
        self, cycle: ReviewCycle, status: int, body: bytes, extra: bytes = b""
    ) -> None:
        """Write the whole answer (one write: one TLS record for a review's few KiB); then
        as uvicorn after a response: close, or read on and start what is queued."""
        if self._endpoint is not None:
            self._endpoint.budget.give_back(cycle.held)
            cycle.held = 0
        cycle.response_complete = True
        if self.transport.is_closing():
            return
        closing = b"" if cycle.keep_alive else b"connection: close\r\n"
        reason = _REASONS.get(status, b"")  # the phrase is optional; the code says it
        # uvicorn's default headers (its `date`, updated every second), as its cycle sends.
        defaults = b"".join([b"%s: %s\r\n" % pair for pair in self.server_state.default_headers])
        self.transport.write(
            b"HTTP/1.1 %d %s\r\n%s%s%d\r\n%s%s\r\n%s"
            % (status, reason, defaults, _JSON_LENGTH, len(body), extra, closing, body)
        )
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()

    def on_response_complete(self) -> None:
        self.answered += 1
        super().on_response_complete()  # reads on, and starts the next queued request
        if self.pipeline:
            self.flow.pause_reading()  # still queued: nothing more is read meanwhile
        if self._draining:
            self._close()

    def _unsupported_upgrade_warning(self) -> None:
        """uvicorn's reaction to an upgrade it cannot make; answered in on_headers_complete."""

    def busy(self) -> bool:
        """Whether a request is being received, answered or waits on this connection."""
        return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)

    def answering(self) -> bool:
        """Whether a request was received whole and its answer is not yet written."""
        cycle = self.cycle
        return cycle is not None and not cycle.more_body and not cycle.response_complete

    def _refuse(self, response: bytes | None, reason: ConnectionClosed) -> None:
        """Drop the connection, answering `response` first; nothing more is read from it."""
        self._refusing = True
        self.pipeline.clear()
        if self._metrics is not None:
            self._metrics.count_connection_closed(reason)
        if response is not None and not self.transport.is_closing():
            self.transport.write(response)
        self._close()

    def shutdown(self) -> None:
        setattr(self.server_state, _DRAINING, True)  # shared by the server's connections
        self._draining = True
        if self.cycle is None or self.cycle.response_complete:
            # Idle: the API server may be writing a request right now; give it the time.
            self._drain_timer = self.loop.call_later(DRAIN_IDLE_SECONDS, self._close_if_idle)
        else:
            self.cycle.keep_alive = False

    def _close_if_idle(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) and self._read_timer is None:
            self._close()

    def _arm_read_timer(self) -> None:
        self._read_timer = self.loop.call_later(REQUEST_READ_SECONDS, self._read_timed_out)

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(_TIMEOUT_RESPONSE)
        self._close()

    def _close(self) -> None:
        """Close, and drop the connection a second later if the client does not answer TLS's
        closing handshake (a stalled or departed client would hold it, and a shutdown)."""
        if not self.transport.is_closing():
            self.transport.close()  # uvicorn may have closed it already (Connection: close)
        if self._abort_timer is None:
            self._abort_timer = self.loop.call_later(ABORT_SECONDS, self.transport.abort)

    @staticmethod
    def _cancel(timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()


def _failed(error: Exception) -> Answer:
    """A review that raised (a bug: the admission layer answers every failure it knows):
    a 500 with a fixed message, and an ERROR line naming the exception's type only."""
    log.error("review failed with %s", type(error).__name__)
    return 500, _INTERNAL_ERROR
