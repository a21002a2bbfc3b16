"""Connections: TLS with a handshake deadline, and a cap on how many are open at once.

Any pod in the cluster can reach the webhook's port, and with `failurePolicy: Fail` a webhook
that stops answering stops pod creation. So no client may hold more than its share:

- **Handshake deadline.** asyncio gives a TLS handshake 60 s; a client that connects and says
  nothing would hold a descriptor that long. Here it has `HANDSHAKE_SECONDS`.
- **Connection cap.** At most `limit` connections are open (counted from the TCP accept, the
  handshake included), well inside the process's open-file limit. At the cap a new connection
  takes the place of the oldest one that has never been answered and is not being answered
  (a silent or half-open client), else of the oldest idle keep-alive one; only when every
  connection is in the middle of a request is the new one refused. The API server's own
  connections carry requests that take milliseconds, so a flood of silent connections
  displaces only itself. Each connection closed at the cap is counted, and logged at most
  once per 10 s with the count since the last line (`Throttled`).

TLS is terminated per connection by uvloop's own `SSLProtocol` (C speed), created here rather
than by the event loop so that the accept, the handshake's end and the close are seen.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

from uvloop.loop import SSLProtocol  # type: ignore[attr-defined]

from webhook.serving.app import AdmissionEndpoint
from webhook.serving.logs import Throttled
from webhook.serving.metrics import Metrics
from webhook.serving.protocol import WebhookHttpProtocol

HANDSHAKE_SECONDS = 3.0
DEFAULT_MAX_CONNECTIONS = 1000
# Descriptors kept free of client connections: the listener, policy and certificate files,
# the API server's connections, the thread pool's wake-ups.
RESERVED_DESCRIPTORS = 64
# How far from the oldest a search for a connection to close looks (bounds the work per accept).
_SEARCH = 256


class ConnectionGate:
    """The open connections, oldest first, and the cap on their number."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self._metrics = metrics
        self._open: dict[TLSConnection, None] = {}  # insertion order: oldest first
        self._warning = Throttled(
            "%d connections open, the cap: closed %d connection(s) to make room (silent or "
            "idle ones first) since the last such line"
        )
        metrics.follow_connections(lambda: len(self._open))

    def admit(self, connection: TLSConnection) -> bool:
        """Whether `connection` may stay open; at the cap another one is closed for it."""
        if len(self._open) >= self.limit:
            displaced = self._displaceable()
            if displaced is None:
                self._closed_at_cap()
                return False
            self.leave(displaced)
            displaced.abort()
            self._closed_at_cap()
        self._open[connection] = None
        return True

    def leave(self, connection: TLSConnection) -> None:
        self._open.pop(connection, None)

    def _displaceable(self) -> TLSConnection | None:
        oldest = [connection for connection, _ in zip(self._open, range(_SEARCH), strict=False)]
        for connection in oldest:
            if connection.app.answered == 0 and not connection.app.answering():
                return connection
        for connection in oldest:
            if not connection.app.busy():
                return connection
        return None

    def _closed_at_cap(self) -> None:
        self._metrics.count_connection_closed("cap")
        self._warning.note(self.limit)


class TLSConnection(SSLProtocol):  # type: ignore[misc]
    """One client connection: TLS around a `WebhookHttpProtocol`, known to the gate."""

    def __init__(
        self,
        app: WebhookHttpProtocol,
        context: ssl.SSLContext,
        gate: ConnectionGate,
        metrics: Metrics,
    ) -> None:
        super().__init__(
            asyncio.get_running_loop(),
            app,
            context,
            None,
            server_side=True,
            ssl_handshake_timeout=HANDSHAKE_SECONDS,
        )
        self.app = app
        self._gate = gate
        self._metrics = metrics
        self._raw: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._raw = transport
        if not self._gate.admit(self):
            transport.abort()
            return
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._gate.leave(self)
        if self.app.transport is None:  # the handshake never finished: timed out or failed
            self._metrics.count_connection_closed("handshake")
        super().connection_lost(exc)

    def abort(self) -> None:
        if self._raw is not None:
            self._raw.abort()


def tls_connections(
    context: ssl.SSLContext,
    gate: ConnectionGate,
    metrics: Metrics,
    endpoint: AdmissionEndpoint | None = None,
) -> Callable[..., TLSConnection]:
    """A protocol factory for uvicorn's `http` setting (called as uvicorn calls its HTTP
    protocol class): each accepted connection becomes a `TLSConnection` around the HTTP
    protocol uvicorn would have made, which answers reviews through `endpoint` in place."""

    def connection(**uvicorn_arguments: Any) -> TLSConnection:
        app = WebhookHttpProtocol(**uvicorn_arguments, metrics=metrics, endpoint=endpoint)
        return TLSConnection(app, context, gate, metrics)

    return connection
