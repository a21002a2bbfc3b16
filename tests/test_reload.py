"""Reloading the policy file: `PolicyFile` unit tests, `/metrics`, and one end-to-end run.

The policy schema changes over time, so the policies used here are derived from the embedded
default one by harmless edits, and `load_policy` itself confirms (fixture `versions`, first
test) that the valid ones load with different versions and the broken ones are rejected.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, Generic, Self, TypeVar

import httpx
import orjson
import pytest
import yaml

from tests.conftest import admission_review, outrigger_executable
from tests.test_https import (
    Server,
    _free_port,
    _run_certs,
    _stop,
    _wait_until_healthy,
    applied,
    pod,
    post_review,
)
from webhook.cli import main
from webhook.core.policy import Policy, PolicyError, default_policy, load_policy
from webhook.serving.app import AdmissionEndpoint, create_app
from webhook.serving.metrics import Metrics
from webhook.serving.reload import PolicyFile

DEFAULT_TEXT = resources.files("webhook.core").joinpath("default-policy.yaml").read_text()
BROKEN_YAML = "apiVersion: outrigger.dev/v1alpha1\nkind: [InjectionPolicy\n"
BAD_FIELD = "bogusReloadField"
INVALID_SCHEMA = f"{DEFAULT_TEXT.rstrip()}\n{BAD_FIELD}: true\n"
WAIT_SECONDS = 15.0


def variant(number: int) -> str:
    """The default policy with a harmless edit; same length for every `number` in 0-9."""
    document = yaml.safe_load(DEFAULT_TEXT)
    if isinstance(document.get("excludedNamespaces"), list):
        document["excludedNamespaces"] = [*document["excludedNamespaces"], f"reload-test-{number}"]
    else:
        limits = _first_memory_limits(document)
        assert limits is not None, "no harmless edit known for this policy schema: update variant()"
        limits["memory"] = f"{300 + number}Mi"
    return yaml.safe_dump(document, sort_keys=False)


def _first_memory_limits(node: Any) -> dict[str, Any] | None:
    if isinstance(node, dict):
        if isinstance(node.get("limits"), dict) and "memory" in node["limits"]:
            limits: dict[str, Any] = node["limits"]
            return limits
        children: Any = node.values()
    else:
        children = node if isinstance(node, list) else ()
    for child in children:
        found = _first_memory_limits(child)
        if found is not None:
            return found
    return None


def loaded(tmp_path: Path, text: str) -> Policy:
    """`text` loaded as a policy file, to learn its version or its error."""
    path = tmp_path / f"probe-{uuid.uuid4().hex}.yaml"
    path.write_text(text)
    return load_policy(path)


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The version of each valid policy text used here; all must load, and all differ."""
    probe = tmp_path_factory.mktemp("versions")
    found = {"default": loaded(probe, DEFAULT_TEXT).version}
    found |= {f"variant{n}": loaded(probe, variant(n)).version for n in (1, 2)}
    assert len(set(found.values())) == 3, found
    assert found["default"] == default_policy().version
    return found


@pytest.mark.parametrize(
    ("text", "mentions"), [(BROKEN_YAML, "cannot read"), (INVALID_SCHEMA, BAD_FIELD)]
)
def test_the_bad_policies_used_here_are_rejected(tmp_path: Path, text: str, mentions: str) -> None:
    with pytest.raises(PolicyError, match=mentions):
        loaded(tmp_path, text)


# The kubelet's ConfigMap volume -----------------------------------------------------------------


class ConfigMapVolume:
    """A directory laid out and updated exactly as kubelet's atomic writer does it."""

    def __init__(self, root: Path, text: str) -> None:
        self.root = root
        self._versions = itertools.count()
        root.mkdir()
        (root / "..data").symlink_to(self._write_version(text))
        (root / "policy.yaml").symlink_to(Path("..data") / "policy.yaml")

    @property
    def path(self) -> Path:
        return self.root / "policy.yaml"

    def update(self, text: str) -> None:
        """A new timestamped directory, `..data_tmp` pointing at it renamed over `..data`."""
        old = self.root / os.readlink(self.root / "..data")
        staging = self.root / "..data_tmp"
        staging.symlink_to(self._write_version(text))
        os.rename(staging, self.root / "..data")
        shutil.rmtree(old)

    def _write_version(self, text: str) -> str:
        name = f"..2026_11_27_10_00_{next(self._versions):02d}.{uuid.uuid4().int % 10**9}"
        (self.root / name).mkdir()
        (self.root / name / "policy.yaml").write_text(text)
        return name


# PolicyFile ---------------------------------------------------------------------------------------


