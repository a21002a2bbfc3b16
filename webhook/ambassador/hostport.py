"""`host:port` values: the external services an ambassador proxies to."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from webhook.limits import cache_small

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
# A lowercase DNS name (RFC 1123 subdomain), as a pattern for validators elsewhere too.
DNS_NAME = rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$"
_DNS_NAME = re.compile(DNS_NAME)
# A port as Envoy and Kubernetes write one: decimal, no sign, no leading zero (`080` is refused
# rather than read as 80, and no string of digits longer than five is converted to a number).
_PORT = re.compile(r"[1-9][0-9]{0,4}")

ACCEPTED = (
    "host:port with a DNS name or IP address (IPv6 in brackets, without a %zone) and a port "
    "from 1 to 65535 in decimal without leading zeros "
    "(e.g. api.example.com:443, 10.0.0.7:8080, [fd00::7]:80)"
)


@dataclass(frozen=True, slots=True)
class Upstream:
    host: str
    port: int
    is_ip: bool = False


@cache_small(4096, len)
def parse_hostport(text: str) -> Upstream | None:
    """The upstream, or None when `text` is not `host:port` (cached: IP parsing is not cheap)."""
    host, sep, port_text = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text) if sep and _PORT.fullmatch(port_text) else 0
    if not 1 <= port <= 65535:
        return None
    if "%" in host:  # an IPv6 zone (fe80::1%eth0): Envoy cannot connect to one
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if len(host) > 253 or not _DNS_NAME.fullmatch(host.lower()):
            return None
        return Upstream(host=host.lower(), port=port)
    return Upstream(host=host, port=port, is_ip=True)
