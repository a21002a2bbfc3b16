"""What the server's API clients (`selftls`, `policywatch`, `compiledpolicy`) share around
their calls: a one-line account of a failed call, a call's decoded JSON answer, and the
retries of a starting server's first calls."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from webhook.cluster.registration import api_error, one_line

T = TypeVar("T")
FIRST_DELAY = 0.5  # seconds before the first retry, doubled after each
MAX_DELAY = 10.0


def failure(what: str, error: Exception) -> str:
    """`cannot WHAT: <the API server's Status>`, or `...: API server unreachable: <why>` for a
    transport error (urllib3's, or the socket's)."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(error, ApiException):
        return f"cannot {what}: {api_error(error)}"
    return f"cannot {what}: API server unreachable: {one_line(error)}"


class CallFailed(Exception):
    """A call that failed: a one-line message, and the API server's status if it answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def json_answer(what: str, call: Callable[[], Any], *, absent_ok: bool = False) -> Any:
    """The decoded JSON object `call` answers (called with `_preload_content=False`), or its
    answer as it is when that is not raw bytes; None for a 404 when `absent_ok`. Raises
    `CallFailed` (`failure`'s message) for anything else, a transport error included."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        response = call()
    except ApiException as error:
        if error.status == 404 and absent_ok:
            return None
        raise CallFailed(failure(what, error), error.status) from None
    except (HTTPError, OSError) as error:
        raise CallFailed(failure(what, error)) from None
    raw = getattr(response, "data", None)
    if not isinstance(raw, bytes):
        return response
    try:
        answer = json.loads(raw)
    except ValueError:
        raise CallFailed(f"cannot {what}: the API server's answer is not JSON") from None
    if not isinstance(answer, dict):
        raise CallFailed(f"cannot {what}: the API server's answer is not an object")
    return answer


def retry_until(
    timeout: float,
    attempt: Callable[[], T],
    retryable: type[Exception],
    log: logging.Logger,
) -> T:
    """`attempt()`'s result, retrying a `retryable` failure with a growing delay for up to
    `timeout` seconds (the API server may be out of reach while the pod starts), after which
    the last failure is raised."""
    deadline, delay = time.monotonic() + timeout, FIRST_DELAY
    while True:
        try:
            return attempt()
        except retryable as error:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s; retrying in %gs", error, delay)
            time.sleep(delay)
            delay = min(delay * 2, MAX_DELAY)
