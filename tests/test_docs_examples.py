"""Every YAML and command a reader would copy from the README and docs/ is checked here, so
that the docs cannot drift from the code (issue 25).

Each fenced block of README.md and docs/**/*.md (the generated docs/reference/ pages aside)
is one of:

- **annotations to put on a pod template** (a fragment with `outrigger.dev/` annotations):
  a pod with them is injected under the embedded policy, not denied, and validates strictly;
- **a complete manifest** (a workload, or an `InjectionPolicy`): injected and validated, or
  loaded;
- **what Outrigger writes** (an excerpt of an injected pod, of an ambassador's Envoy
  bootstrap, of `outrigger policy compile`): found in what the code writes for the repository's
  examples (`...` in a value stands for text left out);
- **a command** (`$ outrigger ...` with its output, or a shell block running the repository's
  examples): run from the repository root, exit status 0 (or as shown), and every output line
  shown is printed;
- **alert rules**: each expression names metrics the webhook exports;
- **not checked here**, named in NOT_CHECKED with the reason (a cluster is needed, or the
  block is a picture): a new block that fits none of the above fails until it is classified.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, as_pod, outrigger_executable, validate_strict
from webhook.core.injector import InjectionDenied, RequestContext, inject
from webhook.core.policy import default_policy, parse_policy
from webhook.core.workloads import inject_workload
from webhook.serving.metrics import Metrics

POLICY = default_policy()
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
WORKLOAD_KINDS = {"Pod", "Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "ReplicaSet"}


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository
    line: int
    language: str
    text: str

    @property
    def first_line(self) -> str:
        return next((line.strip() for line in self.text.splitlines() if line.strip()), "")

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def blocks() -> Iterator[Block]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        if ROOT / "docs" / "reference" in page.parents:  # generated: tests/test_docs_reference.py
            continue
        text = page.read_text(encoding="utf-8")
        for match in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", text, re.S | re.M):
            indent = len(match.group(1))
            body = textwrap.dedent(match.group(3)) if indent else match.group(3)
            line = text[: match.start()].count("\n") + 1
            yield Block(str(page.relative_to(ROOT)), line, match.group(2), body)


BLOCKS = list(blocks())

# Blocks these tests do not run, by page and first line, with why.
NOT_CHECKED = {
    "kubectl": "needs a cluster",
    "helm install": "needs a cluster (the chart's rendering is tests/test_chart.py's)",
    "$ outrigger audit": "a capture from a cluster (tests/test_audit.py runs audit)",
    "outrigger audit": "needs a cluster (tests/test_audit.py)",
    "$ outrigger rollout": "a capture from a cluster (tests/test_rollout.py)",
    "$ outrigger explain": "a capture from a cluster (tests/test_explain_live.py)",
    "$ kubectl": "a capture from a cluster (tests/test_events.py records the Events)",
    "$ outrigger register": "needs a cluster (tests/test_register.py)",
    "outrigger certs --dns outrigger": "writes a CA and registers it in a cluster",
    "# cert-manager": "needs a cluster with cert-manager",
    "make run": "starts the server (tests/test_https.py serves it)",
    "make test": "the whole suite",
    "curl": "needs the server that make run starts",
    "export OUTRIGGER_KUBE_ASSETS": "a shell setting for the test tiers",
    "# in the Application": "Argo CD's Application (needs Argo CD)",
    "spec:\n  driftDetection": "Flux's HelmRelease (needs Flux)",
    "# Role in the release namespace": "the chart's RBAC (tests/test_chart.py checks it)",
    "# rollout, least rights": "RBAC rules (tests/test_rollout.py runs with exactly these)",
    '{"time"': "a decision-log line (tests/test_decision_log.py checks its fields)",
    "BEFORE": "a picture",
    "webhook/": "a picture of the source tree",
    "Warning: log-watcher reads": "what kubectl prints (tests/test_injector.py checks the warning)",
    "annotation outrigger.dev/ambas": "a denial message (the golden fixtures hold each)",
    "$ outrigger inject -f checkout-broken.yaml": (
        "a file the reader writes (tests/test_ambassador.py checks the messages)"
    ),
    "$ outrigger inject --explain --policy tests/fixtures/policies/good-platform-team.yaml": (
        "on a deployment.yaml the reader writes (tests/test_cli.py runs --explain)"
    ),
}


def not_checked(block: Block) -> str | None:
    for start, why in NOT_CHECKED.items():
        if block.text.lstrip().startswith(start) or block.first_line.startswith(start):
            return why
    return None


# What the code writes for the repository's examples -------------------------------------------


def injected_examples() -> list[Any]:
    result = []
    for example in EXAMPLES:
        injected, _ = inject_workload(yaml.safe_load(example.read_text()), "default", POLICY)
        result.append(injected)
    return result


INJECTED = injected_examples()


def bootstraps() -> list[Any]:
    found = []
    for workload in INJECTED:
        for container in _containers(workload):
            args = [str(a) for a in container.get("args", ())]
            if "--config-yaml" in args:
                found.append(json.loads(args[args.index("--config-yaml") + 1]))
    return found


def _containers(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        for key in ("containers", "initContainers"):
            if isinstance(node.get(key), list):
                yield from node[key]
        for value in node.values():
            yield from _containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers(item)


def holds(actual: Any, shown: Any) -> bool:
    """Whether `actual` holds what a doc `shown`: its keys with their values (a key shown
    without one: any), list items in order among the actual ones, and strings with `...`
    where text is left out."""
    if shown is None:
        return True
    if isinstance(shown, dict):  # a key `...` (`{a: 1, ...}`) stands for the keys left out
        return isinstance(actual, dict) and all(
            k == "..." or (k in actual and holds(actual[k], v)) for k, v in shown.items()
        )
    if isinstance(shown, list):
        if not isinstance(actual, list):
            return False
        rest = iter(actual)
        return all(any(holds(item, wanted) for item in rest) for wanted in shown)
    if isinstance(shown, str) and "..." in shown:
        position = 0
        for piece in (p.strip() for p in shown.split("...")):
            found = str(actual).find(piece, position)
            if found < 0:
                return False
            position = found + len(piece)
        return True
    return bool(actual == shown) or (
        isinstance(actual, int | str) and str(actual) == str(shown) and not isinstance(actual, bool)
    )


def somewhere(documents: list[Any], shown: Any) -> bool:
    """Whether some object nested in `documents` holds `shown` (an excerpt starts anywhere)."""
    stack = list(documents)
    while stack:
        node = stack.pop()
        if holds(node, shown) or (
            isinstance(shown, list) and isinstance(node, list) and holds(node, shown)
        ):
            return True
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def parsed_excerpt(text: str) -> Any:
    """The YAML of an excerpt that is one fragment (see `fragments`)."""
    (fragment,) = fragments(text)
    return fragment


def fragments(text: str) -> list[Any]:
    """The YAML fragments of an excerpt: split at lines that are only `...` (text left out)
    and where a line is less indented than its fragment's first (a piece from higher up)."""
    pieces: list[list[str]] = [[]]
    for line in text.splitlines():
        if line.strip() == "...":
            pieces.append([])
            continue
        if not line.strip():
            continue
        current = pieces[-1]
        if current and _indent(line) < _indent(current[0]):
            pieces.append([])
        pieces[-1].append(line)
    return [yaml.safe_load(textwrap.dedent("\n".join(piece))) for piece in pieces if piece]


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


