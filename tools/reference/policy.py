"""docs/reference/policy.md: the cluster policy, from its models (`webhook.core.policy`)."""

from __future__ import annotations

from tools.reference.markdown import header, paragraph
from tools.reference.models import reference
from webhook.core.policy import API_VERSION, KIND, Policy

MODULES = ("policy", "parameters", "logwatcher", "logoutputs", "sidecarresources")
SOURCES = tuple(f"webhook/core/{module}.py" for module in MODULES)
INTRO = (
    f"The cluster policy (`apiVersion: {API_VERSION}`, `kind: {KIND}`), field by field. "
    "`outrigger policy check FILE` validates one offline, naming the path of every bad "
    "field. A path's `[]` is an item of a list, `<name>` a key of a map; the default is the "
    "value when the field is absent (the embedded default policy, "
    "`webhook/core/default-policy.yaml`, sets some of them otherwise)."
)


def render() -> str:
    lines = header("Cluster policy reference", SOURCES)
    lines += paragraph(INTRO)
    lines += reference(Policy, root_title=KIND)
    return "\n".join(lines)
