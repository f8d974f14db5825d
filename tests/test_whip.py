"""WHIP egress: camrelay publishes its one encoding to a real mediamtx, whose viewers never cost camrelay more.

Every engine here is the mediamtx the project builds, run by the test on loopback ports of its own with only
its WebRTC (WHIP/WHEP) server on (benchmarks/scale_out.py's ``Engine``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from multidict import CIMultiDict

from benchmarks.peers import PeerPlan, run_worker
from benchmarks.ports import free_port
from benchmarks.rtspcams import Encoding
from benchmarks.scale_out import Engine
from relay.backoff import Backoff
from relay.cli import build_parser, load_config
from relay.config import ConfigError, IceServer, StreamConfig, WhipConfig, load, secret_values, secrets_in_file
from relay.hub import PacketHub
from relay.source import parse_source_spec
from relay.webrtc import borrowed, rtpsend
from relay.webrtc.ice import gathered_with, parse_links
from relay.webrtc.whepclient import WhepError, WhepViewer
from relay.webrtc.whip import SDP_TYPE, WhipPublisher, h264_payload_types, shown_url

from .conftest import TEST_FPS, EncodedFrames, capture_ms, end_workers, make_config, start_relay
from .stun import stun_server
from .test_rtsp import read_rtsp, wait_published

ROOT = Path(__file__).parent.parent
TOKEN = "pub:Whip-s3cret_token"  # mediamtx takes "Bearer user:password"
DEADLINE = 60.0  # seconds: a generous bound on waiting for an event, never a measure
VIEWERS_ON_ENGINE = 50  # light viewers in worker processes, and one decoding viewer here
PEER_PROCESSES = (10, 10, 10, 10, 9)
PEER_READ = 3.0  # seconds each light viewer goes on reading once told to start (they count frames, not time)


async def until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g}s"
        await asyncio.sleep(0.05)


async def clock_reads_through(url: str, http: aiohttp.ClientSession, frames: int = 10) -> bool:
    """Whether a new WHEP viewer of ``url`` decodes ``frames`` frames whose pixel clock reads valid."""
    viewer = WhepViewer(url, http)
    try:
        await viewer.connect()
        return all(s.latency_ms is not None for s in await viewer.read_frames(frames))
    finally:
        await viewer.close()


def whip_config(*entries: WhipConfig, **kw):
    return dataclasses.replace(make_config(**kw), whip=entries)


# -- configuration (pure) -------------------------------------------------


FILE = """
[streams]
cam0 = "test:"
[[whip]]
stream = "cam0"
url = "https://live.example.org/whip/Stream-Key-123"
bearer_token = "Whip-s3cret_token"
[[whip]]
stream = "cam0"
url = "http://10.0.0.5:8889/cam0/whip"
"""


def test_whip_entries_come_from_the_file_and_the_token_is_a_secret():
    c = load(FILE)
    assert [(w.stream, w.url, w.bearer_token) for w in c.whip] == [
        ("cam0", "https://live.example.org/whip/Stream-Key-123", "Whip-s3cret_token"),
        ("cam0", "http://10.0.0.5:8889/cam0/whip", ""),
    ]
    assert "Whip-s3cret_token" not in repr(c)
    assert "Whip-s3cret_token" in secret_values(c)  # what the CLI hands relay.logsafe.SECRET_FILTER
    assert secrets_in_file(FILE) == ["whip[0].bearer_token"]  # a file others can read is warned about


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[[whip]]\nstream = "cam0"', "whip[0].url: required"),
        ('[[whip]]\nurl = "https://h/w"', "whip[0].stream: required"),
        (
            '[[whip]]\nstream = "cam0"\nurl = "rtsp://h/Stream-Key"',
            "whip[0].url: expected an http:// or https:// URL with a host (and no spaces)",
        ),
        (
            '[[whip]]\nstream = "cam0"\nurl = "https:///Stream-Key"',
            "whip[0].url: expected an http:// or https:// URL with a host (and no spaces)",
        ),
        (
            '[[whip]]\nstream = "cam0"\nurl = "https://h/w"\nbearer_token = "Whip s3cret"',
            "whip[0].bearer_token: may hold only printable ASCII without spaces",
        ),
        ('[[whip]]\nstream = "cam0"\nurl = "https://h/w"\ntoken = "x"', "whip[0].token: unknown key"),
        ('[[whip]]\nstream = "../x"\nurl = "https://h/w"', "whip[0].stream: '../x' is not a stream name"),
        ('whip = "https://h/w"', "whip: expected [[whip]] tables"),
        (
            '[streams]\ncam0 = "test:"\n[[whip]]\nstream = "door"\nurl = "https://h/w"',
            "whip[0].stream: no stream named 'door' (streams: cam0)",
        ),
    ],
)
def test_bad_whip_entries_name_the_key_and_never_quote_the_url_or_token(toml, message):
    with pytest.raises(ConfigError) as info:
        load(toml)
    assert str(info.value).startswith(message)
    assert "Stream-Key" not in str(info.value) and "s3cret" not in str(info.value)


def test_whip_on_the_command_line_takes_its_token_from_the_file_or_the_environment_never_argv(tmp_path):
    path = tmp_path / "camrelay.toml"
    path.write_text(FILE)
    file_url = "https://live.example.org/whip/Stream-Key-123"

    def entries(*argv: str, env: dict[str, str] | None = None) -> list[tuple[str, str, str]]:
        args = build_parser().parse_args(["serve", "--config", str(path), *argv])
        return [(w.stream, w.url, w.bearer_token) for w in load_config(args, env or {}).whip]

    # --whip replaces the file's entries; the one for the file's URL keeps the file's token.
    assert entries("--whip", f"cam0={file_url}") == [("cam0", file_url, "Whip-s3cret_token")]
    assert entries("--whip", "cam0=https://other.example/whip") == [("cam0", "https://other.example/whip", "")]
    env = {"CAMRELAY_WHIP_BEARER_TOKEN": "From-the-env_0"}
    assert entries("--whip", "cam0=https://other.example/whip", env=env) == [
        ("cam0", "https://other.example/whip", "From-the-env_0")
    ]
    assert "From-the-env_0" in secret_values(load(FILE, env, {}, None, ["cam0=https://other.example/whip"]))
    with pytest.raises(ConfigError, match=r"^--whip: expected NAME=URL"):
        entries("--whip", "https://other.example/whip")
    with pytest.raises(ConfigError, match=r"^--whip door: no stream named 'door'"):
        entries("--whip", "door=https://other.example/whip")


def test_ice_servers_are_read_from_link_headers():
    values = [
        '<stun:stun.example.net:3478>; rel="ice-server"',  # mediamtx's form
        '<turn:turn.example.net:3478?transport=udp>; rel="ice-server"; username="u\\"1"; credential="p\\\\w";'
        ' credential-type="password", <turns:turn.example.net:5349?transport=tcp>; rel="ice-server"; username=u2;'
        " credential=pw2",  # two in one line, bare values
        '<https://example.net/doc>; rel="help", <http://not-ice>; rel="ice-server"',  # not ICE servers
        # ICE servers aiortc cannot gather with: an [IPv6] literal, a query on a stun: URL, TURN over TLS
        '<stun:[::1]:3478>; rel="ice-server", <stun:stun.example.net?transport=udp>; rel="ice-server"',
        '<turn:turn.example.net?transport=tls>; rel="ice-server"; username=u3; credential=pw3',
    ]
    assert parse_links(values) == [
        IceServer(("stun:stun.example.net:3478",)),
        IceServer(("turn:turn.example.net:3478?transport=udp",), 'u"1', "p\\w"),
        IceServer(("turns:turn.example.net:5349?transport=tcp",), "u2", "pw2"),
    ]


def test_the_servers_aiortc_gathers_with_are_its_first_stun_and_first_turn_url_whatever_their_credentials():
    """What decides whether the engine's Link servers are worth a second offer."""
    stun_a, stun_b = IceServer(("stun:a.example:3478",)), IceServer(("stun:b.example:3478",))
    turn = IceServer(("turn:t.example:3478?transport=tcp",), "1767225600:camrelay", "minted-for-this-201")

    def gathers(*servers: IceServer) -> dict[str, object]:
        return gathered_with([s.to_aiortc() for s in servers])

    assert gathers(stun_a, turn) == gathers(stun_a, stun_b, dataclasses.replace(turn, credential="for-the-next"))
    assert gathers(stun_a) != gathers(stun_b, stun_a)
    assert gathers(turn) != gathers(IceServer(("turn:t.example:3478?transport=udp",), "u", "p"))


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pw@live.example.org:8443/Stream-Key/whip?token=abc", "https://live.example.org:8443/..."),
        ("http://[::1]:8889/cam0/whip", "http://[::1]:8889/..."),
        (
            "https://customer-x.cloudflarestream.com/Stream-Key/webRTC/publish",
            "https://customer-x.cloudflarestream.com/...",
        ),
    ],
)
def test_urls_are_shown_without_credentials_path_or_query(url, shown):
    assert shown_url(url) == shown


