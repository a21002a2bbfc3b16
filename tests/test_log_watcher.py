"""The log-watcher's Fluent Bit command line, as the default and the README's policies write it.

Fluent Bit's `--dry-run` accepts misspelt properties, so a typo would only show in a running
pod (tests/test_fluentbit_real.py runs the default policy's watcher; these checks cover every
policy without running it) (a property silently ignored: positions not kept, long
lines skipping the file). Every `-p` property must therefore be one of those Fluent Bit v4
documents for its plugin, and the read positions must lie on a writable volume of the watcher's
own (Fluent Bit exits with 255 when `db` is on the read-only log mount).
"""

from __future__ import annotations

import posixpath
from typing import Any

import pytest

from tests.conftest import FIXTURES
from webhook.core.injector import RequestContext, inject
from webhook.core.policy import Policy, default_policy, load_policy

# Fluent Bit v4 manual, "Tail" input and "Standard Output" output: configuration parameters.
DOCUMENTED = {
    "tail": {
        "buffer_chunk_size",
        "buffer_max_size",
        "path",
        "path_key",
        "exclude_path",
        "offset_key",
        "read_from_head",
        "refresh_interval",
        "rotate_wait",
        "ignore_older",
        "skip_long_lines",
        "skip_empty_lines",
        "truncate_long_lines",
        "db",
        "db.sync",
        "db.locking",
        "db.journal_mode",
        "db.compare_filename",
        "mem_buf_limit",
        "key",
        "tag",
        "inotify_watcher",
        "parser",
        "multiline.parser",
        "docker_mode",
    },
    "stdout": {"format", "json_date_key", "json_date_format"},
}
# What keeps the watcher from losing lines or shipping them twice (see the README).
REQUIRED = {
    "tail": {
        "db",
        "mem_buf_limit",
        "buffer_max_size",
        "truncate_long_lines",
        "rotate_wait",
        "read_from_head",
    },
    "stdout": {"format"},
}

POLICIES = [
    pytest.param(default_policy(), id="default"),
    pytest.param(load_policy(FIXTURES / "policies" / "good-platform-team.yaml"), id="platform"),
]


def plugins(args: list[str]) -> list[tuple[str, dict[str, str]]]:
    """`-i tail -p k=v ... -o stdout -p k=v`: each plugin with its properties, in order."""
    result: list[tuple[str, dict[str, str]]] = []
    words = iter(args)
    for word in words:
        if word in ("-i", "-o"):
            result.append((next(words), {}))
        elif word == "-p":
            key, sep, value = next(words).partition("=")
            assert sep and result, f"-p {key} outside a plugin, or without a value"
            assert key not in result[-1][1], f"-p {key} given twice"
            result[-1][1][key] = value
        else:
            raise AssertionError(f"unexpected argument {word!r}")
    return result


def injected_watcher(policy: Policy) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = {
        "metadata": {"annotations": {"outrigger.dev/inject": "log-watcher"}},
        "spec": {"containers": [{"name": "app", "image": "registry.example.com/app:1"}]},
    }
    spec = inject(pod, RequestContext("default"), policy).pod["spec"]
    sidecars = [*spec.get("initContainers", ()), *spec["containers"]]
    (watcher,) = [c for c in sidecars if c["name"] == "log-watcher"]
    return watcher, spec


@pytest.mark.parametrize("policy", POLICIES)
def test_every_property_is_documented(policy: Policy) -> None:
    watcher, _ = injected_watcher(policy)
    found = plugins(watcher["args"])
    assert [name for name, _ in found] == ["tail", "stdout"]
    for name, properties in found:
        assert set(properties) <= DOCUMENTED[name], set(properties) - DOCUMENTED[name]
        assert REQUIRED[name] <= set(properties), REQUIRED[name] - set(properties)


@pytest.mark.parametrize("policy", POLICIES)
def test_read_positions_are_kept_on_a_writable_volume_of_the_watchers_own(policy: Policy) -> None:
    watcher, spec = injected_watcher(policy)
    (_, tail), _ = plugins(watcher["args"])
    directory = posixpath.dirname(tail["db"])
    (mount,) = [m for m in watcher["volumeMounts"] if m["mountPath"] == directory]
    assert mount.get("readOnly", False) is False
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert "sizeLimit" in volume["emptyDir"]
    for app in spec["containers"]:
        if app["name"] != "log-watcher":
            assert mount["name"] not in {m["name"] for m in app.get("volumeMounts", ())}
    # The log volume itself stays read-only for the watcher, and is bounded too.
    (logs,) = [m for m in watcher["volumeMounts"] if tail["path"].startswith(m["mountPath"])]
    assert logs["readOnly"] is True
    (log_volume,) = [v for v in spec["volumes"] if v["name"] == logs["name"]]
    assert "sizeLimit" in log_volume["emptyDir"]


def test_a_typo_is_caught() -> None:
    args = ["-i", "tail", "-p", "path=/x/*.log", "-p", "truncate_long_line=on", "-o", "stdout"]
    (_, tail), _ = plugins(args)
    assert not set(tail) <= DOCUMENTED["tail"]
