"""`outrigger explain KIND/NAME`: why a live workload's pods are, or are not, injected.

Decided from the objects the cluster holds (read by `webhook.cluster.explain`, given here as
the API's JSON) with the webhook's own code, and never guessed:

1. Does the API server call the webhook for the pods? The webhook configuration's rule for
   pods CREATE, its namespaceSelector against the namespace's labels, its objectSelector
   against the pod template's labels, and its matchConditions. This project evaluates no CEL
   in production; it compiles its own conditions from the policy (`webhook.core.compiled`),
   each with the engine's predicate for the same test, property-tested against the CEL
   runtime. So a condition whose name and expression are exactly what the policy in force
   compiles to is evaluated by that predicate; any other is reported as not evaluated, and the
   answer is then "cannot tell".
2. Which sidecars the policy gives them, and which rule decided: `inject` on a pod built from
   the template, as `outrigger inject --explain` does.
3. Whether the running pods hold that: `webhook.core.audit.classify`, as `outrigger audit`.

And the mistakes people make: `outrigger.dev/` annotations on the workload's own metadata
(which no pod inherits), an annotation key written as a label, a namespace without the label
the webhook selects by, an annotation with no effect, a pod the webhook would deny.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from webhook.core import annotations as ann
from webhook.core.audit import Finding, WorkloadFindings, classify
from webhook.core.compiled import CompiledPolicy, Subject, compile_policy
from webhook.core.injector import InjectionDenied, RequestContext, inject, without_injection
from webhook.core.policy import LabelSelector, Policy
from webhook.core.selection import NAMESPACE_EXCLUDED, RULE_EXCLUDED
from webhook.core.workloads import TEMPLATE_PATHS, pod_template
from webhook.limits import echo, printable

# The kinds, as kubectl names them: singular, plural, short name, each also with its group.
_RESOURCES = (
    ("Pod", "", ("pod", "pods", "po")),
    ("Deployment", "apps", ("deployment", "deployments", "deploy")),
    ("StatefulSet", "apps", ("statefulset", "statefulsets", "sts")),
    ("DaemonSet", "apps", ("daemonset", "daemonsets", "ds")),
    ("ReplicaSet", "apps", ("replicaset", "replicasets", "rs")),
    ("Job", "batch", ("job", "jobs")),
    ("CronJob", "batch", ("cronjob", "cronjobs", "cj")),
)
KINDS: dict[str, str] = {
    word + suffix: kind
    for kind, group, words in _RESOURCES
    for word in words
    for suffix in ("", *([f".{group}"] if group else []))
}
# The objects between a workload and its pods, which the pods' ownerReferences name.
INTERMEDIATE = {"Deployment": "ReplicaSet", "CronJob": "Job"}
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")

# What became of the pods (`Explanation.verdict`).
INJECTED = "injected"  # the webhook is called and injects sidecars
NOT_INJECTED = "not-injected"  # the policy gives them none
NOT_CALLED = "not-called"  # the policy gives them sidecars, the API server skips the webhook
DENIED = "denied"  # the webhook refuses them
UNDETERMINED = "undetermined"  # some matchCondition could not be evaluated
_FINE = (INJECTED, NOT_INJECTED)


@dataclass(frozen=True, slots=True)
class Mistake:
    code: str  # a few words, for -o json
    message: str


@dataclass(frozen=True, slots=True)
class WebhookCall:
    """Whether the API server calls the webhook for the pods (None: cannot tell), the lines
    that say why, and the mistakes that keep it from calling (if the pods want sidecars)."""

    calls: bool | None
    lines: tuple[str, ...]
    blockers: tuple[Mistake, ...] = ()


@dataclass(frozen=True, slots=True)
class Sidecars:
    """What the webhook gives a pod of the template: the injector's own outcome."""

    injected: tuple[str, ...]
    reason: str
    explanation: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    denied: str | None = None  # the webhook's message when it refuses the pod

    @property
    def wanted(self) -> bool:
        """The pods ask for something (or the policy gives them something) from the webhook."""
        return bool(self.injected) or self.denied is not None


@dataclass(frozen=True, slots=True)
class RunningPod:
    name: str
    finding: str | None  # webhook.core.audit's MISSING, STALE, MISMATCHED; None: as it should
    detail: str


