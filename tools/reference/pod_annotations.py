"""docs/reference/annotations.md: the pod annotations, from the embedded default policy.

Every annotation but `inject` and `status` is a parameter a template declares, or one of the
resource annotations its `resourceOverrides` opens: the rows come from the policy, their
accepted values from the words the webhook's own denials use.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from tools.reference.markdown import code, header, paragraph, prose, table
from webhook.core.annotations import INJECT, STATUS
from webhook.core.parameters import Parameter, accepted_values
from webhook.core.policy import Policy, SidecarTemplate, default_policy
from webhook.core.sidecarresources import KINDS, RESOURCES, accepted, annotation_key

SOURCES = ("webhook/core/default-policy.yaml", "webhook/core/parameters.py")
COLUMNS = ("annotation", "sidecar", "meaning", "default", "accepted values")
INTRO = (
    "Put them on the pod, in practice on a Deployment's (StatefulSet's, Job's...) pod "
    "template. This is the embedded default policy's set: every annotation but "
    f"`{INJECT}` and `{STATUS}` is a parameter that a sidecar template of the cluster "
    "policy declares (`sidecars[].parameters`), or a resource annotation its "
    "`resourceOverrides` opens, so a cluster's policy may offer others (see "
    "[the policy reference](policy.md)). A pod with an invalid annotation is denied, naming "
    "it and what it accepts; an `outrigger.dev/` annotation with no effect is admitted with "
    "a warning (denied under `unknownAnnotations: Deny`)."
)
LOG_OUTPUT = (
    "A policy with `logOutputs` usually declares one more log-watcher parameter, such as "
    "`outrigger.dev/log-output` (a `${parameter}` of type string that its "
    "`logWatcher.output` names): which of the policy's outputs the records go to; without "
    "it, a matching rule's `logOutput`, else `logOutputs.default`. Any other name is denied, "
    "naming the accepted ones."
)
RESOURCES_NOTE = (
    "A resource annotation, `outrigger.dev/<sidecar>-<cpu|memory|ephemeral-storage>-"
    "<request|limit>`, is merged field by field into the template's resources (setting the "
    "memory limit keeps the CPU request), written as the API server stores it (`1024Mi` as "
    "`1Gi`, `0.5` as `500m`). A value outside the policy's bounds, a request above its limit, "
    "or a resource the policy does not open is denied, naming the annotation. The "
    "ambassador's Envoy workers (`--concurrency`) follow its CPU limit, the log-watcher's "
    "Fluent Bit buffer its memory limit (a quarter of it at most)."
)
_RESOURCE_NAMES = {"cpu": "CPU", "memory": "memory", "ephemeral-storage": "ephemeral-storage"}


def render(policy: Policy | None = None) -> str:
    policy = policy or default_policy()
    rows = [_inject_row(policy)]
    for template in policy.sidecars:
        rows += [_parameter_row(template, p) for p in template.parameters.values()]
    for template in policy.sidecars:
        rows += list(_resource_rows(template, policy.containerDefaults.resources))
    rows.append(_status_row())
    lines = header("Annotations reference", SOURCES)
    lines += paragraph(INTRO)
    lines += _sidecars(policy)
    lines += table(COLUMNS, rows)
    lines += paragraph(RESOURCES_NOTE)
    lines += paragraph(LOG_OUTPUT)
    return "\n".join(lines)


def _sidecars(policy: Policy) -> list[str]:
    lines = ["The default policy's sidecars, in the order they are placed in a pod:", ""]
    lines += [prose(f"- `{t.name}`: {t.description}".rstrip(": ")) for t in policy.sidecars]
    return [*lines, ""]


def _inject_row(policy: Policy) -> list[str]:
    names = ", ".join(code(template.name) for template in policy.sidecars)
    return [
        code(INJECT),
        "",
        "the sidecars to inject",
        "the matching rules' `inject` defaults" + ("" if policy.rules else " (it has no rules)"),
        "`true` (the rules' defaults), `false` or empty (opt out of all that no rule "
        f"requires), or a comma-separated list of sidecar names of the policy ({names})",
    ]


def _status_row() -> list[str]:
    return [
        code(STATUS),
        "",
        "written by the webhook: what it injected and the policy version (JSON)",
        "",
        "do not set it by hand: it exempts nothing (what it claims is checked against the pod)",
    ]


def _parameter_row(template: SidecarTemplate, parameter: Parameter) -> list[str]:
    if parameter.required:
        default = f"required when `{template.name}` is injected"
    elif parameter.default is None:
        default = "none"
    else:
        value = parameter.default
        default = code(str(value).lower() if isinstance(value, bool) else value)
    return [
        code(parameter.annotation),
        code(template.name),
        parameter.description,
        default,
        accepted_values(parameter),
    ]


def _resource_rows(template: SidecarTemplate, defaults: Mapping[str, Any]) -> Iterator[list[str]]:
    """A row per resource annotation the template's bounds open; the default is the
    template's value, merged over the policy's containerDefaults as the webhook merges it."""
    resources = {**defaults, **template.container.get("resources", {})}
    opened = [
        (r, k, template.resourceOverrides[r])
        for r in RESOURCES
        for k in KINDS
        if r in template.resourceOverrides
    ]
    for resource, kind, override in opened:
        bound = override.request if kind == "request" else override.limit
        removable = kind == "limit" and override.removableLimit
        if bound is None and not removable:
            continue  # the pod may not set it
        value = (resources.get(f"{kind}s") or {}).get(resource)
        yield [
            code(annotation_key(template.name, resource, kind)),
            code(template.name),
            f"the {_RESOURCE_NAMES[resource]} {kind} of the `{template.name}` container",
            code(value) if value is not None else f"no {kind}",
            accepted(resource, bound, removable),
        ]
