"""Every value an annotation can carry gets a named denial: never an internal error, never a
control character in a pod, never a path the runtime refuses, never an unbounded echo.

Through the whole envelope (`review`), as the HTTP route calls it, under the default policy
and the platform team's example policy (docs/platform/policy.md).
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import orjson
import pytest
import yaml

from tests.conftest import FIXTURES, admission_review, largest_admissible_config
from webhook.admission import review as envelope
from webhook.core.policy import Policy, default_policy, load_policy, parse_policy

DEFAULT = default_policy()
PLATFORM = load_policy(FIXTURES / "policies" / "good-platform-team.yaml")
INJECT = "outrigger.dev/inject"
CONFIG = "outrigger.dev/ambassador-config"
UPSTREAM = "outrigger.dev/ambassador-upstream"
PORT = "outrigger.dev/ambassador-port"
LOG_PATH = "outrigger.dev/log-path"


def pod(annotations: dict[str, str], **spec: Any) -> dict[str, Any]:
    containers = spec.pop("containers", [{"name": "app", "image": "registry.example.com/app:1"}])
    return {
        "metadata": {"name": "p", "annotations": annotations},
        "spec": {"containers": containers, **spec},
    }


def answer(sent: dict[str, Any], policy: Policy = DEFAULT) -> dict[str, Any]:
    status, body = envelope.review(orjson.dumps(admission_review(sent)), policy)
    assert status == 200
    response: dict[str, Any] = orjson.loads(body)["response"]
    return response


def denial(sent: dict[str, Any], policy: Policy = DEFAULT) -> str:
    response = answer(sent, policy)
    assert response["allowed"] is False, response
    assert response["status"]["code"] == 400  # a denial, not an internal error (500)
    message: str = response["status"]["message"]
    assert len(message) < 2048, f"an unbounded echo: {len(message)} characters"
    return message


def tls_config(field: str) -> str:
    tls = f"{{caSecret: ambassador-x, {field}}}"
    return f'upstreams: {{a: {{address: "a:443", port: 9000, tls: {tls}}}}}'


def ambassador(config: str) -> dict[str, Any]:
    return pod({INJECT: "ambassador", CONFIG: config})


HOSTILE = [
    pytest.param(
        {INJECT: "ambassador", UPSTREAM: "a:80", PORT: "--8081"}, PORT, id="port-double-minus"
    ),
    pytest.param(
        {INJECT: "ambassador", UPSTREAM: "a:80", PORT: "9" * 5000}, PORT, id="port-5000-digits"
    ),
    pytest.param(
        {INJECT: "ambassador", UPSTREAM: "a:80", PORT: "\uff18\uff10\uff18\uff11"},
        PORT,
        id="port-fullwidth",
    ),
    pytest.param(
        {INJECT: "ambassador", CONFIG: "[" * 5000 + "]" * 5000}, CONFIG, id="yaml-5000-deep"
    ),
    pytest.param(
        {
            INJECT: "ambassador",
            CONFIG: "a:\n" + "".join(f"{' ' * (2 * i)}b{i}:\n" for i in range(1, 60)),
        },
        CONFIG,
        id="yaml-block-deep",
    ),
    pytest.param(
        {
            INJECT: "ambassador",
            CONFIG: "upstreams: {a: {address: 'a:80', port: " + "9" * 5000 + "}}",
        },
        CONFIG,
        id="yaml-int-5000-digits",
    ),
    pytest.param(
        {INJECT: "ambassador", CONFIG: "x: &a [1]\nupstreams: *a"}, CONFIG, id="yaml-alias"
    ),
    pytest.param(
        {
            INJECT: "ambassador",
            CONFIG: "upstreams: {"
            + ", ".join(f"u{i}: {{address: 'u{i}:80', port: {10000 + i}}}" for i in range(40))
            + "}",
        },
        CONFIG,
        id="too-many-upstreams",
    ),
    pytest.param(
        {
            INJECT: "ambassador",
            CONFIG: yaml.safe_dump(
                {
                    "upstreams": {
                        f"u{i}": {"address": f"u{i}.example.com:80", "port": 10000 + i}
                        for i in range(10000)
                    }
                }
            ),
        },
        CONFIG,
        id="10000-upstreams",
    ),
    pytest.param(
        {INJECT: "log-watcher", LOG_PATH: "/" + "a" * (1 << 20)}, LOG_PATH, id="1-mib-value"
    ),
    pytest.param({INJECT: "x," * (1 << 18)}, INJECT, id="1-mib-inject-list"),
    pytest.param(
        {INJECT: "log-watcher", LOG_PATH: "/var/log\n/"}, LOG_PATH, id="path-newline-before-end"
    ),
    pytest.param(
        {INJECT: "log-watcher", LOG_PATH: "/var/log/app\n"}, LOG_PATH, id="path-trailing-newline"
    ),
    pytest.param({INJECT: "log-watcher", LOG_PATH: "/var/\x00log"}, LOG_PATH, id="path-nul"),
    pytest.param({INJECT: "ambassador", UPSTREAM: "a.com\n:80"}, UPSTREAM, id="upstream-newline"),
    pytest.param(
        {INJECT: "ambassador", UPSTREAM: "a.com:80\n"}, UPSTREAM, id="upstream-trailing-newline"
    ),
    pytest.param(
        {INJECT: "ambassador", UPSTREAM: "[fe80::1%eth0]:80"}, UPSTREAM, id="upstream-ipv6-zone"
    ),
    pytest.param({INJECT: "log-watcher\n"}, INJECT, id="inject-newline"),
    pytest.param(
        {
            INJECT: "ambassador",
            CONFIG: tls_config('sni: "a\\0b"'),
        },
        CONFIG,
        id="sni-nul",
    ),
    pytest.param(
        {
            INJECT: "ambassador",
            CONFIG: tls_config('sni: "a.com\\n"'),
        },
        CONFIG,
        id="sni-newline",
    ),
    pytest.param(
        {
            INJECT: "ambassador",
            CONFIG: tls_config('subjectAltNames: ["a\\nb"]'),
        },
        CONFIG,
        id="san-newline",
    ),
    pytest.param(
        {
            INJECT: "ambassador",
            CONFIG: 'upstreams: {a: {address: "a:80"}}\nrouting: '
            '{port: 9000, routes: [{pathPrefix: "/a\\0", upstream: a}]}',
        },
        CONFIG,
        id="path-prefix-nul",
    ),
    pytest.param(
        {INJECT: "ambassador", CONFIG: 'upstreams: {"a\\n": {address: "a:80", port: 9000}}'},
        CONFIG,
        id="upstream-name-newline",
    ),
    pytest.param(
        {INJECT: "ambassador", CONFIG: 'upstreams: {a: {address: "a.com\\n:80", port: 9000}}'},
        CONFIG,
        id="address-newline",
    ),
] + [
    pytest.param({INJECT: "log-watcher", LOG_PATH: path}, LOG_PATH, id=f"kernel-path-{path}")
    for path in ("/proc", "/proc/sys", "/proc/self/root", "/sys/fs", "/sys")
]


@pytest.mark.parametrize(("annotations", "named"), HOSTILE)
def test_hostile_values_are_named_denials(
    annotations: dict[str, str], named: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="outrigger.admission"):
        message = denial(pod(annotations))
    assert f"annotation {named}" in message
    assert "internal error" not in message
    assert all(record.levelno < logging.ERROR for record in caplog.records)
    assert all(len(record.getMessage()) < 2048 for record in caplog.records)


@pytest.mark.parametrize(
    ("value", "parameter"),
    [("a\nb", "string"), ("ok\n", "pattern"), ("/x\n", "path"), ("/x/\x00", "path")],
)
def test_policy_parameters_refuse_control_characters(value: str, parameter: str) -> None:
    """A platform's string, pattern and path parameters take no control character either."""
    declared: dict[str, Any] = {"annotation": "outrigger.dev/x", "required": True}
    if parameter == "pattern":
        declared["pattern"] = "[a-z]+$"
    elif parameter == "path":
        declared["type"] = "path"
    document = DEFAULT.model_dump(mode="json", exclude_none=True)
    document["sidecars"].append(
        {
            "name": "extra",
            "parameters": {"x": declared},
            "container": {"image": "cr.fluentbit.io/fluent/extra:1.0", "args": ["${x}"]},
        }
    )
    message = denial(pod({INJECT: "extra", "outrigger.dev/x": value}), parse_policy(document))
    assert "annotation outrigger.dev/x" in message


