"""A shared worker process that one camera keeps crashing (a decoder's segfault, an abort in a library): the
process is split in two each time it dies again soon after dying, until the camera that crashes it is alone, and
the others stay up in processes it is not in; one log line a split says which cameras went where and which are
alone; never more processes than cameras, and a process that dies once keeps its cameras together.

The worker processes are real (``tests/crashworker.py``: ``relay.camera.worker`` with a source that calls
``os.abort()`` while a trigger file lies beside its clip), fed looped H.264 clips passed through as a shared
worker's RTSP cameras are; the relay's clock for "soon" is injected (it stands still: every death is soon), and the
cameras' restarts are counted, never timed. The relay's watchdog, which runs on real time, is off in the tests that
run processes (``WORKER_STALL`` past any test): on a loaded machine a process slow to send would otherwise be killed,
and that kill, counted as a death, would split a process the test expects whole.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import time
import types

from relay import stream as stream_module
from relay import supervise
from relay.backoff import Backoff, Retry
from relay.ipc import EncoderSettings
from relay.source import parse_source_spec
from relay.stream import Stream, Worker, share_workers

from .crashworker import ONCE, TRIGGER
from .test_passthrough_out import until
from .test_shared_worker import Frozen, lines

QUICK = Retry(Backoff(initial=0.05, cap=0.05, jitter=0.0))  # restarts at once: the test counts them


def streams_of(tmp_path, clip, names: str, monkeypatch) -> list[Stream]:
    """A stream per name, each a looped copy of ``clip`` passed through, all in one worker process (run as
    ``tests.crashworker``), its clock frozen, the relay's watchdog off (no death but the ones the test makes)."""
    monkeypatch.setattr(stream_module, "WORKER_MODULE", "tests.crashworker")
    monkeypatch.setattr(stream_module, "WORKER_STALL", math.inf)
    (tmp_path / "clip.mp4").symlink_to(clip)
    spec = parse_source_spec(f"file:{tmp_path / 'clip.mp4'}#mode=passthrough")
    settings = EncoderSettings(1_000_000, 30.0, 1.0, "libx264")
    streams = [Stream(name, spec, settings, 640, 360, retry=QUICK) for name in names]
    shared = Worker(streams, QUICK)
    shared.clock = Frozen()
    return streams


async def all_live(streams: list[Stream]) -> None:
    passed = [s.stats.frames_passed_through for s in streams]
    await until(
        lambda: all(
            s.passthrough and s.stats.frames_passed_through > n + 30 for s, n in zip(streams, passed, strict=True)
        ),
        "every camera passed through again",
    )


def restarts(streams: list[Stream]) -> dict[str, int]:
    return {s.name: s.stats.worker_restarts for s in streams}


async def test_a_camera_that_keeps_crashing_its_shared_worker_ends_up_alone_and_the_others_stay_up(
    small_clip, tmp_path, monkeypatch, caplog
):
    """Before: every crash of the shared process restarted all of its cameras, for as long as one camera crashed it.
    Now a process that dies again soon after dying is split in two: with 4 cameras, c crashing, the process dies
    (all restarted), dies again (split: a,b and c,d), c,d dies (split: c and d alone); from then on c's crashes
    restart c alone. a and b were restarted twice, d three times, and never again however often c dies; once c
    stops crashing it comes back in its own process."""
    caplog.set_level(logging.WARNING, logger="relay.stream")
    streams = streams_of(tmp_path, small_clip, "abcd", monkeypatch)
    a, b, c, d = streams
    trigger = tmp_path / TRIGGER.format(name="c")
    for s in streams:
        s.start()
    try:
        await all_live(streams)
        assert len({s.pid for s in streams}) == 1, "one process"
        trigger.touch()
        await until(lambda: c.worker.streams == [c], "c alone in a worker of its own")
        isolated = restarts(streams)
        await until(lambda: c.stats.worker_restarts >= isolated["c"] + 3, "c crashing three more times alone")
        later = restarts(streams)
        trigger.unlink()
        await all_live(streams)
        pids = [s.pid for s in streams]
        workers = [s.worker for s in streams]
    finally:
        trigger.unlink(missing_ok=True)
        await asyncio.gather(*(s.close() for s in streams))
    assert isolated["c"] >= 3 and {k: isolated[k] for k in "abd"} == {"a": 2, "b": 2, "d": 3}, isolated
    assert {k: v for k, v in later.items() if k != "c"} == {"a": 2, "b": 2, "d": 3}, "c's crashes alone restart c"
    assert pids[0] == pids[1] and len(set(pids)) == 3, "a,b still share one process, c and d one each"
    assert [w.streams for w in workers] == [[a, b], [a, b], [c], [d]]
    assert [s.stats.worker_splits for s in streams] == [1, 1, 2, 2]
    said = lines(caplog, "died again", "split in two worker processes")
    assert len(said) == 2, said
    assert said[0].startswith("streams=a,b,c,d worker died again") and "(code -6)" in said[0]
    assert said[0].endswith("split in two worker processes: a,b and c,d"), "a,b: the first two deaths, d the third"
    assert said[1].startswith("streams=c,d worker") and said[1].endswith("c and d; isolated: stream=c stream=d")