# -- a real mediamtx ------------------------------------------------------


@pytest.fixture
async def engines(tmp_path):
    """Starts mediamtx engines, ``await engines(publisher=..., config=...)``; each is stopped at the end, whatever
    happened. ``config(engine)`` replaces the engine's configuration (on the engine's own ports)."""
    made: list[Engine] = []

    async def start(publisher: tuple[str, str] | None = None, config: Callable[[Engine], str] | None = None):
        engine = Engine(tmp_path, publisher)
        made.append(engine)
        if config is not None:
            engine.config.write_text(config(engine))
        await asyncio.to_thread(engine.start)
        return engine

    yield start
    for engine in made:
        await asyncio.to_thread(engine.close)


@pytest.fixture
async def relays():
    """Starts relays, ``await relays(config)``; each is stopped at the end (before the engines it publishes to)."""
    runners = []

    async def start(config):
        runner, relay = await start_relay(config)
        runners.append(runner)
        return relay

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_fifty_viewers_on_mediamtx_cost_camrelay_one_publish(engines, relays, http, spawn):
    """50 WHEP viewers read camrelay's stream from mediamtx: camrelay has no WebRTC session, its hub one
    subscriber, and it sends mediamtx each encoded byte once. With a 60 s GOP, viewers that join after the
    publish starts see a picture at all only because mediamtx's PLI gets camrelay's encoder to make a keyframe."""
    engine = await engines()
    relay = await relays(whip_config(WhipConfig("cam0", engine.url("cam0")), keyframe_interval=60.0))
    ready, results, go = spawn.Queue(), spawn.Queue(), spawn.Event()
    procs = []
    probe = WhepViewer(engine.url("cam0", "whep"), http)
    try:
        publisher = relay.relay.whip_publishers[0]
        await until(lambda: publisher.state == "publishing", "publishing to mediamtx")
        stream = relay.relay.streams["cam0"]
        for count in PEER_PROCESSES:
            plan = PeerPlan("webrtc", engine.url("cam0", "whep"), count, False, PEER_READ, TEST_FPS)
            procs.append(spawn.Process(target=run_worker, args=(plan, ready, go, results), daemon=True))
            procs[-1].start()
        for _ in procs:  # each process's viewers connected and got a frame
            assert (await asyncio.to_thread(ready.get, True, DEADLINE))[0] == "ready"
        await probe.connect()
        sent, encoded = publisher.bytes_sent, stream.stats.bytes_encoded
        go.set()
        samples = await probe.read_frames(3 * int(TEST_FPS))
        sent, encoded = publisher.bytes_sent - sent, stream.stats.bytes_encoded - encoded
        peers = [r for _ in procs for r in await asyncio.to_thread(results.get, True, DEADLINE)]

        # The pixel clock reads valid through mediamtx: in (nearly) every frame. A packet UDP drops between
        # mediamtx and the probe on a loaded machine makes the probe decode a damaged picture, camrelay's publish
        # notwithstanding (seen once, in a full run beside other work).
        valid = sum(s.latency_ms is not None for s in samples)
        assert valid >= 0.9 * len(samples), f"the pixel clock read valid in {valid} frames of {len(samples)}"
        assert len(peers) == VIEWERS_ON_ENGINE - 1 and all(p["frames"] > 0 and not p["error"] for p in peers)
        # camrelay's side: no WebRTC session, one hub subscriber, every byte sent once.
        assert relay.relay.sessions.count() == 0
        assert [s.name for s in stream.hub.subscribers] == ["whip-cam0"]
        assert 0.5 * encoded < sent < 1.5 * encoded, (sent, encoded)
        assert publisher.sessions == 1 and publisher.errors == 0
        async with http.get(relay.base + "/api/v1/streams") as resp:
            cam = (await resp.json())["streams"][0]
        assert cam["viewers"] == 0 and cam["encoders_running"] == 1
        (whip,) = cam["whip"]
        assert whip["url"] == f"http://127.0.0.1:{engine.http_port}/..."
        assert (whip["state"], whip["sessions"], whip["errors"]) == ("publishing", 1, 0)
        async with http.get(relay.base + "/metrics") as resp:
            metrics = await resp.text()
        assert re.search(r'^camrelay_whip_up\{stream="cam0",whip="0",url="[^"]+"\} 1', metrics, re.M)
        assert re.search(r"^camrelay_whip_sent_bytes_total\{[^}]*\} [1-9]", metrics, re.M)
    finally:
        go.set()
        await end_workers(procs, DEADLINE)
        for q in (ready, results):
            q.close()
            q.join_thread()
        await probe.close()


