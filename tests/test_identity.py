"""The log-watcher runs as the app's user where the pod says it (webhook.core.identity)."""

from __future__ import annotations

import base64
from typing import Any

import jsonpatch
import orjson
import pytest

from tests.conftest import admission_review
from webhook.admission.review import review
from webhook.core.injector import RequestContext, inject
from webhook.core.policy import default_policy

POLICY = default_policy()


def injected(spec: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The log-watcher's securityContext and the warnings, for a pod with `spec`."""
    pod = {"metadata": {"name": "p", "annotations": {"outrigger.dev/inject": "log-watcher"}}}
    injection = inject({**pod, "spec": spec}, RequestContext("shop"), POLICY)
    watcher = injection.pod["spec"]["initContainers"][0]
    return watcher["securityContext"], injection.warnings


def app(**security: Any) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "app", "image": "registry.example.com/app:1"}
    if security:
        container["securityContext"] = security
    return container


@pytest.mark.parametrize(
    ("spec", "user", "group"),
    [
        pytest.param({"securityContext": {"runAsUser": 1000}, "containers": [app()]}, 1000, 65534,
                     id="pod-user-only"),
        pytest.param({"securityContext": {"runAsUser": 1000, "runAsGroup": 3000},
                      "containers": [app()]}, 1000, 3000, id="pod-user-and-group"),
        pytest.param({"containers": [app(runAsUser=101, runAsGroup=101)]}, 101, 101,
                     id="container"),
        pytest.param({"securityContext": {"runAsUser": 1000},
                      "containers": [app(runAsUser=1001), app(runAsUser=1001)]}, 1001, 65534,
                     id="containers-over-the-pod"),
    ],
)  # fmt: skip
def test_the_watcher_takes_the_app_s_user(spec: dict[str, Any], user: int, group: int) -> None:
    context, warnings = injected(spec)
    assert (context["runAsUser"], context["runAsGroup"]) == (user, group)
    assert context["runAsNonRoot"] is True and context["readOnlyRootFilesystem"] is True
    assert not [w for w in warnings if "reads the app's files" in w]


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        pytest.param({"containers": [app()]}, "the pod does not set the app's runAsUser",
                     id="unknown"),
        pytest.param({"securityContext": {"runAsUser": 0}, "containers": [app()]},
                     "the app runs as root", id="root"),
        pytest.param({"containers": [app(runAsUser=1000), app(runAsUser=2000)]},
                     "the app containers run as different users (1000:None, 2000:None)",
                     id="different-users"),
        pytest.param({"containers": [app(runAsUser=1000), app()]},
                     "different users", id="one-unknown"),
    ],
)  # fmt: skip
def test_where_the_app_s_user_is_not_known_the_warning_names_the_fix(
    spec: dict[str, Any], why: str
) -> None:
    context, warnings = injected(spec)
    assert (context["runAsUser"], context["runAsGroup"]) == (65534, 65534)
    (warning,) = [w for w in warnings if "reads the app's files" in w]
    assert warning.startswith("log-watcher reads the app's files as user 65534, as ")
    assert why in warning
    assert warning.endswith(
        "set runAsUser (and runAsGroup) of the app in the pod's securityContext"
    )


def test_a_watcher_as_the_app_s_user_is_injected_once() -> None:
    """Re-injection (reinvocation, a stored pod) finds what it would render."""
    pod = {
        "metadata": {"name": "p", "annotations": {"outrigger.dev/inject": "log-watcher"}},
        "spec": {"securityContext": {"runAsUser": 1000}, "containers": [app()]},
    }
    first = inject(pod, RequestContext("shop"), POLICY).pod
    again = inject(first, RequestContext("shop"), POLICY)
    assert again.reason == "already-injected" and again.pod == first


@pytest.mark.parametrize(
    "spec",
    [
        {"securityContext": {"runAsUser": 1000, "runAsGroup": 3000}, "containers": [app()]},
        {"containers": [app(runAsUser=1000, runAsGroup=3000)]},
    ],
    ids=["pod", "container"],
)
def test_the_webhook_reads_the_app_user_too(spec: dict[str, Any]) -> None:
    """Through the admission envelope, which decodes only what the injector reads: the app's
    user must be among it (it was not: the watcher ran as 65534, then a re-injection of the
    stored pod, which reads the whole pod, found it mismatched)."""
    pod = {"metadata": {"name": "p", "annotations": {"outrigger.dev/inject": "log-watcher"}}}
    status, body = review(
        orjson.dumps(admission_review({**pod, "spec": spec}, namespace="shop")), POLICY
    )
    response = orjson.loads(body)["response"]
    operations = orjson.loads(base64.b64decode(response["patch"]))
    injected = jsonpatch.apply_patch({**pod, "spec": spec}, operations)
    security = injected["spec"]["initContainers"][0]["securityContext"]
    assert (status, security["runAsUser"], security["runAsGroup"]) == (200, 1000, 3000)
    assert "warnings" not in response