@dataclass(frozen=True, slots=True)
class Explanation:
    kind: str
    name: str
    namespace: str
    configuration: str  # the MutatingWebhookConfiguration's name
    policy_version: str
    call: WebhookCall
    sidecars: Sidecars
    pods: tuple[RunningPod, ...]
    terminating: int  # pods being deleted, not classified (a restart's leftovers)
    fix: str | None  # the command that brings the running pods to the policy
    mistakes: tuple[Mistake, ...]
    notes: tuple[str, ...]
    verdict: str
    summary: str

    @property
    def exit_status(self) -> int:
        """0: injected as expected, or not injected because the policy says so, with nothing
        mistaken and every running pod as the policy renders it; 1 otherwise."""
        clean = not self.mistakes and self.fix is None
        return 0 if self.verdict in _FINE and clean else 1


def parse_target(text: str) -> tuple[str, str]:
    """(kind, name) of `deployment/web`, `deploy/web`, `deployment.apps/web`, `po/web-1`...;
    ValueError saying what is accepted."""
    resource, slash, name = text.partition("/")
    kind = KINDS.get(resource.lower())
    if not slash or kind is None:
        accepted = ", ".join(words[0] for _, _, words in _RESOURCES)
        raise ValueError(
            f"{echo(text)}: expected KIND/NAME, KIND one of {accepted} (or kubectl's short "
            "names deploy, sts, ds, rs, cj, po)"
        )
    if len(name) > 253 or not _NAME.fullmatch(name):
        raise ValueError(
            f"{echo(name)} is not an object name (lowercase letters, digits, '-' and '.')"
        )
    return kind, name


def explain(
    workload: Mapping[str, Any],
    namespace: Mapping[str, Any],
    configuration: Mapping[str, Any] | None,
    configuration_name: str,
    policy: Policy,
    pods: Sequence[Mapping[str, Any]],
) -> Explanation:
    """What becomes of the pods of `workload` (its `kind` set), in `namespace` (the Namespace
    object), under `configuration` (None: not found) and `policy`; `pods` are its running pods
    (`owned_pods`)."""
    kind = str(workload.get("kind", ""))
    metadata = workload.get("metadata") or {}
    name, namespace_name = str(metadata.get("name", "")), str(metadata.get("namespace", ""))
    pod = pod_of(workload, namespace_name, policy)
    own_namespace = _own_namespace(configuration)
    call = webhook_call(configuration, configuration_name, namespace, pod, policy, own_namespace)
    sidecars = sidecars_of(pod, namespace_name, policy, own_namespace)
    running, terminating = running_pods(pods, namespace_name, policy, own_namespace or "")
    fix = _fix(kind, name, namespace_name, running)
    # What keeps the API server from calling the webhook is a mistake only for pods that
    # want something of it.
    blockers = call.blockers if sidecars.wanted and call.calls is not True else ()
    mistakes = (
        *_misplaced(workload),
        *_labels_not_annotations(pod, policy),
        *blockers,
        *_no_effect(pod, sidecars, policy),
        *_denial(sidecars),
    )
    verdict, summary = _verdict(call, sidecars)
    return Explanation(
        kind, name, namespace_name, configuration_name, policy.version, call, sidecars,
        running, terminating, fix, mistakes, _notes(workload), verdict, summary,
    )  # fmt: skip


# The pod ------------------------------------------------------------------------------------


def pod_of(workload: Mapping[str, Any], namespace: str, policy: Policy) -> dict[str, Any]:
    """The pod the workload's controller creates, as the API server sends it to the webhook:
    its template (the Pod itself for a Pod) with the namespace set. What a status claims
    Outrigger added (a Pod target, or a template copied from an injected pod) is taken out,
    as the webhook does before it decides again: the pod as its owner wrote it."""
    template = pod_template(dict(workload)) or {}
    metadata = template.get("metadata") if isinstance(template.get("metadata"), dict) else {}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        **template,
        "metadata": {**(metadata or {}), "namespace": namespace},
    }
    status = _strings(pod["metadata"].get("annotations")).get(ann.STATUS)
    if status is None:
        return pod
    try:
        return without_injection(pod, ann.claimed(status), policy)
    except InjectionDenied:  # malformed: `inject` says why, for the pod as it is
        return pod


