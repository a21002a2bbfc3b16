"""A small algebra of CEL expressions, as the API server evaluates them in matchConditions and
ValidatingAdmissionPolicies: string literals quoted safely, namespace globs translated to RE2
exactly as `fnmatch.fnmatchcase` reads them, and `and`/`or`/`not` folded over constants so
that the compiled text stays short and readable.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Cel:
    """One CEL boolean expression; `constant` is its value when it has the same one for every
    request (then `text` is `true` or `false`)."""

    text: str
    constant: bool | None = None


TRUE = Cel("true", True)
FALSE = Cel("false", False)


def atom(text: str) -> Cel:
    return Cel(text)


def all_of(parts: Iterable[Cel]) -> Cel:
    return _joined(parts, "&&", absorbing=FALSE, grouped="||")


def any_of(parts: Iterable[Cel]) -> Cel:
    # && binds tighter than ||: the parentheses around a conjunction are for the reader.
    return _joined(parts, "||", absorbing=TRUE, grouped="&&")


def _joined(parts: Iterable[Cel], operator: str, *, absorbing: Cel, grouped: str) -> Cel:
    """`parts` joined by `operator`; a constant part equal to `absorbing` decides the whole,
    the other constant drops out."""
    kept: list[Cel] = []
    for part in parts:
        if part.constant is absorbing.constant:
            return absorbing
        if part.constant is None:
            kept.append(part)
    if not kept:
        return TRUE if absorbing is FALSE else FALSE
    if len(kept) == 1:
        return kept[0]
    return Cel(f" {operator} ".join(_grouped(p, grouped) for p in kept))


def negate(part: Cel) -> Cel:
    if part.constant is not None:
        return FALSE if part.constant else TRUE
    return Cel(f"!{_grouped(part, ' ')}")


def _grouped(part: Cel, operator: str) -> str:
    """`part` in parentheses when `operator` (or, for " ", any operator) occurs at its top
    level: outside parentheses, brackets and string literals."""
    return f"({part.text})" if _at_top_level(part.text, operator) else part.text


def _at_top_level(text: str, operator: str) -> bool:
    depth, quoted, escaped = 0, False, False
    for index, character in enumerate(text):
        if quoted:
            escaped, quoted = (False, True) if escaped else (character == "\\", character != "'")
        elif character == "'":
            quoted = True
        elif character in "([":
            depth += 1
        elif character in ")]":
            depth -= 1
        elif depth == 0 and text.startswith(operator, index):
            return True
    return False


def quote(text: str) -> str:
    """A CEL string literal of `text`: printable ASCII as it is, everything else escaped."""
    out = []
    for character in text:
        code = ord(character)
        if character in "\\'":
            out.append("\\" + character)
        elif 32 <= code < 127:
            out.append(character)
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "'" + "".join(out) + "'"


def quote_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(quote(item) for item in items) + "]"


# Globs ------------------------------------------------------------------------------------------


def is_glob(pattern: str) -> bool:
    return any(character in pattern for character in "*?[")


def glob_regex(pattern: str) -> str | None:
    """An RE2 pattern matching the whole of what `fnmatch.fnmatchcase(name, pattern)` matches,
    or None when nothing can match (a `[...]` whose ranges are all empty).

    Follows CPython's `fnmatch.translate` (3.11) token by token: `*`, `?`, `[...]` with `!`
    negation, a leading `]` taken literally, `-` ranges (an empty range dropped, a `-` right
    after a range literal), an unclosed `[` literal. Every other character is escaped."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        character = pattern[i]
        i += 1
        if character == "*":
            if not out or out[-1] != ".*":
                out.append(".*")
        elif character == "?":
            out.append(".")
        elif character == "[":
            end = _class_end(pattern, i)
            if end < 0:
                out.append(_literal("["))
                continue
            item = _character_class(pattern, i, end)
            if item is None:
                return None
            out.append(item)
            i = end + 1
        else:
            out.append(character if character in "-_" else _literal(character))
    return "^(?s:" + "".join(out) + ")$"


def _class_end(pattern: str, start: int) -> int:
    """The index of the `]` closing a class opened just before `start`, or -1."""
    j, n = start, len(pattern)
    if j < n and pattern[j] == "!":
        j += 1
    if j < n and pattern[j] == "]":
        j += 1
    while j < n and pattern[j] != "]":
        j += 1
    return j if j < n else -1


def _character_class(pattern: str, start: int, end: int) -> str | None:
    """The RE2 class for `pattern[start:end]` (between the brackets); None: matches nothing."""
    negated = pattern[start] == "!" if start < end else False
    first = start + 1 if negated else start
    if first == end:  # "[!]" is "any character" (CPython's '.'), "[]" cannot occur
        return "." if negated else None
    items = _class_items(pattern, first, end)
    if not items:
        return "." if negated else None
    body = "".join(_class_item(low, high) for low, high in items)
    return "[" + ("^" if negated else "") + body + "]"


def _class_items(pattern: str, first: int, end: int) -> list[tuple[str, str]]:
    """The class's members as (low, high) ranges, split at hyphens as CPython does."""
    chunks: list[str] = []
    i, k = first, first + 1
    while True:
        k = pattern.find("-", k, end)
        if k < 0:
            break
        chunks.append(pattern[i:k])
        i, k = k + 1, k + 3
    chunk = pattern[i:end]
    if chunk:
        chunks.append(chunk)
    else:
        chunks[-1] += "-"
    for index in range(len(chunks) - 1, 0, -1):  # empty ranges (z-a) are dropped
        if chunks[index - 1][-1] > chunks[index][0]:
            chunks[index - 1] = chunks[index - 1][:-1] + chunks[index][1:]
            del chunks[index]
    # Joined with "-", each joint a range from one chunk's last character to the next one's
    # first; every other character of a chunk (a "-" included) stands for itself.
    items = [(character, character) for chunk in chunks for character in chunk]
    items += [(chunks[k - 1][-1], chunks[k][0]) for k in range(1, len(chunks))]
    return items


def _class_item(low: str, high: str) -> str:
    if low == high:
        return _literal(low)
    return _literal(low) + "-" + _literal(high)


def _literal(character: str) -> str:
    if character.isascii() and character.isalnum():
        return character
    if 32 < ord(character) < 127:
        return "\\" + character
    return f"\\x{{{ord(character):x}}}"