@pytest.mark.skipif(not borrowed.C_SEND_BUILT, reason="relay.webrtc._fastsend is not built here")
async def test_the_bytes_sent_to_mediamtx_count_the_frames_its_sender_sent_in_the_batch(engines, relays):
    """The WHIP publisher's sender is a viewer of its stream's hub like any other, and its frames go through the
    stream's batch (one C call a frame, whose counts are brought into aiortc's lazily): ``bytes_sent`` and
    ``packets_sent`` (the API's, the metric's) are what aiortc's own stats say, while publishing and once the
    session has ended (every frame sent until the send loop ended counted, none lost at the close)."""
    engine = await engines()
    relay = await relays(whip_config(WhipConfig("cam0", engine.url("cam0"))))
    publisher = relay.relay.whip_publishers[0]
    await until(lambda: publisher.state == "publishing", "publishing to mediamtx")
    sender = publisher._sender
    await until(lambda: (lane := rtpsend.lane_of(sender)) is not None and lane.frames >= 10, "frames in the batch")

    async def stats() -> tuple[int, int]:
        out = next(s for s in (await sender.getStats()).values() if s.type == "outbound-rtp")
        return out.bytesSent, out.packetsSent

    counted = (publisher.bytes_sent, publisher.packets_sent)
    assert counted == await stats()  # read in the same pass: no frame between
    lane = rtpsend.lane_of(sender)
    batched = lane.frames
    await until(lambda: lane.frames >= batched + 3, "more frames in the batch")
    await publisher.close()
    assert (publisher.bytes_sent, publisher.packets_sent) == await stats()
    assert publisher.bytes_sent > counted[0]