# The classification ---------------------------------------------------------------------------


# What only an injected pod holds, and what only an Envoy bootstrap holds.
_INJECTED_MARKS = (
    "outrigger.dev/status",
    ".outrigger.dev/",
    "initContainers",
    "Probe:",
    "volumeMounts:",
)
_ENVOY_MARKS = ("socket_address", "typed_config", "clusters:", "route:")


def kind_of(block: Block) -> str:
    if not_checked(block):
        return "not-checked"
    if block.language in ("sh", "bash", "") and block.first_line.startswith(
        ("$ outrigger", ".venv/bin/outrigger", "outrigger")
    ):
        return "command"
    if block.language != "yaml":
        return "unclassified"
    try:
        parts = fragments(block.text)
    except yaml.YAMLError:
        return "unclassified"
    document = parts[0] if len(parts) == 1 else parts
    text = block.text
    if (
        isinstance(document, list)
        and document
        and isinstance(document[0], dict)
        and "alert" in document[0]
    ):
        return "alerts"
    if isinstance(document, dict) and document.get("kind") == "InjectionPolicy":
        return "policy"
    if isinstance(document, dict) and document.get("kind") in WORKLOAD_KINDS:
        return "manifest"
    if any(mark in text for mark in _INJECTED_MARKS):
        return "injected"
    if any(mark in text for mark in _ENVOY_MARKS):
        return "envoy"
    if "matchConditions" in text:
        return "compiled"
    if "outrigger.dev/" in text:
        return "annotations"
    return "unclassified"


def test_every_block_is_classified() -> None:
    unclassified = [str(b) for b in BLOCKS if kind_of(b) == "unclassified"]
    assert not unclassified, f"add a check or a NOT_CHECKED entry for the blocks at {unclassified}"
    assert len(BLOCKS) > 30  # the pages were read


