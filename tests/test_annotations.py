"""Annotation parsing: one table of accepted values and one of rejected ones."""

from __future__ import annotations

import pytest

from webhook import annotations as ann
from webhook.annotations import AmbassadorRequest, InvalidAnnotations, Upstream, parse

AVAILABLE = frozenset({"log-watcher", "ambassador"})
UPSTREAM = {ann.AMBASSADOR_UPSTREAM: "api.example.com:443"}


@pytest.mark.parametrize(
    ("annotations", "sidecars"),
    [
        pytest.param({}, (), id="absent"),
        pytest.param({ann.INJECT: ""}, (), id="empty"),
        pytest.param({ann.INJECT: "false"}, (), id="false"),
        pytest.param({ann.INJECT: " FALSE "}, (), id="false-any-case"),
        pytest.param({ann.INJECT: "log-watcher"}, ("log-watcher",), id="one"),
        pytest.param(
            {ann.INJECT: " ambassador , log-watcher,", **UPSTREAM},
            ("ambassador", "log-watcher"),
            id="order-kept-spaces-trailing-comma",
        ),
        pytest.param(
            {ann.INJECT: "log-watcher,log-watcher"}, ("log-watcher",), id="duplicates-once"
        ),
    ],
)
def test_inject_names(annotations: dict[str, str], sidecars: tuple[str, ...]) -> None:
    assert parse(annotations, AVAILABLE).sidecars == sidecars


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("api.example.com:443", Upstream("api.example.com", 443)),
        ("External-Service:80", Upstream("external-service", 80)),
        ("10.0.0.7:8080", Upstream("10.0.0.7", 8080, is_ip=True)),
        ("[fd00::7]:80", Upstream("fd00::7", 80, is_ip=True)),
        (
            "payments.prod.svc.cluster.local:65535",
            Upstream("payments.prod.svc.cluster.local", 65535),
        ),
    ],
)
def test_upstream_accepted(raw: str, expected: Upstream) -> None:
    request = parse({ann.INJECT: "ambassador", ann.AMBASSADOR_UPSTREAM: raw}, AVAILABLE)
    assert request.ambassador == AmbassadorRequest(expected, ann.DEFAULT_AMBASSADOR_PORT)


def test_defaults() -> None:
    request = parse({ann.INJECT: "log-watcher,ambassador", **UPSTREAM}, AVAILABLE)
    assert request.log_path == "/var/log/app"
    assert request.ambassador is not None
    assert request.ambassador.local_port == 8081
    assert request.warnings == ()


def test_log_path_trailing_slash_is_dropped() -> None:
    request = parse({ann.INJECT: "log-watcher", ann.LOG_PATH: "/data/logs/"}, AVAILABLE)
    assert request.log_path == "/data/logs"


@pytest.mark.parametrize(
    ("annotations", "named", "accepted"),
    [
        pytest.param({ann.INJECT: "bogus"}, ann.INJECT, "log-watcher", id="unknown-sidecar"),
        pytest.param({ann.INJECT: "true"}, ann.INJECT, "ambassador", id="true-is-no-name"),
        pytest.param(
            {ann.INJECT: "log-watcher", ann.LOG_PATH: "var/log"},
            ann.LOG_PATH,
            "absolute",
            id="relative-path",
        ),
        pytest.param(
            {ann.INJECT: "log-watcher", ann.LOG_PATH: "/var/../etc"},
            ann.LOG_PATH,
            "..",
            id="backsteps",
        ),
        pytest.param(
            {ann.INJECT: "log-watcher", ann.LOG_PATH: "/"}, ann.LOG_PATH, "below /", id="root"
        ),
        pytest.param(
            {ann.INJECT: "log-watcher", ann.LOG_PATH: "/a b"},
            ann.LOG_PATH,
            "absolute",
            id="space",
        ),
        pytest.param(
            {ann.INJECT: "ambassador"}, ann.AMBASSADOR_UPSTREAM, "host:port", id="upstream-missing"
        ),
        pytest.param(
            {ann.INJECT: "ambassador", ann.AMBASSADOR_UPSTREAM: "api.example.com"},
            ann.AMBASSADOR_UPSTREAM,
            "host:port",
            id="upstream-no-port",
        ),
        pytest.param(
            {ann.INJECT: "ambassador", ann.AMBASSADOR_UPSTREAM: "api.example.com:0"},
            ann.AMBASSADOR_UPSTREAM,
            "1 to 65535",
            id="upstream-port-zero",
        ),
        pytest.param(
            {ann.INJECT: "ambassador", ann.AMBASSADOR_UPSTREAM: "api.example.com:70000"},
            ann.AMBASSADOR_UPSTREAM,
            "1 to 65535",
            id="upstream-port-high",
        ),
        pytest.param(
            {ann.INJECT: "ambassador", ann.AMBASSADOR_UPSTREAM: "bad_host!:80"},
            ann.AMBASSADOR_UPSTREAM,
            "DNS name",
            id="upstream-bad-host",
        ),
        pytest.param(
            {ann.INJECT: "ambassador", **UPSTREAM, ann.AMBASSADOR_PORT: "http"},
            ann.AMBASSADOR_PORT,
            "1024 to 65535",
            id="port-not-number",
        ),
        pytest.param(
            {ann.INJECT: "ambassador", **UPSTREAM, ann.AMBASSADOR_PORT: "80"},
            ann.AMBASSADOR_PORT,
            "1024 to 65535",
            id="port-privileged",
        ),
        pytest.param(
            {ann.INJECT: "ambassador", **UPSTREAM, ann.AMBASSADOR_PORT: "٨٠٨١"},
            ann.AMBASSADOR_PORT,
            "1024 to 65535",
            id="port-non-ascii-digits",
        ),
    ],
)
def test_rejected(annotations: dict[str, str], named: str, accepted: str) -> None:
    with pytest.raises(InvalidAnnotations) as caught:
        parse(annotations, AVAILABLE)
    assert named in str(caught.value)
    assert accepted in str(caught.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(InvalidAnnotations) as caught:
        parse(
            {
                ann.INJECT: "log-watcher,ambassador",
                ann.LOG_PATH: "relative",
                ann.AMBASSADOR_UPSTREAM: "nope",
                ann.AMBASSADOR_PORT: "-1",
            },
            AVAILABLE,
        )
    assert len(caught.value.problems) == 3
    assert {ann.LOG_PATH, ann.AMBASSADOR_UPSTREAM, ann.AMBASSADOR_PORT} <= {
        key for key in ann.KNOWN_KEYS if key in str(caught.value)
    }


@pytest.mark.parametrize(
    ("annotations", "warning"),
    [
        pytest.param(
            {"outrigger.dev/injct": "x"}, "outrigger.dev/injct is not an Outrigger", id="typo"
        ),
        pytest.param({ann.LOG_PATH: "/x"}, "log-watcher is not injected", id="log-path-unused"),
        pytest.param(
            {ann.INJECT: "log-watcher", **UPSTREAM},
            "ambassador is not injected",
            id="upstream-unused",
        ),
    ],
)
def test_ignored_annotations_are_warned_about(annotations: dict[str, str], warning: str) -> None:
    warnings = parse(annotations, AVAILABLE).warnings
    assert any(warning in w for w in warnings), warnings


def test_foreign_annotations_are_not_ours_to_warn_about() -> None:
    assert parse({"example.com/x": "y", ann.INJECT: "log-watcher"}, AVAILABLE).warnings == ()
