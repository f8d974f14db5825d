"""The relay <-> worker pipe, with plain bytes."""

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from relay import ipc
from relay.aio import PipeMessages
from relay.ipc import EncoderSettings
from relay.source import SourceSpec
from relay.stream import Stream

ROOT = Path(__file__).resolve().parent.parent


def test_messages_round_trip_across_arbitrary_read_boundaries():
    stream = (
        ipc.pack(
            ipc.UNIT, b"\x00\x00\x00\x01\x65abc", flags=ipc.FLAG_KEYFRAME | ipc.FLAG_FORCED, pts=9000, capture_time=1.5
        )
        + ipc.pack_json(ipc.STATUS, {"state": "live"})
        + ipc.pack(ipc.JPEG, b"\xff\xd8\xff\xd9", capture_time=2.0)
    )
    for cut in range(len(stream) + 1):
        first, rest = ipc.parse(stream[:cut])
        second, left = ipc.parse(rest + stream[cut:])
        messages = first + second
        assert left == b""
        assert [m.kind for m in messages] == [ipc.UNIT, ipc.STATUS, ipc.JPEG]
    unit, status, jpeg = messages
    assert unit.keyframe and unit.forced and unit.pts == 9000 and unit.capture_time == 1.5
    assert status.json() == {"state": "live"}
    assert jpeg.payload == b"\xff\xd8\xff\xd9" and not jpeg.keyframe


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (ipc.HEADER.pack(9, 0, 0, 0, 0.0, 0), "unknown message type 9"),
        (ipc.HEADER.pack(ipc.UNIT, 0, 0, 0, 0.0, ipc.MAX_PAYLOAD + 1), "over its"),
        (ipc.HEADER.pack(ipc.AUDIO, 0, 0, 0, 0.0, ipc.MAX_AUDIO_PAYLOAD + 1), "type 5 of 1401 bytes is over its"),
        (ipc.HEADER.pack(ipc.LOG, 0, 0, 0, 0.0, (1 << 20) + 1), "over its"),
        (ipc.HEADER.pack(ipc.STATUS, 0, 0, 0, 0.0, (1 << 20) + 1), "over its"),
        (ipc.HEADER.pack(ipc.UNIT, 0, 0, 2**63 - 1, 0.0, 5), "pts 9223372036854775807 is out of range"),
        (ipc.HEADER.pack(ipc.AUDIO, 0, 0, -(2**61), 0.0, 5), "pts .* is out of range"),
        (ipc.HEADER.pack(ipc.UNIT, 0, 0, 0, float("nan"), 5), "capture time nan is out of range"),
        (ipc.HEADER.pack(ipc.UNIT, 0, 0, 0, float("inf"), 5), "capture time inf is out of range"),
        (ipc.HEADER.pack(ipc.JPEG, 0, 0, 0, 1e300, 5), "capture time .* is out of range"),
    ],
)
def test_corrupt_headers_are_refused(header, reason):
    with pytest.raises(ipc.ProtocolError, match=reason):
        ipc.parse(header)


def test_commands_with_arguments_split_across_reads():
    data = ipc.command(0, b"K") + ipc.command(3, b"J") + ipc.command(2, ipc.CMD_MAX_FPS)
    cmds, rest = ipc.parse_commands(data)
    assert cmds == [(0, b"K", None), (3, b"J", None)] and rest == ipc.command(2, ipc.CMD_MAX_FPS)
    cmds, rest = ipc.parse_commands(rest + bytes([22]) + ipc.command(1, b"j") + ipc.command(1, b"x") + bytes([4]))
    assert cmds == [(2, ipc.CMD_MAX_FPS, 22), (1, b"j", None)] and rest == bytes([4])  # unknown "x" skipped


def test_each_message_names_its_camera_in_the_worker():
    data = ipc.pack(ipc.UNIT, b"\x00\x00\x00\x01\x65", pts=1, camera=7) + ipc.pack_json(ipc.STATUS, {}, camera=254)
    assert [(m.kind, m.camera) for m in ipc.Reader().feed(data)] == [(ipc.UNIT, 7), (ipc.STATUS, 254)]


def test_a_worker_takes_one_to_255_cameras():
    config = ipc.WorkerConfig("cam0", "rtsp://u:pw@cam/x", 1280, 720, 30.0, 2_000_000, 1.0, "auto", "debug")
    two = [config, ipc.dataclasses.replace(config, name="cam1")]
    assert ipc.configs_from_json(ipc.configs_to_json(two)) == two
    for bad in ("[]", config.to_json(), ipc.configs_to_json([config] * (ipc.MAX_CAMERAS_PER_WORKER + 1))):
        with pytest.raises(ValueError, match="expected 1 to 255"):
            ipc.configs_from_json(bad)


