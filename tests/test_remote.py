"""Viewers outside the LAN, in network namespaces each test makes and deletes (docs/remote.md):

    home: the relay          router: NAT, port forwards, coturn        phone: the viewers
    192.168.77.2 ------- lan ------- 192.168.77.1 | 203.0.113.1 ------- wan ------- 203.0.113.2

The router masquerades the home LAN and forwards to it only what a test opens: the relay's HTTP port always
(signalling, as a port forward or a reverse proxy would), its ICE ports for the port-forward test. coturn listens
on the router's public address and, as docs/remote.md sets it up, relays to no private address: though the router
routes to the home LAN, a viewer's allocation cannot reach the relay's own address, only the relay's allocation.
The relay runs as ``camrelay serve`` in its namespace; the test's own viewers (aiortc, and Chromium driven by
Playwright) in the phone's: the test's thread enters it (``setns``) while it makes their sockets, and Chromium and
Playwright's driver start there. A test may add a slow link to coturn (``SlowLink``) or a DNS server that holds its
answers (``HeldDns``) in the router's namespace.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import aiohttp
import pytest
from aioice import stun, turn

from benchmarks.chromium import chromium
from benchmarks.turn import Coturn, stop
from relay.auth import hash_password
from relay.webrtc import borrowed
from relay.webrtc.ice import RESOLVER_THREADS, parse_links, rest_credential
from relay.webrtc.whepclient import WhepViewer

from .netns import inside, run

ROOT = Path(__file__).resolve().parent.parent
RELAY_LAN, ROUTER_LAN, ROUTER_WAN, PHONE_WAN = "192.168.77.2", "192.168.77.1", "203.0.113.1", "203.0.113.2"
HTTP_PORT = 8080  # forwarded by the router to the relay
TURN_PORT = 3478
# docs/remote.md's coturn relays to no private network: a deployment's TURN server cannot reach a relay's LAN address.
DENIED_PEERS = ("10.0.0.0-10.255.255.255", "172.16.0.0-172.31.255.255", "192.168.0.0-192.168.255.255")
ICE_PORTS = (40000, 40099)  # the relay's ephemeral ports (its namespace's ip_local_port_range): what is forwarded
TOKEN = "t0ken-of-the-remote-viewer-0123456789"
PASSWORD = "pa55word-of-the-remote-viewer"  # in the test that runs the relay in password mode
WHEP = f"http://{ROUTER_WAN}:{HTTP_PORT}/whep/cam0"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FPS = 30
SOURCE_FRAMES = 150  # frames the relay encodes while the viewers' frames are counted (5 s at 30 fps)
AT_SOURCE_RATE = 0.9  # share of them a viewer must show: the rest are at most the few in flight at either end
READY_TIMEOUT = 60.0  # seconds for the relay to stream, a viewer to play: generous deadlines, not measurements


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
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)

    @staticmethod
    def resolv_conf(ns: str, text: str) -> None:
        """``ns``'s /etc/resolv.conf for the processes ``ip netns exec`` starts there (it bind-mounts this one)."""
        os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
        Path(f"/etc/netns/{ns}/resolv.conf").write_text(text)

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


@dataclass
class RelayProcess:
    proc: subprocess.Popen
    log: Path  # its output


