"""ICE servers (STUN, TURN): the relay's own, and what each viewer is handed.

Pure but for ``resolve``: the configuration and the time in, ``IceServer``
values, WHEP ``Link`` header values and answers out. The relay's peer connections use ``for_relay``;
every viewer (camrelay's page and any WHEP player) gets ``for_viewer`` in
``Link`` headers (draft-ietf-wish-whep, RFC 8288 with the ``ice-server``
relation), fetched before each offer.

A TURN server's credentials are its own (``{urls, username, credential}``),
or minted for each session from ``turn_secret`` in coturn's
``use-auth-secret`` scheme (draft-uberti-behave-turn-rest): username
``<expiry unix time>:<name>``, credential base64(HMAC-SHA1(secret, username)).
coturn checks the expiry when a client allocates, so a minted credential is
worth nothing once its ``turn_credential_lifetime`` is over, and the secret
itself never leaves the relay. Else the shared ``ice_username`` and
``ice_credential`` (the older form, for ``ice_servers`` given as URLs).

Extra host candidates (``additional_hosts``: a public address behind a port
forward) are added to each answer by ``with_additional_hosts``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING

from aioice.candidate import candidate_foundation, candidate_priority

from ..config import TURN_SCHEMES, IceServer, WebRTCConfig, well_formed
from ..logsafe import Throttled

if TYPE_CHECKING:
    from aiortc import RTCIceServer

log = logging.getLogger(__name__)
lookup_failures = Throttled(log)  # one line a second at most, however many answers a dead DNS server holds up

REST_NAME = "camrelay"  # the <name> of a minted username, for a TURN server that names none
# A name in additional_hosts is looked up for each answer (a dynamic DNS name follows its address); one that
# has not resolved by then is left out of that answer: a dead DNS server must not hold up the video.
RESOLVE_TIMEOUT = 2.0
# The lookups run on threads of their own (``resolver``): a getaddrinfo that a dead DNS server holds cannot be
# cancelled, and on the event loop's default executor it would hold up what else runs there (aioice's lookups of
# the STUN and TURN servers, recordings listings). Two: lookups that wait for a free one are dropped unstarted
# when their answer goes without them, so a dead DNS server holds two threads, however many viewers come.
RESOLVER_THREADS = 2


def log_settings(w: WebRTCConfig) -> None:
    """One line at start naming the servers (never a credential), if any."""
    if w.ice_servers or w.additional_hosts:
        log.info(
            "ice servers=%s turn_credentials=%s additional_hosts=%s",
            ",".join(url for server in w.ice_servers for url in server.urls) or "none",
            "minted" if w.turn_secret else "static",
            ",".join(w.additional_hosts) or "none",
        )


def rest_credential(secret: str, name: str, expires: int) -> tuple[str, str]:
    """coturn's ``use-auth-secret`` credential valid until ``expires`` (unix time): (username, credential)."""
    username = f"{expires}:{name}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


def configured(w: WebRTCConfig, now: float) -> list[IceServer]:
    """The servers ``[webrtc]`` names, each TURN one with its credential as of ``now`` (unix time)."""
    expires = int(now + w.turn_credential_lifetime)
    servers = []
    for server in w.ice_servers:
        if not server.is_turn or server.credential:
            servers.append(server)
        elif w.turn_secret:
            servers.append(
                IceServer(server.urls, *rest_credential(w.turn_secret, server.username or REST_NAME, expires))
            )
        else:
            servers.append(IceServer(server.urls, w.ice_username, w.ice_credential))
    return servers


def for_relay(w: WebRTCConfig, now: float | None = None) -> list[RTCIceServer]:
    """What the relay's own peer connections gather with (call it for each session: minted credentials
    expire); none: host candidates only, nothing waits on STUN. aiortc uses the first STUN and the first
    TURN URL it can."""
    return [s.to_aiortc() for s in configured(w, time.time() if now is None else now)]


def for_viewer(w: WebRTCConfig, now: float | None = None) -> list[IceServer]:
    """What a viewer is handed, with credentials where they apply, minted as of ``now`` (default: the time)."""
    return configured(w, time.time() if now is None else now)


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def link_headers(servers: list[IceServer]) -> list[str]:
    """``Link`` header values, one per URL: ``<turn:host>; rel="ice-server"; username="..."; credential="..."``.

    Credentials go with TURN URLs only, in the order mediamtx's and other WHEP players parse them.
    """
    values = []
    for server in servers:
        for url in server.urls:
            value = f'<{url}>; rel="ice-server"'
            if url.startswith(TURN_SCHEMES) and (server.username or server.credential):
                value += f"; username={_quoted(server.username)}; credential={_quoted(server.credential)}"
                value += '; credential-type="password"'
            values.append(value)
    return values


