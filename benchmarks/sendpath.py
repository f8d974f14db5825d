"""What one viewer costs the fan-out, per frame: a stream's hub publishing to N aiortc viewers in this process.

    python -m benchmarks.sendpath --viewers 32 --frames 300 [--repeats 3] [--size 720p|1080p]
                                  [--paths batch,c,python] [--profile]

Real parts: a ``PacketHub``, each viewer a real aiortc peer connection on
loopback whose sender is camrelay's (``attach_to_sender``: the shared packer,
the per-frame send, batched UDP), connected (ICE, DTLS) to an aiortc receiver
that takes the packets and decodes nothing. Frames are 1080p-sized access
units (a 60 kB keyframe, then 15 kB frames: 4 Mbit/s at 30 fps), or with
``--size 720p`` half that (2 Mbit/s), or with ``--size opus`` each frame one
120-byte packet, as a stream's sound sends a viewer 50 times a second (an
Opus packet's send: its header, SRTP and its system call, no GSO), published
one every 5 ms; what is measured is the CPU time (``time.process_time``) of
``publish`` alone, which with every viewer live sends each one its frame there
and then (``Subscription.push``): packetizing once, then for each viewer its
header, SRTP and its system call. Printed per frame and per viewer-frame, the
median of the repeats; ``--profile`` prints cProfile's top functions of the
last repeat (which inflates Python calls; read the shares, not the times).
``--paths batch,c,python`` measures the C send path with one C call a
frame for every viewer (``batch``: ``rtpsend.C_BATCH``), with one C call a
viewer-frame (``c``: ``rtpsend.C_SEND`` alone) and the Python one, any of
them, alternately on the same viewers, each repeat all in turn (the order
reversed every other repeat), and prints each one's figures and, for two,
their ratio; without it, the path the relay would take here.

One process on one core has none of the machine's other work in it, so its
figures are what the send path costs, not what a relay under load pays; they
are for comparing two versions of it on the same machine, alternated
(docs/benchmarks.md, "The send path in one process").
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import random
import statistics
import sys
import time

from aiortc import RTCPeerConnection

from relay.hub import EncodedFrame, PacketHub
from relay.webrtc import borrowed, rtpsend, udpbatch
from relay.webrtc.rtpsend import HubTrack, attach_to_sender, h264_preferences

# (keyframe, P-frame) bytes, about: 1080p at 4 Mbit/s and 30 fps, 720p at 2 Mbit/s (the load benchmark's); "opus":
# one RTP packet a frame, an Opus packet's size (the test sound's, 20 ms at ~40 kbit/s, and its TOC byte)
SIZES = {"1080p": (60_000, 15_000), "720p": (30_000, 7_500), "opus": (100, 100)}
GOP = 60  # frames
PTS_STEP = 3000  # 90 kHz ticks a frame at 30 fps
# seconds between publishes (``--gap``): the viewers' sockets are read and RTCP runs in between. The viewers
# decrypt and parse every packet in this process: at 32 viewers of 1080p a frame's packets take them longer than
# 5 ms once the send path is fast, their sockets overflow, and viewers whose consent checks are lost drop out
# (``pushed_after_each_run`` shows it); 20 ms keeps every one live.
PUBLISH_GAP = 0.005
CONNECT_TIMEOUT = 20.0  # seconds for every viewer to connect
SPS_PPS = bytes.fromhex("000000016742e01f8c8d40501e900f08846a0000000168ce3c80")


def access_unit(keyframe: bool, size: int, rng: random.Random) -> bytes:
    """An Annex B access unit of about ``size`` bytes: one slice NAL (IDR with SPS and PPS before it, or not) of
    random bytes with no start code inside."""
    body = rng.randbytes(size).replace(b"\x00\x00", b"\x00\x01")
    return (SPS_PPS if keyframe else b"") + b"\x00\x00\x00\x01" + (b"\x65" if keyframe else b"\x41") + body


async def connect(hub: PacketHub, n: int) -> list[tuple[RTCPeerConnection, RTCPeerConnection]]:
    """``n`` viewers of ``hub``: camrelay's sender on one side, a receiving aiortc peer on the other."""
    pairs = []
    for i in range(n):
        relay, viewer = RTCPeerConnection(), RTCPeerConnection()
        viewer.addTransceiver("video", direction="recvonly")
        await viewer.setLocalDescription(await viewer.createOffer())
        await relay.setRemoteDescription(viewer.localDescription)
        transceiver = relay.getTransceivers()[0]
        transceiver.sender.replaceTrack(HubTrack(hub, f"viewer{i}"))
        transceiver.direction = "sendonly"
        transceiver.setCodecPreferences(h264_preferences())
        attach_to_sender(transceiver.sender, hub)
        await relay.setLocalDescription(await relay.createAnswer())
        await viewer.setRemoteDescription(relay.localDescription)
        pairs.append((relay, viewer))
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while not all(r.connectionState == "connected" for r, _ in pairs):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{sum(r.connectionState == 'connected' for r, _ in pairs)} of {n} viewers connected")
        await asyncio.sleep(0.05)
    return pairs


