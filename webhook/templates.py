"""Sidecar templates rendered with the parameter values a pod's annotations set.

Only `${parameter}` references that the platform team wrote into a template are ever replaced,
so an annotation can set a value but never a field: a pod cannot choose an image, a capability,
privileged mode or a host path unless the template exposes exactly that as a parameter.

A value that is exactly `${name}` takes the parameter's type (a number for an integer), except
in `command`, `args` and `env[].value`, which Kubernetes wants as strings; a reference inside a
longer string is interpolated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from webhook.ambassador import envoy_config_json
from webhook.hostport import Upstream
from webhook.policy import ContainerDefaults, SidecarTemplate

_REFERENCE = re.compile(r"\$\{([a-z0-9.-]+)\}")
_STRING_FIELDS = frozenset({"command", "args"})

Values = Mapping[str, str | int | bool | Upstream]


@dataclass(frozen=True, slots=True)
class RenderedSidecar:
    """What one template adds to a pod: read-only, shared by the pods that ask alike."""

    name: str
    container: dict[str, Any]
    volumes: tuple[dict[str, Any], ...]
    app_volume_mounts: tuple[dict[str, Any], ...]
    # Ports the sidecar binds in the pod's network namespace (container ports, Envoy admin);
    # a port listed twice cannot be bound twice.
    ports: tuple[int, ...]
    # The annotations that set its parameters, for messages that say what to change.
    annotations: tuple[str, ...]


def render(
    template: SidecarTemplate, values: Values, defaults: ContainerDefaults, *, native: bool
) -> RenderedSidecar:
    """`native`: a native sidecar (an init container that keeps running, Kubernetes 1.29+)."""
    references = _references(template, values)
    container = {"name": template.name, **_substitute(template.container, references)}
    if native:
        container["restartPolicy"] = "Always"
    container["resources"] = {**defaults.resources, **container.get("resources", {})}
    container["securityContext"] = {
        **defaults.securityContext,
        **container.get("securityContext", {}),
    }
    ports = [p["containerPort"] for p in container.get("ports", ()) if "containerPort" in p]
    if template.envoy is not None:
        ports.append(template.envoy.adminPort)
    return RenderedSidecar(
        name=template.name,
        container=container,
        volumes=tuple(_substitute(list(template.volumes), references)),
        app_volume_mounts=tuple(_substitute(list(template.appVolumeMounts), references)),
        ports=tuple(p for p in ports if isinstance(p, int)),
        annotations=tuple(p.annotation for p in template.parameters.values()),
    )


def _references(template: SidecarTemplate, values: Values) -> dict[str, Any]:
    """Every name a template may refer to: parameters, hostport parts, the Envoy bootstrap."""
    references: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, Upstream):
            references[name] = f"{value.host}:{value.port}"
            references[f"{name}.host"] = value.host
            references[f"{name}.port"] = value.port
        else:
            references[name] = value
    if template.envoy is not None:
        envoy = _substitute(template.envoy.model_dump(), references)
        upstream = values[_single_reference(template.envoy.upstream)]
        assert isinstance(upstream, Upstream)  # the policy only accepts hostport parameters here
        references["envoy.bootstrap"] = envoy_config_json(
            upstream, envoy["listenAddress"], int(envoy["listenPort"]), envoy["adminPort"]
        )
    return references


def _single_reference(text: str) -> str:
    match = _REFERENCE.fullmatch(text)
    if match is None:
        raise ValueError(f"envoy.upstream must be one ${{parameter}} of type hostport: {text!r}")
    return match.group(1)


def _substitute(value: Any, references: dict[str, Any], as_string: bool = False) -> Any:
    if isinstance(value, str):
        whole = _REFERENCE.fullmatch(value)
        if whole is not None:
            found = references[whole.group(1)]
            return str(found) if as_string else found
        return _REFERENCE.sub(lambda m: str(references[m.group(1)]), value)
    if isinstance(value, dict):
        return {
            key: _substitute(
                item,
                references,
                as_string or key in _STRING_FIELDS or (key == "value" and "name" in value),
            )
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_substitute(item, references, as_string) for item in value]
    return value
