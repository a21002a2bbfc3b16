"""`outrigger` command line: serve the webhook, inject into manifests, check and compile
policies, make certificates, register the webhook, audit, explain and roll out what runs. A
thin layer over the core and the server."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from webhook.core.compiled import CompiledPolicy, Subject, compile_policy
from webhook.core.injector import Injection, InjectionDenied
from webhook.core.policy import (
    OWN_NAMESPACE_ENV,
    Policy,
    PolicyError,
    default_policy,
    load_policy,
)
from webhook.core.workloads import inject_workload, pod_template_metadata
from webhook.limits import printable, printable_lines
from webhook.serving.certs import ca_bundle, write_certificates

if TYPE_CHECKING:
    from webhook.serving.app import Background
    from webhook.serving.metrics import Metrics
    from webhook.serving.server import CertificateSource, PolicySource


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except PolicyError as error:
        print(f"outrigger: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _reader_gone()


def _reader_gone() -> int:
    """The reader of our output went away (`... | head`): exit quietly, as kubectl does.
    What is still buffered for stdout goes nowhere, so that flushing it at exit raises no
    second BrokenPipeError (Python's documented recipe); exit status 141, as a shell reports
    a process ended by SIGPIPE."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="outrigger", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve the admission webhook over HTTPS")
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    serve.add_argument("--port", type=int, default=8443, help="HTTPS port (default: 8443)")
    serve.add_argument(
        "--cert-dir",
        type=Path,
        default=Path("certs"),
        help="holds tls.crt and tls.key; generated for localhost if missing",
    )
    policy_from = serve.add_mutually_exclusive_group()
    policy_from.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help="policy file, reloaded when its content changes (default: the embedded policy)",
    )
    policy_from.add_argument(
        "--policy-configmap",
        metavar="NAMESPACE/NAME",
        help="the policy from this ConfigMap, watched through the Kubernetes API: a change "
        "applies within a second on every replica",
    )
    serve.add_argument(
        "--policy-poll-seconds",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how often the policy file and the serving certificate are checked for changes "
        "(default: 5)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="info: one line per decision that is not a plain skip (default: info)",
    )
    serve.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one JSON object per line, the decision fields at its top level",
    )
    serve.add_argument(
        "--decision-log-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="injections are logged as one line per owner, sidecars and policy, listing each "
        "pod, written at most SECONDS after its first pod; 0: a line per injection (default: "
        "1, at most 60). Denials, refusals and errors are a line each, at once",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=1000,
        metavar="N",
        help="client connections open at once; at the cap a new one replaces the oldest silent "
        "or idle one (default: 1000, fewer if the open-file limit is lower)",
    )
    _self_tls_arguments(serve)
    _compiled_policy_arguments(serve)
    serve.add_argument(
        "--events",
        action="store_true",
        help="record denials, warnings and policy mismatches as Kubernetes Events on the pod's "
        "owner (at most one per owner and reason a minute; needs create and patch on events)",
    )
    serve.set_defaults(run=_serve)

    inject = commands.add_parser("inject", help="inject into manifests, print the result")
    inject.add_argument(
        "-f", "--filename", required=True, help="multi-document YAML file, or - for standard input"
    )
    inject.add_argument(
        "--policy", type=Path, metavar="FILE", help="policy file (default: the embedded policy)"
    )
    inject.add_argument(
        "-n",
        "--namespace",
        default="default",
        help="namespace for objects that name none (default: default)",
    )
    inject.add_argument(
        "--explain",
        action="store_true",
        help="say on stderr, per workload, what was injected or skipped and why",
    )
    inject.set_defaults(run=_inject)

    policy = commands.add_parser("policy", help="work with policy files")
    policy_commands = policy.add_subparsers(required=True, metavar="COMMAND")
    check = policy_commands.add_parser("check", help="validate a policy file offline")
    check.add_argument("file", type=Path, help="the policy file")
    check.set_defaults(run=_policy_check)
    compile_ = policy_commands.add_parser(
        "compile",
        help="print the policy compiled for the API server: the webhook configuration's "
        "matchConditions and the guard (a ValidatingAdmissionPolicy and its binding), as YAML",
    )
    compile_.add_argument(
        "--policy", type=Path, metavar="FILE", help="policy file (default: the embedded one)"
    )
    compile_.add_argument(
        "--webhook-name",
        default="outrigger",
        metavar="NAME",
        help="the MutatingWebhookConfiguration's name; the guard is NAME-guard (default: "
        "outrigger)",
    )
    compile_.add_argument(
        "--namespace",
        default=os.environ.get(OWN_NAMESPACE_ENV),
        metavar="NAMESPACE",
        help="the webhook's namespace, never injected (default: $POD_NAMESPACE)",
    )
    compile_.add_argument(
        "--injection-mode",
        choices=["opt-in", "opt-out"],
        default="opt-in",
        help="the namespaces the webhook configuration selects, which the guard follows "
        "(default: opt-in)",
    )
    _guard_argument(compile_)
    compile_.set_defaults(run=_policy_compile)

    certs = commands.add_parser("certs", help="make a CA and a serving certificate")
    certs.add_argument("--dns", nargs="*", default=[], metavar="NAME", help="DNS names (SANs)")
    certs.add_argument("--ip", nargs="*", default=[], metavar="IP", help="IP addresses (SANs)")
    certs.add_argument("--out", type=Path, default=Path("certs"), help="output directory")
    certs.add_argument("--days", type=int, default=365, help="validity in days")
    certs.set_defaults(run=_certs)

    register = commands.add_parser(
        "register",
        help="create or update the MutatingWebhookConfiguration in the cluster",
        description="Create the MutatingWebhookConfiguration, or replace it keeping its "
        "resourceVersion (for installs without Helm and CA rotation); --delete removes it. A "
        "configuration that Helm, Argo CD, Flux or another server-side apply manager manages "
        "is left alone (the message says what to run instead) unless --force is given.",
    )
    register.add_argument("--name", default="outrigger", help="object name (default: outrigger)")
    register.add_argument("--namespace", required=True, help="namespace of the webhook's Service")
    register.add_argument(
        "--service", default="outrigger", help="the webhook's Service (default: outrigger)"
    )
    ca = register.add_mutually_exclusive_group()
    ca.add_argument(
        "--ca-file",
        type=Path,
        default=Path("certs/ca.crt"),
        metavar="PATH",
        help="PEM CA of the serving certificate (default: certs/ca.crt)",
    )
    ca.add_argument("--ca-bundle", metavar="BASE64", help="the CA as base64 of the PEM")
    register.add_argument(
        "--failure-policy",
        choices=["Fail", "Ignore"],
        default="Fail",
        help="what the API server does when it cannot call the webhook (default: Fail)",
    )
    register.add_argument(
        "--timeout-seconds",
        type=int,
        default=5,
        metavar="1-30",
        help="how long the API server waits for the webhook (default: 5)",
    )
    register.add_argument(
        "--injection-mode",
        choices=["opt-in", "opt-out"],
        default="opt-in",
        help="opt-in: namespaces labelled outrigger.dev/injection=enabled; opt-out: all but "
        "those labelled outrigger.dev/injection=disabled (default: opt-in)",
    )
    _cluster_arguments(register)
    register.add_argument(
        "--dry-run", action="store_true", help="print the object as YAML, contact nothing"
    )
    register.add_argument(
        "--delete",
        action="store_true",
        help="delete the configuration instead (preconditioned on what was read)",
    )
    register.add_argument(
        "--force",
        action="store_true",
        help="replace or delete a configuration that another tool manages (its next sync may "
        "undo it, fail, or leave the object behind)",
    )
    register.set_defaults(run=_register)

    audit = commands.add_parser(
        "audit",
        help="list running pods that miss their sidecars, or carry stale or mismatched ones",
        description="Classify running pods with the webhook's own injector: missing (should "
        "have a sidecar, has none), stale (injected under another policy version), "
        "mismatched (the status claims what the pod does not hold); grouped by workload, "
        "each with the command that fixes it. Exit status 1 when anything is found.",
    )
    where = audit.add_mutually_exclusive_group()
    where.add_argument("-n", "--namespace", help="one namespace")
    where.add_argument(
        "-A", "--all-namespaces", action="store_true", help="every namespace (the default)"
    )
    _cluster_policy_arguments(audit)
    audit.add_argument(
        "-o",
        "--output",
        choices=["table", "json"],
        default="table",
        help="table for people, json for tools (default: table)",
    )
    audit.add_argument(
        "--chunk-size",
        type=int,
        default=500,
        metavar="N",
        help="items per list request (default: 500)",
    )
    audit.add_argument(
        "--kubeconfig", type=Path, metavar="PATH", help="default: $KUBECONFIG or ~/.kube/config"
    )
    audit.add_argument("--context", metavar="NAME", help="kubeconfig context")
    audit.set_defaults(run=_audit)

    explain = commands.add_parser(
        "explain",
        help="say why a live workload's pods are, or are not, injected",
        description="Read a workload, its namespace, the webhook configuration and the policy "
        "from the cluster and say whether the API server calls the webhook for its pods, "
        "which sidecars the policy gives them and which rule decided, whether its running "
        "pods match, and the mistakes found. Exit status 0 when it is injected as expected "
        "(or not injected, as the policy says), 1 when it will not be or something is "
        "mistaken, 2 when the cluster cannot be read.",
    )
    explain.add_argument(
        "target",
        metavar="KIND/NAME",
        help="deployment/web, statefulset/db, daemonset/, replicaset/, job/, cronjob/, pod/ "
        "(or kubectl's short names deploy, sts, ds, rs, cj, po)",
    )
    explain.add_argument(
        "-n", "--namespace", help="default: the kubeconfig context's namespace, else default"
    )
    _cluster_policy_arguments(explain)
    explain.add_argument(
        "-o",
        "--output",
        choices=["text", "json"],
        default="text",
        help="text for people, json for tools (default: text)",
    )
    _cluster_arguments(explain)
    explain.set_defaults(run=_explain_live)

    rollout = commands.add_parser(
        "rollout",
        help="restart the workloads audit finds, wave by wave (only a plan without --apply)",
        description="Bring the workloads `audit` finds (missing, stale, mismatched) up to the "
        "policy in force: Deployments, StatefulSets and DaemonSets get the change `kubectl "
        "rollout restart` makes (their own strategy paces the replacement), bare pods an "
        "eviction with --include-pods; Jobs, CronJobs and other pods are listed, left alone. "
        "At most --max-workloads at once: the next wave starts when every pod of the last is "
        "Ready and audits clean. Prints the plan and changes nothing without --apply. Exit "
        "status 1 when a wave fails or times out, 2 when the cluster cannot be read.",
    )
    rollout.add_argument("-n", "--namespace", help="one namespace (default: every namespace)")
    rollout.add_argument(
        "-l", "--selector", metavar="SELECTOR", help="only pods with these labels (app=web)"
    )
    _cluster_policy_arguments(rollout)
    rollout.add_argument(
        "--max-workloads", type=int, default=1, metavar="N", help="restarted at once (default: 1)"
    )
    rollout.add_argument(
        "--timeout",
        type=parse_duration,
        default="10m",
        metavar="DURATION",
        help="for one wave (default: 10m)",
    )
    rollout.add_argument(
        "--include-pods",
        action="store_true",
        help="evict bare pods too: they do not come back unless something creates them again",
    )
    rollout.add_argument("--apply", action="store_true", help="run the plan (default: print it)")
    rollout.add_argument(
        "-o", "--output", choices=["table", "json"], default="table", help="json: a line per event"
    )
    _cluster_arguments(rollout)
    rollout.set_defaults(run=_rollout)
    return parser


