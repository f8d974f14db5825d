"""Sound as a browser viewer hears it, and what it costs the picture: real Chromium, the real page.
(``benchmarks.browser_latency`` puts camrelay's page beside mediamtx's for the picture alone.)

    python -m benchmarks.browser_sound --unmute --duration 30 --size 1280x720 --fps 30 --bitrate 2M
    python -m benchmarks.browser_sound --sound-ab 6 --duration 20
    python -m benchmarks.browser_sound --sound-ab 5 --unmute --arms sound,sound_synced,sound_synced_untrimmed
    python -m benchmarks.browser_sound --unmute --sync --duration 600

Starts a relay on loopback with the test pattern, opens ``/view/cam0`` in
headless Chromium and collects every latency reading the page makes from the
pixel clock (capture time painted into the frame, read from the video element
on a canvas at each presented frame, against the browser's clock). Also
reports the page's decoded fps and jitter-buffer delay. With its sound on
(``--unmute``: the page's Unmute clicked), the test sound's audio latency as
the page hears it (WebAudio, ``BurstListener``) and the lip sync (audio
latency minus the video latency of that moment).

``--sound-ab N``: two relays side by side over the same time, one with its
sound and one with ``--no-audio``; N rounds, each measuring five arms in
turn (each round starting with the next arm), so a shared machine's load and
the order fall on all alike: the page as it plays by default (the sound on a
stream of its own), with Lip sync ticked, with Lip sync ticked as it was
before its offer left out the playout-delay extension (``KEEP_PLAYOUT_DELAY``),
the same relay watched by a page that offers no audio, and the relay without
sound; with ``--unmute`` the three with sound are unmuted (and the page
listens for the bursts: WebAudio on the page's main thread). Chromium syncs the tracks of one stream
by delaying the earlier: this says what that costs the video (medians per
arm, and their difference from the arm without sound), and how far apart
sound and picture stay. With ``--unmute`` each page also reports the parts
of the sound's latency Chromium gives (medians of the page's polls): what its
jitter buffer held and aimed for, its output path's delay, and the page's
AudioContext output latency, which each of the page's readings includes.
``--arms`` picks some of the arms (``ARMS``), among them Lip sync without the
page's trim of the picture's delay (``UNTRIMMED``).

Beside the page's own readings, Chromium's: every ``SYNC_POLL_MS`` the page's
getStats gives each track's estimatedPlayoutTimestamp (the capture time, read
through the relay's sender reports, of what plays now): their difference is
lip sync as Chromium reckons it, and the audio's against the picture the page
saw presented is lip sync without WebAudio's path (``chromium_sync``); with
what each jitter buffer held and was asked to hold. A run of two minutes or
more also gives each of the three per minute, the last minute's less the
first's, and a fitted line's rise over the run (drift).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys

from benchmarks.bursts import drift_ms
from benchmarks.chromium import chromium
from benchmarks.load import start_system
from benchmarks.options import add_stream_options
from benchmarks.peers import percentile

COLLECT = """() => {
  const p = window.camrelayPlayer;
  window.__samples = [];
  window.__audio = [];
  p.handlers.onLatencySample = (ms) => window.__samples.push(ms);
  p.handlers.onAudioSample = (ms, videoMs) => window.__audio.push([ms, videoMs, Date.now()]);
  window.__parts = [];  // the parts of the sound's latency, at each stats poll (a second)
  const shown = p.handlers.onStats;
  p.handlers.onStats = (st) => {
    if (st.audioJitterBufferMs != null) {
      window.__parts.push([st.audioJitterBufferMs, st.audioJitterTargetMs, st.audioPlayoutMs, p.audioOutputMs]);
    }
    if (shown) shown(st);
  };
  // Chromium's own reckoning, every SYNC_POLL_MS: each track's estimatedPlayoutTimestamp (the capture time, on the
  // relay's clock through its sender reports, of what plays now) and what each jitter buffer held.
  window.__sync = [];
  window.__syncTimer = setInterval(async () => {
    const pc = p.pc;
    if (!pc) return;
    const report = await pc.getStats();
    const row = { t: Date.now(), floor: p.syncTrimMs, shown: p.latencyMs };
    report.forEach((r) => {
      if (r.type !== "inbound-rtp" || (r.kind !== "audio" && r.kind !== "video")) return;
      row[r.kind] = [r.estimatedPlayoutTimestamp ?? null, r.jitterBufferDelay ?? null,
                     r.jitterBufferTargetDelay ?? null, r.jitterBufferMinimumDelay ?? null,
                     r.jitterBufferEmittedCount ?? null];
    });
    window.__sync.push(row);
  }, %d);
}"""
# What a part of the sound's latency is, in the order COLLECT keeps them.
PARTS = ("jitter_buffer_ms", "jitter_target_ms", "playout_ms", "context_output_ms")
# How often the page reads both tracks' getStats for Chromium's own sync: often enough for a median per minute
# (240 readings), seldom enough to cost nothing beside the page's own poll (a second).
SYNC_POLL_MS = 250
COLLECT = COLLECT % SYNC_POLL_MS
# Lip sync ticked: how long before the readings are kept. Chromium's sync moves the delays once a second by half
# the gap, the page's trim likewise: both have settled within a few seconds of the new connection.
SYNC_SETTLE_S = 8.0
# NTP's epoch (1900) is this many ms before Unix's: estimatedPlayoutTimestamp is an NTP time in ms.
NTP_UNIX_OFFSET_MS = 2_208_988_800_000
# The bins of a long run's lip sync over time (s).
MINUTE = 60.0
# The A/B's arms (``sound_ab``), and those of them that play the sound.
ARMS = (
    "sound",
    "sound_synced",
    "sound_synced_untrimmed",
    "sound_synced_playout_delay",
    "sound_not_offered",
    "no_sound",
)
SOUND_ARMS = ARMS[:4]


# An init script: the page's offers leave out audio (its player asks for a transceiver; this one is refused), so a
# relay with sound is watched as a viewer who takes no sound: the same relay, the video alone.
NO_AUDIO_OFFER = """() => {
  const add = RTCPeerConnection.prototype.addTransceiver;
  RTCPeerConnection.prototype.addTransceiver = function (kind, init) {
    return kind === "audio" ? null : add.call(this, kind, init);
  };
}"""


# Lip sync as it was before the page's offer left out the playout-delay extension (run after the page loaded, before
# Lip sync is ticked): the offer as Chromium made it, so the relay sends a playout delay of 0 and Chromium renders
# each frame at once, whatever its sync with the sound.
KEEP_PLAYOUT_DELAY = "() => { window.withoutPlayoutDelay = (sdp) => sdp; }"
# Lip sync without the page's trim (static/whep.js, syncTrim): the picture held by Chromium's own sync alone.
UNTRIMMED = "() => { window.camrelayPlayer._trimSync = () => {}; }"


async def measure(
    port: int,
    duration: float,
    unmute: bool = False,
    sync: bool = False,
    offer_audio: bool = True,
    keep_playout_delay: bool = False,
    untrimmed: bool = False,
) -> dict:
    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": 1600, "height": 1000})
        if not offer_audio:
            await page.add_init_script(f"({NO_AUDIO_OFFER})()")
        await page.goto(f"http://127.0.0.1:{port}/view/cam0")
        await page.wait_for_function(
            "() => window.camrelayPlayer && window.camrelayPlayer.latencyReadings > 30", timeout=30_000
        )
        if keep_playout_delay:
            await page.evaluate(KEEP_PLAYOUT_DELAY)
        if untrimmed:
            await page.evaluate(UNTRIMMED)
        if sync:  # lip sync: a new connection whose audio and video Chromium plays in sync
            await page.check("#sync")
            await page.wait_for_function(
                "() => window.camrelayPlayer.connects === 2 && window.camrelayPlayer.latencyReadings > 60",
                timeout=30_000,
            )
            await asyncio.sleep(SYNC_SETTLE_S)
        if unmute:
            await page.click("#unmute")
        await page.evaluate(COLLECT)
        start_frames = await page.evaluate("() => window.camrelayPlayer.stats.framesDecoded")
        started = await page.evaluate("() => Date.now()")
        await asyncio.sleep(duration)
        samples = await page.evaluate("() => window.__samples")
        heard = await page.evaluate("() => window.__audio")
        stats = await page.evaluate("() => window.camrelayPlayer.stats")
        trim = await page.evaluate(
            "() => { const p = window.camrelayPlayer; return { trims: p.syncTrims, floor_ms: p.syncTrimMs }; }"
        )
        parts = await page.evaluate("() => window.__parts")
        rows = await page.evaluate("() => window.__sync")
        await page.close()
    result = {
        "samples": len(samples),
        "latency_ms": {p: percentile(samples, p) for p in (50, 95, 99)},
        "max_ms": max(samples) if samples else None,
        "fps_decoded": (stats["framesDecoded"] - start_frames) / duration,
        "jitter_buffer_ms": stats["jitterBufferMs"],
        "chromium": chromium_sync(rows),
        "sync_trim": trim,
    }
    long = duration >= 2 * MINUTE
    if long:
        result["chromium"]["over_time"] = over_time(_sync_points(rows), started, duration)
        result["chromium"]["presented_over_time"] = over_time(_presented_points(rows), started, duration)
    if unmute:
        audio = [a for a, _, _ in heard]
        sync = [a - v for a, v, _ in heard if v is not None]
        result["audio"] = {
            "onsets": len(audio),
            "latency_ms": {p: percentile(audio, p) for p in (50, 95)} if audio else None,
            "lip_sync_ms": {p: percentile(sync, p) for p in (5, 50, 95)} if sync else None,
            # Parts of the latency, medians of the page's polls (a second each): what Chromium's audio jitter
            # buffer (NetEq) held and aimed for, its output path's delay (getStats media-playout), and the output
            # latency of the page's AudioContext (added to every reading); and the sound concealed in all.
            "parts_ms": {
                name: _median([row[i] for row in parts if row[i] is not None]) for i, name in enumerate(PARTS)
            },
            "concealed_ms": stats.get("audioConcealedMs"),
        }
        if long:
            result["audio"]["over_time"] = over_time(
                [(t, a - v) for a, v, t in heard if v is not None], started, duration
            )
    return result


def _sync_points(rows: list[dict]) -> list[tuple[float, float]]:
    """(time, ms the sound plays after its picture) of each poll at which Chromium gave both tracks' playout."""
    out = []
    for row in rows:
        audio, video = row.get("audio"), row.get("video")
        if audio and video and audio[0] and video[0]:
            out.append((row["t"], video[0] - audio[0]))
    return out


