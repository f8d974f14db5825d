"""A viewer on a link too slow for the stream, beside viewers on a clean one (relay/lag.py, docs/architecture.md):
the relay's socket to the slow viewer backs up, its frames wait in the hub's backlog, bounded by the stream's
lag limit, and past it it skips ahead to keyframes, counted; the clean viewers get every frame meanwhile.

The slow link is real: the relay and the clean viewers in one network namespace, the slow viewer in another
(its own process), the link between them shaped to a fifth of the stream's bit rate (``tc`` tbf). The kernel
holds what the link cannot take yet until the relay's socket is full, as a congested uplink does. Judged by
frames, not the clock: which frames the relay encoded (one more subscriber on its hub), which each clean viewer
decoded (the pixel clock in every picture), and what the relay counted for each viewer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import subprocess
import sys
import time
from pathlib import Path

from relay.webrtc.whepclient import WhepViewer

from .conftest import EncodedFrames, make_config, session_of, start_relay
from .netns import inside, run
from .test_lossy_viewer import TEST_MAX_LAG, Watch

ROOT = Path(__file__).resolve().parent.parent
RELAY, SLOW = "10.77.0.1", "10.77.0.2"  # the two ends of the slow link
SLOW_RATE = "200kbit"  # from the relay to the slow viewer: a fifth of the stream's 1 Mbit/s (make_config)
# What the kernel may hold for the link: more than a socket's send buffer, so the relay's socket fills first.
SLOW_QUEUE = "4mb"
WINDOW = 240  # frames the relay encodes while the clean viewers are watched: 8 s at 30 fps
DEADLINE = 60.0  # seconds for what the test waits on (connecting, catching up, a count): a guard, not a measurement

# The slow viewer: connects, prints its session's URL, then takes frames as they come until it is stopped.
SLOW_VIEWER = """
import asyncio, sys
import aiohttp
from relay.webrtc.whepclient import WhepViewer

async def main(url):
    async with aiohttp.ClientSession() as http:
        viewer = WhepViewer(url, http)
        await viewer.connect()
        print(viewer.location, flush=True)
        while True:
            await viewer.recv(timeout=120)

asyncio.run(main(sys.argv[1]))
"""


class SlowLink:
    """The relay's namespace and the slow viewer's, joined by a link shaped from the relay's side; deleted on
    exit, however the test went."""

    def __init__(self) -> None:
        tag = f"{secrets.token_hex(3)}"
        self.relay, self.viewer = f"cr-fast-{tag}", f"cr-slow-{tag}"

    def __enter__(self) -> SlowLink:
        try:
            for ns in (self.relay, self.viewer):
                run("ip", "netns", "add", ns)
                run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "link", "add", "slow", "netns", self.relay, "type", "veth", "peer", "name", "slow", "netns",
                self.viewer)  # fmt: skip
            for ns, address in ((self.relay, RELAY), (self.viewer, SLOW)):
                run("ip", "-n", ns, "addr", "add", f"{address}/30", "dev", "slow")
                run("ip", "-n", ns, "link", "set", "slow", "up")
            run("tc", "-n", self.relay, "qdisc", "add", "dev", "slow", "root", "tbf", "rate", SLOW_RATE,
                "burst", "16kb", "limit", SLOW_QUEUE)  # fmt: skip
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for ns in (self.relay, self.viewer):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


async def until(check, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not await check():
        assert time.monotonic() < deadline, f"{what} within {DEADLINE:g} s"
        await asyncio.sleep(0.1)


async def test_a_viewer_on_a_slow_link_skips_ahead_and_the_others_get_every_frame(http):
    with SlowLink() as link, inside(link.relay):
        config = make_config(allowed_hosts=(RELAY,))
        config = dataclasses.replace(
            config,
            http=dataclasses.replace(config.http, host=RELAY),
            webrtc=dataclasses.replace(config.webrtc, ice_addresses=(RELAY,)),
            # The clean viewers decode in this process, on the GIL the relay's loop needs (test_lossy_viewer).
            video=dataclasses.replace(config.video, max_lag=TEST_MAX_LAG),
        )
        runner, relay = await start_relay(config)
        clean = [WhepViewer(relay.whep(), http) for _ in range(2)]
        slow: subprocess.Popen | None = None
        stop = asyncio.Event()
        tasks: list[asyncio.Task] = []
        try:
            await asyncio.gather(*(v.connect() for v in clean))
            await asyncio.gather(*(v.read_frames(5) for v in clean))
            slow = subprocess.Popen(
                ["ip", "netns", "exec", link.viewer, sys.executable, "-c", SLOW_VIEWER, relay.whep()],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            location = await asyncio.wait_for(asyncio.to_thread(slow.stdout.readline), DEADLINE)
            slow_session = relay.relay.sessions.get(location.strip().rsplit("/", 1)[-1])
            assert slow_session is not None, f"the slow viewer's session {location!r}"
            stream = relay.relay.streams["cam0"]
            watches = [Watch(v) for v in clean]
            tasks = [asyncio.create_task(w.run(stop)) for w in watches]
            with EncodedFrames(stream) as encoded:
                start = len(await encoded.wait(1))
                clocks = (await encoded.wait(start + WINDOW))[start : start + WINDOW]

            async def shown() -> bool:
                return all(w.shown(clocks[-1]) or w.error for w in watches)

            await until(shown, "the clean viewers showed the window's last frame")
            laggard = slow_session.track.subscription

            async def fell() -> bool:
                return laggard is not None and laggard.resyncs > 0

            await until(fell, "the relay let the slow viewer fall behind its lag limit")
            stop.set()
            await asyncio.gather(*tasks)
            cleans = [session_of(relay, v).track.subscription for v in clean]
            fanout = stream.status().api()["fanout"]
        finally:
            stop.set()
            await asyncio.gather(*tasks)
            if slow is not None:
                slow.terminate()
                await asyncio.to_thread(slow.wait)
                slow.stdout.close()
            await asyncio.gather(*(v.close() for v in clean))
            await runner.cleanup()

    for w in watches:
        assert w.error is None, repr(w.error)
    # The clean viewers saw nothing of it: every frame the relay encoded in the window, each of them showed.
    for w, sub in zip(watches, cleans, strict=True):
        seen = set(w.clocks)
        missed = [c for c in clocks if c not in seen]
        assert not missed, f"a clean viewer missed {len(missed)} of {len(clocks)} frames ({sub.dropped} dropped)"
        assert (sub.resyncs, sub.dropped) == (0, 0)
    # The slow one's frames waited in its backlog (never more than its limit) and it skipped ahead past it,
    # counted once for the fall, its frames lost counted each: in the stream's API too.
    assert laggard.resyncs >= 1 and laggard.dropped > 0
    assert len(laggard) <= laggard.limit.frames
    assert fanout["resyncs"] >= laggard.resyncs
