"""The viewer pages in a real browser: Debian's headless Chromium, driven by Playwright, against a real relay.

Playwright never downloads a browser here: it launches ``/usr/bin/chromium`` (``scripts/setup`` installs it), and
the tests fail, never skip, when it is missing. Why each Chromium flag is there: ``benchmarks/chromium.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from aiohttp import web
from playwright.async_api import Page
from playwright.async_api import TimeoutError as PlaywrightTimeout
from yarl import URL

from benchmarks.chromium import PRESENTED, PRESENTED_FRAME, as_script, chromium, presented_clocks, wait_presented
from benchmarks.ports import free_port
from relay.auth import hash_password
from relay.config import AuthConfig, IceServer, StreamConfig
from relay.source import SourceSpec
from relay.webrtc.playout import URI as PLAYOUT_DELAY_URI

from .conftest import TEST_HEIGHT, TEST_WIDTH, EncodedFrames, RunningRelay, make_config, start_relay
from .stun import stun_server

pytestmark = pytest.mark.browser

PLAY_TIMEOUT_MS = 30_000
GONE_TIMEOUT = 60.0  # seconds to wait for the relay to drop a closed page's viewer (its silence rule takes ~12)
CLOSED = re.compile(r"session=\S+ closed \((.*)\) viewers=")  # the relay's line for an ended session, and why
MS_TEXT = re.compile(r"^(\d+) ms$")
# Where to save screenshots for a human to look at; unset: none are written.
SCREENSHOT_DIR = os.environ.get("CAMRELAY_SCREENSHOT_DIR")

PLAYING = """() => {
  const p = window.camrelayPlayer;
  return p && p.state === "live" && p.stats.framesDecoded > 30 && Number.isFinite(p.latencyMs);
}"""

# Every candidate pair Chromium tried, as [local address, local type, remote address, state, nominated].
CANDIDATE_PAIRS = """async () => {
  const report = await window.camrelayPlayer.pc.getStats();
  const candidates = {};
  report.forEach((r) => { if (r.type.endsWith("candidate")) candidates[r.id] = r; });
  const pairs = [];
  report.forEach((r) => {
    if (r.type !== "candidate-pair") return;
    const local = candidates[r.localCandidateId] || {};
    const remote = candidates[r.remoteCandidateId] || {};
    pairs.push([local.address, local.candidateType, remote.address, r.state, !!r.nominated]);
  });
  return pairs;
}"""


class PageWatch:
    """A page's uncaught errors and the WHEP offers it sent, for assertions."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        self.offers: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("request", self._on_request)

    def _on_request(self, request) -> None:
        if request.method == "POST" and "/whep/" in request.url:
            self.offers.append(request.post_data or "")

    def check_offers_stay_on_loopback(self) -> None:
        assert self.offers, "the page sent no WHEP offer"
        for offer in self.offers:
            for line in offer.splitlines():
                if line.startswith("a=candidate:"):
                    address = line.split()[4]
                    assert address in ("127.0.0.1", "::1"), f"the browser offered a non-loopback candidate: {line}"


async def stream_info(http, relay: RunningRelay, name: str = "cam0") -> dict:
    async with http.get(relay.base + "/api/v1/streams") as resp:
        assert resp.status == 200
        return {s["name"]: s for s in (await resp.json())["streams"]}[name]


async def wait_viewers_gone(http, relay: RunningRelay, caplog) -> None:
    """Until the relay reports no viewer of cam0. The page said goodbye (its DELETE, or its peer connection's
    close), so that is why the relay ended each session: not its silence rule, which frees vanished viewers."""
    deadline = time.monotonic() + GONE_TIMEOUT
    while (info := await stream_info(http, relay))["viewers"]:
        assert time.monotonic() < deadline, f"relay still has {info['viewers']} viewer(s) after the page closed"
        await asyncio.sleep(0.05)
    why = [m[1] for r in caplog.records if (m := CLOSED.search(r.getMessage()))]
    assert why and set(why) <= {"DELETE", "connection closed"}, why


async def screenshot(page: Page, name: str) -> None:
    if SCREENSHOT_DIR:
        await page.screenshot(path=str(Path(SCREENSHOT_DIR) / name))


async def one_viewer_then_closed(page: Page, watch: PageWatch, http, relay: RunningRelay, caplog, shot: str) -> None:
    """The page is cam0's one viewer, connected, on its one encoder, with no uncaught error; then closing the tab
    (it fires pagehide: the page's DELETE) ends its session at once."""
    info = await stream_info(http, relay)
    assert info["viewers"] == 1 and info["viewers_connected"] == 1, info
    assert info["encoders_running"] == 1, info
    await screenshot(page, shot)
    assert not watch.errors, f"uncaught errors in the page: {watch.errors}"
    await page.close()
    await wait_viewers_gone(http, relay, caplog)


# Whether the element with this id is drawn: laid out with a size, not display:none.
SHOWN = (
    "(id) => { const e = document.getElementById(id); const r = e.getBoundingClientRect();"
    " return getComputedStyle(e).display !== 'none' && r.width > 0 && r.height > 0; }"
)


