"""Viewers outside the LAN, in network namespaces each test makes and deletes (docs/remote.md):

    home: the relay          router: NAT, port forwards, coturn        phone: the viewers
    192.168.77.2 ------- lan ------- 192.168.77.1 | 203.0.113.1 ------- wan ------- 203.0.113.2

The router masquerades the home LAN and forwards to it only what a test opens: the relay's HTTP port always
(signalling, as a port forward or a reverse proxy would), its ICE ports for the port-forward test. coturn listens
on the router's public address. The relay runs as ``camrelay serve`` in its namespace; the test's own viewers
(aiortc, and Chromium driven by Playwright) in the phone's: the test's thread enters it (``setns``) while it makes
their sockets, and Chromium and Playwright's driver start there.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aioice import stun, turn

from benchmarks.chromium import chromium
from benchmarks.turn import Coturn, stop
from relay.ice import parse_links, rest_credential
from relay.whepclient import WhepViewer

ROOT = Path(__file__).resolve().parent.parent
RELAY_LAN, ROUTER_LAN, ROUTER_WAN, PHONE_WAN = "192.168.77.2", "192.168.77.1", "203.0.113.1", "203.0.113.2"
HTTP_PORT = 8080  # forwarded by the router to the relay
TURN_PORT = 3478
ICE_PORTS = (40000, 40099)  # the relay's ephemeral ports (its namespace's ip_local_port_range): what is forwarded
TOKEN = "t0ken-of-the-remote-viewer-0123456789"
WHEP = f"http://{ROUTER_WAN}:{HTTP_PORT}/whep/cam0"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FPS = 30
SOURCE_FRAMES = 150  # frames the relay encodes while the viewers' frames are counted (5 s at 30 fps)
AT_SOURCE_RATE = 0.9  # share of them a viewer must show: the rest are at most the few in flight at either end
READY_TIMEOUT = 60.0  # seconds for the relay to stream, a viewer to play: generous deadlines, not measurements
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def run(*args: str, input: str | None = None) -> None:
    result = subprocess.run(args, input=input, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)}: {result.stderr}"


class Internet:
    """The three namespaces and their links; deleted on exit, however the test went."""

    def __init__(self) -> None:
        tag = f"{os.getpid()}-{secrets.token_hex(2)}"
        self.home, self.router, self.phone = f"cr-home-{tag}", f"cr-router-{tag}", f"cr-phone-{tag}"

    def __enter__(self) -> Internet:
        try:
            self._build()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for ns in (self.home, self.router, self.phone):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def _build(self) -> None:
        for ns in (self.home, self.router, self.phone):
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "link", "add", "lan", "netns", self.home, "type", "veth", "peer", "name", "lan", "netns", self.router)
        run(
            "ip", "link", "add", "wan", "netns", self.phone, "type", "veth", "peer", "name", "wan", "netns", self.router
        )
        for ns, dev, address in (
            (self.home, "lan", RELAY_LAN), (self.router, "lan", ROUTER_LAN),
            (self.router, "wan", ROUTER_WAN), (self.phone, "wan", PHONE_WAN),
        ):  # fmt: skip
            run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
        run("ip", "-n", self.home, "route", "add", "default", "via", ROUTER_LAN)
        run("ip", "-n", self.phone, "route", "add", "default", "via", ROUTER_WAN)
        run("ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        run(
            "ip",
            "netns",
            "exec",
            self.home,
            "sysctl",
            "-qw",
            f"net.ipv4.ip_local_port_range={ICE_PORTS[0]} {ICE_PORTS[1]}",
        )

    def router_rules(self, forward_ice: bool) -> None:
        """NAT for the home LAN; from the internet only the HTTP port (and, if asked, the ICE ports) get in."""
        ice = f'iifname "wan" udp dport {ICE_PORTS[0]}-{ICE_PORTS[1]} dnat to {RELAY_LAN}' if forward_ice else ""
        self.nft(
            self.router,
            f"""
            table ip nat {{
                chain prerouting {{
                    type nat hook prerouting priority dstnat;
                    iifname "wan" ip daddr {ROUTER_WAN} tcp dport {HTTP_PORT} dnat to {RELAY_LAN}
                    {ice}
                }}
                chain postrouting {{ type nat hook postrouting priority srcnat; oifname "wan" masquerade; }}
            }}
            table ip filter {{
                chain forward {{
                    type filter hook forward priority filter; policy drop;
                    ct state established,related accept
                    iifname "lan" accept
                    ct status dnat accept
                }}
            }}
        """,
        )

    def block_udp(self, ns: str) -> None:
        """No UDP in or out of ``ns`` but on loopback: a network that lets only TCP through."""
        self.nft(
            ns,
            """
            table inet filter {
                chain input { type filter hook input priority filter; iifname "lo" accept; meta l4proto udp drop; }
                chain output { type filter hook output priority filter; oifname "lo" accept; meta l4proto udp drop; }
            }
        """,
        )

    @staticmethod
    def nft(ns: str, ruleset: str) -> None:
        run("ip", "netns", "exec", ns, "nft", "-f", "-", input=ruleset)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


@contextmanager
def inside(netns: str) -> Iterator[None]:
    """This thread in network namespace ``netns``: the sockets (and processes) it makes meanwhile live there."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


