"""The server's log: one handler, JSON or escaped text, for every line the process writes."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

from webhook.limits import printable, printable_lines
from webhook.serving.decisions import write_directly

# Whether `configure_logging` chose JSON lines.
_json_lines = False


def configure_logging(level: str, log_format: str, summary_seconds: float = 0.0) -> None:
    """Every line the process writes goes through one handler on stderr: one JSON object per
    line (`--log-format json`; non-ASCII and control characters escaped by the encoder), or
    text with every non-printable character escaped (`EscapingFormatter`), so that nothing a
    pod creator writes (a name, an annotation key) can split a line, forge one or drive the
    reader's terminal. uvicorn's lines, Python's warnings and uncaught exceptions included.
    `summary_seconds`: the decision log's interval for injections (`webhook.serving.decisions`)."""
    global _json_lines
    _json_lines = log_format == "json"
    handler = logging.StreamHandler()
    if _json_lines:
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
        handler.addFilter(_without_colours)
    else:
        handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    write_directly(handler, _json_lines, summary_seconds)  # the decision log's own fast path
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = lambda hook: _log_uncaught(
        hook.exc_type, hook.exc_value or hook.exc_type(), hook.exc_traceback
    )


def _without_colours(record: logging.LogRecord) -> bool:
    """uvicorn gives its lines a `color_message` (the message with terminal colour codes),
    which the JSON formatter would write as one more field: dropped."""
    record.__dict__.pop("color_message", None)
    return True


class EscapingFormatter(logging.Formatter):
    """Text lines with every non-printable character escaped (`webhook.limits.printable`);
    a traceback keeps its line breaks, each of its lines escaped."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return printable_lines(super().formatException(ei))


def _log_uncaught(kind: type[BaseException], error: BaseException, trace: Any) -> None:
    logging.getLogger("outrigger").critical(
        "uncaught %s", kind.__name__, exc_info=(kind, error, trace)
    )


def report(message: str) -> None:
    """A message that ends `outrigger serve` (a bad setting, a policy that does not load):
    with JSON logs a JSON line like any other, else the message alone on stderr, each of its
    lines escaped (a policy's errors come one per line)."""
    if _json_lines:
        logging.getLogger("outrigger").error("%s", message)
    else:
        print(printable_lines(message), file=sys.stderr)


class Throttled:
    """A warning about something any client can cause as often as it likes (connections
    closed at the cap, requests refused as busy): written at most once per `seconds`, with
    the count since the last line, so that no client can flood the log."""

    def __init__(self, message: str, seconds: float = 10.0) -> None:
        self.message = message  # %-style, with the `note` argument and the count
        self.seconds = seconds
        self._written_at = float("-inf")
        self._since = 0

    def note(self, argument: object) -> None:
        self._since += 1
        now = time.monotonic()
        if now - self._written_at >= self.seconds:
            logging.getLogger("outrigger.server").warning(self.message, argument, self._since)
            self._written_at, self._since = now, 0
