"""Properties over generated pods and annotation sets, through the whole admission envelope.

For every pod: the answer is well formed and never an internal error; a patch applies with
`jsonpatch`, the result validates strictly against the Kubernetes schema, its injected
containers meet the restricted Pod Security Standard, a sample of the ambassadors passes the
real `envoy --mode validate`, a pod that runs to completion (a Job's)
has no sidecar in `containers`, a Windows pod gets no sidecar, pod-level resources grow by
exactly what the injected sidecars add (summed with the `kubernetes` package's parser), and
injecting the result again changes nothing (the API server's reinvocation, re-applied
manifests).
"""

from __future__ import annotations

import base64
import copy
from typing import Any

import jsonpatch
import orjson
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from kubernetes.utils import parse_quantity

from tests.conftest import FIXTURES, admission_review, as_pod, validate_strict
from tests.pod_security import container_violations
from tests.real_envoy import IS_ROOT, ambassadors, validate_pod
from webhook.admission.review import review
from webhook.core import annotations as ann
from webhook.core.fit import windows_pin
from webhook.core.injector import RequestContext, inject
from webhook.core.patch import diff
from webhook.core.policy import Policy, default_policy, load_policy, parse_policy

# The default policy (native sidecars: insertions at the front of initContainers), the
# platform team's (rules, Deny on unknown keys) and the default one in classic placement.
POLICIES = [
    default_policy(),
    load_policy(FIXTURES / "policies" / "good-platform-team.yaml"),
    parse_policy({**default_policy().model_dump(mode="json"), "nativeSidecars": False}),
]
# How many generated ambassadors also go through the real `envoy --mode validate`.
ENVOY_SAMPLE = {"left": 40}
NAMES = st.sampled_from(["app", "main-app", "worker", "db"] * 3 + ["ambassador", "log-watcher"])
PATHS = st.sampled_from(["/var/log/app", "/data", "/logs/", "/tmp/x"] * 3 + ["relative", "/a/../b"])
PORTS = st.sampled_from([80, 1024, 8080, 9090] * 3 + [8081, 9901])


@st.composite
def containers(draw: st.DrawFn) -> list[dict[str, Any]]:
    names = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
    result = []
    for name in names:
        container: dict[str, Any] = {"name": name, "image": "registry.example.com/app:1.0"}
        if draw(st.booleans()):
            ports = draw(st.lists(PORTS, max_size=2, unique=True))
            container["ports"] = [{"containerPort": port} for port in ports]
        if draw(st.booleans()):
            path = draw(st.sampled_from(["/data", "/cache", "/data", "/var/log/app"]))
            container["volumeMounts"] = [{"name": "data", "mountPath": path}]
        result.append(container)
    return result


# Mostly valid values, so that most examples inject; a few invalid ones exercise denials.
annotation_values = st.fixed_dictionaries(
    {
        ann.INJECT: st.sampled_from(
            ["log-watcher", "ambassador", "log-watcher,ambassador", "ambassador, log-watcher,"] * 3
            + ["", "false", "bogus", "true"]
        ),
    },
    optional={
        "outrigger.dev/log-path": PATHS,
        "outrigger.dev/ambassador-upstream": st.sampled_from(
            ["external-service:80", "api.example.com:443", "10.0.0.7:8080"] * 3 + ["nope", "x:0"]
        ),
        "outrigger.dev/ambassador-port": st.sampled_from(
            ["8081", "9090", "15001"] * 3 + ["9901", "80"]
        ),
        "outrigger.dev/ambassador-config": st.sampled_from(
            [
                "upstreams: {a: {address: 'a.example.com:443', port: 9001, "
                "tls: {caSecret: ambassador-a-ca}}, b: {address: 'b:80', port: 9002}}",
                "upstreams: {db: {address: 'db.example.com:5432', port: 15432, protocol: tcp}}",
                "upstreams: {a: {address: 'a:80'}}\nrouting: {port: 9003, routes: "
                "[{pathPrefix: /, upstream: a}]}",
                "upstreams: {a: {address: 'a:80', port: 8080}}",  # the app's port: denied
                "upstreams: [broken",
            ]
        ),
        "outrigger.dev/log-watcher-stop-delay": st.sampled_from(["0", "10", "120", "121"]),
        "outrigger.dev/ambassador-stop-delay": st.sampled_from(["5", "60", "-1"]),
        "outrigger.dev/log-volume-size": st.sampled_from(["1Gi", "200Mi", "0Mi"]),
        "outrigger.dev/log-output": st.sampled_from(["loki", "stdout", "loki", "splunk"]),
        # Per-sidecar resources (issue 24): within the bounds, past them, removed, odd units.
        "outrigger.dev/log-watcher-memory-limit": st.sampled_from(
            ["96Mi", "1024Mi", "300M", "32Mi", "none"]
        ),
        "outrigger.dev/log-watcher-cpu-limit": st.sampled_from(["none", "0.5", "1500m", "9"]),
        "outrigger.dev/ambassador-cpu-limit": st.sampled_from(["2500m", "none", "250m"]),
        "outrigger.dev/ambassador-memory-request": st.sampled_from(["100M", "512Mi", "4Gi"]),
        "outrigger.dev/unknown": st.just("x"),
        "example.com/a~b/c": st.just("kept"),
        # Not Outrigger's (left out of the memo key), and one a template writes (kept).
        "kubectl.kubernetes.io/restartedAt": st.just("2026-12-07T10:00:00Z"),
        "log-watcher.outrigger.dev/fluent-bit.yaml": st.just("stale"),
    },
)


