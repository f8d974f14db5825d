"""WHEP end to end: a real relay on loopback, real aiortc viewers."""

from __future__ import annotations

import asyncio
import logging
import re
import time

import pytest

from relay.config import StreamConfig
from relay.source import SourceSpec
from relay.webrtc.whepclient import WhepError, WhepViewer
from signalling.pages import PAGE_POLICY
from signalling.sdp import MAX_CANDIDATES

from .conftest import EncodedFrames, RunningRelay, capture_ms, session_of

CHROMIUM_OFFER = (__import__("pathlib").Path(__file__).parent / "data" / "chromium_offer.sdp").read_text()


async def streams(http, relay: RunningRelay) -> dict:
    async with http.get(relay.base + "/api/v1/streams") as resp:
        assert resp.status == 200
        return {s["name"]: s for s in (await resp.json())["streams"]}


async def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_viewer_receives_frames_with_a_valid_pixel_clock(relay_server, http):
    viewer = WhepViewer(relay_server.whep(), http)
    try:
        with EncodedFrames(relay_server.relay.streams["cam0"]) as encoded:
            await viewer.connect()
            clocks = [capture_ms(s) for s in await viewer.read_frames(30)]
            assert None not in clocks, "every frame's pixel clock reads valid"
            # Each shows the capture time of a frame the relay encoded, in the order it encoded them.
            assert set(clocks) <= set(encoded.clocks) and clocks == sorted(set(clocks)), clocks
        frame = await viewer.recv()
        assert (frame.width, frame.height) == (640, 360)
    finally:
        await viewer.close()


async def test_ten_viewers_share_one_encoder(relay_server, http):
    viewers = [WhepViewer(relay_server.whep(), http) for _ in range(10)]
    try:
        await asyncio.gather(*(v.connect() for v in viewers))
        results = await asyncio.gather(*(v.read_frames(10) for v in viewers))
        for samples in results:
            assert all(s.latency_ms is not None for s in samples)
        cam = (await streams(http, relay_server))["cam0"]
        assert cam["viewers"] == 10 and cam["viewers_connected"] == 10
        assert cam["encoders_running"] == 1
        # The relay never built an aiortc encoder: every sender only packs.
        for viewer in viewers:
            encoder = session_of(relay_server, viewer).pc.getTransceivers()[0].sender._RTCRtpSender__encoder
            assert type(encoder).__name__ == "SharedPacker"
    finally:
        await asyncio.gather(*(v.close() for v in viewers))
    await wait_for(lambda: _count(http, relay_server, 0), what="viewer count back to 0")


async def _count(http, relay, n):
    return (await streams(http, relay))["cam0"]["viewers"] == n


async def test_stuck_subscriber_does_not_slow_the_others(relay_server, http):
    """A hub subscriber that never reads (a wedged viewer) and a viewer that stops
    reading: the healthy viewer still gets every frame the encoder makes."""
    relay = relay_server.relay
    stuck = relay.streams["cam0"].hub.subscribe("wedged")
    healthy = WhepViewer(relay_server.whep(), http)
    idle = WhepViewer(relay_server.whep(), http)
    try:
        await asyncio.gather(healthy.connect(), idle.connect())
        await healthy.read_frames(5)
        await idle.read_frames(5)
        stats = relay.streams["cam0"].stats
        start_encoded = stats.frames_encoded
        got = len(await healthy.read_frames(60, clock=False))
        encoded = stats.frames_encoded - start_encoded
        assert got >= encoded - 3, f"healthy viewer got {got} of {encoded} frames"
        assert stuck.dropped > 0 and len(stuck) <= stuck.max_frames
    finally:
        stuck.close()
        await asyncio.gather(healthy.close(), idle.close())


