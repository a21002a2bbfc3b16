"""The benchmark floor: the cheapest server that still speaks the admission protocol.

A plain ASGI callable, no framework: it reads the whole request body (as the webhook must) and
answers with one fixed `allowed: true` AdmissionReview. Served by the same uvicorn, TLS, loop and
HTTP parser as the webhook, it measures what the transport alone costs, so the webhook's figures
can be read as a ratio to it rather than as absolute numbers from a noisy machine.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Built once at import: the floor must do no per-request work beyond the transport.
BODY = json.dumps(
    {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": "00000000-0000-0000-0000-000000000000", "allowed": True},
    },
    separators=(",", ":"),
).encode()
HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode()),
]


async def app(scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
    """Answer every HTTP request with `BODY`; acknowledge lifespan so uvicorn logs no error."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    elif scope["type"] == "http":
        await _drain(receive)
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": BODY})


async def _drain(receive: Receive) -> None:
    """Read the request body to its end, as a real handler would before decoding it."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