async def test_view_page_plays_and_shows_latency(relay_server, http, caplog):
    caplog.set_level(logging.INFO, logger="relay")
    async with chromium() as browser:
        page = await browser.new_page()
        watch = PageWatch(page)
        with EncodedFrames(relay_server.relay.streams["cam0"]) as encoded:
            await page.goto(f"{relay_server.base}/view/cam0")
            await page.evaluate(PRESENTED)
            await page.wait_for_function(PLAYING, timeout=PLAY_TIMEOUT_MS)
            await wait_presented(page, CLOCK_READINGS, PLAY_TIMEOUT_MS)
            clock = await presented_clocks(page)
            # The picture is the relay's: each frame shown carries the capture time of a frame it encoded.
            assert set(clock) <= set(encoded.clocks), clock

        player = await page.evaluate(
            """() => ({
              latencyMs: window.camrelayPlayer.latencyMs,
              connects: window.camrelayPlayer.connects,
              width: document.getElementById("video").videoWidth,
              height: document.getElementById("video").videoHeight,
            })"""
        )
        assert (player["width"], player["height"]) == (TEST_WIDTH, TEST_HEIGHT)
        assert player["connects"] == 1, "the player reconnected while the relay was healthy"
        # The player turned the pixel clock into a latency (how long is for benchmarks/browser_latency.py to say),
        # and the overlay shows it as "<n> ms".
        assert math.isfinite(player["latencyMs"]), player
        text = (await page.text_content("#latency")).strip()
        assert MS_TEXT.match(text), f"#latency shows {text!r}, not a number of ms"
        assert (await page.text_content("#state")).strip() == "live"
        assert re.fullmatch(r"\d+", (await page.text_content("#fps")).strip())
        # Nothing shows that the page hid: the MJPEG fallback is not drawn under the live video.
        assert await page.evaluate(SHOWN, "mjpeg") is False and await page.evaluate(SHOWN, "video") is True

        # Chromium's media took a loopback path, and it offered no other address to the relay.
        pairs = await page.evaluate(CANDIDATE_PAIRS)
        selected = [p for p in pairs if p[3] == "succeeded" and p[4]]
        assert selected and all(p[0] == "127.0.0.1" and p[2] == "127.0.0.1" for p in selected), pairs
        watch.check_offers_stay_on_loopback()

        await one_viewer_then_closed(page, watch, http, relay_server, caplog, "view.png")
    assert (await stream_info(http, relay_server))["encoders_running"] == 1


# The capture time of every reading the page's latency readout makes from now on, in window.__pageClocks.
# And every value the page hands its readout (onLatency), in window.__shown.
PAGE_CLOCKS = """() => {
  const p = window.camrelayPlayer, show = p.handlers.onLatency;
  window.__pageClocks = [];
  window.__shown = [];
  p.handlers.onLatencySample = (ms, t) => window.__pageClocks.push(t);
  p.handlers.onLatency = (ms) => { window.__shown.push(ms); show(ms); };
}"""


@pytest.mark.parametrize("videoframe", [True, False], ids=["videoframe", "no-videoframe"])
async def test_the_page_reads_each_frames_clock_from_its_decoded_picture(relay_server, videoframe) -> None:
    """The readout reads the band's luma from the decoded frame (WebCodecs' VideoFrame), not by drawing the
    whole picture into a canvas; where there is no VideoFrame, through the canvas as before. Either way every
    frame presented is read, and each reading is the capture time of a frame the relay encoded."""
    async with chromium() as browser:
        page = await browser.new_page()
        try:
            if not videoframe:
                await page.add_init_script("delete window.VideoFrame;")
            with EncodedFrames(relay_server.relay.streams["cam0"]) as encoded:
                await page.goto(f"{relay_server.base}/view/cam0")
                await page.wait_for_function(PLAYING, timeout=PLAY_TIMEOUT_MS)
                await page.evaluate(PAGE_CLOCKS)
                await page.evaluate(PRESENTED)  # the benchmark's reading of each frame presented, by the canvas
                await wait_presented(page, CLOCK_READINGS, PLAY_TIMEOUT_MS)
                await page.wait_for_function(f"() => window.__pageClocks.length >= {CLOCK_READINGS}")
                page_clocks = await page.evaluate("() => window.__pageClocks")
                presented = await presented_clocks(page)
                reader = await page.evaluate("() => window.camrelayPlayer.clockReader")
                told, median, text = await page.evaluate(
                    "() => [window.__shown, window.camrelayPlayer.latencyMs,"
                    " document.getElementById('latency').textContent.trim()]"
                )
                carried = set(encoded.clocks)
            assert reader == ("frame" if videoframe else "canvas")
            assert set(page_clocks) <= carried, "the page read a time no frame carried"
            # The same frames, read both ways: the page's readings and the canvas's agree frame for frame.
            both = set(page_clocks) & set(presented)
            assert len(both) >= CLOCK_READINGS // 2, (page_clocks, presented)
            # The readout is told of a new median only: the same text is not written again every frame.
            assert all(a != b for a, b in zip(told, told[1:], strict=False)), told
            assert text == f"{median} ms" and (not told or told[-1] == median)
        finally:
            await page.close()