@pytest.mark.relay_config(keyframe_interval=60.0)
async def test_joining_mid_gop_gets_a_keyframe_at_once(relay_server, http):
    first = WhepViewer(relay_server.whep(), http)
    late = WhepViewer(relay_server.whep(), http)
    stream = relay_server.relay.streams["cam0"]
    try:
        with EncodedFrames(stream) as encoded:
            await first.connect()
            await first.read_frames(20)  # well inside the 60 s GOP
            joined_after = encoded.clocks[-1]
            regular = stream.stats.keyframes - stream.stats.keyframes_forced
            await late.connect()
            (sample,) = await late.read_frames(1)
            # Its first picture is a keyframe encoded after it joined, and not the GOP's next one (60 s on):
            # no regular keyframe came meanwhile, so it was forced for the newcomer.
            assert capture_ms(sample) in encoded.keyframes and capture_ms(sample) > joined_after
            assert stream.stats.keyframes - stream.stats.keyframes_forced == regular
    finally:
        await asyncio.gather(first.close(), late.close())


@pytest.mark.relay_config(keyframe_interval=60.0)
async def test_pli_from_a_viewer_causes_an_idr(relay_server, http):
    viewer = WhepViewer(relay_server.whep(), http)
    stats = relay_server.relay.streams["cam0"].stats
    try:
        await viewer.connect()
        await viewer.read_frames(20)  # its join's keyframe came with the first of them
        before = stats.keyframes_forced
        receiver = viewer.pc.getTransceivers()[0].receiver
        ssrc = next(iter(receiver._RTCRtpReceiver__remote_streams))
        await receiver._send_rtcp_pli(ssrc)
        await wait_for(lambda: _true(stats.keyframes_forced > before), timeout=5, what="forced IDR after PLI")
        async with http.get(relay_server.base + "/api/v1/streams") as resp:
            asked = (await resp.json())["streams"][0]["keyframe_requests"]
        assert asked["viewers"] >= asked["viewers_sent"] >= 1  # the API counts the viewer's PLI, let through
    finally:
        await viewer.close()


async def _true(value):
    return value


async def test_viewer_count_returns_to_zero_after_delete_and_after_vanishing(relay_server, http):
    a, b = WhepViewer(relay_server.whep(), http), WhepViewer(relay_server.whep(), http)
    await asyncio.gather(a.connect(), b.connect())
    await asyncio.gather(a.read_frames(3), b.read_frames(3))
    assert (await streams(http, relay_server))["cam0"]["viewers"] == 2
    await a.close(delete=True)
    await wait_for(lambda: _count(http, relay_server, 1), what="DELETE frees the session")
    async with http.delete(a.location) as resp:
        assert resp.status == 404  # already gone
    await b.close(delete=False)  # vanishes: no DELETE, the DTLS session just ends
    await wait_for(lambda: _count(http, relay_server, 0), what="a vanished viewer is freed")


@pytest.mark.relay_config(connect_timeout=1.0)
async def test_offer_that_never_connects_is_freed_by_the_deadline(relay_server, http, caplog):
    caplog.set_level(logging.INFO, logger="relay")
    async with http.post(relay_server.whep(), data=CHROMIUM_OFFER, headers={"Content-Type": "application/sdp"}) as resp:
        assert resp.status == 201
        assert resp.headers["Content-Type"] == "application/sdp"
        assert resp.headers["Location"].startswith("/whep/cam0/")
        answer = await resp.text()
    assert "H264/90000" in answer and "a=sendonly" in answer
    assert (await streams(http, relay_server))["cam0"]["viewers"] == 1
    # The offer's only candidates are mDNS names, which the relay drops, and no
    # browser is behind it to send checks: ICE cannot complete.
    await wait_for(lambda: _count(http, relay_server, 0), timeout=30, what="the session freed")
    closed = [r.getMessage() for r in caplog.records if " closed (" in r.getMessage()]
    assert len(closed) == 1 and "closed (connect timeout)" in closed[0], closed  # by the connect deadline


async def post(http, url, body, content_type="application/sdp"):
    async with http.post(url, data=body, headers={"Content-Type": content_type}) as resp:
        return resp.status, (await resp.text()).strip(), resp.headers


