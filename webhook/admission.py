"""The admission.k8s.io/v1 envelope: decode an AdmissionReview, run the core, encode the answer.

Two error families, as the API server expects them: a body that is not an AdmissionReview is a
bad call (`BadReview`, HTTP 400); a pod that cannot be injected is a valid call answered with
`allowed: false` and a message. Every answer echoes the request's uid, apiVersion and kind.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from webhook.injector import INJECTED, Injection, InjectionDenied, RequestContext, inject
from webhook.patch import diff
from webhook.policy import Policy

log = logging.getLogger("outrigger.admission")

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"
_POD_KIND = {"group": "", "version": "v1", "kind": "Pod"}
_PATCH_TYPE = "JSONPatch"


class BadReview(ValueError):
    """The body is not an AdmissionReview this webhook can answer (HTTP 400)."""


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    uid: str
    kind: dict[str, Any]
    operation: str
    namespace: str
    sub_resource: str
    obj: Any
    name: str


def decode_review(body: bytes) -> AdmissionRequest:
    try:
        review = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise BadReview(f"body is not valid JSON: {error}") from None
    if not isinstance(review, dict):
        raise BadReview("body must be a JSON object (an AdmissionReview)")
    if review.get("apiVersion") != API_VERSION or review.get("kind") != KIND:
        raise BadReview(f"expected apiVersion {API_VERSION!r} and kind {KIND!r}")
    request = review.get("request")
    if not isinstance(request, dict):
        raise BadReview("AdmissionReview has no 'request' object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("request.uid must be a non-empty string")
    kind = request.get("kind")
    operation = request.get("operation")
    if not isinstance(kind, dict) or not isinstance(operation, str):
        raise BadReview("request.kind must be an object and request.operation a string")
    obj = request.get("object")
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    name = (metadata or {}).get("name") or (metadata or {}).get("generateName") or ""
    return AdmissionRequest(
        uid=uid,
        kind=kind,
        operation=operation,
        namespace=str(request.get("namespace") or ""),
        sub_resource=str(request.get("subResource") or ""),
        obj=obj,
        name=str(name),
    )


def review(body: bytes, policy: Policy) -> tuple[int, bytes]:
    """The whole envelope: HTTP status and response body for one request body."""
    try:
        request = decode_review(body)
    except BadReview as error:
        return 400, orjson.dumps({"error": str(error)})
    return 200, orjson.dumps(answer(request, policy))


def answer(request: AdmissionRequest, policy: Policy) -> dict[str, Any]:
    if not _is_pod_creation(request):
        return allowed(request)
    if not isinstance(request.obj, dict):
        return denied(request, "request.object must be a Pod object", 400)
    try:
        injection = inject(request.obj, RequestContext(request.namespace), policy)
    except InjectionDenied as error:
        log.info("denied %s/%s: %s", request.namespace, request.name, error)
        return denied(request, str(error), 400)
    except Exception:
        # A bug must not turn into a 500 or a half-made pod: refuse, and keep the trace here.
        log.exception(
            "internal error on %s/%s (uid %s)", request.namespace, request.name, request.uid
        )
        return denied(request, "internal error while injecting; see the webhook's logs", 500)
    return patched(request, injection)


def _is_pod_creation(request: AdmissionRequest) -> bool:
    return request.operation == "CREATE" and not request.sub_resource and request.kind == _POD_KIND


def patched(request: AdmissionRequest, injection: Injection) -> dict[str, Any]:
    if injection.reason != INJECTED:
        return allowed(request, warnings=injection.warnings)
    operations = diff(request.obj, injection.pod)
    log.info(
        "injected %s into %s/%s",
        ",".join(injection.injected),
        request.namespace,
        request.name,
    )
    return allowed(request, operations, injection.warnings)


def allowed(
    request: AdmissionRequest,
    operations: Sequence[dict[str, Any]] = (),
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": request.uid, "allowed": True}
    if operations:
        response["patchType"] = _PATCH_TYPE
        response["patch"] = base64.b64encode(orjson.dumps(operations)).decode()
    if warnings:
        response["warnings"] = list(warnings)
    return _envelope(response)


def denied(request: AdmissionRequest, message: str, code: int) -> dict[str, Any]:
    status = {"code": code, "message": f"outrigger: {message}"}
    return _envelope({"uid": request.uid, "allowed": False, "status": status})


def _envelope(response: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "response": response}
