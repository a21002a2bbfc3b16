"""Per-sidecar resources within the policy's bounds (`webhook.core.sidecarresources`).

Merging (field by field, a limit removed where the policy allows it), the denials for each
bound, strict validation and idempotence of the pods, the Envoy worker count and the Fluent
Bit buffer that follow the resources; then the real Envoy started with the derived
`--concurrency`, and the real Fluent Bit in a 48Mi memory cgroup under a 1 MB/s backlog.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import as_pod, validate_strict
from tests.kube_env import ControlPlane
from tests.kube_webhook import Webhook, selected_namespace

# The API-server tier's webhooks, one per placement, and the namespaces they select.
from tests.test_kube_admission import app_pod, create, selected, webhooks  # noqa: F401
from webhook.core.injector import InjectionDenied, RequestContext, inject
from webhook.core.policy import PolicyError, default_policy, parse_policy
from webhook.core.selection import ALREADY_INJECTED
from webhook.core.sidecarresources import canonical_quantity
from webhook.core.templates import envoy_concurrency, mem_buf_limit

POLICY = default_policy()
LOG = "outrigger.dev/log-watcher-"
AMB = "outrigger.dev/ambassador-"


def pod(annotations: dict[str, str], inject_: str = "log-watcher,ambassador") -> dict[str, Any]:
    return {
        "metadata": {
            "name": "web",
            "annotations": {
                "outrigger.dev/inject": inject_,
                "outrigger.dev/ambassador-upstream": "api.example.com:443",
                **annotations,
            },
        },
        "spec": {"containers": [{"name": "app", "image": "registry.example.com/app:1"}]},
    }


def sidecar(injected: dict[str, Any], name: str) -> dict[str, Any]:
    spec = injected["spec"]
    return next(
        c for c in [*spec.get("initContainers", ()), *spec["containers"]] if c["name"] == name
    )


def injected(annotations: dict[str, str], **options: Any) -> dict[str, Any]:
    result: dict[str, Any] = inject(pod(annotations, **options), RequestContext("shop"), POLICY).pod
    return result


def denial(annotations: dict[str, str]) -> str:
    with pytest.raises(InjectionDenied) as denied:
        inject(pod(annotations), RequestContext("shop"), POLICY)
    assert denied.value.reason == "invalid-annotation"
    return str(denied.value)


# Merging --------------------------------------------------------------------------------------


def test_without_overrides_the_template_s_resources_are_kept() -> None:
    result = injected({})
    assert sidecar(result, "log-watcher")["resources"] == {
        "requests": {"cpu": "10m", "memory": "32Mi", "ephemeral-storage": "64Mi"},
        "limits": {"cpu": "200m", "memory": "128Mi"},
    }


def test_one_field_is_set_and_the_others_kept() -> None:
    result = injected({LOG + "memory-limit": "96Mi"})
    assert sidecar(result, "log-watcher")["resources"] == {
        "requests": {"cpu": "10m", "memory": "32Mi", "ephemeral-storage": "64Mi"},
        "limits": {"cpu": "200m", "memory": "96Mi"},
    }
    assert (
        sidecar(result, "ambassador")["resources"]
        == sidecar(injected({}), "ambassador")["resources"]
    )
    validate_strict(as_pod(result))


def test_both_sidecars_sized_and_limits_removed_where_allowed() -> None:
    result = injected(
        {
            LOG + "cpu-request": "50m",
            LOG + "cpu-limit": "none",
            LOG + "memory-request": "64Mi",
            LOG + "memory-limit": "256Mi",
            AMB + "cpu-limit": "2",
            AMB + "memory-limit": "512Mi",
            AMB + "ephemeral-storage-limit": "1Gi",
        }
    )
    assert sidecar(result, "log-watcher")["resources"] == {
        "requests": {"cpu": "50m", "memory": "64Mi", "ephemeral-storage": "64Mi"},
        "limits": {"memory": "256Mi"},
    }
    assert sidecar(result, "ambassador")["resources"] == {
        "requests": {"cpu": "50m", "memory": "64Mi", "ephemeral-storage": "32Mi"},
        "limits": {"cpu": "2", "memory": "512Mi", "ephemeral-storage": "1Gi"},
    }
    validate_strict(as_pod(result))


@pytest.mark.parametrize(
    ("written", "stored"),
    [("1024Mi", "1Gi"), ("0.5", "500m"), ("2000M", "2G"), ("1.5Gi", "1536Mi"), ("250m", "250m")],
)
def test_values_are_written_as_the_api_server_stores_them(written: str, stored: str) -> None:
    assert canonical_quantity(written) == stored


# Denials --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("annotations", "said"),
    [
        ({LOG + "cpu-limit": "10m"}, "from 50m to 2"),
        ({LOG + "cpu-limit": "64"}, "from 50m to 2"),
        ({LOG + "memory-limit": "32Mi"}, "from 48Mi to 1Gi"),
        ({LOG + "memory-request": "2Gi"}, "from 16Mi to 512Mi"),
        ({LOG + "memory-limit": "12 apples"}, "bytes such as 96Mi, 1Gi or 500M"),
        ({LOG + "memory-limit": "1e9"}, "bytes such as 96Mi"),
        ({LOG + "cpu-limit": "-1"}, "a CPU quantity such as 250m or 1.5, from 50m to 2"),
        ({LOG + "memory-limit": "none"}, "from 48Mi to 1Gi"),  # not removable
        ({AMB + "cpu-limit": "50m"}, "from 100m to 4"),
    ],
)
def test_a_value_outside_what_the_policy_accepts_is_denied_naming_both(
    annotations: dict[str, str], said: str
) -> None:
    message = denial(annotations)
    (key,) = annotations
    assert key in message and said in message


def test_removal_is_offered_where_the_policy_allows_it() -> None:
    message = denial({LOG + "cpu-limit": "lots"})
    assert '"none" to remove the limit' in message


def test_a_request_above_its_limit_is_denied_naming_the_annotations() -> None:
    message = denial({LOG + "memory-request": "256Mi"})  # the template's limit is 128Mi
    assert LOG + "memory-request" in message and "above its limit (128Mi)" in message
    assert LOG + "memory-limit" in message  # what else to set
    both = denial({LOG + "memory-request": "512Mi", LOG + "memory-limit": "256Mi"})
    assert LOG + "memory-request and " + LOG + "memory-limit" in both


def test_every_problem_is_reported_at_once() -> None:
    message = denial(
        {
            LOG + "cpu-limit": "10m",
            AMB + "memory-limit": "1Ti",
            "outrigger.dev/log-path": "relative",
        }
    )
    assert all(
        key in message
        for key in (LOG + "cpu-limit", AMB + "memory-limit", "outrigger.dev/log-path")
    )


def test_a_policy_without_bounds_lets_no_pod_set_them() -> None:
    document = POLICY.model_dump(mode="json")
    for template in document["sidecars"]:
        template["resourceOverrides"] = {}
    closed = parse_policy(document)
    with pytest.raises(InjectionDenied) as denied:
        inject(pod({LOG + "memory-limit": "96Mi"}), RequestContext("shop"), closed)
    assert "does not let pods set the memory limit of log-watcher" in str(denied.value)


def test_the_annotations_are_known_not_warned_about() -> None:
    result = inject(pod({LOG + "memory-limit": "96Mi"}), RequestContext("shop"), POLICY)
    assert not [w for w in result.warnings if "memory-limit" in w]
    idle = inject(
        pod({AMB + "memory-limit": "96Mi"}, "log-watcher"), RequestContext("shop"), POLICY
    )
    assert any(
        AMB + "memory-limit" in w and "ambassador is not injected" in w for w in idle.warnings
    )


@pytest.mark.parametrize(
    ("bounds", "said"),
    [
        ({"memory": {"limit": {"min": "1Gi", "max": "2Gi"}}}, "template's own 128Mi is outside"),
        ({"memory": {"limit": {"min": "2Gi", "max": "1Gi"}}}, "min 2Gi is above max 1Gi"),
        ({"memory": {"limit": {"max": "lots"}}}, "is not a Kubernetes quantity"),
        ({"gpu": {"limit": {"max": "1"}}}, "gpu"),
    ],
)
def test_bounds_that_make_no_sense_fail_the_policy(bounds: dict[str, Any], said: str) -> None:
    document = POLICY.model_dump(mode="json")
    document["sidecars"][0]["resourceOverrides"] = bounds
    with pytest.raises(PolicyError) as failed:
        parse_policy(document)
    assert said in str(failed.value) and "resourceOverrides" in str(failed.value)


# What follows from the resources ----------------------------------------------------------------


@pytest.mark.parametrize(("cpu", "workers"), [("250m", 1), ("1", 1), ("2500m", 3), ("2", 2)])
def test_envoy_s_workers_follow_its_cpu_limit(cpu: str, workers: int) -> None:
    args = sidecar(injected({AMB + "cpu-limit": cpu}), "ambassador")["args"]
    assert args[args.index("--concurrency") + 1] == str(workers)
    assert envoy_concurrency(cpu) == workers


def test_without_a_cpu_limit_envoy_s_workers_follow_its_request() -> None:
    args = sidecar(
        injected({AMB + "cpu-limit": "none", AMB + "cpu-request": "1500m"}), "ambassador"
    )["args"]
    assert args[args.index("--concurrency") + 1] == "2"


@pytest.mark.parametrize(
    ("limit", "buffer"), [("48Mi", "12MB"), ("64Mi", "16MB"), ("128Mi", "16MB"), ("1Gi", "16MB")]
)
def test_fluent_bit_s_buffer_stays_within_its_memory(limit: str, buffer: str) -> None:
    result = injected({LOG + "memory-limit": limit}, inject_="log-watcher")
    config = result["metadata"]["annotations"]["log-watcher.outrigger.dev/fluent-bit.yaml"]
    assert f"mem_buf_limit: {buffer}" in config
    assert mem_buf_limit("16MB", limit) == buffer


def test_explain_says_where_each_value_came_from() -> None:
    result = inject(
        pod({LOG + "memory-limit": "96Mi", AMB + "cpu-limit": "none"}),
        RequestContext("shop"),
        POLICY,
    )
    lines = "\n".join(result.explanation)
    assert f"memory limit 96Mi ({LOG}memory-limit)" in lines
    assert "cpu request 10m (template)" in lines
    assert f"cpu limit removed ({AMB}cpu-limit)" in lines
    assert "Envoy --concurrency 1 (from the cpu request 50m)" in lines
    assert "Fluent Bit mem_buf_limit 16MB" in lines


def test_pod_level_resources_are_raised_by_the_overridden_values() -> None:
    asked = pod({LOG + "memory-limit": "96Mi", LOG + "memory-request": "64Mi"}, "log-watcher")
    asked["spec"]["resources"] = {"requests": {"memory": "1Gi"}, "limits": {"memory": "2Gi"}}
    result = inject(asked, RequestContext("shop"), POLICY).pod
    assert result["spec"]["resources"] == {
        "requests": {"memory": "1088Mi"},
        "limits": {"memory": "2144Mi"},
    }
    again = inject(result, RequestContext("shop"), POLICY)
    assert again.pod == result


# Idempotence --------------------------------------------------------------------------------------

QUANTITIES = {
    LOG + "cpu-limit": st.sampled_from(["50m", "200m", "1", "1500m", "none"]),
    LOG + "memory-limit": st.sampled_from(["128Mi", "256Mi", "1Gi", "300M"]),
    AMB + "memory-request": st.sampled_from(["32Mi", "64Mi", "100M"]),
    AMB + "cpu-limit": st.sampled_from(["100m", "0.5", "2", "none"]),
}


@settings(max_examples=60, deadline=None)
@given(st.fixed_dictionaries({}, optional=QUANTITIES))
def test_injecting_twice_equals_once(annotations: dict[str, str]) -> None:
    once = injected(annotations)
    validate_strict(as_pod(once))
    assert inject(once, RequestContext("shop"), POLICY).pod == once


# The real Envoy ---------------------------------------------------------------------------


@pytest.mark.parametrize(("cpu", "workers"), [("250m", 1), ("1", 1), ("2500m", 3)])
def test_the_real_envoy_starts_with_the_derived_workers(
    cpu: str, workers: int, tmp_path: Path
) -> None:
    from tests.real_envoy import IS_ROOT, ambassadors, run_envoy

    if not IS_ROOT:
        pytest.skip("the ambassador runs as uid 101: root only (CI is root)")
    (container,) = ambassadors(injected({AMB + "cpu-limit": cpu, AMB + "upstream": "127.0.0.1:9"}))
    with run_envoy(container, tmp_path / "envoy.log", "http://127.0.0.1:9902/ready"):
        info = json.loads(
            urllib.request.urlopen("http://127.0.0.1:9901/server_info", timeout=5).read()
        )
    assert info["command_line_options"]["concurrency"] == workers


# The real Fluent Bit in a memory cgroup --------------------------------------------------


def memory_cgroup() -> Path | None:
    """This process's cgroup v1 memory directory, when it can make a child there."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            directory = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            return directory if os.access(directory, os.W_OK) else None
    return None


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[Path]:
    """A child memory cgroup (removed afterwards); skipped where none can be made."""
    parent = memory_cgroup()
    if parent is None:
        pytest.skip("no writable cgroup v1 memory controller here")
    group = parent / f"outrigger-{os.getpid()}-{tmp_path.name}"
    group.mkdir()
    try:
        yield group
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:  # its last process is still leaving
                time.sleep(0.1)