@dataclass
class RelayProcess:
    proc: subprocess.Popen
    log: Path  # its output


@contextmanager
def relay(net: Internet, tmp: Path, webrtc: str) -> Iterator[RelayProcess]:
    """``camrelay serve`` in the home namespace, with the test pattern and ``webrtc`` in its [webrtc] table."""
    config = tmp / "camrelay.toml"
    config.write_text(f"""
state_dir = "{tmp / "state"}"
[http]
host = "{RELAY_LAN}"
port = {HTTP_PORT}
allowed_hosts = ["{ROUTER_WAN}"]
[auth]
token = "{TOKEN}"
[rtsp]
enabled = false
[video]
size = "640x360"
fps = {FPS}
bitrate = "1M"
encoder = "libx264"
[webrtc]
ice_addresses = ["{RELAY_LAN}"]
{webrtc}
[streams]
cam0 = "test:"
""")
    config.chmod(0o600)
    log = tmp / "relay.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", net.home, sys.executable, "-m", "relay", "serve", "--config", str(config)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield RelayProcess(proc, log)
    finally:
        stop(proc)


async def source_frames(http: aiohttp.ClientSession) -> int:
    async with http.get(f"http://{ROUTER_WAN}:{HTTP_PORT}/api/v1/streams", headers=AUTH) as resp:
        return (await resp.json())["streams"][0]["frames_encoded"]


async def wait_streaming(http: aiohttp.ClientSession, relay: RelayProcess) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            if await source_frames(http) > 0:
                return
        except aiohttp.ClientError:
            pass
        assert relay.proc.poll() is None, f"the relay exited: {relay.log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"the relay did not stream: {relay.log.read_text()[-3000:]}"
        await asyncio.sleep(0.2)


async def frames_while_the_source_makes(
    http: aiohttp.ClientSession, count: int, shown: Callable[[], Awaitable[int]]
) -> tuple[int, int]:
    """(frames the relay encoded, frames the viewer showed) over the next ``count`` source frames."""
    source0, shown0 = await source_frames(http), await shown()
    deadline = time.monotonic() + READY_TIMEOUT
    while (source := await source_frames(http)) < source0 + count:
        assert time.monotonic() < deadline, "the source stalled"
        await asyncio.sleep(0.05)
    return source - source0, await shown() - shown0


async def at_source_rate(http: aiohttp.ClientSession, shown: Callable[[], Awaitable[int]], what: str) -> None:
    """The viewer shows (nearly) every frame the relay encodes, counted over ``SOURCE_FRAMES`` of them."""
    made, n = await frames_while_the_source_makes(http, SOURCE_FRAMES, shown)
    print(f"{what}: {n} frames while the relay encoded {made}")
    assert n >= AT_SOURCE_RATE * made, (what, made, n)


async def aiortc_at_source_rate(http: aiohttp.ClientSession, viewer: WhepViewer, what: str) -> None:
    async def read() -> None:
        while True:
            await viewer.recv(timeout=READY_TIMEOUT)

    async def received() -> int:
        return viewer.stats.frames

    reader = asyncio.create_task(read())
    try:
        await at_source_rate(http, received, what)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


