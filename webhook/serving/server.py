"""Serving over HTTPS: certificates, TLS settings and uvicorn, around `webhook.serving.app`."""

from __future__ import annotations

import gc
import importlib.machinery
import logging
import resource
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from webhook.admission import review
from webhook.core.policy import Policy, default_policy
from webhook.serving.app import AdmissionEndpoint, Background, DecisionObserver, create_app
from webhook.serving.certs import CertificatePaths, ensure_serving_certificates
from webhook.serving.connections import (
    DEFAULT_MAX_CONNECTIONS,
    RESERVED_DESCRIPTORS,
    ConnectionGate,
    tls_connections,
)
from webhook.serving.decisions import summaries_written
from webhook.serving.memory import return_freed_memory
from webhook.serving.metrics import Metrics
from webhook.serving.reload import PolicyFile
from webhook.serving.tls import CertificateError, ServingCertificate

log = logging.getLogger("outrigger.server")
# At most this long from SIGTERM to exit: in-flight requests and draining connections
# (the chart's terminationGracePeriodSeconds covers its preStop delay plus this).
SHUTDOWN_SECONDS = 10


@dataclass(frozen=True)
class CertificateSource:
    """What puts the serving pair into the certificate directory before the server starts
    (`prepare`, which raises SystemExit with a message when it cannot) and keeps it current
    while it serves (`keeping`): `webhook.cluster.selftls` for `--tls-source self`."""

    prepare: Callable[[], None]
    keeping: Background


@dataclass(frozen=True)
class DecisionSink:
    """What is told of each decision after it is answered (`observe`, on the event loop),
    and what runs beside the server for it (`keeping`): `webhook.cluster.events`."""

    observe: DecisionObserver
    keeping: Background


@dataclass(frozen=True)
class PolicySource:
    """A policy kept current by something other than a file poll (`--policy-configmap`):
    what is in force now, what keeps it so while the server runs, and where it comes from."""

    current: Callable[[], Policy]
    keeping: Background
    origin: str


def serve(
    host: str,
    port: int,
    cert_dir: Path,
    policy_path: Path | None,
    log_level: str = "info",
    poll_seconds: float = 5.0,
    *,
    certificate_source: CertificateSource | None = None,
    policy_source: PolicySource | None = None,
    metrics: Metrics | None = None,
    compiled_policy: Callable[[Callable[[], Policy]], Background] | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    decisions: DecisionSink | None = None,
    own_namespace: str = "",
) -> None:
    """Serve until interrupted; generates development certificates if `cert_dir` has none.

    With `policy_path` the policy is loaded first, so that a bad file raises `PolicyError`
    before anything is generated or served, and then reloaded whenever the file's content
    changes (polled every `poll_seconds`). A `policy_source` (already loaded) replaces the file.
    Without either the embedded default policy serves, fixed.

    A `certificate_source` writes the pair into `cert_dir` first (so nothing is generated)
    and keeps it current beside the server; `compiled_policy`, given the policy in force, keeps
    its compilation in the API server. The serving certificate and key are polled at the
    same interval as the policy, and a new valid pair is swapped in without a restart
    (`ServingCertificate`). A pair that cannot be served at startup ends the process with a
    message (exit status 1). At most `max_connections` client connections are open at once
    (`webhook.serving.connections`), fewer if the open-file limit is lower. `own_namespace`,
    the webhook's, is never injected into ("": none).
    """
    metrics = Metrics() if metrics is None else metrics
    policy_watch: Background | None
    if policy_source is not None:
        policy, policy_watch = policy_source.current, policy_source.keeping
        source = f"{policy_source.origin}, watched"
    else:
        policy, policy_watch = _policy_source(policy_path, poll_seconds, metrics)
        source = f"{policy_path}, checked every {poll_seconds:g}s" if policy_path else "embedded"
    if certificate_source is not None:
        certificate_source.prepare()
    paths = _serving_certificates(cert_dir)
    try:
        certificate = ServingCertificate(
            paths.cert, paths.key, interval=poll_seconds, metrics=metrics
        )
    except CertificateError as error:
        raise SystemExit(f"outrigger: {error}") from None
    keeping = certificate_source.keeping if certificate_source else None
    # The compiled policy follows the policy in force (`webhook.cluster.compiledpolicy`).
    publishing = compiled_policy(policy) if compiled_policy is not None else None
    recording = decisions.keeping if decisions is not None else None
    # Left in reverse: the waiting decision summaries are written last.
    background = _together(
        summaries_written, policy_watch, certificate.watching, keeping, publishing, recording
    )
    gate = ConnectionGate(_connection_limit(max_connections), metrics)
    observer = decisions.observe if decisions is not None else None
    endpoint = create_app(
        policy, metrics=metrics, background=background, observer=observer,
        own_namespace=own_namespace,
    )  # fmt: skip
    config = _uvicorn_config(
        endpoint,
        host,
        port,
        tls_connections(certificate.ssl_context(), gate, metrics, endpoint),
        log_level,
    )
    log.info(
        "policy %s (%s) in force; serving https://%s:%d/mutate, certificate %s checked every "
        "%gs, at most %d connections; hot path %s",
        policy().version,
        source,
        host,
        port,
        paths.cert,
        poll_seconds,
        gate.limit,
        hot_path(),
    )
    return_freed_memory()
    # uvicorn would announce "http://" (it sees plain connections); the line above says it.
    logging.getLogger("uvicorn.error").addFilter(_without_uvicorn_banner)
    # Everything loaded so far lives as long as the process (a first policy that a reload
    # replaces aside): keep it out of the cyclic collector's scans, which would otherwise walk
    # it again and again under load.
    gc.freeze()
    # Heavy reviews run in worker threads: hand the GIL back to the event loop every 1 ms
    # (Python's default is 5 ms), so that the probes and the light reviews wait less.
    sys.setswitchinterval(0.001)
    uvicorn.Server(config).run()


