"""Who the client is behind a reverse proxy: ``X-Forwarded-For`` and ``-Proto``, from trusted proxies only.

Behind nginx or Caddy (for HTTPS) every request comes from the proxy's
address. The per-address limits (new sessions, sessions still connecting,
password guesses) would then count every viewer as one, and the token cookie
would not be marked Secure. So a request from an address in
``http.trusted_proxies`` is taken to come from the last address the proxy
appended to ``X-Forwarded-For``, with the scheme of ``X-Forwarded-Proto``.
From any other address those headers are ignored: a client cannot choose its
own address.

``forwarded_client`` is pure: the peer, the two headers and the trusted
networks in, the client address and scheme out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from aiohttp import web

from relay.config import parse_networks

__all__ = ["PROXIES", "forwarded", "forwarded_client", "parse_networks"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PROXIES = web.AppKey("trusted_proxies", tuple)  # the parsed http.trusted_proxies


def is_in(address: str, networks: Sequence[Network]) -> bool:
    """Whether ``address`` is in one of ``networks``; an IPv4 client of a dual-stack socket
    (``::ffff:127.0.0.1``) counts as its IPv4 address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def _address(text: str) -> str | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":")[0]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def forwarded_client(
    peer: str | None, forwarded_for: str | None, proto: str | None, trusted: Sequence[Network]
) -> tuple[str | None, str | None]:
    """(client address, scheme) as the proxy at ``peer`` reports them, or (None, None) to keep the peer's own.

    The last ``X-Forwarded-For`` entry is the one the trusted proxy added; the
    ones before it came from the client and prove nothing.
    """
    if not trusted or peer is None:
        return None, None
    if not is_in(peer, trusted):
        return None, None
    client = _address(forwarded_for.split(",")[-1]) if forwarded_for else None
    scheme = proto.split(",")[-1].strip().lower() if proto else None
    return client, scheme if scheme in ("http", "https") else None


@web.middleware
async def forwarded(request: web.Request, handler):
    """Every handler and check after this one sees the client's own address and scheme."""
    # A header sent on several lines is one list (RFC 9110 5.3): a proxy that adds its own line
    # rather than appending to the client's must not leave the client's line the one read.
    client, scheme = forwarded_client(
        request.remote,
        ",".join(request.headers.getall("X-Forwarded-For", ())) or None,
        ",".join(request.headers.getall("X-Forwarded-Proto", ())) or None,
        request.app[PROXIES],
    )
    if client or scheme:
        changes: dict[str, str] = {}
        if client:
            changes["remote"] = client
        if scheme:
            changes["scheme"] = scheme
        request = request.clone(**changes)
    return await handler(request)