def selected_pair(viewer: WhepViewer):
    """The candidate pair aioice chose for ``viewer`` (its ICE transport's nominated pair)."""
    return viewer.pc.getTransceivers()[0].receiver.transport.transport._connection._nominated[1]


# Chromium's choice: the selected pair's local and remote candidates, and frames decoded so far.
SELECTED_PAIR = """async () => {
  const report = await window.camrelayPlayer.pc.getStats();
  let id;
  report.forEach((r) => { if (r.type === "transport") id = r.selectedCandidatePairId; });
  const pair = report.get(id);
  const local = report.get(pair.localCandidateId), remote = report.get(pair.remoteCandidateId);
  return { local: local.candidateType, relayProtocol: local.relayProtocol, remote: remote.candidateType };
}"""
FRAMES_DECODED = """async () => {
  let n = 0;
  (await window.camrelayPlayer.pc.getStats()).forEach((r) => {
    if (r.type === "inbound-rtp" && r.kind === "video") n = r.framesDecoded;
  });
  return n;
}"""
PLAYING = "() => { const p = window.camrelayPlayer; return p && p.state === 'live' && p.stats.framesDecoded > 30; }"


@pytest.mark.browser
@pytest.mark.timeout(300)
async def test_viewers_whose_udp_is_blocked_play_through_turn_over_tcp_with_minted_credentials(tmp_path):
    secret = secrets.token_urlsafe(24)
    turn_url = f"turn:{ROUTER_WAN}:{TURN_PORT}?transport=tcp"
    with Internet() as net:
        net.router_rules(forward_ice=False)
        net.block_udp(net.phone)
        webrtc = f'ice_servers = ["{turn_url}"]\nturn_secret = "{secret}"'
        with (
            Coturn(ROUTER_WAN, TURN_PORT, secret, tmp_path, netns=net.router) as coturn,
            relay(net, tmp_path, webrtc) as camrelay,
            inside(net.phone),
        ):
            async with aiohttp.ClientSession() as http:
                await coturn.wait_ready()
                await wait_streaming(http, camrelay)

                # Only a viewer with the token gets the TURN server, with a credential minted for now, never the secret.
                async with http.options(WHEP) as resp:
                    assert resp.status == 204 and "Link" not in resp.headers
                async with http.options(WHEP, headers=AUTH) as resp:
                    links = resp.headers.getall("Link")
                now = time.time()
                (server,) = parse_links(links)
                expiry, _, name = server.username.partition(":")
                assert server.urls == (turn_url,) and name == "camrelay"
                assert now < int(expiry) <= now + 600 + 1
                assert server.credential == rest_credential(secret, "camrelay", int(expiry))[1]
                assert secret not in json.dumps(links)

                # An aiortc viewer, as a WHEP player: the ICE servers of the Link headers.
                viewer = WhepViewer(WHEP, http, headers=AUTH, ice_servers=[server.to_aiortc()])
                try:
                    await viewer.connect()
                    await viewer.read_frames(5, timeout=READY_TIMEOUT, clock=False)
                    assert selected_pair(viewer).local_candidate.type == "relay"
                    await aiortc_at_source_rate(http, viewer, "aiortc through TURN over TCP")
                finally:
                    await viewer.close()

                # Chromium: camrelay's own page asks for the ICE servers before its offer.
                async with chromium(reach=(ROUTER_WAN,)) as browser:
                    page = await browser.new_page()
                    await page.goto(f"http://{ROUTER_WAN}:{HTTP_PORT}/view/cam0?token={TOKEN}")
                    await page.wait_for_function(PLAYING, timeout=READY_TIMEOUT * 1000)
                    pair = await page.evaluate(SELECTED_PAIR)
                    assert pair["local"] == "relay" and pair["relayProtocol"] == "tcp", pair

                    async def decoded() -> int:
                        return await page.evaluate(FRAMES_DECODED)

                    await at_source_rate(http, decoded, "Chromium through TURN over TCP")
                    for path in ("/api/v1/streams", "/api/v1/status"):
                        async with http.get(f"http://{ROUTER_WAN}:{HTTP_PORT}{path}", headers=AUTH) as resp:
                            assert secret not in await resp.text(), path
    logged = camrelay.log.read_text()
    assert secret not in logged and server.credential not in logged


