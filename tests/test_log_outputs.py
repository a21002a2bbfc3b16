"""The log-watcher's outputs (webhook.core.logoutputs): the policy model's validation, the
rendered Fluent Bit YAML and container fields, and the real Fluent Bit shipping every record
once, with namespace, pod, container and node, to a local receiver of each protocol."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from tests.fluentbit_outputs import (
    STOP_TIMEOUT,
    FluentBit,
    ForwardReceiver,
    Pki,
    Receiver,
    basic_auth,
    decode_bulk,
    decode_json_lines,
    decode_loki,
    decode_otlp_logs,
    make_pki,
    skip_reason,
    wait_until,
)
from webhook.core.logoutputs import (
    CA_MOUNT_PATH,
    LogOutput,
    LogOutputs,
    ca_volumes,
    container_env,
    output_entries,
    record_filters,
    secret_problems,
)

# Pure: the model ----------------------------------------------------------------------------


def problems(model: type[LogOutput] | type[LogOutputs], document: dict[str, Any]) -> str:
    """The validation messages, each `path: message` as the policy reports them."""
    with pytest.raises(ValidationError) as caught:
        model.model_validate(document)
    lines = []
    for error in caught.value.errors():
        path = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        lines.append(f"{path}: {message}" if path else message)
    return "\n".join(lines)


LOKI = {"type": "loki", "host": "loki.logging.svc"}
BASIC = {"secret": "loki-auth", "usernameKey": "user", "passwordKey": "password"}


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({**LOKI, "host": "http://loki:3100"}, "host: 'http://loki:3100' is not a lowercase DNS"),
        ({**LOKI, "host": "Loki.example"}, "host: 'Loki.example' is not a lowercase DNS name"),
        ({"type": "loki"}, "host: required for a loki output"),
        ({**LOKI, "port": 0}, "port: Input should be greater than or equal to 1"),
        ({**LOKI, "type": "syslog"}, "type: Input should be 'stdout', 'loki'"),
        ({"type": "stdout", "host": "a.b"}, "host: a stdout output has no destination settings"),
        ({**LOKI, "tls": {"caSecret": "ca"}}, "tls: caSecret needs enabled: true"),
        (
            {**LOKI, "tls": {"enabled": True, "verify": False, "caSecret": "ca"}},
            "tls: caSecret has no use with verify: false",
        ),
        (
            {**LOKI, "host": "10.0.0.7", "tls": {"enabled": True}},
            "host: TLS with verify needs a DNS name",
        ),
        (
            {**LOKI, "credentials": {"secret": "s", "usernameKey": "u"}},
            "credentials: set both usernameKey and passwordKey, or neither",
        ),
        (
            {**LOKI, "credentials": {"secret": "s"}},
            "credentials: set usernameKey and passwordKey, tokenKey or sharedKeyKey",
        ),
        (
            {**LOKI, "credentials": {"secret": "Bad_Name", "tokenKey": "t"}},
            "credentials.secret: String should match pattern",
        ),
        (
            {"type": "opensearch", "host": "os", "credentials": {"secret": "s", "tokenKey": "t"}},
            "credentials: opensearch outputs cannot use token credentials",
        ),
        (
            {"type": "forward", "host": "fwd", "credentials": BASIC},
            "credentials: forward takes a username and password only with sharedKeyKey",
        ),
        (
            {"type": "http", "host": "h", "credentials": {"secret": "s", "sharedKeyKey": "k"}},
            "credentials: http outputs cannot use sharedKey credentials (only forward)",
        ),
        ({**LOKI, "labels": {"pod": "x"}}, "labels: label 'pod': a Loki label name"),
        ({**LOKI, "labels": {"job": "a b"}}, "labels: label job: 'a b' must be 1-128 of"),
        ({**LOKI, "uri": "/push?x=${OUTRIGGER_LOG_PASSWORD}"}, "uri: '/push?x=${OUTRIGGER"),
        ({**LOKI, "uri": "push"}, "uri: 'push' must be a path starting with /"),
        ({"type": "elasticsearch", "host": "es", "index": "Logs"}, "index: 'Logs' is not an"),
        (
            {"type": "elasticsearch", "host": "es", "tenantId": "t"},
            "tenantId: only for loki, not elasticsearch",
        ),
        (
            {"type": "forward", "host": "fwd", "uri": "/x"},
            "uri: only for http, opentelemetry, loki, not forward",
        ),
        ({**LOKI, "retryLimit": 0}, "retryLimit: '0': a number of retries (1-1000) or no_limits"),
        ({**LOKI, "hosts": "x"}, "hosts: Extra inputs are not permitted"),
        (
            {**LOKI, "credentials": {"secret": "s", "tokenKey": "t", "sharedKeyKey": "k"}},
            "credentials: tokenKey goes alone",
        ),
        ({"type": "http", "host": "h", "labels": {}}, "labels: only for loki, not http"),
        ({**LOKI, "index": "logs"}, "index: only for elasticsearch, opensearch, not loki"),
        ({"type": "stdout", "uri": "/x"}, "uri: only for http, opentelemetry, loki, not stdout"),
    ],
)
def test_invalid_output_is_refused_naming_the_field(
    document: dict[str, Any], expected: str
) -> None:
    assert expected in problems(LogOutput, document)


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"default": "loki"}, "default: 'loki' is not an output (known: stdout)"),
        ({"outputs": {"Loki": LOKI}}, "outputs: output name 'Loki' must be a DNS label"),
        ({"outputs": {"stdout": LOKI}}, "output name 'stdout' is kept for the stdout output"),
        (
            {"outputs": {"central": {**LOKI, "credentials": BASIC}}},
            "outputs.central: Secret 'loki-auth' is not in allowedSecrets (none)",
        ),
        (
            {
                "outputs": {"central": {**LOKI, "tls": {"enabled": True, "caSecret": "other-ca"}}},
                "allowedSecrets": ["logging-*"],
            },
            "outputs.central: Secret 'other-ca' is not in allowedSecrets (logging-*)",
        ),
    ],
)
def test_invalid_output_list_is_refused(document: dict[str, Any], expected: str) -> None:
    assert expected in problems(LogOutputs, document)


def test_the_default_is_stdout_and_a_pod_picks_among_the_named_outputs() -> None:
    outputs = LogOutputs.model_validate(
        {"outputs": {"central": {**LOKI, "credentials": BASIC}}, "allowedSecrets": ["loki-*"]}
    )
    assert outputs.pick(None) == LogOutput(type="stdout")
    assert outputs.pick("stdout") == LogOutput(type="stdout")
    central = outputs.pick("central")
    assert central is not None and central.type == "loki" and central.effective_port == 3100
    assert outputs.pick("elsewhere") is None
    assert outputs.names == {"stdout", "central"}
    chosen = LogOutputs.model_validate({"outputs": {"central": LOKI}, "default": "central"})
    assert chosen.pick(None) == chosen.outputs["central"]


def test_defaults_per_type() -> None:
    ports = {
        "loki": 3100,
        "elasticsearch": 9200,
        "opensearch": 9200,
        "opentelemetry": 4318,
        "forward": 24224,
    }
    for kind, port in ports.items():
        assert LogOutput(type=kind, host="h").effective_port == port  # type: ignore[arg-type]
    assert LogOutput(type="http", host="h").effective_port == 80
    assert LogOutput(type="http", host="h", tls={"enabled": True}).effective_port == 443  # type: ignore[arg-type]
    assert LogOutput(type="loki", host="FD00::7").host == "fd00::7"


# Pure: the renderers ------------------------------------------------------------------------


def test_loki_with_tls_and_basic_auth_renders_references_not_secrets() -> None:
    output = LogOutput.model_validate(
        {
            **LOKI,
            "tls": {"enabled": True, "caSecret": "logging-ca"},
            "credentials": BASIC,
            "tenantId": "team-a",
        }
    )
    assert output_entries(output, match="app.*") == [
        {
            "name": "loki",
            "match": "app.*",
            "host": "loki.logging.svc",
            "port": 3100,
            "retry_limit": "no_limits",
            "tls": "on",
            "tls.verify": "on",
            "tls.verify_hostname": "on",
            "tls.ca_file": f"{CA_MOUNT_PATH}/ca.crt",
            "labels": "job=outrigger",
            "label_keys": "$namespace,$pod,$container",
            "line_format": "json",
            "tenant_id": "team-a",
            "http_user": "${OUTRIGGER_LOG_USERNAME}",
            "http_passwd": "${OUTRIGGER_LOG_PASSWORD}",
        }
    ]
    assert container_env(output) == [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {
            "name": "OUTRIGGER_LOG_USERNAME",
            "valueFrom": {"secretKeyRef": {"name": "loki-auth", "key": "user"}},
        },
        {
            "name": "OUTRIGGER_LOG_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": "loki-auth", "key": "password"}},
        },
    ]
    assert ca_volumes(output) == (
        [
            {
                "name": "log-watcher-output-ca",
                "secret": {
                    "secretName": "logging-ca",
                    "items": [{"key": "ca.crt", "path": "ca.crt"}],
                },
            }
        ],
        [{"name": "log-watcher-output-ca", "mountPath": CA_MOUNT_PATH, "readOnly": True}],
    )
    assert output.secrets == ("loki-auth", "logging-ca")


@pytest.mark.parametrize(
    ("kind", "property_", "value"),
    [
        ("loki", "bearer_token", "${OUTRIGGER_LOG_TOKEN}"),
        ("elasticsearch", "http_api_key", "${OUTRIGGER_LOG_TOKEN}"),
        ("opentelemetry", "header", "Authorization Bearer ${OUTRIGGER_LOG_TOKEN}"),
        ("http", "header", "Authorization Bearer ${OUTRIGGER_LOG_TOKEN}"),
    ],
)
def test_a_token_goes_where_the_plugin_takes_one(kind: str, property_: str, value: str) -> None:
    output = LogOutput.model_validate(
        {"type": kind, "host": "h", "credentials": {"secret": "s", "tokenKey": "token"}}
    )
    assert output_entries(output)[0][property_] == value
    assert container_env(output)[-1] == {
        "name": "OUTRIGGER_LOG_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}},
    }


def test_type_specific_properties() -> None:
    def entry(**document: Any) -> dict[str, Any]:
        return output_entries(LogOutput.model_validate({"host": "h", **document}))[0]

    assert entry(type="elasticsearch", index="app-logs").items() >= {
        ("name", "es"),
        ("index", "app-logs"),
        ("suppress_type_name", "on"),
    }
    assert entry(type="opensearch")["name"] == "opensearch"
    assert entry(type="opentelemetry", uri="/otlp/v1/logs")["logs_uri"] == "/otlp/v1/logs"
    assert entry(type="opentelemetry")["logs_body_key_attributes"] == "on"
    assert entry(type="http")["format"] == "json_lines"
    assert entry(type="http")["uri"] == "/"
    forward = entry(
        type="forward",
        credentials={"secret": "s", "sharedKeyKey": "k", "usernameKey": "u", "passwordKey": "p"},
    )
    assert forward["shared_key"] == "${OUTRIGGER_LOG_SHARED_KEY}"
    assert (forward["username"], forward["password"]) == (
        "${OUTRIGGER_LOG_USERNAME}",
        "${OUTRIGGER_LOG_PASSWORD}",
    )
    assert entry(type="loki", retryLimit=5)["retry_limit"] == "5"
    unverified = entry(type="loki", tls={"enabled": True, "verify": False})
    assert (unverified["tls.verify"], unverified["tls.verify_hostname"]) == ("off", "off")
    assert "tls" not in entry(type="loki")


def test_stdout_needs_no_filters_env_or_volumes() -> None:
    stdout = LogOutput(type="stdout")
    assert output_entries(stdout) == [{"name": "stdout", "match": "*", "format": "json_lines"}]
    assert record_filters(stdout, ["app"]) == []
    assert container_env(stdout) == []
    assert ca_volumes(stdout) == ([], [])


def test_record_filters_set_the_pod_metadata_from_the_environment() -> None:
    output = LogOutput.model_validate(LOKI)
    assert record_filters(output, ["app", "worker"], match="logs") == [
        {
            "name": "modify",
            "match": "logs",
            "set": [
                "namespace ${POD_NAMESPACE}",
                "pod ${POD_NAME}",
                "container app,worker",
                "node ${NODE_NAME}",
            ],
        }
    ]


def test_secret_problems_name_each_secret_not_allowed() -> None:
    output = LogOutput.model_validate(
        {**LOKI, "credentials": BASIC, "tls": {"enabled": True, "caSecret": "logging-ca"}}
    )
    assert secret_problems(output, ["logging-*", "loki-*"]) == []
    assert secret_problems(output, ["logging-*"]) == [
        "Secret 'loki-auth' is not in allowedSecrets (logging-*)"
    ]
    assert len(secret_problems(output, [])) == 2


# The real Fluent Bit --------------------------------------------------------------------------

SKIP_REASON = skip_reason()

LINES = 300  # numbered lines the app writes, half before Fluent Bit starts, half after
WAIT = 60.0  # for every record to arrive: flushes are every second, retries every ~10 s
KUBELET = {"POD_NAME": "app-7f9c-x2x4z", "POD_NAMESPACE": "shop", "NODE_NAME": "worker-3"}
CONTAINERS = ["app", "sidecar-writer"]
SECRETS = {
    ("logging-auth", "user"): "shipper",
    ("logging-auth", "password"): "p@ss w0rd$x,y",
    ("logging-auth", "token"): "tok-3n.Z_x",
    ("logging-auth", "shared-key"): "forward-secret",
}


@dataclass
class Run:
    """One test's Fluent Bit, fed by a log directory the test writes, and its receiver."""

    directory: Path
    pki: Pki
    stoppers: list[Callable[[], object]]

    def start(
        self,
        output: LogOutput,
        secrets: dict[tuple[str, str], str] = SECRETS,
        service: dict[str, Any] | None = None,
    ) -> FluentBit:
        """Fluent Bit with the generated config, as the kubelet would start the container."""
        document = self._config(output)
        document["service"] |= service or {}
        text = yaml.safe_dump(document, sort_keys=False)
        assert not [value for value in secrets.values() if value in text]  # references only
        config = self.directory / "fluent-bit.yaml"
        config.write_text(text)
        process = FluentBit(
            ["-c", str(config)], kubelet_env(output, secrets), self.directory / "fluent-bit.log"
        )
        self.stoppers.append(process.stop)
        return process

    def _config(self, output: LogOutput) -> dict[str, Any]:
        entries = output_entries(output, match="app")
        for entry in entries:  # the CA Secret's mount, here a file of the test's
            if "tls.ca_file" in entry:
                assert entry["tls.ca_file"] == f"{CA_MOUNT_PATH}/ca.crt"
                entry["tls.ca_file"] = str(self.pki.ca_file)
        tail = {
            "name": "tail",
            "tag": "app",
            "path": str(self.directory / "logs" / "*.log"),
            "read_from_head": True,
            "refresh_interval": 1,
        }
        return {
            "service": {"flush": 1, "grace": 5, "log_level": "info"},
            "pipeline": {
                "inputs": [tail],
                "filters": record_filters(output, CONTAINERS, match="app"),
                "outputs": entries,
            },
        }

    def write(self, first: int, last: int) -> None:
        logs = self.directory / "logs"
        logs.mkdir(exist_ok=True)
        with (logs / "app.log").open("a") as file:
            file.writelines(f"line-{number:05d}\n" for number in range(first, last))


