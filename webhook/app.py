"""The HTTP layer: three routes around `webhook.admission`. It knows FastAPI; nothing else does."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response

from webhook.admission import review
from webhook.policy import Policy

# The API server sends objects of at most ~3 MiB; anything far larger is not a review.
MAX_BODY_BYTES = 8 * 1024 * 1024
_JSON = "application/json"


def create_app(policy: Callable[[], Policy]) -> FastAPI:
    """`policy` returns the policy in force, so a reload takes effect on the next request."""
    app = FastAPI(title="Outrigger", docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/mutate")
    async def mutate(request: Request) -> Response:
        body = await _read_body(request)
        if body is None:
            return Response(b'{"error":"request body too large"}', 413, media_type=_JSON)
        status, answer = review(body, policy())
        return Response(answer, status, media_type=_JSON)

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type=_JSON)

    @app.get("/readyz")
    async def readyz() -> Response:
        policy()  # ready once a valid policy is in force
        return Response(b'{"status":"ready"}', media_type=_JSON)

    return app


async def _read_body(request: Request) -> bytes | None:
    """The body, or None past the limit (also for chunked bodies that declare no length)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            return None
    return body