def reloads(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value("outrigger_policy_reloads_total", {"result": result})
    assert value is not None
    return value


@pytest.fixture()
def policy_path(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(DEFAULT_TEXT)
    return path


def test_loads_at_construction(policy_path: Path, versions: dict[str, str]) -> None:
    policy_file = PolicyFile(policy_path)
    assert policy_file.current().version == versions["default"]
    assert not policy_file.check(), "nothing changed"


@pytest.mark.parametrize("text", [BROKEN_YAML, INVALID_SCHEMA, ""], ids=["yaml", "schema", "empty"])
def test_bad_file_at_construction_raises(tmp_path: Path, text: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=str(path)):
        PolicyFile(path)


def test_missing_file_at_construction_raises(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy"):
        PolicyFile(tmp_path / "missing.yaml")


def test_good_change_is_applied(
    policy_path: Path, versions: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    policy_file = PolicyFile(policy_path, metrics=metrics)
    policy_path.write_text(variant(1))
    with caplog.at_level(logging.INFO, logger="outrigger.reload"):
        assert policy_file.check()
    assert policy_file.current().version == versions["variant1"]
    assert (reloads(metrics, "success"), reloads(metrics, "failure")) == (1, 0)
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert versions["variant1"] in record.getMessage()


@pytest.mark.parametrize(
    ("text", "reason"),
    [(BROKEN_YAML, "cannot read"), (INVALID_SCHEMA, BAD_FIELD)],
    ids=["yaml", "schema"],
)
def test_bad_change_is_rejected_once_and_the_old_policy_kept(
    policy_path: Path, caplog: pytest.LogCaptureFixture, text: str, reason: str
) -> None:
    metrics = Metrics()
    policy_file = PolicyFile(policy_path, metrics=metrics)
    before = policy_file.current()
    policy_path.write_text(text)
    with caplog.at_level(logging.INFO, logger="outrigger.reload"):
        assert not policy_file.check()
        _touch(policy_path)
        assert not policy_file.check()  # the same bad content again: not reported again
    assert policy_file.current() is before
    assert (reloads(metrics, "success"), reloads(metrics, "failure")) == (0, 1)
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert reason in record.getMessage() and str(policy_path) in record.getMessage()
    assert before.version in record.getMessage(), "says which policy stays in force"


def test_each_bad_content_is_reported_and_a_fix_is_applied(
    policy_path: Path, versions: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    policy_file = PolicyFile(policy_path, metrics=metrics)
    with caplog.at_level(logging.ERROR, logger="outrigger.reload"):
        for text in (INVALID_SCHEMA, BROKEN_YAML, DEFAULT_TEXT, INVALID_SCHEMA):
            policy_path.write_text(text)
            assert not policy_file.check()
    assert reloads(metrics, "failure") == 3, "back to the good version and broken again counts"
    assert len(caplog.records) == 3
    policy_path.write_text(variant(1))
    assert policy_file.check()
    assert policy_file.current().version == versions["variant1"]


def test_unchanged_content_does_not_reload(
    policy_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    policy_file = PolicyFile(policy_path, metrics=metrics)
    before = policy_file.current()
    with caplog.at_level(logging.DEBUG, logger="outrigger.reload"):
        _touch(policy_path)
        assert not policy_file.check()
        policy_path.write_text(DEFAULT_TEXT)  # rewritten in place, same content
        assert not policy_file.check()
    assert policy_file.current() is before
    assert (reloads(metrics, "success"), reloads(metrics, "failure")) == (0, 0)
    assert caplog.records == []


def test_same_size_rewrite_within_one_timestamp_tick_is_seen(
    tmp_path: Path, versions: dict[str, str]
) -> None:
    """Same inode, size and mtime: only the re-read of recently modified files can tell."""
    path = tmp_path / "policy.yaml"
    path.write_text(variant(1))
    policy_file = PolicyFile(path)
    stat = path.stat()
    path.write_text(variant(2))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_ino, path.stat().st_size) == (stat.st_ino, stat.st_size)
    assert policy_file.check()
    assert policy_file.current().version == versions["variant2"]


def test_kubelet_symlink_swap_is_detected(tmp_path: Path, versions: dict[str, str]) -> None:
    volume = ConfigMapVolume(tmp_path / "config", DEFAULT_TEXT)
    metrics = Metrics()
    policy_file = PolicyFile(volume.path, metrics=metrics)
    volume.update(variant(1))
    assert policy_file.check()
    assert policy_file.current().version == versions["variant1"]
    volume.update(variant(1))  # a new directory with the same content: nothing to do
    assert not policy_file.check()
    volume.update(INVALID_SCHEMA)
    assert not policy_file.check()
    assert policy_file.current().version == versions["variant1"]
    assert (reloads(metrics, "success"), reloads(metrics, "failure")) == (1, 1)


def test_deleted_file_keeps_the_policy(policy_path: Path, versions: dict[str, str]) -> None:
    metrics = Metrics()
    policy_file = PolicyFile(policy_path, metrics=metrics)
    policy_path.unlink()
    assert not policy_file.check()
    assert not policy_file.check()
    assert policy_file.current().version == versions["default"]
    assert reloads(metrics, "failure") == 1
    policy_path.write_text(variant(2))
    assert policy_file.check()


@pytest.mark.parametrize("interval", [0, -1, float("nan"), float("inf")])
def test_interval_must_be_positive(policy_path: Path, interval: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        PolicyFile(policy_path, interval=interval)


def _touch(path: Path) -> None:
    """A later mtime, the same content."""
    later = path.stat().st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(later, later))


# The poller -------------------------------------------------------------------------------------


def test_poller_applies_a_change_and_stops_with_the_lifespan(
    policy_path: Path, versions: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    policy_file = PolicyFile(policy_path, interval=0.01)
    checks = 0
    check = policy_file.check

    def failing_once() -> bool:
        nonlocal checks
        checks += 1
        if checks == 1:
            raise RuntimeError("unexpected")  # the poller must survive it
        return check()

    monkeypatch.setattr(policy_file, "check", failing_once)

    async def scenario() -> asyncio.Task[Any]:
        async with policy_file.watching():
            policy_path.write_text(variant(1))
            await _until(lambda: policy_file.current().version == versions["variant1"])
            (task,) = [t for t in asyncio.all_tasks() if "policy poll" in t.get_name()]
        return task

    task = asyncio.run(asyncio.wait_for(scenario(), WAIT_SECONDS))
    assert task.cancelled()
    assert checks >= 2


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


# /metrics and /readyz in process --------------------------------------------------------------


def test_metrics_route_reports_the_policy_in_force(
    policy_path: Path, versions: dict[str, str]
) -> None:
    policy_file = PolicyFile(policy_path)
    app = create_app(policy_file.current, metrics=policy_file.metrics)
    assert f'outrigger_policy_info{{version="{versions["default"]}"}} 1.0' in _metrics(app)
    policy_path.write_text(variant(1))
    assert policy_file.check()
    text = _metrics(app)
    assert f'outrigger_policy_info{{version="{versions["variant1"]}"}} 1.0' in text
    assert versions["default"] not in text
    assert 'outrigger_policy_reloads_total{result="success"} 1.0' in text
    assert 'outrigger_policy_reloads_total{result="failure"} 0.0' in text
    policy_path.write_text(INVALID_SCHEMA)
    assert not policy_file.check()
    assert _get(app, "/readyz").status_code == 200, "the old good policy serves"


def test_apps_have_metrics_of_their_own() -> None:
    default = default_policy()
    apps = [create_app(lambda: default) for _ in range(2)]
    for app in apps:
        assert f'outrigger_policy_info{{version="{default.version}"}} 1.0' in _metrics(app)


def _metrics(app: AdmissionEndpoint) -> str:
    reply = _get(app, "/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return reply.text


def _get(app: AdmissionEndpoint, path: str) -> httpx.Response:
    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://webhook") as client:
            return await client.get(path)

    return asyncio.run(asyncio.wait_for(get(), WAIT_SECONDS))


# The command line ---------------------------------------------------------------------------


def test_serve_refuses_a_bad_policy_before_anything_else(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(INVALID_SCHEMA)
    cert_dir = tmp_path / "certs"
    result = _outrigger("serve", "--port", "1", "--cert-dir", cert_dir, "--policy", policy)
    assert result.returncode == 2
    assert BAD_FIELD in result.stderr and "Traceback" not in result.stderr
    assert not cert_dir.exists(), "no certificate generated for a server that cannot start"


@pytest.mark.parametrize("seconds", ["0", "-1", "nan", "inf"])
def test_serve_refuses_a_poll_interval_that_is_not_positive(
    capsys: pytest.CaptureFixture[str], seconds: str
) -> None:
    # In process: it is refused before logging is set up or anything is loaded or served.
    assert main(["serve", "--port", "1", "--policy-poll-seconds", seconds]) == 2
    assert "--policy-poll-seconds" in capsys.readouterr().err


def _outrigger(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [outrigger_executable(), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


# End to end: the real server, reloading under load ----------------------------------------------

STATUS = "outrigger.dev/status"
MAX_LOAD_SECONDS = 120.0


T = TypeVar("T")


class BackgroundLoad(Generic[T]):
    """A thread sending requests back to back until stopped, keeping answers and failures.

    `_session` yields the function that makes one request; subclasses decide whether requests
    share a connection.
    """

    name = "load"

    def __init__(self) -> None:
        self.answers: list[T] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(WAIT_SECONDS)
        assert not self._thread.is_alive(), "the load thread did not stop"

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        """Until `condition()`, bounded; fails at once when a request failed."""
        deadline = time.monotonic() + WAIT_SECONDS
        while not condition():
            assert not self.failures, self.failures[:5]
            assert self._thread.is_alive(), "the load thread stopped early"
            if time.monotonic() > deadline:
                pytest.fail(f"waited {WAIT_SECONDS}s for {what}; seen: {self.seen()}")
            time.sleep(0.02)

    def seen(self) -> list[T]:
        """The answers, in order, without consecutive repeats."""
        return [answer for answer, _ in itertools.groupby(list(self.answers))]

    def _session(self) -> AbstractContextManager[Callable[[], T]]:
        raise NotImplementedError

    def _run(self) -> None:
        deadline = time.monotonic() + MAX_LOAD_SECONDS
        with self._session() as request:
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    self.answers.append(request())
                except Exception as error:
                    self.failures.append(repr(error))


class AdmissionLoad(BackgroundLoad[str]):
    """AdmissionReviews back to back over one HTTPS connection, recording the policy version
    of every answer (from the status annotation of the patched pod). A failure is a transport
    error, a status other than 200, or an answer that is not a valid AdmissionReview injecting
    the log-watcher.
    """

    name = "admission-load"

    def __init__(self, server: Server) -> None:
        self.server = server
        super().__init__()

    @property
    def versions(self) -> list[str]:
        return self.answers

    @contextmanager
    def _session(self) -> Iterator[Callable[[], str]]:
        with httpx.Client(
            base_url=self.server.url, verify=self.server.trusting_ca(), timeout=10.0
        ) as client:
            yield lambda: _admit(client)


def _admit(client: httpx.Client) -> str:
    sent = pod({"outrigger.dev/inject": "log-watcher"})
    response = post_review(client, admission_review(sent, uid=str(uuid.uuid4())))
    status = orjson.loads(applied(response, sent)["metadata"]["annotations"][STATUS])
    assert status["injected"] == ["log-watcher"], status
    return str(status["policy"])


@pytest.fixture()
def reloading_server(tmp_path: Path) -> Iterator[tuple[Server, ConfigMapVolume]]:
    volume = ConfigMapVolume(tmp_path / "config", DEFAULT_TEXT)
    cert_dir = tmp_path / "certs"
    _run_certs(cert_dir)
    server = Server(port=_free_port(), cert_dir=cert_dir, log=tmp_path / "serve.log")
    command = [outrigger_executable(), "serve", "--host", "127.0.0.1", "--port", str(server.port)]
    command += ["--cert-dir", str(cert_dir), "--policy", str(volume.path)]
    command += ["--policy-poll-seconds", "0.2"]
    with server.log.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        _wait_until_healthy(process, server)
        yield server, volume
    finally:
        returncode = _stop(process)
    output = server.log.read_text(errors="replace")
    assert "Traceback" not in output, output
    assert returncode in (0, -signal.SIGTERM), output


def test_policy_reloads_under_load(
    reloading_server: tuple[Server, ConfigMapVolume], versions: dict[str, str]
) -> None:
    server, volume = reloading_server
    with (
        AdmissionLoad(server) as load,
        httpx.Client(base_url=server.url, verify=server.trusting_ca(), timeout=10.0) as client,
    ):
        load.wait_for(lambda: len(load.versions) >= 20, "the first answers")
        volume.update(variant(1))
        load.wait_for(lambda: load.versions[-1] == versions["variant1"], "the new policy")
        volume.update(INVALID_SCHEMA)
        load.wait_for(lambda: _failed_reloads(client) == 1, "the rejection")
        answered = len(load.versions)
        load.wait_for(lambda: len(load.versions) >= answered + 20, "answers after the rejection")
    assert not load.failures, load.failures[:5]
    assert load.seen() == [versions["default"], versions["variant1"]]
    metrics = _scrape(server)
    assert f'outrigger_policy_info{{version="{versions["variant1"]}"}} 1.0' in metrics
    assert 'outrigger_policy_reloads_total{result="success"} 1.0' in metrics
    assert "outrigger_serving_certificate_expiry_timestamp_seconds" in metrics
    log = server.log.read_text(errors="replace")
    assert f"policy {versions['variant1']} in force" in log
    assert "ERROR" in log and BAD_FIELD in log


def _failed_reloads(client: httpx.Client) -> int:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('outrigger_policy_reloads_total{result="failure"}'):
            return int(float(line.split()[-1]))
    raise AssertionError("no failure counter in /metrics")


def _scrape(server: Server) -> str:
    with httpx.Client(verify=server.trusting_ca(), timeout=10.0) as client:
        reply = client.get(f"{server.url}/metrics")
    assert reply.status_code == 200
    return reply.text
