"""The compiled policy (`webhook.core.compiled`) in the API server: the webhook configuration's
`matchConditions`, and the guard (a ValidatingAdmissionPolicy and its binding, both named
`<configuration>-guard`), kept in step with the policy in force.

`objects()` renders them (for `outrigger policy compile`, to commit under GitOps);
`CompiledPolicySync` keeps them in a running server: at start, within a second of a policy
change (a ConfigMap watch, a file reload) and every `interval` seconds (a `kubectl replace` or
a Helm upgrade that dropped them is corrected). Writes are server-side applies with the field
manager `outrigger-policy`, which owns nothing else: the chart (or GitOps) keeps owning the
rest of the configuration. The guard belongs to the webhook configuration (ownerReferences):
deleting the configuration (`helm uninstall`) deletes the guard, which would otherwise refuse
pods that no webhook injects any more.

A part that does not compile (past CEL's limits) or that the API server refuses (422) falls
back: no matchConditions (every pod of the configuration's namespaces is sent, as before this
existed) and no guard; it is logged at warning and counted (`outrigger_compiled_policy_syncs`
with result `fallback`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from webhook.cluster.apicalls import CallFailed, json_answer
from webhook.core.compiled import CompiledPolicy, compile_policy
from webhook.core.policy import Policy
from webhook.serving.background import running
from webhook.serving.metrics import Metrics

log = logging.getLogger("outrigger.compiledpolicy")

FIELD_MANAGER = "outrigger-policy"
GUARD_SUFFIX = "-guard"
VERSION_ANNOTATION = "outrigger.dev/policy-version"
REQUEST_TIMEOUT = (5.0, 10.0)
POLL_SECONDS = 1.0  # how often the policy in force is compared with the one last published
RETRY_SECONDS = 5.0  # the next round after a failed one, at the latest
_APPLY = "application/apply-patch+yaml"  # JSON is YAML: the body goes as JSON
# Answers as raw JSON (plain dicts, as in `outrigger audit`), not the client's models.
_RAW: dict[str, Any] = {"_request_timeout": REQUEST_TIMEOUT, "_preload_content": False}
_API_VERSION = "admissionregistration.k8s.io/v1"
_LABELS = {"app.kubernetes.io/name": "outrigger", "app.kubernetes.io/managed-by": "outrigger"}
GuardAction = Literal["Deny", "Warn", "Audit"]


class CompiledPolicyError(Exception):
    """A call that failed; the message is one line."""


class _Refused(CompiledPolicyError):
    """The API server found the object invalid (422): the compiled CEL is not accepted."""


@dataclass(frozen=True)
class Settings:
    webhook: str  # the MutatingWebhookConfiguration's name
    match_conditions: bool = True
    guard_actions: tuple[GuardAction, ...] = ("Deny",)  # () : no guard

    @property
    def guard(self) -> str:
        return self.webhook + GUARD_SUFFIX


def configuration_apply(
    compiled: CompiledPolicy, webhook: str, webhook_names: list[str], enabled: bool = True
) -> dict[str, Any]:
    """The server-side apply of the configuration's matchConditions: the only fields owned."""
    kept = (compiled.match_conditions or ()) if enabled else ()
    conditions = [{"name": c.name, "expression": c.expression} for c in kept]
    return {
        "apiVersion": _API_VERSION,
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": webhook},
        "webhooks": [{"name": name, "matchConditions": conditions} for name in webhook_names],
    }


