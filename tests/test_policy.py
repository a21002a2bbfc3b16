"""Policy loading: the embedded default, custom files, and errors that name the bad field."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FIXTURES
from webhook.policy import PolicyError, default_policy, is_pinned_image, load_policy

POLICIES = FIXTURES / "policies"


def test_default_policy_defines_both_sidecars_with_pinned_images() -> None:
    policy = default_policy()
    assert policy.available_sidecars == {"log-watcher", "ambassador"}
    assert is_pinned_image(policy.sidecars.log_watcher.image)
    assert is_pinned_image(policy.sidecars.ambassador.image)


def test_custom_policy_is_loaded() -> None:
    policy = load_policy(POLICIES / "good-custom-images.yaml")
    assert policy.excludes("batch") and policy.excludes("kube-system")
    assert not policy.excludes("shop")
    assert policy.sidecars.ambassador.adminPort == 15000
    assert policy.version != default_policy().version


@pytest.mark.parametrize(
    ("name", "errors"),
    [
        (
            "bad-latest-image.yaml",
            ["sidecars.log-watcher.image: Value error, image 'fluent/fluent-bit:latest' must be"],
        ),
        (
            "bad-unknown-field.yaml",
            [
                "sidecars.log-watcher.privileged: Extra inputs are not permitted",
                "sidecars.ambassador.adminPort: Input should be greater than",
            ],
        ),
    ],
)
def test_bad_policies_name_the_field(name: str, errors: list[str]) -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy(POLICIES / name)
    for error in errors:
        assert error in str(caught.value)


def test_unreadable_policy(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy"):
        load_policy(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("sidecars: [unclosed")
    with pytest.raises(PolicyError, match="cannot read policy"):
        load_policy(broken)


@pytest.mark.parametrize(
    ("image", "pinned"),
    [
        ("envoyproxy/envoy:v1.32.6", True),
        ("localhost:5000/team/envoy:1.0", True),
        ("envoy@sha256:" + "a" * 64, True),
        ("envoy:latest", False),
        ("envoy", False),
        ("localhost:5000/envoy", False),
        ("Envoy:1.0", False),
        ("envoy:1.0@sha256:short", False),
    ],
)
def test_pinned_images(image: str, pinned: bool) -> None:
    assert is_pinned_image(image) is pinned
