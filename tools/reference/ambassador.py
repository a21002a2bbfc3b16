"""docs/reference/ambassador.md: `outrigger.dev/ambassador-config`, from its models
(`webhook.ambassador.spec`), with the Envoy setting each field becomes."""

from __future__ import annotations

from tools.reference.markdown import header, paragraph
from tools.reference.models import reference
from webhook.ambassador.spec import MAX_YAML_DEPTH, AmbassadorSpec

SOURCES = ("webhook/ambassador/spec.py",)
INTRO = (
    "The value of the pod annotation `outrigger.dev/ambassador-config`: a YAML document "
    "(write it as a literal block, `|`), instead of `outrigger.dev/ambassador-upstream` and "
    "`outrigger.dev/ambassador-port` (a pod that sets both is denied). Those two are exactly "
    "`upstreams: {upstream: {address: <host:port>, port: <port>}}`. Unknown keys are denied "
    "at every level, YAML aliases too, and nesting deeper than "
    f"{MAX_YAML_DEPTH} levels. Durations are a number with a unit, `ms`, `s`, `m` or `h` "
    "(`500ms`, `5s`, `30m`); Envoy gets them in seconds. The bounds are Envoy's own, so that "
    "nothing admitted makes Envoy refuse its bootstrap."
)


def render() -> str:
    lines = header("Ambassador configuration reference", SOURCES)
    lines += paragraph(INTRO)
    lines += reference(AmbassadorSpec, root_title="ambassador-config", note="Envoy")
    return "\n".join(lines)