def _cluster_policy_arguments(command: argparse.ArgumentParser) -> None:
    """Which policy and webhook configuration `audit`, `explain` and `rollout` judge by."""
    source = command.add_mutually_exclusive_group()
    source.add_argument(
        "--policy", type=Path, metavar="FILE", help="policy file (default: the embedded one)"
    )
    source.add_argument(
        "--from-cluster",
        type=_namespaced_name,
        metavar="NAMESPACE/NAME",
        help="the policy the cluster runs, from the chart's ConfigMap "
        "(e.g. outrigger-system/outrigger-policy)",
    )
    command.add_argument(
        "--webhook",
        default="outrigger",
        metavar="NAME",
        help="MutatingWebhookConfiguration whose namespaceSelector says which namespaces count "
        "(default: outrigger; every namespace if it does not exist)",
    )


def _namespaced_name(text: str) -> str:
    namespace, _, name = text.partition("/")
    if not namespace or not name or "/" in name:
        raise argparse.ArgumentTypeError("takes NAMESPACE/NAME")
    return text


def _self_tls_arguments(serve: argparse.ArgumentParser) -> None:
    tls = serve.add_argument_group(
        "self-managed TLS (--tls-source self)",
        "The webhook keeps its CA and serving certificate in a Secret of its namespace, "
        "renews them, and publishes the CA in its MutatingWebhookConfiguration; --cert-dir "
        "must be writable. Durations take the units s, m, h and d (2160h, 30d, 90s).",
    )
    tls.add_argument(
        "--tls-source",
        choices=["files", "self"],
        default="files",
        help="files: tls.crt and tls.key in --cert-dir, from a mounted Secret (default); "
        "self: managed by the webhook through the Kubernetes API",
    )
    tls.add_argument(
        "--self-tls-namespace",
        default=os.environ.get(OWN_NAMESPACE_ENV),
        metavar="NAMESPACE",
        help="namespace of the Secret and of the Service (default: $POD_NAMESPACE)",
    )
    tls.add_argument(
        "--self-tls-secret",
        default="outrigger-self-tls",
        metavar="NAME",
        help="the Secret holding the CA and the certificate (default: outrigger-self-tls)",
    )
    tls.add_argument(
        "--self-tls-webhook",
        default="outrigger",
        metavar="NAME",
        help="MutatingWebhookConfiguration whose caBundle is kept (default: outrigger)",
    )
    tls.add_argument(
        "--self-tls-service",
        default="outrigger",
        metavar="NAME",
        help="Service the API server calls: the certificate is for NAME, NAME.NAMESPACE and "
        "NAME.NAMESPACE.svc (default: outrigger)",
    )
    durations = (
        ("--self-tls-cert-validity", "2160h", "lifetime of a serving certificate"),
        ("--self-tls-renew-before", "720h", "renew a serving certificate expiring within this"),
        ("--self-tls-ca-validity", "87600h", "lifetime of a CA"),
        ("--self-tls-ca-overlap", "10m", "how long a new CA is published before it signs"),
    )
    for flag, default, meaning in durations:
        tls.add_argument(
            flag,
            type=parse_duration,
            default=default,
            metavar="DURATION",
            help=f"{meaning} (default: {default})",
        )
    tls.add_argument(
        "--self-tls-sync-seconds",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how often the Secret and the caBundle are checked (default: 60)",
    )
    api = serve.add_argument_group("Kubernetes API (--tls-source self, --policy-configmap)")
    api.add_argument(
        "--policy-configmap-key",
        default="policy.yaml",
        metavar="KEY",
        help="the ConfigMap's key holding the policy (default: policy.yaml)",
    )
    api.add_argument(
        "--api-startup-seconds",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long the first calls (the certificate's sync, the policy's list) are retried "
        "before the start fails (default: 120)",
    )
    _cluster_arguments(api)