def _presented_points(rows: list[dict]) -> list[tuple[float, float]]:
    """(time, ms the sound plays after its picture) with the sound by Chromium's reckoning (its estimate of the
    audio's output path included) against the picture as the page saw it presented (the pixel clock's median of
    the last second): lip sync without WebAudio's path."""
    return [
        (row["t"], row["t"] - (row["audio"][0] - NTP_UNIX_OFFSET_MS) - row["shown"])
        for row in rows
        if row.get("audio") and row["audio"][0] and row.get("shown") is not None
    ]


def chromium_sync(rows: list[dict]) -> dict:
    """Sync as Chromium reckons it, from the page's getStats polls (COLLECT's ``__sync``): how much later the
    sound plays than its picture (the video's estimatedPlayoutTimestamp less the audio's: both the capture time of
    what plays now, read through the relay's sender reports), each track's latency by the same (the poll's time
    less that capture time), and what each jitter buffer held, aimed for and was asked to hold at least, per
    interval between polls (ms a frame or sample)."""
    sync = [ms for _, ms in _sync_points(rows)]
    seen = [ms for _, ms in _presented_points(rows)]
    out: dict = {
        "polls": len(rows),
        "lip_sync_ms": _percentiles(sync, (5, 50, 95)),
        "lip_sync_presented_ms": _percentiles(seen, (5, 50, 95)),
        "floor_ms": _median([row["floor"] for row in rows if row.get("floor") is not None]),
    }
    for kind in ("video", "audio"):
        latency, held, target, minimum = [], [], [], []
        last = None
        for row in rows:
            r = row.get(kind)
            if not r:
                continue
            if r[0]:
                latency.append(row["t"] - (r[0] - NTP_UNIX_OFFSET_MS))
            if last is not None and None not in r[1:] and None not in last[1:] and r[4] > last[4]:
                emitted = r[4] - last[4]
                held.append(1000 * (r[1] - last[1]) / emitted)
                target.append(1000 * (r[2] - last[2]) / emitted)
                minimum.append(1000 * (r[3] - last[3]) / emitted)
            last = r
        out[kind] = {
            "latency_ms": _percentiles(latency, (50, 95)),
            "held_ms": _median(held),
            "target_ms": _median(target),
            "minimum_ms": _median(minimum),
        }
    return out


