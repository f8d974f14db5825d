"""What a viewer's RTCP costs the relay's loop, per datagram, by kind: real SRTCP read where the relay reads it.

    python -m benchmarks.rtcpcost [--viewers 8] [--datagrams 2000] [--repeats 5] [--compare]

Real parts: camrelay's senders (``attach_to_sender``) connected (ICE, DTLS) to
aiortc viewers in this process, ``borrowed.WATCH_ICE`` held as a relay's
process holds it, so SRTCP from a viewer is read as it arrives
(``borrowed.read_rtcp_at_once``). Each viewer's SRTP session protects the
datagrams beforehand; what is timed (``time.process_time``) is the relay's
side alone: each datagram handed to the read-at-once path as the ICE
connection hands it, then every task it made run to its end. Kinds: a receiver
report (``rr``), a REMB alone (``remb``, as aiortc's viewers send it), a report
and a REMB (``rr+remb``, the compound a browser sends), a PLI (``pli``), a
NACK of one packet the sender never sent (``nack``: its handling, no resend).
Printed in microseconds a datagram, the median of the repeats. ``--compare``
also times each kind with REMBs handed on to aiortc as before
(``borrowed._unheeded`` answering no), alternately, and prints the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time

import aiortc.rtp as rtp

from benchmarks.borrowed import ice_connection_of, protect_rtcp
from benchmarks.sendpath import connect
from relay.hub import PacketHub
from relay.webrtc import borrowed

KINDS = ("rr", "remb", "rr+remb", "pli", "nack")
VIEWER_SSRC = 0x5EED  # the viewers' RTCP sender SSRC here (any: the relay routes by the media SSRC)
REMB_BITRATE = 2_000_000  # bits a second a REMB names (the load benchmark's stream)


def datagram(kind: str, media_ssrc: int) -> bytes:
    """The plain RTCP of ``kind`` about the relay's sender ``media_ssrc``."""
    block = rtp.RtcpReceiverInfo(ssrc=media_ssrc, fraction_lost=0, packets_lost=0, highest_sequence=1000,
                                 jitter=0, lsr=0, dlsr=0)  # fmt: skip
    rr = bytes(rtp.RtcpRrPacket(ssrc=VIEWER_SSRC, reports=[block]))
    remb = bytes(rtp.RtcpPsfbPacket(fmt=rtp.RTCP_PSFB_APP, ssrc=VIEWER_SSRC, media_ssrc=0,
                                    fci=rtp.pack_remb_fci(REMB_BITRATE, [media_ssrc])))  # fmt: skip
    return {
        "rr": rr,
        "remb": remb,
        "rr+remb": rr + remb,
        "pli": bytes(rtp.RtcpPsfbPacket(fmt=rtp.RTCP_PSFB_PLI, ssrc=VIEWER_SSRC, media_ssrc=media_ssrc)),
        "nack": bytes(
            rtp.RtcpRtpfbPacket(fmt=rtp.RTCP_RTPFB_NACK, ssrc=VIEWER_SSRC, media_ssrc=media_ssrc, lost=[40000])
        ),
    }[kind]


async def time_kind(pairs, kind: str, count: int) -> float:
    """Microseconds of the relay's CPU a datagram of ``kind``, ``count`` of them spread over the viewers."""
    jobs = []
    for i in range(count):
        relay, viewer = pairs[i % len(pairs)]
        media_ssrc = borrowed.SenderFields(relay.getTransceivers()[0].sender).ssrc
        jobs.append((ice_connection_of(relay), protect_rtcp(viewer, datagram(kind, media_ssrc))))
    await asyncio.sleep(0)
    start = time.process_time()
    for conn, data in jobs:
        if not borrowed._rtcp_now(conn, data):
            raise RuntimeError("the relay's read-at-once path did not take a viewer's SRTCP")
    while borrowed._rtcp_tasks:  # what it handed to aiortc, run to its end
        await asyncio.sleep(0)
    return (time.process_time() - start) / count * 1e6


async def measure(viewers: int, count: int, repeats: int, compare: bool) -> dict:
    release = borrowed.WATCH_ICE.hold()
    hub = PacketHub("cam0", lambda: None)
    pairs = await connect(hub, viewers)
    heeded = borrowed._unheeded
    arms = ("now", "before") if compare else ("now",)
    figures: dict[str, dict[str, list[float]]] = {arm: {k: [] for k in KINDS} for arm in arms}
    try:
        for r in range(repeats):
            for arm in arms if r % 2 == 0 else arms[::-1]:
                borrowed._unheeded = heeded if arm == "now" else (lambda packet: False)
                try:
                    for kind in KINDS:
                        figures[arm][kind].append(await time_kind(pairs, kind, count))
                finally:
                    borrowed._unheeded = heeded
    finally:
        for relay, viewer in pairs:
            await relay.close()
            await viewer.close()
        release()
    return {arm: {k: statistics.median(v) for k, v in kinds.items()} for arm, kinds in figures.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--viewers", type=int, default=8)
    ap.add_argument("--datagrams", type=int, default=2000, help="datagrams a kind a repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compare", action="store_true", help="also with REMBs handed on to aiortc, as before")
    args = ap.parse_args(argv)
    logging.getLogger("relay").setLevel(logging.ERROR)  # the NACKs' resend budget says it refuses: on purpose here
    result = asyncio.run(measure(args.viewers, args.datagrams, args.repeats, args.compare))
    for kind in KINDS:
        now = result["now"][kind]
        line = f"{kind:8s} {now:7.1f} us a datagram"
        if "before" in result:
            before = result["before"][kind]
            line += f"; REMBs heeded (before): {before:7.1f} us, now {now / before:.2f} times that"
        print(line)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
