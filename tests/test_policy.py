"""Policy loading: the embedded default, the platform team's example, and errors that name the
path of the bad field."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FIXTURES
from webhook.core.policy import PolicyError, default_policy, is_pinned_image, load_policy

POLICIES = FIXTURES / "policies"


def test_default_policy_defines_both_sidecars_with_pinned_allowed_images() -> None:
    policy = default_policy()
    assert list(policy.templates) == ["log-watcher", "ambassador"]
    for template in policy.sidecars:
        assert policy.image_problem(template.container["image"]) is None
    assert policy.nativeSidecars and policy.unknownAnnotations == "Warn"


def test_platform_team_policy_is_loaded() -> None:
    policy = load_policy(POLICIES / "good-platform-team.yaml")
    assert list(policy.templates) == ["ambassador", "log-watcher", "config-reloader"]
    assert policy.excluded_namespace("batch-nightly") and policy.excluded_namespace("kube-system")
    assert not policy.excluded_namespace("prod-eu")
    assert [r.name for r in policy.matching_rules("prod-eu", {"tier": "frontend"})] == [
        "frontends-ship-logs"
    ]
    assert policy.matching_rules("prod-eu", {"tier": "backend"}) == []
    assert policy.native(policy.templates["ambassador"])
    assert policy.native(policy.templates["log-watcher"])
    assert policy.templates["ambassador"].envoy.healthPort == 9902  # type: ignore[union-attr]
    assert policy.version != default_policy().version


def test_own_namespace_is_always_excluded(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = default_policy()
    assert not policy.excluded_namespace("outrigger-system")
    assert policy.excluded_namespace("outrigger-system", "outrigger-system")
    assert not policy.excluded_namespace("shop", "outrigger-system")
    # The core reads no environment: the command line hands the namespace on.
    monkeypatch.setenv("POD_NAMESPACE", "outrigger-system")
    assert not policy.excluded_namespace("outrigger-system")


@pytest.mark.parametrize(
    ("name", "errors"),
    [
        pytest.param(
            "bad-latest-image.yaml",
            [
                "sidecars[1].container.image: image 'docker.io/envoyproxy/envoy:latest' must be a "
                "valid reference pinned to a version tag"
            ],
            id="latest-image",
        ),
        pytest.param(
            "bad-image-not-allowed.yaml",
            [
                "sidecars[1].container.image: image 'docker.io/envoyproxy/envoy:v1.37.10' "
                "is not in images.allowed (registry.example.com/mirror/)"
            ],
            id="image-not-allowed",
        ),
        pytest.param(
            "bad-unknown-field.yaml",
            ["sidecars[0].privileged: Extra inputs are not permitted"],
            id="unknown-field",
        ),
        pytest.param(
            "bad-unknown-reference.yaml",
            [
                "sidecars[0]: container refers to ${log-dir}, which is not a parameter of this "
                "template (known: log-path)"
            ],
            id="unknown-reference",
        ),
        pytest.param(
            "bad-parameter.yaml",
            [
                "sidecars[0].parameters.log-path.type: Input should be 'string', 'integer'",
                "sidecars[0].parameters.level.annotation: String should match pattern",
            ],
            id="parameter",
        ),
        pytest.param(
            "bad-rule.yaml",
            [
                "rules[1].podSelector.matchExpressions[0].operator: Input should be 'In', 'NotIn', "
                "'Exists' or 'DoesNotExist'"
            ],
            id="rule-selector",
        ),
        pytest.param(
            "bad-envoy.yaml",
            ["sidecars[0].envoy.adminPort: Input should be greater than or equal to 1024"],
            id="envoy-admin-port",
        ),
    ],
)
def test_bad_policies_name_the_field(name: str, errors: list[str]) -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy(POLICIES / name)
    for error in errors:
        assert f"\n  {error}" in str(caught.value)


_P = {"annotation": "outrigger.dev/p"}


def _template(**fields: object) -> dict[str, object]:
    return {"name": "a", "container": {"image": "cr.fluentbit.io/fluent/x:1"}, **fields}


def _envoy_template(envoy: dict[str, object], **parameters: object) -> dict[str, object]:
    """An ambassador template with one upstream parameter and these envoy settings."""
    return _template(
        container={"image": "docker.io/envoyproxy/envoy:v1.37.10"},
        parameters={"u": {"annotation": "outrigger.dev/u", "type": "hostport"}, **parameters},
        envoy={"upstream": "${u}", **envoy},
    )


@pytest.mark.parametrize(
    ("change", "error"),
    [
        pytest.param(
            {"rules": [{"name": "istio", "require": ["istio-proxy"]}]},
            "rules[0] (istio) names unknown sidecars ['istio-proxy']",
            id="rule-unknown-sidecar",
        ),
        pytest.param(
            {
                "sidecars": [
                    {"name": "a", "container": {"image": "cr.fluentbit.io/fluent/x:1"}},
                    {"name": "a", "container": {"image": "cr.fluentbit.io/fluent/x:1"}},
                ]
            },
            "sidecars: duplicate template names ['a']",
            id="duplicate-template",
        ),
        pytest.param(
            {
                "sidecars": [
                    {
                        "name": "a",
                        "container": {"image": "cr.fluentbit.io/fluent/x:1"},
                        "parameters": {"p": {"annotation": "outrigger.dev/inject"}},
                    }
                ]
            },
            "sidecars[0].parameters.p.annotation: outrigger.dev/inject is reserved",
            id="reserved-annotation",
        ),
        pytest.param(
            {
                "sidecars": [
                    {
                        "name": "a",
                        "container": {"image": "cr.fluentbit.io/fluent/x:1"},
                        "parameters": {
                            "p": {
                                "annotation": "outrigger.dev/p",
                                "type": "integer",
                                "default": "many",
                            }
                        },
                    }
                ]
            },
            "sidecars[0]: parameters.p.default: 'many' is not a valid integer",
            id="bad-default",
        ),
        pytest.param(
            {
                "sidecars": [
                    {
                        "name": "a",
                        "container": {"image": "cr.fluentbit.io/fluent/x:1"},
                        "parameters": {"u": {"annotation": "outrigger.dev/u"}},
                        "envoy": {"upstream": "${u}", "listenPort": 8081},
                    }
                ]
            },
            "sidecars[0]: envoy.upstream must be one ${parameter} of type hostport",
            id="envoy-upstream-type",
        ),
        pytest.param(
            {
                "nativeSidecars": True,
                "sidecars": [
                    {
                        "name": "a",
                        "container": {"image": "docker.io/envoyproxy/envoy:v1.37.10"},
                        "parameters": {"u": {"annotation": "outrigger.dev/u", "type": "hostport"}},
                        "envoy": {"upstream": "${u}", "healthPort": None},
                    }
                ],
            },
            "sidecars[0].envoy.healthPort: a native ambassador needs a readiness endpoint",
            id="native-envoy-without-readiness",
        ),
        pytest.param(
            {"sidecars": [_envoy_template({"listenPort": 9901})]},
            "envoy.listenPort 9901 is the admin interface (envoy.adminPort)",
            id="envoy-listen-port-is-admin",
        ),
        pytest.param(
            {"sidecars": [_envoy_template({"listenPort": 80})]},
            "envoy.listenPort.constrained-int: Input should be greater than or equal to 1024",
            id="envoy-listen-port-privileged",
        ),
        pytest.param(
            {
                "sidecars": [
                    _template(
                        container={"image": "${img}"},
                        parameters={"img": {**_P, "type": "string", "default": "x:1"}},
                    )
                ]
            },
            "container.image: a pod may choose it only through one ${parameter} of type image",
            id="image-from-a-string-parameter",
        ),
        pytest.param(
            {
                "sidecars": [
                    _template(
                        container={"image": "cr.fluentbit.io/fluent/${tag}"},
                        parameters={"tag": {**_P, "type": "string", "default": "x:1"}},
                    )
                ]
            },
            "container.image: a pod may choose it only through one ${parameter} of type image",
            id="image-with-a-reference-inside",
        ),
        pytest.param(
            {
                "sidecars": [
                    _template(
                        container={"image": "${img}"},
                        parameters={"img": {**_P, "type": "image", "default": "evil.example/x:1"}},
                    )
                ]
            },
            "container.image: image 'evil.example/x:1' is not in images.allowed",
            id="image-parameter-default-not-allowed",
        ),
        pytest.param(
            {
                "sidecars": [
                    _template(
                        container={"image": "cr.fluentbit.io/fluent/x:1", "args": ["${p}"]},
                        parameters={"p": _P},
                    )
                ]
            },
            "container refers to ${p}, whose parameter has no default and is not required",
            id="reference-may-be-unset",
        ),
        pytest.param(
            {
                "sidecars": [
                    _template(
                        container={
                            "image": "docker.io/envoyproxy/envoy:v1.37.10",
                            "ports": [{"containerPort": "${envoy.health-port}"}],
                        },
                        parameters={"u": {"annotation": "outrigger.dev/u", "type": "hostport"}},
                        envoy={"upstream": "${u}", "healthPort": None},
                    )
                ]
            },
            "refers to ${envoy.health-port}; envoy.healthPort is null",
            id="health-port-reference-without-one",
        ),
        pytest.param(
            {
                "sidecars": [
                    _template(
                        container={
                            "image": "cr.fluentbit.io/fluent/x:1",
                            "volumeMounts": [{"name": "v", "mountPath": "/etc/outrigger/sds/"}],
                        },
                        volumes=[{"name": "v", "emptyDir": {}}],
                    )
                ]
            },
            "container.volumeMounts: '/etc/outrigger/sds' overlaps /etc/outrigger",
            id="mount-over-outriggers-own",
        ),
        pytest.param(
            {
                "sidecars": [
                    _template(
                        container={
                            "image": "cr.fluentbit.io/fluent/x:1",
                            "volumeMounts": [{"name": "v", "mountPath": "/etc"}],
                        },
                        volumes=[{"name": "v", "emptyDir": {}}],
                    )
                ]
            },
            "container.volumeMounts: '/etc' overlaps /etc/log-watcher",
            id="mount-above-outriggers-own",
        ),
        pytest.param(
            {"sidecars": [{**_template(), "name": "a" * 54}]},
            "sidecars[0].name: String should have at most 53 characters",
            id="template-name-too-long-for-its-volumes",
        ),
        pytest.param(
            {
                "sidecars": [
                    _envoy_template(
                        {"listenPort": "${port}"},
                        port={
                            **_P,
                            "type": "integer",
                            "minimum": 1024,
                            "maximum": 65535,
                            "default": 9901,
                        },
                    )
                ]
            },
            "envoy.listenPort: its parameter's default 9901 is the admin interface",
            id="envoy-listen-port-default-is-admin",
        ),
        pytest.param(
            {
                "sidecars": [
                    _template(
                        container={
                            "image": "cr.fluentbit.io/fluent/x:1",
                            "ports": [{"containerPort": "${metrics}"}],
                        },
                        parameters={"metrics": {**_P, "type": "integer", "default": 2020}},
                    )
                ]
            },
            "container: containerPort ${metrics}: its parameter needs minimum >= 1 and maximum",
            id="port-parameter-unbounded",
        ),
        pytest.param(
            {
                "sidecars": [
                    _template(
                        container={
                            "image": "cr.fluentbit.io/fluent/x:1",
                            "resources": {
                                "requests": {"memory": "512Mi"},
                                "limits": {"memory": "256Mi"},
                            },
                        }
                    )
                ]
            },
            "sidecars[0].container.resources.memory: the template's request 512Mi is above "
            "its limit 256Mi",
            id="request-above-limit",
        ),
        pytest.param(
            {"sidecars": [_envoy_template({"listenAddress": "localhost"})]},
            "sidecars[0].envoy.listenAddress: must be an IP address every pod has",
            id="envoy-listen-address-a-name",
        ),
        *(
            pytest.param(
                {"sidecars": [_envoy_template({"listenAddress": address})]},
                "sidecars[0].envoy.listenAddress: must be an IP address every pod has",
                id=f"envoy-listen-address-{address}",
            )
            for address in ("10.1.2.3", "::ffff:127.0.0.1", "::1%lo", "fe80::1")
        ),
        pytest.param(
            {"sidecars": [_envoy_template({"adminPort": 9902})]},
            "envoy.adminPort and envoy.healthPort are both 9902",
            id="envoy-admin-is-health",
        ),
        pytest.param(
            {
                "sidecars": [
                    _envoy_template(
                        {"listenPort": "${port}"},
                        port={**_P, "type": "integer", "minimum": 1, "default": 8081},
                    )
                ]
            },
            "envoy.listenPort: its parameter needs minimum >= 1024 and maximum <= 65535",
            id="envoy-listen-port-parameter-unbounded",
        ),
        pytest.param(
            {
                "sidecars": [
                    _template(classicPreStopSleep="${p}", parameters={"p": {**_P, "default": "5"}})
                ]
            },
            "classicPreStopSleep must be a number or one ${parameter} of type integer",
            id="pre-stop-not-integer",
        ),
        pytest.param(
            {
                "sidecars": [
                    _template(
                        classicPreStopSleep="${p}",
                        parameters={"p": {**_P, "type": "integer", "minimum": 0, "default": 5}},
                    )
                ]
            },
            "classicPreStopSleep: its parameter needs minimum >= 0 and maximum <= 300",
            id="pre-stop-unbounded",
        ),
        pytest.param(
            {"sidecars": [_template(classicPreStopSleep=301)]},
            "sidecars[0].classicPreStopSleep.constrained-int: Input should be less than or equal",
            id="pre-stop-too-long",
        ),
        pytest.param(
            {
                "sidecars": [
                    _template(
                        classicPreStopSleep=5,
                        container={
                            "image": "cr.fluentbit.io/fluent/x:1",
                            "lifecycle": {"preStop": {"sleep": {"seconds": 1}}},
                        },
                    )
                ]
            },
            "set classicPreStopSleep or container.lifecycle.preStop, not both",
            id="pre-stop-twice",
        ),
        pytest.param(
            {
                "sidecars": [
                    _template(volumes=[{"name": "v", "emptyDir": {}}]),
                    {**_template(volumes=[{"name": "v", "emptyDir": {}}]), "name": "b"},
                ]
            },
            "sidecars: a and b both add a volume 'v'",
            id="volume-added-twice",
        ),
    ],
)
def test_cross_field_errors_name_the_path(change: dict[str, object], error: str) -> None:
    document = {**default_policy().model_dump(mode="json"), **change}
    with pytest.raises(PolicyError) as caught:
        from webhook.core.policy import parse_policy

        parse_policy(document)
    assert error in str(caught.value)


def test_unreadable_policy(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy"):
        load_policy(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("sidecars: [unclosed")
    with pytest.raises(PolicyError, match="cannot read policy"):
        load_policy(broken)


@pytest.mark.parametrize(
    ("image", "pinned"),
    [
        ("envoyproxy/envoy:v1.37.10", True),
        ("localhost:5000/team/envoy:1.0", True),
        ("envoy@sha256:" + "a" * 64, True),
        ("envoy:latest", False),
        ("envoy", False),
        ("localhost:5000/envoy", False),
        ("Envoy:1.0", False),
        ("envoy:1.0@sha256:short", False),
    ],
)
def test_pinned_images(image: str, pinned: bool) -> None:
    assert is_pinned_image(image) is pinned


def test_docs_show_the_platform_team_policy() -> None:
    page = (FIXTURES.parent.parent / "docs" / "platform" / "policy.md").read_text()
    policy = (POLICIES / "good-platform-team.yaml").read_text()
    assert f"```yaml\n{policy}```" in page


def _with_log_watcher(**settings: object) -> dict[str, object]:
    """The default policy, its log-watcher's settings changed."""
    document = default_policy().model_dump(mode="json")
    for template in document["sidecars"]:
        if template.get("logWatcher"):
            template["logWatcher"] = {**template["logWatcher"], **settings}
    return document


