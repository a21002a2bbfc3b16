"""The AdmissionReview wire format, decoded by msgspec into plain dicts of what Outrigger reads.

A pod is decoded partially: only the fields the injector looks at (annotations, names, ports,
mounts, volumes, restart policy, grace period, the app's user and group, what makes it a
Windows pod, its pod-level resources). The rest
(managedFields, env, probes, ...) is skipped without ever becoming Python objects, and building
those objects is most of the cost of a request. This is sound because the JSON Patch is the
difference between this partial pod and the injected one: every path the injector changes, and
each parent of one, is present in the partial pod; the injector inserts whole new objects and,
in objects it changes, only adds what the partial pod holds (volume mounts), so no operation
ever carries a partial object. `tests/test_properties.py` checks, for generated pods, that the
patch made from the partial pod equals the patch made from the whole pod.

A field the injector starts to read must be added here.
"""

from __future__ import annotations

from typing import Any, Generic, TypedDict, TypeVar

import msgspec


class ContainerPort(TypedDict, total=False):
    containerPort: int


class VolumeMount(TypedDict, total=False):
    name: str
    mountPath: str


class SecurityContext(TypedDict, total=False):
    # The app's user and group, which a `runAsAppUser` sidecar takes (webhook.core.identity);
    # any JSON, as that checks them: a pod that gives no number is warned about, not refused.
    runAsUser: Any
    runAsGroup: Any


class Container(TypedDict, total=False):
    name: str
    ports: list[ContainerPort] | None
    volumeMounts: list[VolumeMount] | None
    securityContext: SecurityContext | None


class Volume(TypedDict, total=False):
    name: str


class LocalObjectReference(TypedDict, total=False):
    name: str


class PodOS(TypedDict, total=False):
    name: str


class NodeSelectorRequirement(TypedDict, total=False):
    key: str
    operator: str
    values: list[str] | None


class NodeSelectorTerm(TypedDict, total=False):
    # Not matchFields: only an expression on the kubernetes.io/os label pins a pod to Windows.
    matchExpressions: list[NodeSelectorRequirement] | None


class NodeSelector(TypedDict, total=False):
    nodeSelectorTerms: list[NodeSelectorTerm] | None


class NodeAffinity(TypedDict, total=False):
    # Not the preferred terms: they pin nothing.
    requiredDuringSchedulingIgnoredDuringExecution: NodeSelector | None


class Affinity(TypedDict, total=False):
    nodeAffinity: NodeAffinity | None


class ResourceRequirements(TypedDict, total=False):
    # Whole maps: the injector rewrites values in them (webhook.core.podresources). Quantities
    # are strings from the API server; any JSON, as that checks them.
    requests: dict[str, Any] | None
    limits: dict[str, Any] | None


class PodSpec(TypedDict, total=False):
    containers: list[Container] | None
    initContainers: list[Container] | None
    ephemeralContainers: list[Container] | None
    volumes: list[Volume] | None
    hostNetwork: bool | None
    restartPolicy: str | None
    imagePullSecrets: list[LocalObjectReference] | None
    terminationGracePeriodSeconds: int | None
    securityContext: SecurityContext | None
    # What makes it a Windows pod (webhook.core.fit).
    os: PodOS | None
    nodeSelector: dict[str, str] | None
    affinity: Affinity | None
    # Pod-level resources, raised by what the sidecars add.
    resources: ResourceRequirements | None


class OwnerReference(TypedDict, total=False):
    apiVersion: str
    kind: str
    name: str
    uid: str
    controller: bool | None


class ObjectMeta(TypedDict, total=False):
    name: str
    generateName: str
    labels: dict[str, str] | None
    annotations: dict[str, str] | None
    # Not read by the injector: named in the decision log.
    ownerReferences: list[OwnerReference] | None


class Pod(TypedDict, total=False):
    metadata: ObjectMeta | None
    spec: PodSpec | None


Object = TypeVar("Object")


class GroupVersionKind(TypedDict):
    group: str
    version: str
    kind: str


class _Request(TypedDict, Generic[Object], total=False):
    """What every way of decoding a request reads besides its object, and its object as
    `Object` reads it."""

    uid: str
    kind: GroupVersionKind
    operation: str
    namespace: str
    subResource: str
    dryRun: bool | None
    object: Object


class _Review(TypedDict, Generic[Object], total=False):
    apiVersion: str
    kind: str
    request: _Request[Object]


class InjectedPod(TypedDict, total=False):
    """A pod that carries a status, as its check reads it: the metadata above, and the whole
    of its spec (the check compares every field of the sidecars with the rendering). The
    rest (managedFields, status) is skipped; the patch, if any, only touches the spec and
    the annotations, which are here, as are their parents."""

    metadata: ObjectMeta | None
    spec: dict[str, Any] | None


# The object kept as raw JSON (`null` included): decoded, partially, only for a pod to mutate.
Request = _Request[msgspec.Raw]
AdmissionReview = _Review[msgspec.Raw]
# The object decoded as a pod in the same pass (`decode_review_with_pod`).
RequestWithPod = _Request[Pod | None]
AdmissionReviewWithPod = _Review[Pod | None]
# The object decoded as an injected pod in the same pass (`decode_review_with_injected_pod`).
RequestWithInjectedPod = _Request[InjectedPod | None]
AdmissionReviewWithInjectedPod = _Review[InjectedPod | None]
AnyRequest = Request | RequestWithPod | RequestWithInjectedPod
DecodeError = msgspec.MsgspecError
MalformedJSON = msgspec.DecodeError
_review_decoder = msgspec.json.Decoder(AdmissionReview)
_review_with_pod_decoder = msgspec.json.Decoder(AdmissionReviewWithPod)
_review_with_injected_pod_decoder = msgspec.json.Decoder(AdmissionReviewWithInjectedPod)
_pod_decoder = msgspec.json.Decoder(Pod)
_encoder = msgspec.json.Encoder()


def decode_review(body: bytes) -> AdmissionReview:
    """Raises `DecodeError` with msgspec's message, which names the bad path (`$.request.uid`)."""
    return _review_decoder.decode(body)


def decode_review_with_pod(body: bytes) -> AdmissionReviewWithPod:
    """The review and its object, read as a pod, in one pass (a third faster than the review,
    then the pod from its raw bytes); raises `DecodeError` where the object is no pod."""
    return _review_with_pod_decoder.decode(body)


def decode_review_with_injected_pod(body: bytes) -> AdmissionReviewWithInjectedPod:
    """The review and its object, read as an injected pod, in one pass; raises `DecodeError`
    where the object is no such pod (labels or annotations that are not strings included)."""
    return _review_with_injected_pod_decoder.decode(body)


def check_spec(spec: dict[str, Any]) -> None:
    """Raises `DecodeError` where the partial decoder would refuse `spec` (a field the
    injector reads, of the wrong type), as it would the spec of a pod to inject."""
    msgspec.convert(spec, PodSpec)


def decode_pod(raw: msgspec.Raw | bytes) -> Pod:
    return _pod_decoder.decode(raw)


def encode(pod: Pod) -> bytes:
    return _encoder.encode(pod)
