"""The OpenShift policy (charts/outrigger/files/openshift-policy.yaml, the chart's
`openshift.policy`): the embedded default policy but for fixed user and group ids, which the
restricted-v2 SCC assigns from the namespace's range; what it injects still meets the
restricted Pod Security Standard (runAsNonRoot and the rest)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import ROOT, as_pod, validate_strict
from tests.pod_security import container_violations
from webhook.core.injector import RequestContext, inject
from webhook.core.policy import default_policy, load_policy

OPENSHIFT = load_policy(ROOT / "charts" / "outrigger" / "files" / "openshift-policy.yaml")
BOTH = {
    "outrigger.dev/inject": "log-watcher,ambassador",
    "outrigger.dev/ambassador-upstream": "api.example.com:443",
}


def without_ids(document: Any) -> Any:
    if isinstance(document, dict):
        return {
            k: without_ids(v) for k, v in document.items() if k not in ("runAsUser", "runAsGroup")
        }
    if isinstance(document, list):
        return [without_ids(v) for v in document]
    return document


def test_it_is_the_default_policy_without_fixed_ids() -> None:
    default = without_ids(default_policy().model_dump(mode="json"))
    for template in default["sidecars"]:
        if template["container"].get("securityContext") == {}:
            del template["container"]["securityContext"]
        template["runAsAppUser"] = False  # every container already runs as the namespace's user
    assert OPENSHIFT.model_dump(mode="json") == default


@pytest.mark.parametrize("name", ["log-watcher", "ambassador"])
def test_injected_containers_leave_ids_to_the_platform_and_stay_restricted(name: str) -> None:
    pod = {
        "metadata": {"name": "web", "annotations": BOTH},
        "spec": {"containers": [{"name": "app", "image": "registry.example.com/app:1"}]},
    }
    result = inject(pod, RequestContext("shop"), OPENSHIFT).pod
    validate_strict(as_pod(result))
    (container,) = [c for c in result["spec"]["initContainers"] if c["name"] == name]
    context = container["securityContext"]
    assert "runAsUser" not in context and "runAsGroup" not in context
    assert context["runAsNonRoot"] is True
    assert container_violations(as_pod(result), name) == []
