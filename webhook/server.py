"""Serving over HTTPS: certificates, TLS settings and uvicorn, around `webhook.app`."""

from __future__ import annotations

import gc
import logging
import ssl
import sys
from collections.abc import Callable
from pathlib import Path

import uvicorn

from webhook.app import create_app
from webhook.certs import ensure_serving_certificates
from webhook.policy import Policy
from webhook.tls import server_ssl_context

log = logging.getLogger("outrigger.server")


def serve(host: str, port: int, cert_dir: Path, policy: Policy, log_level: str = "info") -> None:
    """Serve until interrupted; generates development certificates if `cert_dir` has none."""
    paths, created = ensure_serving_certificates(cert_dir)
    if created:
        print(
            f"outrigger: no certificate in {cert_dir}; generated a development CA "
            f"({paths.ca_cert}) and a serving certificate for localhost and 127.0.0.1 "
            f"({paths.cert}, {paths.key})",
            file=sys.stderr,
        )

    def tls_context(
        _config: uvicorn.Config, _default: Callable[[], ssl.SSLContext]
    ) -> ssl.SSLContext:
        return server_ssl_context(paths.cert, paths.key)

    config = uvicorn.Config(
        create_app(lambda: policy),
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
    log.info("policy %s in force; serving https://%s:%d/mutate", policy.version, host, port)
    # Everything loaded so far lives as long as the process: keep it out of the cyclic
    # collector's scans, which would otherwise walk it again and again under load.
    gc.freeze()
    uvicorn.Server(config).run()