def test_the_reader_takes_messages_however_the_pipe_cuts_them():
    status = ipc.WorkerStatus(frames_captured=7, state="live", width=640, height=360, fps=30.0, encoder="libx264")
    stream = ipc.pack(ipc.UNIT, b"\x00\x00\x00\x01\x65" * 300, flags=ipc.FLAG_KEYFRAME, pts=9000) + ipc.pack(
        ipc.STATUS, status.to_json()
    )
    for cut in (1, 7, ipc.HEADER.size, 1000, len(stream)):
        reader = ipc.Reader()
        messages = [m for i in range(0, len(stream), cut) for m in reader.feed(stream[i : i + cut])]
        assert [m.kind for m in messages] == [ipc.UNIT, ipc.STATUS]
        assert ipc.WorkerStatus.from_json(messages[1].payload) == status
    with pytest.raises(ipc.ProtocolError, match="unknown message type 9"):
        ipc.Reader().feed(ipc.HEADER.pack(9, 0, 0, 0, 0.0, 0))


def test_config_and_status_cross_as_typed_json_and_anything_else_is_refused():
    config = ipc.WorkerConfig("cam0", "rtsp://u:pw@cam/x", 1280, 720, 30.0, 2_000_000, 1.0, "auto", "debug")
    assert ipc.WorkerConfig.from_json(config.to_json()) == config
    status = ipc.WorkerStatus(slate=True, last_error="gone", encode_ms=8.5, encoders_running=1)
    assert ipc.WorkerStatus.from_json(status.to_json()) == status
    good = json.loads(status.to_json())
    for bad, error in (
        ({**good, "frames_captured": "7"}, TypeError),
        ({**good, "slate": 1}, TypeError),
        ({**good, "frames_slate": True}, TypeError),
        ({k: v for k, v in good.items() if k != "state"}, KeyError),
        ([good], ValueError),
    ):
        with pytest.raises(error):
            ipc.WorkerStatus.from_json(json.dumps(bad))


async def test_a_stream_reads_its_worker_through_the_reader():
    """The worker's messages, as its pipe delivers them (a read may end anywhere, here every 5 bytes), through the
    relay's protocol (``aio.PipeMessages``, what ``supervise.Child`` reads a worker's stdout with) to the stream."""
    stream = Stream("cam0", SourceSpec("test", ""), EncoderSettings(1_000_000, 30.0, 1.0, "libx264"), 640, 360)
    status = ipc.WorkerStatus(frames_captured=5, state="live", width=320, height=240, fps=15.0, encoder="libx264")
    data = (
        ipc.pack(ipc.UNIT, b"\x00\x00\x00\x01\x65abc", flags=ipc.FLAG_KEYFRAME, pts=90, capture_time=1.0)
        + ipc.pack(ipc.JPEG, b"\xff\xd8\xff\xd9", capture_time=2.0)
        + ipc.pack(ipc.AUDIO, b"\x78opus", pts=96_000, capture_time=2.0)
        + ipc.pack(ipc.STATUS, status.to_json())
        + ipc.pack(ipc.STATUS, b'{"state": "live"}')  # missing fields: logged, not taken
    )
    pipe = PipeMessages(ipc.Reader().feed, stream.worker._on_message)
    for i in range(0, len(data), 5):
        pipe.data_received(data[i : i + 5])
    pipe.connection_lost(None)
    await pipe.ended
    assert (stream.stats.frames_encoded, stream.stats.keyframes, stream.stats.frames_captured) == (1, 1, 5)
    assert stream.jpegs.latest.data == b"\xff\xd8\xff\xd9" and stream.jpegs.latest.capture_time == 2.0
    assert (stream.state, stream.width, stream.height, stream.fps) == ("live", 320, 240, 15.0)
    # An Opus packet goes to the stream's audio hub, as one packet to send (not a unit to packetize).
    audio = stream.audio.newest
    assert stream.stats.audio_frames_encoded == 1 and audio is not None
    assert (audio.data, audio.pts, audio.capture_time, audio.payloads) == (b"\x78opus", 96_000, 2.0, [b"\x78opus"])
    stream.hub.close()
    stream.audio.close()


def _fake_worker(stream: Stream, data: bytes) -> None:
    """``stream``'s worker process replaced by one that writes ``data`` to its pipe, then waits for its stdin to
    close (as a worker stops when the relay asks)."""
    script = f"import os, sys; os.write(1, {data!r}); sys.stdin.read()"
    stream.worker._child.argv = [sys.executable, "-c", script]


async def test_a_worker_process_s_units_are_published_from_the_read_of_its_pipe_with_no_task_woken():
    """Each unit the worker writes is published from the pipe's own read callback. Before, a StreamReader took the
    read and woke the worker's task for it, which published it one event-loop pass later (behind everything else
    that pass had): a pass and a task's wake-up per unit of every camera."""
    stream = Stream("cam0", SourceSpec("test", ""), EncoderSettings(1_000_000, 30.0, 1.0, "libx264"), 640, 360)
    unit = b"\x00\x00\x00\x01\x65abc"
    _fake_worker(stream, b"".join(ipc.pack(ipc.UNIT, unit, flags=ipc.FLAG_KEYFRAME, pts=i) for i in range(3)))
    published: list[tuple[int, asyncio.Task | None]] = []
    done = asyncio.Event()
    publish = stream.hub.publish

    def recorded(frame, now=None) -> None:
        published.append((frame.pts, asyncio.current_task()))
        done.set()
        publish(frame, now)

    stream.hub.publish = recorded
    stream.start()
    try:
        await asyncio.wait_for(done.wait(), 30)
        await asyncio.sleep(0.1)
    finally:
        await stream.close()
    assert published == [(0, None), (1, None), (2, None)], published
    assert stream.stats.frames_encoded == 3 and stream.stats.worker_restarts == 0