def kubelet_env(output: LogOutput, secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """The container's environment from its env entries, resolved as the kubelet does."""
    env = {}
    for entry in container_env(output):
        source = entry["valueFrom"]
        if "fieldRef" in source:
            env[entry["name"]] = KUBELET[entry["name"]]
        else:
            reference = source["secretKeyRef"]
            env[entry["name"]] = secrets[(reference["name"], reference["key"])]
    return env


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def run(tmp_path: Path, pki: Pki) -> Iterator[Run]:
    if SKIP_REASON is not None:
        pytest.skip(SKIP_REASON)  # here, so that -ra reports it once for all
    stoppers: list[Callable[[], object]] = []
    yield Run(tmp_path, pki, stoppers)
    for stop in reversed(stoppers):
        stop()


def ship_all(
    run: Run, output: LogOutput, receiver: Any, service: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Write LINES lines (half before the start, half while running), wait until all have
    arrived, stop Fluent Bit as the kubelet would, and return what arrived."""
    run.write(0, LINES // 2)
    fluentbit = run.start(output, service=service)
    run.write(LINES // 2, LINES)
    receiver.wait_for(LINES, WAIT)
    assert fluentbit.stop() == 0, fluentbit.text()
    records: list[dict[str, Any]] = receiver.records()
    counts = Counter(record.get("log", record.get("_body")) for record in records)
    expected = {f"line-{number:05d}": 1 for number in range(LINES)}
    missing = sorted(set(expected) - set(counts))
    repeated = {line: count for line, count in counts.items() if count != 1}
    assert counts == expected, f"{len(missing)} missing {missing[:5]}, repeated {repeated}"
    for record in records:
        # Loki: the pod's streams are labelled with what labels take (the line has the rest);
        # OTLP: the attributes are the record without the line (the body).
        assert_metadata(record.get("_attributes") or {**record, **record.get("_stream", {})})
    return records


def assert_metadata(fields: dict[str, Any]) -> None:
    assert fields["namespace"] == "shop"
    assert fields["pod"] == "app-7f9c-x2x4z"
    assert fields["container"] == "app,sidecar-writer"
    assert fields["node"] == "worker-3"


def output_for(kind: str, port: int, **settings: Any) -> LogOutput:
    return LogOutput.model_validate({"type": kind, "host": "127.0.0.1", "port": port, **settings})


@pytest.fixture
def receivers() -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for receiver in started:
        receiver.stop()


TLS = {"enabled": True, "caSecret": "logging-ca"}
BASIC_CREDENTIALS = {"secret": "logging-auth", "usernameKey": "user", "passwordKey": "password"}
TOKEN_CREDENTIALS = {"secret": "logging-auth", "tokenKey": "token"}


@pytest.mark.fluentbit
def test_loki_over_tls_with_basic_auth(run: Run, receivers: list[Any]) -> None:
    auth = basic_auth("shipper", SECRETS[("logging-auth", "password")])
    receiver = Receiver(decode_loki, pki=run.pki, auth=auth)
    receivers.append(receiver)
    output = output_for(
        "loki",
        receiver.port,
        host="localhost",
        tls=TLS,
        credentials=BASIC_CREDENTIALS,
        tenantId="team-a",
    )
    records = ship_all(run, output, receiver)
    assert all(set(record) == {"log", "node", "_stream"} for record in records)
    streams = {json.dumps(record["_stream"], sort_keys=True) for record in records}
    assert streams == {
        json.dumps(
            {
                "job": "outrigger",
                "namespace": "shop",
                "pod": "app-7f9c-x2x4z",
                "container": "app,sidecar-writer",
            },
            sort_keys=True,
        )
    }
    assert receiver.received.paths == {"/loki/api/v1/push"}
    assert {h.get("X-Scope-OrgID") for h in receiver.received.headers} == {"team-a"}
    assert receiver.received.rejected == 0


@pytest.mark.fluentbit
def test_loki_with_a_bearer_token(run: Run, receivers: list[Any]) -> None:
    receiver = Receiver(decode_loki, auth="Bearer tok-3n.Z_x")
    receivers.append(receiver)
    ship_all(run, output_for("loki", receiver.port, credentials=TOKEN_CREDENTIALS), receiver)


@pytest.mark.fluentbit
@pytest.mark.parametrize("kind", ["elasticsearch", "opensearch"])
def test_bulk_over_tls_with_basic_auth(kind: str, run: Run, receivers: list[Any]) -> None:
    auth = basic_auth("shipper", SECRETS[("logging-auth", "password")])
    receiver = Receiver(decode_bulk, pki=run.pki, auth=auth)
    receivers.append(receiver)
    output = output_for(
        kind,
        receiver.port,
        host="localhost",
        tls=TLS,
        credentials=BASIC_CREDENTIALS,
        index="shop-logs",
    )
    records = ship_all(run, output, receiver)
    assert {(r["_index"], r["_op"]) for r in records} == {("shop-logs", "create")}
    assert all("@timestamp" in record for record in records)
    assert receiver.received.paths == {"/_bulk"}


@pytest.mark.fluentbit
def test_elasticsearch_with_an_api_key(run: Run, receivers: list[Any]) -> None:
    receiver = Receiver(decode_bulk, auth="ApiKey tok-3n.Z_x")
    receivers.append(receiver)
    output = output_for("elasticsearch", receiver.port, credentials=TOKEN_CREDENTIALS)
    ship_all(run, output, receiver)


@pytest.mark.fluentbit
def test_opentelemetry_over_https_with_a_bearer_token(run: Run, receivers: list[Any]) -> None:
    receiver = Receiver(decode_otlp_logs, pki=run.pki, auth="Bearer tok-3n.Z_x")
    receivers.append(receiver)
    output = output_for(
        "opentelemetry", receiver.port, host="localhost", tls=TLS, credentials=TOKEN_CREDENTIALS
    )
    records = ship_all(run, output, receiver)
    # The line is the body; the rest of the record, the pod's metadata, the attributes.
    assert {tuple(sorted(record["_attributes"])) for record in records} == {
        ("container", "namespace", "node", "pod")
    }
    assert receiver.received.paths == {"/v1/logs"}
    assert {h["Content-Type"] for h in receiver.received.headers} == {"application/x-protobuf"}


@pytest.mark.fluentbit
def test_http_json_lines_over_tls_with_a_bearer_token(run: Run, receivers: list[Any]) -> None:
    receiver = Receiver(decode_json_lines, pki=run.pki, auth="Bearer tok-3n.Z_x")
    receivers.append(receiver)
    output = output_for(
        "http",
        receiver.port,
        host="localhost",
        uri="/ingest/v1",
        tls=TLS,
        credentials=TOKEN_CREDENTIALS,
    )
    records = ship_all(run, output, receiver)
    assert receiver.received.paths == {"/ingest/v1"}
    assert {h["Content-Type"] for h in receiver.received.headers} == {"application/x-ndjson"}
    assert all(record["date"].endswith("Z") for record in records)  # iso8601


@pytest.mark.fluentbit
def test_forward_over_tls_with_a_shared_key(run: Run, receivers: list[Any]) -> None:
    receiver = ForwardReceiver(run.directory, shared_key="forward-secret", pki=run.pki)
    receivers.append(receiver)
    credentials = {"secret": "logging-auth", "sharedKeyKey": "shared-key"}
    output = output_for(
        "forward", receiver.port, host="localhost", tls=TLS, credentials=credentials
    )
    ship_all(run, output, receiver)


@pytest.mark.fluentbit
def test_a_receiver_failing_several_times_in_a_row_loses_nothing(
    run: Run, receivers: list[Any]
) -> None:
    """Fluent Bit's default retry_limit (1) would drop a chunk refused twice; no_limits keeps
    it until the receiver takes it (retries every second or two here, not every ~10 s)."""
    receiver = Receiver(decode_json_lines, fail_first=4)
    receivers.append(receiver)
    output = output_for("http", receiver.port)
    ship_all(run, output, receiver, service={"scheduler.base": 1, "scheduler.cap": 2})
    assert receiver.received.failing < 0  # all four refused, then taken


# What must not arrive ---------------------------------------------------------------------


def assert_nothing_arrives(fluentbit: FluentBit, receiver: Any, log_says: str) -> None:
    """Fluent Bit logs `log_says` (bounded wait) and the receiver has no record."""
    assert wait_until(lambda: log_says in fluentbit.text(), WAIT), fluentbit.text()
    fluentbit.stop()
    assert receiver.records() == []


@pytest.mark.fluentbit
def test_a_wrong_password_is_refused_and_nothing_is_shipped(run: Run, receivers: list[Any]) -> None:
    receiver = Receiver(decode_json_lines, auth=basic_auth("shipper", "the-right-one"))
    receivers.append(receiver)
    run.write(0, 10)
    fluentbit = run.start(output_for("http", receiver.port, credentials=BASIC_CREDENTIALS))
    assert_nothing_arrives(fluentbit, receiver, "HTTP status=401")
    assert receiver.received.rejected >= 1


@pytest.mark.fluentbit
def test_a_certificate_from_another_ca_is_refused(run: Run, receivers: list[Any]) -> None:
    other = make_pki(run.directory / "other", name="other")
    receiver = Receiver(decode_json_lines, pki=other)
    receivers.append(receiver)
    run.write(0, 10)
    output = output_for("http", receiver.port, host="localhost", tls=TLS)
    assert_nothing_arrives(run.start(output), receiver, "certificate verification failed")


@pytest.mark.fluentbit
def test_a_wrong_shared_key_is_refused(run: Run, receivers: list[Any]) -> None:
    receiver = ForwardReceiver(run.directory, shared_key="forward-secret")
    receivers.append(receiver)
    run.write(0, 10)
    credentials = {"secret": "logging-auth", "sharedKeyKey": "shared-key"}
    output = output_for("forward", receiver.port, credentials=credentials)
    wrong = {**SECRETS, ("logging-auth", "shared-key"): "not-the-key"}
    fluentbit = run.start(output, wrong)
    assert wait_until(lambda: "shared_key mismatch" in receiver.fluentbit.text(), WAIT), (
        fluentbit.text() + receiver.fluentbit.text()
    )
    fluentbit.stop()
    assert receiver.records() == []


@pytest.mark.fluentbit
def test_without_the_downward_api_variables_fluent_bit_does_not_start(run: Run) -> None:
    """An unset ${POD_NAME} would ship records without their pod: Fluent Bit refuses."""
    output = output_for("http", 9)  # never reached
    run.write(0, 1)
    config = run.directory / "fluent-bit.yaml"
    config.write_text(yaml.safe_dump(run._config(output)))
    fluentbit = FluentBit(["-c", str(config)], {}, run.directory / "no-env.log")
    run.stoppers.append(fluentbit.stop)
    assert wait_until(lambda: fluentbit.process.poll() is not None, STOP_TIMEOUT)
    assert fluentbit.process.returncode != 0
    assert "variable ${POD_NAME} is used but not set" in fluentbit.text()