def test_literal_log_files_are_read_as_patterns() -> None:
    """`logWatcher.files` written in the policy (not a parameter) is checked as a pod's
    patterns are at load, and rendered as patterns (it was a TypeError on every pod)."""
    from webhook.core.injector import RequestContext, inject
    from webhook.core.policy import parse_policy

    policy = parse_policy(_with_log_watcher(files="*.log, app/*.txt"))
    pod = {
        "metadata": {"annotations": {"outrigger.dev/inject": "log-watcher"}},
        "spec": {"containers": [{"name": "app", "image": "registry.example.com/app:1"}]},
    }
    injected = inject(pod, RequestContext("shop"), policy).pod
    config = injected["metadata"]["annotations"]["log-watcher.outrigger.dev/fluent-bit.yaml"]
    assert "/var/log/app/*.log,/var/log/app/app/*.txt" in config
    for bad in ("", "../up.log", ",".join(["*.log"] * 9)):
        with pytest.raises(PolicyError, match=r"logWatcher\.files: "):
            parse_policy(_with_log_watcher(files=bad))


def test_a_line_buffer_below_fluent_bits_chunk_is_refused() -> None:
    """32k is 32,000 bytes: Fluent Bit's tail refuses to start under its 32,768-byte chunk
    (checked on the 4.2 binary); 33k starts."""
    from webhook.core.policy import parse_policy

    with pytest.raises(PolicyError, match=r"bufferMaxSize: must be at least 33k"):
        parse_policy(_with_log_watcher(bufferMaxSize="32k"))
    parse_policy(_with_log_watcher(bufferMaxSize="33k"))


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "::1", "0.0.0.0", "::"])
def test_addresses_every_pod_has_are_listen_addresses(address: str) -> None:
    from webhook.core.policy import parse_policy

    document = default_policy().model_dump(mode="json")
    for template in document["sidecars"]:
        if template.get("envoy"):
            template["envoy"]["listenAddress"] = address
    parse_policy(document)


