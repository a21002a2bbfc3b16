"""The check of an injected pod is made once per form (`checked_form`, `VerifiedForms`).

The API server asks again about every injected pod once its own plugins have run (the
reinvocation), each pod with its own name, uid and token volume: the answer for a pod whose
form was found to hold what the policy renders is remembered, and it must be the answer a
full check gives, for every pod of that form and for no other.
"""

from __future__ import annotations

import base64
import copy
from typing import Any

import orjson
from hypothesis import event, given, settings
from hypothesis import strategies as st

from tests.conftest import admission_review, fields, replaced
from tests.test_properties import TOKEN_PATH, pods
from webhook.admission import review as envelope
from webhook.admission.review import is_heavy, parse, respond_with_verdict
from webhook.core.injector import (
    TOKEN_VOLUME_PLACEHOLDER,
    InjectionDenied,
    RequestContext,
    checked_form,
    inject,
    normalise_token_volume,
)
from webhook.core.patch import diff
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
    mount = {"name": token["name"], "readOnly": True, "mountPath": TOKEN_PATH}
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


def form(pod: dict[str, Any], read: frozenset[str] | None = None) -> bytes | None:
    """The checked form of a copy of `pod`, its token volume normalised, as the envelope
    makes it."""
    pod = copy.deepcopy(pod)
    normalise_token_volume(pod)
    return checked_form(pod, read)


def fresh() -> None:
    envelope._VERIFIED = envelope.VerifiedForms()


def test_pods_of_one_workload_share_a_form_and_the_second_is_answered_at_once() -> None:
    fresh()
    first, second = stored(app(), "abcde", "web-1"), stored(app(), "fghij", "web-2")
    assert form(first) == form(second)
    assert is_heavy(request(second), POLICY)  # the whole pod to check, in a thread
    assert answer(first) == ("", "already-injected")
    assert not is_heavy(request(second), POLICY)  # a pod of its form was checked
    assert answer(second) == ("", "already-injected")


def test_a_pod_that_differs_in_what_inject_reads_is_checked_in_full() -> None:
    fresh()
    assert answer(stored(app(), "abcde", "web-1"))[1] == "already-injected"
    tampered = stored(app(), "fghij", "web-2")
    tampered["spec"]["initContainers"][0]["image"] = "cr.fluentbit.io/fluent/fluent-bit:4.1.0"
    assert form(tampered) != form(stored(app(), "abcde", "web-1"))
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
    assert not envelope._VERIFIED.holds(replaced(other, namespace="lab"), POLICY)
    changed = parse_policy({**POLICY.model_dump(mode="json"), "unknownAnnotations": "Deny"})
    assert not envelope._VERIFIED.holds(other, changed)


def test_the_replicas_of_a_statefulset_share_a_form() -> None:
    """Each replica has labels of its own; those no rule reads are left out of the form."""
    fresh()
    replicas = [stored(app(), suffix, f"web-{n}") for n, suffix in enumerate(("abcde", "fghij"))]
    for n, pod in enumerate(replicas):
        pod["metadata"]["labels"] = {"app": "web", "statefulset.kubernetes.io/pod-name": f"web-{n}"}
    first, second = replicas
    assert form(first, frozenset({"app"})) == form(second, frozenset({"app"}))
    read = frozenset({"statefulset.kubernetes.io/pod-name"})
    assert form(first, read) != form(second, read)
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
    assert form(first) == form(second)
    assert answer(first) == ("", "already-injected")
    assert not is_heavy(request(second), POLICY)
    assert answer(second) == ("", "already-injected")
    second["metadata"]["annotations"]["outrigger.dev/log-path"] = "/logs"
    assert form(first) != form(second)


def test_labels_that_are_not_all_strings_stay_whole_in_the_form() -> None:
    """`inject` denies such a pod: no form without them may stand for it."""
    pods = [stored(app(), "abcde", "web-1") for _ in range(2)]
    pods[0]["metadata"]["labels"] = {"app": "web", "replica": 1}
    pods[1]["metadata"]["labels"] = {"app": "web", "replica": 2}
    read = frozenset({"app"})
    assert checked_form(pods[0], read) != checked_form(pods[1], read)