@pytest.mark.parametrize(
    ("path", "body", "ctype", "status", "reason"),
    [
        ("/whep/nope", CHROMIUM_OFFER, "application/sdp", 404, "no stream named 'nope'"),
        (
            "/whep/cam0",
            CHROMIUM_OFFER,
            "application/x-www-form-urlencoded",
            415,
            "Content-Type must be application/sdp, got 'application/x-www-form-urlencoded'",
        ),
        ("/whep/cam0", CHROMIUM_OFFER, "text/plain", 415, "Content-Type must be application/sdp, got 'text/plain'"),
        ("/whep/cam0", "v=0\r\n" + "a=x\r\n" * 20000, "application/sdp", 413, "offer larger than 65536 bytes"),
        ("/whep/cam0", "hello", "application/sdp", 400, "malformed offer: offer does not start with v=0"),
        ("/whep/cam0", b"v=0\r\n\xff\xfe", "application/sdp", 400, "offer is not UTF-8 text"),
        (
            "/whep/cam0",
            CHROMIUM_OFFER.replace("H264/90000", "H263/90000"),
            "application/sdp",
            400,
            "malformed offer: offer cannot receive H.264 video (no H264 rtpmap in the video section)",
        ),
    ],
)
async def test_bad_requests_get_a_status_and_a_reason(relay_server, http, path, body, ctype, status, reason):
    code, text, _ = await post(http, relay_server.base + path, body, ctype)
    assert (code, text) == (status, reason)
    assert relay_server.relay.sessions.count() == 0


async def test_offer_aiortc_cannot_apply_is_a_400_not_a_500(relay_server, http):
    # Passes the quick checks, but its fingerprint is garbage: aiortc raises inside.
    offer = CHROMIUM_OFFER.replace("a=fingerprint:sha-256 ", "a=fingerprint:sha-256 ZZ")
    offer = offer.replace("a=setup:actpass", "a=setup:bogus")
    code, text, _ = await post(http, relay_server.whep(), offer)
    assert code == 400 and text.startswith("offer could not be applied: ")
    assert relay_server.relay.sessions.count() == 0


@pytest.mark.relay_config(max_viewers=2)
async def test_viewer_limit_is_a_503_with_retry_after(relay_server, http):
    viewers = [WhepViewer(relay_server.whep(), http) for _ in range(3)]
    try:
        await viewers[0].connect()
        await viewers[1].connect()
        # Connected, not just answered: aioice leaks its consent task when a
        # connection is closed while ICE is still checking.
        await asyncio.gather(viewers[0].read_frames(1), viewers[1].read_frames(1))
        with pytest.raises(WhepError) as info:
            await viewers[2].connect()
        assert info.value.status == 503
        assert info.value.reason == "stream 'cam0' has its maximum of 2 viewers"
        code, _, headers = await post(http, relay_server.whep(), CHROMIUM_OFFER)
        assert code == 503 and headers["Retry-After"] == "10"
    finally:
        await asyncio.gather(*(v.close() for v in viewers))


@pytest.mark.relay_config(
    streams=(StreamConfig("cam0", SourceSpec("test", "")), StreamConfig("cam1", SourceSpec("test", ""))),
    max_viewers_total=2,
)
async def test_the_relay_wide_viewer_limit_counts_every_stream(relay_server, http):
    viewers = [WhepViewer(relay_server.whep("cam0"), http), WhepViewer(relay_server.whep("cam1"), http)]
    try:
        await asyncio.gather(*(v.connect() for v in viewers))
        await asyncio.gather(*(v.read_frames(1) for v in viewers))
        code, reason, headers = await post(http, relay_server.whep("cam1"), CHROMIUM_OFFER)
        assert (code, reason) == (503, "this relay has its maximum of 2 viewers")
        assert headers["Retry-After"] == "10"
    finally:
        await asyncio.gather(*(v.close() for v in viewers))


