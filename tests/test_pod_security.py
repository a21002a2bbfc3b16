"""Tests for the Pod Security Standards "Restricted" oracle in tests/pod_security.py.

Each case edits a fully compliant pod (an init container, two containers, two volumes) and states
the exact violations expected; the edit paths use the same syntax as the messages.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from tests.conftest import as_pod, validate_strict
from tests.pod_security import container_violations, restricted_violations, volume_violations

DELETE: Any = object()
Edits = list[tuple[str, Any]]

RESTRICTED_CONTEXT = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
SCRATCH_CLAIM = {
    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
}
PART_PREFIXES = ("spec.initContainers", "spec.containers", "spec.ephemeralContainers")
APPARMOR_APP = 'metadata.annotations["container.apparmor.security.beta.kubernetes.io/app"]'


def _container(name: str, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "image": f"example.com/{name}:1",
        "securityContext": copy.deepcopy(RESTRICTED_CONTEXT),
        **fields,
    }


def compliant_pod() -> dict[str, Any]:
    return {
        "metadata": {"name": "web", "namespace": "default", "annotations": {}},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "initContainers": [_container("init")],
            "containers": [
                _container("app", ports=[{"containerPort": 8080}]),
                _container("sidecar"),
            ],
            "volumes": [
                {"name": "config", "configMap": {"name": "web"}},
                {"name": "logs", "emptyDir": {}},
            ],
        },
    }


_TOKEN = re.compile(r'\.?(\w+)|\[(\d+)\]|\["([^"]+)"\]')


def _keys(path: str) -> list[str | int]:
    """`spec.containers[1].ports`, `metadata.annotations["a/b"]` -> keys and list indices."""
    keys: list[str | int] = []
    position = 0
    while position < len(path):
        match = _TOKEN.match(path, position)
        assert match, f"bad path {path!r} at {position}"
        name, index, quoted = match.groups()
        keys.append(int(index) if index is not None else name or quoted)
        position = match.end()
    return keys


def edited(edits: Edits) -> dict[str, Any]:
    """The compliant pod with each (path, value) set, creating parents; DELETE removes the field."""
    pod = compliant_pod()
    for path, value in edits:
        *parents, last = _keys(path)
        node: Any = pod
        for key, child in zip(parents, [*parents[1:], last], strict=True):
            if isinstance(key, str) and key not in node:
                node[key] = [] if isinstance(child, int) else {}
            node = node[key]
        if value is DELETE:
            del node[last]
        elif isinstance(node, list) and last == len(node):
            node.append(value)
        else:
            node[last] = value
    return pod


def _each_container(field: str, value: Any) -> Edits:
    """Set `field` (relative to the container) on all three containers of the compliant pod."""
    return [
        (f"spec.{kind}[{index}].{field}", value)
        for kind, index in (("initContainers", 0), ("containers", 0), ("containers", 1))
    ]


def _all_three(message: str) -> list[str]:
    """`message` (about `{c}`) for each container of the compliant pod, in reporting order."""
    return [
        message.format(c=container)
        for container in ("spec.initContainers[0]", "spec.containers[0]", "spec.containers[1]")
    ]


CASES = [
    pytest.param([], [], id="compliant-pod"),
    # allowPrivilegeEscalation
    pytest.param(
        [("spec.containers[1].securityContext.allowPrivilegeEscalation", DELETE)],
        ["spec.containers[1].securityContext.allowPrivilegeEscalation: must be false"],
        id="allowPrivilegeEscalation-missing",
    ),
    pytest.param(
        [("spec.containers[1].securityContext.allowPrivilegeEscalation", True)],
        ["spec.containers[1].securityContext.allowPrivilegeEscalation: must be false"],
        id="allowPrivilegeEscalation-true",
    ),
    # runAsNonRoot
    pytest.param(
        [("spec.securityContext.runAsNonRoot", DELETE)],
        _all_three(
            "{c}.securityContext.runAsNonRoot: must be true "
            "(not set here or at spec.securityContext.runAsNonRoot)"
        ),
        id="runAsNonRoot-unset-everywhere",
    ),
    pytest.param(
        [
            ("spec.securityContext.runAsNonRoot", DELETE),
            *_each_container("securityContext.runAsNonRoot", True),
        ],
        [],
        id="runAsNonRoot-only-on-every-container-ok",
    ),
    pytest.param(
        [("spec.containers[0].securityContext.runAsNonRoot", False)],
        ["spec.containers[0].securityContext.runAsNonRoot: must be true"],
        id="runAsNonRoot-container-overrides-pod-to-false",
    ),
    pytest.param(
        [("spec.securityContext.runAsNonRoot", False)],
        [
            "spec.securityContext.runAsNonRoot: must be true",
            *_all_three(
                "{c}.securityContext.runAsNonRoot: must be true "
                "(inherited from spec.securityContext.runAsNonRoot)"
            ),
        ],
        id="runAsNonRoot-false-at-pod-level",
    ),
    pytest.param(
        [
            ("spec.securityContext.runAsNonRoot", False),
            *_each_container("securityContext.runAsNonRoot", True),
        ],
        ["spec.securityContext.runAsNonRoot: must be true"],
        id="runAsNonRoot-false-at-pod-level-even-if-overridden",
    ),
    # runAsUser
    pytest.param(
        [("spec.containers[0].securityContext.runAsUser", 1000)], [], id="runAsUser-non-zero-ok"
    ),
    pytest.param(
        [("spec.containers[0].securityContext.runAsUser", 0)],
        ["spec.containers[0].securityContext.runAsUser: must not be 0"],
        id="runAsUser-0-on-container",
    ),
    pytest.param(
        [("spec.securityContext.runAsUser", 0)],
        [
            "spec.securityContext.runAsUser: must not be 0",
            *_all_three(
                "{c}.securityContext.runAsUser: must not be 0 "
                "(inherited from spec.securityContext.runAsUser)"
            ),
        ],
        id="runAsUser-0-at-pod-level",
    ),
    # seccomp
    pytest.param(
        [("spec.containers[1].securityContext.seccompProfile", {"type": "Unconfined"})],
        [
            "spec.containers[1].securityContext.seccompProfile.type: "
            'must be RuntimeDefault or Localhost, not "Unconfined"'
        ],
        id="seccomp-unconfined-on-container-under-runtime-default-pod",
    ),
    pytest.param(
        [
            (
                "spec.containers[1].securityContext.seccompProfile",
                {"type": "Localhost", "localhostProfile": "profiles/sidecar.json"},
            )
        ],
        [],
        id="seccomp-localhost-on-container-ok",
    ),
    pytest.param(
        [("spec.securityContext.seccompProfile", DELETE)],
        _all_three(
            "{c}.securityContext.seccompProfile.type: must be RuntimeDefault or Localhost "
            "(not set here or at spec.securityContext.seccompProfile.type)"
        ),
        id="seccomp-unset-everywhere",
    ),
    pytest.param(
        [
            ("spec.securityContext.seccompProfile", DELETE),
            *_each_container("securityContext.seccompProfile", {"type": "RuntimeDefault"}),
        ],
        [],
        id="seccomp-only-on-every-container-ok",
    ),
    pytest.param(
        [
            ("spec.securityContext.seccompProfile", {"type": "Unconfined"}),
            *_each_container("securityContext.seccompProfile", {"type": "RuntimeDefault"}),
        ],
        [
            "spec.securityContext.seccompProfile.type: "
            'must be RuntimeDefault or Localhost, not "Unconfined"'
        ],
        id="seccomp-unconfined-at-pod-level-even-if-overridden",
    ),
    # capabilities
    pytest.param(
        [("spec.containers[1].securityContext.capabilities", DELETE)],
        ['spec.containers[1].securityContext.capabilities.drop: must include "ALL"'],
        id="capabilities-not-dropping-ALL",
    ),
    pytest.param(
        [("spec.containers[1].securityContext.capabilities.drop", ["NET_RAW"])],
        ['spec.containers[1].securityContext.capabilities.drop: must include "ALL"'],
        id="capabilities-dropping-only-NET_RAW",
    ),
    pytest.param(
        [("spec.containers[0].securityContext.capabilities.add", ["NET_ADMIN"])],
        [
            "spec.containers[0].securityContext.capabilities.add[0]: "
            'only NET_BIND_SERVICE may be added, not "NET_ADMIN"'
        ],
        id="capabilities-adding-NET_ADMIN",
    ),
    pytest.param(
        [("spec.containers[0].securityContext.capabilities.add", ["NET_BIND_SERVICE"])],
        [],
        id="capabilities-adding-NET_BIND_SERVICE-ok",
    ),
    pytest.param(
        [("spec.containers[0].securityContext.capabilities.add", ["NET_BIND_SERVICE", "CHOWN"])],
        [
            "spec.containers[0].securityContext.capabilities.add[1]: "
            'only NET_BIND_SERVICE may be added, not "CHOWN"'
        ],
        id="capabilities-adding-baseline-default-CHOWN",
    ),
    # privileged, hostProcess, procMount
    pytest.param(
        [("spec.containers[0].securityContext.privileged", True)],
        ["spec.containers[0].securityContext.privileged: must not be true"],
        id="privileged",
    ),
    pytest.param(
        [("spec.containers[0].securityContext.privileged", False)], [], id="privileged-false-ok"
    ),
    pytest.param(
        [("spec.containers[0].securityContext.windowsOptions", {"hostProcess": True})],
        ["spec.containers[0].securityContext.windowsOptions.hostProcess: must not be true"],
        id="hostProcess",
    ),
    pytest.param(
        [("spec.containers[0].securityContext.procMount", "Unmasked")],
        ['spec.containers[0].securityContext.procMount: must be unset or Default, not "Unmasked"'],
        id="procMount-unmasked",
    ),
    pytest.param(
        [("spec.containers[0].securityContext.procMount", "Default")], [], id="procMount-default-ok"
    ),
    # host namespaces and ports
    pytest.param(
        [("spec.hostNetwork", True)], ["spec.hostNetwork: must not be true"], id="hostNetwork"
    ),
    pytest.param([("spec.hostPID", True)], ["spec.hostPID: must not be true"], id="hostPID"),
    pytest.param([("spec.hostIPC", True)], ["spec.hostIPC: must not be true"], id="hostIPC"),
    pytest.param(
        [("spec.hostNetwork", False), ("spec.hostPID", False), ("spec.hostIPC", False)],
        [],
        id="host-namespaces-false-ok",
    ),
    pytest.param(
        [("spec.containers[0].ports[0].hostPort", 8080)],
        ["spec.containers[0].ports[0].hostPort: must be unset or 0, not 8080"],
        id="hostPort",
    ),
    pytest.param([("spec.containers[0].ports[0].hostPort", 0)], [], id="hostPort-0-ok"),
    # probe and lifecycle hosts
    pytest.param(
        [("spec.containers[0].livenessProbe", {"httpGet": {"host": "10.0.0.1", "port": 8080}})],
        ['spec.containers[0].livenessProbe.httpGet.host: must be unset or empty, not "10.0.0.1"'],
        id="probe-host",
    ),
    pytest.param(
        [("spec.containers[0].readinessProbe", {"tcpSocket": {"host": "", "port": 8080}})],
        [],
        id="probe-host-empty-ok",
    ),
    pytest.param(
        [
            (
                "spec.initContainers[0].lifecycle",
                {"preStop": {"httpGet": {"host": "metadata", "port": 80}}},
            )
        ],
        [
            "spec.initContainers[0].lifecycle.preStop.httpGet.host: "
            'must be unset or empty, not "metadata"'
        ],
        id="lifecycle-host",
    ),
    # AppArmor
    pytest.param(
        [("spec.containers[0].securityContext.appArmorProfile", {"type": "Unconfined"})],
        [
            "spec.containers[0].securityContext.appArmorProfile.type: "
            'must be unset, RuntimeDefault or Localhost, not "Unconfined"'
        ],
        id="apparmor-unconfined-on-container",
    ),
    pytest.param(
        [("spec.securityContext.appArmorProfile", {"type": "Unconfined"})],
        [
            "spec.securityContext.appArmorProfile.type: "
            'must be unset, RuntimeDefault or Localhost, not "Unconfined"',
            *_all_three(
                "{c}.securityContext.appArmorProfile.type: "
                'must be unset, RuntimeDefault or Localhost, not "Unconfined" '
                "(inherited from spec.securityContext.appArmorProfile.type)"
            ),
        ],
        id="apparmor-unconfined-at-pod-level",
    ),
    pytest.param(
        [
            ("spec.securityContext.appArmorProfile", {"type": "RuntimeDefault"}),
            (APPARMOR_APP, "localhost/web"),
        ],
        [],
        id="apparmor-runtime-default-and-localhost-annotation-ok",
    ),
    pytest.param(
        [(APPARMOR_APP, "unconfined")],
        [
            f"{APPARMOR_APP}: must be empty, runtime/default or localhost/<profile>, "
            'not "unconfined"'
        ],
        id="apparmor-annotation-unconfined",
    ),
    # SELinux
    pytest.param(
        [("spec.containers[0].securityContext.seLinuxOptions", {"type": "spc_t"})],
        [
            "spec.containers[0].securityContext.seLinuxOptions.type: must be unset, container_t, "
            'container_init_t, container_kvm_t or container_engine_t, not "spc_t"'
        ],
        id="selinux-type-spc_t",
    ),
    pytest.param(
        [
            (
                "spec.securityContext.seLinuxOptions",
                {"type": "container_engine_t", "level": "s0:c1,c2"},
            )
        ],
        [],
        id="selinux-allowed-type-and-level-ok",
    ),
    pytest.param(
        [
            (
                "spec.initContainers[0].securityContext.seLinuxOptions",
                {"user": "system_u", "role": "system_r"},
            )
        ],
        [
            "spec.initContainers[0].securityContext.seLinuxOptions.user: "
            'must be unset or empty, not "system_u"',
            "spec.initContainers[0].securityContext.seLinuxOptions.role: "
            'must be unset or empty, not "system_r"',
        ],
        id="selinux-user-and-role",
    ),
    # sysctls
    pytest.param(
        [
            (
                "spec.securityContext.sysctls",
                [
                    {"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"},
                    {"name": "kernel.msgmax", "value": "65536"},
                ],
            )
        ],
        [
            "spec.securityContext.sysctls[1].name: "
            'must be one of the safe sysctls, not "kernel.msgmax"'
        ],
        id="sysctl-unsafe",
    ),
    # volumes
    pytest.param(
        [("spec.volumes[2]", {"name": "host-logs", "hostPath": {"path": "/var/log"}})],
        ["spec.volumes[2].hostPath: volume type hostPath is not allowed by the restricted profile"],
        id="hostPath-volume",
    ),
    pytest.param(
        [("spec.volumes[2]", {"name": "share", "nfs": {"server": "nfs.local", "path": "/share"}})],
        ["spec.volumes[2].nfs: volume type nfs is not allowed by the restricted profile"],
        id="nfs-volume",
    ),
    pytest.param(
        [("spec.volumes[2]", {"name": "tools", "image": {"reference": "example.com/tools:1"}})],
        ["spec.volumes[2].image: volume type image is not allowed by the restricted profile"],
        id="image-volume-not-on-the-page",
    ),
    pytest.param(
        [
            ("spec.volumes[2]", {"name": "data", "persistentVolumeClaim": {"claimName": "data"}}),
            ("spec.volumes[3]", {"name": "token", "projected": {"sources": []}}),
            ("spec.volumes[4]", {"name": "tls", "secret": {"secretName": "tls"}}),
            ("spec.volumes[5]", {"name": "info", "downwardAPI": {"items": []}}),
            ("spec.volumes[6]", {"name": "csi", "csi": {"driver": "inline.storage.k8s.io"}}),
            (
                "spec.volumes[7]",
                {"name": "scratch", "ephemeral": {"volumeClaimTemplate": SCRATCH_CLAIM}},
            ),
            ("spec.volumes[8]", {"name": "defaulted-to-emptyDir"}),
        ],
        [],
        id="allowed-volume-types-ok",
    ),
    # init and ephemeral containers
    pytest.param(
        [("spec.initContainers[0].securityContext.allowPrivilegeEscalation", DELETE)],
        ["spec.initContainers[0].securityContext.allowPrivilegeEscalation: must be false"],
        id="init-container-violation",
    ),
    pytest.param(
        [("spec.ephemeralContainers", [{"name": "debugger", "image": "example.com/debug:1"}])],
        [
            "spec.ephemeralContainers[0].securityContext.allowPrivilegeEscalation: must be false",
            'spec.ephemeralContainers[0].securityContext.capabilities.drop: must include "ALL"',
        ],
        id="ephemeral-container-violation",
    ),
    # OS-specific controls
    pytest.param(
        [
            ("spec.os", {"name": "windows"}),
            ("spec.securityContext.seccompProfile", DELETE),
            *_each_container("securityContext", DELETE),
        ],
        [],
        id="windows-pod-exempt-from-linux-only-controls",
    ),
    pytest.param(
        [
            ("spec.os", {"name": "windows"}),
            ("spec.securityContext", DELETE),
            *_each_container("securityContext", DELETE),
        ],
        _all_three(
            "{c}.securityContext.runAsNonRoot: must be true "
            "(not set here or at spec.securityContext.runAsNonRoot)"
        ),
        id="windows-pod-still-runs-as-non-root",
    ),
]


@pytest.mark.parametrize(("edits", "expected"), CASES)
def test_restricted_violations(edits: Edits, expected: list[str]) -> None:
    assert restricted_violations(edited(edits)) == expected


@pytest.mark.parametrize(("edits", "expected"), CASES)
def test_case_pods_are_valid_kubernetes_objects(edits: Edits, expected: list[str]) -> None:
    validate_strict(as_pod(edited(edits)))


@pytest.mark.parametrize(("edits", "expected"), CASES)
def test_parts_checked_one_by_one_add_up_to_the_whole(edits: Edits, expected: list[str]) -> None:
    """The whole-pod report is the pod-level violations followed by exactly what checking each
    container, then each volume, on its own reports."""
    pod = edited(edits)
    spec = pod["spec"]
    parts = [
        violation
        for kind in ("initContainers", "containers", "ephemeralContainers")
        for container in spec.get(kind, [])
        for violation in container_violations(pod, container["name"])
    ]
    parts += [v for volume in spec["volumes"] for v in volume_violations(pod, volume["name"])]
    whole = restricted_violations(pod)
    pod_level, tail = whole[: len(whole) - len(parts)], whole[len(whole) - len(parts) :]
    assert tail == parts
    assert not [v for v in pod_level if v.startswith(("spec.volumes", *PART_PREFIXES))]


@pytest.mark.parametrize(
    ("edits", "name", "expected"),
    [
        pytest.param(
            [
                ("spec.hostNetwork", True),
                ("spec.containers[0].securityContext", {"privileged": True}),
            ],
            "sidecar",
            [],
            id="injected-container-compliant-while-app-is-not",
        ),
        pytest.param(
            [
                ("spec.hostNetwork", True),
                ("spec.containers[0].securityContext", {"privileged": True}),
            ],
            "app",
            [
                "spec.containers[0].securityContext.privileged: must not be true",
                "spec.containers[0].securityContext.allowPrivilegeEscalation: must be false",
                'spec.containers[0].securityContext.capabilities.drop: must include "ALL"',
            ],
            id="app-container-alone",
        ),
        pytest.param(
            [("spec.securityContext.runAsNonRoot", False)],
            "sidecar",
            [
                "spec.containers[1].securityContext.runAsNonRoot: must be true "
                "(inherited from spec.securityContext.runAsNonRoot)"
            ],
            id="inherits-pod-level-runAsNonRoot-false",
        ),
        pytest.param(
            [
                ("spec.securityContext.runAsNonRoot", False),
                ("spec.containers[1].securityContext.runAsNonRoot", True),
            ],
            "sidecar",
            [],
            id="own-runAsNonRoot-overrides-pod-level",
        ),
        pytest.param(
            [("spec.securityContext.seccompProfile", DELETE)],
            "sidecar",
            [
                "spec.containers[1].securityContext.seccompProfile.type: must be RuntimeDefault or "
                "Localhost (not set here or at spec.securityContext.seccompProfile.type)"
            ],
            id="needs-seccomp-when-pod-sets-none",
        ),
        pytest.param(
            [(APPARMOR_APP, "unconfined")],
            "sidecar",
            [],
            id="another-containers-apparmor-annotation",
        ),
        pytest.param(
            [(APPARMOR_APP, "unconfined")],
            "app",
            [
                f"{APPARMOR_APP}: must be empty, runtime/default or localhost/<profile>, "
                'not "unconfined"'
            ],
            id="own-apparmor-annotation",
        ),
        pytest.param(
            [("spec.initContainers[0].securityContext.runAsUser", 0)],
            "init",
            ["spec.initContainers[0].securityContext.runAsUser: must not be 0"],
            id="init-container",
        ),
        pytest.param(
            [("spec.ephemeralContainers", [{"name": "debugger", "image": "example.com/debug:1"}])],
            "debugger",
            [
                "spec.ephemeralContainers[0].securityContext.allowPrivilegeEscalation: "
                "must be false",
                'spec.ephemeralContainers[0].securityContext.capabilities.drop: must include "ALL"',
            ],
            id="ephemeral-container",
        ),
    ],
)
def test_container_violations(edits: Edits, name: str, expected: list[str]) -> None:
    assert container_violations(edited(edits), name) == expected


def test_pod_level_violations_belong_to_no_container() -> None:
    orphan = 'metadata.annotations["container.apparmor.security.beta.kubernetes.io/gone"]'
    pod = edited([("spec.hostPID", True), (orphan, "unconfined")])
    assert restricted_violations(pod) == [
        "spec.hostPID: must not be true",
        f'{orphan}: must be empty, runtime/default or localhost/<profile>, not "unconfined"',
    ]
    assert [container_violations(pod, name) for name in ("init", "app", "sidecar")] == [[], [], []]


@pytest.mark.parametrize(
    ("edits", "name", "expected"),
    [
        pytest.param([], "config", [], id="configMap"),
        pytest.param(
            [("spec.volumes[2]", {"name": "host-logs", "hostPath": {"path": "/var/log"}})],
            "host-logs",
            [
                "spec.volumes[2].hostPath: "
                "volume type hostPath is not allowed by the restricted profile"
            ],
            id="hostPath",
        ),
        pytest.param(
            [("spec.volumes[2]", {"name": "host-logs", "hostPath": {"path": "/var/log"}})],
            "logs",
            [],
            id="emptyDir-beside-hostPath",
        ),
    ],
)
def test_volume_violations(edits: Edits, name: str, expected: list[str]) -> None:
    assert volume_violations(edited(edits), name) == expected


def test_unknown_names_are_errors_not_silent_passes() -> None:
    with pytest.raises(ValueError, match="no container named 'log-watcher'"):
        container_violations(compliant_pod(), "log-watcher")
    with pytest.raises(ValueError, match="no volume named 'envoy-config'"):
        volume_violations(compliant_pod(), "envoy-config")