async def test_a_frozen_then_restarted_mediamtx_is_published_to_again_and_camrelays_viewers_never_notice(
    engines, relays, http, caplog
):
    caplog.set_level(logging.INFO, logger="relay.webrtc.whip")
    engine = await engines()
    relay = await relays(whip_config(WhipConfig("cam0", engine.url("cam0"))))
    viewer = WhepViewer(relay.whep(), http)
    try:
        publisher = relay.relay.whip_publishers[0]
        await until(lambda: publisher.state == "publishing", "publishing to mediamtx")
        await viewer.connect()
        await viewer.read_frames(10)
        # Every frame encoded from here on, by its capture time (its pixel clock).
        with EncodedFrames(relay.relay.streams["cam0"]) as tap:
            received = []
            engine.freeze()  # a server that hangs, or a link that dies without a word
            deadline = time.monotonic() + DEADLINE
            while publisher.state == "publishing":
                assert time.monotonic() < deadline, "a silent server was not noticed"
                (frame,) = await viewer.read_frames(1)
                assert frame.latency_ms is not None, "a frame with a valid pixel clock"
                received.append(capture_ms(frame))
            encoded = tap.clocks
        # Frames still on their way to the viewer when the publisher gave up are not counted; all the others are,
        # from the viewer's first after the tap joined (the tap may start from a keyframe of a moment before).
        missed = [t for t in encoded if received[0] <= t <= received[-1] and t not in received]
        assert encoded[0] <= received[0] and not missed, f"camrelay's viewer missed {len(missed)} frames"
        await asyncio.to_thread(engine.kill)
        await asyncio.to_thread(engine.start)  # the same ports
        await until(lambda: publisher.sessions == 2 and publisher.state == "publishing", "publishing again")
        assert await clock_reads_through(engine.url("cam0", "whep"), http)
    finally:
        await viewer.close()
    lines = [r for r in caplog.records if r.name == "relay.webrtc.whip"]
    assert not any(r.exc_info for r in lines), "no traceback"
    failures = [r.getMessage() for r in lines if r.levelno == logging.WARNING]
    assert failures and len(failures) == publisher.errors  # one line per failure, each followed by a retry
    shown = f"stream=cam0 whip=http://127.0.0.1:{engine.http_port}/... "
    assert all(line.startswith(shown) and "; retrying in " in line for line in failures)
    assert f"{shown}server silent for 10s; retrying in" in failures[0]


async def test_mediamtx_refuses_a_wrong_bearer_token_and_takes_the_right_one(engines, relays, http, caplog):
    """mediamtx's internal auth reads ``Authorization: Bearer user:password`` (internal/protocols/httpp)."""
    caplog.set_level(logging.DEBUG)
    user, password = TOKEN.split(":")
    engine = await engines(publisher=(user, password))
    wrong = WhipConfig("cam0", engine.url("wrong"), f"{user}:Not-the-password")
    right = WhipConfig("cam0", engine.url("right"), TOKEN)
    relay = await relays(whip_config(wrong, right))
    refused, accepted = relay.relay.whip_publishers
    await until(lambda: accepted.state == "publishing", "publishing with the right token")
    await until(lambda: refused.errors >= 2, "the refused publisher trying again")
    assert refused.sessions == 0 and refused.state == "retrying"
    assert refused.last_error.startswith("refused: 401")
    assert await clock_reads_through(engine.url("right", "whep"), http)
    nothing = WhepViewer(engine.url("wrong", "whep"), http)
    try:
        with pytest.raises(WhepError) as info:
            await nothing.connect()
        assert info.value.status == 404  # nothing was published where the token was wrong
    finally:
        await nothing.close()
    texts = []
    for path in ("/api/v1/streams", "/api/v1/status", "/metrics"):
        async with http.get(relay.base + path) as resp:
            texts.append(await resp.text())
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (password, "Not-the-password"):
        assert all(secret not in text for text in texts), "a token in the API or /metrics"
        assert secret not in logged, "a token in the log"