def hot_path() -> str:
    """Whether the review's modules run compiled (mypyc, setup.py) or interpreted: an install
    that could not compile them works alike, at about 1.2 times the CPU per new pod."""
    compiled = (review.__file__ or "").endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    return "compiled" if compiled else "interpreted (not compiled: see setup.py)"


def _policy_source(
    path: Path | None, poll_seconds: float, metrics: Metrics
) -> tuple[Callable[[], Policy], Background | None]:
    """The policy in force (as a callable) and the poller that keeps it current, if any."""
    if path is None:
        policy = default_policy()
        return (lambda: policy), None
    policy_file = PolicyFile(path, interval=poll_seconds, metrics=metrics)
    return policy_file.slot.current, policy_file.watching  # read per review: no extra hop


def _together(*backgrounds: Background | None) -> Background:
    """One lifespan hook entering every given one (in order) and leaving them in reverse."""
    present = [background for background in backgrounds if background is not None]

    @asynccontextmanager
    async def running() -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            for background in present:
                await stack.enter_async_context(background())
            yield

    return running


def _serving_certificates(cert_dir: Path) -> CertificatePaths:
    paths, created = ensure_serving_certificates(cert_dir)
    if created:
        log.warning(
            "no certificate in %s; generated a development CA (%s) and a serving certificate "
            "for localhost and 127.0.0.1 (%s, %s)",
            cert_dir,
            paths.ca_cert,
            paths.cert,
            paths.key,
        )
    return paths


def _without_uvicorn_banner(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Uvicorn running on")


def _connection_limit(wanted: int) -> int:
    """`wanted`, or fewer if the open-file limit cannot hold them. The soft limit is raised to
    the hard one first: container runtimes give 1024 soft, which a thousand silent clients
    would exhaust, and each connection takes a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as error:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, error)
    if soft == resource.RLIM_INFINITY:
        return wanted
    limit = max(1, min(wanted, soft - RESERVED_DESCRIPTORS))
    if limit < wanted:
        log.warning(
            "the open-file limit (%d) holds at most %d connections, not %d", soft, limit, wanted
        )
    return limit


def _uvicorn_config(
    app: AdmissionEndpoint,
    host: str,
    port: int,
    connections: Callable[..., object],
    log_level: str,
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        # TLS is terminated per connection by `connections` (handshake deadline, connection
        # cap) around httptools with read timeouts, bounded pipelining and a shutdown that
        # answers what it was sent (`webhook.serving.connections`, `.protocol`); uvicorn
        # itself sees plain connections.
        http=connections,  # type: ignore[arg-type]
        ws="none",
        loop="uvloop",
        # Idle keep-alive connections are closed after 5 s (the API server reconnects); the
        # whole shutdown, draining included, is bounded, so no client can hold the process.
        timeout_keep_alive=5,
        timeout_graceful_shutdown=SHUTDOWN_SECONDS,
        log_level=log_level,
        # uvicorn's own lines go to the handler `outrigger serve` configured (JSON or text).
        log_config=None,
        # The API server calls once per pod: per-request access lines would cost more than the
        # mutation itself. Injections and denials are logged by the admission layer.
        access_log=False,
        server_header=False,
        proxy_headers=False,
    )