@contextmanager
def relay(net: Internet, tmp: Path, webrtc: str, auth: str = f'token = "{TOKEN}"') -> Iterator[RelayProcess]:
    """``camrelay serve`` in the home namespace, with the test pattern, ``webrtc`` in its [webrtc] table and
    ``auth`` in its [auth] one."""
    config = tmp / "camrelay.toml"
    config.write_text(f"""
state_dir = "{tmp / "state"}"
[http]
host = "{RELAY_LAN}"
port = {HTTP_PORT}
allowed_hosts = ["{ROUTER_WAN}"]
[auth]
{auth}
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


async def source_frames(http: aiohttp.ClientSession, headers: dict[str, str] = AUTH) -> int:
    async with http.get(f"http://{ROUTER_WAN}:{HTTP_PORT}/api/v1/streams", headers=headers) as resp:
        return (await resp.json())["streams"][0]["frames_encoded"]


async def wait_streaming(http: aiohttp.ClientSession, relay: RelayProcess, headers: dict[str, str] = AUTH) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            if await source_frames(http, headers) > 0:
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
        reader.cancel()  # (WhepViewer.recv honours it: tests/test_whepclient.py)
        await asyncio.wait([reader], timeout=READY_TIMEOUT)  # never for ever: the test's cleanup comes after


def selected_pair(viewer: WhepViewer):
    """The candidate pair aioice chose for ``viewer`` (its ICE transport's nominated pair)."""
    return borrowed.nominated_pair(viewer.pc.getTransceivers()[0].receiver.transport)


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
            Coturn(ROUTER_WAN, TURN_PORT, secret, tmp_path, netns=net.router, denied_peers=DENIED_PEERS) as coturn,
            relay(net, tmp_path, webrtc) as camrelay,
            inside(net.phone),
        ):
            async with aiohttp.ClientSession() as http:
                await coturn.wait_ready()
                await wait_streaming(http, camrelay)

                # Only a viewer with the token gets the TURN server, with a credential minted for now, never the secret.
                async with http.options(WHEP) as resp:
                    assert resp.status == 204 and "Link" not in resp.headers
                asked = time.time()
                async with http.options(WHEP, headers=AUTH) as resp:
                    links = resp.headers.getall("Link")
                answered = time.time()
                (server,) = parse_links(links)
                expiry, _, name = server.username.partition(":")
                assert server.urls == (turn_url,) and name == "camrelay"
                assert int(asked + 600) <= int(expiry) <= int(answered + 600)  # minted while it answered, for 600 s
                assert server.credential == rest_credential(secret, "camrelay", int(expiry))[1]
                assert secret not in json.dumps(links)

                # An aiortc viewer, as a WHEP player: the ICE servers of the Link headers.
                viewer = WhepViewer(WHEP, http, headers=AUTH, ice_servers=[server.to_aiortc()])
                try:
                    await viewer.connect()
                    await viewer.read_frames(5, timeout=READY_TIMEOUT, clock=False)
                    # Through both ends' allocations: coturn relays to no private address, so the viewer's cannot
                    # reach the relay's LAN address, and the relay (behind NAT) answers through its own.
                    pair = selected_pair(viewer)
                    assert (pair.local_candidate.type, pair.remote_candidate.type) == ("relay", "relay")
                    await aiortc_at_source_rate(http, viewer, "aiortc through TURN over TCP")
                finally:
                    await viewer.close()

                # Chromium: camrelay's own page asks for the ICE servers before its offer.
                async with chromium(reach=(ROUTER_WAN,)) as browser:
                    page = await browser.new_page()
                    await page.goto(f"http://{ROUTER_WAN}:{HTTP_PORT}/view/cam0?token={TOKEN}")
                    await page.wait_for_function(PLAYING, timeout=READY_TIMEOUT * 1000)
                    pair = await page.evaluate(SELECTED_PAIR)
                    assert pair == {"local": "relay", "relayProtocol": "tcp", "remote": "relay"}, pair

                    async def decoded() -> int:
                        return await page.evaluate(FRAMES_DECODED)

                    await at_source_rate(http, decoded, "Chromium through TURN over TCP")
                    for path in ("/api/v1/streams", "/api/v1/status"):
                        async with http.get(f"http://{ROUTER_WAN}:{HTTP_PORT}{path}", headers=AUTH) as resp:
                            assert secret not in await resp.text(), path
    logged = camrelay.log.read_text()
    assert secret not in logged and server.credential not in logged


# The phone's TCP to coturn goes through SlowLink (the router redirects it): a TURN allocation then takes seconds,
# its candidate comes after camrelay's page has sent its offer, and only a trickle PATCH tells the relay of it.
SLOW_PORT = 3479  # the router's port SlowLink listens on
LINK_DELAY = 0.6  # seconds each way: a satellite or congested mobile link (an allocation takes two round trips)


class RouterServer:
    """A TCP server on ``listen`` in network namespace ``netns`` (a router's); ``serve`` handles each connection,
    which is closed after it, and cancelled on exit."""

    def __init__(self, netns: str, listen: tuple[str, int]) -> None:
        self.netns, self.listen = netns, listen
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> Self:
        with inside(self.netns):
            sock = socket.create_server(self.listen)
        self._server = await asyncio.start_server(self._handle, sock=sock)
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.serve(reader, writer)
        finally:
            writer.close()
            self._tasks.discard(task)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class SlowLink(RouterServer):
    """A TCP proxy to ``upstream`` that delivers everything ``LINK_DELAY`` late, each way, in order (``tc`` here
    has tbf only, no netem); ``connections`` counts what it carried."""

    def __init__(self, netns: str, listen: tuple[str, int], upstream: tuple[str, int]) -> None:
        super().__init__(netns, listen)
        self.upstream = upstream
        self.connections = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with inside(self.netns):  # made where coturn's port is not redirected
            upstream = socket.socket()
        upstream.setblocking(False)
        up_writer = None
        try:
            await asyncio.get_running_loop().sock_connect(upstream, self.upstream)
            up_reader, up_writer = await asyncio.open_connection(sock=upstream)
            async with asyncio.TaskGroup() as group:
                for source, sink in ((reader, up_writer), (up_reader, writer)):
                    late: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
                    group.create_task(self._read(source, late))
                    group.create_task(self._deliver(late, sink))
        except* OSError:
            pass  # an end went away: so does the other
        finally:
            if up_writer is None:
                upstream.close()
            else:
                up_writer.close()

    @staticmethod
    async def _read(source: asyncio.StreamReader, late: asyncio.Queue[tuple[float, bytes]]) -> None:
        loop = asyncio.get_running_loop()
        while data := await source.read(65536):
            late.put_nowait((loop.time() + LINK_DELAY, data))
        late.put_nowait((loop.time() + LINK_DELAY, b""))

    @staticmethod
    async def _deliver(late: asyncio.Queue[tuple[float, bytes]], sink: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await late.get()
            await asyncio.sleep(due - loop.time())
            if not data:
                sink.close()
                return
            sink.write(data)
            await sink.drain()


@pytest.mark.browser
@pytest.mark.timeout(300)
async def test_a_page_whose_turn_candidate_comes_after_its_offer_trickles_it_and_plays_through_turn(tmp_path):
    turn_url = f"turn:{ROUTER_WAN}:{TURN_PORT}?transport=tcp"
    with Internet() as net:
        net.router_rules(forward_ice=False)
        net.block_udp(net.phone)
        net.nft(
            net.router,
            f"""
            table ip slowlink {{
                chain prerouting {{
                    type nat hook prerouting priority dstnat;
                    iifname "wan" tcp dport {TURN_PORT} redirect to :{SLOW_PORT}
                }}
            }}
        """,
        )
        secret = secrets.token_urlsafe(24)
        webrtc = f'ice_servers = ["{turn_url}"]\nturn_secret = "{secret}"'
        with (
            Coturn(ROUTER_WAN, TURN_PORT, secret, tmp_path, netns=net.router, denied_peers=DENIED_PEERS) as coturn,
            relay(net, tmp_path, webrtc) as camrelay,
        ):
            async with SlowLink(net.router, (ROUTER_WAN, SLOW_PORT), (ROUTER_WAN, TURN_PORT)) as link:
                with inside(net.phone):
                    async with aiohttp.ClientSession() as http, chromium(reach=(ROUTER_WAN,)) as browser:
                        await coturn.wait_ready()
                        await wait_streaming(http, camrelay)
                        page = await browser.new_page()
                        sent: list[tuple[str, str]] = []  # (method, body) of the page's WHEP requests
                        patched: list[int] = []  # the answers to its PATCHes
                        page.on(
                            "request",
                            lambda r: sent.append((r.method, r.post_data or "")) if "/whep/" in r.url else None,
                        )
                        page.on("response", lambda r: patched.append(r.status) if r.request.method == "PATCH" else None)
                        await page.goto(f"http://{ROUTER_WAN}:{HTTP_PORT}/view/cam0?token={TOKEN}")
                        await page.wait_for_function(PLAYING, timeout=READY_TIMEOUT * 1000)

                        # Its TURN candidate missed the offer and went by PATCH; the first offer played.
                        offers = [body for method, body in sent if method == "POST"]
                        trickled = "".join(body for method, body in sent if method == "PATCH")
                        assert len(offers) == 1 and " typ relay" not in offers[0], offers
                        assert " typ relay" in trickled and "a=end-of-candidates" in trickled, trickled
                        assert patched and set(patched) == {204}, patched
                        assert link.connections >= 1
                        pair = await page.evaluate(SELECTED_PAIR)
                        assert pair == {"local": "relay", "relayProtocol": "tcp", "remote": "relay"}, pair

                        async def decoded() -> int:
                            return await page.evaluate(FRAMES_DECODED)

                        await at_source_rate(http, decoded, "Chromium through TURN over a slow link")


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
            # Minted as the relay mints them (relay.webrtc.ice.for_viewer), for a time a minute ago: expired.
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


class HeldDns(RouterServer):
    """A DNS server on TCP (for a resolver with ``options use-vc``: glibc then waits for an answer without a
    timeout) that holds every query until ``release``, a DNS outage as long as the test wants, then answers that
    any name is ``address``. ``queries`` counts the queries it got by name, ``answered`` those it answered."""

    def __init__(self, netns: str, listen: tuple[str, int], address: str) -> None:
        super().__init__(netns, listen)
        self.address = address
        self.queries: Counter[str] = Counter()
        self.answered = 0
        self._released = asyncio.Event()

    def release(self) -> None:
        self._released.set()

    async def __aexit__(self, *exc) -> None:
        self.release()  # the lookups held end: a relay process waits for its threads before it exits
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=READY_TIMEOUT)  # glibc closes each connection once answered
        await super().__aexit__(*exc)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                query = await reader.readexactly(int.from_bytes(await reader.readexactly(2), "big"))
                name, end = self._question(query)
                self.queries[name] += 1
                await self._released.wait()
                reply = self._reply(query, end)
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
                self.answered += 1
        except (asyncio.IncompleteReadError, OSError):
            pass  # the resolver has its answers, or gave up

    @staticmethod
    def _question(query: bytes) -> tuple[str, int]:
        """The name a query (RFC 1035 4.1) asks about, and where its question ends (after the type and class)."""
        labels, at = [], 12
        while query[at]:
            labels.append(query[at + 1 : at + 1 + query[at]].decode())
            at += 1 + query[at]
        return ".".join(labels), at + 5

    def _reply(self, query: bytes, end: int) -> bytes:
        """The answer to ``query``: for type A, ``address``; for any other type, none."""
        is_a = query[end - 4 : end - 2] == b"\0\1"
        header = query[:2] + b"\x81\x80\0\1" + (b"\0\1" if is_a else b"\0\0") + b"\0\0\0\0"
        record = b"\xc0\x0c\0\1\0\1\0\0\0\0\0\4" + socket.inet_aton(self.address)  # the name, A, IN, TTL 0
        return header + query[12:end] + (record if is_a else b"")


async def post_offer(http: aiohttp.ClientSession, headers: dict[str, str]) -> str:
    """The relay's answer to a browser's offer (one the relay only answers: nothing connects)."""
    offer = (ROOT / "tests" / "data" / "offer_chromium_156.sdp").read_bytes()
    async with http.post(WHEP, data=offer, headers={**headers, "Content-Type": "application/sdp"}) as resp:
        assert resp.status == 201, await resp.text()
        return await resp.text()


def candidate_addresses(answer: str) -> set[str]:
    return {line.split()[4] for line in answer.splitlines() if line.startswith("a=candidate:")}


@pytest.mark.timeout(180)
async def test_a_dns_outage_holds_up_no_password_login(tmp_path):
    # More answers at once than the event loop's default executor has threads (Python's default), each looking up
    # the additional host's name and the STUN server's (aioice does that on the default executor): before, they
    # held every one of its threads, and a login's scrypt waited behind them.
    lookups = min(32, (os.cpu_count() or 1) + 4) + 2
    name, stun_name = "camera.example.org", "stun.example.org"
    basic = {"Authorization": aiohttp.encode_basic_auth("viewer", PASSWORD)}
    with Internet() as net:
        net.router_rules(forward_ice=False)
        net.resolv_conf(net.home, f"nameserver {ROUTER_LAN}\noptions use-vc\n")
        auth = f'mode = "password"\nuser = "viewer"\npassword_hash = "{hash_password(PASSWORD)}"'
        webrtc = (
            f'additional_hosts = ["{name}"]\nice_servers = ["stun:{stun_name}:{TURN_PORT}"]\n'
            f"max_pending_per_address = {2 * lookups}\nsession_burst = {2 * lookups}"  # none is refused
        )
        with relay(net, tmp_path, webrtc, auth) as camrelay:
            async with HeldDns(net.router, (ROUTER_LAN, 53), ROUTER_WAN) as dns:
                with inside(net.phone):
                    async with aiohttp.ClientSession() as http:
                        await wait_streaming(http, camrelay, basic)
                        # The DNS server holds every lookup: each answer goes without the name, after its wait.
                        answers = await asyncio.gather(*(post_offer(http, basic) for _ in range(lookups)))
                        assert all(candidate_addresses(a) == {RELAY_LAN} for a in answers)
                        # The name's lookups wait on two threads of their own, however many viewers came.
                        assert dns.queries[name] == RESOLVER_THREADS and dns.queries[stun_name] >= 1, dns.queries
                        assert dns.answered == 0

                        # A password the relay has not verified yet (its cache is by header: this one is spelt
                        # otherwise) costs a scrypt: it is answered while the lookups are still held.
                        login = {"Authorization": basic["Authorization"].replace("Basic ", "basic ")}
                        async with asyncio.timeout(READY_TIMEOUT):
                            async with http.get(f"http://{ROUTER_WAN}:{HTTP_PORT}/api/v1/streams", headers=login) as r:
                                assert r.status == 200
                        assert dns.answered == 0

                        # DNS back: the name is in the next answer.
                        dns.release()
                        assert candidate_addresses(await post_offer(http, basic)) == {RELAY_LAN, ROUTER_WAN}
    assert f"ice additional host {name} not resolved (timeout); answering without it" in camrelay.log.read_text()