async def test_the_benchmark_reads_each_presented_frames_clock_from_its_decoded_picture(relay_server) -> None:
    """``benchmarks.browser_latency --clock-reader frame``: every frame presented noted, its clock read from the
    decoded frame, each the capture time of a frame the relay encoded, and one after another."""
    async with chromium() as browser:
        page = await browser.new_page()
        try:
            with EncodedFrames(relay_server.relay.streams["cam0"]) as encoded:
                await page.goto(f"{relay_server.base}/view/cam0")
                await page.wait_for_function(PLAYING, timeout=PLAY_TIMEOUT_MS)
                await page.evaluate(PRESENTED_FRAME)
                await wait_presented(page, CLOCK_READINGS, PLAY_TIMEOUT_MS)
                clocks = await presented_clocks(page)
                carried = set(encoded.clocks)
            assert set(clocks) <= carried and clocks == sorted(clocks), clocks
        finally:
            await page.close()


# The page's receivers as [kind, jitterBufferTarget], and what lowLatency does to an audio receiver of a peer
# connection of its own (the page has none yet: one may come).
RECEIVERS = """() => {
  const pc = new RTCPeerConnection();
  const audio = pc.addTransceiver("audio", { direction: "recvonly" }).receiver;
  const touched = window.lowLatency(audio);
  const left = audio.jitterBufferTarget;
  pc.close();
  return {
    receivers: window.camrelayPlayer.pc.getReceivers().map((r) => [r.track.kind, r.jitterBufferTarget]),
    audio: [touched, left],
    answer: window.camrelayPlayer.pc.remoteDescription.sdp,
  };
}"""


async def test_the_page_asks_chromium_to_hold_video_frames_as_little_as_it_can(relay_server: RunningRelay) -> None:
    async with chromium() as browser:
        page = await browser.new_page()
        try:
            await page.goto(f"{relay_server.base}/view/cam0")
            await page.wait_for_function(PLAYING, timeout=PLAY_TIMEOUT_MS)
            found = await page.evaluate(RECEIVERS)
            # The video's jitter buffer target: 0 ms; the sound's (the test pattern has some) left as it was.
            assert found["receivers"] == [["video", 0], ["audio", None]], found["receivers"]
            assert found["audio"] == [False, None], "an audio receiver's jitter buffer was touched"
            # And the relay answered Chromium's offer of the playout-delay extension (on by default).
            assert PLAYOUT_DELAY_URI in found["answer"]
        finally:
            await page.close()


INJECTED_HANDLER_BLOCKED = """() => new Promise((done) => {
  const holder = document.createElement("div");
  holder.innerHTML = '<img src="data:," onerror="window.injected = 1">';
  holder.firstChild.addEventListener("error", () => done(window.injected === undefined));
  document.body.append(holder);
})"""


async def test_index_tile_goes_live(relay_server, http, caplog):
    caplog.set_level(logging.INFO, logger="relay")
    async with chromium() as browser:
        page = await browser.new_page()
        watch = PageWatch(page)
        await page.goto(f"{relay_server.base}/")
        tile = page.locator("figure.tile[data-stream=cam0]")
        assert await tile.count() == 1
        assert await tile.locator("figcaption a").text_content() == "cam0"
        assert await tile.locator("a").first.get_attribute("href") == "/view/cam0"

        await page.wait_for_function(
            """() => {
              const tile = document.querySelector("figure.tile[data-stream=cam0]");
              const video = tile.querySelector("video");
              return tile.querySelector("[data-role=state]").textContent === "live"
                && /^\\d+ ms$/.test(tile.querySelector("[data-role=latency]").textContent)
                && video.getVideoPlaybackQuality().totalVideoFrames > 30;
            }""",
            timeout=PLAY_TIMEOUT_MS,
        )
        size = await tile.locator("video").evaluate("(v) => [v.videoWidth, v.videoHeight]")
        assert size == [TEST_WIDTH, TEST_HEIGHT]
        watch.check_offers_stay_on_loopback()
        # The page runs the relay's scripts only (its Content-Security-Policy): markup that reached it cannot run.
        # The inline handler would run before the listener added after it, on the same error.
        assert await page.evaluate(INJECTED_HANDLER_BLOCKED) is True

        await one_viewer_then_closed(page, watch, http, relay_server, caplog, "index.png")