def test_a_reinjected_pod_s_patch_names_its_own_token_volume() -> None:
    """The envelope checks an injected pod with its token volume named as the placeholder
    (the sidecars' mounts of it then compare alike from pod to pod); a patch that touches
    the token volume or its mounts is made from the pod as sent, and names its own."""
    fresh()
    tampered = stored(app(), "abcde", "web-2")
    tampered["spec"]["initContainers"][0]["image"] = "cr.fluentbit.io/fluent/fluent-bit:4.1.0"
    tampered["spec"]["containers"][0]["volumeMounts"].reverse()  # the token mount first
    patch, reason = answer(tampered)
    written = base64.b64decode(patch)
    assert reason == "reinjected"
    assert b"kube-api-access-abcde" in written and TOKEN_VOLUME_PLACEHOLDER.encode() not in written
    came = copy.deepcopy(tampered)
    assert orjson.loads(written) == diff(came, inject(came, RequestContext("shop"), POLICY).pod)


def injected_body(pod: dict[str, Any]) -> bytes:
    return orjson.dumps(admission_review(pod, namespace="shop", uid="u1"))


def test_an_injected_pod_is_read_in_one_typed_pass_as_the_passes_read_it() -> None:
    """The reinvocation's body is read at once (`_injected_at_once`), the whole spec but
    not the managed fields; a body that pass would read otherwise than the passes (a field
    of the wrong type, strings orjson refuses in what it skips) is left to them."""
    pod = stored(app(), "abcde", "web-1")
    pod["metadata"]["managedFields"] = [{"manager": "kube-controller-manager"}]
    body = injected_body(pod)
    at_once = envelope._injected_at_once(body, None)
    assert at_once is not None
    assert fields(at_once) == {**fields(request(pod)), "pod": at_once.pod}
    assert at_once.pod["spec"] == request(pod).pod["spec"]
    assert "managedFields" not in at_once.pod["metadata"]
    wrong_type = copy.deepcopy(pod)
    wrong_type["spec"]["containers"][0]["ports"] = "8080"
    unreadable = body.replace(b'"kube-controller-manager"', b'"kube-\\ud800"')
    not_utf8 = body.replace(b'"kube-controller-manager"', b'"kube-\x80"')
    for refused in (injected_body(wrong_type), unreadable, not_utf8):
        assert envelope._injected_at_once(refused, None) is None
    assert envelope.parse(unreadable)[0] == 400  # type: ignore[index]
    assert envelope.parse(not_utf8)[0] == 400  # type: ignore[index]


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
@given(pod=pods(), tamper=st.booleans(), reorder=st.booleans())
def test_an_injected_pod_read_as_decoded_answers_as_the_pod_sent(
    pod: dict[str, Any], tamper: bool, reorder: bool
) -> None:
    """The envelope hands `mutation` the whole pod it decoded, its token volume named as the
    placeholder, rather than the pod as sent: for generated pods coming back injected
    (tampered with or not, the token mounts first or last), the answer is the one the pod
    as sent gives."""
    pod["metadata"].setdefault("annotations", {}).update(ANNOTATIONS)
    try:
        came_back = stored(pod, "x1y2z", "web-1")
    except InjectionDenied:
        return
    if tamper:
        came_back["spec"]["initContainers"][0]["image"] = "registry.example.com/other:1"
    if reorder:
        for container in came_back["spec"]["containers"]:
            container["volumeMounts"].reverse()
    parsed = request(came_back)
    assert parsed.pod is not None
    event("normalised" if parsed.token_volume else "several token volumes: as sent")
    try:
        from_decoded = envelope._mutation(parsed, POLICY, "")
    except InjectionDenied as error:
        from_decoded = str(error)  # type: ignore[assignment]
    try:
        as_sent = envelope._mutated(copy.deepcopy(came_back), "shop", "", POLICY)
    except InjectionDenied as error:
        as_sent = str(error)  # type: ignore[assignment]
    event(as_sent.reason if isinstance(as_sent, envelope.Mutation) else "denied")
    if isinstance(as_sent, envelope.Mutation) and isinstance(from_decoded, envelope.Mutation):
        assert fields(from_decoded) == fields(as_sent)
    else:
        assert from_decoded == as_sent