def oom_kills(group: Path) -> int:
    for line in (group / "memory.oom_control").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


def test_a_48mi_watcher_under_a_1_mb_s_backlog_ships_every_line_without_oom(limited: Path) -> None:
    """The watcher with `outrigger.dev/log-watcher-memory-limit: 48Mi` (its buffer then 12MB)
    runs in a memory cgroup of that limit, as the kubelet would put it, while the app writes
    1 MB a second for 15 s: Fluent Bit is not OOM-killed and ships every line once."""
    from tests.real_fluentbit import Pod, mount_points, skip_reason, watcher_spec

    if skip_reason():
        pytest.skip(skip_reason() or "")
    result = injected({LOG + "memory-limit": "48Mi"}, inject_="log-watcher")
    limit = sidecar(result, "log-watcher")["resources"]["limits"]["memory"]
    assert limit == "48Mi"
    (limited / "memory.limit_in_bytes").write_text(str(48 * 1024 * 1024))
    spec = watcher_spec(result)
    with mount_points(spec):
        _ship_a_backlog(Pod(spec), limited)


def _ship_a_backlog(watcher: Any, limited: Path) -> None:
    from tests.real_fluentbit import numbered, write

    try:
        run = watcher.start()
        (limited / "cgroup.procs").write_text(str(run.process.pid))  # and what it execs
        lines = numbered("backlog " + "x" * 150, 75_000)  # ~15 MB, 200 bytes a line
        log = watcher.logs / "app.log"

        def app() -> None:
            for second in range(15):  # 5,000 lines (1 MB) a second
                write(log, lines[second * 5000 : (second + 1) * 5000])
                time.sleep(1)

        writer = threading.Thread(target=app)
        writer.start()
        writer.join()
        shipped = run.wait_for(len(lines), seconds=120)
        peak = int((limited / "memory.max_usage_in_bytes").read_text())
        print(f"peak {peak / 2**20:.1f} MiB of 48 MiB; {len(shipped)} lines shipped")
        assert run.process.poll() is None, "fluent-bit died"
        assert oom_kills(limited) == 0
        assert sorted(shipped) == sorted(lines)
        assert run.stop() == 0
    finally:
        watcher.close()