def sidecars_of(
    pod: Mapping[str, Any], namespace: str, policy: Policy, own_namespace: str | None
) -> Sidecars:
    """The webhook's outcome for `pod` (`pod_of`), created now in `namespace`."""
    if own_namespace and namespace == own_namespace:
        why = f"namespace {namespace!r} is the webhook's own, which it never injects into"
        return Sidecars((), NAMESPACE_EXCLUDED, (why,))
    try:
        injection = inject(dict(pod), RequestContext(namespace), policy)  # its own: answered above
    except InjectionDenied as denied:
        return Sidecars((), denied.reason, (), denied=str(denied))
    return Sidecars(injection.injected, injection.reason, injection.explanation, injection.warnings)


def running_pods(
    pods: Iterable[Mapping[str, Any]], namespace: str, policy: Policy, own_namespace: str = ""
) -> tuple[tuple[RunningPod, ...], int]:
    """Each running pod classified as `outrigger audit` does; and how many are terminating
    (being replaced: what they hold no longer matters)."""
    running, terminating = [], 0
    for pod in pods:
        metadata = pod.get("metadata") or {}
        if metadata.get("deletionTimestamp"):
            terminating += 1
            continue
        finding = classify(pod, namespace, policy, own_namespace)
        name = str(metadata.get("name", ""))
        if finding is None:
            running.append(RunningPod(name, None, "as the policy says"))
        else:
            running.append(RunningPod(name, finding.kind, finding.detail))
    return tuple(sorted(running, key=lambda p: p.name)), terminating


def owned_pods(
    workload: Mapping[str, Any],
    intermediates: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
) -> list[Mapping[str, Any]]:
    """The pods whose controller is the workload, or one of its `intermediates` (the
    Deployment's ReplicaSets, the CronJob's Jobs) that the workload controls; the Pod itself
    for a Pod. Matched by uid: a name may have been reused by a newer object."""
    if workload.get("kind") == "Pod":
        return [workload]
    owners = {_uid(workload)} - {""}
    if workload.get("kind") in INTERMEDIATE:
        owners = {_uid(item) for item in intermediates if _controller_uid(item) in owners}
    return [pod for pod in pods if _controller_uid(pod) in owners]


def _uid(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("uid") or "")


def _controller_uid(obj: Mapping[str, Any]) -> str:
    references = (obj.get("metadata") or {}).get("ownerReferences") or []
    for reference in references:
        if isinstance(reference, dict) and reference.get("controller"):
            return str(reference.get("uid") or "")
    return ""


def _fix(kind: str, name: str, namespace: str, pods: Sequence[RunningPod]) -> str | None:
    """The command that replaces the pods that differ (`outrigger audit`'s), or None."""
    differing = [pod for pod in pods if pod.finding is not None]
    if not differing:
        return None
    findings = [Finding(namespace, p.name, str(p.finding), (), p.detail) for p in differing]
    return WorkloadFindings(namespace, kind, name, findings).fix


# The API server's call ------------------------------------------------------------------------


def webhook_call(
    configuration: Mapping[str, Any] | None,
    name: str,
    namespace: Mapping[str, Any],
    pod: Mapping[str, Any],
    policy: Policy,
    own_namespace: str | None,
) -> WebhookCall:
    """Whether the API server calls a webhook of `configuration` for `pod` in `namespace`."""
    namespace_name = str((namespace.get("metadata") or {}).get("name", ""))
    if configuration is None:
        why = f"there is no mutatingwebhookconfiguration {name}: no Outrigger webhook is called"
        advice = "install the chart, or name the configuration with --webhook"
        return WebhookCall(
            False, (why,), (Mistake("no-webhook-configuration", f"{why}; {advice}"),)
        )
    entries = [
        entry
        for entry in configuration.get("webhooks") or []
        if isinstance(entry, dict) and any(map(_covers_pod_creation, entry.get("rules") or []))
    ]
    if not entries:
        why = f"mutatingwebhookconfiguration {name} has no webhook with a rule for pods CREATE"
        return WebhookCall(False, (why,), (Mistake("no-pod-rule", why),))
    compiled = compile_policy(policy, own_namespace)
    calls = [_entry_call(e, namespace_name, namespace, pod, compiled) for e in entries]
    verdicts = {call.calls for call in calls}
    overall = True if True in verdicts else (None if None in verdicts else False)
    lines = tuple(line for call in calls for line in call.lines)
    blockers = tuple(dict.fromkeys(b for call in calls for b in call.blockers))
    return WebhookCall(overall, lines, blockers)


