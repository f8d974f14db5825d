"""Debian's headless Chromium for tests and benchmarks, driven by Playwright.

Playwright never downloads a browser here: it launches ``/usr/bin/chromium``
(``scripts/setup`` installs it); a missing one is an error, never a skip.

Everything stays on loopback. Chromium's flags are chosen so that nothing it or the relay sends goes anywhere but
127.0.0.1 (checked with strace and a packet capture on eth0 when they were chosen):

- ``--webrtc-ip-handling-policy=default_public_interface_only``: Chromium enumerates no interfaces and offers no
  host candidate; its ICE socket is bound to the any-address, so its checks to the relay's only candidate
  (127.0.0.1) leave from 127.0.0.1 and the relay learns just that, as a peer-reflexive candidate. Without it
  Chromium offers its LAN addresses and the relay sends checks to them. ``--allow-loopback-in-peer-connection``
  is not needed.
- ``--disable-features=WebRtcHideLocalIpsWithMdns``: otherwise Chromium starts its mDNS responder (multicast
  group joins, announcements on 224.0.0.251). Chromium honours only the last ``--disable-features``, so the
  list repeats Playwright's own defaults.
- ``--host-resolver-rules``: no DNS at all. Debian's launcher turns on remote extensions, and Chromium looked up
  update.googleapis.com, clients2.google.com and accounts.google.com despite ``--disable-background-networking``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from playwright.async_api import Browser, Page, async_playwright

CHROMIUM = Path("/usr/bin/chromium")
# Playwright's default --disable-features (playwright-core chromiumSwitches.ts); ours replaces it, so repeat them.
PLAYWRIGHT_DISABLED_FEATURES = (
    "AvoidUnnecessaryBeforeUnloadCheckSync",
    "DestroyProfileOnBrowserClose",
    "HttpsUpgrades",
    "HttpsFirstBalancedModeAutoEnable",
    "LensOverlay",
    "MediaRouter",
    "PaintHolding",
    "ThirdPartyStoragePartitioning",
    "AvoidCorsURLLoaderRestartOnRedirect",
    "OptimizationHints",
    "NetworkTimeServiceQuerying",
    "AimEnabled",
    "PreconnectToSearch",
)


def host_resolver_rules(reach: tuple[str, ...] = ()) -> str:
    """No name resolves; loopback and the addresses in ``reach`` are reached as they are."""
    return "--host-resolver-rules=" + ", ".join(["MAP * ~NOTFOUND", *(f"EXCLUDE {a}" for a in ("127.0.0.1", *reach))])


CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--webrtc-ip-handling-policy=default_public_interface_only",
    "--disable-features=" + ",".join(("WebRtcHideLocalIpsWithMdns", *PLAYWRIGHT_DISABLED_FEATURES)),
    host_resolver_rules(),
]
LAUNCH_TIMEOUT_MS = 30_000


@asynccontextmanager
async def chromium(reach: tuple[str, ...] = ()) -> AsyncIterator[Browser]:
    """Debian's Chromium, headless; closed (with Playwright's driver) on exit.

    ``reach``: addresses besides loopback that pages may open, for a browser that runs in a network namespace of
    a test's own (``--host-resolver-rules`` would map them to nothing too).
    """
    assert CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK), (
        f"{CHROMIUM} is missing: the browser tests need Debian's Chromium (apt-get install chromium, or "
        "scripts/setup); they never download a browser"
    )
    async with async_playwright() as pw:
        args = [*CHROMIUM_ARGS[:-1], host_resolver_rules(reach)]  # the rules are the last flag
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), args=args, headless=True, timeout=LAUNCH_TIMEOUT_MS
        )
        try:
            yield browser
        finally:
            await browser.close()


# -- what a page presents: the pixel clock of each frame of its <video id="video">

# A function for page.evaluate (or, through ``as_script``, an init script, a script tag or a line of an HTML
# page): from then on, window.presented gets [Date.now(), the capture time (ms) its pixel clock shows, or null
# where it does not read] for every frame the <video id="video"> presents. Needs whep.js's readPixelClock by the
# first frame; run before the page's DOM is there, it waits for it. Its names stay inside the function: the view
# page has a global `video` too.
PRESENTED = """() => {
  window.presented = [];
  const start = () => {
    const video = document.getElementById("video");
    const canvas = document.createElement("canvas");
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    const onFrame = () => {
      const w = video.videoWidth;
      if (w) {
        const s = Math.floor(w / 48);
        canvas.width = w; canvas.height = s;
        ctx.drawImage(video, 0, 0, w, s, 0, 0, w, s);
        window.presented.push([Date.now(), readPixelClock(ctx.getImageData(0, 0, w, s).data, w)]);
      }
      video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
}"""
# The same, each frame's clock read from its decoded picture (WebCodecs' VideoFrame: the band's rows of luma copied
# out) instead of by drawing the picture into a canvas, which in Chromium without a GPU converts all of it to RGB
# first: about 4 ms of the renderer's time a frame, a quarter of a core at 60 fps, taken from the page it measures.
# The luma is handed to readPixelClock as grey RGBA (any page's whep.js has it). A frame the browser cannot hand
# over so is noted with a null clock.
PRESENTED_FRAME = """() => {
  window.presented = [];
  const start = () => {
    const video = document.getElementById("video");
    const onFrame = () => {
      const entry = [Date.now(), null];
      window.presented.push(entry);
      video.requestVideoFrameCallback(onFrame);
      let frame;
      try { frame = new VideoFrame(video); } catch (e) { return; }
      const w = frame.visibleRect.width, s = Math.floor(w / 48);
      if (!["I420", "I420A", "NV12"].includes(frame.format) || w < 320) { frame.close(); return; }
      const rect = { x: 0, y: 0, width: w, height: s + (s & 1) };
      const luma = new Uint8Array(frame.allocationSize({ rect }));
      frame.copyTo(luma, { rect }).then((layout) => {
        frame.close();
        const { offset, stride } = layout[0];
        const rgba = new Uint8ClampedArray(w * s * 4);
        for (let y = 0; y < s; y++) {
          for (let x = 0; x < w; x++) rgba.fill(luma[offset + y * stride + x], (y * w + x) * 4, (y * w + x) * 4 + 3);
        }
        entry[1] = readPixelClock(rgba, w);
      }, () => frame.close());
    };
    video.requestVideoFrameCallback(onFrame);
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
}"""
READABLE = "window.presented.filter((p) => p[1] !== null)"  # a JS expression: the [at, clock] whose clock reads


def as_script(function: str) -> str:
    """A JS function's source as a script that calls it."""
    return f"({function})();"


async def presented_clocks(page: Page) -> list[int]:
    """The capture times the frames ``page`` presented showed, in order; frames whose clock did not read left out."""
    return [clock for _, clock in await page.evaluate(f"() => {READABLE}")]


async def wait_presented(page: Page, count: int, timeout_ms: float) -> None:
    """Until ``page`` has presented ``count`` frames whose pixel clock reads (PRESENTED must run in it)."""
    await page.wait_for_function(f"() => {READABLE}.length >= {count}", timeout=timeout_ms)
