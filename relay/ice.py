"""ICE servers (STUN, TURN): the relay's own, and what each viewer is handed.

Pure: the configuration in, ``IceServer`` values and WHEP ``Link`` header
values out. The relay's peer connections use ``for_relay``; every viewer
(camrelay's page and any WHEP player) gets ``for_viewer`` in ``Link``
headers (draft-ietf-wish-whep, RFC 8288 with the ``ice-server`` relation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiortc import RTCIceServer

from .config import WebRTCConfig


@dataclass(frozen=True, slots=True)
class IceServer:
    """One server as a browser's ``RTCIceServer`` describes it."""

    urls: tuple[str, ...]
    username: str = ""
    credential: str = field(default="", repr=False)

    def to_aiortc(self) -> RTCIceServer:
        return RTCIceServer(urls=list(self.urls), username=self.username or None, credential=self.credential or None)


def configured(w: WebRTCConfig) -> list[IceServer]:
    """The servers ``[webrtc]`` names; the shared ``ice_username``/``ice_credential`` go with the TURN ones."""
    servers = []
    for url in w.ice_servers:
        turn = url.startswith(("turn:", "turns:"))
        servers.append(IceServer((url,), w.ice_username if turn else "", w.ice_credential if turn else ""))
    return servers


def for_relay(w: WebRTCConfig) -> list[RTCIceServer]:
    """What the relay's own peer connections gather with; none: host candidates only, nothing waits on STUN."""
    return [s.to_aiortc() for s in configured(w)]


def for_viewer(w: WebRTCConfig) -> list[IceServer]:
    """What a viewer is handed, with credentials where they apply."""
    return configured(w)


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def link_headers(servers: list[IceServer]) -> list[str]:
    """``Link`` header values, one per URL: ``<turn:host>; rel="ice-server"; username="..."; credential="..."``."""
    values = []
    for server in servers:
        for url in server.urls:
            value = f'<{url}>; rel="ice-server"'
            if server.username or server.credential:
                value += f"; username={_quoted(server.username)}; credential={_quoted(server.credential)}"
                value += '; credential-type="password"'
            values.append(value)
    return values