def _compiled_policy_arguments(serve: argparse.ArgumentParser) -> None:
    compiled = serve.add_argument_group(
        "the policy compiled into the API server",
        "The webhook keeps its configuration's matchConditions (pods the policy cannot change "
        "are admitted without a call) and a guard (a ValidatingAdmissionPolicy and binding "
        "NAME-guard, refusing a pod that lacks a required sidecar or whose injected sidecars "
        "were broken after injection) compiled from the policy in force.",
    )
    compiled.add_argument(
        "--compiled-policy-webhook",
        metavar="NAME",
        help="the MutatingWebhookConfiguration to keep them for (default: none kept)",
    )
    compiled.add_argument(
        "--match-conditions",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the matchConditions (default: yes)",
    )
    _guard_argument(compiled)
    compiled.add_argument(
        "--compiled-policy-sync-seconds",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how often they are applied again besides each policy change (default: 60)",
    )


def _guard_argument(group: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--guard",
        choices=["Deny", "Warn", "Audit", "Off"],
        default="Deny",
        help="the guard binding's action; Off: no guard (default: Deny)",
    )


def _cluster_arguments(group: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """How a command that talks to the API server finds it."""
    group.add_argument(
        "--kubeconfig",
        type=Path,
        metavar="PATH",
        help="default: in-cluster credentials in a pod, else $KUBECONFIG or ~/.kube/config",
    )
    group.add_argument("--context", metavar="NAME", help="kubeconfig context")


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> datetime.timedelta:
    """`2160h`, `1h30m`, `90s`, `30d`: one or more numbers, each with a unit (s, m, h, d)."""
    parts = _DURATION.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: expected numbers with units s, m, h or d, e.g. 2160h"
        )
    seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    if not 0 < seconds <= 100 * 365 * 86400:
        raise argparse.ArgumentTypeError(f"duration {text!r} must be positive, at most 100 years")
    return datetime.timedelta(seconds=seconds)


