"""Sound as a browser viewer hears it, and what it costs the picture: real Chromium, the real page.
(``benchmarks.browser_latency`` puts camrelay's page beside mediamtx's for the picture alone.)

    python -m benchmarks.browser_sound --unmute --duration 30 --size 1280x720 --fps 30 --bitrate 2M
    python -m benchmarks.browser_sound --sound-ab 6 --duration 20

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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys

from benchmarks.chromium import chromium
from benchmarks.load import start_system
from benchmarks.options import add_stream_options
from benchmarks.peers import percentile

COLLECT = """() => {
  const p = window.camrelayPlayer;
  window.__samples = [];
  window.__audio = [];
  p.handlers.onLatencySample = (ms) => window.__samples.push(ms);
  p.handlers.onAudioSample = (ms, videoMs) => window.__audio.push([ms, videoMs]);
  window.__parts = [];  // the parts of the sound's latency, at each stats poll (a second)
  const shown = p.handlers.onStats;
  p.handlers.onStats = (st) => {
    if (st.audioJitterBufferMs != null) {
      window.__parts.push([st.audioJitterBufferMs, st.audioJitterTargetMs, st.audioPlayoutMs, p.audioOutputMs]);
    }
    if (shown) shown(st);
  };
}"""
# What a part of the sound's latency is, in the order COLLECT keeps them.
PARTS = ("jitter_buffer_ms", "jitter_target_ms", "playout_ms", "context_output_ms")


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


async def measure(
    port: int,
    duration: float,
    unmute: bool = False,
    sync: bool = False,
    offer_audio: bool = True,
    keep_playout_delay: bool = False,
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
        if sync:  # lip sync: a new connection whose audio and video Chromium plays in sync
            await page.check("#sync")
            await page.wait_for_function(
                "() => window.camrelayPlayer.connects === 2 && window.camrelayPlayer.latencyReadings > 60",
                timeout=30_000,
            )
        if unmute:
            await page.click("#unmute")
        await page.evaluate(COLLECT)
        start_frames = await page.evaluate("() => window.camrelayPlayer.stats.framesDecoded")
        await asyncio.sleep(duration)
        samples = await page.evaluate("() => window.__samples")
        heard = await page.evaluate("() => window.__audio")
        stats = await page.evaluate("() => window.camrelayPlayer.stats")
        parts = await page.evaluate("() => window.__parts")
        await page.close()
    result = {
        "samples": len(samples),
        "latency_ms": {p: percentile(samples, p) for p in (50, 95, 99)},
        "max_ms": max(samples) if samples else None,
        "fps_decoded": (stats["framesDecoded"] - start_frames) / duration,
        "jitter_buffer_ms": stats["jitterBufferMs"],
    }
    if unmute:
        audio = [a for a, _ in heard]
        sync = [a - v for a, v in heard if v is not None]
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
    return result


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


async def sound_ab(with_sound: int, without: int, rounds: int, duration: float, unmute: bool) -> dict:
    runs = {
        "sound": lambda: measure(with_sound, duration, unmute=unmute),
        "sound_synced": lambda: measure(with_sound, duration, unmute=unmute, sync=True),
        "sound_synced_playout_delay": lambda: measure(
            with_sound, duration, unmute=unmute, sync=True, keep_playout_delay=True
        ),
        "sound_not_offered": lambda: measure(with_sound, duration, offer_audio=False),
        "no_sound": lambda: measure(without, duration),
    }
    arms: dict[str, list[dict]] = {arm: [] for arm in runs}
    order = list(runs)
    for i in range(rounds):
        for arm in order[i % len(order) :] + order[: i % len(order)]:  # each round starts with the next arm
            arms[arm].append(await runs[arm]())
    medians = {arm: statistics.median(r["latency_ms"][50] for r in runs) for arm, runs in arms.items()}
    heard = {arm: [r.get("audio") or {"latency_ms": None, "lip_sync_ms": None} for r in arms[arm]]
             for arm in ("sound", "sound_synced", "sound_synced_playout_delay")}  # fmt: skip
    return {
        "rounds": rounds,
        "video_p50_ms_per_round": {arm: [r["latency_ms"][50] for r in runs] for arm, runs in arms.items()},
        "video_p50_ms_median": medians,
        "video_cost_of_sound_ms": {arm: medians[arm] - medians["no_sound"] for arm in heard},
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
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--unmute", action="store_true", help="click the page's Unmute; report audio latency, lip sync")
    ap.add_argument("--sync", action="store_true", help="tick the page's Lip sync first")
    ap.add_argument("--sound-ab", type=int, default=0, metavar="ROUNDS", help="with and without sound, interleaved")
    add_stream_options(ap)
    args = ap.parse_args(argv)
    if args.sound_ab:
        sound = start_system("camrelay", args.size, args.fps, args.bitrate)
        quiet = start_system("camrelay", args.size, args.fps, args.bitrate, extra=("--no-audio",))
        try:
            result = asyncio.run(sound_ab(sound.port, quiet.port, args.sound_ab, args.duration, args.unmute))
        finally:
            sound.close()
            quiet.close()
    else:
        system = start_system("camrelay", args.size, args.fps, args.bitrate)
        try:
            result = asyncio.run(measure(system.port, args.duration, args.unmute, args.sync))
        finally:
            system.close()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
