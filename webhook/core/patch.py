"""RFC 6902 JSON Patch from the difference between the pod before and after injection.

A generic differ (`jsonpatch.make_patch`) compares every field of both pods on every request.
The injector returns a pod that shares each untouched sub-object with the original, so this
differ skips anything identical by identity and only descends where something changed. Lists
keep the items shared at both ends; between them, items are diffed position by position, new
ones added by index and surplus ones removed from the end. Tests check every patch against
`jsonpatch.apply_patch`.
"""

from __future__ import annotations

from typing import Any, Final

Operation = dict[str, Any]
_ABSENT: Final = object()


def escape(key: str) -> str:
    """JSON Pointer token escaping (RFC 6901): `~` first, then `/`."""
    if "~" in key or "/" in key:
        return key.replace("~", "~0").replace("/", "~1")
    return key


def diff(before: Any, after: Any) -> list[Operation]:
    operations: list[Operation] = []
    _diff(before, after, "", operations)
    return operations


def _diff(before: Any, after: Any, path: str, operations: list[Operation]) -> None:
    if before is after:
        return
    if isinstance(before, dict) and isinstance(after, dict):
        _diff_objects(before, after, path, operations)
    elif isinstance(before, list) and isinstance(after, list):
        _diff_lists(before, after, path, operations)
    elif type(before) is not type(after) or before != after:
        operations.append({"op": "replace", "path": path, "value": after})


def _diff_objects(
    before: dict[str, Any], after: dict[str, Any], path: str, operations: list[Operation]
) -> None:
    start = len(operations)
    added = 0
    for key, value in after.items():
        previous = before.get(key, _ABSENT)
        if previous is value:  # shared with the original: most keys
            continue
        child = f"{path}/{escape(key)}"
        if previous is _ABSENT:
            added += 1
            operations.append({"op": "add", "path": child, "value": value})
        else:
            _diff(previous, value, child, operations)
    if len(before) > len(after) - added:  # keys removed (rare): first, in the ordered scan
        operations[start:start] = [
            {"op": "remove", "path": f"{path}/{escape(key)}"} for key in before if key not in after
        ]


def _diff_lists(
    before: list[Any], after: list[Any], path: str, operations: list[Operation]
) -> None:
    """Items shared at both ends are skipped; the middle is diffed position by position.

    Sidecars inserted at the front of `initContainers` thus become `add` operations at their
    index, with no operation on the items that follow them.
    """
    start = 0
    limit = min(len(before), len(after))
    while start < limit and before[start] is after[start]:
        start += 1
    end_before, end_after = len(before), len(after)
    while (
        end_before > start and end_after > start and before[end_before - 1] is after[end_after - 1]
    ):
        end_before -= 1
        end_after -= 1
    common = min(end_before, end_after)
    for index in range(start, common):
        _diff(before[index], after[index], f"{path}/{index}", operations)
    for index in range(common, end_after):
        operations.append({"op": "add", "path": f"{path}/{index}", "value": after[index]})
    for index in range(end_before - 1, common - 1, -1):
        operations.append({"op": "remove", "path": f"{path}/{index}"})