def _policy(path: Path | None) -> Policy:
    return load_policy(path) if path else default_policy()


def _serve(args: argparse.Namespace) -> int:
    """`outrigger serve`: with `--log-format json` even a refused start is a JSON line."""
    from webhook.serving.logs import configure_logging, report

    interval = args.decision_log_interval
    configure_logging(args.log_level, args.log_format, interval if _interval_ok(interval) else 0)
    try:
        return _serving(args)
    except _ServeRefused as refusal:
        report(f"outrigger: {refusal}")
        return 2
    except PolicyError as error:
        report(f"outrigger: {error}")
        return 2
    except SystemExit as exit_:
        if not isinstance(exit_.code, str):
            raise
        report(exit_.code)
        return 1


def _interval_ok(seconds: float) -> bool:
    return 0 <= seconds <= MAX_DECISION_LOG_INTERVAL


# A summarised injection waits at most this long for its line.
MAX_DECISION_LOG_INTERVAL = 60


class _ServeRefused(Exception):
    """A setting `serve` cannot start with (exit status 2)."""


def _serving(args: argparse.Namespace) -> int:
    from webhook.serving.metrics import Metrics
    from webhook.serving.server import serve  # uvicorn is only needed here

    if not 0 < args.policy_poll_seconds < float("inf"):
        raise _ServeRefused("--policy-poll-seconds must be a positive number")
    if not 0 < args.api_startup_seconds < float("inf"):
        raise _ServeRefused("--api-startup-seconds must be a positive number")
    if args.max_connections < 1:
        raise _ServeRefused("--max-connections must be at least 1")
    if not _interval_ok(args.decision_log_interval):
        raise _ServeRefused(
            f"--decision-log-interval must be 0 to {MAX_DECISION_LOG_INTERVAL} seconds"
        )
    # One bound for all the first API calls (the policy's list, then the certificate's sync),
    # which the chart's startupProbe outlasts.
    args.api_deadline = time.monotonic() + args.api_startup_seconds
    metrics = Metrics()
    source = None
    try:
        if args.tls_source == "self":
            source = _self_managed_tls(args, metrics)
        policy_source = _watched_policy(args, metrics) if args.policy_configmap else None
    except ValueError as error:
        raise _ServeRefused(str(error)) from None
    # serve() loads a --policy file before anything else: a bad one fails the start with the
    # PolicyError, which main() reports with exit status 2.
    if args.compiled_policy_webhook:
        if not 0 < args.compiled_policy_sync_seconds < float("inf"):
            raise _ServeRefused("--compiled-policy-sync-seconds must be a positive number")
        try:
            configuration = _api_configuration(args)
        except ValueError as error:
            raise _ServeRefused(str(error)) from None
        keeping = _compiled_policy(args, configuration, metrics)
    else:
        keeping = None
    try:
        decisions = _recorded_events(args, metrics) if args.events else None
    except ValueError as error:
        raise _ServeRefused(str(error)) from None
    serve(
        args.host,
        args.port,
        args.cert_dir,
        args.policy,
        args.log_level,
        poll_seconds=args.policy_poll_seconds,
        certificate_source=source,
        policy_source=policy_source,
        metrics=metrics,
        compiled_policy=keeping,
        max_connections=args.max_connections,
        decisions=decisions,
        own_namespace=_own_namespace(),
    )
    return 0


