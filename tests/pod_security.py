"""The Pod Security Standards "Restricted" profile as a test oracle: which pod fields violate it.

Source: the Restricted profile (which includes every Baseline control) of the Kubernetes Pod
Security Standards, policy version "latest", as published at
https://kubernetes.io/docs/concepts/security/pod-security-standards/ -- the revision with the
"Host Probes / Lifecycle Hooks (v1.34+)" control, the SELinux type ``container_engine_t`` (v1.31)
and the v1.27/v1.29 safe sysctls, as read in November 2026. The inheritance details below follow
the reference implementation of those rules, the PodSecurity admission controller
(k8s.io/pod-security-admission/policy).

How the rules are applied:

* Every control applies to ``containers``, ``initContainers`` and ``ephemeralContainers`` alike.
* A container that leaves ``runAsNonRoot``, ``runAsUser``, ``seccompProfile``, ``appArmorProfile``,
  ``seLinuxOptions`` or ``windowsOptions.hostProcess`` unset runs with the pod-level
  ``spec.securityContext`` value, and is judged on that value (the message says "inherited from").
  So ``runAsNonRoot: true`` or a seccomp profile set only at pod level satisfies every container,
  while a container-level value always wins over the pod's.
* A pod-level value that is itself not allowed is reported at its own path even if every container
  overrides it, as the standard restricts ``spec.securityContext.*`` directly.
* Where a Restricted control tightens a Baseline one (capabilities: only ``NET_BIND_SERVICE`` may
  be added, which is inside the Baseline default set; seccomp: ``Unconfined`` is out either way;
  volume types: ``hostPath`` is not an allowed type), only the Restricted form is checked, as the
  admission controller does, so each offending field yields exactly one message.
* Privilege escalation, seccomp and capabilities are not required of pods with
  ``spec.os.name: windows`` ("OS-specific policy controls").
* A volume with no source field counts as ``emptyDir``: the API server defaults it so before
  admission.

Deliberately stricter than the admission controller of recent releases, which is ahead of the
page: ``image`` volumes (admitted since v1.33) and the ``net.ipv4.tcp_rmem``/``tcp_wmem`` sysctls
(v1.32) are rejected, and ``runAsNonRoot``/``runAsUser`` are not relaxed for pods with
``hostUsers: false`` (v1.35). A pod that passes here is therefore admitted by ``restricted``.

Messages read ``<field path>: <what is wrong>``, e.g.
``spec.containers[1].securityContext.allowPrivilegeEscalation: must be false``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

Pod = Mapping[str, Any]
# Returns what is wrong with a field's value (None meaning the field is unset), or None if allowed.
Problem = Callable[[Any], str | None]

# In start order, which is also the order the admission controller visits them in.
CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")
HOST_NAMESPACES = ("hostNetwork", "hostPID", "hostIPC")
ALLOWED_VOLUME_TYPES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
SELINUX_TYPES = ("container_t", "container_init_t", "container_kvm_t", "container_engine_t")
APPARMOR_ANNOTATION_PREFIX = "container.apparmor.security.beta.kubernetes.io/"
# Probe and lifecycle handlers whose `host` field is restricted (Host Probes / Lifecycle Hooks).
HANDLER_HOSTS = tuple(
    f"{handler}.{action}.host"
    for handler in (
        "livenessProbe",
        "readinessProbe",
        "startupProbe",
        "lifecycle.postStart",
        "lifecycle.preStop",
    )
    for action in ("httpGet", "tcpSocket")
)


def _show(value: Any) -> str:
    return json.dumps(value)


def _choices(words: tuple[str, ...]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _must_be_true(value: Any) -> str | None:
    return None if value is True else "must be true"


def _must_be_false(value: Any) -> str | None:
    return None if value is False else "must be false"


def _must_not_be_true(value: Any) -> str | None:
    return "must not be true" if value is True else None


def _must_not_be_zero(value: Any) -> str | None:
    return "must not be 0" if value == 0 else None


def _must_be_unset_or_zero(value: Any) -> str | None:
    return None if value in (None, 0) else f"must be unset or 0, not {_show(value)}"


def _must_be_unset_or_empty(value: Any) -> str | None:
    return None if value in (None, "") else f"must be unset or empty, not {_show(value)}"


def _one_of(*allowed: str, optional: bool = False) -> Problem:
    """`value` must be one of `allowed`; with `optional`, also unset or empty."""
    expected = _choices(("unset", *allowed) if optional else allowed)

    def problem(value: Any) -> str | None:
        if value in allowed or (optional and value in (None, "")):
            return None
        return f"must be {expected}" if value is None else f"must be {expected}, not {_show(value)}"

    return problem


def _must_drop_all(value: Any) -> str | None:
    return None if isinstance(value, list) and "ALL" in value else 'must include "ALL"'


def _addable_capability(value: Any) -> str | None:
    if value == "NET_BIND_SERVICE":
        return None
    return f"only NET_BIND_SERVICE may be added, not {_show(value)}"


def _safe_sysctl(value: Any) -> str | None:
    return None if value in SAFE_SYSCTLS else f"must be one of the safe sysctls, not {_show(value)}"


@dataclass(frozen=True)
class Rule:
    """One restricted field: `path` is relative to the container (or to the pod, for pod rules)
    and may expand one list with `[*]`; `problem` judges each value found there."""

    path: str
    problem: Problem
    # The securityContext field a container inherits from spec.securityContext when unset.
    inherits: str | None = None
    # Only required when spec.os.name is not "windows".
    linux_only: bool = False


CONTAINER_RULES: tuple[Rule, ...] = (
    # Baseline
    Rule(
        "securityContext.windowsOptions.hostProcess",
        _must_not_be_true,
        inherits="windowsOptions.hostProcess",
    ),
    Rule("securityContext.privileged", _must_not_be_true),
    Rule("ports[*].hostPort", _must_be_unset_or_zero),
    *(Rule(path, _must_be_unset_or_empty) for path in HANDLER_HOSTS),
    Rule(
        "securityContext.appArmorProfile.type",
        _one_of("RuntimeDefault", "Localhost", optional=True),
        inherits="appArmorProfile",
    ),
    Rule(
        "securityContext.seLinuxOptions.type",
        _one_of(*SELINUX_TYPES, optional=True),
        inherits="seLinuxOptions",
    ),
    Rule("securityContext.seLinuxOptions.user", _must_be_unset_or_empty, inherits="seLinuxOptions"),
    Rule("securityContext.seLinuxOptions.role", _must_be_unset_or_empty, inherits="seLinuxOptions"),
    Rule("securityContext.procMount", _one_of("Default", optional=True)),
    # Restricted
    Rule("securityContext.allowPrivilegeEscalation", _must_be_false, linux_only=True),
    Rule("securityContext.runAsNonRoot", _must_be_true, inherits="runAsNonRoot"),
    Rule("securityContext.runAsUser", _must_not_be_zero, inherits="runAsUser"),
    Rule(
        "securityContext.seccompProfile.type",
        _one_of("RuntimeDefault", "Localhost"),
        inherits="seccompProfile",
        linux_only=True,
    ),
    Rule("securityContext.capabilities.drop", _must_drop_all, linux_only=True),
    Rule("securityContext.capabilities.add[*]", _addable_capability, linux_only=True),
)

# Pod-level rules judge only the values that are set: a pod may leave to its containers
# what they all set themselves.
POD_RULES: tuple[Rule, ...] = (
    *(Rule(f"spec.{namespace}", _must_not_be_true) for namespace in HOST_NAMESPACES),
    Rule("spec.securityContext.sysctls[*].name", _safe_sysctl),
    *(
        Rule(f"spec.{rule.path}", rule.problem, linux_only=rule.linux_only)
        for rule in CONTAINER_RULES
        if rule.inherits
    ),
)


def restricted_violations(pod: Pod) -> list[str]:
    """Every violation of the Restricted profile in `pod`, a Pod or a pod template."""
    return [
        *_pod_problems(pod),
        *(problem for path, c in _containers(pod) for problem in _container_problems(pod, path, c)),
        *(problem for path, v in _volumes(pod) for problem in _volume_problems(path, v)),
    ]


def container_violations(pod: Pod, container_name: str) -> list[str]:
    """The violations of the container named `container_name` alone (in any container list),
    judged with the pod-level settings it inherits."""
    found = [(path, c) for path, c in _containers(pod) if c.get("name") == container_name]
    if not found:
        raise ValueError(f"pod has no container named {container_name!r}")
    return [problem for path, c in found for problem in _container_problems(pod, path, c)]


def volume_violations(pod: Pod, volume_name: str) -> list[str]:
    """The violations of the volume named `volume_name` alone."""
    found = [(path, v) for path, v in _volumes(pod) if v.get("name") == volume_name]
    if not found:
        raise ValueError(f"pod has no volume named {volume_name!r}")
    return [problem for path, v in found for problem in _volume_problems(path, v)]


def _get(obj: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _values(obj: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(concrete path, value) pairs for `path` in `obj`, expanding one `[*]` over a list."""
    head, star, tail = path.partition("[*]")
    if not star:
        yield path, _get(obj, path)
        return
    items = _get(obj, head)
    rest = tail.removeprefix(".")
    for index, item in enumerate(items if isinstance(items, list) else []):
        if rest:
            yield f"{head}[{index}].{rest}", _get(item, rest)
        else:
            yield f"{head}[{index}]", item


