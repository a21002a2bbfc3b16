"""The admission.k8s.io/v1 envelope: decode an AdmissionReview, run the core, encode the answer.

Two error families, as the API server expects them: a body that is not an AdmissionReview is a
bad call (`BadReview`, HTTP 400); a pod that cannot be injected is a valid call answered with
`allowed: false` and a message. Every answer echoes the request's uid, apiVersion and kind.
Every warning and message goes through `printable`: kubectl prints them on its user's terminal,
and they may quote annotation keys, which no one has validated when a mutating webhook runs.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from itertools import pairwise
from typing import Any, Final, cast

import orjson
import pybase64

from webhook.admission import wire
from webhook.core.annotations import STATUS
from webhook.core.injector import (
    TOKEN_VOLUME_PLACEHOLDER,
    InjectionDenied,
    RequestContext,
    annotations_read,
    checked_form,
    inject,
    labels_read,
    normalise_token_volume,
    normalises_token_volumes,
    read_parts,
    rename_volume,
    token_volume,
)
from webhook.core.patch import diff
from webhook.core.policy import Policy
from webhook.core.selection import ALREADY_INJECTED
from webhook.core.volumes import API_TOKEN_PATH
from webhook.limits import MAX_CACHED_BYTES, Recent, printable

log = logging.getLogger("outrigger.admission")

API_VERSION: Final = "admission.k8s.io/v1"
KIND: Final = "AdmissionReview"
_POD_KIND: Final = {"group": "", "version": "v1", "kind": "Pod"}
_PATCH_TYPE: Final = "JSONPatch"
_PLACEHOLDER: Final = orjson.dumps(TOKEN_VOLUME_PLACEHOLDER)[1:-1]  # as it is written in a patch
# The API server's token mount, named with the placeholder, as orjson writes it: of the
# ServiceAccount plugin's fields and order (`api_token_mount`, and the app containers' mounts
# as the API server sends them). Quotes in a string are escaped, so these bytes in a patch
# are such an object and nothing else.
_PLACEHOLDER_MOUNT: Final = orjson.dumps(
    {"name": TOKEN_VOLUME_PLACEHOLDER, "readOnly": True, "mountPath": API_TOKEN_PATH}
)
# The mount around its name.
_MOUNT_BEFORE: Final = _PLACEHOLDER_MOUNT.split(_PLACEHOLDER)[0]
_MOUNT_AFTER: Final = _PLACEHOLDER_MOUNT.split(_PLACEHOLDER)[1]
# The largest JSON Patch answered; etcd takes objects of about 1.5 MiB, the pod included.
MAX_PATCH_BYTES = 512 * 1024
# Pods whose part the injector reads is larger than this are answered off the event loop:
# about a millisecond of work (a 10 KB injected pod's full check takes 0.3 ms here, and a hop
# to a thread and back costs more than that under load: it was 2 KiB, which sent every
# reinvocation of an injected pod to a thread).
HEAVY_POD_BYTES: Final = 32 * 1024
# The reason of an answer to anything but a pod creation (other kinds, operations...).
NOT_A_POD_CREATION: Final = "not-a-pod-creation"
# How much of a denial one log line repeats.
LOGGED_CHARACTERS: Final = 1024
# Of a value nested past what the decoders read (msgspec: the Python recursion limit, about a
# thousand levels) or orjson writes (254); a Pod's fields nest a dozen.
_TOO_DEEP: Final = "its arrays and objects nest too deeply"


class BadReview(ValueError):
    """The body is not an AdmissionReview this webhook can answer (HTTP 400)."""


# The records made per review are plain classes whose fields are Final: compiled, mypyc makes
# them native classes, read-only at run time (a write raises AttributeError) and made in a
# fifth of a NamedTuple's time (49 against 245 ns; a frozen dataclass, 537), their fields
# read without a call; interpreted, mypy keeps them unwritten. A new pod's review took 7%
# fewer instructions than with NamedTuples, a memoised one 9% (callgrind).
class AdmissionRequest:
    """One admission request, as decoded for the review.

    `pod_json`: the pod as canonical JSON of what the injector reads (see
    `webhook.admission.wire`); None when the request is no pod creation. A pod with a status:
    its checked form (`checked_form`), as `mutation` reads `pod` instead.
    `owner`: Kind/name of the controlling owner, for the decision log; `owner_reference`:
    the same, for Kubernetes Events about the pod (which may never exist).
    `checked`: a pod with a status: a digest of what `inject` reads of it (`checked_form`),
    under which an earlier check that it holds what the policy renders is remembered.
    `token_volume`: the name of the pod's token volume, where `pod_json` (and `pod`) hold it
    as the placeholder (`rename_volume`), so that pods of one workload share their answer.
    `pod`: a pod with a status: all that the check reads of it (its metadata, the whole of
    its spec), as this request decoded it (never shared), which `mutation` reads.
    `decoded`: a pod to inject: `pod_json` as this request decoded it (never shared), which
    `mutation` injects into where it remembers no answer, rather than decode it again."""

    def __init__(
        self,
        uid: str,
        namespace: str,
        pod_json: bytes | None,
        name: str,
        owner: str = "",
        owner_reference: OwnerReference | None = None,
        dry_run: bool = False,
        checked: bytes | None = None,
        token_volume: str | None = None,
        pod: Any = None,
        decoded: Any = None,
    ) -> None:
        self.uid: Final = uid
        self.namespace: Final = namespace
        self.pod_json: Final = pod_json
        self.name: Final = name
        self.owner: Final = owner
        self.owner_reference: Final = owner_reference
        self.dry_run: Final = dry_run
        self.checked: Final = checked
        self.token_volume: Final = token_volume
        self.pod: Final = pod
        self.decoded: Final = decoded

    def named_as_sent(self, pod_json: bytes | None, decoded: Any = None) -> AdmissionRequest:
        """This request with `pod_json` (`decoded`), whose token volume is named as the pod
        names it."""
        return AdmissionRequest(
            self.uid,
            self.namespace,
            pod_json,
            self.name,
            self.owner,
            self.owner_reference,
            self.dry_run,
            self.checked,
            None,
            self.pod,
            decoded,
        )


class OwnerReference:
    """The pod's controlling owner, as an Event about it names the object."""

    def __init__(self, api_version: str, kind: str, name: str, uid: str) -> None:
        self.api_version: Final = api_version
        self.kind: Final = kind
        self.name: Final = name
        self.uid: Final = uid


