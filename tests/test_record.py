"""Recording: fragmented MP4 segments and snapshots, crash safety, retention, a full disk."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import shutil
import time
from pathlib import Path

import av
import pytest

from relay.camera import pixelclock
from relay.record import LATEST_IMAGE, LATEST_VIDEO, Retention, Segment, files_to_delete, parse_utc_name, utc_name
from relay.webrtc.whepclient import WhepViewer, luma

from .conftest import make_config, start_relay

SEGMENT = 2.0
FPS = 15
VIDEO_TRACK = 1  # the video's track_ID in a segment (the sound, when the stream has it, is 2)


def recording_config(tmp_path: Path, **record):
    config = make_config(fps=FPS)
    record = {"segment": SEGMENT, **record}
    rc = dataclasses.replace(config.record, enabled=True, root=str(tmp_path / "rec"), **record)
    return dataclasses.replace(config, record=rc)


async def wait_for(predicate, timeout=20.0, what=""):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out: {what}"
        await asyncio.sleep(0.05)


def decode_all(path: Path, torn: bool = False, keyframes: bool = False) -> list[tuple]:
    """(pts in seconds, pixel clock) for every frame, and with ``keyframes`` whether it is one; ``torn``: stop
    quietly where a cut-off file ends."""
    out = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        try:
            for frame in container.decode(stream):
                clock = pixelclock.read(luma(frame, frame.width // 48))
                pts = float(frame.pts * stream.time_base)
                out.append((pts, clock, frame.key_frame) if keyframes else (pts, clock))
        except av.error.InvalidDataError:
            if not torn:
                raise
    return out


def fragment_frames(data: bytes) -> list[int]:
    """The video frames of each complete movie fragment (a ``moof`` and its ``mdat``, both whole) in the bytes of a
    fragmented MP4, however it was cut off: what a player can play of it for sure."""

    def boxes(start: int, end: int):
        while start + 8 <= end:
            size, kind = int.from_bytes(data[start : start + 4], "big"), data[start + 4 : start + 8]
            if size < 8 or start + size > end:
                return  # torn here
            yield kind, start + 8, start + size
            start += size

    out, frames = [], None
    for kind, body, end in boxes(0, len(data)):
        if kind == b"moof":
            frames = 0
            for traf, traf_end in ((b, e) for k, b, e in boxes(body, end) if k == b"traf"):
                parts = {k: b for k, b, _ in boxes(traf, traf_end)}
                if int.from_bytes(data[parts[b"tfhd"] + 4 : parts[b"tfhd"] + 8], "big") == VIDEO_TRACK:
                    frames += int.from_bytes(data[parts[b"trun"] + 4 : parts[b"trun"] + 8], "big")  # its samples
        elif kind == b"mdat" and frames is not None:
            out.append(frames)
            frames = None
    return out


def test_names_carry_utc_time_to_the_millisecond():
    t = 1795312692.345
    assert utc_name(t) == "20261122T015812.345Z"
    assert parse_utc_name(utc_name(t) + ".mp4") == pytest.approx(t, abs=0.001)
    assert parse_utc_name("notes.txt") is None
    assert (
        parse_utc_name(utc_name(t) + ".mp4.part") == parse_utc_name(utc_name(t) + ".jpg") == pytest.approx(t, abs=1e-3)
    )
    for bad in ("20261322T015812.345Z.mp4", "20260230T015812.345Z.mp4", "20261122T245812.345Z.mp4", "2026112T0.mp4"):
        assert parse_utc_name(bad) is None, bad


def test_retention_deletes_oldest_first_until_the_rest_fit():
    files = [(Path(f"f{i}"), 1000.0 + i, 100) for i in range(10)]
    assert files_to_delete(files, Retention(max_bytes=750, max_age=0), now=2000) == [Path("f0"), Path("f1"), Path("f2")]
    assert files_to_delete(files, Retention(max_bytes=0, max_age=995.5), now=2000) == [Path(f"f{i}") for i in range(5)]
    assert files_to_delete(files, Retention(0, 0), now=2000) == []


async def test_segments_and_snapshots_are_recorded(tmp_path, http):
    runner, relay = await start_relay(recording_config(tmp_path))
    recorder = relay.relay.recorders["cam0"]
    try:
        await wait_for(lambda: recorder.segments_written >= 3 and recorder.snapshots_written >= 3, what="3 segments")
        async with http.get(relay.base + "/api/v1/recordings/cam0") as resp:
            listing = await resp.json()
        async with http.get(relay.base + listing["segments"][0]["url"]) as resp:
            assert resp.status == 200 and len(await resp.read()) == listing["segments"][0]["bytes"]
            assert resp.headers["Cache-Control"] == "private, max-age=3600"  # no shared cache keeps it for others
        async with http.get(relay.base + listing["latest_image"]) as resp:
            assert resp.status == 200 and (await resp.read())[:2] == b"\xff\xd8"
            assert resp.headers["Cache-Control"] == "no-store"
        async with http.get(relay.base + "/recordings/cam0/../../etc/passwd") as resp:
            assert resp.status == 404
        async with http.get(relay.base + "/recordings/cam0") as resp:
            page = await resp.text()
        assert resp.status == 200 and listing["segments"][0]["url"] in page and listing["snapshots"][0]["url"] in page
    finally:
        await runner.cleanup()
    segments, snapshots = recorder.listing()
    assert len(segments) >= 3 and len(snapshots) >= 3
    assert recorder.retention_passes == 0  # no limit set: it keeps everything, and reads no tree for it
    decoded = [decode_all(path, keyframes=True) for path, _, _ in segments]
    for (path, start, _), frames in zip(segments, decoded, strict=True):
        assert path.parent.name == time.strftime("%Y-%m-%d", time.gmtime(start))  # a folder per day
        assert frames, path
        clocks = [c for _, c, _ in frames]
        assert None not in clocks and clocks == sorted(clocks)
        assert clocks[0] == round(start * 1000), (path, clocks[0])  # the name's time is the first picture's
        assert frames[0][2], f"{path.name} starts with a keyframe"
    # Each segment but the last (cut short by the shutdown) ends at the first keyframe captured SEGMENT or more
    # after its start (by the capture times the pictures carry), where the next begins: time goes on across them.
    # (The clocks are whole milliseconds: a keyframe 2000 ms on may be 1.9995 s on, so the bounds allow 1 ms.)
    segment_ms = SEGMENT * 1000
    for frames, following in zip(decoded, decoded[1:], strict=False):
        start = frames[0][1]
        late = [c - start for _, c, key in frames[1:] if key and c - start > segment_ms]
        assert not late, f"kept keyframes {late} ms after the segment's start"
        assert following[0][1] - start >= segment_ms - 1 and following[0][1] > frames[-1][1]
    assert (recorder.dir / LATEST_VIDEO).resolve() in [p.resolve() for p, _, _ in segments]
    assert (recorder.dir / LATEST_IMAGE).resolve() == snapshots[-1][0].resolve()
    assert not list(recorder.dir.glob("*/*.part"))  # a clean shutdown leaves only complete files
    # As private as the token file: the group may read, other local accounts may not.
    root = tmp_path / "rec"
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            assert path.stat().st_mode & 0o777 == (0o750 if path.is_dir() else 0o640), path


async def test_a_segment_cut_off_mid_write_plays_up_to_its_last_fragment(tmp_path):
    # Segments long enough that a .part holds two fragments (one a second) before it is finished.
    runner, relay = await start_relay(recording_config(tmp_path, snapshot_interval=0.0, segment=10 * SEGMENT))
    recorder = relay.relay.recorders["cam0"]
    try:
        await wait_for(lambda: list(recorder.dir.glob("*/*.mp4.part")), what="a segment being written")
        part = next(recorder.dir.glob("*/*.mp4.part"))
        await wait_for(lambda: len(fragment_frames(part.read_bytes())) >= 2, what="two fragments written")
        cut = tmp_path / "cut.mp4"
        shutil.copyfile(part, cut)  # the file exactly as a power cut would leave it
    finally:
        await runner.cleanup()
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) - 1000])  # and torn inside its last write, too
    frames = decode_all(cut, torn=True)
    complete = fragment_frames(cut.read_bytes())
    assert complete and len(frames) >= sum(complete), "plays up to its last complete fragment"
    assert all(c is not None for _, c in frames)
    # A .part left by a crash is renamed complete when recording starts again.
    leftover = recorder.dir / "2026-01-01" / "20260101T000000.000Z.mp4.part"
    leftover.parent.mkdir(parents=True)
    shutil.copyfile(cut, leftover)
    recorder.recover()
    assert (leftover.parent / "20260101T000000.000Z.mp4").exists() and not leftover.exists()


def make_segment_part(tmp_path: Path, frames: int) -> bytes:
    """The bytes of a ``.part`` as a crash leaves it: ``frames`` frames written (0: cut before any),
    a keyframe every 10 (each starts a fragment, so the first 10 are in a complete one from the 11th on)."""
    from relay.camera.encode import EncoderSettings, H264Encoder
    from relay.hub import EncodedFrame

    encoder = H264Encoder(EncoderSettings(1_000_000, FPS, 1.0, "libx264"))
    picture = av.VideoFrame(320, 240, "yuv420p")
    units = [encoder.encode(picture, i * 6000, i % 10 == 0)[0] for i in range(max(1, frames))]
    first = EncodedFrame(units[0][0], units[0][2], True, 1.0)
    segment = Segment(tmp_path / "made" / "x.mp4", first, FPS)
    for data, keyframe, pts in units[:frames]:
        segment.write(EncodedFrame(data, pts, keyframe, 1.0))
    data = segment.part.read_bytes()  # before close: exactly what a power cut leaves
    segment.abort()
    return data


def test_a_segment_cut_before_its_first_frame_is_removed_not_recovered(tmp_path):
    from relay.record import Recorder, has_fragment

    recorder = Recorder("cam0", None, None, tmp_path / "rec", FPS, 5.0, 0.0, Retention(0, 0))
    day = recorder.dir / "2026-01-01"
    day.mkdir(parents=True)
    empty, played = day / "20260101T000000.000Z.mp4.part", day / "20260101T000005.000Z.mp4.part"
    empty.write_bytes(make_segment_part(tmp_path, 0))
    played.write_bytes(make_segment_part(tmp_path, 12))
    assert not has_fragment(empty) and has_fragment(played)
    recorder.recover()
    assert sorted(p.name for p in day.iterdir()) == ["20260101T000005.000Z.mp4"]
    assert len(decode_all(day / "20260101T000005.000Z.mp4", torn=True)) == 10


def test_retention_and_recovery_never_follow_a_symlink_out_of_the_recordings(tmp_path):
    from relay.record import Recorder

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    victims = [outside / "20200101T000000.000Z.mp4", outside / "20200101T000001.000Z.mp4.part"]
    (outside / "snapshots").mkdir()
    victims.append(outside / "snapshots" / "20200101T000000.000Z.jpg")
    for victim in victims:
        victim.write_bytes(b"not yours")
    recorder = Recorder("cam0", None, None, tmp_path / "rec", FPS, 5.0, 0.0, Retention(1, 60.0))
    recorder.dir.mkdir(parents=True)
    (recorder.dir / "2020-01-01").symlink_to(outside, target_is_directory=True)  # another local user's doing
    real_day = recorder.dir / "2020-01-02"
    real_day.mkdir()
    (real_day / "20200102T000000.000Z.mp4").write_bytes(b"old")
    (real_day / "20200102T000001.000Z.mp4").symlink_to(victims[0])
    recorder.recover()
    assert recorder.listing() == ([(real_day / "20200102T000000.000Z.mp4", 1577923200.0, 3)], [])
    recorder.enforce_retention()
    assert all(v.read_bytes() == b"not yours" for v in victims)
    assert not (real_day / "20200102T000000.000Z.mp4").exists()  # what is really ours still goes


class FullDisk(Segment):
    """A segment whose writes fail with ENOSPC while ``FullDisk.full`` is set."""

    full = False

    def write(self, frame):
        if FullDisk.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        super().write(frame)


async def test_a_full_disk_pauses_recording_and_viewers_keep_their_frame_rate(tmp_path, http, monkeypatch):
    import relay.record as record

    monkeypatch.setattr(record, "DISK_RETRY_INTERVAL", 0.2)
    runner, relay = await start_relay(recording_config(tmp_path, snapshot_interval=0.0))
    recorder = relay.relay.recorders["cam0"]
    recorder.open_segment = FullDisk
    stream = relay.relay.streams["cam0"]
    viewer = WhepViewer(relay.whep(), http)
    space = {"free": 10**9}
    monkeypatch.setattr(recorder, "space_left", lambda: space["free"])
    try:
        await viewer.connect()
        await wait_for(lambda: recorder.segments_written >= 1, what="recording")
        FullDisk.full, space["free"] = True, 0
        await wait_for(lambda: recorder.paused, what="recording paused")
        encoded0 = stream.stats.frames_encoded
        got = len(await viewer.read_frames(2 * FPS, clock=False))
        assert got >= stream.stats.frames_encoded - encoded0 - 3  # live video unaffected
        assert recorder.paused
        FullDisk.full, space["free"] = False, 10**9
        written = recorder.segments_written
        await wait_for(lambda: not recorder.paused and recorder.segments_written > written, what="recording resumed")
    finally:
        FullDisk.full = False
        await viewer.close()
        await runner.cleanup()
    segments, _ = recorder.listing()
    for path, _, _ in segments:
        assert decode_all(path), f"{path.name} is corrupt"  # nothing already recorded was damaged


async def test_a_disk_that_fails_otherwise_is_retried_ever_later_with_few_lines_and_no_empty_parts(
    tmp_path, monkeypatch, caplog
):
    """A disk gone read-only (a failing SD card): each new segment fails as it opens. The recorder tries again after
    a delay that doubles to its cap (each try subscribes anew and so asks the camera for a keyframe: once a second,
    forever, before), says so at the first failure and then once per try at the cap, and leaves no empty .part."""
    import relay.record as record

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(record, "FAILED_RETRY_FIRST", 0.01)
    monkeypatch.setattr(record, "FAILED_RETRY_MAX", 0.16)  # tries 1..5 after 0.01, 0.02, 0.04, 0.08, then 0.16
    monkeypatch.setattr(record.mux, "add_h264_stream", read_only)  # after the .part was made, as a real disk fails
    caplog.set_level(logging.ERROR, logger="relay.record")
    runner, relay = await start_relay(recording_config(tmp_path, snapshot_interval=0.0))
    recorder = relay.relay.recorders["cam0"]
    try:
        await wait_for(lambda: recorder.failures >= 6, what="six failed segments")
        failures, lines = recorder.failures, [r.getMessage() for r in caplog.records if "recording failed" in r.msg]
    finally:
        await runner.cleanup()
    assert len(lines) == 1 + (failures - 4)  # the first, then each from the fifth (its delay at the cap)
    assert "Read-only file system" in lines[0] and lines[0].endswith("trying again in 0s")
    assert lines[1].endswith("(3 more since the last line); trying again in 0s")  # tries 2 to 4 unsaid
    assert recorder.segments_written == 0 and list(tmp_path.rglob("*.part")) == []


async def test_listings_asked_for_together_read_the_tree_once(tmp_path):
    """The recordings API reads a stream's whole tree: requests that come while one is read share it, so a viewer
    asking in a loop costs one read at a time; the next request after it reads anew."""
    runner, relay = await start_relay(recording_config(tmp_path, snapshot_interval=0.0))
    recorder = relay.relay.recorders["cam0"]
    reads = []
    real = recorder.listing

    def counted():
        reads.append(1)
        return real()

    recorder.listing = counted
    try:
        results = await asyncio.gather(*(recorder.shared_listing() for _ in range(10)))
        assert len(reads) == 1 and all(r == results[0] for r in results)
        await recorder.shared_listing()
        assert len(reads) == 2
    finally:
        await runner.cleanup()


async def test_retention_keeps_a_stream_under_its_size_limit(tmp_path, http, monkeypatch):
    from prometheus_client.parser import text_string_to_metric_families

    import relay.record as record

    monkeypatch.setattr(record, "RETENTION_EVERY", 0.0)  # a pass after every segment, not once a minute

    limit = 400_000
    runner, relay = await start_relay(recording_config(tmp_path, snapshot_interval=0.0, max_size=limit, segment=0.5))
    recorder = relay.relay.recorders["cam0"]
    try:
        await wait_for(lambda: recorder.deleted >= 3, what="retention deleting old segments")
        # passes run beside the recording, after each segment here: right after one, what is kept fits
        await wait_for(lambda: sum(size for _, _, size in recorder.listing()[0]) <= limit, what="under the limit")
        segments, _ = recorder.listing()
        assert segments[-1][1] > segments[0][1]  # the newest are kept
        async with http.get(relay.base + "/metrics") as resp:
            families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
        assert families["camrelay_recording_deleted"].samples[0].value >= 3
        assert families["camrelay_recording_paused"].samples[0].value == 0
    finally:
        await runner.cleanup()


async def test_a_stream_with_sound_records_its_opus_beside_the_picture_in_sync(tmp_path):
    from benchmarks.bursts import WINDOW, file_sync_ms
    from relay.camera.testsound import RATE

    from .test_rtsp import read_sound_and_picture

    runner, relay = await start_relay(recording_config(tmp_path, snapshot_interval=0.0))
    recorder = relay.relay.recorders["cam0"]
    try:
        await wait_for(lambda: recorder.segments_written >= 3, timeout=40.0, what="3 segments")
    finally:
        await runner.cleanup()
    segments = [path for path, _, _ in recorder.listing()[0]]
    # Every segment opened once the first Opus packet was in has the sound: all but perhaps the first.
    with_sound = []
    for path in segments:
        with av.open(str(path)) as container:
            kinds = [(s.type, s.codec_context.name) for s in container.streams]
        assert kinds in ([("video", "h264")], [("video", "h264"), ("audio", "opus")]), (path, kinds)
        if len(kinds) == 2:
            with_sound.append(path)
    assert len(with_sound) >= len(segments) - 1 >= 2, segments
    # The bursts are in them, each where the picture at the same time says its second starts: within a frame
    # (and the reader's 10 ms window), read from the file alone.
    sync = []
    for path in with_sound:
        heard = read_sound_and_picture(str(path), bursts=10**6)
        sync += [file_sync_ms(t, heard.video) for t, _ in heard.onsets]
    assert len(sync) >= 2, sync
    assert all(s is not None and abs(s) <= 1000 / FPS + 1000 * WINDOW / RATE for s in sync), sync
    assert recorder.audio_dropped == 0
