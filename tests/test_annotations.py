"""Annotation parsing: one table of accepted values and one of rejected ones."""

from __future__ import annotations

import pytest

from webhook.ambassador.hostport import Upstream
from webhook.core import annotations as ann
from webhook.core.annotations import InvalidAnnotations
from webhook.core.injector import _sidecars
from webhook.core.policy import default_policy
from webhook.core.selection import decide

POLICY = default_policy()
AVAILABLE = frozenset(POLICY.templates)
LOG_PATH = "outrigger.dev/log-path"
AMBASSADOR_UPSTREAM = "outrigger.dev/ambassador-upstream"
AMBASSADOR_PORT = "outrigger.dev/ambassador-port"
KNOWN_KEYS = (ann.INJECT, LOG_PATH, AMBASSADOR_UPSTREAM, AMBASSADOR_PORT)
UPSTREAM = {AMBASSADOR_UPSTREAM: "api.example.com:443"}


class Parsed:
    """What the annotations of a pod in namespace "default" come to under the default policy."""

    def __init__(self, annotations: dict[str, str]) -> None:
        decision = decide("default", {}, annotations, POLICY)
        self.sidecars = decision.sidecars
        templates = [POLICY.templates[name] for name in self.sidecars]
        self.values = ann.parse_parameters(annotations, templates, POLICY.image_problem)
        _sidecars(POLICY, ann.ours(annotations), self.sidecars)  # rendering checks the rest
        unknown, idle = ann.unused(annotations, self.sidecars, POLICY.sidecars)
        self.warnings = tuple(f"{key} is not an Outrigger annotation" for key in unknown) + tuple(
            idle
        )


def parse(annotations: dict[str, str], _available: object = None) -> Parsed:
    return Parsed(annotations)


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
            ("log-watcher", "ambassador"),
            id="policy-order-spaces-trailing-comma",
        ),
        pytest.param({ann.INJECT: "true"}, (), id="true-is-the-rules-defaults"),
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
    request = parse({ann.INJECT: "ambassador", AMBASSADOR_UPSTREAM: raw})
    assert request.values["ambassador"] == {"upstream": expected, "port": 8081, "stop-delay": 5}


def test_defaults() -> None:
    request = parse({ann.INJECT: "log-watcher,ambassador", **UPSTREAM})
    assert request.values["log-watcher"] == {
        "log-path": "/var/log/app",
        "log-volume-size": "1Gi",
        "stop-delay": 10,
        "log-files": ("*.log",),
        "multiline": "none",
    }
    assert request.values["ambassador"]["port"] == 8081
    assert request.warnings == ()


def test_log_path_trailing_slash_is_dropped() -> None:
    request = parse({ann.INJECT: "log-watcher", LOG_PATH: "/data/logs/"})
    assert request.values["log-watcher"]["log-path"] == "/data/logs"


@pytest.mark.parametrize(
    ("annotations", "named", "accepted"),
    [
        pytest.param({ann.INJECT: "bogus"}, ann.INJECT, "log-watcher", id="unknown-sidecar"),
        pytest.param(
            {ann.INJECT: "log-watcher", LOG_PATH: "var/log"},
            LOG_PATH,
            "absolute",
            id="relative-path",
        ),
        pytest.param(
            {ann.INJECT: "log-watcher", LOG_PATH: "/var/../etc"},
            LOG_PATH,
            "..",
            id="backsteps",
        ),
        pytest.param({ann.INJECT: "log-watcher", LOG_PATH: "/"}, LOG_PATH, "below /", id="root"),
        pytest.param(
            {ann.INJECT: "log-watcher", LOG_PATH: "/a b"},
            LOG_PATH,
            "absolute",
            id="space",
        ),
        pytest.param(
            {ann.INJECT: "ambassador"}, AMBASSADOR_UPSTREAM, "host:port", id="upstream-missing"
        ),
        pytest.param(
            {ann.INJECT: "ambassador", AMBASSADOR_UPSTREAM: "api.example.com"},
            AMBASSADOR_UPSTREAM,
            "host:port",
            id="upstream-no-port",
        ),
        pytest.param(
            {ann.INJECT: "ambassador", AMBASSADOR_UPSTREAM: "api.example.com:0"},
            AMBASSADOR_UPSTREAM,
            "1 to 65535",
            id="upstream-port-zero",
        ),
        pytest.param(
            {ann.INJECT: "ambassador", AMBASSADOR_UPSTREAM: "api.example.com:70000"},
            AMBASSADOR_UPSTREAM,
            "1 to 65535",
            id="upstream-port-high",
        ),
        pytest.param(
            {ann.INJECT: "ambassador", AMBASSADOR_UPSTREAM: "bad_host!:80"},
            AMBASSADOR_UPSTREAM,
            "DNS name",
            id="upstream-bad-host",
        ),
        pytest.param(
            {ann.INJECT: "ambassador", **UPSTREAM, AMBASSADOR_PORT: "http"},
            AMBASSADOR_PORT,
            "1024 to 65535",
            id="port-not-number",
        ),
        pytest.param(
            {ann.INJECT: "ambassador", **UPSTREAM, AMBASSADOR_PORT: "80"},
            AMBASSADOR_PORT,
            "1024 to 65535",
            id="port-privileged",
        ),
        pytest.param(
            {ann.INJECT: "ambassador", **UPSTREAM, AMBASSADOR_PORT: "٨٠٨١"},
            AMBASSADOR_PORT,
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
                LOG_PATH: "relative",
                AMBASSADOR_UPSTREAM: "nope",
                AMBASSADOR_PORT: "-1",
            },
            AVAILABLE,
        )
    assert len(caught.value.problems) == 3
    assert {LOG_PATH, AMBASSADOR_UPSTREAM, AMBASSADOR_PORT} <= {
        key for key in KNOWN_KEYS if key in str(caught.value)
    }


@pytest.mark.parametrize(
    ("annotations", "warning"),
    [
        pytest.param(
            {"outrigger.dev/injct": "x"}, "outrigger.dev/injct is not an Outrigger", id="typo"
        ),
        pytest.param({LOG_PATH: "/x"}, "log-watcher is not injected", id="log-path-unused"),
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