class Mutation:
    """The answer for one pod: a base64 JSON Patch (None: nothing to change) and warnings
    (escaped by `printable`).

    `reason`: the selection's (webhook.core.selection), or `reinjected`.
    `names_placeholder`: the patch or a warning holds TOKEN_VOLUME_PLACEHOLDER.
    `token_operations`: instead of `patch`, its JSON split at the placeholder, which names
    only token mounts there, to be joined with each pod's token volume name
    (`for_token_volume`; a join, since `bytes.replace` took 3.4 us for the benchmark's 6 KB
    patch, and a join 0.3)."""

    def __init__(
        self,
        patch: str | None,
        warnings: tuple[str, ...],
        injected: tuple[str, ...],
        reason: str,
        names_placeholder: bool = False,
        token_operations: tuple[bytes, ...] | None = None,
    ) -> None:
        self.patch: Final = patch
        self.warnings: Final = warnings
        self.injected: Final = injected
        self.reason: Final = reason
        self.names_placeholder: Final = names_placeholder
        self.token_operations: Final = token_operations

    def for_token_volume(self, name: str | None) -> Mutation:
        """This answer with the pod's token volume `name` (None: the pod's volume is named
        as the placeholder) put in `token_operations`, as a patch."""
        if self.token_operations is None:
            return self
        written = _PLACEHOLDER if name is None else orjson.dumps(name)[1:-1]
        operations = _within_bound(written.join(self.token_operations))
        patch = pybase64.b64encode_as_string(operations)
        return Mutation(patch, self.warnings, self.injected, self.reason)


