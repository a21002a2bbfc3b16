"""The core: `inject(pod, context, policy)` returns the pod with its sidecars, as a new object.

Pure and shared by the webhook and `outrigger inject`. The input pod is never modified; the
result shares every untouched sub-object with it, which keeps the work proportional to what
changes and lets the patch be derived cheaply from the difference (see `webhook.core.patch`).
Decide first (`webhook.core.selection`), then read the parameters, render the templates, check
that they fit the pod (`webhook.core.fit`: what it cannot run is skipped or denied), and build,
raising the pod-level resources by what the sidecars add (`webhook.core.podresources`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Final

import orjson

from webhook.core import annotations as ann
from webhook.core import podresources
from webhook.core.fit import Unfit, unfit
from webhook.core.identity import run_as_app_user
from webhook.core.parameters import ParameterValue
from webhook.core.policy import Policy, SidecarTemplate
from webhook.core.selection import (
    ALREADY_INJECTED,
    INJECTED,
    NAMESPACE_EXCLUDED,
    RULE_EXCLUDED,
    Decision,
    decide,
)
from webhook.core.sidecarresources import Override
from webhook.core.templates import RenderedSidecar, TemplateError, render, with_app_containers
from webhook.core.volumes import (
    TOKEN_VOLUME_PREFIX,
    api_token_mount,
    contains,
    mount_conflicts,
    token_volume_names,
    with_api_token,
    with_mounts,
    without_mounts,
)
from webhook.limits import MAX_ANNOTATION_BYTES, cache_small, echo

Pod = dict[str, Any]
# Pods whose annotations are not even read: warnings about them would be noise.
_LEFT_ALONE: Final = frozenset({NAMESPACE_EXCLUDED, RULE_EXCLUDED})
# A pod whose status did not match what it holds, injected afresh.
REINJECTED: Final = "reinjected"


# Plain classes with Final fields, made per review: native classes when compiled, read-only
# at run time and made in a fifth of a NamedTuple's time (`webhook.admission.review`).
class RequestContext:
    """Where the pod is created: its namespace (from the admission request), and the
    webhook's own namespace, never injected into ("": none; `$POD_NAMESPACE` where the
    webhook runs, read by the command line)."""

    def __init__(self, namespace: str, own_namespace: str = "") -> None:
        self.namespace: Final = namespace
        self.own_namespace: Final = own_namespace


class Injection:
    """The pod after injection (the pod itself where nothing is injected), why, which
    sidecars, the warnings for the client, and the steps of the decision (`inject --explain`)."""

    def __init__(
        self,
        pod: Pod,
        reason: str,
        injected: tuple[str, ...] = (),
        warnings: tuple[str, ...] = (),
        explanation: tuple[str, ...] = (),
        written: tuple[tuple[object, bytes], ...] = (),
    ) -> None:
        self.pod: Final = pod
        self.reason: Final = reason
        self.injected: Final = injected
        self.warnings: Final = warnings
        self.explanation: Final = explanation
        self.written: Final = written


class InjectionDenied(Exception):
    """The pod asks for something that cannot be injected; the message says what and why.

    `reason`, one of a few words (a metric label): `invalid-annotation`, `conflict` (names,
    ports, mounts, placement), `invalid-pod` (a malformed object), `too-large`.
    """

    def __init__(self, message: str, reason: str = "invalid-pod") -> None:
        super().__init__(message)
        self.reason = reason


def inject(pod: Pod, context: RequestContext, policy: Policy) -> Injection:
    """The pod with the sidecars the policy and its annotations ask for.

    A pod that carries `outrigger.dev/status` counts as injected only if it holds exactly
    what the current policy renders for it: what the status claims is first taken out and
    injected afresh, and when that gives back the pod (modulo the API server's defaults) it is
    left as it is; otherwise the fresh injection replaces the old one, so that a forged status
    exempts nothing and a pod injected under an older policy gets the current one.
    """
    metadata = _mapping(pod.get("metadata"), "metadata")
    annotations = _annotations(metadata)
    if ann.STATUS not in annotations:
        return _inject(pod, metadata, annotations, context, policy)
    base = without_injection(pod, ann.claimed(annotations[ann.STATUS]), policy)
    base_metadata = base["metadata"]
    fresh = _inject(base, base_metadata, base_metadata["annotations"], context, policy)
    if fresh.reason in _LEFT_ALONE:  # excluded: not ours to touch, stale or not
        return Injection(pod, fresh.reason, explanation=fresh.explanation)
    if contains(pod, fresh.pod):
        return Injection(
            pod, ALREADY_INJECTED, explanation=("already injected as the policy renders it",)
        )
    explanation = (*fresh.explanation, f"{ann.STATUS} did not match the pod: injected afresh")
    return Injection(
        fresh.pod, REINJECTED, fresh.injected, fresh.warnings, explanation, fresh.written
    )


def _inject(
    pod: Pod,
    metadata: dict[str, Any],
    annotations: dict[str, str],
    context: RequestContext,
    policy: Policy,
) -> Injection:
    """`inject` for a pod without a status (`metadata` and its checked `annotations` given)."""
    labels = _mapping(metadata.get("labels"), "metadata.labels")
    if not all(isinstance(value, str) for value in labels.values()):
        raise InjectionDenied("metadata.labels values must be strings (quote them in YAML)")
    try:
        ours = ann.ours(annotations)
        # Keyed on the labels the rules read only: distinct workloads share decisions.
        read = policy.selector_label_keys
        selected = tuple(item for item in labels.items() if item[0] in read)
        decision = _decide(context.namespace, context.own_namespace, selected, ours, policy)
        if decision.reason in _LEFT_ALONE:
            return Injection(pod, decision.reason, explanation=decision.explanation)
        sidecars, warnings = _sidecars(policy, ours, decision.sidecars, decision.log_output)
    except ann.InvalidAnnotations as error:
        raise InjectionDenied(str(error), "invalid-annotation") from None
    warnings = (*decision.warnings, *warnings)
    if decision.reason != INJECTED:
        return Injection(pod, decision.reason, warnings=warnings, explanation=decision.explanation)
    spec = _mapping(pod.get("spec"), "spec")
    cannot_run = unfit(spec, sidecars)
    sidecars, skipped = _without_unfit_defaults(sidecars, cannot_run, decision)
    warnings = (*warnings, *skipped)
    if not sidecars:  # every one was a rule's default that the pod cannot run
        explanation = (*decision.explanation, *skipped)
        reason = cannot_run[decision.sidecars[0]].reason
        return Injection(pod, reason, warnings=warnings, explanation=explanation)
    names = tuple(sidecar.name for sidecar in sidecars)
    _check_fits(spec, sidecars, cannot_run)
    sidecars = with_app_containers(spec, sidecars)
    sidecars, identity_warnings = run_as_app_user(spec, sidecars)
    sidecars, grace_warnings = _within_grace(spec, sidecars)
    spec_with_sidecars, written = _injected_spec(spec, sidecars)
    injected_spec, raise_warning = _raised_resources(spec_with_sidecars, sidecars)
    warnings = (*warnings, *identity_warnings, *grace_warnings, *raise_warning)
    status = orjson.dumps({"injected": names, "policy": policy.version}).decode()
    added = {key: value for sidecar in sidecars for key, value in sidecar.pod_annotations}
    injected_pod = {
        **pod,
        "metadata": {**metadata, "annotations": {**annotations, **added, ann.STATUS: status}},
        "spec": injected_spec,
    }
    resources = (f"{s.name} resources: {'; '.join(s.resource_sources)}" for s in sidecars)
    explanation = (*decision.explanation, *resources)
    return Injection(injected_pod, INJECTED, names, warnings, explanation, written)


@cache_small(1024, lambda _namespace, _own, labels, ours, _policy: _size(labels) + _size(ours))
def _decide(
    namespace: str,
    own_namespace: str,
    labels: tuple[tuple[str, str], ...],
    ours: tuple[tuple[str, str], ...],
    policy: Policy,
) -> Decision:
    """Cached: a decision depends on nothing else (of the labels, on those the rules'
    selectors read), and pods ask alike."""
    return decide(namespace, dict(labels), dict(ours), policy, own_namespace)


@cache_small(1024, lambda _policy, ours, _names, _output=None: _size(ours))
def _sidecars(
    policy: Policy,
    ours: tuple[tuple[str, str], ...],
    names: tuple[str, ...],
    rule_output: str | None = None,
) -> tuple[tuple[RenderedSidecar, ...], tuple[str, ...]]:
    """The rendered templates and the warnings about annotations, per policy and annotations.

    Pods of one workload ask alike, so the result is shared between them, and so are its
    dicts: nothing may modify an injected pod in place.
    """
    annotations = dict(ours)
    templates = [policy.templates[name] for name in names]
    values, overrides = _parsed(annotations, templates, policy)
    unknown, idle = ann.unused(annotations, names, policy.sidecars)
    if unknown and policy.unknownAnnotations == "Deny":
        raise ann.InvalidAnnotations(
            [
                f"annotation {key} is not an Outrigger annotation (unknownAnnotations: Deny)"
                for key in unknown
            ]
        )
    warnings = [
        f"annotation {key} is not an Outrigger annotation and is ignored" for key in unknown
    ]
    try:
        rendered = tuple(
            render(
                t,
                values[t.name],
                policy.containerDefaults,
                native=policy.native(t),
                outputs=policy.logOutputs,
                rule_output=rule_output,
                overrides=overrides[t.name],
            )
            for t in templates
        )
    except TemplateError as error:
        raise ann.InvalidAnnotations([str(error)]) from None
    # The policy's load checks let a pod choose an image only among the allowed ones; this
    # holds whatever a template's rendering becomes.
    problems = [
        f"{sidecar.name}: {problem}"
        for sidecar in rendered
        if (problem := policy.image_problem(str(sidecar.container.get("image"))))
    ]
    if problems:
        raise ann.InvalidAnnotations(problems)
    return rendered, (*warnings, *idle)


def _parsed(
    annotations: dict[str, str], templates: list[SidecarTemplate], policy: Policy
) -> tuple[dict[str, dict[str, ParameterValue]], dict[str, tuple[Override, ...]]]:
    """The templates' parameter values and resource overrides; every invalid annotation of
    either kind reported at once."""
    problems: list[str] = []
    values: dict[str, dict[str, ParameterValue]] = {}
    overrides: dict[str, tuple[Override, ...]] = {}
    try:
        values = ann.parse_parameters(annotations, templates, policy.image_problem)
    except ann.InvalidAnnotations as error:
        problems += error.problems
    try:
        overrides = ann.parse_resource_overrides(annotations, templates)
    except ann.InvalidAnnotations as error:
        problems += error.problems
    if problems:
        raise ann.InvalidAnnotations(problems)
    return values, overrides


def _size(pairs: tuple[tuple[str, str], ...]) -> int:
    return sum(len(key) + len(value) for key, value in pairs)


def without_injection(pod: Pod, claimed: tuple[str, ...], policy: Policy) -> Pod:
    """The pod without what a status claims Outrigger added: the claimed templates'
    containers, the volumes they add and the app mounts of those volumes, their annotations
    and the status itself. Only names of the current policy's templates are taken out."""
    templates = [policy.templates[name] for name in claimed if name in policy.templates]
    names = {template.name for template in templates}

    def added_volume(name: object) -> bool:
        return any(template.adds_volume(str(name)) for template in templates)

    def added_annotation(key: str) -> bool:
        return key == ann.STATUS or any(template.adds_annotation(key) for template in templates)

    metadata = _mapping(pod.get("metadata"), "metadata")
    annotations = {
        key: value for key, value in _annotations(metadata).items() if not added_annotation(key)
    }
    spec = dict(_mapping(pod.get("spec"), "spec"))
    removed: list[dict[str, Any]] = []
    for field in ("containers", "initContainers"):
        if field in spec:
            removed += [c for c in _containers(spec, field) if c.get("name") in names]
            kept = [c for c in _containers(spec, field) if c.get("name") not in names]
            spec[field] = [without_mounts(c, added_volume) for c in kept]
    if "volumes" in spec:
        volume_list = _list(spec["volumes"], "spec.volumes")
        spec["volumes"] = [
            v for v in volume_list if not added_volume(_mapping(v, "spec.volumes[]").get("name"))
        ]
    for field in ("initContainers", "volumes"):  # lists that only the injection had made
        if field in spec and not spec[field]:
            del spec[field]
    try:  # what the injection added to the pod-level resources, as the containers hold it
        spec = podresources.lowered(spec, removed)
    except podresources.NotAQuantity as error:
        raise InjectionDenied(str(error)) from None
    return {**pod, "metadata": {**metadata, "annotations": annotations}, "spec": spec}


def _injected_spec(
    spec: Mapping[str, Any], sidecars: tuple[RenderedSidecar, ...]
) -> tuple[Pod, tuple[tuple[object, bytes], ...]]:
    """The spec with the sidecars, and the JSON of their containers (`Injection.written`)."""
    mounts = [mount for sidecar in sidecars for mount in sidecar.app_volume_mounts]
    containers: list[dict[str, Any]] = spec["containers"]
    if mounts:
        containers = [with_mounts(container, mounts) for container in containers]
    token = api_token_mount(spec)
    placed = [(sidecar, *_placed(sidecar, token)) for sidecar in sidecars]
    native = [container for sidecar, container, _ in placed if sidecar.native]
    classic = [container for sidecar, container, _ in placed if not sidecar.native]
    written = tuple((container, json) for _, container, json in placed if json is not None)
    injected = {**spec, "containers": [*containers, *classic]}
    if native:
        # First, so that the app's own init containers can already use them.
        injected["initContainers"] = [*native, *(spec.get("initContainers") or ())]
    volumes = [volume for sidecar in sidecars for volume in sidecar.volumes]
    if volumes:
        injected["volumes"] = [*(spec.get("volumes") or ()), *volumes]
    pull_secrets = _added_pull_secrets(spec, sidecars)
    if pull_secrets:
        injected["imagePullSecrets"] = [*(spec.get("imagePullSecrets") or ()), *pull_secrets]
    return injected, written


def _placed(
    sidecar: RenderedSidecar, token: dict[str, Any] | None
) -> tuple[dict[str, Any], bytes | None]:
    """The sidecar's container with the pod's API token mount, and its JSON (None where
    orjson cannot write it: the patch's encoding says why). Kept on the sidecar for a pod
    without that mount and for the placeholder's name (webhook.admission.review names every
    pod's token volume so where the policy allows), so that the pods that ask alike share
    the container and their patches its JSON: writing an Envoy bootstrap's escaped JSON took
    most of a new pod's patch encoding. A pod's own name is not kept: no other pod has it."""
    name = None if token is None else token["name"]
    placement = sidecar.placements.get(name)
    if placement is None:
        container = with_api_token(sidecar.container, token)
        try:
            placement = (container, orjson.dumps(container))
        except orjson.JSONEncodeError:
            placement = (container, None)
        if name is None or name == TOKEN_VOLUME_PLACEHOLDER:
            sidecar.placements[name] = placement
    return placement


def _added_pull_secrets(
    spec: Mapping[str, Any], sidecars: tuple[RenderedSidecar, ...]
) -> list[dict[str, str]]:
    """The templates' imagePullSecrets the pod does not name yet, each once, in order."""
    if not any(sidecar.image_pull_secrets for sidecar in sidecars):
        return []
    present = {
        s.get("name")
        for s in _list(spec.get("imagePullSecrets"), "spec.imagePullSecrets")
        if isinstance(s, dict)
    }
    names = dict.fromkeys(n for s in sidecars for n in s.image_pull_secrets if n not in present)
    return [{"name": name} for name in names]


def _check_fits(
    spec: Mapping[str, Any],
    sidecars: tuple[RenderedSidecar, ...],
    cannot_run: Mapping[str, Unfit],
) -> None:
    """Deny what Kubernetes would reject later with a vaguer message, or what would not run.

    A sidecar the pod cannot run at all (`cannot_run`) is denied for that alone: its other
    conflicts would not matter once it is left out."""
    containers = _containers(spec, "containers")
    every = containers + _containers(spec, "initContainers")
    every += _containers(spec, "ephemeralContainers")
    names = {c.get("name") for c in every}
    volumes = {v.get("name") for v in _list(spec.get("volumes"), "spec.volumes")}
    ports = {p.get("containerPort"): c.get("name") for c in every for p in c.get("ports") or ()}
    unfit_here = [cannot_run[s.name] for s in sidecars if s.name in cannot_run]
    problems = [u.denied for u in unfit_here]
    problems += dict.fromkeys(u.advice for u in unfit_here if u.advice)  # each said once
    for sidecar in sidecars:
        if sidecar.name in cannot_run:
            continue
        if sidecar.name in names:
            problems.append(
                f"container name {sidecar.name!r} is already used in the pod; {ann.INJECT} "
                "injects a container with that name"
            )
        problems += [
            f"volume name {v['name']!r} is already used in the pod; {sidecar.name} adds a "
            "volume with that name"
            for v in sidecar.volumes
            if v.get("name") in volumes
        ]
        for mount in sidecar.app_volume_mounts:
            problems += [
                f"container {name!r} already mounts a volume at {mount['mountPath']}, where "
                f"{sidecar.name} mounts {mount['name']!r}{_settable(sidecar)}"
                for name in mount_conflicts(containers, str(mount["mountPath"]))
            ]
        problems += _port_problems(sidecar, ports)
    problems += _run_to_completion_problems(spec, sidecars)
    if problems:
        raise InjectionDenied("; ".join(problems), "conflict")


def _without_unfit_defaults(
    sidecars: tuple[RenderedSidecar, ...], cannot_run: Mapping[str, Unfit], decision: Decision
) -> tuple[tuple[RenderedSidecar, ...], tuple[str, ...]]:
    """The sidecars without those the pod cannot run (webhook.core.fit) that only a rule's
    default asks for, and the warnings about those: the rule covers a namespace, not this pod
    (a DaemonSet's hostNetwork pod, a Windows pod), as Istio skips them. One the pod asks for,
    or a rule requires, stays, for `_check_fits` to deny with the reason."""
    if not cannot_run:
        return sidecars, ()
    skipped = tuple(
        s.name for s in sidecars if s.name in cannot_run and s.name in decision.defaults_only
    )
    kept = tuple(s for s in sidecars if s.name not in skipped)
    return kept, tuple(cannot_run[name].skipped for name in skipped)


def _raised_resources(
    spec: Pod, sidecars: tuple[RenderedSidecar, ...]
) -> tuple[Pod, tuple[str, ...]]:
    """The injected spec with its pod-level resources raised by what the sidecars add
    (webhook.core.podresources), which the API server would refuse otherwise; the warning."""
    try:
        raised, warning = podresources.raised(spec, [s.container for s in sidecars])
    except podresources.NotAQuantity as error:
        raise InjectionDenied(str(error)) from None
    return dict(raised), (warning,) if warning else ()


def _run_to_completion_problems(
    spec: Mapping[str, Any], sidecars: tuple[RenderedSidecar, ...]
) -> list[str]:
    """A classic sidecar never exits, so a Job's pod (restartPolicy Never/OnFailure) would
    never complete: deny rather than place it natively against the policy, which may have
    chosen classic placement for a cluster without native sidecars (there, an init container
    that never exits would hold the pod in Init for ever)."""
    restart_policy = spec.get("restartPolicy", "Always")
    classic = [s.name for s in sidecars if not s.native]
    if restart_policy == "Always" or not classic:
        return []
    names, them = ", ".join(classic), "them" if len(classic) > 1 else "it"
    return [
        f"{names} would run in spec.containers beside the app and never exit, so this pod "
        f"(restartPolicy: {restart_policy}, as in a Job or CronJob) would never complete: the "
        "cluster policy places sidecars classically (nativeSidecars: false). Ask the platform "
        f"team for native sidecars (Kubernetes 1.29+), or leave {them} out with "
        f'{ann.INJECT}: "false" (or a list without {them})'
    ]


# What Fluent Bit and Envoy need after SIGTERM to flush and exit (Fluent Bit's grace is 5 s).
_EXIT_SECONDS: Final = 5
_DEFAULT_GRACE_SECONDS: Final = 30  # the pod's terminationGracePeriodSeconds when unset


def _within_grace(
    spec: Mapping[str, Any], sidecars: tuple[RenderedSidecar, ...]
) -> tuple[tuple[RenderedSidecar, ...], list[str]]:
    """A sidecar's preStop sleep counts against the pod's grace period: past it (with the
    time to exit), the kubelet kills the sidecar before it has flushed (or the app's last
    calls have gone out), so that is warned; and the API server refuses a sleep longer than
    the grace period, so such a sleep is shortened to it (none at all for a grace of 0)."""
    grace = spec.get("terminationGracePeriodSeconds")
    grace = _DEFAULT_GRACE_SECONDS if not isinstance(grace, int) else grace
    result, warnings = [], []
    for sidecar in sidecars:
        sleep = sidecar.container.get("lifecycle", {}).get("preStop", {}).get("sleep", {})
        seconds = sleep.get("seconds")
        if isinstance(seconds, int) and grace < seconds + _EXIT_SECONDS:
            shortened = f"; its sleep is shortened to {max(grace, 0)} s" if seconds > grace else ""
            warnings.append(
                f"terminationGracePeriodSeconds ({grace}) is shorter than {sidecar.name}'s "
                f"preStop sleep ({seconds} s) plus {_EXIT_SECONDS} s to exit: the kubelet will "
                f"kill it first; set it to at least {seconds + _EXIT_SECONDS}{shortened}"
            )
        if isinstance(seconds, int) and seconds > grace:
            sidecar = _with_pre_stop_sleep(sidecar, max(grace, 0))
        result.append(sidecar)
    return tuple(result), warnings


def _with_pre_stop_sleep(sidecar: RenderedSidecar, seconds: int) -> RenderedSidecar:
    """The sidecar with a preStop sleep of `seconds` (without the hook for 0); its other
    lifecycle hooks are kept."""
    lifecycle = {k: v for k, v in sidecar.container["lifecycle"].items() if k != "preStop"}
    if seconds:
        lifecycle["preStop"] = {"sleep": {"seconds": seconds}}
    container = {k: v for k, v in sidecar.container.items() if k != "lifecycle"}
    if lifecycle:
        container["lifecycle"] = lifecycle
    return dataclasses.replace(sidecar, container=container)


def _port_problems(sidecar: RenderedSidecar, ports: Mapping[Any, Any]) -> list[str]:
    distinct = set(sidecar.ports)
    if len(distinct) < len(sidecar.ports):
        twice = sorted(port for port in distinct if sidecar.ports.count(port) > 1)
        return [
            f"{sidecar.name} would bind port {', '.join(map(str, twice))} twice (its "
            f"container's ports, admin interface and readiness endpoint must differ)"
            f"{_settable(sidecar)}"
        ]
    taken = distinct.intersection(ports)
    if not taken:  # the usual case, answered without sorting or a list to build
        return []
    return [
        f"container {ports[port]!r} already uses port {port}, which {sidecar.name} needs "
        f"(containers of a pod share one network namespace){_settable(sidecar)}"
        for port in sorted(taken)
    ]


def _settable(sidecar: RenderedSidecar) -> str:
    if not sidecar.annotations:
        return ""
    return f"; {sidecar.name} is configured with {', '.join(sidecar.annotations)}"


def _annotations(metadata: Mapping[str, Any]) -> dict[str, str]:
    annotations = _mapping(metadata.get("annotations"), "metadata.annotations")
    for key, value in annotations.items():
        if not key.startswith(ann.PREFIX):
            continue
        if not isinstance(value, str):
            raise InjectionDenied(
                f"annotation {key}: annotation values must be strings, got {echo(value)} "
                "(quote it in YAML)",
                "invalid-annotation",
            )
        if len(value) > MAX_ANNOTATION_BYTES:  # characters: a quick bound before any parsing
            raise InjectionDenied(
                f"annotation {key}: the value has {len(value)} characters, more than the "
                f"{MAX_ANNOTATION_BYTES} accepted",
                "invalid-annotation",
            )
    return annotations


def _containers(spec: Mapping[str, Any], field: str) -> list[dict[str, Any]]:
    containers = spec.get(field)
    if containers is None:
        containers = []
    elif not isinstance(containers, list) or not all(isinstance(c, dict) for c in containers):
        raise InjectionDenied(f"spec.{field} must be a list of containers")
    if field == "containers" and not containers:
        raise InjectionDenied("the pod has no spec.containers to inject next to")
    return containers


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InjectionDenied(f"{where} must be an object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InjectionDenied(f"{where} must be a list")
    return value


# What the API server makes different in every pod of one workload: the ServiceAccount
# plugin's token volume (named TOKEN_VOLUME_PREFIX and five random characters).
TOKEN_VOLUME_PLACEHOLDER: Final = TOKEN_VOLUME_PREFIX + "*"  # not a volume name anyone can give


def token_volume(pod: Any) -> str | None:
    """The name of the pod's one token volume, where it has exactly one (and it is not
    named as the placeholder); None otherwise."""
    tokens = _token_volumes(pod)
    return tokens[0] if len(tokens) == 1 and tokens[0] != TOKEN_VOLUME_PLACEHOLDER else None


def _token_volumes(pod: Any) -> list[str]:
    """The names of the pod's volumes that are named as a token volume."""
    spec = pod.get("spec") if isinstance(pod, dict) else None
    return token_volume_names(spec.get("volumes") if isinstance(spec, dict) else None)


def rename_volume(pod: Pod, old: str, new: str) -> list[dict[str, Any]]:
    """Rename, in place, the volume `old` of a pod decoded for this request alone (no one
    else holds its objects) and the containers' mounts of it.

    With `old` the pod's token volume and `new` TOKEN_VOLUME_PLACEHOLDER: `inject` reads only
    the prefix of that name (the token mounts are the API server's:
    `webhook.core.volumes.contains`), so two pods that differ in it alone get the same
    answer, as long as no template adds a volume of that prefix (`normalises_token_volumes`):
    the pods of one workload then share one memoised answer, which the API server's random
    name would otherwise keep from them. In place, because copying the spec to rename two
    fields cost as much as the rest of decoding a review. Returns what it renamed: the
    volume and the mounts, each an object of the pod."""
    spec = pod["spec"]
    renamed: list[dict[str, Any]] = []
    for item in spec["volumes"]:
        if isinstance(item, dict) and item.get("name") == old:
            renamed.append(item)
    for field in ("containers", "initContainers", "ephemeralContainers"):
        for container in spec.get(field) or ():
            mounts = container.get("volumeMounts") if isinstance(container, dict) else None
            for mount in mounts if isinstance(mounts, list) else ():
                if isinstance(mount, dict) and mount.get("name") == old:
                    renamed.append(mount)
    for item in renamed:
        item["name"] = new
    return renamed


def normalise_token_volume(pod: Any) -> str | None:
    """Rename, in place, the one token volume of a pod decoded for this request alone (and
    its mounts) to TOKEN_VOLUME_PLACEHOLDER (`rename_volume`); returns its name, or None
    where nothing was renamed (no token volume, several, or one named as the placeholder)."""
    name = token_volume(pod)
    if name is not None:
        rename_volume(pod, name, TOKEN_VOLUME_PLACEHOLDER)
    return name


def checked_form(pod: Any, read_labels: frozenset[str] | None = None) -> bytes | None:
    """A pod that carries a status, its token volume normalised (`normalise_token_volume`),
    as `inject` sees it (`read_parts`); None where that cannot be said plainly (metadata or
    spec that are not objects, several token volumes, nested past what orjson writes).

    `inject` reads nothing else of a pod: name, uid, owners, managed fields, status and
    other annotations only pass through, and other labels only for their type; of its token
    volume, only the prefix of the name. So the check of an injected pod, which the API
    server asks for again after its own plugins ran, is made once per form, not once per
    pod, replica or revision of one shape."""
    metadata, spec = (pod.get("metadata"), pod.get("spec")) if isinstance(pod, dict) else (0, 0)
    if not isinstance(metadata, dict) or not isinstance(spec, dict) or len(_token_volumes(pod)) > 1:
        return None
    try:
        return orjson.dumps(read_parts(pod, read_labels))
    except orjson.JSONEncodeError:
        return None


def read_parts(pod: dict[str, Any], read_labels: frozenset[str] | None = None) -> dict[str, Any]:
    """What `inject` reads of a pod: its labels (only those in `read_labels`, the policy's
    `selector_label_keys`, when given and every value is a string), its annotations
    (`annotations_read`) and its spec."""
    metadata = pod.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    return {
        "labels": labels_read(metadata.get("labels"), read_labels),
        "annotations": annotations_read(metadata.get("annotations")),
        "spec": pod.get("spec"),
    }


def annotations_read(annotations: Any) -> Any:
    """Of `annotations`, those `inject` reads or writes: whose key holds `outrigger.dev/`
    (the pod's own settings, the status, and what templates add: `<name>.outrigger.dev/...`,
    `<name>.sds.outrigger.dev/...`). Others only pass through: the patch is the same with or
    without them, so pods that differ only there (a `kubectl rollout restart`'s restartedAt,
    a Helm chart's config checksum) can share an answer. Not an object: as it is."""
    if not isinstance(annotations, dict):
        return annotations
    return {key: value for key, value in annotations.items() if ann.PREFIX in key}


def labels_read(labels: Any, read_labels: frozenset[str] | None) -> Any:
    """Of `labels`, those in `read_labels` (None: all), the only ones `inject` reads for
    more than their type: the patch never touches labels. Labels that are not all strings
    are kept whole (`inject` denies such a pod)."""
    if read_labels is None or not isinstance(labels, dict):
        return labels
    if not all(isinstance(value, str) for value in labels.values()):
        return labels
    return {key: value for key, value in labels.items() if key in read_labels}


def normalises_token_volumes(policy: Policy) -> bool:
    """Whether pods of one checked form are alike to `policy`: none of its templates is
    named, or adds a volume named, like the API server's token volume."""
    return not any(
        template.name.startswith(TOKEN_VOLUME_PREFIX[:-1])
        or any(name.startswith(TOKEN_VOLUME_PREFIX) for name in template.added_volume_names)
        for template in policy.sidecars
    )