async def test_status_panel_shows_cpu_and_viewers(relay_server: RunningRelay) -> None:
    async with chromium() as browser:
        page = await browser.new_page()
        try:
            await page.goto(relay_server.base + "/view/cam0")
            await page.wait_for_function(PLAYING, timeout=PLAY_TIMEOUT_MS)
            await page.wait_for_function(
                "() => /^\\d+ %$/.test(document.querySelector('[data-role=cpu]').textContent)", timeout=PLAY_TIMEOUT_MS
            )
            # The panel polls every 5 s; wait for one poll after the viewer connected.
            await page.wait_for_function(
                "() => document.querySelector('[data-role=viewers]').textContent === '1'", timeout=PLAY_TIMEOUT_MS
            )
            assert await page.locator("[data-role=temp]").text_content() == "—"  # this VM has no thermal zone
            assert await page.locator("[data-role=throttled]").is_hidden()
        finally:
            await page.close()


async def test_page_falls_back_to_mjpeg_when_webrtc_cannot_connect(relay_server: RunningRelay) -> None:
    async with chromium() as browser:
        page = await browser.new_page()
        try:
            await page.route("**/whep/**", lambda route: route.abort())  # as if WebRTC signalling were blocked
            await page.goto(relay_server.base + "/view/cam0")
            await page.wait_for_function(
                "() => { const i = document.getElementById('mjpeg'); return !i.hidden && i.naturalWidth > 0; }",
                timeout=PLAY_TIMEOUT_MS,
            )
            assert await page.evaluate("() => document.getElementById('mjpeg').naturalWidth") == TEST_WIDTH
            assert await page.evaluate(SHOWN, "video") is False and await page.evaluate(SHOWN, "mjpeg") is True
            assert relay_server.relay.streams["cam0"].jpegs.users == 1  # the page's MJPEG connection
            # The latency readout goes on from the MJPEG pictures' pixel clocks: the video has had no frame at all.
            await page.wait_for_function(
                f"() => window.camrelayPlayer.latencyReadings >= {CLOCK_READINGS}", timeout=PLAY_TIMEOUT_MS
            )
            assert await page.evaluate("() => document.getElementById('video').videoWidth") == 0
            text = (await page.text_content("#latency")).strip()
            assert MS_TEXT.match(text), f"#latency shows {text!r} in MJPEG fallback, not a number of ms"
            await page.unroute("**/whep/**")
            await page.wait_for_function(PLAYING, timeout=PLAY_TIMEOUT_MS)  # WebRTC got through: back to video
            await page.wait_for_function("() => document.getElementById('mjpeg').hidden", timeout=PLAY_TIMEOUT_MS)
            snapshot = await page.evaluate(
                "async () => { const r = await fetch(document.getElementById('snapshot').href);"
                " return [r.status, r.headers.get('content-type')]; }"
            )
            assert snapshot == [200, "image/jpeg"]
        finally:
            await page.close()


VIEWER_TOKEN = "browser-test-token-0123456789abcdef"


@pytest.mark.relay_config(auth=AuthConfig(mode="token", token=VIEWER_TOKEN))
async def test_the_url_with_the_token_plays_and_its_cookie_lets_the_page_in_later(relay_server: RunningRelay) -> None:
    async with chromium() as browser:
        page = await browser.new_page()
        watch = PageWatch(page)
        try:
            response = await page.goto(relay_server.base + "/")  # no token yet: the 401 page says where it is
            assert response.status == 401 and "viewer-token" in await page.content()
            await page.goto(f"{relay_server.base}/view/cam0?token={VIEWER_TOKEN}")  # the URL printed at start
            await page.wait_for_function(PLAYING, timeout=PLAY_TIMEOUT_MS)
            assert page.url == relay_server.base + "/view/cam0"  # the token is off the address bar
            # The page's own requests (fetch, the WHEP POST) went by the cookie ?token= set.
            assert await page.evaluate("async () => (await fetch('/api/v1/status')).status") == 200
            assert await page.evaluate("() => document.cookie") == ""  # HttpOnly: no script can read it
            response = await page.goto(relay_server.base + "/")
            assert response.status == 200
            assert not watch.errors, f"uncaught errors in the page: {watch.errors}"
        finally:
            await page.close()


# Every RTCPeerConnection the page makes, with the configuration it was given, in window.configs.
RECORD_CONFIGS = """
window.configs = [];
window.RTCPeerConnection = class extends RTCPeerConnection {
  constructor(config) { super(config); window.configs.push(config); }
};
"""
VIEWER_USER, VIEWER_PASSWORD = "viewer", "correct-horse-battery"


async def test_in_password_mode_the_pages_first_peer_connection_has_the_ice_servers() -> None:
    async with stun_server() as (stun, stun_url):
        config = make_config(
            auth=AuthConfig(mode="password", user=VIEWER_USER, password_hash=hash_password(VIEWER_PASSWORD))
        )
        config = dataclasses.replace(
            config, webrtc=dataclasses.replace(config.webrtc, ice_servers=(IceServer((stun_url,)),))
        )
        runner, relay = await start_relay(config)
        try:
            async with chromium() as browser:
                # Playwright answers each 401 challenge with the password, as Chromium does with the one typed at
                # its prompt; neither sends it unasked to a path that has not challenged (/whep/ is not below /view/).
                context = await browser.new_context(
                    http_credentials={"username": VIEWER_USER, "password": VIEWER_PASSWORD}
                )
                page = await context.new_page()
                await page.add_init_script(RECORD_CONFIGS)
                watch = PageWatch(page)
                await page.goto(f"{relay.base}/view/cam0")
                await page.wait_for_function(PLAYING, timeout=PLAY_TIMEOUT_MS)
                configs = await page.evaluate("() => window.configs.map((c) => c.iceServers)")
                assert configs == [[{"urls": stun_url}]], configs  # the first peer connection, and the only one
                assert len(stun.clients) >= 2, "Chromium and the relay did not both ask the STUN server"
                assert not watch.errors, f"uncaught errors in the page: {watch.errors}"
        finally:
            await runner.cleanup()