class Verdict:
    """What was decided, for metrics and the decision log: `outcome` is one of `injected`,
    `unchanged`, `denied`, `bad_request`, `error`; `reason` a word from a bounded set;
    `message` a denial's or a refusal's, bounded; `warnings` those returned to the client,
    escaped."""

    def __init__(
        self,
        outcome: str,
        reason: str,
        sidecars: tuple[str, ...] = (),
        message: str = "",
        warnings: tuple[str, ...] = (),
    ) -> None:
        self.outcome: Final = outcome
        self.reason: Final = reason
        self.sidecars: Final = sidecars
        self.message: Final = message
        self.warnings: Final = warnings


def bad_request_verdict(refusal: tuple[int, bytes]) -> Verdict:
    text = refusal[1][:LOGGED_CHARACTERS].decode(errors="replace")
    return Verdict("bad_request", "malformed", message=printable(text))


def decode_review(body: bytes, read_labels: frozenset[str] | None = None) -> AdmissionRequest:
    """The request, or `BadReview`. The common cases, the creation of a pod and its coming
    back injected, are read in one pass; anything else (another request, a body the typed
    decoder refuses) by the two passes below, which set every answer.

    `read_labels`: the labels the policy's rules read (`Policy.selector_label_keys`), the
    only ones kept in the `pod_json` of a pod to inject, so that pods which differ in other
    labels only (a StatefulSet's, an indexed Job's) share an answer; None keeps them all."""
    created = _created_in_one_pass(body, read_labels)
    if created is not None:
        return created
    return decode_in_two_passes(body, read_labels)


def decode_in_two_passes(
    body: bytes, read_labels: frozenset[str] | None = None
) -> AdmissionRequest:
    """`decode_review` without its one pass: the review, then its pod from its raw bytes. Any
    body (the one pass takes only the common cases, and must answer as this does)."""
    try:
        review = wire.decode_review(body)
    except wire.MalformedJSON as error:
        raise BadReview(f"body is not valid JSON: {error}") from None
    except wire.DecodeError as error:
        raise BadReview(f"not a valid AdmissionReview: {error}") from None
    except RecursionError:  # msgspec's guard on its own recursion: not a bug, a hostile body
        raise BadReview(f"body is not an AdmissionReview: {_TOO_DEEP} to decode") from None
    if review.get("apiVersion") != API_VERSION or review.get("kind") != KIND:
        raise BadReview(f"expected apiVersion {API_VERSION!r} and kind {KIND!r}")
    request = review.get("request")
    if request is None:
        raise BadReview("AdmissionReview has no 'request' object")
    uid = request.get("uid")
    if not uid:
        raise BadReview("request.uid must be a non-empty string")
    pod = _created_pod(request)
    metadata = (pod or {}).get("metadata") or {}
    pod_json: bytes | None = None
    if pod is not None and STATUS in (metadata.get("annotations") or {}):
        # Whether it holds what its status claims takes the whole of its containers, fields
        # the partial decoder skipped unread included: what `mutation` cannot read (bytes that
        # are not UTF-8, a number past a double) is refused here, not found there.
        sent = bytes(request["object"])
        try:
            whole = orjson.loads(sent)
        except orjson.JSONDecodeError as error:
            raise BadReview(f"request.object is not valid JSON: {error}") from None
        injected = _injected(uid, request, metadata, whole, read_labels)
        return injected or _admission_request(uid, request, metadata, sent, pod=whole)
    if pod is not None:
        pod_json, token, unnamed = _pod_to_inject(pod, read_labels)  # not *: a direct call
        return _admission_request(uid, request, metadata, pod_json, token, decoded=unnamed)
    return _admission_request(uid, request, metadata, pod_json)


def _created_in_one_pass(
    body: bytes, read_labels: frozenset[str] | None
) -> AdmissionRequest | None:
    """The creation of a pod, decoded in one pass; None for anything else. An injected pod
    coming back (every reinvocation) is read again, as such (`_injected_at_once`): a search
    of every body for the status annotation first cost each new pod 1.5 us of its 5 us
    decode, where a reinvocation's second decode costs it 5 us, and reinvocations are few."""
    created = _pod_creation(wire.decode_review_with_pod, body)
    if created is None:
        return None
    request, pod, metadata = created
    if STATUS in (metadata.get("annotations") or {}):
        injected = _injected_at_once(body, read_labels)
        if injected is not None:
            return injected
        return _injected_in_one_pass(body, request, metadata, read_labels)
    pod_json, token, unnamed = _pod_to_inject(pod, read_labels)  # not *: a direct call
    return _admission_request(request["uid"], request, metadata, pod_json, token, decoded=unnamed)


