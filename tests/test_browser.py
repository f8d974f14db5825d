"""The viewer pages in a real browser: Debian's headless Chromium, driven by Playwright, against a real relay.

Playwright never downloads a browser here: it launches ``/usr/bin/chromium`` (``scripts/setup`` installs it), and
the tests fail, never skip, when it is missing. Why each Chromium flag is there: ``benchmarks/chromium.py``.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import time
from pathlib import Path

import pytest
from playwright.async_api import Page

from benchmarks.chromium import chromium
from relay.config import AuthConfig

from .conftest import TEST_HEIGHT, TEST_WIDTH, RunningRelay

pytestmark = pytest.mark.browser

PLAY_TIMEOUT_MS = 30_000
FREED_WITHIN = 5.0  # seconds for the relay to drop a viewer whose page closed
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


async def wait_viewers_gone(http, relay: RunningRelay) -> float:
    """Seconds until the relay reports no viewer of cam0; fails after ``FREED_WITHIN``."""
    start = time.monotonic()
    while True:
        info = await stream_info(http, relay)
        if info["viewers"] == 0:
            return time.monotonic() - start
        assert time.monotonic() - start < FREED_WITHIN, (
            f"relay still has {info['viewers']} viewer(s) {FREED_WITHIN}s after the page closed"
        )
        await asyncio.sleep(0.05)


async def screenshot(page: Page, name: str) -> None:
    if SCREENSHOT_DIR:
        await page.screenshot(path=str(Path(SCREENSHOT_DIR) / name))


async def test_view_page_plays_and_shows_latency(relay_server, http):
    async with chromium() as browser:
        page = await browser.new_page()
        watch = PageWatch(page)
        await page.goto(f"{relay_server.base}/view/cam0")
        await page.wait_for_function(PLAYING, timeout=PLAY_TIMEOUT_MS)

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
        latency = player["latencyMs"]
        assert math.isfinite(latency) and 0 <= latency < 2000, f"implausible same-host latency {latency} ms"

        # The overlay shows the same figure the player computed, as "<n> ms".
        text = (await page.text_content("#latency")).strip()
        shown = MS_TEXT.match(text)
        assert shown, f"#latency shows {text!r}, not a number of ms"
        assert 0 <= int(shown.group(1)) < 2000
        assert (await page.text_content("#state")).strip() == "live"
        assert re.fullmatch(r"\d+", (await page.text_content("#fps")).strip())

        # Chromium's media took a loopback path, and it offered no other address to the relay.
        pairs = await page.evaluate(CANDIDATE_PAIRS)
        selected = [p for p in pairs if p[3] == "succeeded" and p[4]]
        assert selected and all(p[0] == "127.0.0.1" and p[2] == "127.0.0.1" for p in selected), pairs
        watch.check_offers_stay_on_loopback()

        info = await stream_info(http, relay_server)
        assert info["viewers"] == 1 and info["viewers_connected"] == 1, info
        assert info["encoders_running"] == 1, info
        await screenshot(page, "view.png")
        assert not watch.errors, f"uncaught errors in the page: {watch.errors}"

        # Closing the tab fires pagehide; the page's DELETE ends the session at once.
        await page.close()
        await wait_viewers_gone(http, relay_server)
    assert (await stream_info(http, relay_server))["encoders_running"] == 1


async def test_index_tile_goes_live(relay_server, http):
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

        info = await stream_info(http, relay_server)
        assert info["viewers"] == 1 and info["viewers_connected"] == 1, info
        assert info["encoders_running"] == 1, info
        await screenshot(page, "index.png")
        assert not watch.errors, f"uncaught errors in the page: {watch.errors}"

        await page.close()
        await wait_viewers_gone(http, relay_server)


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
            assert relay_server.relay.streams["cam0"].jpegs.users == 1  # the page's MJPEG connection
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