def _own_namespace() -> str:
    """The webhook's namespace, never injected into: $POD_NAMESPACE (the chart sets it from
    the downward API), read here and handed on to the core, which reads no environment."""
    return os.environ.get(OWN_NAMESPACE_ENV, "")


def _recorded_events(args: argparse.Namespace, metrics: Metrics) -> Any:
    """`--events`: the decisions worth an Event, sent beside the server (DecisionSink)."""
    from webhook.cluster.events import EventRecorder, EventSender
    from webhook.serving.server import DecisionSink

    recorder = EventRecorder(EventSender(_api_configuration(args)), metrics)
    return DecisionSink(recorder.observe, recorder.running)


def _compiled_policy(args: argparse.Namespace, configuration: Any, metrics: Metrics) -> Any:
    """What keeps the compiled policy, given the policy in force once the server has it."""
    from webhook.cluster.compiledpolicy import CompiledPolicySync, Settings

    actions = () if args.guard == "Off" else (args.guard,)
    settings = Settings(args.compiled_policy_webhook, args.match_conditions, actions)

    def keeping(policy: Callable[[], Policy]) -> Background:
        return CompiledPolicySync(
            settings,
            policy,
            configuration,
            own_namespace=_own_namespace(),
            interval=args.compiled_policy_sync_seconds,
            metrics=metrics,
        ).watching

    return keeping