async def test_a_worker_process_whose_pipe_turns_out_corrupt_is_restarted(caplog):
    stream = Stream("cam0", SourceSpec("test", ""), EncoderSettings(1_000_000, 30.0, 1.0, "libx264"), 640, 360)
    _fake_worker(stream, b"\x63" * ipc.HEADER.size)  # a message of unknown type 0x63
    stream.start()
    try:
        for _ in range(300):
            if stream.stats.worker_restarts:
                break
            await asyncio.sleep(0.05)
    finally:
        await stream.close()
    assert stream.stats.worker_restarts >= 1
    assert any("pipe is corrupt (unknown message type 99); restarting the worker" in r.message for r in caplog.records)


def _modules_after(*imports: str) -> set[str]:
    code = f"import sys, {', '.join(imports)}; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_the_relay_and_the_camera_worker_meet_only_in_ipc():
    relay_side = _modules_after("relay.cli", "relay.service", "signalling.app")
    assert not {m for m in relay_side if m.startswith("relay.camera")}, "the relay process imports camera code"
    worker_side = _modules_after("relay.camera.worker")
    assert "relay.ipc" in worker_side
    assert not {m for m in worker_side if m.startswith(("relay.service", "relay.stream", "signalling", "aiortc"))}


def test_jpegs_of_keyframes_carry_the_interval():
    cmds, rest = ipc.parse_commands(ipc.command(0, ipc.CMD_JPEG_KEYFRAMES))
    assert (cmds, rest) == ([], ipc.command(0, ipc.CMD_JPEG_KEYFRAMES))  # its interval byte is still to come
    cmds, rest = ipc.parse_commands(rest + bytes([2]) + ipc.command(0, ipc.CMD_JPEG_ON))
    assert (cmds, rest) == ([(0, ipc.CMD_JPEG_KEYFRAMES, 2), (0, ipc.CMD_JPEG_ON, None)], b"")


def test_a_unit_s_nal_places_cross_with_it_and_a_unit_without_them_crosses_as_before():
    """A passed-through unit carries where its NAL units begin (``Message.nals``); an encoded one does not, and
    reads as it always did; the places come out exactly, however the pipe cuts the bytes."""
    unit = b"\x00\x00\x00\x01\x67\x42\x00\x00\x00\x01\x68\xce\x00\x00\x00\x01\x65abc"
    stream = ipc.pack(ipc.UNIT, unit, flags=ipc.FLAG_KEYFRAME, pts=3000, nals=(4, 10, 16)) + ipc.pack(ipc.UNIT, unit)
    for cut in range(len(stream) + 1):
        reader = ipc.Reader()
        with_places, without = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert (with_places.payload, with_places.nals, with_places.keyframe, with_places.pts) == (
            unit,
            (4, 10, 16),
            True,
            3000,
        )
        assert (without.payload, without.nals, without.flags) == (unit, None, 0)
    assert ipc.parse(ipc.pack(ipc.UNIT, unit, nals=tuple(range(4, 4 * (ipc.MAX_NALS + 2), 4))))[0][0].nals is None


@pytest.mark.parametrize(
    ("nals", "reason"),
    [
        ((3,), "NAL offset 3 out of order"),  # inside the first start code
        ((4, 8), "NAL offset 8 out of order"),  # an empty NAL unit before it
        ((10, 4), "NAL offset 4 out of order"),
        ((4, 20), "NAL offset 20 out of order or past its 20-byte unit"),
    ],
)
def test_nal_places_that_do_not_fit_their_unit_are_a_corrupt_pipe(nals, reason):
    unit = b"\x00\x00\x00\x01\x67\x42\x00\x00\x00\x01\x68\xce\x00\x00\x00\x01\x65abc"
    with pytest.raises(ipc.ProtocolError, match=reason):
        ipc.parse(ipc.pack(ipc.UNIT, unit, nals=nals))
    short = ipc.HEADER.pack(ipc.UNIT, ipc.FLAG_NALS, 0, 0, 0.0, 5) + ipc.NAL_COUNT.pack(2) + b"\x00\x00\x00"
    with pytest.raises(ipc.ProtocolError, match="does not hold them"):
        ipc.parse(short)
    none = ipc.NAL_COUNT.pack(0) + unit  # once passed: every viewer's send loop then ended on the unit
    with pytest.raises(ipc.ProtocolError, match="unit with NAL offsets names none"):
        ipc.parse(ipc.HEADER.pack(ipc.UNIT, ipc.FLAG_NALS, 0, 0, 0.0, len(none)) + none)
