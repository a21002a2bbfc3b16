"""Pod-level resources (issue 21): raised by what the injected sidecars add, in the API server's
canonical form, and taken back down by re-injection, so that injecting twice is injecting once.
tests/test_kube_pod_fit.py has the real API server accept the raised pods, refuse the others,
and store each value as written."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kubernetes.utils import parse_quantity

from webhook.core import annotations as ann
from webhook.core.injector import InjectionDenied, RequestContext, inject
from webhook.core.podresources import NotAQuantity, canonical, quantity, raised
from webhook.core.policy import Policy, default_policy, parse_policy
from webhook.core.selection import ALREADY_INJECTED

DEFAULT = RequestContext("default")
BOTH = {ann.INJECT: "log-watcher,ambassador", "outrigger.dev/ambassador-upstream": "a.example:443"}
# The default policy's sidecars: log-watcher 10m/32Mi (limits 200m/128Mi), ambassador 50m/64Mi
# (limits 1/256Mi): together requests 60m/96Mi, limits 1200m/384Mi.
CLASSIC = parse_policy({**default_policy().model_dump(mode="json"), "nativeSidecars": False})


def pod(resources: dict[str, Any] | None, annotations: dict[str, str] = BOTH) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "app", "image": "registry.example.com/a:1"}]}
    if resources is not None:
        spec["resources"] = resources
    return {"metadata": {"name": "p", "annotations": annotations}, "spec": spec}


def sidecar(requests: dict[str, str] | None = None, limits: dict[str, str] | None = None) -> Any:
    resources = {k: v for k, v in (("requests", requests), ("limits", limits)) if v is not None}
    return {"name": "s", "resources": resources}


# Quantities -----------------------------------------------------------------------------------


# Read as the kubernetes package reads them: suffixes, exponents, signs, fractions.
SPELLINGS = ["100m", "0.5", "1", "2", "1e3", "1E3", "1E", "64Mi", "1.5Gi", "100M", "1e-1", ".5"]
MORE_SPELLINGS = ["1k", "+7", "3Ei", "12000000n", "5000u", "1.25T", "2P", "0"]


@pytest.mark.parametrize("text", [*SPELLINGS, *MORE_SPELLINGS])
def test_quantities_read_as_kubernetes_reads_them(text: str) -> None:
    assert quantity(text, "x") == parse_quantity(text)


@pytest.mark.parametrize(("text", "stored"), [("429u", "1m"), ("12n", "1m"), ("1.0001", "1001m")])
def test_values_round_up_to_the_milli_unit_as_the_api_server_stores_them(
    text: str, stored: str
) -> None:
    assert canonical(quantity(text, "x"), "cpu") == stored


@pytest.mark.parametrize(
    "value",
    [True, None, "", "1.2.3", "5 Mi", "1KiB", "m", "1e", "0x10", [], "-1", "1e300000", "9Ei"],
)
def test_what_is_no_quantity_is_said_so(value: object) -> None:
    """Nor a negative one, nor one past 8Ei, which the API server stores but whose sum would
    take as many digits as its exponent says."""
    with pytest.raises(NotAQuantity, match=r"^x: .* is not a Kubernetes quantity"):
        quantity(value, "x")


# What the API server v1.36.2 stored for each value (tests/test_kube_pod_fit.py checks again).
@pytest.mark.parametrize(
    ("resource", "text", "stored"),
    [
        ("cpu", "1000m", "1"),
        ("cpu", "1.5", "1500m"),
        ("cpu", "0.15", "150m"),
        ("cpu", "1e-1", "100m"),
        ("cpu", "2200m", "2200m"),
        ("memory", "1.5Gi", "1536Mi"),
        ("memory", "100000000", "100M"),
        ("memory", "2000", "2k"),
        ("memory", "133554432", "133554432"),
        ("memory", "1953125Ki", "1953125Ki"),
        ("memory", "1024", "1Ki"),
        ("memory", "512", "512"),
        ("memory", "0", "0"),
    ],
)
def test_values_are_written_in_the_api_servers_canonical_form(
    resource: str, text: str, stored: str
) -> None:
    assert canonical(quantity(text, "x"), resource) == stored


@given(st.integers(0, 10**15), st.sampled_from(["cpu", "memory", "hugepages-2Mi"]))
def test_the_canonical_form_reads_back_as_the_same_value(millis: int, resource: str) -> None:
    value = Decimal(millis).scaleb(-3) if resource == "cpu" else Decimal(millis)
    written = canonical(value, resource)
    assert quantity(written, "x") == value == parse_quantity(written)
    assert canonical(quantity(written, "x"), resource) == written


# Raising --------------------------------------------------------------------------------------


def test_each_value_the_pod_names_grows_by_what_the_sidecars_add(policy: Policy) -> None:
    resources = {
        "requests": {"cpu": "100m", "memory": "64Mi"},
        "limits": {"cpu": "1", "memory": "512Mi", "hugepages-2Mi": "4Mi"},
    }
    result = inject(pod(resources), DEFAULT, policy)
    assert result.pod["spec"]["resources"] == {
        "requests": {"cpu": "160m", "memory": "160Mi"},
        "limits": {"cpu": "2200m", "memory": "896Mi", "hugepages-2Mi": "4Mi"},
    }
    assert result.warnings[-1] == (
        "pod-level resources raised by what the injected sidecars add: requests cpu 100m -> "
        "160m (+60m), requests memory 64Mi -> 160Mi (+96Mi), limits cpu 1 -> 2200m (+1200m), "
        "limits memory 512Mi -> 896Mi (+384Mi)"
    )


def test_only_what_the_pod_names_is_raised(policy: Policy) -> None:
    result = inject(pod({"requests": {"cpu": "0.5"}}), DEFAULT, policy)
    assert result.pod["spec"]["resources"] == {"requests": {"cpu": "560m"}}


@pytest.mark.parametrize("resources", [None, {}, {"requests": {"hugepages-1Gi": "2Gi"}}])
def test_a_pod_whose_resources_no_sidecar_adds_to_is_unchanged(
    resources: dict[str, Any] | None, policy: Policy
) -> None:
    sent = pod(resources)
    result = inject(sent, DEFAULT, policy)
    assert result.pod["spec"].get("resources") is sent["spec"].get("resources")
    assert not any("pod-level" in warning for warning in result.warnings)


def test_a_missing_request_counts_the_limit_and_a_missing_limit_the_request() -> None:
    """The API server makes a container's missing request its limit; a missing limit counts as
    the request, so that the pod's requests stay within its limits."""
    spec = {"resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1"}}}
    sidecars = [sidecar(limits={"cpu": "200m"}), sidecar(requests={"cpu": "50m", "memory": "1Mi"})]
    result, warning = raised(spec, sidecars)
    assert result["resources"] == {
        "requests": {"cpu": "1250m", "memory": "1025Mi"},
        "limits": {"cpu": "1250m"},
    }
    assert warning is not None and "limits cpu 1 -> 1250m (+250m)" in warning