OS = "kubernetes.io/os"
# What makes a pod a Windows one (webhook.core.fit), and look-alikes that do not.
PLATFORMS: list[dict[str, Any]] = [
    {"os": {"name": "windows"}},
    {"os": {"name": "linux"}},
    {"nodeSelector": {OS: "windows"}},
    {"nodeSelector": {OS: "linux", "disk": "ssd"}},
    *(
        {
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": OS, "operator": op, "values": values}]}
                            for values in terms
                        ]
                    }
                }
            }
        }
        for op, terms in [
            ("In", [["windows"]]),
            ("In", [["windows"], ["windows"]]),
            ("In", [["windows"], ["linux"]]),
            ("NotIn", [["windows"]]),
        ]
    ),
]
# Pod-level resources: canonical and other spellings, and a resource no sidecar sets.
CPU = st.sampled_from(["100m", "0.5", "1", "1000m", "250m", 2])
MEMORY = st.sampled_from(["64Mi", "1Gi", "100M", "1.5Gi", "512Mi", "1e9"])


@st.composite
def pod_resources(draw: st.DrawFn) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    for kind in ("requests", "limits"):
        values = draw(
            st.fixed_dictionaries(
                {},
                optional={"cpu": CPU, "memory": MEMORY, "hugepages-2Mi": st.just("2Mi")},
            )
        )
        if values:
            resources[kind] = values
    return resources


@st.composite
def pods(draw: st.DrawFn) -> dict[str, Any]:
    metadata: dict[str, Any] = draw(
        st.sampled_from([{"name": "p"}, {"generateName": "web-7d4b9c-"}])
    )
    if draw(st.integers(0, 9)):  # one pod in ten has no annotations at all
        metadata["annotations"] = draw(annotation_values)
    if draw(st.booleans()):  # some a rule reads, some per replica (left out of the memo key)
        metadata["labels"] = draw(LABELS)
    spec: dict[str, Any] = {"containers": draw(containers())}
    mounts_data = any(c.get("volumeMounts") for c in spec["containers"])
    if mounts_data or draw(st.booleans()):
        spec["volumes"] = [{"name": "data", "emptyDir": {}}]
    if draw(st.booleans()):
        spec["initContainers"] = [{"name": "init", "image": "busybox:1.36"}]
    if draw(st.booleans()):  # the app's user, which the log-watcher takes
        spec["securityContext"] = draw(
            st.sampled_from([{"runAsUser": 1000, "runAsGroup": 2000}, {"runAsUser": 0}, {}])
        )
    if draw(st.booleans()):  # Jobs: classic sidecars are denied there
        spec["restartPolicy"] = draw(st.sampled_from(["Always", "OnFailure", "Never"]))
    if draw(st.booleans()):  # shorter than a classic sidecar's preStop sleep: a warning
        spec["terminationGracePeriodSeconds"] = draw(st.sampled_from([0, 10, 30, 120]))
    # Windows pods get no sidecar (skipped or denied): few, so that most examples inject.
    spec.update(draw(st.sampled_from([{}] * 16 + PLATFORMS)))
    if not draw(st.integers(0, 2)):  # raised by what the sidecars add
        spec["resources"] = draw(pod_resources())
    if draw(st.booleans()):  # the ServiceAccount plugin's, before the webhook sees the pod
        add_token_volume(spec, draw(TOKEN_SUFFIXES))
    return {"metadata": metadata, "spec": spec}


LABELS = st.dictionaries(
    st.sampled_from(
        ["tier", "app", "app.kubernetes.io/component", "statefulset.kubernetes.io/pod-name"]
    ),
    st.sampled_from(["frontend", "web", "operator", "web-0"]),
    max_size=3,
)
TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_SUFFIXES = st.sampled_from(["abcde", "x7k2p", "zz9qq"] * 4 + ["*"])


