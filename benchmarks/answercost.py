"""The relay's CPU for one WHEP answer, a browser's offer against an aiortc viewer's, in-process.

    python -m benchmarks.answercost --rounds 200
    python -m benchmarks.answercost --rounds 200 --compare /tmp/camrelay-main   # its signalling/sdp.py beside ours

What ``signalling.whep.whep_offer`` and ``ViewerSessions.create`` spend on an offer before the answer goes out, on
the relay's event loop: the offer's checks and rewrites (``check_offer``, ``usable_candidates``, ``served_only``,
``fit_h264``, ``H264Fit.offer_for_aiortc``: ``prep``), and aiortc's part (a send-only H.264 transceiver, the offer
applied, the answer made and applied: ``aiortc``; ICE gathers on 127.0.0.1). Offers: Chromium's of
``tests/data/offer_chromium_156.sdp`` (audio and video, as camrelay's page offers with sound) and
``tests/data/chromium_offer.sdp`` (video only), and an aiortc viewer's (``relay.webrtc.whepclient``, as
``benchmarks.burst``'s model joiners make it). With ``--compare DIR``, DIR's ``signalling/sdp.py`` is loaded beside
this checkout's and each round answers every offer with both, in turn: ``ours`` and ``theirs``. CPU time
(``time.process_time``) per answer, the median and p90 over ``--rounds``."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
import time
from pathlib import Path

from benchmarks.options import run_facts
from benchmarks.peers import percentile

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
STREAM_PROFILE = "640028"  # High 4.0: the profile-level-id of the relay's libx264 720p stream
WARMUP = 5  # rounds not counted: imports, first allocations


def load_sdp(checkout: str | None):
    """``signalling.sdp`` of this checkout, or of ``checkout`` loaded under another name."""
    if checkout is None:
        import signalling.sdp

        return signalling.sdp
    spec = importlib.util.spec_from_file_location("theirs_sdp", Path(checkout) / "signalling" / "sdp.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


async def aiortc_offer() -> str:
    import aiohttp

    from relay.webrtc.whepclient import WhepViewer

    async with aiohttp.ClientSession() as http:
        viewer = WhepViewer("http://127.0.0.1:9/whep/cam0", http)  # never posted
        try:
            return await viewer.make_offer()
        finally:
            await viewer.pc.close()


def prep(sdp, offer: str) -> str:
    """What the relay hands aiortc, as ``whep_offer`` makes it (no audio hub: the video section alone)."""
    summary = sdp.check_offer(offer)
    served = sdp.served_only(sdp.usable_candidates(offer, True), summary.served, None)  # a viewer on loopback
    return sdp.fit_h264(served, STREAM_PROFILE).offer_for_aiortc(served)


async def answer(offer: str) -> str:
    from aiortc import RTCPeerConnection, RTCSessionDescription

    from relay.webrtc.rtpsend import h264_preferences

    pc = RTCPeerConnection()
    try:
        pc.addTransceiver("video", direction="sendonly").setCodecPreferences(h264_preferences())
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        return pc.localDescription.sdp
    finally:
        await pc.close()


def codecs(answer_sdp: str) -> list[str]:
    """An answer's codec lines: what two versions must agree on."""
    return [line for line in answer_sdp.splitlines() if line.startswith(("a=rtpmap:", "a=fmtp:", "a=rtcp-fb:"))]


async def run(rounds: int, compare: str | None) -> dict:
    from relay.webrtc import borrowed

    release = borrowed.restrict_host_addresses(["127.0.0.1"])
    try:
        offers = {
            "chromium_156_audio_video": (DATA / "offer_chromium_156.sdp").read_text(),
            "chromium_video": (DATA / "chromium_offer.sdp").read_text(),
            "aiortc": await aiortc_offer(),
        }
        versions = {"ours": load_sdp(None), **({"theirs": load_sdp(compare)} if compare else {})}
        times: dict[str, dict[str, list[float]]] = {
            f"{o} {v} {part}": [] for o in offers for v in versions for part in ("prep", "aiortc")
        }
        answers: dict[str, list[str]] = {}  # "offer version": its answer's codec lines
        for i in range(WARMUP + rounds):
            for name, offer in offers.items():
                for version, sdp in versions.items():
                    t0 = time.process_time()
                    for_aiortc = prep(sdp, offer)
                    t1 = time.process_time()
                    made = await answer(for_aiortc)
                    t2 = time.process_time()
                    if i >= WARMUP:
                        times[f"{name} {version} prep"].append((t1 - t0) * 1000)
                        times[f"{name} {version} aiortc"].append((t2 - t1) * 1000)
                    answers[f"{name} {version}"] = codecs(made)
    finally:
        release()
    out = {
        key: {"p50_ms": round(percentile(v, 50), 3), "p90_ms": round(percentile(v, 90), 3)} for key, v in times.items()
    }
    out["same_answer_codecs"] = all(answers[f"{o} ours"] == answers[f"{o} theirs"] for o in offers) if compare else None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--compare", metavar="DIR", help="another checkout: its signalling/sdp.py beside this one's")
    args = ap.parse_args(argv)
    result = asyncio.run(run(args.rounds, args.compare))
    report = {**run_facts(" ".join(["python -m benchmarks.answercost", *(argv or sys.argv[1:])])), **result}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
