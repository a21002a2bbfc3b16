"""The annotated workloads in examples/ inject cleanly and validate strictly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, validate_strict
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


def test_there_is_an_example_per_pattern() -> None:
    assert {p.stem for p in EXAMPLES} >= {"log-watcher-deployment", "ambassador-deployment"}