class Front:
    """A throwaway WHIP endpoint in front of one mediamtx path, as an engine that hands out ICE servers (LiveKit,
    Cloudflare) is: it forwards each offer and DELETE, and answers with a ``Location`` of its own and the ``Link``
    header values ``links``. ``seen`` lists the methods it served. The next ``unconnectable`` offers are answered
    by an aiortc peer that is gone at once, with no candidate: the answer applies, and ICE never connects."""

    def __init__(self, target: str, http: aiohttp.ClientSession, links: tuple[str, ...] = ()) -> None:
        self.target, self.http, self.links = target, http, links
        self.seen: list[str] = []
        self.offers: list[str] = []  # as POSTed
        self.unconnectable = 0
        self.refuse_video = False  # answer every offer with its video refused (m=video port 0)
        app = web.Application()
        app.router.add_post("/whip", self.post)
        app.router.add_delete("/session/{id}", self.delete)
        self.runner = web.AppRunner(app)
        self.url = ""

    async def start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/whip"

    async def post(self, request: web.Request) -> web.Response:
        self.seen.append("POST")
        offer = await request.text()
        self.offers.append(offer)
        if self.unconnectable:
            self.unconnectable -= 1
            answer = await unconnectable_answer(offer)
            return web.Response(status=201, text=answer, content_type=SDP_TYPE, headers={"Location": "/session/x"})
        try:
            async with self.http.post(self.target, data=offer, headers={"Content-Type": SDP_TYPE}) as resp:
                answer = await resp.read()
                if self.refuse_video:
                    answer = re.sub(rb"(?m)^m=video \d+", b"m=video 0", answer)
                if resp.status != 201:
                    return web.Response(status=resp.status, body=answer)
                session = resp.headers["Location"].rsplit("/", 1)[1]
        except aiohttp.ClientError:
            return web.Response(status=502, text="engine gone")
        headers = CIMultiDict([("Location", f"{self.url.removesuffix('/whip')}/session/{session}")])
        headers.extend(("Link", link) for link in self.links)
        return web.Response(status=201, body=answer, content_type=SDP_TYPE, headers=headers)

    async def delete(self, request: web.Request) -> web.Response:
        self.seen.append("DELETE")
        try:
            async with self.http.delete(f"{self.target}/{request.match_info['id']}") as resp:
                return web.Response(status=resp.status)
        except aiohttp.ClientError:
            return web.Response(status=502, text="engine gone")


async def unconnectable_answer(offer: str) -> str:
    pc = RTCPeerConnection()
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        answer = pc.localDescription.sdp
    finally:
        await pc.close()
    candidates = ("a=candidate:", "a=end-of-candidates")
    return "".join(line for line in answer.splitlines(keepends=True) if not line.startswith(candidates))


@pytest.fixture
async def fronts(http):
    """Starts ``Front``s, ``await fronts(engine.url(path), links)``; each is stopped at the end."""
    made: list[Front] = []

    async def start(target: str, links: tuple[str, ...] = ()) -> Front:
        made.append(Front(target, http, links))
        await made[-1].start()
        return made[-1]

    yield start
    for front in made:
        await front.runner.cleanup()


def link(url: str) -> str:
    return f'<{url}>; rel="ice-server"'


async def test_the_engines_link_servers_come_first_and_are_offered_again_only_when_aiortc_would_gather_anew(
    engines, fronts, relays, http
):
    """Engines that hand out ICE servers (LiveKit, Cloudflare; this mediamtx would also use them itself): the
    relay has a STUN server of its own, one engine names another, one names the relay's. aiortc gathers with
    the first STUN URL only, so the engine's comes first: the first engine's session is ended and offered once
    more with its server; the second's offer already gathered with the server its 201 names."""
    engine = await engines()
    async with stun_server() as (own, own_url), stun_server() as (theirs, their_url):
        other = await fronts(engine.url("other"), (link(their_url),))
        same = await fronts(engine.url("same"), (link(own_url),))
        config = whip_config(WhipConfig("cam0", other.url), WhipConfig("cam0", same.url))
        config = dataclasses.replace(
            config, webrtc=dataclasses.replace(config.webrtc, ice_servers=(IceServer((own_url,)),))
        )
        relay = await relays(config)
        publishers = relay.relay.whip_publishers
        await until(lambda: all(p.state == "publishing" for p in publishers), "publishing through both fronts")
        assert other.seen == ["POST", "DELETE", "POST"]
        assert theirs.clients, "the second offer was gathered with the engine's STUN server"
        assert same.seen == ["POST"], "no second offer when aiortc would gather with the same servers"
        assert [p.describe()["ice_servers"] for p in publishers] == [[their_url], [own_url]]
        assert await clock_reads_through(engine.url("other", "whep"), http)
        for publisher in publishers:
            await publisher.close()
        assert (other.seen[3:], same.seen[1:]) == (["DELETE"], ["DELETE"]), "the session is ended on stop"


async def test_a_link_server_aiortc_cannot_parse_is_left_out_and_the_publisher_publishes(
    engines, fronts, relays, http, caplog
):
    """aiortc takes no [IPv6] literal and no query on a stun: URL; such a server in the 201 is left out, not
    handed to aiortc (which would fail every offer before it is POSTed)."""
    caplog.set_level(logging.INFO, logger="relay.webrtc.whip")
    engine = await engines()
    front = await fronts(engine.url("cam0"), (link("stun:[::1]:3478"), link("stun:127.0.0.1:3478?transport=udp")))
    relay = await relays(whip_config(WhipConfig("cam0", front.url)))
    publisher = relay.relay.whip_publishers[0]
    await until(lambda: publisher.state == "publishing", "publishing through the front")
    assert (publisher.sessions, publisher.errors, front.seen) == (1, 0, ["POST"])
    assert publisher.describe()["ice_servers"] == []
    assert await clock_reads_through(engine.url("cam0", "whep"), http)
    assert not any(r.exc_info for r in caplog.records), "no traceback"