def _covers_pod_creation(rule: Any) -> bool:
    """A webhook rule that matches the creation of a v1 Pod."""
    if not isinstance(rule, dict):
        return False

    def has(field: str, *accepted: str) -> bool:
        return any(value in accepted for value in rule.get(field) or [])

    return (
        has("operations", "CREATE", "*")
        and has("apiGroups", "", "*")
        and has("apiVersions", "v1", "*")
        and has("resources", "pods", "*", "*/*")
        and rule.get("scope", "*") in ("*", "Namespaced")
    )


def _entry_call(
    entry: Mapping[str, Any],
    namespace_name: str,
    namespace: Mapping[str, Any],
    pod: Mapping[str, Any],
    compiled: CompiledPolicy,
) -> WebhookCall:
    """One webhook of the configuration: its selectors, then its matchConditions."""
    metadata = pod.get("metadata") or {}
    pod_labels = _strings(metadata.get("labels"))
    namespace_labels = _strings((namespace.get("metadata") or {}).get("labels"))
    where = f"{entry.get('name', '?')} (failurePolicy {entry.get('failurePolicy', 'Fail')})"
    by_namespace = _namespace_selection(entry, namespace_name, namespace_labels, pod_labels)
    by_object = _object_selection(entry, pod_labels)
    subject = Subject(namespace_name, pod_labels, _strings(metadata.get("annotations")))
    by_conditions = _conditions(entry.get("matchConditions") or [], subject, compiled)
    parts = (by_namespace, by_object, by_conditions)
    verdicts = [part.calls for part in parts]
    calls = False if False in verdicts else (None if None in verdicts else True)
    lines = [f"webhook {where}:", *(f"  {line}" for part in parts for line in part.lines)]
    if entry.get("failurePolicy") == "Ignore":
        lines.append(
            "  failurePolicy Ignore: while the webhook is down or slow, pods are created "
            "without their sidecars (outrigger audit lists them)"
        )
    return WebhookCall(calls, tuple(lines), tuple(b for part in parts for b in part.blockers))


def _namespace_selection(
    entry: Mapping[str, Any],
    namespace: str,
    labels: Mapping[str, str],
    pod_labels: Mapping[str, str],
) -> WebhookCall:
    selector = entry.get("namespaceSelector") or {}
    unmet = unmet_requirements(selector, labels)
    if unmet is None:
        return WebhookCall(None, (f"namespaceSelector {echo(selector)}: cannot be read",))
    if not unmet:
        return WebhookCall(True, (f"namespaceSelector matches namespace {namespace}",))
    problems = "; ".join(u.problem for u in unmet)
    fixes = [u.fix for u in unmet if u.fix]
    message = f"namespace {namespace} is not selected by the webhook configuration: {problems}"
    on_pod = sorted({u.key for u in unmet if u.key in pod_labels})
    if on_pod:
        message += (
            f" (the pod template has the label {', '.join(on_pod)}, but the webhook selects "
            "namespaces by it)"
        )
    if fixes:
        message += f"; kubectl label namespace {namespace} {' '.join(fixes)}"
    line = f"namespaceSelector does not match namespace {namespace}: {problems}"
    return WebhookCall(False, (line,), (Mistake("namespace-not-selected", message),))


def _object_selection(entry: Mapping[str, Any], labels: Mapping[str, str]) -> WebhookCall:
    selector = entry.get("objectSelector") or {}
    if not selector.get("matchLabels") and not selector.get("matchExpressions"):
        return WebhookCall(True, ("objectSelector: none (every pod)",))
    unmet = unmet_requirements(selector, labels)
    if unmet is None:
        return WebhookCall(None, (f"objectSelector {echo(selector)}: cannot be read",))
    if not unmet:
        return WebhookCall(True, ("objectSelector matches the pod template's labels",))
    problems = "; ".join(u.problem for u in unmet)
    line = f"objectSelector does not match the pod template's labels: {problems}"
    message = f"the pod template's labels do not match the webhook's objectSelector: {problems}"
    return WebhookCall(False, (line,), (Mistake("object-not-selected", message),))


