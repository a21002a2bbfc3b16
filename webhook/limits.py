"""Bounds on what one request may make the webhook do or keep, shared by every layer.

A pod's annotations are attacker-controlled input: their size bounds the work per request,
and caches keep only small entries, so that no stream of distinct large pods grows the
process (`cache_small`). Messages echo at most a prefix of a bad value (`echo`).
"""

from __future__ import annotations

import re
import reprlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from functools import lru_cache, wraps
from typing import Any, Final, Generic, ParamSpec, TypeVar

# The largest value one outrigger.dev/ annotation may have (Kubernetes allows 256 KiB for
# all of a pod's annotations together).
MAX_ANNOTATION_BYTES: Final = 16 * 1024
# Inputs larger than this are worked out afresh each time rather than kept in a cache.
MAX_CACHED_BYTES: Final = 4 * 1024
# How much of a bad value a message repeats.
ECHO_CHARACTERS: Final = 64

P = ParamSpec("P")
R = TypeVar("R")

# How `echo` shows a value that is not a string: as str() does, but bounded in depth and size.
_SHAPE: Final = reprlib.Repr()
_SHAPE.maxlevel = 4
_SHAPE.maxdict = _SHAPE.maxlist = _SHAPE.maxtuple = _SHAPE.maxset = 16
_SHAPE.maxstring = _SHAPE.maxother = _SHAPE.maxlong = ECHO_CHARACTERS


def cache_small(
    maxsize: int, size: Callable[..., int]
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """An `lru_cache` that skips calls whose inputs `size` finds over MAX_CACHED_BYTES, so
    that the cache holds at most about maxsize * MAX_CACHED_BYTES of keys."""

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        cached = lru_cache(maxsize=maxsize)(function)

        @wraps(function)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            if size(*args, **kwargs) > MAX_CACHED_BYTES:
                return function(*args, **kwargs)
            return cached(*args, **kwargs)  # type: ignore[arg-type]

        call.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
        call.cache_info = cached.cache_info  # type: ignore[attr-defined]
        return call

    return decorate


Key = TypeVar("Key", bound=Hashable)
Value = TypeVar("Value")


class Recent(Generic[Key, Value]):
    """At most `size` values by key, the least recently used forgotten first: an `lru_cache`
    whose caller makes the value (from what it has at hand: the key need not be all that
    makes it). Used from the event loop and the worker threads alike, hence the lock."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._values: OrderedDict[Key, Value] = OrderedDict()
        self._lock = threading.Lock()
        self.misses = 0  # `get`s that found nothing

    def get(self, key: Key) -> Value | None:
        with self._lock:
            value = self._values.get(key)
            if value is None:
                self.misses += 1
            else:
                self._values.move_to_end(key)
            return value

    def keep(self, key: Key, value: Value) -> None:
        with self._lock:
            self._values[key] = value
            self._values.move_to_end(key)
            if len(self._values) > self._size:
                self._values.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


def echo(value: Any) -> str:
    """`repr(value)` for a message, cut to a prefix and the length when it is long. An object or
    a list is shown a few levels and items deep: a hostile pod may nest one past the recursion
    limit or make it megabytes long."""
    text = value if isinstance(value, str) else _shown(value)
    if len(text) <= ECHO_CHARACTERS:
        return repr(text)
    return f"{text[: ECHO_CHARACTERS - 16]!r}... ({len(text)} characters)"


def _shown(value: Any) -> str:
    try:
        return _SHAPE.repr(value)
    except ValueError:  # an integer past Python's 4300-digit conversion limit
        return "an integer too long to show"


def has_control_characters(text: str) -> bool:
    return _CONTROL.search(text) is not None


# C0 controls, DEL and the C1 controls (8-bit CSI and friends).
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with every character that is not printable escaped as Python writes it (`\\x1b`,
    `\\u202e`): controls (newlines, ESC, 8-bit CSI), format characters (bidi overrides,
    zero-width), separators other than the space, surrogates, unassigned code points. What
    the webhook writes to a log, a warning or a denial goes through here, so no input can
    split a line, forge one or drive the reader's terminal. Printable text is returned as is
    (one C-speed check)."""
    if text.isprintable():
        return text
    return "".join(
        character if character.isprintable() else _escaped(character) for character in text
    )


def printable_lines(text: str) -> str:
    """`printable` line by line: text of several lines (a traceback, a policy's errors) keeps
    its line breaks, and only those."""
    return "\n".join(map(printable, text.split("\n")))


def _escaped(character: str) -> str:
    code = ord(character)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