async def measure(
    viewers: int,
    frames: int,
    repeats: int,
    profile: bool,
    size: str = "1080p",
    paths: tuple[str, ...] = (),
    gap: float = PUBLISH_GAP,
) -> dict:
    releases = [udpbatch.PATCH.hold(), borrowed.SYNCED_COUNTS.hold()]  # as a relay's process holds them
    hub = PacketHub("sendpath", lambda: None)
    rng = random.Random(1)
    keyframe_bytes, frame_bytes = SIZES[size]
    units = [access_unit(k == 0, keyframe_bytes if k == 0 else frame_bytes, rng) for k in range(GOP)]
    pairs = await connect(hub, viewers)
    pts = 0

    async def publish(n: int, prof: cProfile.Profile | None = None) -> float:
        nonlocal pts
        spent = 0.0
        for k in range(n):
            frame = EncodedFrame(units[k % GOP], pts, k % GOP == 0, time.time())
            pts += PTS_STEP
            start = time.process_time()
            if prof is not None:
                prof.enable()
            hub.publish(frame)
            if prof is not None:
                prof.disable()
            spent += time.process_time() - start
            await asyncio.sleep(gap)
        return spent

    configured = rtpsend.C_SEND, rtpsend.C_BATCH
    try:
        await publish(GOP)  # the first keyframe, every viewer live and pushed to
        pushed = sum(sub.push is not None for sub in hub.subscribers)
        spent: dict[str, list[float]] = {path: [] for path in paths or ("default",)}
        live: list[int] = []  # viewers still pushed to after each measured run, in the order they ran
        batched: list[int] = []  # of them, in the stream's batch (one C call a frame) after each run
        prof = None
        for i in range(repeats):
            order = list(spent) if i % 2 == 0 else list(reversed(spent))  # ABBA: neither always goes first
            for path in order:
                if path != "default":
                    rtpsend.C_SEND, rtpsend.C_BATCH = path in ("batch", "c"), path == "batch"
                    await publish(2)  # the viewers leave or join the batch (unmeasured)
                prof = cProfile.Profile() if profile and i == repeats - 1 and path == order[-1] else None
                spent[path].append(await publish(frames, prof) / frames)
                # a viewer not pushed to (its send failed, its socket backed up) sends outside the publish
                live.append(sum(sub.push is not None for sub in hub.subscribers))
                batched.append(sum(sub.lane is not None for sub in hub.subscribers))
        if prof is not None:
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
        await asyncio.sleep(0.2)  # the last frames read off the viewers' sockets
        received = [await packets_received(viewer) for _, viewer in pairs]
    finally:
        rtpsend.C_SEND, rtpsend.C_BATCH = configured
        for relay, viewer in pairs:
            await relay.close()
            await viewer.close()
        for release in reversed(releases):
            release()
    out = {
        "viewers": viewers, "size": size, "gap_ms": gap * 1000, "pushed": pushed, "frames": frames, "repeats": repeats,
        "c_send": configured[0] if not paths else None, "c_batch": configured[1] if not paths else None,
    }  # fmt: skip
    for path, per_frame in spent.items():
        frame_us = statistics.median(per_frame) * 1e6
        figures = {
            "publish_us_per_frame": round(frame_us, 1), "us_per_viewer_frame": round(frame_us / viewers, 1),
            "each_repeat_us_per_viewer_frame": [round(s * 1e6 / viewers, 1) for s in per_frame],
        }  # fmt: skip
        if path == "default":
            out.update(figures)
        else:
            out[path] = figures
    if len(paths) == 2:
        a, b = paths
        out[f"ratio_{a}_to_{b}"] = round(out[a]["us_per_viewer_frame"] / out[b]["us_per_viewer_frame"], 3)
    out["pushed_after_each_run"] = live
    out["in_batch_after_each_run"] = batched
    out["packets_received_min"] = min(received)
    return out


async def packets_received(viewer: RTCPeerConnection) -> int:
    """RTP packets the viewer's receiver took (its inbound-rtp stats)."""
    stats = await viewer.getStats()
    return sum(getattr(s, "packetsReceived", 0) for s in stats.values() if s.type == "inbound-rtp")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sendpath", description=__doc__.split("\n\n")[0])
    ap.add_argument("--viewers", type=int, default=32)
    ap.add_argument("--frames", type=int, default=300, help="frames measured per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--size", choices=sorted(SIZES), default="1080p", help="frame sizes (default 1080p; opus: one 120-byte packet)"
    )
    ap.add_argument(
        "--paths", default="", help="batch,c,python: send paths alternated (default: the one the relay would take)"
    )
    ap.add_argument("--gap", type=float, default=PUBLISH_GAP * 1000, help="ms between publishes (default 5)")
    ap.add_argument("--profile", action="store_true", help="cProfile the last repeat (to stderr)")
    args = ap.parse_args(argv)
    if args.viewers < 1 or args.frames < 1 or args.repeats < 1:
        ap.error("--viewers, --frames and --repeats must be at least 1")
    paths = tuple(p for p in args.paths.split(",") if p)
    if any(p not in ("batch", "c", "python") for p in paths) or len(set(paths)) != len(paths):
        ap.error("--paths takes batch, c and python, each at most once")
    if {"batch", "c"} & set(paths) and not rtpsend.borrowed.C_SEND_BUILT:
        ap.error("--paths batch or c: relay.webrtc._fastsend is not built here (pip install -e .)")
    if args.gap < 0:
        ap.error("--gap must be at least 0")
    result = asyncio.run(
        measure(args.viewers, args.frames, args.repeats, args.profile, args.size, paths, args.gap / 1000)
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