def _injected_at_once(body: bytes, read_labels: frozenset[str] | None) -> AdmissionRequest | None:
    """An injected pod coming back, its review and the whole of its spec read in one typed
    pass (`wire.decode_review_with_injected_pod`: half the time of the one pass and orjson's
    of the whole body), its spec checked as the one pass checks it; None for anything else
    (labels or annotations that are not strings, a pod without a status after all, fields
    of the wrong type), for the passes below to read or refuse."""
    created = _pod_creation(wire.decode_review_with_injected_pod, body) if _readable(body) else None
    if created is None:
        return None
    request, pod, metadata = created
    if STATUS not in (metadata.get("annotations") or {}):
        return None
    try:
        wire.check_spec(pod.get("spec") or {})
    except wire.DecodeError:
        return None
    return _injected(request["uid"], request, metadata, pod, read_labels)


def _pod_creation(decode: Callable[[bytes], Mapping[str, Any]], body: bytes) -> Any:
    """The request, the pod and its metadata of the creation of a pod, as `decode` reads
    `body` in one pass; None for anything else."""
    try:
        review = decode(body)
    except (wire.DecodeError, RecursionError):
        return None
    request = review.get("request")
    if (
        review.get("apiVersion") != API_VERSION
        or review.get("kind") != KIND
        or request is None
        or not request.get("uid")
        or not _creates_a_pod(request)
        or request.get("object") is None
    ):
        return None
    pod = request["object"]
    return request, pod, pod.get("metadata") or {}


# A surrogate written as an escape (`\ud800`), in either case: one search (two with `in`
# took 15 us for an 11 KB body).
_ESCAPED_SURROGATE: Final = re.compile(rb"\\u[dD]")


def _readable(body: bytes) -> bool:
    """Whether orjson reads every string of `body`, those the typed pass skips included:
    UTF-8 without escaped surrogates (which the API server never writes: Go writes UTF-8 as it
    is). Otherwise the passes below read it, and refuse what orjson refuses, as before."""
    try:
        body.decode()
    except UnicodeDecodeError:
        return False
    return _ESCAPED_SURROGATE.search(body) is None


