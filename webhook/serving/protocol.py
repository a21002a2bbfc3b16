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
- **No upgrades.** A request asking to switch protocols (`Connection: upgrade`, such as
  `h2c` or a WebSocket) is answered 400 and the connection closed: the rest of what the
  client sends, its body included, is never read as another request.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from webhook.serving.metrics import ConnectionClosed, Metrics

REQUEST_READ_SECONDS = 5.0
DRAIN_IDLE_SECONDS = 2.0
ABORT_SECONDS = 1.0
MAX_PIPELINED = 16
# Bytes of TLS records read ahead per connection before reading pauses (uvloop's default is
# 256 KiB; a review is a few KiB, and a thousand connections must fit the memory limit).
READ_AHEAD_BYTES = 64 * 1024
_DRAINING = "outrigger_draining"
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"content-length: 48\r\nconnection: close\r\n\r\n"
    b'{"error":"request not received within the time"}'
)
_UPGRADE_REFUSED = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
    b"content-length: 47\r\nconnection: close\r\n\r\n"
    b'{"error":"protocol upgrades are not supported"}'
)


class WebhookHttpProtocol(HttpToolsProtocol):
    _read_timer: asyncio.TimerHandle | None = None
    _drain_timer: asyncio.TimerHandle | None = None
    _abort_timer: asyncio.TimerHandle | None = None
    _draining = False
    # Set when the connection is being dropped: what is still parsed is ignored.
    _refusing = False
    # Responses completed on this connection (the connection cap spares answered ones).
    answered = 0

    def __init__(self, *args: Any, metrics: Metrics | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._metrics = metrics

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvloop's TLS transport: how far it reads ahead of what the parser was fed.
        transport.set_read_buffer_limits(high=READ_AHEAD_BYTES)  # type: ignore[attr-defined]
        # Accepted in the moment between SIGTERM and the listener's closing: drain it too.
        self._draining = getattr(self.server_state, _DRAINING, False)
        self._arm_read_timer()

    def connection_lost(self, exc: Exception | None) -> None:
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
        super().on_headers_complete()
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False  # answered, then closed
        if len(self.pipeline) > MAX_PIPELINED:
            self._refuse(None, "pipelining")

    def on_body(self, body: bytes) -> None:
        if not self._refusing:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refusing:
            return
        super().on_message_complete()
        self._cancel(self._read_timer)
        self._read_timer = None

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