# Through the real API server ------------------------------------------------------------------


@pytest.mark.kube
@pytest.mark.parametrize("pod_level", [False, True], ids=["containers", "pod-level"])
def test_a_sized_pod_as_the_api_server_stores_it_is_injected_already(
    kube: ControlPlane,
    webhooks: dict[str, Webhook],  # noqa: F811
    selected: dict[str, str],  # noqa: F811
    pod_level: bool,
) -> None:
    """Values written in other forms than the API server's (1024Mi, 0.5, 200M), a limit
    removed, pod-level resources raised: the stored pod validates, and injecting it again
    changes nothing."""
    namespace = selected_namespace(kube, selected["native"])
    annotations = {
        "outrigger.dev/inject": "log-watcher,ambassador",
        "outrigger.dev/ambassador-upstream": "api.example.com:443",
        LOG + "memory-limit": "1024Mi",
        LOG + "cpu-limit": "none",
        AMB + "cpu-limit": "0.5",
        AMB + "memory-request": "200M",
    }
    spec: dict[str, Any] = {}
    if pod_level:
        spec["resources"] = {"requests": {"memory": "1Gi"}, "limits": {"memory": "4Gi"}}
    stored = create(kube, namespace, app_pod("sized", annotations, **spec))
    validate_strict(stored)
    assert sidecar(stored, "log-watcher")["resources"]["limits"] == {"memory": "1Gi"}
    assert sidecar(stored, "ambassador")["resources"]["limits"]["cpu"] == "500m"
    assert sidecar(stored, "ambassador")["resources"]["requests"]["memory"] == "200M"
    again = inject(stored, RequestContext(namespace), webhooks["native"].policy)
    assert (again.reason, again.pod) == (ALREADY_INJECTED, stored), again.explanation
