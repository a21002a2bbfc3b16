"""The differ: every patch it makes applies with a real JSON Patch implementation."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
from hypothesis import given
from hypothesis import strategies as st

from webhook.core.patch import diff, escape

json_scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.text("ab/~", max_size=3)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text("ab/~", max_size=3), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values, json_values)
def test_patch_turns_before_into_after(before: Any, after: Any) -> None:
    original = copy.deepcopy(before)
    patch = diff(before, after)
    assert jsonpatch.apply_patch(before, patch) == after
    assert before == original  # diffing never touches its inputs


@given(st.dictionaries(st.text("ab/~", max_size=3), json_values, max_size=5), json_values)
def test_shared_structure_is_skipped_not_lost(base: dict[str, Any], extra: Any) -> None:
    after = {**base, "new~/key": extra}
    patch = diff(base, after)
    assert patch == [{"op": "add", "path": "/new~0~1key", "value": extra}]


def test_identical_objects_give_no_operations() -> None:
    pod = {"metadata": {"name": "a"}, "spec": {"containers": [{"name": "c"}]}}
    assert diff(pod, pod) == []
    assert diff(pod, copy.deepcopy(pod)) == []


def test_appended_list_items_are_added_by_index() -> None:
    before = {"spec": {"containers": [{"name": "app"}]}}
    after = {"spec": {"containers": [{"name": "app"}, {"name": "sidecar"}]}}
    assert diff(before, after) == [
        {"op": "add", "path": "/spec/containers/1", "value": {"name": "sidecar"}}
    ]


def test_missing_parent_is_added_whole() -> None:
    before: dict[str, Any] = {"metadata": {"name": "a"}}
    after = {"metadata": {"name": "a", "annotations": {"outrigger.dev/status": "x"}}}
    assert diff(before, after) == [
        {"op": "add", "path": "/metadata/annotations", "value": {"outrigger.dev/status": "x"}}
    ]


def test_bool_and_int_are_different_json() -> None:
    assert diff({"a": 1}, {"a": True}) == [{"op": "replace", "path": "/a", "value": True}]


def test_escape_order_matters() -> None:
    assert escape("a/b~c") == "a~1b~0c"
    assert escape("~1") == "~01"


@given(st.lists(json_values, max_size=4), st.lists(json_values, min_size=1, max_size=3))
def test_front_insertion_adds_only(items: list[Any], inserted: list[Any]) -> None:
    """Native sidecars go first in initContainers: the items behind them get no operation."""
    before = {"initContainers": items}
    after = {"initContainers": [*inserted, *items]}
    patch = diff(before, after)
    assert jsonpatch.apply_patch(before, patch) == after
    assert [op["op"] for op in patch] == ["add"] * len(inserted)
