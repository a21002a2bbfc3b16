"""Answers written at the end of the event loop's turn, all connections' together.

Under load one turn of the event loop reads the requests of several connections, and each
answer used to be written as soon as it was made: one write, and one wake-up of the client,
per answer. A client that had read its answer and gone back to waiting is woken again for
the next, and waking a waiting thread costs the writer more than the write itself (on the
two-vCPU benchmark machine, a third of the server's CPU time per memoised review: 93 us of
user and 35 of system time per request, against 73 and 18 with the writes held to the turn's
end; `make bench`). Held here, the answers of one turn go out back to back once the turn's
reads are done, and a client is woken once for all of them.

An answer waits at most for the rest of its turn, which under load is the other answers'
work and, when idle, nothing: a lone request's answer goes out as soon as it is made. The
order of what one connection writes is kept: closing or aborting a connection writes (or
drops) what it holds first.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("outrigger.server")


class TurnWrites:
    """The connections holding writes in this turn of the event loop, flushed by one
    callback at its end (the loop runs callbacks once the turn's reads are handled)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._holding: list[HeldWrites] = []

    def hold(self, connection: HeldWrites) -> None:
        if not self._holding:
            self._loop.call_soon(self.flush)
        self._holding.append(connection)

    def flush(self) -> None:
        holding, self._holding = self._holding, []
        for connection in holding:
            try:
                connection.flush()
            except Exception as error:  # a broken connection must not keep the others' answers
                log.debug("dropping a connection whose write failed: %s", type(error).__name__)
                connection.abort()


class HeldWrites:
    """A connection's transport whose writes wait for the end of the turn (`TurnWrites`);
    everything else goes straight to the transport."""

    __slots__ = ("_pending", "_transport", "_turn")

    def __init__(self, transport: asyncio.Transport, turn: TurnWrites) -> None:
        self._transport = transport
        self._turn = turn
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._turn.hold(self)
        self._pending.append(data)

    def holding(self) -> bool:
        """Whether an answer waits for the end of the turn."""
        return bool(self._pending)

    def flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()  # what was written before the close goes first
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
