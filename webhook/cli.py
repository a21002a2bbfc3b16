"""`outrigger` command line: serve, inject, certs. A thin layer over the core and the server."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from webhook.core.injector import Injection, InjectionDenied
from webhook.core.policy import Policy, PolicyError, default_policy, load_policy
from webhook.core.workloads import inject_workload
from webhook.serving.certs import ca_bundle, write_certificates


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except PolicyError as error:
        print(f"outrigger: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="outrigger", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve the admission webhook over HTTPS")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8443)
    serve.add_argument(
        "--cert-dir",
        type=Path,
        default=Path("certs"),
        help="holds tls.crt and tls.key; generated for localhost if missing",
    )
    serve.add_argument(
        "--policy",
        type=Path,
        help="policy file, reloaded when its content changes (default: the embedded policy)",
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
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    serve.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one JSON object per line, the decision fields at its top level",
    )
    serve.set_defaults(run=_serve)

    inject = commands.add_parser("inject", help="inject into manifests, print the result")
    inject.add_argument(
        "-f", "--filename", required=True, help="multi-document YAML file, or - for standard input"
    )
    inject.add_argument("--policy", type=Path, help="policy file (default: the embedded policy)")
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
    check.add_argument("file", type=Path)
    check.set_defaults(run=_policy_check)

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
        "resourceVersion (for installs without Helm and CA rotation).",
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
    register.add_argument("--failure-policy", choices=["Fail", "Ignore"], default="Fail")
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
    register.add_argument(
        "--kubeconfig",
        type=Path,
        metavar="PATH",
        help="default: in-cluster credentials in a pod, else $KUBECONFIG or ~/.kube/config",
    )
    register.add_argument("--context", metavar="NAME", help="kubeconfig context")
    register.add_argument(
        "--dry-run", action="store_true", help="print the object as YAML, contact nothing"
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
    source = audit.add_mutually_exclusive_group()
    source.add_argument("--policy", type=Path, help="policy file (default: the embedded one)")
    source.add_argument(
        "--from-cluster",
        metavar="NAMESPACE/NAME",
        help="the policy the cluster runs, from the chart's ConfigMap "
        "(e.g. outrigger-system/outrigger-policy)",
    )
    audit.add_argument(
        "--webhook",
        default="outrigger",
        help="MutatingWebhookConfiguration whose namespaceSelector says which namespaces count "
        "(default: outrigger; every namespace if it does not exist)",
    )
    audit.add_argument("-o", "--output", choices=["table", "json"], default="table")
    audit.add_argument(
        "--chunk-size", type=int, default=500, help="items per list request (default: 500)"
    )
    audit.add_argument(
        "--kubeconfig", type=Path, metavar="PATH", help="default: $KUBECONFIG or ~/.kube/config"
    )
    audit.add_argument("--context", metavar="NAME", help="kubeconfig context")
    audit.set_defaults(run=_audit)
    return parser


def _policy(path: Path | None) -> Policy:
    return load_policy(path) if path else default_policy()


def _configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _serve(args: argparse.Namespace) -> int:
    from webhook.serving.server import serve  # uvicorn is only needed here

    if not 0 < args.policy_poll_seconds < float("inf"):
        print("outrigger: --policy-poll-seconds must be a positive number", file=sys.stderr)
        return 2
    _configure_logging(args.log_level, args.log_format)
    # serve() loads a --policy file before anything else: a bad one fails the start with the
    # PolicyError, which main() reports with exit status 2.
    serve(
        args.host,
        args.port,
        args.cert_dir,
        args.policy,
        args.log_level,
        poll_seconds=args.policy_poll_seconds,
    )
    return 0


def _inject(args: argparse.Namespace) -> int:
    policy = _policy(args.policy)
    try:
        documents = list(yaml.safe_load_all(_read(args.filename)))
    except (OSError, yaml.YAMLError) as error:
        print(f"outrigger: cannot read {args.filename}: {error}", file=sys.stderr)
        return 2
    report = _Report(args.namespace, policy, explain=args.explain)
    output = [report.inject(document) for document in documents if document]
    for line in report.lines:
        print(line, file=sys.stderr)
    yaml.dump_all(output, sys.stdout, Dumper=_Dumper, sort_keys=False, width=1 << 16)
    return 1 if report.failures else 0


class _Report:
    """Injects document by document; keeps the failures and, with --explain, the reasons."""

    def __init__(self, namespace: str, policy: Policy, *, explain: bool) -> None:
        self.namespace, self.policy, self.explain = namespace, policy, explain
        self.lines: list[str] = []
        self.failures = 0

    def inject(self, document: Any) -> Any:
        """The document injected; a denied object is kept unchanged and its reason recorded."""
        if not isinstance(document, dict):
            return document
        items = document.get("items")
        if document.get("kind") == "List" and isinstance(items, list):
            return {**document, "items": [self.inject(item) for item in items]}
        try:
            injected, injection = inject_workload(document, self.namespace, self.policy)
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
        self.lines += [f"  {line}" for line in injection.explanation]
        self.lines += [f"  warning: {warning}" for warning in injection.warnings]


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
            body, kubeconfig=args.kubeconfig, context=args.context
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


def _audit(args: argparse.Namespace) -> int:
    from webhook.cluster import audit  # the kubernetes client is only needed here

    if args.chunk_size < 1:
        print("outrigger: --chunk-size must be at least 1", file=sys.stderr)
        return 2
    if args.from_cluster is not None and "/" not in args.from_cluster:
        print("outrigger: --from-cluster takes NAMESPACE/NAME", file=sys.stderr)
        return 2
    policy = load_policy(args.policy) if args.policy else None
    scope = audit.Scope(args.namespace, args.webhook, args.chunk_size)
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


class _Dumper(yaml.SafeDumper):
    """Plain YAML: the injector shares sub-objects, which must not come out as &anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True