async def test_only_publishing_resets_the_backoff(engines, fronts, relays, caplog):
    """A session that fails before it is up is a failure however long it took (camrelay's connect timeout, 15 s,
    is longer than the 10 s of publishing that start the schedule over): the delays grow. A session that
    published that long starts it over. Scaled down in proportion: a 1 s connect timeout, 0.5 s of publishing."""
    caplog.set_level(logging.INFO, logger="relay.webrtc.whip")
    engine = await engines()
    front = await fronts(engine.url("cam0"))
    front.unconnectable = 3  # ICE never connects for the first three offers: three connect timeouts
    relay = await relays(make_config())
    schedule = Backoff(initial=0.1, jitter=0.0, stable_after=0.5)
    publisher = WhipPublisher(relay.relay.streams["cam0"].hub, front.url, connect_timeout=1.0, retry=schedule)
    publisher.start()
    try:
        await until(lambda: publisher.sessions == 1, "publishing once ICE can connect")
        failed = publisher.errors
        await asyncio.to_thread(engine.kill)  # noticed after SERVER_SILENCE (10 s) of publishing
        await until(lambda: publisher.errors > failed, "the vanished server noticed")
    finally:
        await publisher.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "relay.webrtc.whip"]
    published = next(i for i, line in enumerate(lines) if "publishing session=1" in line)
    delays = [
        [float(m[1]) for line in part if (m := re.search(r"; retrying in ([\d.]+)s$", line))]
        for part in (lines[:published], lines[published:])
    ]
    assert len(delays[0]) >= 3 and delays[0] == pytest.approx([0.1 * 2**i for i in range(len(delays[0]))])
    assert delays[1][0] == pytest.approx(0.1)


@contextlib.asynccontextmanager
async def _answering(handle, *ports: int):
    """An HTTP server on each of ``ports`` (127.0.0.1) answering every request with ``handle``, while in the block."""
    runners = []
    try:
        for port in ports:
            app = web.Application()
            app.router.add_route("*", "/{path:.*}", handle)
            runners.append(web.AppRunner(app))
            await runners[-1].setup()
            await web.TCPSite(runners[-1], "127.0.0.1", port).start()
        yield
    finally:
        for runner in runners:
            await runner.cleanup()


async def _failing(url: str, errors: int, **kw) -> WhipPublisher:
    """A publisher of an empty hub to ``url`` (with the test token), run until ``errors`` sessions failed, closed."""
    publisher = WhipPublisher(PacketHub("cam0", lambda: None), url, TOKEN, **kw)
    publisher.start()
    try:
        await until(lambda: publisher.errors >= errors, f"{errors} sessions that could not start")
    finally:
        await publisher.close()
    return publisher


async def test_a_redirect_to_another_origin_never_carries_the_token():
    """RFC 9725 lets an endpoint redirect, and a session's Location may be anywhere; the token is for the
    configured URL's origin alone (another port is another origin), on every request: the POST, the DELETE, and
    the POST of the next session. Each answer here is no answer, so each session ends (DELETE) and another
    starts: the endpoint redirects the first offer elsewhere, whose session is there; puts the second's
    session elsewhere; keeps the third's."""
    heard: list[tuple[str, str, str, str | None]] = []  # (origin, method, path, Authorization)

    async def handle(request: web.Request) -> web.Response:
        where = "endpoint" if request.url.port == ports[0] else "elsewhere"
        heard.append((where, request.method, request.path, request.headers.get("Authorization")))
        offers = sum(1 for h in heard if h[:2] == ("endpoint", "POST"))
        if request.method == "DELETE":
            return web.Response()
        if where == "endpoint" and offers == 1:
            raise web.HTTPTemporaryRedirect(f"http://127.0.0.1:{ports[1]}/whip")
        if where == "endpoint" and offers > 3:
            return web.Response(status=401, text="who are you")
        location = f"http://127.0.0.1:{ports[1]}/session/2" if offers == 2 else f"/session/{offers}"
        return web.Response(status=201, text="no answer", content_type=SDP_TYPE, headers={"Location": location})

    ports = free_port(), free_port()
    async with _answering(handle, *ports):
        publisher = await _failing(f"http://127.0.0.1:{ports[0]}/whip", 4)
    bearer = f"Bearer {TOKEN}"
    assert heard[:8] == [
        ("endpoint", "POST", "/whip", bearer),
        ("elsewhere", "POST", "/whip", None),  # aiohttp drops it from a redirect
        ("elsewhere", "DELETE", "/session/1", None),  # a relative Location, after the redirect
        ("endpoint", "POST", "/whip", bearer),
        ("elsewhere", "DELETE", "/session/2", None),
        ("endpoint", "POST", "/whip", bearer),
        ("endpoint", "DELETE", "/session/3", bearer),
        ("endpoint", "POST", "/whip", bearer),
    ]
    assert publisher.last_error == "refused: 401 who are you"


