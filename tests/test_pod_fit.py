"""Pods that cannot run what is injected (issue 21): Windows pods, and the hostNetwork case
they share one mechanism with (webhook.core.fit). A sidecar that only a rule's default asks
for is skipped with a warning; one the pod asks for, or a rule requires, is denied with the
reason. tests/test_kube_pod_fit.py has the real API server refuse what this prevents."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import FIXTURES
from tests.test_cli import outrigger
from webhook.core.fit import OS_LABEL, WINDOWS_SKIPPED, windows_pin
from webhook.core.injector import InjectionDenied, RequestContext, inject
from webhook.core.policy import Policy, load_policy, parse_policy

TEAM = load_policy(FIXTURES / "policies" / "good-platform-team.yaml")
TEAM_FILE = FIXTURES / "policies" / "good-platform-team.yaml"
UPSTREAM = {"outrigger.dev/ambassador-upstream": "payments.example.com:443"}
WINDOWS_OS = {"os": {"name": "windows"}}
REQUIRED = "requiredDuringSchedulingIgnoredDuringExecution"


def pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"generateName": "web-", "labels": {"app": "web"}}
    if annotations is not None:
        metadata["annotations"] = annotations
    containers = [{"name": "app", "image": "registry.example.com/app-win:1"}]
    return {"metadata": metadata, "spec": {"containers": containers, **spec}}


def required_affinity(*terms: list[dict[str, Any]]) -> dict[str, Any]:
    """spec.affinity with required node selector terms, each a list of match expressions."""
    selector = {"nodeSelectorTerms": [{"matchExpressions": list(term)} for term in terms]}
    return {"affinity": {"nodeAffinity": {REQUIRED: selector}}}


def os_in(*values: str, operator: str = "In") -> dict[str, Any]:
    return {"key": OS_LABEL, "operator": operator, "values": list(values)}


SSD = {"key": "disk", "operator": "In", "values": ["ssd"]}


# What makes a pod a Windows one ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "where"),
    [
        (WINDOWS_OS, "spec.os.name: windows"),
        ({"nodeSelector": {OS_LABEL: "windows"}}, f"spec.nodeSelector {OS_LABEL}: windows"),
        (
            required_affinity([os_in("windows")]),
            f"spec.affinity.nodeAffinity.{REQUIRED}: {OS_LABEL} In [windows]",
        ),
    ],
    ids=["os-name", "selector", "affinity"],
)
def test_the_field_that_makes_a_windows_pod_is_named(spec: dict[str, Any], where: str) -> None:
    assert windows_pin(spec) == where


@pytest.mark.parametrize(
    ("spec", "pinned"),
    [
        (required_affinity([os_in("windows")], [os_in("windows")]), True),
        (required_affinity([SSD, os_in("windows")]), True),  # expressions of a term all hold
        (required_affinity([os_in("windows")], [os_in("linux")]), False),  # terms: either
        (required_affinity([os_in("windows")], [SSD]), False),
        (required_affinity([os_in("windows", operator="NotIn")]), False),
        (required_affinity([os_in("windows", "linux")]), False),
        (required_affinity([os_in()]), False),
        (required_affinity(), False),
        (
            {
                "affinity": {
                    "nodeAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [
                            {"weight": 1, "preference": {"matchExpressions": [os_in("windows")]}}
                        ]
                    }
                }
            },
            False,  # a preference pins nothing
        ),
    ],
    ids=[
        "all-terms-windows",
        "windows-and-ssd",
        "one-term-linux",
        "one-term-without-os",
        "not-in",
        "windows-or-linux",
        "no-values",
        "no-terms",
        "preferred",
    ],
)
def test_required_affinity_pins_windows_only_when_every_term_does(
    spec: dict[str, Any], pinned: bool
) -> None:
    assert (windows_pin(spec) is not None) is pinned


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"os": {"name": "linux"}},
        {"nodeSelector": {OS_LABEL: "linux"}},
        {"nodeSelector": {"kubernetes.io/arch": "amd64"}},
        {"os": None, "nodeSelector": None, "affinity": None},
    ],
    ids=["nothing", "os-linux", "selector-linux", "selector-arch", "nulls"],
)
def test_other_pods_are_not_windows_pods(spec: dict[str, Any]) -> None:
    assert windows_pin(spec) is None


# Skipped or denied ----------------------------------------------------------------------------


def test_a_rule_default_is_skipped_in_a_windows_pod_with_a_warning() -> None:
    sent = pod(UPSTREAM, **WINDOWS_OS)
    result = inject(sent, RequestContext("payments"), TEAM)
    assert result.pod is sent and result.reason == WINDOWS_SKIPPED
    warning = (
        "ambassador (a rule's default) is not injected into this Windows pod "
        "(spec.os.name: windows): it is a Linux container"
    )
    assert result.warnings == (warning,)
    assert result.explanation == ("ambassador: default of rule 'payments-egress'", warning)


@pytest.mark.parametrize(
    "spec",
    [
        WINDOWS_OS,
        {"nodeSelector": {OS_LABEL: "windows"}},
        required_affinity([os_in("windows")], [SSD, os_in("windows")]),
    ],
    ids=["os-name", "selector", "affinity"],
)
def test_a_sidecar_the_pod_asks_for_is_denied_in_a_windows_pod(
    spec: dict[str, Any], policy: Policy
) -> None:
    sent = pod({"outrigger.dev/inject": "log-watcher"}, **spec)
    with pytest.raises(InjectionDenied) as denied:
        inject(sent, RequestContext("default"), policy)
    where = windows_pin(spec)
    assert str(denied.value) == (
        f"log-watcher cannot be injected into a Windows pod ({where}): it is a Linux "
        'container; leave Outrigger\'s sidecars out of outrigger.dev/inject ("false" for '
        "none); for one that a rule of the cluster policy requires, the platform team narrows "
        "that rule (its namespaces or podSelector) so that it does not cover these pods"
    )
    assert denied.value.reason == "conflict"


def test_each_denied_sidecar_is_named_and_the_way_out_said_once(policy: Policy) -> None:
    sent = pod(
        {"outrigger.dev/inject": "log-watcher,ambassador", **UPSTREAM},
        hostNetwork=True,  # Windows comes first: there, nothing runs, ports or not
        **WINDOWS_OS,
    )
    with pytest.raises(InjectionDenied) as denied:
        inject(sent, RequestContext("default"), policy)
    problems = str(denied.value).split("; ")
    assert problems[:2] == [
        f"{name} cannot be injected into a Windows pod (spec.os.name: windows): it is a Linux "
        "container"
        for name in ("log-watcher", "ambassador")
    ]
    assert str(denied.value).count("leave Outrigger's sidecars out") == 1
    assert "hostNetwork" not in str(denied.value)


def test_a_sidecar_a_rule_requires_is_denied_in_a_windows_pod() -> None:
    sent = pod({"outrigger.dev/inject": "false"}, nodeSelector={OS_LABEL: "windows"})
    sent["metadata"]["labels"] = {"tier": "frontend"}  # rule frontends-ship-logs requires it
    with pytest.raises(InjectionDenied, match=r"^log-watcher cannot be injected into a Windows"):
        inject(sent, RequestContext("prod-eu"), TEAM)


def test_a_required_sidecar_is_denied_and_a_default_skipped_in_one_windows_pod() -> None:
    document = TEAM.model_dump(mode="json", exclude_none=True)
    document["rules"].append(
        {"name": "shop-logs", "namespaces": ["payments"], "require": ["log-watcher"]}
    )
    both = parse_policy(document)
    with pytest.raises(InjectionDenied) as denied:
        inject(pod(UPSTREAM, **WINDOWS_OS), RequestContext("payments"), both)
    assert str(denied.value).startswith("log-watcher cannot be injected into a Windows pod")
    assert "ambassador" not in str(denied.value)  # a default: skipped, not denied


def test_a_linux_pod_pinned_like_a_windows_one_is_injected(policy: Policy) -> None:
    sent = pod({"outrigger.dev/inject": "log-watcher"}, **required_affinity([os_in("linux")]))
    assert inject(sent, RequestContext("default"), policy).injected == ("log-watcher",)


def test_hostnetwork_keeps_its_reason_and_messages() -> None:
    result = inject(pod(UPSTREAM, hostNetwork=True), RequestContext("payments"), TEAM)
    assert result.reason == "host-network-skipped"
    assert result.warnings == (
        "ambassador (a rule's default) is not injected into this hostNetwork pod: its ports "
        "would be taken on the node",
    )


# outrigger inject --explain -------------------------------------------------------------------


def test_explain_shows_the_skipped_sidecar_and_the_raised_resources(tmp_path: Path) -> None:
    windows = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "win"},
        "spec": {"template": pod(UPSTREAM, **WINDOWS_OS)},
    }
    linux = {
        "apiVersion": "v1",
        "kind": "Pod",
        **pod(UPSTREAM, resources={"requests": {"cpu": "1", "memory": "1Gi"}}),
    }
    linux["metadata"]["name"] = "sized"
    manifests = tmp_path / "in.yaml"
    manifests.write_text(yaml.safe_dump_all([windows, linux]))
    result = outrigger(
        "inject", "--explain", "--policy", TEAM_FILE, "-n", "payments", "-f", manifests
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert "Deployment/win in namespace payments: nothing injected (windows-skipped)" in lines
    assert (
        "  warning: ambassador (a rule's default) is not injected into this Windows pod "
        "(spec.os.name: windows): it is a Linux container"
    ) in lines
    assert "Pod/sized in namespace payments: injected ambassador" in lines
    assert (
        "  warning: pod-level resources raised by what the injected sidecars add: requests cpu "
        "1 -> 1020m (+20m), requests memory 1Gi -> 1056Mi (+32Mi)"
    ) in lines