def guard_objects(
    compiled: CompiledPolicy,
    name: str,
    namespace_selector: Mapping[str, Any],
    actions: tuple[GuardAction, ...] = ("Deny",),
    owner: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The ValidatingAdmissionPolicy and its binding (none when the guard does not compile).
    The binding sends it the namespaces the webhook configuration selects."""
    if compiled.validations is None:
        return []
    metadata: dict[str, Any] = {
        "name": name,
        "labels": dict(_LABELS),
        "annotations": {VERSION_ANNOTATION: compiled.version},
    }
    if owner is not None:
        metadata["ownerReferences"] = [dict(owner)]
    policy = {
        "apiVersion": _API_VERSION,
        "kind": "ValidatingAdmissionPolicy",
        "metadata": metadata,
        "spec": {
            # An expression that fails to evaluate refuses the pod: the guard must hold.
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "operations": ["CREATE"],
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "resources": ["pods"],
                    }
                ]
            },
            "matchConditions": [
                {"name": c.name, "expression": c.expression} for c in compiled.guard_conditions
            ],
            "validations": [
                {"expression": v.expression, "message": v.message, "reason": "Forbidden"}
                for v in compiled.validations
            ],
        },
    }
    binding = {
        "apiVersion": _API_VERSION,
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {key: value for key, value in metadata.items() if key != "annotations"},
        "spec": {
            "policyName": name,
            "validationActions": list(actions),
            "matchResources": {"namespaceSelector": dict(namespace_selector)},
        },
    }
    return [policy, binding]


SyncResult = Literal["applied", "fallback", "unpublished", "error"]


class CompiledPolicySync:
    """Keeps the compiled objects of the policy in force; see the module doc."""

    def __init__(
        self,
        settings: Settings,
        policy: Callable[[], Policy],
        configuration: Any,
        *,
        own_namespace: str | None,
        interval: float = 60.0,
        metrics: Metrics | None = None,
    ) -> None:
        from kubernetes import client

        self.settings, self.policy, self.own_namespace = settings, policy, own_namespace
        self.interval = interval
        self._retry = min(interval, RETRY_SECONDS)
        self.metrics = Metrics() if metrics is None else metrics
        self._api: Any = client.AdmissionregistrationV1Api(client.ApiClient(configuration))
        self._compiled: tuple[Policy, CompiledPolicy] | None = None
        self._warned: str | None = None  # the last fallback reported, so it is said once

    def compiled(self) -> CompiledPolicy:
        """The policy in force, compiled (once per policy)."""
        policy = self.policy()
        if self._compiled is None or self._compiled[0] is not policy:
            self._compiled = (policy, compile_policy(policy, self.own_namespace))
        return self._compiled[1]

    def sync(self) -> SyncResult:
        """One round; never raises a `CompiledPolicyError` (logged, counted as error)."""
        try:
            result = self._sync(self.compiled())
        except CompiledPolicyError as error:
            log.error("%s; retrying in %gs", error, self._retry)
            result = "error"
        self.metrics.count_compiled_policy_sync(result)
        return result

    async def run(self) -> None:
        """A round at start, on every policy change and every `interval` seconds (after a
        failed round, within 5 s)."""
        attempted: Policy | None = None
        due = 0.0
        while True:
            policy = self.policy()
            if policy is not attempted or time.monotonic() >= due:
                attempted = policy
                try:
                    result = await asyncio.to_thread(self.sync)
                except Exception:  # a bug: its trace to the log; the server serves on
                    log.exception("publishing the compiled policy failed")
                    result = "error"
                ok = result in ("applied", "fallback")
                due = time.monotonic() + (self.interval if ok else self._retry)
            await asyncio.sleep(POLL_SECONDS)

    def watching(self) -> AbstractAsyncContextManager[None]:
        return running(self.run(), f"outrigger compiled policy {self.settings.webhook}")

    # One round --------------------------------------------------------------------------------

    def _sync(self, compiled: CompiledPolicy) -> SyncResult:
        name = self.settings.webhook
        live = self._read(name)
        if live is None:
            log.warning("mutatingwebhookconfiguration %s does not exist; nothing published", name)
            return "unpublished"
        problems = list(compiled.problems)
        conditions_refused = guard_refused = False
        try:
            self._apply_conditions(compiled, live, self.settings.match_conditions)
        except _Refused as refused:
            problems.append(str(refused))
            conditions_refused = True
            self._apply_conditions(compiled, live, False)
        guard = self._guard(compiled, live)
        try:
            for obj in guard:
                self._apply(obj)
            if not guard:  # turned off, or did not compile: none of ours may guard on
                self._delete_guard()
        except _Refused as refused:
            problems.append(str(refused))
            guard_refused = True
            self._delete_guard()
        parts = (
            _state(self.settings.match_conditions, compiled.match_conditions, conditions_refused),
            _state(bool(self.settings.guard_actions), compiled.validations, guard_refused),
        )
        self.metrics.set_compiled_policy(compiled.version, parts)
        if problems:
            self._warn_once(compiled, problems)
            return "fallback"
        self._warned = None
        return "applied"

    def _warn_once(self, compiled: CompiledPolicy, problems: list[str]) -> None:
        said = "; ".join(problems)
        if said == self._warned:
            return
        self._warned = said
        log.warning(
            "policy %s is not compiled whole into the API server (%s): without matchConditions "
            "every pod of the webhook's namespaces is sent to it; without the guard a required "
            "sidecar is enforced only by failurePolicy Fail",
            compiled.version,
            said,
        )

    def _guard(self, compiled: CompiledPolicy, live: Mapping[str, Any]) -> list[dict[str, Any]]:
        if not self.settings.guard_actions:
            return []
        webhooks = live.get("webhooks") or [{}]
        metadata = live.get("metadata") or {}
        owner = {
            "apiVersion": _API_VERSION,
            "kind": "MutatingWebhookConfiguration",
            "name": str(metadata.get("name", "")),
            "uid": str(metadata.get("uid", "")),
        }
        selector = webhooks[0].get("namespaceSelector") or {}
        return guard_objects(
            compiled, self.settings.guard, selector, self.settings.guard_actions, owner
        )

    # Calls ------------------------------------------------------------------------------------

    def _read(self, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self._call(
            f"read mutatingwebhookconfiguration {name}",
            lambda: self._api.read_mutating_webhook_configuration(
                name, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            ),
            absent_ok=True,
        )
        return found

    def _apply_conditions(
        self, compiled: CompiledPolicy, live: Mapping[str, Any], enabled: bool
    ) -> None:
        names = [str(w.get("name")) for w in live.get("webhooks") or [] if isinstance(w, dict)]
        self._apply(configuration_apply(compiled, self.settings.webhook, names, enabled))

    def _apply(self, obj: dict[str, Any]) -> None:
        kind, name = obj["kind"], obj["metadata"]["name"]
        method = {
            "MutatingWebhookConfiguration": self._api.patch_mutating_webhook_configuration,
            "ValidatingAdmissionPolicy": self._api.patch_validating_admission_policy,
            "ValidatingAdmissionPolicyBinding": (
                self._api.patch_validating_admission_policy_binding
            ),
        }[kind]
        self._call(
            f"apply {kind} {name}",
            lambda: method(
                name,
                obj,
                field_manager=FIELD_MANAGER,
                force=True,
                _request_timeout=REQUEST_TIMEOUT,
                _content_type=_APPLY,
                _preload_content=False,
            ),
        )

    def _delete_guard(self) -> None:
        """Delete the guard's objects that this field manager applied (never one committed
        under GitOps with `outrigger policy compile`'s output)."""
        name = self.settings.guard
        for kind, read, delete in (
            (
                "ValidatingAdmissionPolicyBinding",
                self._api.read_validating_admission_policy_binding,
                self._api.delete_validating_admission_policy_binding,
            ),
            (
                "ValidatingAdmissionPolicy",
                self._api.read_validating_admission_policy,
                self._api.delete_validating_admission_policy,
            ),
        ):
            found = self._call(f"read {kind} {name}", partial(read, name, **_RAW), absent_ok=True)
            if found is not None and _applied_by_us(found):
                self._call(f"delete {kind} {name}", partial(delete, name, **_RAW), absent_ok=True)

    def _call(self, what: str, call: Callable[[], Any], *, absent_ok: bool = False) -> Any:
        """The decoded answer (None for a 404 when `absent_ok`); raises `_Refused` for a 422,
        else `CompiledPolicyError`."""
        try:
            return json_answer(what, call, absent_ok=absent_ok)
        except CallFailed as failed:
            error = _Refused if failed.status == 422 else CompiledPolicyError
            raise error(str(failed)) from None


def _state(enabled: bool, compiled: object, refused: bool) -> str:
    """A part's state for the metric: off, fallback (not compiled, or refused), compiled."""
    if not enabled:
        return "off"
    return "fallback" if compiled is None or refused else "compiled"


def _applied_by_us(obj: Mapping[str, Any]) -> bool:
    managed = (obj.get("metadata") or {}).get("managedFields") or []
    return any(isinstance(m, dict) and m.get("manager") == FIELD_MANAGER for m in managed)