async def test_a_hostile_whip_servers_answers_are_one_line_each_never_a_traceback(caplog):
    """A WHIP server that answers with terminal escapes in its refusal, a Location no URL parser takes, and an
    answer whose payload type has thousands of digits: each is one line and a retry, with what it said shown safely,
    never the traceback of a bug (each was a ValueError once, a traceback at every retry)."""
    answers = [
        web.Response(status=403, text="\x1b[2J\x1b]0;owned\x07 fake\x00 line " + "x" * 500),
        web.Response(status=201, text="v=0", content_type=SDP_TYPE, headers={"Location": "http://[::1/x"}),
        web.Response(
            status=201, content_type=SDP_TYPE, headers={"Location": "/s"},
            text="v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:" + "9" * 5000 + " H264/90000\r\n",
        ),
    ]  # fmt: skip
    posts = []

    async def handle(request: web.Request) -> web.Response:
        if request.method == "DELETE":
            return web.Response()
        posts.append(request.path)
        return answers[min(len(posts), len(answers)) - 1]

    port = free_port()
    caplog.set_level(logging.WARNING, logger="relay.webrtc.whip")
    async with _answering(handle, port):
        await _failing(f"http://127.0.0.1:{port}/whip", 3, retry=Backoff(initial=0.01, cap=0.01))
    said = [r.getMessage().split(" ", 2)[2].rpartition("; retrying")[0] for r in caplog.records if "retrying" in r.msg]
    assert said[0] == "refused: 403 ?[2J?]0;owned? fake? line " + "x" * 74  # 100 characters
    assert said[1] == "201 with a Location that cannot be read: 'http://[::1/x'"
    assert said[2].startswith("answer could not be applied: ValueError")
    assert [r for r in caplog.records if r.exc_info] == []
    # with the stream's SPS known, the answer's payload types are read first: a type no number of 0..127 is none
    for pt in ("9" * 5000, "200"):
        assert h264_payload_types(f"v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:{pt} H264/90000\r\n") == {}


async def test_a_publisher_stopped_while_it_ends_a_session_still_closes_the_sessions_peer_connection():
    """Stopped while its DELETE of a failed session waits on the server: the session's peer connection is closed all
    the same (its ICE sockets were left open once; the suite's leak check names any left)."""
    deleting, release = asyncio.Event(), asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        if request.method == "DELETE":
            deleting.set()
            await release.wait()
            return web.Response()
        return web.Response(status=201, text="v=0\r\n", content_type=SDP_TYPE, headers={"Location": "/s"})

    port = free_port()
    async with _answering(handle, port):
        publisher = WhipPublisher(PacketHub("cam0", lambda: None), f"http://127.0.0.1:{port}/whip", TOKEN)
        publisher.start()
        await until(deleting.is_set, "the DELETE of the session whose answer could not be applied")
        await publisher.close()
        release.set()
    assert publisher.state == "stopped" and publisher.sessions == 0


@pytest.mark.parametrize(
    ("url", "token", "warned"),
    [
        ("http://192.0.2.1:8889/cam0/whip", TOKEN, True),  # another host, in clear
        ("https://192.0.2.1:8889/cam0/whip", TOKEN, False),
        ("http://127.0.0.1:8889/cam0/whip", TOKEN, False),  # loopback never leaves the machine
        ("http://192.0.2.1:8889/cam0/whip", "", False),
    ],
)
async def test_a_token_sent_in_clear_to_another_host_is_warned_of(caplog, url, token, warned):
    caplog.set_level(logging.WARNING, logger="relay.webrtc.whip")
    publisher = WhipPublisher(PacketHub("cam0", lambda: None), url, token)
    publisher.start()
    await publisher.close()
    assert any("sends its bearer token over plain http" in r.getMessage() for r in caplog.records) == warned


# -- the read replica: no new code, a documented mediamtx.yml ---------------


def replica_config(doc: str, rtsp_source: str, rtsp_port: int, http_port: int, udp_port: int) -> str:
    """docs/scale-out.md's replica mediamtx.yml, pointed at this test's camrelay and on this test's ports."""
    text = re.search(r"```yaml\n(# replica.*?)```", doc, re.S)[1]
    for key, value in {
        "rtspAddress": f"127.0.0.1:{rtsp_port}",
        "rtspTransports": "[tcp]",  # its UDP ports would be 8000/8001, which other tests may hold
        "webrtcAddress": f"127.0.0.1:{http_port}",
        "webrtcLocalUDPAddress": f"127.0.0.1:{udp_port}",
        "source": rtsp_source,
    }.items():
        text, n = re.subn(rf"^(\s*{key}:).*$", rf"\g<1> {value}", text, flags=re.M)
        assert n == 1, f"the documented replica config has no {key}"
    return text + "webrtcIPsFromInterfaces: false\nwebrtcAdditionalHosts: [127.0.0.1]\n"


async def replica_viewer(url: str, http: aiohttp.ClientSession) -> WhepViewer:
    """A connected viewer; the replica pulls its source when it starts, and until then WHEP answers 404."""
    deadline = time.monotonic() + DEADLINE
    while True:
        viewer = WhepViewer(url, http)
        try:
            await viewer.connect()
            return viewer
        except WhepError as exc:
            await viewer.close()
            assert exc.status == 404 and time.monotonic() < deadline, exc
        await asyncio.sleep(0.2)