@pytest.mark.parametrize("path", ["logs", "/var/log/a,b", "/proc/logs", "/var/../log"])
def test_a_literal_log_path_is_checked_as_a_pods_would_be(path: str) -> None:
    """`/var/log/a,b` loaded, and Fluent Bit read `/var/log/a` and `b` instead (its path is a
    comma-separated list)."""
    from webhook.core.policy import parse_policy

    document = _with_log_watcher(logPath=path)
    for template in document["sidecars"]:  # type: ignore[attr-defined]
        if template.get("logWatcher"):
            for mount in template["container"]["volumeMounts"]:
                if mount["mountPath"] == "/var/log/app":
                    mount["mountPath"] = path
    with pytest.raises(PolicyError, match=r"logWatcher\.logPath: expected an absolute"):
        parse_policy(document)


def test_a_log_files_default_beyond_the_templates_own_bounds_is_refused() -> None:
    """Every pod without the annotation was denied for the policy's own default."""
    from webhook.core.policy import parse_policy

    document = _with_log_watcher(maxFilePatterns=2)
    for template in document["sidecars"]:  # type: ignore[attr-defined]
        if template.get("logWatcher"):
            name = template["logWatcher"]["files"].strip("${}")
            template["parameters"][name]["default"] = "a.log,b.log,c.log"
    with pytest.raises(PolicyError, match=r"default: 3 patterns, the cluster policy accepts 2"):
        parse_policy(document)