# RFC 8288 link-values: <target> then ;-separated parameters, each with or without a value, quoted or not.
_LINK = re.compile(r'<([^>]*)>((?:\s*;\s*[^\s;,=]+(?:\s*=\s*(?:"(?:[^"\\]|\\.)*"|[^;,\s]*))?)*)')
_PARAM = re.compile(r';\s*([^\s;,=]+)(?:\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*))?')


def gathered_with(servers: list[RTCIceServer]) -> dict[str, object]:
    """The servers aiortc gathers with, of ``servers``: the first STUN URL and the first TURN URL it supports
    (host, port, transport), credentials aside. Each must be ``well_formed``."""
    from aiortc.rtcicetransport import connection_kwargs

    return {k: v for k, v in connection_kwargs(servers).items() if k not in ("turn_username", "turn_password")}


def parse_links(values: Iterable[str]) -> list[IceServer]:
    """The STUN and TURN servers in ``Link`` header values (each may hold several, comma-separated), with
    their credentials: ``link_headers``' inverse, as a WHEP player (or camrelay's WHIP publisher) reads them.
    ``rel`` may list several relations; links to anything but an ICE server, and ICE server URLs that aiortc
    cannot parse (not ``well_formed``: an [IPv6] literal, a query on a stun: URL), are skipped."""
    servers = []
    for value in values:
        for match in _LINK.finditer(value):
            params = {
                m[1].lower(): re.sub(r"\\(.)", r"\1", m[2][1:-1]) if m[2].startswith('"') else m[2]
                for m in _PARAM.finditer(match[2])
            }
            url = match[1].strip()
            if "ice-server" in params.get("rel", "").split() and well_formed(url):
                servers.append(IceServer((url,), params.get("username", ""), params.get("credential", "")))
    return servers


_HOST_CANDIDATE = re.compile(r"^a=candidate:\S+ (\d+) udp \d+ (\S+) (\d+) typ host\b.*$", re.I)


def add_host_candidates(sdp: str, addresses: Sequence[str]) -> str:
    """``sdp`` with, after each UDP host candidate, one more for each of ``addresses`` of its address family,
    at the same port: how a viewer outside reaches the relay through a port forward that keeps port numbers.

    Each ranks just below the real ones, so viewers on the LAN keep their direct path.
    """
    lines = []
    for line in sdp.splitlines():
        lines.append(line)
        m = _HOST_CANDIDATE.match(line)
        if m is None:
            continue
        component, host, port = int(m.group(1)), m.group(2), m.group(3)
        for i, address in enumerate(a for a in addresses if (":" in a) == (":" in host) and a != host):
            foundation = candidate_foundation("host", "udp", address)
            priority = candidate_priority(component, "host", local_pref=65534 - i)
            lines.append(f"a=candidate:{foundation} {component} udp {priority} {address} {port} typ host")
    return "\r\n".join(lines) + "\r\n"


def resolver() -> ThreadPoolExecutor:
    """Threads for ``resolve``, made as they are needed; their owner shuts them down."""
    return ThreadPoolExecutor(RESOLVER_THREADS, thread_name_prefix="camrelay-resolve")


async def resolve(hosts: Sequence[str], threads: Executor) -> list[str]:
    """``hosts`` as addresses: IP addresses as they are, names looked up on ``threads`` (all their addresses, all
    at once), each within ``RESOLVE_TIMEOUT``; a name that fails is left out, with a warning."""
    found = await asyncio.gather(*(_lookup(host, threads) for host in hosts))
    return list(dict.fromkeys(address for addresses in found for address in addresses))


async def _lookup(host: str, threads: Executor) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    lookup = partial(socket.getaddrinfo, host, None, type=socket.SOCK_DGRAM)
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT):  # not wait_for: on 3.11 it can lose a cancellation (relay.aio)
            infos = await asyncio.get_running_loop().run_in_executor(threads, lookup)
    except (TimeoutError, OSError) as exc:
        lookup_failures.warn(
            "ice additional host %s not resolved (%s); answering without it", host, str(exc) or "timeout"
        )
        return []
    return [str(info[4][0]) for info in infos]


async def with_additional_hosts(sdp: str, hosts: Sequence[str], threads: Executor) -> str:
    """An answer with host candidates for ``hosts`` (``[webrtc] additional_hosts``) too."""
    return add_host_candidates(sdp, await resolve(hosts, threads)) if hosts else sdp