async def test_session_urls_404_for_unknown_sessions(relay_server, http):
    async with http.delete(relay_server.whep() + "/nosuchsession") as resp:
        assert resp.status == 404
    async with http.patch(
        relay_server.whep() + "/nosuchsession",
        data="a=end-of-candidates\r\n",
        headers={"Content-Type": "application/trickle-ice-sdpfrag"},
    ) as resp:
        assert resp.status == 404
    async with http.options(relay_server.whep()) as resp:
        assert resp.status == 204 and "POST" in resp.headers["Allow"]


async def test_trickled_candidates_are_accepted(relay_server, http):
    viewer = WhepViewer(relay_server.whep(), http)
    try:
        await viewer.connect()
        frag = "a=mid:0\r\na=end-of-candidates\r\n"
        async with http.patch(
            viewer.location, data=frag, headers={"Content-Type": "application/trickle-ice-sdpfrag"}
        ) as resp:
            assert resp.status == 204
        for bad, reason in (
            ("a=candidate:garbage", "bad candidate: candidate 'garbage' is not 'foundation component transport"),
            (
                "a=candidate:1 1 udp 2113937151 127.0.0.1 70000 typ host",  # aiortc took it, then sendto failed
                "bad candidate: candidate port 70000 is outside 0..65535",
            ),
        ):
            async with http.patch(
                viewer.location, data=bad + "\r\n", headers={"Content-Type": "application/trickle-ice-sdpfrag"}
            ) as resp:
                assert resp.status == 400 and (await resp.text()).startswith(reason)
        async with http.patch(viewer.location, data=frag, headers={"Content-Type": "application/sdp"}) as resp:
            assert resp.status == 415
        await viewer.read_frames(3)
    finally:
        await viewer.close()


async def test_a_sessions_candidates_are_capped_and_no_hidden_or_indented_line_passes_the_checks(relay_server, http):
    """Each candidate aioice is given costs more than the last (it re-sorts every check), in the loop that feeds
    every viewer: a session takes at most MAX_CANDIDATES, offered and trickled together. A line the checks would
    read one way and aiortc another (split at a vertical tab; indented) is refused, not applied unchecked."""
    offers = []

    def keep(kind: str, sdp: str) -> str:
        offers.append(sdp) if kind == "offer" else None
        return sdp

    viewer = WhepViewer(relay_server.whep(), http, rewrite_sdp=keep)
    frag = {"Content-Type": "application/trickle-ice-sdpfrag"}
    try:
        await viewer.connect()
        for bad, reason in (
            (" a=candidate:1 1 udp 2113937151 127.0.0.1 70000 typ host", "bad candidate: candidate port 70000"),
            (
                "a=candidate:1 1 udp 1 10.0.0.1 9 typ host\x0ba=candidate:2 1 udp 1 10.0.0.2 99999 typ host",
                "malformed fragment: fragment line 1 holds the control character U+000B",
            ),
        ):
            async with http.patch(viewer.location, data=bad.encode() + b"\r\n", headers=frag) as resp:
                assert (resp.status, (await resp.text())[: len(reason)]) == (400, reason)
        offered = offers[0].count("a=candidate:")
        taken = 0
        for n in range(MAX_CANDIDATES + 5):
            line = f"a=candidate:{n} 1 udp 1 10.1.{n // 200}.{n % 200 + 1} 9 typ host\r\n"
            async with http.patch(viewer.location, data=line, headers=frag) as resp:
                if resp.status != 204:
                    assert resp.status == 400 and (await resp.text()).startswith("too many candidates: ")
                    break
                taken += 1
        assert offered + taken == MAX_CANDIDATES
        async with http.patch(viewer.location, data="a=end-of-candidates\r\n", headers=frag) as resp:
            assert resp.status == 204  # no candidate: still taken
        await viewer.read_frames(3)
    finally:
        await viewer.close()


