"""Serving over HTTPS: certificates, TLS settings and uvicorn, around `webhook.app`."""

from __future__ import annotations

import gc
import logging
import ssl
import sys
from collections.abc import Callable
from pathlib import Path

import uvicorn

from webhook.app import AdmissionEndpoint, Background, create_app
from webhook.certs import CertificatePaths, certificate_not_after, ensure_serving_certificates
from webhook.metrics import Metrics
from webhook.policy import Policy, default_policy
from webhook.reload import PolicyFile
from webhook.tls import server_ssl_context

log = logging.getLogger("outrigger.server")


def serve(
    host: str,
    port: int,
    cert_dir: Path,
    policy_path: Path | None,
    log_level: str = "info",
    poll_seconds: float = 5.0,
) -> None:
    """Serve until interrupted; generates development certificates if `cert_dir` has none.

    With `policy_path` the policy is loaded first, so that a bad file raises `PolicyError`
    before anything is generated or served, and then reloaded whenever the file's content
    changes (polled every `poll_seconds`). Without it the embedded default policy serves, fixed.
    """
    metrics = Metrics()
    policy, background = _policy_source(policy_path, poll_seconds, metrics)
    paths = _serving_certificates(cert_dir)
    metrics.set_certificate_expiry(certificate_not_after(paths.cert))
    config = _uvicorn_config(
        create_app(policy, metrics=metrics, background=background), host, port, paths, log_level
    )
    source = f"{policy_path}, checked every {poll_seconds:g}s" if policy_path else "embedded"
    log.info(
        "policy %s (%s) in force; serving https://%s:%d/mutate",
        policy().version,
        source,
        host,
        port,
    )
    # Everything loaded so far lives as long as the process (a first policy that a reload
    # replaces aside): keep it out of the cyclic collector's scans, which would otherwise walk
    # it again and again under load.
    gc.freeze()
    uvicorn.Server(config).run()


def _policy_source(
    path: Path | None, poll_seconds: float, metrics: Metrics
) -> tuple[Callable[[], Policy], Background | None]:
    """The policy in force (as a callable) and the poller that keeps it current, if any."""
    if path is None:
        policy = default_policy()
        return (lambda: policy), None
    policy_file = PolicyFile(path, interval=poll_seconds, metrics=metrics)
    return policy_file.current, policy_file.watching


def _serving_certificates(cert_dir: Path) -> CertificatePaths:
    paths, created = ensure_serving_certificates(cert_dir)
    if created:
        print(
            f"outrigger: no certificate in {cert_dir}; generated a development CA "
            f"({paths.ca_cert}) and a serving certificate for localhost and 127.0.0.1 "
            f"({paths.cert}, {paths.key})",
            file=sys.stderr,
        )
    return paths


def _uvicorn_config(
    app: AdmissionEndpoint, host: str, port: int, paths: CertificatePaths, log_level: str
) -> uvicorn.Config:
    def tls_context(
        _config: uvicorn.Config, _default: Callable[[], ssl.SSLContext]
    ) -> ssl.SSLContext:
        return server_ssl_context(paths.cert, paths.key)

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_certfile=str(paths.cert),
        ssl_keyfile=str(paths.key),
        ssl_context_factory=tls_context,
        http="httptools",
        loop="uvloop",
        log_level=log_level,
        # The API server calls once per pod: per-request access lines would cost more than the
        # mutation itself. Injections and denials are logged by the admission layer.
        access_log=False,
        server_header=False,
        proxy_headers=False,
    )
