"""Throwaway micro-figures: us per unit of the per-unit steps, on the benchmark clip's 1080p units.
Run with PYTHONPATH at main or at the branch; prints one JSON line."""

import json
import os
import time

import av

from relay import h264, ipc, rtsp
from relay.camera import worker
from relay.hub import EncodedFrame
from relay.webrtc import borrowed

NEW = hasattr(h264, "nals_at")
clip = "/tmp/camrelay-bench-clips/pattern-1920x1080-30fps-4M-gop1-10s.mp4"
with av.open(clip) as c:
    st = c.streams.video[0]
    extradata = bytes(st.codec_context.extradata)
    raw = [bytes(p) for p in c.demux(st) if p.size]
length = h264.parse_avcc(extradata).length_size
units = [h264.join_annexb(h264.split_annexb(h264.avcc_to_annexb(u, length))) for u in raw][:300]
sets = h264.extradata_parameter_sets(extradata)
kinds = [tuple(h264.nal_types(u)) for u in units]
starts = [tuple(h264.nal_starts(u)) if NEW else None for u in units]
N = len(units)


def places(i):
    """The unit's NAL places as a keyword, on the branch; nothing on main."""
    return {"nals": starts[i]} if NEW else {}


def bench(fn, reps=5):
    best = None
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(N):
            fn(i)
        d = (time.perf_counter() - t) / N * 1e6
        best = d if best is None or d < best else best
    return round(best, 2)


out = {"new": NEW, "units": N, "mean_bytes": sum(map(len, units)) // N, "idr": sum(5 in k for k in kinds)}
# worker: parameter sets
ps = h264.ParameterSets(sets)
if NEW:
    out["worker_sets_us"] = bench(lambda i: ps.access_unit_at(units[i], kinds[i], starts[i]))
else:
    out["worker_sets_us"] = bench(lambda i: ps.access_unit(units[i], kinds[i]))
# worker: pack
out["worker_pack_us"] = bench(lambda i: ipc.pack(ipc.UNIT, units[i], flags=4, pts=i, capture_time=1.0, **places(i)))
# worker: the send (pipeline._send through a PipeWriter to /dev/null) inside _emitting
fd = os.open("/dev/null", os.O_WRONLY)
emit = worker.PipeWriter(fd, lambda: None)
cfg = ipc.WorkerConfig("cam0", "test:", 320, 240, 30.0, 1_000_000, 1.0, "libx264", mode="passthrough")
pipe = worker.make_pipeline(cfg, 0, emit, shared=True)
msgs = [ipc.pack(ipc.UNIT, units[i], flags=4, pts=i, capture_time=1.0, **places(i)) for i in range(N)]


def send(i):
    with pipe._emitting():
        pipe._send(msgs[i])


out["worker_send_us"] = bench(send)


# relay: parse
def parse(i):
    ipc.Reader().feed(msgs[i])


out["relay_parse_us"] = bench(parse)
parsed = [ipc.Reader().feed(m)[0] for m in msgs]
# relay: viewers' payloads
if NEW:
    out["relay_packetize_us"] = bench(lambda i: borrowed.packetize_nals(h264.nals_at(units[i], starts[i])))
else:
    out["relay_packetize_us"] = bench(lambda i: borrowed.packetize(units[i]))
# relay: keyframe SPS
idrs = [i for i in range(N) if 5 in kinds[i]]


def heads(i):
    for j in idrs:
        h264.head_nals(units[j], starts[j]) if NEW else h264.head_nals(units[j])


t = time.perf_counter()
heads(0)
out["relay_head_nals_us_per_keyframe"] = round((time.perf_counter() - t) / len(idrs) * 1e6, 2)
# relay: RTSP framing (payloads shared with viewers when no places)
framer = rtsp.RtpFramer(0, 1, 0)
frames = [EncodedFrame(units[i], i * 3000, 5 in kinds[i], 1.0 + i / 30, **places(i)) for i in range(N)]
pl = [borrowed.packetize(u) for u in units]
if NEW:
    out["relay_rtsp_frame_us"] = bench(
        lambda i: framer.frame(rtsp.whole_nals(frames[i]), i * 3000, frames[i].capture_time)
    )
    out["rtsp_packets_per_unit"] = round(sum(len(rtsp.whole_nals(f)) for f in frames) / N, 2)
else:
    out["relay_rtsp_frame_us"] = bench(lambda i: framer.frame(pl[i], i * 3000, frames[i].capture_time))
    out["rtsp_packets_per_unit"] = round(sum(map(len, pl)) / N, 2)
print(json.dumps(out))