def _injected_in_one_pass(
    body: bytes,
    request: wire.RequestWithPod,
    metadata: wire.ObjectMeta,
    read_labels: frozenset[str] | None,
) -> AdmissionRequest | None:
    """An injected pod coming back that `_injected_at_once` did not read: the request and
    the metadata from the one pass, the whole object read from the body by orjson (the two
    passes would decode it twice more); None where orjson refuses it, for the two passes to
    say why."""
    try:
        whole = orjson.loads(body)["request"]["object"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return _injected(request["uid"], request, metadata, whole, read_labels)


def _injected(
    uid: str,
    request: wire.AnyRequest,
    metadata: wire.ObjectMeta,
    whole: Any,
    read_labels: frozenset[str] | None,
) -> AdmissionRequest | None:
    """A pod with a status: what `mutation` reads is `whole`, fields the partial decoder
    skips included, its token volume normalised as a pod to inject's is (so that the
    sidecars, which the API server gives a mount of it, compare alike from pod to pod); and
    its checked form is what `VerifiedForms` remembers. None, the pod as it came, where
    orjson cannot write it again (nested past 254 levels, a string or number it refuses)."""
    token = normalise_token_volume(whole)
    form = checked_form(whole, read_labels)
    try:  # without a form, what `inject` reads of it stands for it
        pod_json = orjson.dumps(read_parts(whole)) if form is None else form
    except orjson.JSONEncodeError:
        if token is not None:
            rename_volume(whole, TOKEN_VOLUME_PLACEHOLDER, token)
        return None
    checked = None if form is None else hashlib.blake2b(form, digest_size=16).digest()
    return _admission_request(uid, request, metadata, pod_json, token, checked, whole)


def _pod_to_inject(
    pod: wire.Pod, read_labels: frozenset[str] | None
) -> tuple[bytes, str | None, wire.Pod]:
    """The pod as `mutation` takes it (its JSON and itself), and its token volume's name:
    without what the injector never reads but the API server makes different in every pod
    (its name, and its token volume's name, normalised), a controller sets per replica
    (labels the rules do not read) or a new revision changes (annotations not Outrigger's),
    so that the pods of one workload, and of its revisions of one shape, share an answer.
    The name and owner stay in the request for the decision log and the Events."""
    unnamed = _unnamed(pod, read_labels)
    token = token_volume(unnamed)
    if token is not None:
        rename_volume(cast(dict[str, Any], unnamed), token, TOKEN_VOLUME_PLACEHOLDER)
    return wire.encode(unnamed), token, unnamed


def _admission_request(
    uid: str,
    request: wire.AnyRequest,
    metadata: wire.ObjectMeta,
    pod_json: bytes | None,
    token_volume: str | None = None,
    checked: bytes | None = None,
    pod: Any = None,
    decoded: Any = None,
) -> AdmissionRequest:
    owner = _owner(metadata)
    return AdmissionRequest(
        uid=uid,
        namespace=request.get("namespace", ""),
        pod_json=pod_json,
        name=metadata.get("name") or metadata.get("generateName") or "",
        owner=f"{owner.get('kind', '')}/{owner.get('name', '')}" if owner else "",
        owner_reference=_reference(owner) if owner else None,
        dry_run=bool(request.get("dryRun")),
        checked=checked,
        token_volume=token_volume,
        pod=pod,
        decoded=decoded,
    )


def _owner(metadata: wire.ObjectMeta) -> wire.OwnerReference | None:
    """The controlling owner (else the first owner), as the pod names it."""
    references = metadata.get("ownerReferences") or []
    controllers = [r for r in references if r.get("controller")] or references
    return controllers[0] if controllers else None


def _reference(owner: wire.OwnerReference) -> OwnerReference | None:
    """The owner as an Event names it; None when the pod names it incompletely."""
    api_version, kind = owner.get("apiVersion", ""), owner.get("kind", "")
    name, uid = owner.get("name", ""), owner.get("uid", "")
    if not (api_version and kind and name and uid):
        return None
    return OwnerReference(api_version, kind, name, uid)


def _creates_a_pod(request: Mapping[str, Any]) -> bool:
    """Whether the request is a CREATE of a v1 Pod (not of a subresource)."""
    return (
        request.get("operation") == "CREATE"
        and not request.get("subResource")
        and request.get("kind") == _POD_KIND
    )


def _created_pod(request: wire.Request) -> wire.Pod | None:
    """The pod of a CREATE of a v1 Pod (not of a subresource); None for any other request."""
    raw = request.get("object")
    if not _creates_a_pod(request) or raw is None:
        return None
    try:
        return wire.decode_pod(raw)
    except wire.DecodeError as error:
        raise BadReview(f"request.object is not a valid Pod: {error}") from None
    except RecursionError:
        raise BadReview(f"request.object is not a valid Pod: {_TOO_DEEP} to decode") from None


def review(body: bytes, policy: Policy, own_namespace: str = "") -> tuple[int, bytes]:
    """The whole envelope: HTTP status and response body for one request body.
    `own_namespace`: the webhook's, never injected into ("": none)."""
    request = parse(body, policy.selector_label_keys)
    if isinstance(request, AdmissionRequest):
        return respond_with_verdict(request, policy, own_namespace)[0]
    return request


def parse(
    body: bytes, read_labels: frozenset[str] | None = None
) -> AdmissionRequest | tuple[int, bytes]:
    """The request, or the HTTP status and body that refuse it (400); `read_labels` as for
    `decode_review`.

    Nothing is logged here: a refused body is the caller's one WARNING line (the decision
    log), without a traceback, since any client can send one at will."""
    try:
        return decode_review(body, read_labels)
    except BadReview as error:
        return 400, _refusal(str(error))
    except Exception as error:  # whatever a decoder raises on a hostile body: still a 400
        return 400, _refusal(f"cannot decode the AdmissionReview: {type(error).__name__}: {error}")


def _refusal(message: str) -> bytes:
    return orjson.dumps({"error": printable(message)[:LOGGED_CHARACTERS]})


def respond_with_verdict(
    request: AdmissionRequest, policy: Policy, own_namespace: str = ""
) -> tuple[tuple[int, bytes], Verdict]:
    response, verdict = answer(request, policy, own_namespace)
    return (200, orjson.dumps(response)), verdict


def is_heavy(request: AdmissionRequest, policy: Policy) -> bool:
    """Whether answering may take milliseconds: a pod with large outrigger.dev/ values (or
    the whole pod, to check a status, unless a pod of its form was checked already), which
    the caches do not keep."""
    return (
        request.pod_json is not None
        and len(request.pod_json) > HEAVY_POD_BYTES
        and not _VERIFIED.holds(request, policy)
    )


def answer(
    request: AdmissionRequest, policy: Policy, own_namespace: str = ""
) -> tuple[dict[str, Any], Verdict]:
    """`own_namespace`: the webhook's, never injected into ("": none)."""
    if request.pod_json is None:
        return allowed(request), Verdict("unchanged", NOT_A_POD_CREATION)
    if _VERIFIED.holds(request, policy):
        return allowed(request), Verdict("unchanged", ALREADY_INJECTED)
    try:
        result = _mutation(request, policy, own_namespace)
    except InjectionDenied as error:
        message = printable(str(error))  # logged by the decision log (webhook.serving.decisions)
        verdict = Verdict("denied", error.reason, message=message[:LOGGED_CHARACTERS])
        return denied(request, message, 400), verdict
    except Exception:
        # A bug must not turn into a 500 or a half-made pod: refuse, and keep the trace here.
        log.exception(
            "internal error on %s/%s (uid %s)", request.namespace, request.name, request.uid
        )
        message = "internal error while injecting; see the webhook's logs"
        return denied(request, message, 500), Verdict("error", "internal", message=message)
    if result.reason == ALREADY_INJECTED and not result.patch and not result.warnings:
        _VERIFIED.remember(request, policy)
    outcome = "injected" if result.patch else "unchanged"
    verdict = Verdict(outcome, result.reason, result.injected, warnings=result.warnings)
    return allowed(request, result.patch, result.warnings), verdict


def _mutation(request: AdmissionRequest, policy: Policy, own_namespace: str) -> Mutation:
    """The mutation of the pod with its token volume normalised, shared by the pods of one
    workload, its patch naming the pod's own token volume in the token mounts; of the pod as
    sent where the policy's templates could mind the name, or where the answer names the
    placeholder elsewhere (a warning, a volume of a list a reinjection rewrites)."""
    if request.token_volume is not None and _normalises(policy):
        try:
            result = _mutation_as_read(request, policy, own_namespace)
        except InjectionDenied as error:
            if TOKEN_VOLUME_PLACEHOLDER not in str(error):
                raise
        else:
            if not result.names_placeholder:
                return result.for_token_volume(request.token_volume)
    if request.token_volume is not None:
        request = _as_sent(request, request.token_volume)
    return _mutation_as_read(request, policy, own_namespace).for_token_volume(None)


def _mutation_as_read(request: AdmissionRequest, policy: Policy, own_namespace: str) -> Mutation:
    """A pod to inject: `mutation` of its `pod_json`. A pod with a status: `_mutated` of the
    whole of it as the request decoded it, never memoised (it holds its own name and uid;
    `VerifiedForms` remembers its form instead)."""
    if request.pod is not None:
        return _mutated(request.pod, request.namespace, own_namespace, policy)
    assert request.pod_json is not None  # answered before: no pod creation
    return mutation(request.pod_json, request.namespace, policy, own_namespace, request.decoded)


def _as_sent(request: AdmissionRequest, token_volume: str) -> AdmissionRequest:
    """The request with its pod's token volume named again as it was sent."""
    if request.pod is not None:  # this request's own decoding: renamed in place
        rename_volume(request.pod, TOKEN_VOLUME_PLACEHOLDER, token_volume)
        return request.named_as_sent(request.pod_json)
    pod = orjson.loads(cast(bytes, request.pod_json))
    rename_volume(pod, TOKEN_VOLUME_PLACEHOLDER, token_volume)
    return request.named_as_sent(orjson.dumps(pod), pod)


def _unnamed(pod: wire.Pod, read_labels: frozenset[str] | None) -> wire.Pod:
    metadata = pod.get("metadata")
    if not isinstance(metadata, dict):
        return pod
    kept = {key: value for key, value in metadata.items() if key in _READ_METADATA}
    labels, annotations = metadata.get("labels"), metadata.get("annotations")
    if labels:
        kept["labels"] = labels_read(labels, read_labels)
    if annotations:
        kept["annotations"] = annotations_read(annotations)
    return cast(wire.Pod, {**pod, "metadata": kept})


# Of the metadata the wire format decodes, what the injector reads.
_READ_METADATA: Final = frozenset({"labels", "annotations"})


class VerifiedForms:
    """The checked forms of injected pods found to hold what the policy renders, per policy
    version and namespace, as digests: at most `size` (the least recently met forgotten
    first)."""

    def __init__(self, size: int = 4096) -> None:
        self._forms: Recent[tuple[str, str, bytes], bool] = Recent(size)

    def holds(self, request: AdmissionRequest, policy: Policy) -> bool:
        key = _verified_key(request, policy)
        return key is not None and self._forms.get(key) is not None

    def remember(self, request: AdmissionRequest, policy: Policy) -> None:
        key = _verified_key(request, policy)
        if key is not None:
            self._forms.keep(key, True)


def _verified_key(request: AdmissionRequest, policy: Policy) -> tuple[str, str, bytes] | None:
    if request.checked is None or not _normalises(policy):
        return None
    return policy.version, request.namespace, request.checked


@lru_cache(maxsize=8)
def _normalises(policy: Policy) -> bool:
    return normalises_token_volumes(policy)


_VERIFIED = VerifiedForms()


def mutation(
    pod_json: bytes, namespace: str, policy: Policy, own_namespace: str = "", pod: Any = None
) -> Mutation:
    """Inject into the pod and encode the patch; memoised, as pods come in series.

    The replicas of a workload are created alike, so a rollout asks the same question once per
    replica. `inject` is a pure function of exactly these arguments (`pod_json` holds every
    field it reads), so a remembered answer is the answer. `pod`: `pod_json` as the request
    decoded it (never shared), injected into where no answer is remembered; else it is decoded
    afresh from `pod_json`. Denials raise and are not remembered, nor are pods past
    MAX_CACHED_BYTES (as `cache_small` keeps them out of its caches).
    """
    if len(pod_json) > MAX_CACHED_BYTES:
        return _mutated(_decoded(pod_json, pod), namespace, own_namespace, policy)
    key = (pod_json, namespace, own_namespace, policy)
    answer = ANSWERS.get(key)
    if answer is None:
        answer = _mutated(_decoded(pod_json, pod), namespace, own_namespace, policy)
        ANSWERS.keep(key, answer)
    return answer


# `mutation`'s memory: the answers for the pods asked about last.
ANSWERS: Final[Recent[tuple[bytes, str, str, Policy], Mutation]] = Recent(1024)


def _decoded(pod_json: bytes, pod: Any) -> dict[str, Any]:
    return cast(dict[str, Any], orjson.loads(pod_json) if pod is None else pod)


def _mutated(pod: dict[str, Any], namespace: str, own_namespace: str, policy: Policy) -> Mutation:
    injection = inject(pod, RequestContext(namespace, own_namespace), policy)
    # Escaped once, here, and kept so in the memo (3% of a memoised answer's instructions).
    warnings = tuple(printable(warning) for warning in injection.warnings)
    if injection.pod is pod:
        return Mutation(None, warnings, (), injection.reason, _names_placeholder(warnings))
    try:
        operations = orjson.dumps(_with_written(diff(pod, injection.pod), injection.written))
    except orjson.JSONEncodeError:  # orjson writes 254 levels; a Pod's fields nest a dozen
        raise InjectionDenied(
            f"request.object is not a valid Pod: {_TOO_DEEP} to write in a JSON Patch",
            "invalid-pod",
        ) from None
    _within_bound(operations)
    injected, reason = injection.injected, injection.reason
    named = _names_placeholder(warnings)
    parts, in_mounts_only = split_at_placeholder(operations)
    if len(parts) > 1 and not named and in_mounts_only:
        # Each pod's token volume named at its answer: the sidecars' token mounts (and the
        # app's, where a reinjection rewrites their lists) are the only mention of it.
        return Mutation(None, warnings, injected, reason, token_operations=tuple(parts))
    patch = pybase64.b64encode_as_string(operations)
    return Mutation(patch, warnings, injected, reason, named or len(parts) > 1)


def _with_written(
    operations: list[dict[str, Any]], written: tuple[tuple[object, bytes], ...]
) -> list[dict[str, Any]]:
    """The operations with each value whose JSON is written already (`Injection.written`:
    the sidecars' containers, shared by the pods that ask alike) as that JSON, alone or in
    a list (`/spec/initContainers`): orjson copies it where it would write it again. Found
    by identity among the few written (a dict by `id` cost more: each id a new int)."""
    if not written:
        return operations
    for operation in operations:
        if "value" not in operation:  # a removal
            continue
        value = operation["value"]
        if isinstance(value, list):  # a new list: the pod's own is left as it is
            operation["value"] = [_as_written(item, written) for item in value]
        else:
            operation["value"] = _as_written(value, written)
    return operations


def _as_written(value: object, written: tuple[tuple[object, bytes], ...]) -> object:
    for shared, json in written:
        if value is shared:
            return _FRAGMENT(json)
    return value


# Compiled, a Final name is a C static; `orjson.Fragment` would be looked up on each call.
_FRAGMENT: Final = orjson.Fragment


def split_at_placeholder(operations: bytes) -> tuple[list[bytes], bool]:
    """`operations.split(_PLACEHOLDER)`, and whether each placeholder names the volume of a
    token mount (is inside `_PLACEHOLDER_MOUNT`, where it is the name): the parts around it
    end and start as the mount does around its name (a mount's end holds no `{`, so two
    mounts cannot share bytes). Checked on the parts, where `count(_PLACEHOLDER_MOUNT)`
    searched the whole patch again: 2.57 to 1.82 us for the benchmark's 6 KB patch."""
    parts = operations.split(_PLACEHOLDER)
    in_mounts_only = all(
        before.endswith(_MOUNT_BEFORE) and after.startswith(_MOUNT_AFTER)
        for before, after in pairwise(parts)
    )
    return parts, in_mounts_only


def _within_bound(operations: bytes) -> bytes:
    """`operations`, unless they are more than MAX_PATCH_BYTES (InjectionDenied)."""
    if len(operations) > MAX_PATCH_BYTES:
        raise InjectionDenied(
            f"the injection would add {len(operations)} bytes to the pod, more than the "
            f"{MAX_PATCH_BYTES} accepted (the API server stores objects of about 1.5 MiB): "
            "ask for fewer upstreams or smaller values",
            "too-large",
        )
    return operations


def _names_placeholder(warnings: Sequence[str]) -> bool:
    return any(TOKEN_VOLUME_PLACEHOLDER in warning for warning in warnings)


def allowed(
    request: AdmissionRequest, patch: str | None = None, warnings: Sequence[str] = ()
) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": request.uid, "allowed": True}
    if patch:
        response["patchType"] = _PATCH_TYPE
        response["patch"] = patch
    if warnings:
        response["warnings"] = list(warnings)  # escaped by the caller
    return _envelope(response)


def denied(request: AdmissionRequest, message: str, code: int) -> dict[str, Any]:
    status = {"code": code, "message": f"outrigger: {printable(message)}"}
    return _envelope({"uid": request.uid, "allowed": False, "status": status})


def _envelope(response: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "response": response}