def _watched_policy(args: argparse.Namespace, metrics: Metrics) -> PolicySource:
    """The `--policy-configmap` policy, listed now: a bad first version raises PolicyError
    (exit status 2); an API server still out of reach after the startup bound ends the start."""
    from webhook.cluster import policywatch
    from webhook.serving.server import PolicySource

    namespace, _, name = args.policy_configmap.partition("/")
    if not namespace or not name or "/" in name:
        raise ValueError("--policy-configmap takes NAMESPACE/NAME")
    configuration = _api_configuration(args)
    watch = policywatch.PolicyWatch(
        namespace, name, configuration, key=args.policy_configmap_key, metrics=metrics
    )
    try:
        slot = watch.start(_remaining(args.api_deadline))
    except policywatch.PolicyWatchError as error:
        raise SystemExit(f"outrigger: {error} ({_gave_up(args)})") from None
    return PolicySource(slot.current, watch.watching, watch.origin)


def _gave_up(args: argparse.Namespace) -> str:
    return f"gave up after {args.api_startup_seconds:g}s, --api-startup-seconds"


def _api_configuration(args: argparse.Namespace) -> Any:
    """The client configuration `serve` calls the API with, loaded once for all its users
    (self TLS, the policy watch, the compiled policy); ValueError when it cannot load."""
    from webhook.cluster import registration

    if getattr(args, "api_configuration", None) is None:
        try:
            args.api_configuration = registration.client_configuration(
                args.kubeconfig, args.context
            )
        except registration.RegistrationError as error:
            raise ValueError(str(error)) from None
    return args.api_configuration


def _remaining(deadline: float) -> float:
    """Seconds left until `deadline` (at least one attempt's worth)."""
    return max(deadline - time.monotonic(), 1.0)


def _self_managed_tls(args: argparse.Namespace, metrics: Metrics) -> CertificateSource:
    """The `--tls-source self` certificate source; ValueError for an unusable option."""
    from webhook.cluster import selftls  # the kubernetes client is only needed here
    from webhook.serving.authority import Settings
    from webhook.serving.server import CertificateSource

    namespace, service = args.self_tls_namespace, args.self_tls_service
    if not namespace:
        raise ValueError("--tls-source self needs --self-tls-namespace (or $POD_NAMESPACE)")
    if not 0 < args.self_tls_sync_seconds < float("inf"):
        raise ValueError("--self-tls-sync-seconds must be a positive number")
    settings = Settings(
        dns_names=(service, f"{service}.{namespace}", f"{service}.{namespace}.svc"),
        cert_validity=args.self_tls_cert_validity,
        renew_before=args.self_tls_renew_before,
        ca_validity=args.self_tls_ca_validity,
        ca_overlap=args.self_tls_ca_overlap,
    )
    configuration = _api_configuration(args)
    target = selftls.Target(namespace, args.self_tls_secret, args.self_tls_webhook)
    manager = selftls.SelfManagedTLS(
        target,
        settings,
        args.cert_dir,
        configuration,
        interval=args.self_tls_sync_seconds,
        metrics=metrics,
    )
    deadline = args.api_deadline

    def prepare() -> None:
        try:
            manager.start(_remaining(deadline))
        except selftls.SelfTLSError as error:
            raise SystemExit(f"outrigger: {error} ({_gave_up(args)})") from None
        except Exception as error:  # a bug: its trace goes to the log, the exit says so
            logging.getLogger("outrigger.selftls").exception("self-managed TLS failed")
            raise SystemExit(f"outrigger: self-managed TLS failed: {error!r}") from None

    return CertificateSource(prepare, manager.watching)


def _inject(args: argparse.Namespace) -> int:
    policy = _policy(args.policy)
    try:
        documents = list(yaml.safe_load_all(_read(args.filename)))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        # PyYAML's message quotes the input's line: escaped, line by line.
        message = printable_lines(f"cannot read {args.filename}: {error}")
        print(f"outrigger: {message}", file=sys.stderr)
        return 2
    report = _Report(args.namespace, policy, explain=args.explain)
    output = [report.inject(document) for document in documents if document]
    for line in report.lines:  # names, annotation keys, messages: the input's, escaped
        print(printable(line), file=sys.stderr)
    yaml.dump_all(output, sys.stdout, Dumper=_Dumper, sort_keys=False, width=1 << 16)
    return 1 if report.failures else 0


