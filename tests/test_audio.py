"""Sound end to end: the test pattern's bursts from its worker, through the relay, to real aiortc viewers.

Judged by what a listener can check: the bursts heard one a second with no
second missed and every tenth at 2 kHz (a slip of a second would put a 1 kHz
burst where a 2 kHz one belongs), their onsets on the capture clock, the
counters of the API; never by how long anything took.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import av

from benchmarks.bursts import WINDOW, BurstReader, Onset, consecutive, lip_sync
from benchmarks.lipsync import AvProbe
from relay.camera.testsound import RATE
from relay.config import StreamConfig
from relay.source import SourceSpec
from relay.webrtc import rtpsend
from relay.webrtc.whepclient import FrameSample, WhepViewer

from .conftest import EncodedFrames, RunningRelay, capture_ms, make_config, session_of, start_relay
from .test_players import audio_mid, sections

DEADLINE = 40.0  # seconds a test waits for what it counts: a guard, not a measurement
CAUGHT_UP_PICTURES = 90  # 3 s of pictures: a shared keyframe's catch-up (0.5 s of frames at 4x) is long over
BURSTS = 11  # one a second: eleven in a row hold a tenth (k % 10 == 0) wherever they start
SDPFRAG = {"Content-Type": "application/trickle-ice-sdpfrag"}
QUIET = (StreamConfig("cam0", SourceSpec("test", "", audio="off")),)


async def api_audio(http: aiohttp.ClientSession, base: str) -> dict:
    async with http.get(base + "/api/v1/streams") as resp:
        assert resp.status == 200
        return (await resp.json())["streams"][0]["audio"]


async def test_a_viewer_offering_audio_hears_a_burst_each_second_every_tenth_at_2_khz_beside_the_video(http):
    runner, relay = await start_relay(make_config())
    viewer = WhepViewer(relay.whep(), http, audio=True)
    video: list[FrameSample] = []

    async def watch() -> None:
        while True:
            video.extend(await viewer.read_frames(1))

    try:
        before = await api_audio(http, relay.base)
        with EncodedFrames(relay.relay.streams["cam0"]) as encoded:
            await viewer.connect()
            assert viewer.answer is not None
            opus = next(s for s in sections(viewer.answer) if s[0].startswith("m=audio"))
            assert opus[0].split()[1] != "0" and "a=sendonly" in opus and any("opus/48000/2" in x for x in opus)
            watching = asyncio.create_task(watch())
            reader, onsets = BurstReader(), []
            try:
                deadline = time.monotonic() + DEADLINE
                while len(consecutive(onsets)) < BURSTS:
                    assert time.monotonic() < deadline, f"bursts heard: {[(o.k, round(o.hz)) for o in onsets]}"
                    onsets += reader.feed(*await viewer.recv_audio())
            finally:
                watching.cancel()
                await asyncio.gather(watching, return_exceptions=True)
            run = consecutive(onsets)
            assert [o.k % 10 == 0 for o in run] == [o.tenth for o in run], [(o.k, round(o.hz)) for o in run]
            assert any(o.tenth for o in run) and not any(o.slipped for o in run)
            # Its latency and lip sync read per the spec, against frames the relay encoded.
            assert set(capture_ms(s) for s in video) <= set(encoded.clocks)
            synced = lip_sync(run, [(s.received, s.latency_ms) for s in video if s.latency_ms is not None])
            assert synced, "no video received beside the bursts"
            if rtpsend.C_BATCH:  # the Opus packets went out in the stream's one C call a packet, the video's too
                senders = {t.kind: t.sender for t in session_of(relay, viewer).pc.getTransceivers()}
                assert all(rtpsend.lane_of(senders[kind]).frames > 0 for kind in ("audio", "video"))
        after = await api_audio(http, relay.base)
    finally:
        await viewer.close()
        await runner.cleanup()
    assert (after["source"], after["state"], after["codec"], after["channels"]) == ("test sound", "live", "opus", 1)
    assert after["frames"] >= before["frames"] + (BURSTS - 1) * 50  # the seconds between the first and last burst
    assert after["frames_captured"] > before["frames_captured"] and after["source_errors"] == 0
    assert set(after["frames_dropped"]) == {"overrun", "viewer_lag"}


async def test_the_bursts_start_on_the_whole_seconds_of_the_capture_clock_the_pixels_show():
    """The stream's own Opus packets, decoded: each burst begins at the sample whose pts is its second, the pts of
    a packet being its capture time in 48 kHz samples of the wall clock (the clock the pixel clock draws)."""
    runner, relay = await start_relay(make_config())
    stream = relay.relay.streams["cam0"]
    tap = stream.audio.subscribe("test-tap", max_frames=10_000)
    decoder = av.CodecContext.create("libopus", "r")
    decoder.sample_rate, decoder.layout, decoder.format = RATE, "mono", "s16"
    reader, onsets, first = BurstReader(), [], None
    try:
        deadline = time.monotonic() + DEADLINE
        while len(onsets) < 2:
            assert time.monotonic() < deadline, f"{len(onsets)} bursts in the stream's sound"
            packet = await tap.get()
            assert packet.capture_time == packet.pts / RATE and packet.keyframe
            if first is None:
                first = packet.pts
            assert packet.pts == first + reader.samples  # one run: no gap, no overlap
            for frame in decoder.decode(av.Packet(packet.data)):
                onsets += reader.feed(0.0, frame.to_ndarray().reshape(-1))
    finally:
        tap.close()
        await runner.cleanup()
    assert first is not None
    for onset in onsets:  # the crossing window is within a window of the burst's first sample
        at = first + onset.sample
        second = round(at / RATE)
        assert abs(at - second * RATE) < WINDOW, (at, second)
        assert not Onset(second, 0, onset.hz).slipped  # and it is the tone that second's burst has


async def test_sender_reports_map_the_audio_and_the_video_onto_the_capture_clock(http):
    """What a browser's lip sync rests on: each RTCP sender report pairs an RTP timestamp with the capture time it
    stands for, for the video (read against each picture's pixel clock) and the audio (against each burst's
    first sample, captured at its whole second) alike; a report stamped when it was sent was a pipeline's delay
    off (5 to 30 ms), and a different one for each."""
    runner, relay = await start_relay(make_config())
    probe = AvProbe(relay.whep(), http)
    heard = probe.heard
    try:
        await probe.connect()
        deadline = time.monotonic() + DEADLINE
        # A joiner within the share window starts from the latest keyframe, its cached frames restamped onto the
        # live clock as they catch up (relay/webrtc/catchup.py): a report sent then pairs that timeline, not the
        # capture clock. Reports are read once it is live: the catch-up is at most the window's frames.
        while probe.pictures < CAUGHT_UP_PICTURES:
            assert time.monotonic() < deadline, probe.pictures
            await asyncio.sleep(0.1)
        probe.measuring = True
        while len(heard.audio_report_error_ms) < 3 or len(heard.video_report_error_ms) < 30:
            assert time.monotonic() < deadline, (heard.audio_report_error_ms, len(heard.video_report_error_ms))
            await asyncio.sleep(0.1)
    finally:
        await probe.close()
        await runner.cleanup()
    # A pixel clock is its capture time in whole milliseconds (truncated); the RTP timestamp, in 90 kHz ticks.
    assert all(-0.1 <= e <= 1.1 for e in heard.video_report_error_ms), heard.video_report_error_ms
    # The first sample above a tenth of the tone comes 0.5 to 0.8 ms into its burst (the fade in).
    assert all(0.4 <= e <= 1.0 for e in heard.audio_report_error_ms), heard.audio_report_error_ms
    assert not any(o.slipped for o in heard.onsets)


async def connect_and_play(relay: RunningRelay, viewer: WhepViewer) -> None:
    """The viewer connects and plays frames the relay encoded."""
    with EncodedFrames(relay.relay.streams["cam0"]) as encoded:
        await viewer.connect()
        clocks = [capture_ms(s) for s in await viewer.read_frames(10)]
        assert None not in clocks and set(clocks) <= set(encoded.clocks)
    assert viewer.answer is not None


async def test_an_offer_without_audio_gets_the_video_alone(http):
    runner, relay = await start_relay(make_config())
    viewer = WhepViewer(relay.whep(), http)  # video only, as camrelay's page offers
    try:
        await connect_and_play(relay, viewer)
        assert [s[0].split()[0] for s in sections(viewer.answer)] == ["m=video"]
        session = session_of(relay, viewer)
        assert [t.kind for t in session.pc.getTransceivers()] == ["video"] and session.audio is None
        assert relay.relay.streams["cam0"].audio.subscribers == []  # nothing listens to its sound
    finally:
        await viewer.close()
        await runner.cleanup()


async def test_a_stream_without_sound_answers_an_offer_with_audio_with_the_video_alone(http):
    runner, relay = await start_relay(make_config(QUIET))
    viewer = WhepViewer(relay.whep(), http, audio=True)
    try:
        await connect_and_play(relay, viewer)
        audio = next(s for s in sections(viewer.answer) if s[0].startswith("m=audio"))
        assert audio[0].split()[1] == "0" and "a=inactive" in audio  # rejected
        assert viewer.audio_track is None
        assert [t.kind for t in session_of(relay, viewer).pc.getTransceivers()] == ["video"]
        sound = await api_audio(http, relay.base)
        assert (sound["state"], sound["source"], sound["frames"], sound["frames_captured"]) == ("off", "", 0, 0)
    finally:
        await viewer.close()
        await runner.cleanup()


def trickling(kind: str, sdp: str) -> str:
    """aiortc's offer as a trickling browser's: more candidates may come (no end-of-candidates)."""
    return sdp.replace("a=end-of-candidates\r\n", "") if kind == "offer" else sdp


async def test_candidates_trickled_under_the_audio_sections_mid_reach_the_sessions_ice(http):
    runner, relay = await start_relay(make_config())
    viewer = WhepViewer(relay.whep(), http, audio=True, rewrite_sdp=trickling)
    try:
        await viewer.connect()
        offer = viewer.pc.localDescription.sdp
        mid = audio_mid(offer)
        assert mid is not None
        ice = session_of(relay, viewer).pc.getTransceivers()[0].sender.transport.transport
        for port, under in ((7, mid), (8, "9")):  # the audio's mid, and one the offer never had
            fragment = "\r\n".join([f"a=mid:{under}", f"a=candidate:1 1 udp 2113937151 127.0.0.1 {port} typ host"])
            async with http.patch(viewer.location, data=fragment + "\r\n", headers=SDPFRAG) as resp:
                assert resp.status == 204
        ports = {c.port for c in ice.getRemoteCandidates()}
        assert 7 in ports and 8 not in ports
        async with http.patch(viewer.location, data="a=end-of-candidates\r\n", headers=SDPFRAG) as resp:
            assert resp.status == 204  # ICE may finish: nothing of it is left running once the session ends
        await viewer.read_frames(1)
    finally:
        await viewer.close()
        await runner.cleanup()