def add_token_volume(spec: dict[str, Any], suffix: str) -> None:
    """The token volume and its mounts, as the ServiceAccount admission plugin adds them (a
    random five-character suffix; "*", the placeholder the webhook normalises to, as a
    hostile pod could name it)."""
    name = f"kube-api-access-{suffix}"
    volume = {"name": name, "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}
    spec["volumes"] = [*spec.get("volumes", ()), volume]
    mount = {"name": name, "readOnly": True, "mountPath": TOKEN_PATH}
    for container in [*spec["containers"], *spec.get("initContainers", ())]:
        if isinstance(container, dict):
            container["volumeMounts"] = [*(container.get("volumeMounts") or ()), dict(mount)]


def answer_for(pod: dict[str, Any], namespace: str, policy: Policy) -> dict[str, Any]:
    status, body = review(orjson.dumps(admission_review(pod, namespace=namespace)), policy)
    assert status == 200
    response: dict[str, Any] = orjson.loads(body)["response"]
    return response


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pods(),
    st.sampled_from(["default", "shop"] * 3 + ["prod-eu", "payments", "checkout", "kube-system"]),
    st.sampled_from(POLICIES),
)
def test_injection_is_valid_and_idempotent(
    pod: dict[str, Any], namespace: str, policy: Policy
) -> None:
    original = copy.deepcopy(pod)
    response = answer_for(pod, namespace, policy)
    assert pod == original  # the request object is never modified
    event("denied" if not response["allowed"] else "patched" if "patch" in response else "as is")
    if not response["allowed"]:
        assert response["status"]["code"] == 400
        assert response["status"]["message"].startswith("outrigger: ")
        return
    if "patch" not in response:
        return
    operations = orjson.loads(base64.b64decode(response["patch"]))
    # The webhook decodes only what the injector reads (webhook.admission.wire): its patch must be
    # exactly the patch made from the whole pod.
    assert operations == diff(pod, inject(pod, RequestContext(namespace), policy).pod)
    assert_writes_only_outrigger_annotations(operations)
    injected = jsonpatch.apply_patch(pod, operations)
    validate_strict(as_pod(injected))
    status = orjson.loads(injected["metadata"]["annotations"][ann.STATUS])
    for name in status["injected"]:
        assert container_violations(as_pod(injected), name) == []
    if injected["spec"].get("restartPolicy", "Always") != "Always":  # the pod can complete
        sidecars = [c for c in injected["spec"]["containers"] if c["name"] in status["injected"]]
        assert sidecars == []
    assert windows_pin(injected["spec"]) is None
    assert_raised_by_the_sidecars(pod["spec"], injected["spec"], status["injected"])
    again = answer_for(injected, namespace, policy)
    assert again["allowed"] and "patch" not in again
    if IS_ROOT and ambassadors(injected) and ENVOY_SAMPLE["left"] > 0:
        ENVOY_SAMPLE["left"] -= 1  # a bounded sample: each costs an Envoy start
        validate_pod(injected)


def assert_writes_only_outrigger_annotations(operations: list[dict[str, Any]]) -> None:
    """What the memo key rests on (`annotations_read`): the injection writes no annotation
    whose key lacks `outrigger.dev/`, so the others never change the patch."""
    for operation in operations:
        path = operation["path"]
        if path == "/metadata/annotations":
            assert all(ann.PREFIX in key for key in operation["value"]), operation
        elif path.startswith("/metadata/annotations/"):
            assert ann.PREFIX.replace("/", "~1") in path, operation


def assert_raised_by_the_sidecars(
    before: dict[str, Any], after: dict[str, Any], names: list[str]
) -> None:
    """Each pod-level value grew by what the injected containers add (a missing request
    counts as the limit, a missing limit as the request); tests/test_kube_pod_fit.py has the
    API server accept such pods."""
    if "resources" not in before:
        assert "resources" not in after
        return
    every = after.get("initContainers", []) + after["containers"]
    sidecars = [c["resources"] for c in every if c["name"] in names]
    for kind, other in (("requests", "limits"), ("limits", "requests")):
        for resource, value in before["resources"].get(kind, {}).items():
            shares = [
                r.get(kind, {}).get(resource) or r.get(other, {}).get(resource) for r in sidecars
            ]
            added = sum(parse_quantity(share) for share in shares if share)
            grown = parse_quantity(after["resources"][kind][resource]) - parse_quantity(value)
            assert grown == added, (kind, resource, value, after["resources"])