def _conditions(raw: Sequence[Any], subject: Subject, compiled: CompiledPolicy) -> WebhookCall:
    """Each matchCondition evaluated by the engine's predicate where it is one the policy in
    force compiles to (same name and expression); not evaluated otherwise."""
    if not raw:
        return WebhookCall(True, ("matchConditions: none (every pod the selectors pass)",))
    known = {(c.name, c.expression): c for c in compiled.match_conditions or ()}
    verdicts: list[bool | None] = []
    lines, blockers = [], []
    for item in raw:
        name = str(item.get("name", "")) if isinstance(item, dict) else "?"
        expression = str(item.get("expression", "")) if isinstance(item, dict) else ""
        condition = known.get((name, expression))
        if condition is None:
            verdicts.append(None)
            lines.append(
                f"matchCondition {name}: not evaluated (not what policy {compiled.version} "
                "compiles to; only those are)"
            )
        elif condition.holds(subject):
            verdicts.append(True)
            lines.append(f"matchCondition {name}: true")
        else:
            verdicts.append(False)
            lines.append(f"matchCondition {name}: false ({condition.when_false})")
            blockers.append(
                Mistake("condition-false", f"the API server skips the webhook: {lines[-1]}")
            )
    calls = False if False in verdicts else (None if None in verdicts else True)
    return WebhookCall(calls, tuple(lines), tuple(blockers))


@dataclass(frozen=True, slots=True)
class Unmet:
    """A requirement of a label selector that the labels fail."""

    key: str
    problem: str
    fix: str | None  # the `kubectl label` argument that meets it, where a label change can


def unmet_requirements(
    selector: Mapping[str, Any], labels: Mapping[str, str]
) -> list[Unmet] | None:
    """What `labels` lack to match the label selector, one `Unmet` per requirement; [] when
    they match; None when the selector is not one (the API server validates them: only a
    malformed object gets here). Matched by the policy's own `LabelSelector`, as `audit`."""
    try:
        parsed = LabelSelector.model_validate(dict(selector))
    except ValueError:
        return None
    unmet = [
        Unmet(key, _wrong(key, labels, f"must be {value!r}"), f"{key}={value}")
        for key, value in parsed.matchLabels.items()
        if labels.get(key) != value
    ]
    for requirement in parsed.matchExpressions:
        if not LabelSelector(matchExpressions=(requirement,)).matches(labels):
            key, values = requirement.key, list(requirement.values)
            unmet.append(_unmet_expression(key, requirement.operator, values, labels))
    return unmet


# Set by the API server on every namespace: no label command changes it.
_SYSTEM_LABEL = "kubernetes.io/metadata.name"


def _unmet_expression(
    key: str, operator: str, values: list[str], labels: Mapping[str, str]
) -> Unmet:
    match operator:
        case "In":
            fix = f"{key}={values[0]}" if values else None
            return Unmet(key, _wrong(key, labels, f"must be {_either(values)}"), fix)
        case "NotIn":
            problem = f"label {key} is {labels[key]!r}, which the selector excludes (NotIn)"
            return Unmet(key, problem, None if key == _SYSTEM_LABEL else f"{key}-")
        case "Exists":
            return Unmet(key, f"label {key} is missing (must exist)", None)
        case _:
            return Unmet(key, f"label {key} is set to {labels[key]!r} (must not exist)", f"{key}-")


def _either(values: Sequence[str]) -> str:
    if len(values) == 1:
        return repr(values[0])
    return f"one of {', '.join(map(repr, values))}"


def _wrong(key: str, labels: Mapping[str, str], expected: str) -> str:
    if key not in labels:
        return f"label {key} is missing ({expected})"
    return f"label {key} is {labels[key]!r} ({expected})"


