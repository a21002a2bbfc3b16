"""What a pod cannot run: the reasons an injected sidecar would fail in it, and what to say.

Two reasons today. A Windows pod runs none of Outrigger's sidecars: they are Linux containers,
whose Linux-only securityContext the API server refuses in a pod with `spec.os.name: windows`
and which no Windows node could start (Istio and Linkerd skip such pods too). A `hostNetwork`
pod cannot run a sidecar with ports: they would be taken on the node itself.

Where only a rule's default asks for such a sidecar, it is skipped with a warning: the rule
covers a namespace, not this pod's needs. One that the pod asks for, or that a rule
requires, is denied with the reason: leaving it out would break what the asker counts on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from webhook.core import annotations as ann
from webhook.core.templates import RenderedSidecar

# Why a pod came out without sidecars (metric labels, as those of webhook.core.selection):
# only rule defaults asked, for sidecars that cannot run in a Windows or a hostNetwork pod.
WINDOWS_SKIPPED: Final = "windows-skipped"
HOST_NETWORK_SKIPPED: Final = "host-network-skipped"
OS_LABEL: Final = "kubernetes.io/os"
_WINDOWS: Final = "windows"
_REQUIRED: Final = "requiredDuringSchedulingIgnoredDuringExecution"


@dataclass(frozen=True, slots=True)
class Unfit:
    """Why the pod cannot run one sidecar. `reason`: the outcome when every sidecar is
    skipped; `skipped`: the warning for a rule's default left out; `denied`: the problem
    for one the pod asked for or a rule requires; `advice`: what to do, said once."""

    reason: str
    skipped: str
    denied: str
    advice: str = ""


def unfit(spec: Mapping[str, Any], sidecars: tuple[RenderedSidecar, ...]) -> dict[str, Unfit]:
    """Why the pod cannot run each of `sidecars` it cannot run, by name. Windows comes first:
    there, none runs, ports or not."""
    where = windows_pin(spec)
    if where is not None:
        return {sidecar.name: _on_windows(sidecar.name, where) for sidecar in sidecars}
    if spec.get("hostNetwork") is not True:
        return {}
    return {sidecar.name: _on_host_network(sidecar) for sidecar in sidecars if sidecar.ports}


def windows_pin(spec: Mapping[str, Any]) -> str | None:
    """The field that makes the pod a Windows one, as the messages name it; None for others.

    `spec.os.name` says what the pod is; a node selector or a required node affinity on
    kubernetes.io/os says where it may run: only on Windows nodes when every term of the
    affinity (terms are alternatives) demands `In` Windows alone.
    """
    system = spec.get("os")
    if isinstance(system, dict) and system.get("name") == _WINDOWS:
        return "spec.os.name: windows"
    selector = spec.get("nodeSelector")
    if isinstance(selector, dict) and selector.get(OS_LABEL) == _WINDOWS:
        return f"spec.nodeSelector {OS_LABEL}: windows"
    terms = _dig(spec, "affinity", "nodeAffinity", _REQUIRED, "nodeSelectorTerms")
    if isinstance(terms, list) and terms and all(map(_windows_term, terms)):
        return f"spec.affinity.nodeAffinity.{_REQUIRED}: {OS_LABEL} In [windows]"
    return None


def _windows_term(term: Any) -> bool:
    """Whether a node selector term admits Windows nodes alone (its expressions all hold)."""
    expressions = term.get("matchExpressions") if isinstance(term, dict) else None
    return isinstance(expressions, list) and any(
        isinstance(e, dict)
        and e.get("key") == OS_LABEL
        and e.get("operator") == "In"
        and isinstance(e.get("values"), list)
        and bool(e["values"])
        and all(value == _WINDOWS for value in e["values"])
        for e in expressions
    )


def _dig(node: Any, *path: str) -> Any:
    for field in path:
        node = node.get(field) if isinstance(node, dict) else None
    return node


def _on_windows(name: str, where: str) -> Unfit:
    return Unfit(
        WINDOWS_SKIPPED,
        f"{name} (a rule's default) is not injected into this Windows pod ({where}): it is a "
        "Linux container",
        f"{name} cannot be injected into a Windows pod ({where}): it is a Linux container",
        f'leave Outrigger\'s sidecars out of {ann.INJECT} ("false" for none); for one that a '
        "rule of the cluster policy requires, the platform team narrows that rule (its "
        "namespaces or podSelector) so that it does not cover these pods",
    )


def _on_host_network(sidecar: RenderedSidecar) -> Unfit:
    ports = ", ".join(map(str, sorted(sidecar.ports)))
    return Unfit(
        HOST_NETWORK_SKIPPED,
        f"{sidecar.name} (a rule's default) is not injected into this hostNetwork pod: its "
        "ports would be taken on the node",
        f"{sidecar.name} cannot be injected into a hostNetwork pod: its ports ({ports}) would "
        "be taken on the node itself",
    )