ROOT = Path(__file__).resolve().parent.parent
READER_JS = Path("internal/servers/webrtc/reader.js")  # mediamtx's WHEP player, in its module source


def mediamtx_reader_js() -> Path:
    """mediamtx's own ``reader.js``, of the version ``scripts/install-mediamtx`` pins.

    From the Go module cache (where a build from source downloads the module),
    else the copy install-mediamtx keeps beside the binary it built. Missing: a
    failure, never a skip.
    """
    version = re.search(r'MEDIAMTX_VERSION="([^"]+)"', (ROOT / "scripts" / "install-mediamtx").read_text())
    assert version, "scripts/install-mediamtx pins no MEDIAMTX_VERSION"
    places = []
    go = shutil.which("go") or "/usr/local/go/bin/go"  # where install-mediamtx looks for Go too
    if os.access(go, os.X_OK):
        env = {**os.environ, "GOTOOLCHAIN": "local"}
        modcache = subprocess.run([go, "env", "GOMODCACHE"], capture_output=True, text=True, env=env, check=True)
        places.append(Path(modcache.stdout.strip()) / f"github.com/bluenviron/mediamtx@{version[1]}" / READER_JS)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "camrelay"
    places += sorted(cache.glob(f"mediamtx-{version[1]}-*/reader.js"))
    for place in places:
        if place.is_file():
            return place
    raise AssertionError(f"mediamtx {version[1]}'s reader.js is in none of {places}; run scripts/install-mediamtx")


# The other origin's page: mediamtx's reader.js, used as mediamtx's own read page uses it (the track's
# stream in a <video>), with a token; the pixel clock read from each frame it presents (benchmarks/chromium.py
# PRESENTED, with readPixelClock of the relay's whep.js). Every RTCPeerConnection the player makes is noted,
# with its configuration.
READER_PAGE = """<!doctype html>
<meta charset="utf-8">
<video id="video" muted autoplay playsinline></video>
<script>
window.configs = [];
window.RTCPeerConnection = class extends RTCPeerConnection {
  constructor(config) { super(config); window.configs.push(config); window.pc = this; }
};
</script>
<script src="/reader.js"></script>
<script src="RELAY/static/whep.js"></script>
<script>
window.errors = [];
CLOCK
window.reader = new MediaMTXWebRTCReader({
  url: "RELAY/whep/cam0",
  token: "TOKEN",
  onError: (err) => window.errors.push(err),
  onTrack: (evt) => { video.srcObject = evt.streams[0]; },
});
</script>
"""
CLOCK_READINGS = 30


