"""The annotated workloads in examples/ inject cleanly, validate strictly, and their ambassadors'
bootstraps pass the real `envoy --mode validate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, validate_strict
from tests.real_envoy import IS_ROOT, validate_pod
from webhook.core.policy import Policy
from webhook.core.workloads import inject_workload

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_injects_and_validates(example: Path, policy: Policy) -> None:
    document = yaml.safe_load(example.read_text())
    validate_strict(document)
    injected, injection = inject_workload(document, "default", policy)
    assert injection is not None and injection.injected, injection
    validate_strict(injected)
    if IS_ROOT:  # the real Envoy accepts what the ambassador would start with
        validate_pod(pod_template(injected))


def pod_template(workload: dict[str, Any]) -> dict[str, Any]:
    spec = workload["spec"]
    while "template" not in spec:
        spec = spec["jobTemplate"]["spec"]
    template: dict[str, Any] = spec["template"]
    return template


def test_there_is_an_example_per_pattern() -> None:
    assert {p.stem for p in EXAMPLES} >= {"log-watcher-deployment", "ambassador-deployment"}
