"""``benchmarks.burst --probe chromium``: the joiners are real browsers, headless Chromium pages playing the relay's
stream with camrelay's own player (``static/whep.js``'s ``WhepPlayer``).

A worker process (one per ``--per-worker`` pages) launches Debian's Chromium (``benchmarks.chromium``) and opens its
pages on a minimal page of the relay's own origin (``/burst-probe``, served by Playwright's router: nothing is added
to the relay), a ``<video>`` and a ``WhepPlayer``, started at once. Each page makes its offer (ICE gathered) and
holds its POST (a ``fetch`` wrapper) until the wall-clock instant the parent gives: as in ``--probe browser``, only
the POSTs go out together. From that POST, on the page's own clock (``performance.now()``): the 201 and its answer
(``answered``), the answer applied (``remote_set``), the ICE transport's pair selected (``pair``), ICE connected
(``ice``), the DTLS transport connected (``dtls``), the peer connection connected (``connected``: ICE and DTLS), and
its first RTP packet (the track's ``unmute``), the first decoded frame as a ``MediaStreamTrackProcessor`` read in a
worker hands it on (``decoded``), and the first frame presented as ``requestVideoFrameCallback`` reports it (when it
was handed to the compositor, ``presentationTime``; where it was the first frame, the last packet of that keyframe
received, ``receiveTime``, and its decode's own time, ``processingDuration``). Its first picture is the earlier of
the first decoded and the first presented (events on the page's main thread, ``unmute`` and ``loadedmetadata``,
come late in a burst: they are reported, not used); its age is read from its pixel clock. After ``--hold``
seconds, the page's getStats: its ICE and DTLS roles, the selected pair's checks, the frames it decoded over the
hold.

Playwright's driver and Chromium are this worker's children: they run on the cores this process may (``--pin``), and
their CPU over the burst is the joiners' (``joiners_cpu_s``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os

import psutil

PROBE_PATH = "/burst-probe"  # the page, on the relay's origin (its WHEP endpoint and /static/whep.js same-origin)
OFFER_TIMEOUT_MS = 10_000  # for a page to load and make its offer (whep.js offers after 2 s at most)
POLL = 0.005  # seconds between looks at the parent's instant
REPORT_TIMEOUT = 10.0  # seconds for a page's report or close (burst.py waits give_up + hold + 60 for the worker)

# The page: the player, its POST held to the instant, its steps and its first frame noted in window.__probe.
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>burst probe</title></head>
<body>
<video id="video" muted autoplay playsinline></video>
<script src="/static/whep.js"></script>
<script>
"use strict";
const probe = window.__probe = { events: {}, error: "", location: null, postedWall: null, frame: null, pc: null };
const now = () => performance.now();
const mark = (name) => { if (!(name in probe.events)) probe.events[name] = now(); };
let release, offered, done;
const atKnown = new Promise((r) => { release = r; });
window.__offered = new Promise((r) => { offered = r; });
window.__done = new Promise((r) => { done = r; });
// The page's clock (performance.timeOrigin + now()) against the system's (Date.now(), as Python's time.time()):
// read as Date.now() ticks over a millisecond, so to well under one.
const systemSkew = () => {
  const before = Date.now();
  let t;
  while ((t = Date.now()) === before);
  return t - (performance.timeOrigin + now());
};
window.probeAt = (atMs) => { probe.skew = systemSkew(); probe.at = atMs; release(); };
const nativeFetch = window.fetch.bind(window);
window.fetch = async (url, init = {}) => {
  if ((init.method || "GET") !== "POST" || probe.postedWall !== null) return nativeFetch(url, init);
  mark("offered");
  offered();
  await atKnown;
  const wait = probe.at - (performance.timeOrigin + now() + probe.skew);
  if (wait > 0) await new Promise((r) => setTimeout(r, wait));
  probe.posted = now();
  probe.postedWall = performance.timeOrigin + probe.posted + probe.skew;
  const resp = await nativeFetch(url, init);
  mark("answered");
  probe.location = resp.headers.get("Location");
  return resp;
};
const Native = window.RTCPeerConnection;
window.RTCPeerConnection = function (...args) {
  const pc = new Native(...args);
  probe.pc = pc;
  pc.addEventListener("iceconnectionstatechange", () => {
    const s = pc.iceConnectionState;
    if (s === "connected" || s === "completed") mark("ice");
    if (s === "failed") { probe.error = probe.error || "ICE failed"; done(); }
  });
  pc.addEventListener("connectionstatechange", () => {
    if (pc.connectionState === "connected") mark("connected");
    if (pc.connectionState === "failed") { probe.error = probe.error || "connection failed"; done(); }
  });
  pc.addEventListener("track", (ev) => {  // its first RTP packet (Chromium unmutes a remote track on it)
    ev.track.addEventListener("unmute", () => mark("unmute"));
    if (ev.track.kind === "video" && window.MediaStreamTrackProcessor) firstDecoded(ev.track);
  });
  const setRemote = pc.setRemoteDescription.bind(pc);
  pc.setRemoteDescription = async (description) => {
    const dtls = pc.getTransceivers()[0].receiver.transport;
    if (dtls) {
      dtls.addEventListener("statechange", () => { if (dtls.state === "connected") mark("dtls"); });
      dtls.iceTransport.addEventListener("statechange", () => {
        if (dtls.iceTransport.state === "checking") mark("checking");
      });
      dtls.iceTransport.addEventListener("selectedcandidatepairchange", () => mark("pair"));
    }
    const result = await setRemote(description);
    mark("remote_set");
    return result;
  };
  return pc;
};
window.RTCPeerConnection.prototype = Native.prototype;
// Its first decoded frame as the decoder hands it on: a MediaStreamTrackProcessor's first VideoFrame, read in a
// worker (off the page's main thread, which runs late in a burst), its wall-clock time sent back.
const FIRST_FRAME_WORKER = `onmessage = async (ev) => {
  const { value } = await ev.data.getReader().read();
  postMessage(performance.timeOrigin + performance.now());
  if (value) value.close();
};`;
function firstDecoded(track) {
  const worker = new Worker(URL.createObjectURL(new Blob([FIRST_FRAME_WORKER], { type: "text/javascript" })));
  const { readable } = new MediaStreamTrackProcessor({ track });
  worker.onmessage = (ev) => {
    probe.events.decoded = ev.data - performance.timeOrigin;
    worker.terminate();
  };
  worker.postMessage(readable, [readable]);
}
const video = document.getElementById("video");
video.addEventListener("loadedmetadata", () => mark("loadedmetadata"));  // its first frame decoded, size known
video.requestVideoFrameCallback((at, meta) => {
  probe.frame = {
    callback: at, presented: meta.presentationTime, received: meta.receiveTime ?? null,
    processing: meta.processingDuration ?? null, width: meta.width, presentedFrames: meta.presentedFrames,
    rtpTimestamp: meta.rtpTimestamp ?? null, decodedSoon: null,
  };
  if (probe.pc) {  // how many frames it had decoded by then: 1 if the frame presented first is the keyframe
    probe.pc.getStats().then((stats) => stats.forEach((r) => {
      if (r.type === "inbound-rtp" && r.kind === "video") probe.frame.decodedSoon = r.framesDecoded;
    }));
  }
  const w = video.videoWidth, s = Math.floor(w / 48);
  if (w >= 320) {
    const canvas = document.createElement("canvas");
    canvas.width = w; canvas.height = s;
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(video, 0, 0, w, s, 0, 0, w, s);
    const clock = readPixelClock(ctx.getImageData(0, 0, w, s).data, w);
    probe.frame.age = clock === null ? null : performance.timeOrigin + at + probe.skew - clock;
  }
  done();
});
const player = new WhepPlayer(video, "/whep/cam0", {
  onState: (s) => { if (s.startsWith("retrying") && !probe.error) { probe.error = s; done(); } },
});
player.start();
</script>
</body></html>
"""