async def test_mediamtx_reader_js_from_another_origin_plays_with_its_token_on_post_only(http):
    reader_js = mediamtx_reader_js().read_text()
    page_port = free_port()
    page_origin = f"http://127.0.0.1:{page_port}"
    async with stun_server() as (stun, stun_url):
        config = make_config(auth=AuthConfig(mode="token", token=VIEWER_TOKEN), cors_origins=(page_origin,))
        config = dataclasses.replace(
            config, webrtc=dataclasses.replace(config.webrtc, ice_servers=(IceServer((stun_url,)),))
        )
        runner, relay = await start_relay(config)
        encoded = EncodedFrames(relay.relay.streams["cam0"])
        html = (
            READER_PAGE.replace("CLOCK", as_script(PRESENTED))
            .replace("RELAY", relay.base)
            .replace("TOKEN", VIEWER_TOKEN)
        )

        async def page_html(_: web.Request) -> web.Response:
            return web.Response(text=html, content_type="text/html")

        async def page_js(_: web.Request) -> web.Response:
            return web.Response(text=reader_js, content_type="text/javascript")

        site = web.Application()
        site.router.add_get("/", page_html)
        site.router.add_get("/reader.js", page_js)
        site_runner = web.AppRunner(site)
        try:
            await site_runner.setup()
            await web.TCPSite(site_runner, "127.0.0.1", page_port).start()
            async with chromium() as browser:
                page = await browser.new_page()
                watch = PageWatch(page)
                answers: list[tuple[str, int, str | None]] = []  # (method, status, Location) of each WHEP request
                page.on(
                    "response",
                    lambda r: (
                        answers.append((r.request.method, r.status, r.headers.get("location")))
                        if "/whep/" in r.url
                        else None
                    ),
                )
                await page.goto(page_origin + "/")
                try:
                    await wait_presented(page, CLOCK_READINGS, PLAY_TIMEOUT_MS)
                except PlaywrightTimeout:
                    pytest.fail(f"reader.js played nothing; it said: {await page.evaluate('() => window.errors')}")

                clock = await presented_clocks(page)
                assert set(clock) <= set(encoded.clocks), clock  # each frame it showed, one the relay encoded
                assert await page.evaluate("() => window.errors") == []  # never "retrying in some seconds"
                # Its ICE servers came from the Link header of its OPTIONS (sent with the token).
                configs = await page.evaluate("() => window.configs.map((c) => c.iceServers)")
                assert configs[-1] == [{"urls": [stun_url]}], configs
                # One offer, answered 201; the trickled candidates went by PATCH, without the token, all 204.
                [(_, created, location)] = [a for a in answers if a[0] == "POST"]
                assert created == 201, answers
                patches = [status for method, status, _ in answers if method == "PATCH"]
                assert patches and set(patches) == {204}, answers
                assert len(stun.clients) >= 2, "Chromium and the relay did not both ask the STUN server"
                sessions = relay.relay.sessions
                assert sessions.count("cam0") == sessions.connected("cam0") == 1
                assert not watch.errors, f"uncaught errors in the page: {watch.errors}"

                # The session URL alone ends the session, from the other origin and without the token.
                status = await page.evaluate(
                    "async (url) => { const r = await fetch(url, { method: 'DELETE' }); window.reader.close();"
                    " return r.status; }",
                    str(URL(relay.whep()).join(URL(location))),
                )
                assert status == 200 and sessions.count() == 0
                await page.close()
        finally:
            await site_runner.cleanup()
            encoded.close()
            await runner.cleanup()


# What players that add audio first send: the offer's BUNDLE tag is the audio section, which the answer rejects
# for a stream without sound.
AUDIO_FIRST = """async (url) => {
  const pc = new RTCPeerConnection({ iceServers: [] });
  pc.addTransceiver("audio", { direction: "recvonly" });
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.createDataChannel("");
  pc.ontrack = (evt) => { document.getElementById("video").srcObject = new MediaStream([evt.track]); };
  await pc.setLocalDescription(await pc.createOffer());
  const offer = pc.localDescription.sdp;
  const resp = await fetch(url, { method: "POST", headers: { "Content-Type": "application/sdp" }, body: offer });
  const answer = await resp.text();
  if (resp.status === 201) await pc.setRemoteDescription({ type: "answer", sdp: answer });
  window.pc = pc;
  return [resp.status, offer, answer];
}"""


@pytest.mark.relay_config(streams=(StreamConfig("cam0", SourceSpec("test", "", audio="off")),))
async def test_chromium_takes_the_answer_that_rejects_the_bundle_tag_of_its_offer(relay_server):
    async with chromium() as browser:
        page = await browser.new_page()
        watch = PageWatch(page)
        encoded = EncodedFrames(relay_server.relay.streams["cam0"])
        try:
            await page.goto(relay_server.base + "/healthz")  # the relay's origin, for the page's fetch
            await page.evaluate("() => { document.body.innerHTML = '<video id=video muted autoplay></video>'; }")
            await page.add_script_tag(url=relay_server.base + "/static/whep.js")
            await page.evaluate(PRESENTED)
            status, offer, answer = await page.evaluate(AUDIO_FIRST, relay_server.whep())
            assert status == 201, answer
            assert "a=group:BUNDLE 0 1 2" in offer and offer.index("m=audio") < offer.index("m=video")
            assert "a=group:BUNDLE 1\r\n" in answer and "m=audio 0 " in answer and "m=application 0 " in answer
            await wait_presented(page, CLOCK_READINGS, PLAY_TIMEOUT_MS)
            assert set(await presented_clocks(page)) <= set(encoded.clocks)  # the relay's frames
            assert await page.evaluate("() => window.pc.connectionState") == "connected"
            assert not watch.errors, f"uncaught errors in the page: {watch.errors}"
        finally:
            encoded.close()
            await page.close()


# -- sound: the view page starts muted, unmutes on a click, and reads the test sound's bursts

SOUND_AND_QUIET = (
    StreamConfig("cam0", SourceSpec("test", "")),  # the test pattern with its sound
    StreamConfig("cam1", SourceSpec("test", "", audio="off")),
)
# Sound heard, as a user sees it once Unmute is clicked: the page has heard new bursts of the test sound (at least
# `since` + 2 readings) and shows their audio latency and the lip sync, and Chromium plays it (getStats of the inbound
# Opus, polled by the player each second for this connection: energy played). The parts of the latency the page
# reports are checked after it (AUDIO_PARTS), each with its own message.
HEARD = """(since) => {
  const p = window.camrelayPlayer;
  return p.audioReadings >= since + 2 && p.stats.audioEnergy > 0 && Number.isFinite(p.lipSyncMs)
    && /^-?\\d+ ms$/.test(document.getElementById("audio-latency").textContent)
    && /^-?\\d+ ms$/.test(document.getElementById("lip-sync").textContent);
}"""
AUDIO_READINGS = "() => window.camrelayPlayer.audioReadings"
# What Chromium's audio jitter buffer held and aimed for over the last poll, its output path's delay, the page's
# AudioContext output latency, and the level of the sound played: the player's stats once sound is heard.
AUDIO_PARTS = """() => {
  const p = window.camrelayPlayer;
  return { buffer: p.stats.audioJitterBufferMs, target: p.stats.audioJitterTargetMs, playout: p.stats.audioPlayoutMs,
           output: p.audioOutputMs, energy: p.stats.audioEnergy };
}"""