def test_classic_sidecars_raise_the_pod_too() -> None:
    result = inject(pod({"limits": {"cpu": "100m"}}), DEFAULT, CLASSIC)
    assert [c["name"] for c in result.pod["spec"]["containers"]][1:] == [
        "log-watcher",
        "ambassador",
    ]
    assert result.pod["spec"]["resources"] == {"limits": {"cpu": "1300m"}}


def test_a_pod_value_that_is_no_quantity_is_denied(policy: Policy) -> None:
    with pytest.raises(InjectionDenied, match=r"spec\.resources\.requests\.cpu: 'lots' is not"):
        inject(pod({"requests": {"cpu": "lots"}}), DEFAULT, policy)


# Injecting twice ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "resources",
    [
        {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        {"requests": {"cpu": "0.1", "memory": "100M"}},  # not canonical: written back canonical
        {"limits": {"cpu": 2, "memory": "1e9"}},
    ],
)
def test_injecting_twice_equals_injecting_once(resources: dict[str, Any], policy: Policy) -> None:
    once = inject(pod(resources), DEFAULT, policy)
    twice = inject(once.pod, DEFAULT, policy)
    assert twice.reason == ALREADY_INJECTED and twice.pod is once.pod


def test_reinjection_takes_out_what_the_old_sidecars_added(policy: Policy) -> None:
    """Under another policy the sidecars' resources differ: the pod is lowered by what its
    containers hold, then raised by what the new ones add."""
    document = policy.model_dump(mode="json")
    document["sidecars"][0]["container"]["resources"]["requests"]["cpu"] = "110m"
    bigger = parse_policy(document)
    resources = {"requests": {"cpu": "100m"}}
    old = inject(pod(resources), DEFAULT, policy).pod
    assert old["spec"]["resources"] == {"requests": {"cpu": "160m"}}
    new = inject(old, DEFAULT, bigger)
    assert new.reason == "reinjected"
    assert (
        new.pod["spec"]["resources"]
        == inject(pod(resources), DEFAULT, bigger).pod["spec"]["resources"]
        == {"requests": {"cpu": "260m"}}
    )