async def test_an_offer_line_split_where_aiortc_splits_it_is_refused(relay_server, http):
    """aiortc's parser splits lines with str.splitlines(): at a vertical tab, a form feed, a lone CR, U+2028...
    An offer line holding one was checked as one line here, and aiortc applied its second half unchecked."""
    for hidden in ("\x0b", "\x0c", "\r", "\x1c", "\x85", "\u2028"):

        def rewrite(kind: str, sdp: str, hidden: str = hidden) -> str:
            if kind != "offer":
                return sdp
            return re.sub(r"a=extmap:\d+ ", f"a=x-note:1{hidden}a=extmap:300 ", sdp, count=1)

        viewer = WhepViewer(relay_server.whep(), http, rewrite_sdp=rewrite)
        try:
            with pytest.raises(WhepError) as info:
                await viewer.connect()
            assert info.value.status == 400
            assert re.fullmatch(
                rf"malformed offer: offer line \d+ holds the control character U\+{ord(hidden):04X}", info.value.reason
            )
        finally:
            await viewer.close()
    assert relay_server.relay.sessions.count() == 0


async def test_api_and_health(relay_server, http):
    cam = (await streams(http, relay_server))["cam0"]
    assert cam["source"] == "test:" and cam["codec"] == "H264"
    assert (cam["width"], cam["height"], cam["fps"]) == (640, 360, 30)
    assert cam["state"] == "live" and cam["encoders_running"] == 1
    async with http.get(relay_server.base + "/healthz") as resp:
        assert resp.status == 200 and (await resp.json())["ok"] is True
    async with http.get(relay_server.base + "/") as resp:
        assert resp.status == 200 and 'data-whep="/whep/cam0"' in await resp.text()
        assert resp.headers["Content-Security-Policy"] == PAGE_POLICY and "script-src 'self';" in PAGE_POLICY
        assert "<script>" not in await resp.text()  # no inline script the policy would block
    async with http.get(relay_server.base + "/view/cam0") as resp:
        assert resp.status == 200
    async with http.get(relay_server.base + "/view/nope") as resp:
        assert resp.status == 404
    async with http.get(relay_server.base + "/static/whep.js") as resp:
        assert resp.status == 200 and "readPixelClock" in await resp.text()
        assert resp.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.relay_config(cors_origins=("https://dash.example.org",))
async def test_cors_preflight_and_headers_only_for_configured_origins(relay_server, http):
    allowed = {"Origin": "https://dash.example.org", "Access-Control-Request-Method": "POST"}
    async with http.options(relay_server.whep(), headers=allowed) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == "https://dash.example.org"
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        assert "Content-Type" in resp.headers["Access-Control-Allow-Headers"]
    other = {"Origin": "https://evil.example.com", "Access-Control-Request-Method": "POST"}
    async with http.options(relay_server.whep(), headers=other) as resp:
        assert "Access-Control-Allow-Origin" not in resp.headers
    code, _, headers = await post(http, relay_server.base + "/whep/nope", CHROMIUM_OFFER)
    assert code == 404 and "Access-Control-Allow-Origin" not in headers
    async with http.post(
        relay_server.base + "/whep/nope", data="x", headers={"Content-Type": "application/sdp", **allowed}
    ) as resp:
        assert resp.status == 404
        assert resp.headers["Access-Control-Allow-Origin"] == "https://dash.example.org"


@pytest.mark.parametrize(
    ("remote", "local"),
    [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("::ffff:127.0.0.1", True), ("10.0.0.5", False),
     ("::ffff:10.0.0.5", False), ("fe80::1", False), (None, False)],
)  # fmt: skip
def test_a_viewer_on_this_machine_is_known_as_such_through_a_dual_stack_socket_too(remote, local):
    """Its loopback candidates are kept only then: an IPv4 client of a relay listening on "::" is ::ffff:127.0.0.1."""
    from types import SimpleNamespace

    from signalling.whep import _from_loopback

    assert _from_loopback(SimpleNamespace(remote=remote)) is local