def of(kind: str) -> list[Block]:
    return [block for block in BLOCKS if kind_of(block) == kind]


def annotations_in(document: Any) -> dict[str, str]:
    found: dict[str, str] = {}
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            notes = node.get("annotations")
            if isinstance(notes, dict):
                found.update(
                    {k: str(v) for k, v in notes.items() if k.startswith("outrigger.dev/")}
                )
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


@pytest.mark.parametrize("block", of("annotations"), ids=str)
def test_annotations_shown_inject_a_valid_pod(block: Block) -> None:
    annotations = annotations_in(parsed_excerpt(block.text))
    assert annotations, block
    if "outrigger.dev/ambassador-config" not in annotations and "ambassador" in annotations.get(
        "outrigger.dev/inject", ""
    ):
        annotations.setdefault("outrigger.dev/ambassador-upstream", "api.example.com:443")
    pod = {
        "metadata": {"name": "app", "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "registry.example.com/app:1"}]},
    }
    try:
        injection = inject(pod, RequestContext("shop"), POLICY)
    except InjectionDenied as error:
        pytest.fail(f"{block}: the annotations shown are denied: {error}")
    assert injection.injected, (str(block), injection.reason)
    validate_strict(as_pod(injection.pod))


@pytest.mark.parametrize("block", of("manifest") + of("policy"), ids=str)
def test_complete_manifests_load_and_inject(block: Block) -> None:
    document = yaml.safe_load(block.text)
    if document["kind"] == "InjectionPolicy":
        parse_policy(document)
        return
    validate_strict(document)
    injected, injection = inject_workload(document, "default", POLICY)
    assert injection is not None and injection.injected
    validate_strict(injected)


@pytest.mark.parametrize("block", of("injected"), ids=str)
def test_injected_excerpts_are_what_inject_writes(block: Block) -> None:
    for fragment in fragments(block.text):
        assert somewhere(INJECTED, fragment), (
            f"{block}: {str(fragment)[:300]} not found in what `outrigger inject` writes for "
            "examples/*.yaml"
        )


@pytest.mark.parametrize("block", of("envoy"), ids=str)
def test_envoy_excerpts_are_what_the_bootstraps_hold(block: Block) -> None:
    for fragment in fragments(block.text):
        assert somewhere(bootstraps(), fragment), (
            f"{block}: {str(fragment)[:300]} not found in the Envoy bootstraps of examples/*.yaml"
        )


@pytest.mark.parametrize("block", of("compiled"), ids=str)
def test_compiled_excerpts_are_what_policy_compile_prints(block: Block) -> None:
    policy = ROOT / "tests" / "fixtures" / "policies" / "good-platform-team.yaml"
    done = subprocess.run(
        [outrigger_executable(), "policy", "compile", "--policy", str(policy),
         "--namespace", "outrigger-system"],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert somewhere(list(yaml.safe_load_all(done.stdout)), parsed_excerpt(block.text)), block


@pytest.mark.parametrize("block", of("alerts"), ids=str)
def test_alerts_name_metrics_the_webhook_exports(block: Block) -> None:
    families = {family.name for family in Metrics().registry.collect()}
    for rule in yaml.safe_load(block.text):
        names = set(re.findall(r"\b(outrigger_[a-z_]+)", rule["expr"]))
        unknown = {n for n in names if re.sub(r"_(total|bucket|sum|count)$", "", n) not in families}
        assert names and not unknown, (rule["alert"], unknown)


@pytest.mark.parametrize("block", of("command"), ids=str)
def test_commands_run_as_shown(block: Block) -> None:
    lines = block.text.splitlines()
    if block.first_line.startswith("$ "):  # a command and its output
        command = block.first_line[2:]
        start = next(i for i, line in enumerate(lines) if line.strip().startswith("$ "))
        shown = [line for line in lines[start + 1 :] if line.strip()]
    else:
        command, shown = block.text, []
    command = command.replace(".venv/bin/outrigger", shlex.quote(outrigger_executable()))
    command = re.sub(r"^outrigger\b", shlex.quote(outrigger_executable()), command, flags=re.M)
    command = re.sub(r"(?<=[;|&] )outrigger\b", shlex.quote(outrigger_executable()), command)
    command = command.replace(
        ".venv/bin/python", str(Path(outrigger_executable()).parent / "python")
    )
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    printed = done.stdout + done.stderr
    expected_failure = any(line.startswith("outrigger: ") for line in shown)
    assert (done.returncode != 0) == expected_failure, (
        str(block),
        done.returncode,
        printed[-2000:],
    )
    for line in shown:
        assert line.strip() in printed, f"{block}: {line.strip()!r} not printed:\n{printed[-3000:]}"