class _Report:
    """Injects document by document; keeps the failures and, with --explain, the reasons."""

    def __init__(self, namespace: str, policy: Policy, *, explain: bool) -> None:
        self.namespace, self.policy, self.explain = namespace, policy, explain
        self.lines: list[str] = []
        self.failures = 0
        self._compiled: CompiledPolicy | None = None

    def inject(self, document: Any) -> Any:
        """The document injected; a denied object is kept unchanged and its reason recorded."""
        if not isinstance(document, dict):
            return document
        items = document.get("items")
        if document.get("kind") == "List" and isinstance(items, list):
            return {**document, "items": [self.inject(item) for item in items]}
        try:
            injected, injection = inject_workload(
                document, self.namespace, self.policy, _own_namespace()
            )
        except InjectionDenied as error:
            self.failures += 1
            self.lines.append(f"outrigger: {_describe(document)}: {error}")
            return document
        if self.explain and injection is not None:
            self._explain(document, injection)
        return injected

    def _explain(self, document: dict[str, Any], injection: Injection) -> None:
        namespace = (document.get("metadata") or {}).get("namespace") or self.namespace
        outcome = (
            f"injected {', '.join(injection.injected)}"
            if injection.injected
            else f"nothing injected ({injection.reason})"
        )
        self.lines.append(f"{_describe(document)} in namespace {namespace}: {outcome}")
        self.lines.append(f"  {self._api_server_call(document, namespace)}")
        self.lines += [f"  {line}" for line in injection.explanation]
        self.lines += [f"  warning: {warning}" for warning in injection.warnings]

    def _api_server_call(self, document: dict[str, Any], namespace: str) -> str:
        """Whether the API server calls the webhook for its pods, by the compiled policy."""
        if self._compiled is None:
            self._compiled = compile_policy(self.policy, _own_namespace())
        metadata = pod_template_metadata(document)
        subject = Subject(
            namespace, metadata.get("labels") or {}, metadata.get("annotations") or {}
        )
        call, why = self._compiled.decides(subject)
        verb = "calls the webhook" if call else "admits its pods without calling the webhook"
        return f"API server: {verb} ({why})"


def _describe(document: Any) -> str:
    if not isinstance(document, dict):
        return "document"
    name = (document.get("metadata") or {}).get("name", "?")
    return f"{document.get('kind', '?')}/{name}"


def _read(filename: str) -> str:
    return sys.stdin.read() if filename == "-" else Path(filename).read_text(encoding="utf-8")


def _policy_check(args: argparse.Namespace) -> int:
    policy = load_policy(args.file)  # a PolicyError is reported by main(), exit status 2
    names = ", ".join(policy.templates)
    print(
        f"{args.file}: valid, version {policy.version}: {len(policy.sidecars)} sidecar "
        f"templates ({names}), {len(policy.rules)} rules"
    )
    return 0


def _policy_compile(args: argparse.Namespace) -> int:
    from webhook.cluster import compiledpolicy, registration

    policy = _policy(args.policy)
    compiled = compile_policy(policy, args.namespace)
    for problem in compiled.problems:
        print(f"outrigger: warning: {problem}", file=sys.stderr)
    selector = registration.namespace_selector(args.injection_mode, args.namespace)
    actions = () if args.guard == "Off" else (args.guard,)
    documents = [
        compiledpolicy.configuration_apply(compiled, args.webhook_name, [registration.WEBHOOK_NAME])
    ]
    if actions:
        name = args.webhook_name + compiledpolicy.GUARD_SUFFIX
        documents += compiledpolicy.guard_objects(compiled, name, selector, actions)
    print(f"# Outrigger policy {compiled.version}, compiled", file=sys.stdout)
    yaml.dump_all(documents, sys.stdout, Dumper=_Dumper, sort_keys=False, width=1 << 16)
    return 0


def _certs(args: argparse.Namespace) -> int:
    try:
        paths = write_certificates(args.out, args.dns, args.ip, days=args.days)
    except ValueError as error:
        print(f"outrigger: {error}", file=sys.stderr)
        return 2
    print(f"wrote {paths.ca_cert}, {paths.cert}, {paths.key}", file=sys.stderr)
    print(ca_bundle(paths.ca_cert))
    return 0