def over_time(points: list[tuple[float, float]], start: float, duration: float) -> dict | None:
    """A long run's readings (time in ms since the epoch, value in ms) over its minutes: each whole minute's median
    (a last part minute counted with the minute before), the last minute's less the first's, and the rise of a
    least-squares line over the run (``bursts.drift_ms``)."""
    if not points:
        return None
    minutes = max(1, int(duration // MINUTE))
    bins: list[list[float]] = [[] for _ in range(minutes)]
    for t, value in points:
        bins[min(minutes - 1, max(0, int((t - start) / 1000 / MINUTE)))].append(value)
    medians = [_median(b) for b in bins]
    known = [m for m in medians if m is not None]
    drift = drift_ms([(t - start) / 1000 for t, _ in points], [v for _, v in points])
    return {
        "readings": len(points),
        "per_minute_median_ms": medians,
        "last_minute_less_first_ms": round(known[-1] - known[0], 1) if len(known) > 1 else None,
        "fitted_drift_ms": None if drift is None else round(drift, 1),
    }


def _percentiles(values: list[float], ps: tuple[int, ...]) -> dict | None:
    return {p: round(percentile(values, p), 1) for p in ps} if values else None


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


async def sound_ab(
    with_sound: int, without: int, rounds: int, duration: float, unmute: bool, arms_wanted: tuple[str, ...] = ARMS
) -> dict:
    runs = {
        "sound": lambda: measure(with_sound, duration, unmute=unmute),
        "sound_synced": lambda: measure(with_sound, duration, unmute=unmute, sync=True),
        "sound_synced_playout_delay": lambda: measure(
            with_sound, duration, unmute=unmute, sync=True, keep_playout_delay=True
        ),
        "sound_synced_untrimmed": lambda: measure(with_sound, duration, unmute=unmute, sync=True, untrimmed=True),
        "sound_not_offered": lambda: measure(with_sound, duration, offer_audio=False),
        "no_sound": lambda: measure(without, duration),
    }
    runs = {arm: run for arm, run in runs.items() if arm in arms_wanted}
    arms: dict[str, list[dict]] = {arm: [] for arm in runs}
    order = list(runs)
    for i in range(rounds):
        for arm in order[i % len(order) :] + order[: i % len(order)]:  # each round starts with the next arm
            arms[arm].append(await runs[arm]())
    medians = {arm: statistics.median(r["latency_ms"][50] for r in runs) for arm, runs in arms.items()}
    heard = {arm: [r.get("audio") or {"latency_ms": None, "lip_sync_ms": None} for r in arms[arm]]
             for arm in SOUND_ARMS if arm in arms}  # fmt: skip
    chromium = {arm: [r["chromium"] for r in arms[arm]] for arm in heard}
    return {
        "rounds": rounds,
        "video_p50_ms_per_round": {arm: [r["latency_ms"][50] for r in runs] for arm, runs in arms.items()},
        "video_p50_ms_median": medians,
        "video_cost_of_sound_ms": {arm: medians[arm] - medians["no_sound"] for arm in heard}
        if "no_sound" in medians
        else None,
        "audio_latency_p50_ms_per_round": {
            arm: [a["latency_ms"][50] for a in runs if a["latency_ms"]] for arm, runs in heard.items()
        },
        "lip_sync_p50_ms_per_round": {
            arm: [a["lip_sync_ms"][50] for a in runs if a["lip_sync_ms"]] for arm, runs in heard.items()
        },
        "lip_sync_p50_ms_median": {
            arm: _median([a["lip_sync_ms"][50] for a in runs if a["lip_sync_ms"]]) for arm, runs in heard.items()
        },
        "audio_latency_parts_ms_median": {
            arm: {
                name: _median([a["parts_ms"][name] for a in runs if a.get("parts_ms", {}).get(name) is not None])
                for name in PARTS
            }
            for arm, runs in heard.items()
        },  # fmt: skip
        # Chromium's own reckoning (``chromium_sync``): the sound after its picture, each round's median, and
        # the medians over the rounds of what the video's jitter buffer held and was asked to hold at least.
        "chromium_lip_sync_p50_ms_per_round": {
            arm: [c["lip_sync_ms"][50] for c in runs if c["lip_sync_ms"]] for arm, runs in chromium.items()
        },
        "chromium_lip_sync_p50_ms_median": {
            arm: _median([c["lip_sync_ms"][50] for c in runs if c["lip_sync_ms"]]) for arm, runs in chromium.items()
        },
        "chromium_parts_ms_median": {
            arm: {
                f"{kind}_{part}": _median([c[kind][part] for c in runs if c[kind][part] is not None])
                for kind in ("video", "audio")
                for part in ("held_ms", "target_ms", "minimum_ms")
            }
            for arm, runs in chromium.items()
        },
        "rounds_raw": arms,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--unmute", action="store_true", help="click the page's Unmute; report audio latency, lip sync")
    ap.add_argument("--sync", action="store_true", help="tick the page's Lip sync first")
    ap.add_argument("--untrimmed", action="store_true", help="with --sync: without the page's trim (UNTRIMMED)")
    ap.add_argument("--sound-ab", type=int, default=0, metavar="ROUNDS", help="with and without sound, interleaved")
    ap.add_argument(
        "--arms", default=",".join(ARMS), help=f"the A/B's arms, comma-separated (default all: {','.join(ARMS)})"
    )
    add_stream_options(ap)
    args = ap.parse_args(argv)
    if unknown := set(args.arms.split(",")) - set(ARMS):
        ap.error(f"unknown arms {sorted(unknown)}; choose from {','.join(ARMS)}")
    if args.sound_ab:
        sound = start_system("camrelay", args.size, args.fps, args.bitrate)
        quiet = start_system("camrelay", args.size, args.fps, args.bitrate, extra=("--no-audio",))
        try:
            wanted = tuple(args.arms.split(","))
            result = asyncio.run(sound_ab(sound.port, quiet.port, args.sound_ab, args.duration, args.unmute, wanted))
        finally:
            sound.close()
            quiet.close()
    else:
        system = start_system("camrelay", args.size, args.fps, args.bitrate)
        try:
            result = asyncio.run(measure(system.port, args.duration, args.unmute, args.sync, untrimmed=args.untrimmed))
        finally:
            system.close()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