async def wait_heard(page: Page) -> None:
    """New bursts heard and shown; then the parts of the sound's latency the page reports, each checked alone."""
    since = await page.evaluate(AUDIO_READINGS)
    try:
        await page.wait_for_function(HEARD, arg=since, timeout=PLAY_TIMEOUT_MS)
    except PlaywrightTimeout:
        state = await page.evaluate(
            """() => { const p = window.camrelayPlayer; return { readings: p.audioReadings, stats: p.stats,
              lipSync: p.lipSyncMs, shown: document.getElementById("lip-sync").textContent }; }"""
        )
        raise AssertionError(f"no sound heard within {PLAY_TIMEOUT_MS} ms after {since} readings: {state}") from None
    # Polled each second: the first poll after the sound came may still be on its way.
    await page.wait_for_function(
        "() => window.camrelayPlayer.stats.audioJitterBufferMs !== null", timeout=PLAY_TIMEOUT_MS
    )
    parts = await page.evaluate(AUDIO_PARTS)
    assert parts["buffer"] > 0 and parts["target"] > 0, f"Chromium's audio jitter buffer held nothing: {parts}"
    assert parts["output"] is not None and parts["output"] >= 0, f"no AudioContext output latency: {parts}"
    assert parts["playout"] is None or parts["playout"] >= 0, f"a negative output path delay: {parts}"
    assert parts["energy"] > 0, f"Chromium played no sound energy: {parts}"


ANSWER = "() => window.camrelayPlayer.pc.remoteDescription.sdp"
# The msid stream ids of the remote description's audio and of its video sections, as Chromium applied it.
STREAM_IDS = """() => {
  const sections = window.camrelayPlayer.pc.remoteDescription.sdp.split(/\\r\\n(?=m=)/);
  const ids = (kind) => sections.filter((s) => s.startsWith("m=" + kind))
    .flatMap((s) => [...s.matchAll(/^a=msid:(\\S+) /gm)].map((m) => m[1]));
  return [ids("audio"), ids("video")];
}"""


# Lip sync's trim as the page computes it (static/whep.js): how far the sound plays behind its picture, from each
# track's estimatedPlayoutTimestamp (none without both), and the floor under the picture's delay moved half of that
# from the delay it has, 50 ms a poll at most, never below 0 nor above 1000 ms.
SYNC_TRIM = """() => [
  window.syncLateMs({ estimatedPlayoutTimestamp: 5000 }, { estimatedPlayoutTimestamp: 5060 }),
  window.syncLateMs({}, { estimatedPlayoutTimestamp: 5060 }),
  window.syncLateMs(null, { estimatedPlayoutTimestamp: 5060 }),
  window.syncTrim(40, 60), window.syncTrim(100, -60), window.syncTrim(10, -60), window.syncTrim(990, 200),
  window.syncTrim(0, 400), window.syncTrim(600, -1000),
]"""
# The player's trims so far, its last floor, and the video receiver's jitterBufferTarget.
TRIMMED = """() => { const p = window.camrelayPlayer;
  const video = p.pc.getReceivers().find((r) => r.track.kind === "video");
  return [p.syncTrims, p.syncTrimMs, video.jitterBufferTarget]; }"""


