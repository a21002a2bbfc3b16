"""TLS settings for the webhook's HTTPS listener."""

from __future__ import annotations

import ssl
from pathlib import Path


def server_ssl_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server context presenting `cert_file` (leaf first, then any chain) and `key_file`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # Kubernetes API servers speak TLS 1.2 and 1.3; refusing anything older costs no client and
    # removes the legacy protocols' known weaknesses.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    return context
