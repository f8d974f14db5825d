"""Instant start from the cached GOP (``[video] join = "cached_gop"``).

First the pure rules with plain values: a viewer's RTP timestamps, the catch-up pacing, and a whole catch-up
simulated on a hub with an injected clock. Then end to end, a real relay whose encoder makes a keyframe only
every 10 s: a viewer joining mid-GOP starts from a frame encoded before it joined, nothing is forced, no frame
is missed between the cache and live, and the viewers already watching lose nothing.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import join as join_benchmark
from benchmarks.chromium import PRESENTED, READABLE, as_script, chromium, presented_clocks
from relay.config import ConfigError, load
from relay.hub import EncodedFrame, PacketHub
from relay.ipc import EncoderSettings
from relay.source import SourceSpec
from relay.stream import Stream
from relay.webrtc.catchup import (
    CATCHUP_MIN_BITRATE,
    CATCHUP_RATE,
    CatchUpPacer,
    RtpTimeline,
    ViewerTiming,
    catchup_rate,
)
from relay.webrtc.whepclient import WhepViewer

from .conftest import EncodedFrames, RunningRelay, make_config, session_of, start_relay
from .test_lossy_viewer import Watch

ROOT = Path(__file__).resolve().parent.parent

# -- the policy: [video] join


def test_join_is_a_checked_config_key():
    assert load().video.join == "auto"
    assert load('[video]\njoin = "cached_gop"').video.join == "cached_gop"
    assert load(None, {"CAMRELAY_VIDEO_JOIN": "keyframe"}).video.join == "keyframe"
    with pytest.raises(ConfigError, match=r"^video\.join: must be one of auto, cached_gop, keyframe, got 'always'"):
        load('[video]\njoin = "always"')


class PassthroughStream(Stream):
    passthrough = True  # what the passthrough work's property says for a camera's own H.264


@pytest.mark.parametrize(
    ("kind", "join", "mode"),
    [
        (Stream, "auto", "keyframe"),  # transcoded: an IDR is forced for the joiner, as before
        (PassthroughStream, "auto", "cached_gop"),  # nothing to force: the cached GOP
        (Stream, "cached_gop", "cached_gop"),
        (PassthroughStream, "keyframe", "keyframe"),
    ],
)
def test_auto_starts_from_the_cache_when_the_stream_cannot_force_a_keyframe(kind, join, mode):
    stream = kind("cam0", SourceSpec("test", ""), EncoderSettings(1_000_000, 30.0, 1.0), 640, 360, join=join)
    assert stream.join_mode == mode
    assert stream.hub.caching == (mode == "cached_gop")
    assert stream.status().api()["join"] == mode


# -- a viewer's RTP timestamps


def test_a_catch_up_is_stamped_with_the_live_clock_and_ends_at_the_live_frames_own_timestamps():
    t = RtpTimeline()
    # Cached frames leaving 10 and 20 ms after the newest frame (pts 900000) was published: the live clock then.
    assert t.catch_up(900_000, 0.010) == 900_900
    assert t.catch_up(900_000, 0.020) == 901_800
    assert t.catch_up(900_000, 0.020) == 901_801  # at the same instant: one tick more, never the same
    assert t.catch_up(903_000, 0.0) == 903_000  # a newer frame was published
    assert t.catch_up(903_000, -0.5) == 903_001  # a wall clock stepped back: still growing
    # Caught up: the live frames carry their own pts, no shift.
    assert [t.live(906_000), t.live(909_000)] == [906_000, 909_000] and t.offset == 0


def test_a_catch_up_that_ends_late_shifts_the_live_timestamps_to_keep_them_growing():
    t = RtpTimeline()
    assert t.catch_up(900_000, 0.040) == 903_600  # left 40 ms after the newest: past the next frame's pts
    assert t.live(903_000) == 903_601 and t.offset == 601
    assert t.live(906_000) == 906_601  # the shift stays: the stream's pace, its own spacing
    assert t.catch_up(909_000, 0.001) == 909_691  # a later catch-up (a resync) keeps it too


def test_live_frames_without_a_catch_up_carry_their_pts():
    t = RtpTimeline()
    assert [t.live(pts) for pts in (3000, 6000, 9000)] == [3000, 6000, 9000]


# -- pacing


def test_the_pacer_lets_the_first_frame_go_at_once_then_holds_each_for_its_bytes():
    p = CatchUpPacer(start=10.0, max_credit=0.25)
    assert p.wait(10.0, rate=1000.0) == 0.0
    p.sent(2000, 10.0, rate=1000.0)  # the keyframe: the next frame goes with it, so a receiver can end it
    assert p.wait(10.0, rate=1000.0) == 0.0
    p.sent(500, 10.0, rate=1000.0)  # 500 bytes at 1000 bytes a second: the next at 10.5
    assert (p.wait(10.25, 1000.0), p.wait(10.5, 1000.0), p.wait(11.0, 1000.0)) == (0.25, 0.0, 0.0)
    assert p.wait(10.0, rate=500.0) == 1.0  # the stream's bit rate, as measured when asked
    p.sent(250, 10.5, rate=1000.0)
    assert p.due(1000.0) == 10.75
    p.sent(250, 11.5, rate=1000.0)  # sent late: a quarter of a second is made up, no more
    assert p.due(1000.0) == 11.5 and (p.frames, p.bytes) == (4, 3000)
    with pytest.raises(ValueError):
        p.due(0.0)


def test_a_catch_up_runs_at_a_few_times_the_streams_bit_rate():
    assert catchup_rate(2_000_000) == CATCHUP_RATE * 2_000_000 / 8
    assert catchup_rate(0.0) == CATCHUP_RATE * CATCHUP_MIN_BITRATE / 8  # not known yet


# -- a whole catch-up, simulated: a hub with plain frames and an injected clock

FPS = 30
STEP = 3000  # pts ticks a frame at 30 fps
KEYFRAME_BYTES, FRAME_BYTES = 30_000, 3_000  # about 0.8 Mbit/s with a keyframe every 10 s


def encoded(n: int) -> EncodedFrame:
    """Frame ``n`` of a stream with a keyframe every 300 frames, captured at n / 30 s (pts n * 3000)."""
    key = n % 300 == 0
    return EncodedFrame(bytes(KEYFRAME_BYTES if key else FRAME_BYTES), n * STEP, key, n / FPS)


def simulate_join(join_at_frame: int, live_frames: int) -> tuple[float, list[tuple[int, int, float]], float]:
    """Publish frames 0..join_at_frame-1, join 10 ms after the last, and run the joiner's send loop (``HubTrack``'s
    rules, by the injected clock) until it has sent ``live_frames`` frames live. Returns the stream's bit rate as
    the hub measured it at the join, what the joiner sent as (frame number, timestamp, when) and when it joined."""
    hub = PacketHub("cam0", lambda: None, cached_start=lambda: True)
    for n in range(join_at_frame):
        hub.publish(encoded(n), now=n / FPS)
    now = (join_at_frame - 1) / FPS + 0.010
    bitrate = hub.bitrate.bps()
    sub, timing = hub.subscribe("joiner"), ViewerTiming()
    sent: list[tuple[int, int, float]] = []
    live = 0
    n_next = join_at_frame
    while live < live_frames:
        wait = timing.wait(sub.replaying, hub.bitrate.bps(), now) if (sub.replaying or timing.catching_up) else 0.0
        ready = sub.behind > 0
        publish_at = n_next / FPS
        if ready and now + wait < publish_at:
            now += wait
            catching_up = timing.catching_up
            frame = sub.get_nowait()
            assert frame is not None and hub.newest is not None
            since = now - hub.newest.published_at
            ts = timing.stamp(frame.pts, len(frame.data), hub.newest.pts, since, sub.behind, now, hub.bitrate.bps())
            sent.append((frame.pts // STEP, ts, now))
            live += not catching_up
        else:
            now = publish_at
            hub.publish(encoded(n_next), now=now)
            n_next += 1
    assert hub.cache_starts == 1 and hub.dropped == 0
    return bitrate, sent, (join_at_frame - 1) / FPS + 0.010


def test_a_simulated_joiner_catches_up_within_the_burst_cap_then_goes_on_live():
    bitrate, sent, joined = simulate_join(join_at_frame=150, live_frames=30)  # 5 s into a 10 s GOP
    numbers = [n for n, _, _ in sent]
    assert numbers == list(range(numbers[0], numbers[-1] + 1)) and numbers[0] == 0, "from the keyframe, none missed"
    stamps = [ts for _, ts, _ in sent]
    assert all(a < b for a, b in zip(stamps, stamps[1:], strict=False)), "timestamps only grow"
    catch_up, live = sent[:-30], sent[-30:]
    # Each cached frame carries the live clock as it leaves (here pts are 90 kHz wall time), or a tick more than
    # the frame before when it leaves at the same instant: the GOP's 5 s of timestamps are compressed into the
    # catch-up's span, and the first frame goes at once.
    expected: list[int] = []
    for _, _, at in catch_up:
        expected.append(max(round(at * 90_000), expected[-1] + 1) if expected else round(at * 90_000))
    assert [ts for _, ts, _ in catch_up] == expected
    assert catch_up[0][2] == joined
    # Then the live frames carry their own pts: the catch-up ended at the live frame's timestamp.
    assert [ts for _, ts, _ in live] == [n * STEP for n, _, _ in live]
    span = catch_up[-1][2] - joined
    assert span < 5.0 / (CATCHUP_RATE - 1) + 0.1, f"5 s of GOP caught up in {span:.2f}s"
    # The joiner's first second carried at most CATCHUP_RATE times the stream's bit rate, plus its first frame and
    # one more.
    first_second = sum(len(encoded(n).data) for n, _, at in sent if at < joined + 1.0)
    assert first_second <= CATCHUP_RATE * bitrate / 8 + KEYFRAME_BYTES + FRAME_BYTES


def test_a_simulated_joiner_at_the_keyframe_is_live_at_once():
    _, sent, joined = simulate_join(join_at_frame=1, live_frames=5)
    assert [n for n, _, _ in sent] == [0, 1, 2, 3, 4, 5]
    assert sent[0][1] == round(joined * 90_000)  # the keyframe, stamped as it leaves
    assert [ts for _, ts, _ in sent[1:]] == [n * STEP for n in range(1, 6)]


# -- end to end: a real relay whose encoder makes a keyframe every 15 s, so none comes during a test

LONG_GOP = 15.0  # seconds between regular keyframes: 450 frames at 30 fps, within the cache's 600
DEADLINE = 60.0  # seconds for what a test waits for: a deadline, not a measurement
LIVE_FRAMES = 30  # frames the joiner must show once caught up: a second of live video
STALL = 1.0  # seconds the event loop is held: 30 frames at 30 fps, several times the viewer's lag limit here
# The viewer's lag limit in the test below. A stall's frames reach the hub at most a pipe's worth at a time (the
# worker waits on a full pipe): a fraction of the default second, so the test makes the limit short enough.
SHORT_LAG = 0.2  # seconds of video: 6 frames


async def stream_entry(http, relay: RunningRelay) -> dict:
    async with http.get(relay.base + "/api/v1/streams") as resp:
        assert resp.status == 200
        return {s["name"]: s for s in (await resp.json())["streams"]}["cam0"]


async def until(predicate, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def run_of(clocks: list[int], encoded: list[int]) -> list[int]:
    """The frames ``encoded`` from the first of ``clocks`` to its last: what a viewer that missed none shows."""
    i, j = encoded.index(clocks[0]), encoded.index(clocks[-1])
    return encoded[i : j + 1]


@pytest.fixture
async def long_gop_relay():
    runner, relay = await start_relay(make_config(join="cached_gop", keyframe_interval=LONG_GOP))
    try:
        yield relay
    finally:
        await runner.cleanup()


async def watch_until_caught_up(relay: RunningRelay, viewer: WhepViewer, stop: asyncio.Event):
    """Connect ``viewer``, read its frames in a task, and return it once the relay says its catch-up is over."""
    await viewer.connect()
    watch = Watch(viewer)
    task = asyncio.create_task(watch.run(stop))
    track = session_of(relay, viewer).track
    await until(lambda: watch.error is not None or track.timing.catchups >= 1, "the viewer to catch up")
    assert watch.error is None, repr(watch.error)
    return watch, task, track


async def test_a_viewer_joining_mid_gop_starts_at_once_from_the_cache_and_misses_nothing(long_gop_relay, http):
    relay = long_gop_relay
    stream = relay.relay.streams["cam0"]
    stop = asyncio.Event()
    tasks: list[asyncio.Task] = []
    watcher, joiner = WhepViewer(relay.whep(), http), WhepViewer(relay.whep(), http)
    try:
        with EncodedFrames(stream) as encoded:
            watch, task, _ = await watch_until_caught_up(relay, watcher, stop)  # already watching
            tasks.append(task)
            await encoded.wait(len(encoded.clocks) + 30)  # a second further into the GOP
            entry = await stream_entry(http, relay)
            assert entry["join"] == "cached_gop"
            before = encoded.clocks  # every frame encoded before the joiner's offer
            watched_from = len(watch.clocks)
            join, task, track = await watch_until_caught_up(relay, joiner, stop)
            tasks.append(task)
            live_from = encoded.clocks[-1]  # encoded when the relay said the joiner was live
            await until(lambda: len([c for c in encoded.clocks if c > live_from]) >= LIVE_FRAMES, "live frames")
            last = [c for c in encoded.clocks if c > live_from][LIVE_FRAMES - 1]
            await until(lambda: join.error is not None or join.shown(last), "the joiner to show the live frames")
            await until(lambda: watch.error is not None or watch.shown(last), "the watcher to show them")
            after = await stream_entry(http, relay)
            clocks = encoded.clocks
            keyframes = encoded.keyframes
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await asyncio.gather(watcher.close(), joiner.close())
    assert join.error is None and watch.error is None, (join.error, watch.error)
    shown = join.clocks[: join.clocks.index(last) + 1]
    assert None not in shown, "every frame the joiner decoded has a valid pixel clock"
    # It started at once from the cached GOP: its first picture is the keyframe the GOP began with, encoded before
    # it joined; no keyframe was forced for it, and none came from the encoder before it was live.
    gop_start = max(k for k in keyframes if k <= before[-1])
    assert shown[0] == gop_start and shown[0] in before
    assert not [k for k in keyframes if gop_start < k <= last], "a keyframe came during the test: GOP too short"
    assert after["keyframes_forced"] == entry["keyframes_forced"]
    assert after["gop_cache"]["starts"] == entry["gop_cache"]["starts"] + 1
    # From that keyframe to a second of live video: every frame the relay encoded, once each, in order.
    assert shown == run_of(shown, clocks)
    assert len([c for c in shown if c not in before]) > LIVE_FRAMES  # it went on past the join, into live
    assert track.timing.catchups == 1 and track.subscription.dropped == 0
    # The viewer already watching lost nothing while the joiner caught up.
    watched = [c for c in watch.clocks[watched_from:] if c is not None and c <= last]
    assert watched == run_of(watched, clocks) and watched[-1] == last
    assert after["frames_dropped"]["viewer_lag"] == 0


@pytest.mark.parametrize("pushed", [False, True], ids=["send_loop", "pushed"])
async def test_a_viewer_that_falls_behind_resyncs_from_the_cache_and_misses_nothing(long_gop_relay, http, pushed):
    """A stall's frames reach the hub together; whether the viewer was sent its live frames from the hub's publish
    (pushed) or through its send loop, the burst fills its queue, and it reads on from the cache, missing nothing;
    a pushed viewer is pushed again once it has caught up."""
    relay = long_gop_relay
    stream = relay.relay.streams["cam0"]
    stream.hub.max_lag = SHORT_LAG  # for the viewer subscribing below
    stop = asyncio.Event()
    tasks: list[asyncio.Task] = []
    viewer = WhepViewer(relay.whep(), http)
    try:
        with EncodedFrames(stream) as encoded:
            watch, task, track = await watch_until_caught_up(relay, viewer, stop)
            tasks.append(task)
            if not pushed:
                track.push_to(None)
            entry = await stream_entry(http, relay)
            resyncs, deadline = track.subscription.resyncs, time.monotonic() + DEADLINE
            while track.subscription.resyncs == resyncs:
                assert time.monotonic() < deadline, "the viewer never fell behind"
                # Stall the event loop (the relay's and the viewer's): the worker's frames wait in the pipe, then
                # reach the hub together, more than a viewer's queue holds.
                time.sleep(STALL)
                await encoded.wait(len(encoded.clocks) + 15)
            await until(lambda: track.timing.catchups >= 2, "the viewer to catch up again")
            pushes = track.pushed
            last = (await encoded.wait(len(encoded.clocks) + LIVE_FRAMES))[-1]
            await until(lambda: watch.error is not None or watch.shown(last), "the viewer to show live frames")
            after = await stream_entry(http, relay)
            clocks = encoded.clocks
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await viewer.close()
    assert watch.error is None, repr(watch.error)
    shown = watch.clocks[: watch.clocks.index(last) + 1]
    assert None not in shown
    assert shown == run_of(shown, clocks), "no frame lost or repeated across the resync"
    assert after["frames_dropped"]["viewer_lag"] == 0 and after["keyframes_forced"] == entry["keyframes_forced"]
    assert after["gop_cache"]["starts"] > entry["gop_cache"]["starts"]
    assert (track.pushed > pushes) == pushed  # live again: pushed, unless push was turned off


INBOUND = """async () => {
  let out = null;
  (await window.camrelayPlayer.pc.getStats()).forEach((r) => {
    if (r.type === "inbound-rtp" && r.kind === "video") out = r;
  });
  return out;
}"""


@pytest.mark.browser
async def test_chromium_joining_mid_gop_starts_from_the_cache_and_plays_on_into_live(long_gop_relay, http):
    relay = long_gop_relay
    stream = relay.relay.streams["cam0"]
    with EncodedFrames(stream) as encoded:
        await encoded.wait(len(encoded.clocks) + 45)  # a second and a half into the GOP
        entry = await stream_entry(http, relay)
        before = encoded.clocks
        async with chromium() as browser:
            page = await browser.new_page()
            locations: list[str] = []
            page.on("response", lambda r: locations.append(r.headers.get("location", "")) if r.status == 201 else None)
            await page.add_init_script(as_script(PRESENTED))  # every frame it presents, from the first one on
            await page.goto(f"{relay.base}/view/cam0")
            await until(lambda: bool(locations), "the page's WHEP session")
            session = relay.relay.sessions.get(locations[0].rsplit("/", 1)[1])
            assert session is not None
            await until(lambda: session.track.timing.catchups >= 1, "the page to catch up")
            live_from = encoded.clocks[-1]  # encoded when the relay said the page was live
            await until(lambda: len([c for c in encoded.clocks if c > live_from]) >= LIVE_FRAMES, "live frames")
            last = [c for c in encoded.clocks if c > live_from][LIVE_FRAMES - 1]
            await page.wait_for_function(f"() => {READABLE}.some((p) => p[1] >= {last})", timeout=DEADLINE * 1000)
            presented = await presented_clocks(page)
            inbound = await page.evaluate(INBOUND)
            connects = await page.evaluate("() => window.camrelayPlayer.connects")
            after = await stream_entry(http, relay)
            clocks, keyframes = encoded.clocks, encoded.keyframes
    gop_start = max(k for k in keyframes if k <= before[-1])
    # Its first picture came from the cached GOP: a frame encoded before it joined, not a keyframe made for it.
    assert gop_start <= presented[0] <= before[-1], (gop_start, presented[0], before[-1])
    assert not [k for k in keyframes if gop_start < k <= last], "a keyframe came during the test: GOP too short"
    assert after["keyframes_forced"] == entry["keyframes_forced"] and connects == 1
    assert after["gop_cache"]["starts"] == entry["gop_cache"]["starts"] + 1
    # Chromium decoded the cached keyframe and every frame after it, asking for no other (no PLI), and showed
    # only frames the relay encoded, in order, on into those encoded after the catch-up.
    assert inbound["keyFramesDecoded"] == 1 and inbound["pliCount"] == 0, inbound
    assert inbound["framesDropped"] == 0, inbound
    assert set(presented) <= set(clocks) and presented == sorted(presented)  # (a frame may be read twice)
    assert presented[-1] >= last


# -- the join benchmark (benchmarks/join.py): its rules with plain values, and a short run so it cannot rot


def test_back_to_live_is_the_first_frame_of_a_run_within_reach_of_the_watcher():
    # (ms behind the watcher, when the joiner got the frame): a catch-up, a frame in reach, a late one, then live.
    deltas = [(900.0, 1.0), (400.0, 1.1), (3.0, 1.2), (40.0, 1.3), (2.0, 1.4), (4.0, 1.5), (1.0, 1.6), (9.0, 1.7)]
    assert join_benchmark.back_to_live(deltas, within_ms=5.0, run=4) == (1.2, 2)  # median of 3, 40, 2, 4 is 3.5
    assert join_benchmark.back_to_live(deltas[:5], within_ms=5.0, run=4) == (None, 2)  # no whole run yet
    assert join_benchmark.back_to_live(deltas, within_ms=5.0, run=4, start=3) == (1.4, 4)


def test_first_second_counts_from_the_first_bytes():
    samples = [(10.0, 0), (10.25, 1000), (10.5, 5000), (11.25, 9000), (11.5, 12000)]
    assert join_benchmark.first_second(samples) == 9000
    assert join_benchmark.first_second([(1.0, 0)]) == 0


def test_join_benchmark_smoke(tmp_path):
    out = tmp_path / "join"
    cmd = [sys.executable, "-m", "benchmarks.join", "--repeats", "1", "--gops", "1", "--size", "640x360",
           "--fps", "15", "--bitrate", "500k", "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    cases = {c["policy"]: c for c in json.loads(out.with_suffix(".json").read_text())["cases"]}
    assert set(cases) == {"keyframe", "cached_gop"}
    for case in cases.values():  # every figure is there; what they are is for a full run to say
        (join,) = case["joins"]
        assert join["first_frame_ms"] is not None and join["first_second_bytes"] > 0, case
    assert cases["cached_gop"]["keyframes_forced"] == 0 and cases["keyframe"]["keyframes_forced"] >= 1