async def test_a_shared_worker_that_crashes_once_in_a_while_or_is_sigkilled_by_another_keeps_its_cameras_together(
    small_clip, tmp_path, monkeypatch, caplog
):
    """A shared process that crashes (a camera's abort), and again more than ``SPLIT_WITHIN`` later (the relay's clock
    moved on), then SIGKILLed twice in a row by another process (the OOM killer: a split, more processes, would only
    take more memory): every time both cameras restart together in one process, none split."""
    caplog.set_level(logging.WARNING, logger="relay.stream")
    streams = streams_of(tmp_path, small_clip, "ab", monkeypatch)
    a, b = streams
    clock = a.worker.clock
    once = tmp_path / ONCE.format(name="a")
    for s in streams:
        s.start()
    try:
        for deaths in (1, 2):
            await all_live(streams)
            once.touch()
            await until(lambda n=deaths: restarts(streams) == {"a": n, "b": n}, "both restarted after a's crash")
            clock.now += stream_module.SPLIT_WITHIN
        for deaths in (3, 4):
            await all_live(streams)
            os.killpg(a.pid, signal.SIGKILL)
            await until(lambda n=deaths: restarts(streams) == {"a": n, "b": n}, "both restarted after the SIGKILL")
        await all_live(streams)
        pids = (a.pid, b.pid)
    finally:
        await asyncio.gather(*(s.close() for s in streams))
    assert pids[0] == pids[1] and a.worker is b.worker and a.worker.streams == [a, b]
    assert lines(caplog, "split in two") == [] and a.stats.worker_splits == b.stats.worker_splits == 0
    assert len(lines(caplog, "streams=a,b worker exited (code -6)")) == 2


async def test_the_relay_s_own_kills_count_toward_a_split_and_another_s_sigkill_does_not(monkeypatch):
    """A shared process the relay's watchdog kills twice in a row (it hung: some camera wedged it) is split as one
    that crashes; one SIGKILLed twice by another (the OOM killer) is not, nor one the watchdog killed twice before
    it ever sent a picture (slower to start than ``WORKER_STARTUP_GRACE``: no crashing camera; a split is for good).
    No process runs: the watchdog's kill and the ends are driven by hand, the relay's clock frozen."""
    monkeypatch.setattr(stream_module, "signal_group", lambda proc, sig: None)
    settings = EncoderSettings(1_000_000, 30.0, 1.0)

    def shared(names: str) -> Worker:
        streams = [
            Stream(n, parse_source_spec(f"rtsp://10.0.0.{i}/s"), settings, 640, 360) for i, n in enumerate(names)
        ]
        (worker,) = share_workers(streams, per_worker=len(streams))
        worker.clock = Frozen()
        return worker

    hung, killed, slow = shared("abcd"), shared("efgh"), shared("ijkl")
    for _ in range(2):
        hung._up = True  # it sent a picture (came up), then hung
        for worker in (hung, slow):  # slow never came up: it took longer than WORKER_STARTUP_GRACE to start
            for stream in worker.members():
                stream.last_unit = time.monotonic() - stream_module.WORKER_STALL - 1
            await worker._watchdog(types.SimpleNamespace(returncode=None))  # sees it silent, kills it
            await worker._ended(-signal.SIGKILL)
        await killed._ended(-signal.SIGKILL)
    assert [s.name for s in hung.streams] == ["a", "b"] and hung.name == "streams=a,b worker"
    assert [s.name for s in killed.streams] == list("efgh") and all(s.stats.worker_splits == 0 for s in killed.streams)
    assert [s.name for s in slow.streams] == list("ijkl") and all(s.stats.worker_splits == 0 for s in slow.streams)


async def test_a_shared_worker_dying_while_its_streams_close_is_not_split(monkeypatch):
    """Before: a shared process that died twice while the relay closed its streams (its first two released) was
    split all the same: a new process started for two cameras mid-shutdown, and the old one, none of its streams
    open, kept restarting for two closed cameras. Now a worker with a stream closing is not split. No process runs:
    the supervision is stubbed, the ends driven by hand, the relay's clock frozen."""
    monkeypatch.setattr(supervise.Child, "supervise", lambda self: None)
    settings = EncoderSettings(1_000_000, 30.0, 1.0)
    streams = [Stream(n, parse_source_spec(f"rtsp://10.0.0.{i}/s"), settings, 640, 360) for i, n in enumerate("abcd")]
    (worker,) = share_workers(streams, per_worker=len(streams))
    worker.clock = Frozen()
    for stream in streams:
        worker.start(stream)
    for stream in streams[:2]:  # as ``Stream.close`` does, the first two closed before the others
        stream.closing = True
        await worker.release(stream)
    await worker._ended(-signal.SIGABRT)
    await worker._ended(-signal.SIGABRT)
    assert [s.worker for s in streams] == [worker] * 4 and worker.streams == streams, "not split"
    assert all(s.stats.worker_splits == 0 for s in streams)
