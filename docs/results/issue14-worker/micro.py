"""Throwaway micro-figures for issue 14's worker: us per unit and per RTP packet of an RTSP camera's read path.

    python micro.py record reads.pkl        # the benchmark clip's camera through a private mediamtx, 400 units:
                                            # every recv_into of camrelay's client kept as it was cut
    PYTHONPATH=<main or branch> python micro.py run reads.pkl LABEL   # one JSON line

``run`` replays those reads (1) through ``Reader.feed_video`` and the depacketizer alone and (2) through
``RtspSource.read_packet`` with a socket that gives them back, the per-packet step in C and, where the code has it,
in Python (``c_take``); best of 7 passes each. Hot caches and one thread: a floor, several times below what the
same code costs in a worker among other processes (see pipes_ab.py for that).
"""

import json
import pickle
import sys
import time
from pathlib import Path

from relay import rtspin
from relay.camera.rtspsource import RtspSource

CLIP = Path("/tmp/camrelay-bench-clips/pattern-1920x1080-30fps-4M-gop1-10s.mp4")


def record(path: str, units: int = 400) -> None:
    from benchmarks.rtspcams import CameraServer, LoopedCamera

    reads: list[bytes] = []
    with CameraServer() as server:
        camera = LoopedCamera(server, "cam", clip=CLIP)
        camera.start()
        try:
            source = RtspSource(camera.url, 1920, 1080, 30, fallback=lambda: None)
            receive = source._receive

            def recorded(deadline, silence):
                data = receive(deadline, silence)
                reads.append(bytes(data))
                return data

            source._receive = recorded
            source.open()
            reads.clear()
            for _ in range(units):
                source.read_packet()
            channel, pt = source._rtp_channel, source._depacketizer.payload_type
            source.close()
        finally:
            camera.stop()
    with open(path, "wb") as f:
        pickle.dump({"reads": reads, "channel": channel, "pt": pt}, f)
    print(len(reads), "reads,", sum(map(len, reads)), "bytes")


class Replayed:
    """A socket that gives the recorded reads back, one a recv_into."""

    def __init__(self, reads):
        self.reads, self.i = reads, 0

    def recv_into(self, buffer):
        data = self.reads[self.i]
        self.i += 1
        buffer[: len(data)] = data
        return len(data)

    def setsockopt(self, *args):
        pass

    def close(self):
        pass


def run(path: str, label: str) -> None:
    with open(path, "rb") as f:
        rec = pickle.load(f)
    reads, channel, pt = rec["reads"], rec["channel"], rec["pt"]

    def depacketize(c_take):
        reader, d = rtspin.Reader(), rtspin.H264Depacketizer(pt)
        d.c_take = c_take
        t = time.perf_counter()
        units = sum(len(reader.feed_video(memoryview(data), channel, d).units) for data in reads)
        return time.perf_counter() - t, units, d.packets

    def read_packets(c_take):
        source = RtspSource("rtsp://127.0.0.1/replay", 1920, 1080, 30, fallback=lambda: None)
        source._sock, source._rtp_channel = Replayed(reads), channel
        source._depacketizer = rtspin.H264Depacketizer(pt)
        source._depacketizer.c_take = c_take
        source._keepalive_at = source._video_deadline = time.monotonic() + 1e6
        source._video_silence = "sent no video"
        units = 0
        t = time.perf_counter()
        try:
            while True:
                source.read_packet()
                units += 1
        except IndexError:  # the recorded reads ran out
            pass
        return time.perf_counter() - t, units, source._depacketizer.packets

    out = {"label": label, "reads": len(reads), "c_built": getattr(rtspin, "C_TAKE", None) is not None}
    steps = [True, False] if hasattr(rtspin, "C_TAKE") else [None]
    for c_take in steps:
        key = {True: "c", False: "python", None: "main"}[c_take]
        for name, fn in (("depacketize", depacketize), ("read_packet", read_packets)):
            best = min(fn(c_take) for _ in range(7))
            seconds, units, packets = best
            out[f"{name}_{key}_us_unit"] = round(seconds / units * 1e6, 2)
            out[f"{name}_{key}_us_packet"] = round(seconds / packets * 1e6, 3)
            out["units"], out["packets"] = units, packets
    print(json.dumps(out))


if __name__ == "__main__":
    if sys.argv[1] == "record":
        record(sys.argv[2])
    else:
        run(sys.argv[2], sys.argv[3])