@pytest.mark.parametrize("policy", [DEFAULT, PLATFORM], ids=["default", "platform"])
@pytest.mark.parametrize(
    "mount", ["/var/log/app", "/var/log//app", "/var/log/./app", "/var/log/app/.", "/var/log/app//"]
)
def test_the_log_path_is_compared_as_the_runtime_resolves_it(policy: Policy, mount: str) -> None:
    app = {
        "name": "app",
        "image": "registry.example.com/app:1",
        "volumeMounts": [{"name": "data", "mountPath": mount}],
    }
    sent = pod(
        {INJECT: "log-watcher"}, containers=[app], volumes=[{"name": "data", "emptyDir": {}}]
    )
    message = denial(sent, policy)
    assert "already mounts a volume at" in message


def test_a_patch_too_large_for_the_api_server_is_denied(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(envelope, "MAX_PATCH_BYTES", 2000)
    envelope.ANSWERS.clear()
    message = denial(pod({INJECT: "ambassador", UPSTREAM: "a.example.com:80"}))
    assert "more than the 2000 accepted" in message
    envelope.ANSWERS.clear()


def test_the_largest_admissible_configuration_is_admitted() -> None:
    """At every bound at once: still admitted, and the patch stays far below the limit."""
    config = largest_admissible_config()
    assert len(config) < 16 * 1024
    response = answer(ambassador(config))
    assert response["allowed"] is True
    assert len(base64.b64decode(response["patch"])) < envelope.MAX_PATCH_BYTES