# After the hold: the page's steps, its first frame, and what getStats says of its connection.
REPORT = """async () => {
  const p = window.__probe;
  const out = { events: p.events, error: p.error, location: p.location, postedWall: p.postedWall, skew: p.skew,
                posted: p.posted ?? null, frame: p.frame, visibility: document.visibilityState, stats: {} };
  if (!p.pc) return out;
  const stats = await p.pc.getStats();
  let pairId = null;
  stats.forEach((r) => {
    if (r.type === "transport") {
      pairId = r.selectedCandidatePairId;
      Object.assign(out.stats, { iceRole: r.iceRole, dtlsRole: r.dtlsRole,
                                 pairChanges: r.selectedCandidatePairChanges });
    }
    if (r.type === "inbound-rtp" && r.kind === "video") {
      Object.assign(out.stats, { framesDecoded: r.framesDecoded, keyFramesDecoded: r.keyFramesDecoded,
                                 framesDropped: r.framesDropped, nackCount: r.nackCount, pliCount: r.pliCount });
    }
  });
  const pair = pairId && stats.get(pairId);
  if (pair) {
    Object.assign(out.stats, { requestsSent: pair.requestsSent, responsesReceived: pair.responsesReceived,
                               requestsReceived: pair.requestsReceived, responsesSent: pair.responsesSent,
                               rttMs: pair.currentRoundTripTime * 1000 });
  }
  return out;
}"""


def join_worker(plan, ready, at, results) -> None:
    """``benchmarks.burst.join_worker``'s counterpart: ``plan.count`` Chromium pages in one browser."""
    os.nice(plan.nice)
    try:
        out = asyncio.run(_pages(plan, ready, at))
    except Exception as exc:  # report, never hang the parent
        ready.put("error")
        out = [{"error": f"chromium worker: {type(exc).__name__}: {exc}"}] * plan.count, 0.0
    results.put(out)


