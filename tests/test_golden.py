"""Golden AdmissionReviews: `fixtures/<case>.yaml` is a request, `<case>.injected.yaml` the answer.

Each request goes through the whole envelope (`webhook.admission.review`, as the HTTP route
calls it); the patch is applied with `jsonpatch` and the resulting pod compared with the
golden one, validated strictly against the Kubernetes schema, and injected again to show that
a second pass changes nothing; every ambassador's bootstrap passes the real `envoy --mode validate`
with the container's exact arguments. Regenerate after an intended change with
`OUTRIGGER_REGENERATE=1 make test` and review the diff; a golden without a request fails.
Requests named `classic-*` run under the default policy in classic placement
(`nativeSidecars: false`), `platform-*` under the docs' platform policy, the others under
the default policy itself.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import jsonpatch
import orjson
import pytest
import yaml

from tests.conftest import FIXTURES, as_pod, validate_strict
from tests.envoy_schema import validate_bootstrap
from tests.pod_security import container_violations
from tests.real_envoy import IS_ROOT, ambassadors, validate_pod
from webhook.admission.review import review
from webhook.core.policy import Policy, default_policy, load_policy, parse_policy

REGENERATE = os.environ.get("OUTRIGGER_REGENERATE") == "1"
REQUESTS = sorted(p for p in FIXTURES.glob("*.yaml") if not p.name.endswith(".injected.yaml"))


def outcome(request: dict[str, Any], policy: Policy) -> dict[str, Any]:
    """What the webhook's answer means: the resulting pod, or the denial."""
    status, body = review(orjson.dumps(request), policy)
    assert status == 200
    answer = orjson.loads(body)
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == request["request"]["uid"]
    if not response["allowed"]:
        return {"allowed": False, "status": response["status"]}
    result: dict[str, Any] = {"allowed": True}
    if "patch" in response:
        assert response["patchType"] == "JSONPatch"
        operations = orjson.loads(base64.b64decode(response["patch"]))
        result["pod"] = jsonpatch.apply_patch(request["request"]["object"], operations)
    if response.get("warnings"):
        result["warnings"] = response["warnings"]
    return result


PLATFORM = load_policy(FIXTURES / "policies" / "good-platform-team.yaml")
CLASSIC = parse_policy({**default_policy().model_dump(mode="json"), "nativeSidecars": False})


@pytest.mark.parametrize("request_file", REQUESTS, ids=lambda p: p.stem)
def test_golden(request_file: Path, policy: Policy) -> None:
    if request_file.name.startswith("classic-"):
        policy = CLASSIC
    elif request_file.name.startswith("platform-"):
        policy = PLATFORM
    request = yaml.safe_load(request_file.read_text())
    result = outcome(request, policy)
    golden = request_file.with_name(request_file.stem + ".injected.yaml")
    if request_file.name.startswith("already-injected"):
        # It must stay a pod the webhook leaves alone: rebuild it from the current seed golden
        # (and the API server's defaults) when the default policy's version changes.
        assert result == {"allowed": True}, "already-injected.yaml is stale: rebuild it"
    if REGENERATE:
        golden.write_text(yaml.safe_dump(result, sort_keys=False, width=1 << 16))
    assert result == yaml.safe_load(golden.read_text())
    if "pod" in result:
        validate_strict(as_pod(result["pod"]))
        for container in ambassadors(result["pod"]):
            validate_bootstrap(orjson.loads(container["args"][1]))
        if IS_ROOT:  # Envoy opens the files at the ambassador's absolute mount paths
            validate_pod(result["pod"])
        status = orjson.loads(result["pod"]["metadata"]["annotations"]["outrigger.dev/status"])
        for name in status["injected"]:  # the app's own containers are the app's business
            assert container_violations(as_pod(result["pod"]), name) == []
        again = {**request, "request": {**request["request"], "object": result["pod"]}}
        assert outcome(again, policy) == {"allowed": True}


def test_every_golden_has_a_request() -> None:
    goldens = {p.name.removesuffix(".injected.yaml") for p in FIXTURES.glob("*.injected.yaml")}
    assert goldens == {p.stem for p in REQUESTS}
    assert len(REQUESTS) >= 10