async def test_the_page_starts_muted_plays_the_sound_after_unmute_and_shows_lip_sync(http):
    runner, relay = await start_relay(make_config(SOUND_AND_QUIET))
    try:
        async with chromium() as browser:
            page = await browser.new_page()
            watch = PageWatch(page)
            await page.goto(f"{relay.base}/view/cam0")
            await page.wait_for_function(PLAYING, timeout=PLAY_TIMEOUT_MS)
            # Muted at first, the controls shown, the stream's audio track in the <video>'s one MediaStream.
            assert await page.evaluate("() => document.getElementById('video').muted") is True
            assert await page.evaluate(SHOWN, "unmute") and await page.evaluate(SHOWN, "volume")
            tracks = await page.evaluate("() => window.camrelayPlayer.stream.getTracks().map((t) => t.kind).sort()")
            assert tracks == ["audio", "video"]
            assert await page.evaluate("() => window.camrelayPlayer.audioLatencyMs") is None  # nothing heard yet

            await page.fill("#volume", "0.5")
            await page.click("#unmute")
            await wait_heard(page)
            # It plays from an <audio> of its own (no lip sync holding the picture back), at the volume set.
            state = await page.evaluate(
                "() => { const o = window.camrelayPlayer.output; return [o.tagName, o.muted, o.volume, o.paused]; }"
            )
            assert state == ["AUDIO", False, 0.5, False]
            assert await page.evaluate("() => document.getElementById('video').srcObject.getAudioTracks().length") == 0
            assert (await page.text_content("#unmute")).strip() == "Mute"
            # The bursts were heard through WebAudio: an onset each second, its latency under a second.
            latency = await page.evaluate("() => window.camrelayPlayer.audioLatencyMs")
            assert 0 <= latency < 1000, latency
            assert MS_TEXT.match((await page.text_content("#audio-latency")).strip())
            # The sound plays as it comes, on a stream of its own (no lip sync holding the picture back), until
            # Lip sync is ticked: then a new connection whose audio and video share the answer's stream id.
            audio_ids, video_ids = await page.evaluate(STREAM_IDS)
            assert audio_ids == ["camrelay-audio"] and len(video_ids) == 1 and video_ids != audio_ids, video_ids
            assert PLAYOUT_DELAY_URI in await page.evaluate(ANSWER), "the picture is not shown as soon as decoded"
            assert await page.evaluate(TRIMMED) == [0, None, 0], "the picture was held without lip sync"
            assert await page.evaluate(SYNC_TRIM) == [60, None, None, 70, 70, 0, 1000, 50, 550]
            await page.check("#sync")
            await page.wait_for_function(
                f"() => window.camrelayPlayer.connects === 2 && ({PLAYING})()", timeout=PLAY_TIMEOUT_MS
            )
            # With lip sync, each stats poll sets the picture's floor from how far the sound plays behind it.
            await page.wait_for_function("() => window.camrelayPlayer.syncTrims >= 3", timeout=PLAY_TIMEOUT_MS)
            trims, floor, target = await page.evaluate(TRIMMED)
            assert floor is not None and target == floor, (trims, floor, target)
            audio_ids, video_ids = await page.evaluate(STREAM_IDS)
            assert audio_ids == video_ids and video_ids != ["camrelay-audio"], (audio_ids, video_ids)
            # Its offer left out the playout-delay extension, so the relay sends none and Chromium may hold the
            # picture back to the sound.
            assert PLAYOUT_DELAY_URI not in watch.offers[-1] and PLAYOUT_DELAY_URI not in await page.evaluate(ANSWER)
            # Now the <video> plays both, as loud as the sound was.
            state = await page.evaluate(
                """() => { const o = window.camrelayPlayer.output;
                  return [o.id, o.muted, o.volume, o.srcObject.getTracks().map((t) => t.kind).sort()]; }"""
            )
            assert state == ["video", False, 0.5, ["audio", "video"]]
            await wait_heard(page)
            watch.check_offers_stay_on_loopback()

            # A stream without sound: no controls, no audio readings, video alone.
            quiet = await browser.new_page()
            await quiet.goto(f"{relay.base}/view/cam1")
            await quiet.wait_for_function(PLAYING, timeout=PLAY_TIMEOUT_MS)
            assert await quiet.locator("#unmute, #volume, #lip-sync").count() == 0
            kinds = await quiet.evaluate("() => window.camrelayPlayer.stream.getTracks().map((t) => t.kind)")
            assert kinds == ["video"]
            assert await quiet.evaluate("() => window.camrelayPlayer.pc.getTransceivers().length") == 1
    finally:
        await runner.cleanup()


async def test_a_recorded_segment_plays_its_picture_and_its_sound_in_chromium(tmp_path, http):
    from .test_record import recording_config, wait_for

    runner, relay = await start_relay(recording_config(tmp_path, snapshot_interval=0.0))
    recorder = relay.relay.recorders["cam0"]
    try:
        await wait_for(lambda: recorder.segments_written >= 2, timeout=40.0, what="2 segments")
        async with http.get(relay.base + "/api/v1/recordings/cam0") as resp:
            listing = await resp.json()
        url = relay.base + listing["segments"][0]["url"]  # newest first: the second, opened once sound had come
        async with chromium() as browser:
            page = await browser.new_page()
            await page.goto(relay.base + "/")  # the relay's origin, so the segment is not a cross-origin resource
            await page.evaluate(
                """(url) => { const v = document.createElement("video"); v.id = "segment"; v.muted = true;
                   v.src = url; document.body.append(v); v.play(); }""",
                url,
            )
            # Chromium decoded both tracks: pictures, and bytes of sound (its own count of decoded audio).
            await page.wait_for_function(
                """() => { const v = document.getElementById("segment");
                  return v.getVideoPlaybackQuality().totalVideoFrames > 10 && v.webkitAudioDecodedByteCount > 0; }""",
                timeout=PLAY_TIMEOUT_MS,
            )
            error = await page.evaluate("() => document.getElementById('segment').error")
            assert error is None
    finally:
        await runner.cleanup()