def _tree_cpu() -> float:
    """CPU seconds of this process's children (Playwright's driver, Chromium's processes)."""
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


async def _pages(plan, ready, at) -> tuple[list[dict], float]:
    from benchmarks.chromium import chromium

    origin = plan.url.split("/whep/")[0]

    async def serve(route) -> None:
        await route.fulfill(status=200, content_type="text/html", body=PAGE)

    async with chromium() as browser:
        pages = [await browser.new_page() for _ in range(plan.count)]
        for page in pages:
            await page.route(origin + PROBE_PATH, serve)
        await asyncio.gather(*(page.goto(origin + PROBE_PATH) for page in pages))
        await asyncio.gather(
            *(asyncio.wait_for(page.evaluate("() => window.__offered"), OFFER_TIMEOUT_MS / 1000) for page in pages)
        )
        ready.put("ready")  # every page's offer made, its POST held
        while not at.value:
            await asyncio.sleep(POLL)
        await asyncio.gather(*(page.evaluate(f"() => probeAt({at.value * 1000!r})") for page in pages))
        cpu = _tree_cpu()
        await asyncio.gather(
            *(asyncio.wait_for(page.evaluate("() => window.__done"), plan.give_up) for page in pages),
            return_exceptions=True,  # a page that times out is reported below, by what it has
        )
        cpu = _tree_cpu() - cpu
        first = await _reports(pages)
        await asyncio.sleep(plan.hold)
        after = await _reports(pages)
        for page in pages:
            with contextlib.suppress(Exception):  # a starved page: the browser's close ends it
                await asyncio.wait_for(page.close(), REPORT_TIMEOUT)
    return [_result(f, a, plan.give_up) for f, a in zip(first, after, strict=True)], cpu


async def _reports(pages) -> list[dict]:
    """Each page's REPORT, side by side, each within REPORT_TIMEOUT: pages starved of CPU (30 on one core) answer
    in seconds, and the parent waits for this worker only so long."""

    async def one(page) -> dict:
        try:
            return await asyncio.wait_for(page.evaluate(REPORT), REPORT_TIMEOUT)
        except Exception as exc:
            return {"events": {}, "error": f"no report ({type(exc).__name__})", "postedWall": None, "stats": {}}

    return list(await asyncio.gather(*(one(page) for page in pages)))


def _result(first: dict, after: dict, give_up: float) -> dict:
    """One page's report as ``benchmarks.burst.JoinerResult``'s fields (ms from its POST), its own in ``browser``:
    its steps from its report after the hold (``after``: each step is stamped when it happens, and the worker's
    first decoded frame may be told after the first frame presented, which ends the burst for the page), its
    frames decoded over the hold from both. ``first`` where the later report did not come."""
    first_decoded = first["stats"].get("framesDecoded") or 0
    if after.get("postedWall"):
        first = after
    out: dict = {"error": first["error"], "offered_ms": 0.0 if first["postedWall"] else None}
    if not first["postedWall"]:
        out["error"] = out["error"] or "its POST never went out"
        return out
    posted = first["posted"]
    since = lambda t: None if t is None else round(t - posted, 2)  # noqa: E731
    events = first["events"]
    out.update(
        posted=first["postedWall"] / 1000,
        answered_ms=since(events.get("answered")),
        ice_ms=since(events.get("ice")),
        connected_ms=since(events.get("connected")),
        name="webrtc-" + (first["location"] or "").rsplit("/", 1)[-1][:8],
    )
    frame = first["frame"]
    if frame is None:
        state = json.dumps(first["stats"]) if first["stats"] else "no stats"
        out["error"] = out["error"] or f"no frame within {give_up:g} s ({state})"
    else:
        out["presented_ms"] = since(frame["presented"])
        if frame["presentedFrames"] == 1:  # the frame the callback names is the first: its keyframe
            out["keyframe_ms"] = since(frame["received"])
            out["decode_ms"] = None if frame["processing"] is None else round(frame["processing"] * 1000, 2)
        # Its first picture: its first frame decoded (the worker's first VideoFrame) or presented, whichever was
        # seen first. (The callback runs at the page's next rendering: where frames came together it names the
        # last, and it missed the first.)
        seen = [t for t in (since(events.get("decoded")), out["presented_ms"]) if t is not None]
        out["first_picture_ms"] = min(seen) if seen else None
        out["first_age_ms"] = frame.get("age")
    out["frames_after"] = (after["stats"].get("framesDecoded") or 0) - first_decoded
    out["browser"] = {
        **{f"{name}_ms": since(t) for name, t in events.items() if name != "offered"},
        "offer_ahead_ms": round(posted - events["offered"], 1) if "offered" in events else None,
        "visibility": first["visibility"],
        "clock_skew_ms": round(first["skew"], 2),  # Date.now() minus the page's clock (its steps are corrected)
        **{k: frame[k] for k in ("presentedFrames", "decodedSoon") if frame},
        **after["stats"],
    }
    return out