def _register(args: argparse.Namespace) -> int:
    from webhook.cluster import registration  # the kubernetes client is only needed here

    if args.delete:
        return _unregister(args, registration)
    try:
        ca = registration.load_ca_bundle(
            None if args.ca_bundle is not None else args.ca_file, args.ca_bundle
        )
        body = registration.webhook_configuration(
            name=args.name,
            namespace=args.namespace,
            service=args.service,
            ca_bundle=ca,
            failure_policy=args.failure_policy,
            timeout_seconds=args.timeout_seconds,
            injection_mode=args.injection_mode,
        )
        if args.dry_run:
            yaml.dump(body, sys.stdout, Dumper=_Dumper, sort_keys=False, width=1 << 16)
            return 0
        outcome = registration.apply_configuration(
            body, kubeconfig=args.kubeconfig, context=args.context, force=args.force
        )
    except (ValueError, registration.RegistrationError) as error:
        print(f"outrigger: {error}", file=sys.stderr)
        return 2
    versions = f"resourceVersion {outcome.resource_version}"
    if outcome.action == "replaced":
        versions = (
            f"resourceVersion {outcome.previous_resource_version} -> {outcome.resource_version}"
        )
    retried = f", after {outcome.conflicts} conflict(s)" if outcome.conflicts else ""
    print(
        f"mutatingwebhookconfiguration/{args.name} {outcome.action} ({versions}{retried}): "
        f"webhook {registration.WEBHOOK_NAME} -> service {args.namespace}/{args.service}:"
        f"{registration.SERVICE_PORT}{registration.WEBHOOK_PATH}, failurePolicy "
        f"{args.failure_policy}, timeout {args.timeout_seconds}s, {args.injection_mode}"
    )
    return 0


def _unregister(args: argparse.Namespace, registration: Any) -> int:
    try:
        deletion = registration.delete_configuration(
            args.name, kubeconfig=args.kubeconfig, context=args.context, force=args.force
        )
    except registration.RegistrationError as error:
        print(f"outrigger: {error}", file=sys.stderr)
        return 2
    if deletion.deleted:
        print(f"mutatingwebhookconfiguration/{args.name} deleted (was resourceVersion "
              f"{deletion.resource_version})")  # fmt: skip
    else:
        print(f"mutatingwebhookconfiguration/{args.name} does not exist: nothing to delete")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from webhook.cluster import audit  # the kubernetes client is only needed here

    if args.chunk_size < 1:
        print("outrigger: --chunk-size must be at least 1", file=sys.stderr)
        return 2
    policy = load_policy(args.policy) if args.policy else None
    scope = audit.Scope(
        args.namespace, args.webhook, args.chunk_size, own_namespace=_own_namespace()
    )
    try:
        policy, groups = audit.run_audit(
            args.kubeconfig, args.context, scope, policy, args.from_cluster
        )
    except audit.AuditError as error:
        print(f"outrigger: {error}", file=sys.stderr)
        return 2
    render = audit.render_json if args.output == "json" else audit.render_table
    sys.stdout.write(render(policy, groups))
    return 1 if groups else 0


def _explain_live(args: argparse.Namespace) -> int:
    """`outrigger explain KIND/NAME`: the live counterpart of `inject --explain`."""
    from webhook.cluster import explain  # the kubernetes client is only needed here
    from webhook.core.explain import render_json, render_text

    policy = load_policy(args.policy) if args.policy else None
    request = explain.Request(args.target, args.namespace, args.webhook, policy, args.from_cluster)
    try:
        result = explain.run_explain(args.kubeconfig, args.context, request)
    except explain.ExplainError as error:
        print(f"outrigger: {printable(str(error))}", file=sys.stderr)
        return 2
    sys.stdout.write(render_json(result) if args.output == "json" else render_text(result))
    return result.exit_status


def _rollout(args: argparse.Namespace) -> int:
    from webhook.cluster import audit, rollout  # the kubernetes client is only needed here

    if args.max_workloads < 1:
        print("outrigger: --max-workloads must be at least 1", file=sys.stderr)
        return 2
    policy = load_policy(args.policy) if args.policy else None
    scope = audit.Scope(
        args.namespace, args.webhook, selector=args.selector, own_namespace=_own_namespace()
    )
    options = rollout.Options(
        args.apply, args.include_pods, args.max_workloads, args.timeout.total_seconds()
    )
    try:
        finished = rollout.run_rollout(
            args.kubeconfig, args.context, scope, policy, args.from_cluster, options,
            rollout.reporter_for(args.output),
        )  # fmt: skip
    except audit.AuditError as error:
        print(f"outrigger: {printable(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("outrigger: interrupted: what was restarted keeps rolling out", file=sys.stderr)
        return 130
    return 0 if finished else 1


class _Dumper(yaml.SafeDumper):
    """Plain YAML: the injector shares sub-objects, which must not come out as &anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True