def _containers(pod: Pod) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for kind in CONTAINER_LISTS:
        for index, container in enumerate(_get(pod, f"spec.{kind}") or []):
            yield f"spec.{kind}[{index}]", container


def _volumes(pod: Pod) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for index, volume in enumerate(_get(pod, "spec.volumes") or []):
        yield f"spec.volumes[{index}]", volume


def _is_windows(pod: Pod) -> bool:
    return bool(_get(pod, "spec.os.name") == "windows")


def _pod_problems(pod: Pod) -> Iterator[str]:
    windows = _is_windows(pod)
    for rule in POD_RULES:
        if rule.linux_only and windows:
            continue
        for path, value in _values(pod, rule.path):
            if value is not None and (problem := rule.problem(value)):
                yield f"{path}: {problem}"
    names = {container.get("name") for _, container in _containers(pod)}
    yield from _apparmor_annotation_problems(pod, lambda name: name not in names)


def _container_problems(pod: Pod, path: str, container: Mapping[str, Any]) -> Iterator[str]:
    windows = _is_windows(pod)
    own_context = container.get("securityContext")
    for rule in CONTAINER_RULES:
        if rule.linux_only and windows:
            continue
        if rule.inherits and _get(own_context, rule.inherits) is None:
            pod_path = f"spec.{rule.path}"
            value = _get(pod, pod_path)
            if problem := rule.problem(value):
                source = "inherited from" if value is not None else "not set here or at"
                yield f"{path}.{rule.path}: {problem} ({source} {pod_path})"
            continue
        for field, value in _values(container, rule.path):
            if problem := rule.problem(value):
                yield f"{path}.{field}: {problem}"
    name = container.get("name")
    yield from _apparmor_annotation_problems(pod, lambda annotated: annotated == name)


def _apparmor_annotation_problems(pod: Pod, selects: Callable[[str], bool]) -> Iterator[str]:
    """Problems with the deprecated per-container AppArmor annotations for the container names
    `selects` accepts."""
    for key, value in (_get(pod, "metadata.annotations") or {}).items():
        if not key.startswith(APPARMOR_ANNOTATION_PREFIX):
            continue
        if not selects(key.removeprefix(APPARMOR_ANNOTATION_PREFIX)):
            continue
        if value in ("", "runtime/default") or value.startswith("localhost/"):
            continue
        yield (
            f'metadata.annotations["{key}"]: must be empty, runtime/default or '
            f"localhost/<profile>, not {_show(value)}"
        )


def _volume_problems(path: str, volume: Mapping[str, Any]) -> Iterator[str]:
    for field, source in volume.items():
        if field != "name" and source is not None and field not in ALLOWED_VOLUME_TYPES:
            yield f"{path}.{field}: volume type {field} is not allowed by the restricted profile"
