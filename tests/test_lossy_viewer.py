"""One viewer on a bad link (5 %, then 20 % of the relay's datagrams dropped, plus jitter, by a user-space proxy on
loopback): its picture keeps coming back (NACK retransmissions, PLI -> keyframe), and the other viewers do not
notice: each of them gets every frame the relay encodes meanwhile.

Judged by frames, not by the clock: which frames the relay encoded (one more subscriber on its hub) and which
each viewer decoded (the pixel clock in every picture names the frame it was made from). How long the lossy
viewer's gaps are and what the loss costs anyone in latency is measured by ``benchmarks/lossy.py``."""

from __future__ import annotations

import asyncio
import time

from benchmarks.lossy import LossyLink
from relay.webrtc.rtpsend import RETRANSMITS
from relay.webrtc.whepclient import WhepViewer

from .conftest import EncodedFrames, frame_clock, session_of

PHASE = 180  # frames the relay encodes at each loss setting (6 s at 30 fps)
WINDOW = 60  # of every this many frames in a row (2 s of video), the lossy viewer shows at least one
LOSSY_SHARE = 0.3  # and at least this share of each phase's frames
CATCH_UP = 30.0  # seconds the viewers get, once the link is clean again, to show the last frame of the loss
# The viewers here decode in the test's own process, on the GIL the relay's event loop needs: on a loaded machine
# their decoding can hold the relay's loop for longer than the stream's default lag limit of a second (the harness
# stalling, not the relay), and the relay rightly skips a lagging viewer ahead. Two seconds of lag ride that out; a
# fan-out that waited on the lossy viewer's losses and retransmissions, for 12 s, would still overflow it.
TEST_MAX_LAG = 2.0


class Watch:
    """Reads a viewer's frames until stopped: the pixel clock of each, that is which frame it was."""

    def __init__(self, viewer: WhepViewer) -> None:
        self.viewer = viewer
        self.clocks: list[int | None] = []
        self.error: BaseException | None = None

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                self.clocks.append(frame_clock(await self.viewer.recv(timeout=10)))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def shown(self, last: int) -> bool:
        """Whether it has shown the frame captured at ``last`` or a later one."""
        return any(c is not None and c >= last for c in self.clocks)


def longest_miss(frames: list[int], shown: set[int]) -> int:
    """The most frames in a row of ``frames`` that are not in ``shown``."""
    longest = run = 0
    for clock in frames:
        run = 0 if clock in shown else run + 1
        longest = max(longest, run)
    return longest


async def test_a_lossy_viewer_recovers_and_the_others_do_not_notice(relay_server, http):
    link = LossyLink(loss=0.0, jitter_ms=0.0)
    await link.start()
    relay_server.relay.streams["cam0"].hub.max_lag = TEST_MAX_LAG  # for the viewers subscribing below
    lossy = WhepViewer(relay_server.whep(), http, rewrite_sdp=link.rewrite)
    others = [WhepViewer(relay_server.whep(), http) for _ in range(3)]
    stop = asyncio.Event()
    tasks: list[asyncio.Task] = []
    try:
        await asyncio.gather(lossy.connect(), *(v.connect() for v in others))
        await asyncio.gather(*(v.read_frames(5) for v in [lossy, *others]))
        # The relay's sender for the lossy viewer: the one whose retransmissions we expect.
        lossy_sender = session_of(relay_server, lossy).pc.getTransceivers()[0].sender
        senders = [t.sender for v in [lossy, *others] for t in session_of(relay_server, v).pc.getTransceivers()]
        assert link.counters.to_viewer > 0 and link.counters.to_relay > 0  # the media really goes through the link
        watches = [Watch(v) for v in [lossy, *others]]
        tasks = [asyncio.create_task(w.run(stop)) for w in watches]
        stream = relay_server.relay.streams["cam0"]
        with EncodedFrames(stream) as encoded:
            await encoded.wait(1)
            forced_before = stream.stats.keyframes_forced
            link.set_loss(0.05, jitter_ms=20)
            start = len(encoded.clocks)
            await encoded.wait(start + PHASE)
            link.set_loss(0.20, jitter_ms=30)
            middle = len(encoded.clocks)
            end = len(await encoded.wait(middle + PHASE))
            link.set_loss(0.0, jitter_ms=0)  # clean again: each viewer catches up with the last frame of the loss
            clocks = encoded.clocks[:end]
        deadline = time.monotonic() + CATCH_UP
        while not all(w.shown(clocks[-1]) or w.error for w in watches):
            assert time.monotonic() < deadline, "a viewer did not catch up once the link was clean"
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*tasks)
        # What the relay says it dropped for each clean viewer because it lagged (the hub's slow-viewer rule).
        lagged = [session_of(relay_server, v).track.subscription.dropped for v in others]
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await asyncio.gather(*(v.close() for v in [lossy, *others]))
        link.close()

    lossy_w, *other_ws = watches
    for w in watches:
        assert w.error is None, repr(w.error)
    assert link.counters.dropped > 0
    # The lossy viewer's picture keeps coming back, at both loss rates: a good share of the frames, and at least
    # one of every WINDOW in a row.
    shown = set(lossy_w.clocks)
    for phase in (clocks[start:middle], clocks[middle:]):
        got, miss = sum(1 for c in phase if c in shown), longest_miss(phase, shown)
        print(f"lossy viewer: {got} of {len(phase)} frames, at most {miss} missed in a row")
        assert got >= LOSSY_SHARE * len(phase) and miss < WINDOW, (got, miss, len(phase))
    # Recovering took retransmissions the viewer asked for (NACK), not just luck.
    assert link.counters.nacks > 0
    assert lossy_sender.__dict__.get(RETRANSMITS, 0) > 0  # and the relay answered them
    # The API counts them, every viewer's, as its senders did (read on either side of it: one may come meanwhile).
    counted = lambda: sum(s.__dict__.get(RETRANSMITS, 0) for s in senders)  # noqa: E731
    before = counted()
    async with http.get(relay_server.base + "/api/v1/streams") as resp:
        fanout = {s["name"]: s for s in (await resp.json())["streams"]}["cam0"]["fanout"]
    assert 0 < before <= fanout["retransmits"] <= counted()
    print(f"link: {link.counters}; keyframes forced during loss: {stream.stats.keyframes_forced - forced_before}")
    # The others saw nothing: every frame the relay encoded, from before the loss to its end, each of them showed.
    for w, dropped in zip(other_ws, lagged, strict=True):
        seen = set(w.clocks)
        missed = [c for c in clocks if c not in seen]
        assert not missed, f"a clean viewer missed {len(missed)} of {len(clocks)} frames ({dropped} dropped lagging)"
