"""What a stream's sound costs the RTSP publisher and the recorder, per stream: CPU for each Opus packet.

    python -m benchmarks.audio_edges --seconds 60

The test sound's own Opus (the worker's encoder, 20 ms frames), as the audio
hub hands it on, goes through each edge's own work for a packet, in this
process: the RTSP publisher's (``RtpFramer``: its RTP header, a sender report
a second, the write to a socket, read on the other side) and the recorder's
(``Segment.write_audio``: a fragmented MP4 segment of 720p30 H.264, with its
sound against without, in the temporary directory or ``--dir``). Reported:
CPU microseconds per packet (the process's CPU time, so a busy machine's other
work is not counted) and % of one core at 50 packets a second. The hub's fan-out to one more subscriber is not in it
(``benchmarks.lipsync`` measures the relay's CPU per audio viewer).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

from relay.camera.audio import OPUS_FRAME, OpusEncoder
from relay.camera.testsound import RATE, render
from relay.hub import EncodedFrame
from relay.record import Segment
from relay.rtsp import OPUS_CLOCK, PUBLISH_AUDIO_PAYLOAD_TYPE, RtpFramer

PACKETS_PER_SECOND = RATE // OPUS_FRAME  # 50
ROUNDS = 3  # each cost is the least of this many runs: what is left is the work, not a busy machine's noise


def opus_packets(seconds: float, start: float) -> list[EncodedFrame]:
    """The test sound from ``start`` (a capture time) on, encoded as the worker does."""
    encoder = OpusEncoder(1)
    first = round(start * RATE)
    samples = render(first, int(seconds * RATE)).reshape(-1, 1)
    return [EncodedFrame(data, pts, True, pts / RATE, payloads=[data]) for data, pts in encoder.encode(samples, first)]


VIDEO_FPS = 30
GOP = 30  # a keyframe a second, as camrelay encodes


def video_frames(seconds: float, start: float) -> list[EncodedFrame]:
    """``seconds`` of H.264 at 30 fps from ``start`` on: one GOP encoded, its access units repeated with new times
    (muxing looks at their times and sizes, not their pictures)."""
    import av

    from relay.camera.encode import EncoderSettings, H264Encoder

    encoder = H264Encoder(EncoderSettings(2_000_000, VIDEO_FPS, 1.0, "libx264"))
    picture = av.VideoFrame(1280, 720, "yuv420p")
    gop = [encoder.encode(picture, i * 3000, i == 0) for i in range(GOP)]
    units = [unit for out in gop for unit in out][:GOP]
    out = []
    for i in range(int(seconds * VIDEO_FPS)):
        data, keyframe, _ = units[i % len(units)]
        t = start + i / VIDEO_FPS
        out.append(EncodedFrame(data, round(t * 90_000), i % GOP == 0 and keyframe, t))
    return out


def rtsp_cpu(packets: list[EncodedFrame]) -> float:
    """CPU seconds to frame and send every packet over a socket (and read it back: the server's side is not
    camrelay's, so that half is taken off by timing the read alone)."""
    ours, theirs = socket.socketpair()
    framer = RtpFramer(2, 1, 0, PUBLISH_AUDIO_PAYLOAD_TYPE, OPUS_CLOCK)
    base = packets[0].pts
    spent = 0.0
    for packet in packets:
        t = time.process_time()
        ours.sendall(framer.frame(packet.payloads or [], packet.pts - base, packet.capture_time))
        spent += time.process_time() - t
        theirs.recv(65536)
    ours.close()
    theirs.close()
    return spent


def record_cpu(video: list[EncodedFrame], packets: list[EncodedFrame], folder: Path) -> float:
    """CPU seconds to write ``video`` and ``packets`` (none: video alone) into one segment, in capture order,
    and close it."""
    both = sorted([*video, *packets], key=lambda f: f.capture_time)
    t = time.process_time()
    segment = Segment(folder / "bench.mp4", video[0], VIDEO_FPS, audio_channels=1 if packets else 0)
    for frame in both:
        if frame.payloads is not None:  # an Opus packet
            segment.write_audio(frame)
        else:
            segment.write(frame)
    segment.finish()
    return time.process_time() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="of sound to send and record")
    ap.add_argument("--dir", default="", help="where the segment is written (default: a temporary directory)")
    args = ap.parse_args(argv)
    start = time.time()
    packets, video = opus_packets(args.seconds, start), video_frames(args.seconds, start)
    with tempfile.TemporaryDirectory(dir=args.dir or None) as folder:
        alone = min(record_cpu(video, [], Path(folder)) for _ in range(ROUNDS))
        with_sound = min(record_cpu(video, packets, Path(folder)) for _ in range(ROUNDS))
        costs = {"rtsp": min(rtsp_cpu(packets) for _ in range(ROUNDS)), "record": with_sound - alone}
    result = {
        "packets": len(packets),
        **{
            edge: {
                "us_per_packet": round(spent / len(packets) * 1e6, 1),
                "percent_of_a_core": round(spent / len(packets) * PACKETS_PER_SECOND * 100, 3),
            }
            for edge, spent in costs.items()
        },
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