class Echo(asyncio.DatagramProtocol):
    """A UDP peer on the internet: sends back what it gets."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)


class Client(asyncio.DatagramProtocol):
    """What a TURN allocation's peers send; ``closed`` once the allocation is deleted."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()
        self.closed = asyncio.Event()

    def datagram_received(self, data: bytes, addr) -> None:
        self.received.put_nowait(data)

    def connection_lost(self, exc) -> None:
        self.closed.set()


@pytest.mark.timeout(120)
async def test_coturn_refuses_an_expired_rest_credential_and_an_allocation_outlives_its_credential(tmp_path):
    secret = secrets.token_urlsafe(24)
    server = (ROUTER_WAN, TURN_PORT)
    with Internet() as net, Coturn(ROUTER_WAN, TURN_PORT, secret, tmp_path, netns=net.router) as coturn:
        with inside(net.phone):
            await coturn.wait_ready()
            # Minted as the relay mints them (relay.ice.for_viewer), for a time a minute ago: expired.
            expired = rest_credential(secret, "camrelay", int(time.time()) - 60)
            with pytest.raises(stun.TransactionFailed) as refused:
                await turn.create_turn_endpoint(asyncio.DatagramProtocol, server, *expired, transport="tcp")
            assert refused.value.response.attributes["ERROR-CODE"] == (401, "Unauthorized")

            # One that expires in a moment allocates; after its expiry, the allocation still takes new peers
            # (coturn checks the expiry when a client authenticates first, docs/remote.md).
            expires = int(time.time()) + 2
            relayed, client = await turn.create_turn_endpoint(
                Client, server, *rest_credential(secret, "camrelay", expires), transport="tcp"
            )
            loop = asyncio.get_running_loop()
            echo_transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=(PHONE_WAN, 0))
            try:
                assert relayed.get_extra_info("sockname")[0] == ROUTER_WAN  # a relayed address: allocated
                while time.time() < expires + 1:  # past the expiry, on this machine's (and coturn's) clock
                    await asyncio.sleep(0.2)
                relayed.sendto(b"after expiry", echo_transport.get_extra_info("sockname"))  # a new permission
                assert await asyncio.wait_for(client.received.get(), READY_TIMEOUT) == b"after expiry"
            finally:
                relayed.close()
                echo_transport.close()
                await asyncio.wait_for(client.closed.wait(), READY_TIMEOUT)  # deleted before coturn stops


@pytest.mark.timeout(180)
async def test_a_viewer_outside_reaches_the_relay_through_a_port_forward_and_its_additional_host(tmp_path):
    with Internet() as net:
        net.router_rules(forward_ice=True)
        with relay(net, tmp_path, f'additional_hosts = ["{ROUTER_WAN}"]') as camrelay, inside(net.phone):
            async with aiohttp.ClientSession() as http:
                await wait_streaming(http, camrelay)
                answers: list[str] = []

                def keep_answer(kind: str, sdp: str) -> str:
                    if kind == "answer":
                        answers.append(sdp)
                    return sdp

                viewer = WhepViewer(WHEP, http, headers=AUTH, rewrite_sdp=keep_answer)
                try:
                    await viewer.connect()
                    hosts = [line.split()[4:6] for line in answers[0].splitlines() if line.startswith("a=candidate:")]
                    (port,) = {p for _, p in hosts}
                    assert sorted(a for a, _ in hosts) == [RELAY_LAN, ROUTER_WAN]
                    assert ICE_PORTS[0] <= int(port) <= ICE_PORTS[1]
                    await viewer.read_frames(5, timeout=READY_TIMEOUT, clock=False)
                    pair = selected_pair(viewer)
                    assert (pair.remote_candidate.host, pair.remote_candidate.type) == (ROUTER_WAN, "host")
                    await aiortc_at_source_rate(http, viewer, "aiortc through the port forward")
                finally:
                    await viewer.close()
