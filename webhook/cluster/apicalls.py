"""What the server's API clients (`selftls`, `policywatch`) share around their calls: a
one-line account of a failed call, and the retries of a starting server's first calls."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

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
