"""The check of an injected pod is made once per form (`checked_form`, `VerifiedForms`).

The API server asks again about every injected pod once its own plugins have run (the
reinvocation), each pod with its own name, uid and token volume: the answer for a pod whose
form was found to hold what the policy renders is remembered, and it must be the answer a
full check gives, for every pod of that form and for no other.
"""

from __future__ import annotations

import copy
from typing import Any

import orjson
from hypothesis import event, given, settings
from hypothesis import strategies as st

from tests.conftest import admission_review
from tests.test_properties import pods
from webhook.admission import review as envelope
from webhook.admission.review import is_heavy, parse, respond_with_verdict
from webhook.core.injector import InjectionDenied, RequestContext, checked_form, inject
from webhook.core.policy import default_policy, parse_policy

POLICY = default_policy()
TOKEN = {
    "name": "kube-api-access-abcde",
    "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]},
}
ANNOTATIONS = {
    "outrigger.dev/inject": "log-watcher,ambassador",
    "outrigger.dev/ambassador-upstream": "api.example.com:443",
}


def stored(pod: dict[str, Any], suffix: str, name: str) -> dict[str, Any]:
    """`pod` injected, then as the API server keeps it: named, with a uid and its own token
    volume mounted into every container."""
    result: dict[str, Any] = copy.deepcopy(inject(pod, RequestContext("shop"), POLICY).pod)
    result["metadata"].update({"name": name, "uid": f"uid-{name}", "resourceVersion": "1"})
    token = {**TOKEN, "name": f"kube-api-access-{suffix}"}
    result["spec"]["volumes"] = [*result["spec"].get("volumes", ()), token]
    mount = {"name": token["name"], "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}
    for field in ("initContainers", "containers"):
        for container in result["spec"].get(field, ()):
            container["volumeMounts"] = [*container.get("volumeMounts", ()), mount]
    return result


def app() -> dict[str, Any]:
    """A pod with 400 environment variables: large enough (about 40 KB) that checking it
    in full is work for a thread (`is_heavy`)."""
    env = [{"name": f"SETTING_{n}", "value": "x" * 64} for n in range(400)]
    return {
        "metadata": {"generateName": "web-", "annotations": dict(ANNOTATIONS)},
        "spec": {
            "containers": [{"name": "app", "image": "registry.example.com/app:1", "env": env}]
        },
    }


def request(pod: dict[str, Any]) -> Any:
    body = orjson.dumps(admission_review(pod, namespace="shop", uid="u1"))
    parsed = parse(body, POLICY.selector_label_keys)  # as the server parses
    assert isinstance(parsed, envelope.AdmissionRequest), parsed
    return parsed


def answer(pod: dict[str, Any]) -> tuple[str, str]:
    (_, body), verdict = respond_with_verdict(request(pod), POLICY)
    return orjson.loads(body)["response"].get("patch", ""), verdict.reason


def fresh() -> None:
    envelope._VERIFIED = envelope.VerifiedForms()


def test_pods_of_one_workload_share_a_form_and_the_second_is_answered_at_once() -> None:
    fresh()
    first, second = stored(app(), "abcde", "web-1"), stored(app(), "fghij", "web-2")
    assert checked_form(copy.deepcopy(first)) == checked_form(copy.deepcopy(second))
    assert is_heavy(request(second), POLICY)  # the whole pod to check, in a thread
    assert answer(first) == ("", "already-injected")
    assert not is_heavy(request(second), POLICY)  # a pod of its form was checked
    assert answer(second) == ("", "already-injected")


def test_a_pod_that_differs_in_what_inject_reads_is_checked_in_full() -> None:
    fresh()
    assert answer(stored(app(), "abcde", "web-1"))[1] == "already-injected"
    tampered = stored(app(), "fghij", "web-2")
    tampered["spec"]["initContainers"][0]["image"] = "cr.fluentbit.io/fluent/fluent-bit:4.1.0"
    assert checked_form(copy.deepcopy(tampered)) != checked_form(stored(app(), "abcde", "web-1"))
    patch, reason = answer(tampered)
    assert reason == "reinjected" and patch


def test_a_forged_status_is_never_remembered() -> None:
    fresh()
    forged = app()
    forged["metadata"]["annotations"]["outrigger.dev/status"] = orjson.dumps(
        {"injected": ["log-watcher", "ambassador"], "policy": POLICY.version}
    ).decode()
    for _ in range(2):
        patch, reason = answer(forged)
        assert reason == "reinjected" and patch


def test_the_form_is_per_namespace_and_per_policy() -> None:
    fresh()
    pod = stored(app(), "abcde", "web-1")
    assert answer(pod)[1] == "already-injected"
    other = request(pod)
    assert envelope._VERIFIED.holds(other, POLICY)
    assert not envelope._VERIFIED.holds(other._replace(namespace="lab"), POLICY)
    changed = parse_policy({**POLICY.model_dump(mode="json"), "unknownAnnotations": "Deny"})
    assert not envelope._VERIFIED.holds(other, changed)


def test_the_replicas_of_a_statefulset_share_a_form() -> None:
    """Each replica has labels of its own; those no rule reads are left out of the form."""
    fresh()
    replicas = [stored(app(), suffix, f"web-{n}") for n, suffix in enumerate(("abcde", "fghij"))]
    for n, pod in enumerate(replicas):
        pod["metadata"]["labels"] = {"app": "web", "statefulset.kubernetes.io/pod-name": f"web-{n}"}
    first, second = replicas
    assert checked_form(copy.deepcopy(first), frozenset({"app"})) == checked_form(
        copy.deepcopy(second), frozenset({"app"})
    )
    read = frozenset({"statefulset.kubernetes.io/pod-name"})
    assert checked_form(copy.deepcopy(first), read) != checked_form(copy.deepcopy(second), read)
    assert answer(first) == ("", "already-injected")
    assert not is_heavy(request(second), POLICY)  # a replica of its form was checked
    assert answer(second) == ("", "already-injected")


def test_the_revisions_of_a_workload_share_a_form() -> None:
    """Annotations not Outrigger's (`kubectl rollout restart`'s) are left out of the form;
    Outrigger's own are in it."""
    fresh()
    first, second = stored(app(), "abcde", "web-1"), stored(app(), "fghij", "web-2")
    restarted = "kubectl.kubernetes.io/restartedAt"
    first["metadata"]["annotations"][restarted] = "2026-12-07T10:00:00Z"
    second["metadata"]["annotations"][restarted] = "2026-12-07T11:00:00Z"
    assert checked_form(copy.deepcopy(first)) == checked_form(copy.deepcopy(second))
    assert answer(first) == ("", "already-injected")
    assert not is_heavy(request(second), POLICY)
    assert answer(second) == ("", "already-injected")
    second["metadata"]["annotations"]["outrigger.dev/log-path"] = "/logs"
    assert checked_form(copy.deepcopy(first)) != checked_form(copy.deepcopy(second))


def test_labels_that_are_not_all_strings_stay_whole_in_the_form() -> None:
    """`inject` denies such a pod: no form without them may stand for it."""
    pods = [stored(app(), "abcde", "web-1") for _ in range(2)]
    pods[0]["metadata"]["labels"] = {"app": "web", "replica": 1}
    pods[1]["metadata"]["labels"] = {"app": "web", "replica": 2}
    read = frozenset({"app"})
    assert checked_form(pods[0], read) != checked_form(pods[1], read)


def test_the_form_leaves_the_pod_as_it_came() -> None:
    """The envelope hands the decoded pod on to `mutation`: its token volume is renamed for
    the form only."""
    pod = stored(app(), "abcde", "web-1")
    before = copy.deepcopy(pod)
    assert checked_form(pod) is not None
    assert pod == before


def test_two_token_volumes_have_no_form() -> None:
    pod = stored(app(), "abcde", "web-1")
    pod["spec"]["volumes"].append({**TOKEN, "name": "kube-api-access-zzzzz"})
    assert checked_form(pod) is None


@settings(max_examples=300, deadline=None)
@given(pod=pods(), suffixes=st.permutations(["abcde", "x7k2p", "q0q0q"]))
def test_a_remembered_answer_is_the_full_check_s_answer(
    pod: dict[str, Any], suffixes: list[str]
) -> None:
    """Generated pods, stored twice with different names, token volumes and a replica's own
    label: the second pod's answer, with the first one's check remembered, is what a full
    check of it answers."""
    try:
        first, second = (stored(pod, suffix, f"p-{suffix}") for suffix in suffixes[:2])
    except InjectionDenied:
        event("denied")
        return
    for replica, suffix in ((first, suffixes[0]), (second, suffixes[1])):
        labels = replica["metadata"].get("labels") or {}
        replica["metadata"]["labels"] = {**labels, "apps.kubernetes.io/pod-index": suffix}
    fresh()
    full = answer(second)
    event(full[1])
    fresh()
    answer(first)
    assert answer(second) == full


@settings(max_examples=100, deadline=None)
@given(pod=pods(), tamper=st.booleans())
def test_an_injected_pod_read_as_decoded_answers_as_its_bytes(
    pod: dict[str, Any], tamper: bool
) -> None:
    """The envelope hands `mutation` the whole pod it decoded, rather than the bytes to
    decode again: for generated pods coming back injected (tampered with or not), the
    answer is the one the bytes give."""
    pod["metadata"].setdefault("annotations", {}).update(ANNOTATIONS)
    try:
        came_back = stored(pod, "x1y2z", "web-1")
    except InjectionDenied:
        return
    if tamper:
        came_back["spec"]["initContainers"][0]["image"] = "registry.example.com/other:1"
    parsed = request(came_back)
    assert parsed.pod is not None
    event("memoised" if len(parsed.pod_json) <= 4096 else "read as decoded")
    try:
        from_decoded = envelope.mutation(parsed.pod_json, "shop", POLICY, parsed.pod)
    except InjectionDenied as error:
        from_decoded = str(error)  # type: ignore[assignment]
    envelope._memoised_mutation.cache_clear()  # type: ignore[attr-defined]
    try:
        from_bytes = envelope._mutated(orjson.loads(parsed.pod_json), "shop", "", POLICY)
    except InjectionDenied as error:
        from_bytes = str(error)  # type: ignore[assignment]
    assert from_decoded == from_bytes
