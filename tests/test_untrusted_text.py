"""What a pod's creator (or any client of the webhook's port) writes, and where it comes back.

- Warnings and denial messages, which kubectl prints on its user's terminal, and the decision
  log's `detail` carry no raw control, format (bidi, zero-width) or other unprintable
  character: they are escaped (`webhook.limits.printable`), and so are `outrigger inject
  --explain` and the audit table.
- A body nested a thousand levels deep is a 400 that says so, logged once at WARNING, with no
  traceback.
- Inputs that used to end in "internal error while injecting": an upstream port written with
  many leading zeros, bytes that are no UTF-8 in a pod with `outrigger.dev/status`, values
  nested past what the injector writes, a runAsUser that is an object. Each is now a denial
  or a 400 naming the part, or an answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from tests.conftest import FIXTURES, admission_review, outrigger_executable
from webhook.admission.review import AdmissionRequest, parse, respond_with_verdict, review
from webhook.cluster.audit import render_table
from webhook.core.audit import MISMATCHED, Finding, WorkloadFindings
from webhook.core.policy import Policy, default_policy, load_policy
from webhook.limits import echo
from webhook.serving.app import create_app

DEFAULT = default_policy()
TEAM = load_policy(FIXTURES / "policies" / "good-platform-team.yaml")  # unknownAnnotations: Deny
# Characters a terminal acts on, and how they come out.
HOSTILE = {
    "\n": "\\x0a",
    "\x1b[31m": "\\x1b[31m",
    "\u202e": "\\u202e",
    "\u200b": "\\u200b",
    "\x9b": "\\x9b",
}
UNKNOWN = "outrigger.dev/log-pth"  # a typo: warned about, or denied under TEAM


def pod(annotations: dict[str, str], **spec: Any) -> dict[str, Any]:
    containers = [{"name": "app", "image": "registry.example.com/app:1"}]
    return {
        "metadata": {"name": "web", "annotations": annotations},
        "spec": {"containers": containers, **spec},
    }


def body(sent: dict[str, Any], namespace: str = "shop") -> bytes:
    return orjson.dumps(admission_review(sent, namespace=namespace))


def response_of(raw: bytes, policy: Policy) -> dict[str, Any]:
    status, answer = review(raw, policy)
    assert status == 200, answer
    response: dict[str, Any] = orjson.loads(answer)["response"]
    return response


# Warnings, denials, the decision log ----------------------------------------------------------


@pytest.mark.parametrize("raw", list(HOSTILE), ids=repr)
def test_a_warning_escapes_the_annotation_key_it_quotes(raw: str) -> None:
    key = f"{UNKNOWN}{raw}x"
    response = response_of(body(pod({"outrigger.dev/inject": "log-watcher", key: "/x"})), DEFAULT)
    (warning,) = [w for w in response["warnings"] if UNKNOWN in w]
    assert raw not in warning and f"{UNKNOWN}{HOSTILE[raw]}x" in warning
    assert warning.isprintable()


@pytest.mark.parametrize("raw", list(HOSTILE), ids=repr)
def test_a_denial_and_its_decision_log_detail_escape_the_key(raw: str) -> None:
    key = f"{UNKNOWN}{raw}x"
    request = parse(body(pod({"outrigger.dev/inject": "log-watcher", key: "/x"})))
    assert isinstance(request, AdmissionRequest)
    ((status, answer), verdict) = respond_with_verdict(request, TEAM)
    message = orjson.loads(answer)["response"]["status"]["message"]
    assert status == 200 and verdict.outcome == "denied"
    for text in (message, verdict.message):
        assert raw not in text and f"{UNKNOWN}{HOSTILE[raw]}x" in text
        assert text.isprintable()


def test_a_denial_escapes_what_it_echoes_of_a_value() -> None:
    value = "/var/log/\u202e\x1b[2J"
    response = response_of(body(pod({"outrigger.dev/inject": "log-watcher", **{
        "outrigger.dev/log-path": value,
    }})), DEFAULT)  # fmt: skip
    message = response["status"]["message"]
    assert "outrigger.dev/log-path" in message and message.isprintable()
    assert "\\u202e\\x1b[2J" in message


# Malformed bodies -----------------------------------------------------------------------------


def deep_body(depth: int) -> bytes:
    """A review whose pod holds a value nested `depth` arrays deep."""
    sent = body(pod({"outrigger.dev/inject": "log-watcher"}, dnsConfig="DEEP"))
    return sent.replace(b'"DEEP"', b"[" * depth + b"]" * depth)


def post(raw: bytes) -> httpx.Response:
    app = create_app(lambda: DEFAULT)

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://webhook") as client:
            return await client.post("/mutate", content=raw)

    return asyncio.run(asyncio.wait_for(call(), 30))


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_a_deeply_nested_body_is_a_400_logged_once_without_a_traceback(
    depth: int, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        reply = post(deep_body(depth))
    assert reply.status_code == 400
    assert reply.json() == {
        "error": "body is not an AdmissionReview: its arrays and objects nest too deeply to decode"
    }
    assert [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []
    logged = [r for r in caplog.records if "nest too deeply" in r.getMessage()]
    assert [r.levelno for r in logged] == [logging.WARNING], "one line: the decision log's"


def test_a_body_nested_deep_at_its_top_is_a_400_too(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        status, answer = review(b'{"a":' * 5000 + b"1" + b"}" * 5000, DEFAULT)
    assert status == 400
    assert orjson.loads(answer)["error"] == (
        "body is not an AdmissionReview: its arrays and objects nest too deeply to decode"
    )
    assert caplog.records == []


def test_a_body_nested_within_the_bound_is_answered() -> None:
    assert response_of(deep_body(100), DEFAULT)["allowed"]


# Internal errors that became answers ----------------------------------------------------------


UPSTREAM = "outrigger.dev/ambassador-upstream"
CONFIG = "outrigger.dev/ambassador-config"


@pytest.mark.parametrize(
    "port",
    [
        "0" * 5000,
        "0" * 4301 + "80",
        "1" + "0" * 5000,
        "00080",
        "080",
        "0",
        "+80",
        "\uff18\uff10",
        "65536",
    ],
    ids=lambda port: port if len(port) < 8 else f"{port[:4]}...({len(port)})",
)
def test_an_upstream_port_is_decimal_without_leading_zeros(port: str) -> None:
    asked = {"outrigger.dev/inject": "ambassador"}
    response = response_of(body(pod({**asked, UPSTREAM: f"api.example.com:{port}"})), DEFAULT)
    assert not response["allowed"] and response["status"]["code"] == 400
    message = response["status"]["message"]
    assert UPSTREAM in message and "a port from 1 to 65535 in decimal without leading" in message
    config = f"upstreams: {{api: {{address: 'api.example.com:{port}', port: 9000}}}}"
    response = response_of(body(pod({**asked, CONFIG: config})), DEFAULT)
    assert not response["allowed"] and response["status"]["code"] == 400
    message = response["status"]["message"]
    assert f"{CONFIG}: upstreams.api.address" in message
    assert "a port from 1 to 65535 in decimal without leading" in message


def test_an_upstream_port_as_envoy_writes_it_is_accepted() -> None:
    asked = {"outrigger.dev/inject": "ambassador"}
    for port in ("1", "80", "65535"):
        sent = pod({**asked, UPSTREAM: f"api.example.com:{port}"})
        assert response_of(body(sent), DEFAULT)["allowed"], port


def injected_pod(**changes: Any) -> dict[str, Any]:
    """The golden already-injected pod, with its `outrigger.dev/status`."""
    request = yaml.safe_load((FIXTURES / "already-injected.yaml").read_text())
    sent: dict[str, Any] = request["request"]["object"]
    sent["spec"].update(changes)
    return sent


@pytest.mark.parametrize(
    "raw",
    [b"\xff", b"\xed\xa0\x80", b"\xc0\xaf", b"1e400"],
    ids=["not-utf8", "encoded-surrogate", "overlong", "past-a-double"],
)
def test_a_pod_with_a_status_and_what_json_cannot_hold_is_a_400(raw: bytes) -> None:
    # Unread fields: the partial decoder skips them, the status check reads the whole pod.
    value = b"1e400" if raw == b"1e400" else b'"a' + raw + b'b"'
    sent = body(injected_pod(priorityClassName="MARK")).replace(b'"MARK"', value)
    status, answer = review(sent, DEFAULT)
    assert status == 400
    assert orjson.loads(answer)["error"].startswith("request.object is not valid JSON: ")


@pytest.mark.parametrize(
    "where",
    ["request.userInfo.username", "request.userInfo.extra", "annotation key", "status annotation"],
)
def test_a_lone_surrogate_escape_anywhere_is_a_400(where: str) -> None:
    request = admission_review(injected_pod())
    mark = "OUTRIGGERMARK"
    metadata = request["request"]["object"]["metadata"]
    match where:
        case "request.userInfo.username":
            request["request"]["userInfo"]["username"] = mark
        case "request.userInfo.extra":
            request["request"]["userInfo"]["extra"] = {mark: ["a"]}
        case "annotation key":
            metadata["annotations"][mark] = "a"
        case _:
            metadata["annotations"]["outrigger.dev/status"] = mark
    sent = json.dumps(request).encode().replace(mark.encode(), b"x\\ud800y")
    status, answer = review(sent, DEFAULT)
    assert status == 400 and orjson.loads(answer)["error"].startswith("body is not valid JSON")


def test_a_value_nested_past_what_a_patch_holds_is_denied() -> None:
    # Reinjected (its sidecar's image was changed): the app's own volume, nested 300 deep,
    # moves to where the old sidecar's volume was, so the patch would carry it.
    sent = injected_pod()
    sent["spec"]["volumes"].insert(1, {"name": "data", "emptyDir": "DEEP"})
    sent["spec"]["initContainers"][0]["image"] = "cr.fluentbit.io/fluent/fluent-bit:4.1.0"
    raw = body(sent, "default").replace(b'"DEEP"', b'{"a":' * 300 + b"1" + b"}" * 300)
    response = response_of(raw, DEFAULT)
    assert not response["allowed"] and response["status"]["code"] == 400
    assert response["status"]["message"] == (
        "outrigger: request.object is not a valid Pod: its arrays and objects nest too deeply "
        "to write in a JSON Patch"
    )


def test_a_deep_value_shared_with_the_pod_is_compared_without_recursion() -> None:
    # Already injected, with an app value nested 600 deep: compared by identity, not walked.
    sent = injected_pod()
    sent["spec"]["containers"][0]["args"] = "DEEP"
    raw = body(sent, "default").replace(b'"DEEP"', b"[" * 600 + b"]" * 600)
    assert response_of(raw, DEFAULT) == {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                                         "allowed": True}  # fmt: skip


@pytest.mark.parametrize("user", [{"a": 1}, [1000], "DEEP"], ids=["object", "list", "deep"])
def test_a_run_as_user_of_any_json_is_warned_about(user: Any) -> None:
    sent = pod({"outrigger.dev/inject": "log-watcher"}, securityContext={"runAsUser": user})
    raw = body(sent).replace(b'"DEEP"', b"[" * 600 + b"]" * 600)
    response = response_of(raw, DEFAULT)
    assert response["allowed"] and "patch" in response
    assert any("reads the app's files as user 65534" in w for w in response["warnings"])


def test_echo_shows_a_deep_or_huge_value_bounded() -> None:
    deep: Any = 1
    for _ in range(5000):
        deep = {"a": deep}
    assert echo(deep) == repr("{'a': {'a': {'a': {'a': {...}}}}}")
    assert echo(10**5000) == repr("an integer too long to show")
    assert echo({"a": [1, "x"]}) == repr(str({"a": [1, "x"]}))


# The command line -----------------------------------------------------------------------------


def inject(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    command = [outrigger_executable(), "inject", *map(str, args)]
    return subprocess.run(command, capture_output=True, timeout=60, check=False)


def test_inject_explain_escapes_what_the_manifest_carries(tmp_path: Path) -> None:
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(
        'apiVersion: v1\nkind: Pod\nmetadata:\n  name: "web\\e]0;owned\\a"\n'
        '  annotations: {outrigger.dev/inject: log-watcher, "outrigger.dev/log-pth\\e[31m'
        '\\u202e\\ud800": /x}\nspec: {containers: [{name: a, image: a:1}]}\n'
    )
    result = inject("--explain", "-f", manifest)
    assert result.returncode == 0, result.stderr
    stderr = result.stderr.decode()
    assert "\x1b" not in stderr and "\u202e" not in stderr and "\x07" not in stderr
    assert "Pod/web\\x1b]0;owned\\x07 in namespace default: injected log-watcher" in stderr
    assert "annotation outrigger.dev/log-pth\\x1b[31m\\u202e\\ud800 is not" in stderr


def test_inject_of_a_file_that_is_not_utf8_is_a_clean_error(tmp_path: Path) -> None:
    manifest = tmp_path / "pod.yaml"
    manifest.write_bytes(b'apiVersion: v1\nkind: Pod\nmetadata: {name: "a\xffb"}\n')
    result = inject("-f", manifest)
    assert result.returncode == 2 and b"Traceback" not in result.stderr
    assert result.stderr.startswith(f"outrigger: cannot read {manifest}: 'utf-8' codec".encode())


def test_inject_escapes_the_line_a_yaml_error_quotes(tmp_path: Path) -> None:
    manifest = tmp_path / "pod.yaml"
    manifest.write_text("metadata: {name: [\u202eowned\n")  # PyYAML reads a bidi override
    result = inject("-f", manifest)
    assert result.returncode == 2, result.stderr
    stderr = result.stderr.decode()
    assert "\u202e" not in stderr and "{name: [\\u202eowned" in stderr
    assert "while parsing a flow sequence\n" in stderr  # PyYAML's lines stay lines


def test_the_audit_table_escapes_names_and_details() -> None:
    finding = Finding("shop", "web-1", MISMATCHED, (), "the policy now refuses it: \x1b[2J\u202e")
    workload = WorkloadFindings("shop", "Deployment", "web\nforged line", [finding])
    table = render_table(DEFAULT, [workload])
    assert "\x1b" not in table and "\u202e" not in table
    assert "Deployment/web\\x0aforged line" in table
    assert "the policy now refuses it: \\x1b[2J\\u202e" in table
    assert table.count("\n") == 7, table  # the table's own lines, none more