def _own_namespace(configuration: Mapping[str, Any] | None) -> str | None:
    """The webhook's namespace (of its Service), which it never injects into; None for a
    webhook called by URL."""
    for entry in (configuration or {}).get("webhooks") or []:
        service = ((entry or {}).get("clientConfig") or {}).get("service") or {}
        if service.get("namespace"):
            return str(service["namespace"])
    return None


# Mistakes -----------------------------------------------------------------------------------


def _misplaced(workload: Mapping[str, Any]) -> list[Mistake]:
    """`outrigger.dev/` annotations on metadata that no pod inherits: the workload's own (and a
    CronJob's jobTemplate's), where the webhook never sees them."""
    kind = str(workload.get("kind", ""))
    if kind == "Pod":
        return []
    name = str((workload.get("metadata") or {}).get("name", ""))
    path = TEMPLATE_PATHS[kind]
    places = [("its own metadata", workload.get("metadata") or {})]
    if kind == "CronJob":
        job_template = (workload.get("spec") or {}).get("jobTemplate") or {}
        places.append(("spec.jobTemplate.metadata", job_template.get("metadata") or {}))
    on_template = _strings(
        ((pod_template(dict(workload)) or {}).get("metadata") or {}).get("annotations")
    )
    mistakes = []
    for place, metadata in places:
        # One also on the template, with the same value, is a harmless copy.
        keys = [
            key
            for key, value in _strings(metadata.get("annotations")).items()
            if key.startswith(ann.PREFIX) and on_template.get(key) != value
        ]
        if keys:
            mistakes.append(
                Mistake(
                    "annotations-not-on-pod-template",
                    f"{kind}/{name} has {', '.join(keys)} on {place}, which its pods do not "
                    f"inherit (the webhook sees only the pods): move "
                    f"{'it' if len(keys) == 1 else 'them'} to "
                    f"{'.'.join(path)}.metadata.annotations",
                )
            )
    return mistakes


def _labels_not_annotations(pod: Mapping[str, Any], policy: Policy) -> list[Mistake]:
    """Outrigger's annotation keys written as labels (Istio's `sidecar.istio.io/inject` is a
    label; ours are annotations)."""
    known = {ann.INJECT}
    for template in policy.sidecars:
        known.update(parameter.annotation for parameter in template.parameters.values())
    labels = _strings((pod.get("metadata") or {}).get("labels"))
    keys = sorted(key for key in labels if key in known)
    if not keys:
        return []
    return [
        Mistake(
            "label-not-annotation",
            f"{', '.join(keys)} is a label of the pods; Outrigger reads annotations: move it to "
            "the pod template's metadata.annotations",
        )
    ]


def _no_effect(pod: Mapping[str, Any], sidecars: Sidecars, policy: Policy) -> list[Mistake]:
    """Annotations the webhook ignores: keys the policy does not know, parameters of sidecars
    it does not inject. Not said of a pod it denies or leaves alone (its annotations are
    not read then)."""
    if sidecars.denied is not None or sidecars.reason in (NAMESPACE_EXCLUDED, RULE_EXCLUDED):
        return []
    annotations = _strings((pod.get("metadata") or {}).get("annotations"))
    unknown, idle = ann.unused(annotations, sidecars.injected, policy.sidecars)
    return [
        *(
            Mistake("annotation-no-effect", f"annotation {key} is not one the policy knows")
            for key in unknown
        ),
        *(Mistake("annotation-no-effect", text) for text in idle),
    ]


def _denial(sidecars: Sidecars) -> list[Mistake]:
    if sidecars.denied is None:
        return []
    return [Mistake("denied", f"the webhook would deny its pods: {sidecars.denied}")]


def _notes(workload: Mapping[str, Any]) -> tuple[str, ...]:
    """What helps reading the rest: a pod that a controller made is created from its
    controller's template, not from itself."""
    if workload.get("kind") != "Pod":
        return ()
    for reference in (workload.get("metadata") or {}).get("ownerReferences") or []:
        if isinstance(reference, dict) and reference.get("controller"):
            owner = f"{reference.get('kind', '?')}/{reference.get('name', '?')}"
            return (f"this pod was made by {owner}: its next pods come from that template",)
    return ()


# The verdict --------------------------------------------------------------------------------