async def test_a_read_replica_mediamtx_pulls_camrelays_rtsp_and_serves_its_own_viewers(engines, relays, http):
    password = "Nvr-pa55word"
    relay = await relays(make_config(rtsp=True, rtsp_user="nvr", rtsp_password=password))
    await wait_published(relay)
    rtsp_port = free_port()
    source = f"rtsp://nvr:{password}@127.0.0.1:{relay.relay.config.rtsp.port}/cam0"
    doc = (ROOT / "docs" / "scale-out.md").read_text()
    replica = await engines(config=lambda e: replica_config(doc, source, rtsp_port, e.http_port, e.udp_port))
    viewer = await replica_viewer(replica.url("cam0", "whep"), http)
    try:
        assert all(s.latency_ms is not None for s in await viewer.read_frames(10))
    finally:
        await viewer.close()
    assert None not in await asyncio.to_thread(read_rtsp, f"rtsp://127.0.0.1:{rtsp_port}/cam0", 10)
    assert relay.relay.sessions.count() == 0  # camrelay served neither


# -- a camera passed through: the offer names the profile it sends ----------


def with_rtsp(engine: Engine, rtsp_port: int) -> str:
    """The engine's configuration with its RTSP server on (TCP, on ``rtsp_port``): to read back what it got."""
    config = json.loads(engine.config.read_text())
    config.update(rtsp=True, rtspTransports=["tcp"], rtspAddress=f"127.0.0.1:{rtsp_port}")
    return json.dumps(config)


def probed_profile(url: str) -> str:
    """The H.264 profile ffprobe reads from an RTSP URL."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-rtsp_transport", "tcp", "-select_streams", "v:0", "-show_entries",
         "stream=profile", "-of", "csv=p=0", url],
        capture_output=True, text=True, timeout=DEADLINE, check=True,
    )  # fmt: skip
    return out.stdout.strip()


async def test_a_passed_through_high_camera_is_offered_to_the_whip_server_as_high(
    engines, fronts, relays, start_camera, http
):
    """The WHIP offer names the profile the camera sends (not aiortc's Constrained Baseline) and its level:
    mediamtx takes it, announces High to its own RTSP readers, and its viewers decode the camera's pixel clocks."""
    camera = start_camera("cam", encoding=Encoding(profile="high", gop=1.0))
    rtsp_port = free_port()
    engine = await engines(config=lambda e: with_rtsp(e, rtsp_port))
    front = await fronts(engine.url("cam0"))  # to see the offer as the server got it
    stream = StreamConfig("cam0", parse_source_spec(camera.url + "#mode=passthrough"))
    relay = await relays(whip_config(WhipConfig("cam0", front.url), streams=(stream,)))
    publisher = relay.relay.whip_publishers[0]
    await until(lambda: publisher.state == "publishing", "publishing to mediamtx")
    sps = relay.relay.streams["cam0"].sps
    profile = await asyncio.to_thread(probed_profile, f"rtsp://127.0.0.1:{rtsp_port}/cam0")
    viewer = WhepViewer(engine.url("cam0", "whep"), http)
    try:
        await viewer.connect()
        samples = await viewer.read_frames(10)
    finally:
        await viewer.close()
    assert all(s.latency_ms is not None for s in samples), "the camera's pixel clocks, through mediamtx"
    whip = publisher.describe()
    assert sps is not None and sps.profile == "High"
    assert profile == "High", "mediamtx announces what it was offered and sent"
    (offer,) = front.offers
    offered = re.findall(r"^a=fmtp:\d+ .*profile-level-id=([0-9a-fA-F]{6})", offer, re.M)
    assert offered == [sps.sdp_profile_level_id] == [sps.profile_level_id], "one H.264 payload type, the SPS's"
    assert whip["profile_level_id"] == sps.sdp_profile_level_id
    assert whip["answered_profile_level_id"][:2] == "64", "mediamtx answered High"
    assert (publisher.sessions, publisher.errors) == (1, 0)


async def test_a_server_whose_answer_takes_no_h264_of_that_profile_gets_one_line_and_a_retry(
    engines, fronts, relays, start_camera, caplog
):
    """A server that cannot take the camera's profile answers with its video refused (port 0): the publisher
    says so in one line per attempt, without a traceback, and retries with backoff."""
    caplog.set_level(logging.INFO, logger="relay.webrtc.whip")
    camera = start_camera("cam", encoding=Encoding(profile="high", gop=1.0))
    engine = await engines()
    front = await fronts(engine.url("cam0"))
    front.refuse_video = True
    stream = StreamConfig("cam0", parse_source_spec(camera.url + "#mode=passthrough"))
    relay = await relays(whip_config(WhipConfig("cam0", front.url), streams=(stream,)))
    publisher = relay.relay.whip_publishers[0]
    await until(lambda: publisher.errors >= 2, "refused twice")
    sps = relay.relay.streams["cam0"].sps
    assert publisher.sessions == 0 and publisher.state in ("retrying", "connecting")
    assert publisher.last_error == (
        f"refused H.264 profile-level-id {sps.sdp_profile_level_id}: the answer takes no H.264"
    )
    lines = [r for r in caplog.records if r.name == "relay.webrtc.whip" and "refused H.264" in r.getMessage()]
    assert len(lines) == publisher.errors  # one a failure
    assert all(r.exc_info is None for r in lines) and all("retrying in" in r.getMessage() for r in lines)
