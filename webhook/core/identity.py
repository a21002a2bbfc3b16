"""Which user a sidecar that reads the app's files runs as.

An app that writes its logs as its own user with a restrictive umask (files 0640 or 0600)
leaves them unreadable to any other user, and Fluent Bit then ships nothing (`errno=13`). A
template with `runAsAppUser` therefore runs as the user (and group) the app containers run
as, when the pod says it: the same in every app container (a container's securityContext,
else the pod's), and not root. The pod could run that user anyway, so nothing is granted;
the template's own user stays otherwise, and a warning says what the files then need.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from webhook.core.templates import RenderedSidecar

Identity = tuple[object, object]  # (runAsUser, runAsGroup) as the pod sets them, or None


def run_as_app_user(
    spec: Mapping[str, Any], sidecars: tuple[RenderedSidecar, ...]
) -> tuple[tuple[RenderedSidecar, ...], list[str]]:
    """The sidecars, those with `run_as_app_user` as the app's user where it is known; and
    the warnings where it is not."""
    if not any(sidecar.run_as_app_user for sidecar in sidecars):
        return sidecars, []
    identities = app_identities(spec)
    result, warnings = [], []
    for sidecar in sidecars:
        if not sidecar.run_as_app_user:
            result.append(sidecar)
            continue
        user, problem = _one_user(identities)
        if problem:
            own = sidecar.container.get("securityContext", {}).get("runAsUser")
            warnings.append(
                f"{sidecar.name} reads the app's files as user {own}, as {problem}: files not "
                "readable by all (umask 027, 077) are not shipped; set runAsUser (and "
                "runAsGroup) of the app in the pod's securityContext"
            )
            result.append(sidecar)
            continue
        result.append(_as_user(sidecar, user))
    return tuple(result), warnings


def app_identities(spec: Mapping[str, Any]) -> list[Identity]:
    """(runAsUser, runAsGroup) of each app container, a container's own over the pod's."""
    pod = spec.get("securityContext")
    pod = pod if isinstance(pod, dict) else {}
    identities = []
    for container in spec.get("containers") or ():
        own = container.get("securityContext") if isinstance(container, dict) else None
        own = own if isinstance(own, dict) else {}
        identities.append(
            (
                _scalar(own.get("runAsUser", pod.get("runAsUser"))),
                _scalar(own.get("runAsGroup", pod.get("runAsGroup"))),
            )
        )
    return identities


def _scalar(value: object) -> object:
    """A JSON scalar as the pod gives it; an object or a list (which the API server refuses
    in any case) by its kind, so that identities compare and print whatever they hold."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return "an object" if isinstance(value, dict) else "a list"


def _one_user(identities: Sequence[Identity]) -> tuple[Identity, str]:
    """The one (user, group) of the app containers, or why there is none to take."""
    if len(set(identities)) > 1:
        seen = ", ".join(sorted({f"{u}:{g}" for u, g in identities}))
        return (None, None), f"the app containers run as different users ({seen})"
    user, group = identities[0] if identities else (None, None)
    if user is None:
        return (None, None), "the pod does not set the app's runAsUser"
    if not isinstance(user, int) or isinstance(user, bool) or user <= 0:
        return (None, None), "the app runs as root, which the watcher may not"
    return (user, group), ""


def _as_user(sidecar: RenderedSidecar, identity: Identity) -> RenderedSidecar:
    user, group = identity
    context = {**sidecar.container.get("securityContext", {}), "runAsUser": user}
    if isinstance(group, int) and not isinstance(group, bool) and group >= 0:
        context["runAsGroup"] = group
    container = {**sidecar.container, "securityContext": context}
    return dataclasses.replace(sidecar, container=container)