def _verdict(call: WebhookCall, sidecars: Sidecars) -> tuple[str, str]:
    """(verdict, the one line that says it)."""
    if not sidecars.wanted:
        why = sidecars.explanation[0] if sidecars.explanation else sidecars.reason
        return NOT_INJECTED, f"not injected, as the policy says ({why})"
    if call.calls is False:
        return NOT_CALLED, "will NOT be injected: the API server does not call the webhook"
    outcome = (
        "its pods will be REFUSED by the webhook"
        if sidecars.denied is not None
        else f"will be injected with {', '.join(sidecars.injected)}"
    )
    if call.calls is None:
        return (
            UNDETERMINED,
            f"cannot tell (some matchConditions not evaluated); if called, {outcome}",
        )
    return (DENIED if sidecars.denied is not None else INJECTED), outcome


# Output -------------------------------------------------------------------------------------


def render_text(explanation: Explanation) -> str:
    """For a terminal: every line escaped (`printable`): names, labels and messages come
    from the cluster."""
    e = explanation
    lines = [f"{e.kind}/{e.name} in namespace {e.namespace}: {e.summary}"]
    lines += [f"  note: {note}" for note in e.notes]
    called = {True: "calls it", False: "does NOT call it", None: "cannot tell"}[e.call.calls]
    lines.append(f"API server (mutatingwebhookconfiguration {e.configuration}): {called}")
    lines += [f"  {line}" for line in e.call.lines]
    lines.append(f"sidecars (policy {e.policy_version}): {_sidecar_outcome(e.sidecars)}")
    lines += [f"  {line}" for line in e.sidecars.explanation]
    lines += [f"  warning: {warning}" for warning in e.sidecars.warnings]
    lines.append(f"running pods: {_pod_count(e)}")
    lines += [
        f"  {pod.name}  {pod.finding}: {pod.detail}" if pod.finding else f"  {pod.name}  ok"
        for pod in e.pods
    ]
    if e.fix:
        lines.append(f"  fix: {e.fix}")
    if e.mistakes:
        lines.append("mistakes:")
        lines += [f"  - {mistake.message}" for mistake in e.mistakes]
    else:
        lines.append("mistakes: none found")
    return "\n".join(map(printable, lines)) + "\n"


def _sidecar_outcome(sidecars: Sidecars) -> str:
    if sidecars.denied is not None:
        return f"denied: {sidecars.denied}"
    if sidecars.injected:
        return ", ".join(sidecars.injected)
    return f"none ({sidecars.reason})"


def _pod_count(e: Explanation) -> str:
    differing = sum(1 for pod in e.pods if pod.finding is not None)
    state = f"{differing} not as the policy says" if differing else "all as the policy says"
    counted = f"{len(e.pods)}, {state}" if e.pods else "none"
    return counted + (f" ({e.terminating} terminating, not counted)" if e.terminating else "")


def render_json(explanation: Explanation) -> str:
    """One JSON document with the same facts (ASCII: every other character escaped)."""
    e = explanation
    document = {
        "kind": e.kind,
        "name": e.name,
        "namespace": e.namespace,
        "verdict": e.verdict,
        "summary": e.summary,
        "exitStatus": e.exit_status,
        "notes": list(e.notes),
        "webhook": {
            "configuration": e.configuration,
            "calls": e.call.calls,
            "details": list(e.call.lines),
        },
        "policy": e.policy_version,
        "sidecars": {
            "injected": list(e.sidecars.injected),
            "reason": e.sidecars.reason,
            "explanation": list(e.sidecars.explanation),
            "warnings": list(e.sidecars.warnings),
            "denied": e.sidecars.denied,
        },
        "pods": [{"name": p.name, "finding": p.finding, "detail": p.detail} for p in e.pods],
        "terminatingPods": e.terminating,
        "fix": e.fix,
        "mistakes": [{"code": m.code, "message": m.message} for m in e.mistakes],
    }
    return json.dumps(document, indent=2) + "\n"


def _strings(value: Any) -> dict[str, str]:
    """A labels or annotations map as strings (the API holds nothing else)."""
    if not isinstance(value, dict):
        return {}
    return {str(key): str(item) for key, item in value.items()}
