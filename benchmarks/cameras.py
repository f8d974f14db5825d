"""Many cameras on one box: N RTSP cameras and one live pixel-clock camera, relayed by each system in turn.

    python -m benchmarks.cameras --cameras 1,4,8,16 --duration 15 --size 1920x1080 --fps 30 --bitrate 4M \\
        --systems camrelay-transcode,camrelay-passthrough,mediamtx --repeats 3 --out docs/results/cameras

The cameras (benchmarks/rtspcams.py) publish into a private mediamtx: N looped
cameras (one clip of the test pattern, encoded once: H.264 High, no B-frames,
1 s GOP; looped with ``-stream_loop -1 -re -c copy``, so they cost almost
nothing) and one live camera (the test pattern drawn live with the pixel
clock, encoded by libx264 with the same settings). Each system then relays all
N + 1 of them, in turn, for each point:

- ``camrelay-transcode``: ``relay serve`` with every camera as a source
  (``rtsp://...#mode=transcode``): decode and encode again, as camrelay does
  with every RTSP source today.
- ``camrelay-passthrough``: the same with ``#mode=passthrough`` (the H.264 as
  the camera sent it). A relay without ``--mode`` (before passthrough) cannot
  run it: the point is reported as not run.
- ``mediamtx``: a second mediamtx whose paths pull each camera over RTSP/TCP
  and serve WebRTC (WHEP) and RTSP, its own RTSP-to-WebRTC path.

Each point: 2 WebRTC viewers per camera (light peers that count frames and
losses, benchmarks/peers.py; one of the live camera's two is the latency
probe), one RTSP reader per camera on the system's RTSP side (PyAV, counting
access units), and the live camera read directly from the camera's own server
in the same window, so that the latency the system adds is "through the
system" minus "direct". Both latency readers are benchmarks/markerprobe.py's:
they decode each access unit at its last RTP packet (the marker bit) and read
its pixel clock, so neither holds a frame of its own (aiortc's jitter buffer
and FFmpeg's H.264 parser, which the probe and the direct reader used before,
hand a frame on only when the next one starts: up to a frame interval each,
which cancelled at p50 and not at p95; those readers are no longer run, as two
more decoders would load the machine the figures are read on). The probe is a
real WebRTC viewer (ICE, DTLS, SRTP) whose decrypted RTP camrelay's own
depacketizer reassembles; the direct reader is camrelay's own RTSP client.
Like with like: added = probe through the system - direct, at p50 and p95; and
frame by frame, the probe's latency minus the direct reader's for the same
picture (the same pixel clock), its p50 and p95. Their counts (units,
units held by the decoder, units dropped or missing) are reported so that a
lost or held frame shows. Reported: the
system's CPU and RSS (all its processes, children included; per camera is over
the N + 1 it relays), latency p50/p95, frames lost per viewer, RTSP readers'
frames, the load generator's CPU (cameras, viewers, readers) and the CPU of
other work on the machine. A point is flagged "saturated" when the machine's
cores were more than 85 % busy, whoever used them. Repeats of a point are
interleaved across systems; the tables show their medians.

The load runs niced (``--light-nice``, ``--load-nice``, 10 by default): the
light viewers, the RTSP readers and the cameras themselves (their server, the
looped ffmpegs, the live camera's pictures and encoder). In a real
installation the cameras are devices with CPUs of their own and the NVRs and
most viewers other machines; at niceness 0 this load (1.2 to 1.5 cores of this
2-core machine at 16 cameras) takes the CPU from whichever system is measured,
above all the live camera's libx264 (half a core, in bursts at every frame),
and the latency read is the scheduler's queue more than the system's
(docs/benchmarks.md, "Many cameras with the load niced"). The two latency
readers (the probe and the direct reader) stay at 0: they measure. Niced, the
live camera may skip frames when the machine is full (its frames are counted,
``rtsp_live``); each frame it sends is timed as before, through the system and
directly. ``--load-nice 0`` runs it as before.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from benchmarks.baselines.mediamtx_whep import render_config as mediamtx_config
from benchmarks.load import CAMRELAY_LOAD_ENV, FPS_GAVE_OUT, GENERATOR_SATURATED, camrelay_command, stop_processes
from benchmarks.markerprobe import read_marked, run_marker_probe
from benchmarks.options import add_stream_options, benchmark_parser, run_facts
from benchmarks.peers import PeerPlan, percentile, run_worker
from benchmarks.ports import free_port, free_udp_port
from benchmarks.resources import cpu_of, process_tree, rss_sum
from benchmarks.rtsp_latency import rtsp_env
from benchmarks.rtspcams import (
    READ_TIMEOUT,
    READER_OPTIONS,
    Camera,
    CameraServer,
    Encoding,
    LiveCamera,
    LoopedCamera,
    default_clip_dir,
    make_clip,
    path_ready,
    spawn,
    tail,
)
from relay.rtsp import find_mediamtx
from relay.source import parse_size

SYSTEMS = ("camrelay-transcode", "camrelay-passthrough", "mediamtx")
# Also runnable, not in the default sweep: camrelay passing through with a worker process per camera
# ([video] cameras_per_worker = 1), beside camrelay-passthrough's shared workers (the config's default, 8 a process).
EXTRA_SYSTEMS = ("camrelay-passthrough-solo",)
MODES = {
    "camrelay-transcode": "transcode",
    "camrelay-passthrough": "passthrough",
    "camrelay-passthrough-solo": "passthrough",
}
# The environment each camrelay system runs with, beyond the load benchmark's.
SYSTEM_ENV = {"camrelay-passthrough-solo": {"CAMRELAY_VIDEO_CAMERAS_PER_WORKER": "1"}}
LIVE = "clock"  # the live camera's path (camrelay keeps "live" for its first stream); the looped: cam0, ...
VIEWERS_PER_CAMERA = 2
# Light viewers per worker process. They count frames at SRTP (peers.py, "webrtc-rtp"): aiortc's own receive
# path (parse, jitter buffer, bitrate estimate, reassembly) kept ten 4 Mbit/s 1080p viewers of one process at
# 5-9 fps at 16 cameras, and even four per process fell behind there.
VIEWERS_PER_WORKER = 8
GOP = 1.0  # seconds: every camera's keyframe interval, as IP cameras are often set
TRANSCODE_MAX = 4  # default cap on cameras for camrelay-transcode: a 1080p30 transcode is ~half a core here
WARMUP = 3.0  # seconds after every viewer and reader has a frame before measuring
START_TIMEOUT = 90.0  # seconds for a system to serve every camera (many workers start at once on 2 cores)
READY_TIMEOUT = 120.0  # seconds for one worker process's viewers or readers to get their first frames
RESULT_TIMEOUT = 60.0  # seconds past the measurement for a worker to hand in its results
RSS_EVERY = 0.5  # seconds between memory samples
POLL = 0.2  # seconds between looks while a system starts


@dataclass
class Served:
    """A system relaying the cameras: where viewers and readers go, which processes are its own."""

    name: str
    whep: dict[str, str]  # camera path: WHEP URL
    rtsp: dict[str, str]  # camera path: RTSP URL on the system's side
    procs: Callable[[], list[psutil.Process]]
    close: Callable[[], None]
    notes: list[str] = field(default_factory=list)
    # The system's own count of frames it dropped, by reason (camrelay's API: viewer_lag, source_loss, ...);
    # None for a system that does not say. Read before and after the window: who lost what viewers lost.
    dropped: Callable[[], dict[str, int]] | None = None


# -- the cameras ----------------------------------------------------------------------------------------------


class CameraSet:
    """N looped cameras and the live one, on a camera server of their own."""

    def __init__(self, n: int, size: str, live_size: str, fps: float, bitrate: str, clip_dir: Path) -> None:
        width, height = parse_size(size)
        self.server = CameraServer()
        clip = make_clip(clip_dir, width, height, fps, bitrate, GOP)
        looped: list[Camera] = [LoopedCamera(self.server, f"cam{i}", clip=clip) for i in range(n)]
        encoding = Encoding(profile="high", gop=GOP, bitrate=bitrate)  # what the clip has, live
        live = LiveCamera(self.server, LIVE, *parse_size(live_size), fps=fps, encoding=encoding)
        self.cameras = [*looped, live]

    def start(self) -> CameraSet:
        self.server.start()
        try:
            for cam in self.cameras:
                cam.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for cam in self.cameras:
            cam.stop()
        self.server.stop()

    def procs(self) -> list[psutil.Process]:
        pids = [self.server.proc.pid] + [p.pid for cam in self.cameras for p in cam.procs]
        return [psutil.Process(pid) for pid in pids]

    @property
    def live_url(self) -> str:
        return self.server.url(LIVE)


# -- the systems ----------------------------------------------------------------------------------------------


@functools.cache
def relay_modes() -> bool:
    """Whether this camrelay takes a per-stream mode (``--mode``, ``#mode=`` on a source): passthrough is in."""
    out = subprocess.run([sys.executable, "-m", "relay", "serve", "--help"], capture_output=True, text=True)
    return "--mode" in out.stdout


def start_camrelay(name: str, cams: CameraSet, args: argparse.Namespace, workdir: Path) -> Served | str:
    """camrelay relaying every camera in ``MODES[name]``; a reason instead when this relay cannot."""
    mode = MODES[name]
    if relay_modes():
        fragment = f"#mode={mode}"
    elif mode == "transcode":
        fragment = ""  # before passthrough, every RTSP source is transcoded; the relay refuses a fragment
    else:
        return "this camrelay has no --mode (passthrough not merged yet)"
    port, rtsp_port = free_port(), free_port()
    sources = {cam.path: cam.url + fragment for cam in cams.cameras}
    cmd = camrelay_command(args.size, args.fps, args.bitrate, port, sources=sources, rtsp=True)
    cmd += ["--size", args.size, "--fps", f"{args.fps:g}"]
    state = workdir / f"{name}-state"
    state.mkdir()
    env = {**os.environ, **CAMRELAY_LOAD_ENV, **rtsp_env(rtsp_port, str(state)), **SYSTEM_ENV.get(name, {})}
    log = workdir / f"{name}.log"
    proc = spawn(cmd, log, env=env)
    main = psutil.Process(proc.pid)
    served = Served(
        name,
        whep={p: f"http://127.0.0.1:{port}/whep/{p}" for p in sources},
        rtsp={p: f"rtsp://127.0.0.1:{rtsp_port}/{p}" for p in sources},
        procs=lambda: process_tree(main),
        close=lambda: stop_processes(proc),
        dropped=lambda: relay_dropped(_streams(port)),
    )
    deadline = time.monotonic() + START_TIMEOUT
    streams: list[dict] = []  # the API's last answer
    while True:
        if proc.poll() is not None:
            return f"camrelay exited with {proc.returncode}: {last_line(log)}"
        streams = _streams(port) or streams
        live = [s for s in streams if s.get("state") == "live" and s.get("rtsp_published", 0) > 0]
        if streams and len(live) == len(streams):
            served.notes += [f"{s['name']}: mode {s['mode']}" for s in streams if s.get("mode", mode) != mode]
            return served
        if time.monotonic() > deadline:
            served.close()
            if not streams:
                return f"its API never answered within {START_TIMEOUT:g} s (load average {os.getloadavg()[0]:.0f})"
            restarts = sum(s.get("worker_restarts", 0) for s in streams)
            stalls = sum(s.get("worker_stalls", 0) for s in streams)
            return (
                f"after {START_TIMEOUT:g} s {len(live)} of {len(sources)} streams live; camera workers restarted"
                f" {restarts} times, {stalls} of them killed for sending nothing for 3 s (load average"
                f" {os.getloadavg()[0]:.0f})"
            )
        time.sleep(POLL)


def last_line(log: Path) -> str:
    lines = tail(log).strip().splitlines()
    return lines[-1] if lines else ""


def relay_dropped(streams: list[dict]) -> dict[str, int]:
    """Frames dropped, by reason, summed over every stream of camrelay's ``/api/v1/streams`` answer."""
    total: dict[str, int] = {}
    for stream in streams:
        for reason, n in (stream.get("frames_dropped") or {}).items():
            total[reason] = total.get(reason, 0) + n
    return total


def _streams(port: int) -> list[dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/streams", timeout=2) as r:
            return json.load(r)["streams"]
    except (OSError, ValueError, KeyError):
        return []


def start_mediamtx(cams: CameraSet, workdir: Path) -> Served | str:
    """A second mediamtx pulling every camera over RTSP/TCP and serving it over WHEP and RTSP."""
    http, api, rtsp = free_port(), free_port(), free_port()
    sources = {cam.path: cam.url for cam in cams.cameras}
    config = workdir / "mediamtx-relay.yml"
    config.write_text(mediamtx_config(http, free_udp_port(), api, rtsp, sources, transport="tcp"))
    log = workdir / "mediamtx-relay.log"
    proc = spawn([find_mediamtx(""), str(config)], log)
    main = psutil.Process(proc.pid)
    served = Served(
        "mediamtx",
        whep={p: f"http://127.0.0.1:{http}/{p}/whep" for p in sources},
        rtsp={p: f"rtsp://127.0.0.1:{rtsp}/{p}" for p in sources},
        procs=lambda: process_tree(main),
        close=lambda: stop_processes(proc),
    )
    deadline = time.monotonic() + START_TIMEOUT
    while not all(path_ready(api, p) for p in sources):
        if proc.poll() is not None or time.monotonic() > deadline:
            served.close()
            return f"mediamtx did not pull every camera: {last_line(log)}"
        time.sleep(POLL)
    return served


def start_system(name: str, cams: CameraSet, args: argparse.Namespace, workdir: Path) -> Served | str:
    if name in MODES:
        return start_camrelay(name, cams, args, workdir)
    return start_mediamtx(cams, workdir)


# -- readers (worker processes) -------------------------------------------------------------------------------


def renice(procs: list[psutil.Process], nice: int) -> None:
    """Every thread of ``procs`` at niceness ``nice`` (Linux's niceness is a thread's: a process's set alone leaves
    the threads it already started, an encoder's, as they were; threads started later inherit their creator's)."""
    refused = 0
    for proc in procs:
        for thread in proc.threads():
            try:
                os.setpriority(os.PRIO_PROCESS, thread.id, nice)
            except ProcessLookupError:  # a thread that ended
                pass
            except PermissionError:  # below the runner's own niceness, without the privilege
                refused += 1
    if refused:
        print(f"--load-nice {nice}: refused for {refused} threads (a lower niceness needs privilege)", file=sys.stderr)


def count_rtsp(
    urls: list[str], duration: float, nice: int, ready: mp.Queue, start: mp.Event, results: mp.Queue
) -> None:
    """One RTSP reader per URL (PyAV, TCP, a thread each): access units received during the measurement. ``nice``:
    its niceness (the readers are load, as the light viewers are; its threads, started later, inherit it)."""
    import av

    if nice:
        os.nice(nice)

    counts = {url: {"url": url, "frames": 0, "error": ""} for url in urls}
    opened = threading.Semaphore(0)

    def read(url: str) -> None:
        out, t0 = counts[url], None
        try:
            with av.open(url, options=READER_OPTIONS, timeout=READ_TIMEOUT) as container:
                opened.release()
                for packet in container.demux(video=0):
                    if packet.size == 0 or not start.is_set():
                        continue
                    t0 = t0 or time.monotonic()
                    if time.monotonic() - t0 > duration:
                        break
                    out["frames"] += 1
        except (av.FFmpegError, OSError) as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
            opened.release()

    threads = [threading.Thread(target=read, args=(url,), daemon=True) for url in urls]
    for t in threads:
        t.start()
    for _ in urls:
        opened.acquire()
    ready.put(("ready", len(urls)))
    for t in threads:
        t.join(READY_TIMEOUT + duration)
    results.put(list(counts.values()))


# -- one point ------------------------------------------------------------------------------------------------


def run_point(
    served: Served, cams: CameraSet, duration: float, fps: float, light_nice: int, load_nice: int = 0
) -> dict:
    """Viewers and readers on every camera of ``served``, measured together for ``duration`` seconds."""
    ctx = mp.get_context("spawn")
    ready, start = ctx.Queue(), ctx.Event()
    n = len(cams.cameras) - 1
    light = [served.whep[c.path] for c in cams.cameras if c.path != LIVE for _ in range(VIEWERS_PER_CAMERA)]
    light += [served.whep[LIVE]] * (VIEWERS_PER_CAMERA - 1)  # the live camera's other viewer decodes
    jobs: list[tuple[str, Callable, tuple, mp.Queue]] = []
    for i in range(0, len(light), VIEWERS_PER_WORKER):
        urls = tuple(light[i : i + VIEWERS_PER_WORKER])
        plan = PeerPlan("webrtc-rtp", "", len(urls), False, duration, fps, light_nice, urls=urls)
        jobs.append(("viewers", run_worker, (plan,), ctx.Queue()))
    jobs.append(("probe", run_marker_probe, (served.whep[LIVE], duration, fps), ctx.Queue()))  # last of the viewers
    jobs.append(("rtsp", count_rtsp, (list(served.rtsp.values()), duration, load_nice), ctx.Queue()))
    jobs.append(("direct", read_marked, (cams.live_url, duration, fps), ctx.Queue()))
    procs, errors = [], []
    try:
        for _, target, head, results in jobs:
            p = ctx.Process(target=target, args=(*head, ready, start, results), daemon=True)
            p.start()
            procs.append(p)
            try:
                msg = ready.get(timeout=READY_TIMEOUT)
            except Exception:
                msg = ("error", f"not connected after {READY_TIMEOUT:g} s")
            if msg[0] == "error":
                errors.append(msg[1])
                break
        if errors:
            return {"system": served.name, "cameras": n, "errors": errors, "gave_out": True}
        time.sleep(WARMUP)
        mine, generator = served.procs(), cams.procs() + [psutil.Process(p.pid) for p in procs]
        for proc in mine + generator:
            proc.cpu_percent(None)
        psutil.cpu_percent(None)
        dropped_before = served.dropped() if served.dropped else None
        t0 = time.monotonic()
        start.set()
        rss = []
        while time.monotonic() - t0 < duration:
            rss.append(rss_sum(mine))
            time.sleep(RSS_EVERY)
        cpu, gen_cpu = cpu_of(mine), cpu_of(generator)
        dropped_after = served.dropped() if served.dropped else None
        machine = psutil.cpu_percent(None) * psutil.cpu_count()  # every process on the machine, % of one core
        out = {kind: results.get(timeout=RESULT_TIMEOUT) for kind, _, _, results in jobs if kind != "viewers"}
        viewers = [v for kind, _, _, results in jobs if kind == "viewers" for v in results.get(timeout=RESULT_TIMEOUT)]
    finally:
        start.set()
        for p in procs:
            p.join(RESULT_TIMEOUT)
            if p.is_alive():
                p.kill()
                p.join()
    point = summarise(served.name, n, viewers, out["probe"], out["rtsp"], out["direct"], duration, fps)
    point.update(cpu_pct=cpu, cpu_per_camera_pct=cpu / (n + 1), rss_mb=max(rss) / 2**20, generator_cpu_pct=gen_cpu)
    point["rss_per_camera_mb"] = point["rss_mb"] / (n + 1)
    point["other_cpu_pct"] = max(0.0, machine - cpu - gen_cpu)  # other work on a shared machine
    point["saturated"] = max(machine, cpu + gen_cpu) > GENERATOR_SATURATED * 100 * psutil.cpu_count()
    point["notes"] = served.notes
    if dropped_before is not None and dropped_after is not None:
        # what the system itself dropped over the window (the readers' own counts stop a little later)
        point["system_dropped"] = {
            reason: n - dropped_before.get(reason, 0) for reason, n in dropped_after.items()
        }  # fmt: skip
    return point


def _pcts(values: list[float]) -> dict:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "samples": len(values)}


# What the marker-bit readers counted (benchmarks/markerprobe.py, MarkerReading), kept in each point.
MARKER_COUNTS = (
    "units", "marked", "frames", "held", "late", "undecodable", "unread", "lost", "packets_lost", "units_dropped",
    "other_packets",
)  # fmt: skip


def paired_added(probe: dict, direct: dict) -> list[float]:
    """Frame by frame, what the system added: the probe's latency minus the direct reader's for each picture both
    decoded (the same pixel clock). What the camera's own encoding and server add to a frame cancels out."""
    own = dict(zip(direct["clocks"], direct["latencies_ms"], strict=True))
    return [ms - own[c] for c, ms in zip(probe["clocks"], probe["latencies_ms"], strict=True) if c in own]


def summarise(
    name: str, n: int, viewers: list[dict], probe: dict, rtsp: list[dict], direct: dict, duration: float, fps: float
) -> dict:
    """One point from what every viewer and reader handed in (``probe``, ``direct``: the marker-bit readers)."""
    through = _pcts(probe["latencies_ms"])
    own = _pcts(direct["latencies_ms"])
    added = {p: through[p] - own[p] if through[p] is not None and own[p] is not None else None for p in ("p50", "p95")}
    viewers = [*viewers, probe]  # the probe is the live camera's second viewer
    fps_median = statistics.median(v["fps"] for v in viewers)
    looped = [r["frames"] for r in rtsp if not r["url"].endswith(f"/{LIVE}")]
    errors = sorted({v["error"] for v in viewers if v["error"]} | {r["error"] for r in rtsp if r["error"]})
    return {
        "system": name,
        "cameras": n,
        "latency_ms": through,
        "direct_latency_ms": own,
        "added_latency_ms": added,
        "paired_added_ms": _pcts(paired_added(probe, direct)),
        "probe": {k: probe[k] for k in MARKER_COUNTS},
        "direct": {k: direct[k] for k in MARKER_COUNTS},
        "viewers": [{k: v[k] for k in ("url", "probe", "frames", "lost", "fps", "error")} for v in viewers],
        "frames_lost": sum(v["lost"] for v in viewers),
        "lost_worst_viewer": max((v["lost"] for v in viewers), default=0),
        "fps_median": fps_median,
        "rtsp_frames": {r["url"].rsplit("/", 1)[1]: r["frames"] for r in rtsp},
        "rtsp_looped_min": min(looped, default=None),  # what the clip cameras sent: duration * fps
        "rtsp_expected": round(duration * fps),
        "rtsp_live": next((r["frames"] for r in rtsp if r["url"].endswith(f"/{LIVE}")), None),
        "direct_frames": direct["frames"],  # what the live camera sent, read at its own server
        "gave_out": fps_median < FPS_GAVE_OUT * fps,
        "errors": errors + ([f"direct reader: {direct['error']}"] if direct["error"] else []),
    }


def not_run(name: str, n: int, reason: str) -> dict:
    return {"system": name, "cameras": n, "not_run": reason}


# -- medians of repeats, tables -------------------------------------------------------------------------------

# The figures a table shows: medians over a point's repeats. Paths into the point's dict.
FIGURES = {
    "cpu_pct": ("cpu_pct",),
    "cpu_per_camera_pct": ("cpu_per_camera_pct",),
    "rss_mb": ("rss_mb",),
    "rss_per_camera_mb": ("rss_per_camera_mb",),
    "latency_p50": ("latency_ms", "p50"),
    "latency_p95": ("latency_ms", "p95"),
    "direct_p50": ("direct_latency_ms", "p50"),
    "direct_p95": ("direct_latency_ms", "p95"),
    "added_p50": ("added_latency_ms", "p50"),
    "added_p95": ("added_latency_ms", "p95"),
    "paired_p50": ("paired_added_ms", "p50"),
    "paired_p95": ("paired_added_ms", "p95"),
    "paired_samples": ("paired_added_ms", "samples"),
    "frames_lost": ("frames_lost",),
    "lost_worst_viewer": ("lost_worst_viewer",),
    "fps_median": ("fps_median",),
    "rtsp_looped_min": ("rtsp_looped_min",),
    "rtsp_live": ("rtsp_live",),
    "direct_frames": ("direct_frames",),
    **{f"{who}_{what}": (who, what) for who in ("probe", "direct") for what in ("units", "held", "lost")},
    "generator_cpu_pct": ("generator_cpu_pct",),
    "other_cpu_pct": ("other_cpu_pct",),
}


def _get(point: dict, path: tuple[str, ...]):
    for key in path:
        point = point.get(key) if isinstance(point, dict) else None
    return point


def median_of_repeats(repeats: list[dict]) -> dict:
    """One row for a (system, cameras) point: each figure's median over the repeats that ran."""
    ran = [p for p in repeats if "not_run" not in p and "latency_ms" in p]
    if not ran:
        return repeats[0] | {"repeats": len(repeats)}
    row = {"system": ran[0]["system"], "cameras": ran[0]["cameras"], "repeats": len(ran)}
    for name, path in FIGURES.items():
        values = [v for p in ran if (v := _get(p, path)) is not None]
        row[name] = statistics.median(values) if values else None
    row["rtsp_expected"] = ran[0]["rtsp_expected"]
    row["saturated"] = sum(p["saturated"] for p in ran)  # in how many repeats
    row["gave_out"] = sum(p["gave_out"] for p in ran)
    row["errors"] = sorted({e for p in ran for e in p["errors"]})
    return row


FLAGS = {"saturated": "saturated", "gave_out": "gave out"}  # a point's flags: in how many of its repeats


def _f(v, d=0) -> str:
    return "—" if v is None else f"{v:.{d}f}"


HEAD = [
    "system", "cameras", "CPU total / per camera (% core)", "RSS total / per camera (MiB)",
    "live camera p50 / p95 (ms)", "camera direct p50 / p95 (ms)", "added p50 / p95 (ms)",
    "added frame by frame p50 / p95 (ms; frames)",
    "frames lost: all viewers / worst viewer", "viewers' fps (median)",
    "RTSP readers' frames: looped cameras fewest / sent; live camera / direct",
    "latency readers' units / held / missing: probe; direct",
    "generator / other work CPU (% core)",
]  # fmt: skip


def markdown(rows: list[dict]) -> str:
    out = ["| " + " | ".join(HEAD) + " |", "| --- |" + " ---: |" * (len(HEAD) - 1)]
    for r in rows:
        if "not_run" in r or "cpu_pct" not in r:
            why = (r.get("not_run") or "; ".join(r.get("errors", [])) or "no result").replace("\n", " ")
            out.append(f"| {r['system']} | {r['cameras']} | not run: {why} |" + " |" * (len(HEAD) - 3))
            continue
        flags = "".join(f" ({what} in {r[key]} of {r['repeats']})" for key, what in FLAGS.items() if r[key])
        cells = [
            r["system"],
            str(r["cameras"]),
            f"{_f(r['cpu_pct'])} / {_f(r['cpu_per_camera_pct'], 1)}",
            f"{_f(r['rss_mb'])} / {_f(r['rss_per_camera_mb'], 1)}",
            f"{_f(r['latency_p50'])} / {_f(r['latency_p95'])}",
            f"{_f(r['direct_p50'])} / {_f(r['direct_p95'])}",
            f"{_f(r['added_p50'])} / {_f(r['added_p95'])}",
            f"{_f(r['paired_p50'], 1)} / {_f(r['paired_p95'], 1)}; {_f(r['paired_samples'])}",
            f"{_f(r['frames_lost'])} / {_f(r['lost_worst_viewer'])}",
            _f(r["fps_median"], 1),
            f"{_f(r['rtsp_looped_min'])} / {r['rtsp_expected']}; {_f(r['rtsp_live'])} / {_f(r['direct_frames'])}",
            "; ".join(
                " / ".join(_f(r[f"{who}_{what}"]) for what in ("units", "held", "lost")) for who in ("probe", "direct")
            ),
            f"{_f(r['generator_cpu_pct'])} / {_f(r['other_cpu_pct'])}" + flags,
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def report(points: list[dict], meta: dict, out: Path) -> str:
    """Write ``<out>.json`` (every repeat, and the medians) and ``<out>.md``; return the table."""
    keys = list(dict.fromkeys((p["system"], p["cameras"]) for p in points))
    rows = [median_of_repeats([p for p in points if (p["system"], p["cameras"]) == k]) for k in keys]
    rows.sort(key=lambda r: (meta["systems"].index(r["system"]), r["cameras"]))
    table = markdown(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "medians": rows, "points": points}, indent=2))
    load = meta["load_average"]
    head = f"{meta['command']}\n\n{meta['date']}, {meta['machine']}, load average (1 min) {load['before'][0]:.1f}"
    head += f" before, {load['after'][0]:.1f} after\n\n{meta['setup']}"
    out.with_suffix(".md").write_text(f"{head}\n\n{table}\n")
    return table


# -- main ------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = benchmark_parser("python -m benchmarks.cameras", __doc__)
    ap.add_argument("--cameras", default="1,4,8,16", help="comma-separated sweep of looped-camera counts")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds measured per point")
    add_stream_options(ap, size="1920x1080")
    ap.set_defaults(bitrate="4M")
    ap.add_argument("--live-size", help="the live camera's size (default: --size); smaller costs the generator less")
    ap.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"which of {', '.join(SYSTEMS + EXTRA_SYSTEMS)}, in order"
    )
    ap.add_argument("--repeats", type=int, default=1, help="runs of every point, interleaved; tables show medians")
    ap.add_argument(
        "--transcode-max", type=int, default=TRANSCODE_MAX, metavar="N",
        help=f"camrelay-transcode only up to N looped cameras (default {TRANSCODE_MAX}): each 1080p30 transcode"
        " takes about half a core here",
    )  # fmt: skip
    ap.add_argument("--light-nice", type=int, default=10, metavar="N", help="niceness of the light viewers")
    ap.add_argument(
        "--load-nice", type=int, default=10, metavar="N",
        help="niceness of the cameras' processes (their server, the looped ffmpegs, the live camera's encoder) and"
        " of the RTSP readers: the load, not what is measured; the two latency readers stay at 0",
    )  # fmt: skip
    ap.add_argument("--clip-dir", default=str(default_clip_dir()), help="where the looped clip is kept")
    ap.add_argument("--out", default="cameras", help="path prefix for the .json and .md outputs")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    for name in names:
        if name not in SYSTEMS + EXTRA_SYSTEMS:
            ap.error(f"--systems: unknown system {name!r}; choose from {', '.join(SYSTEMS + EXTRA_SYSTEMS)}")
    sweep = [int(x) for x in args.cameras.split(",")]
    points: list[dict] = []
    gave_out: set[str] = set()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="camrelay-bench-cameras-") as tmp:
        for n in sweep:
            cams = CameraSet(n, args.size, args.live_size or args.size, args.fps, args.bitrate, Path(args.clip_dir))
            cams.start()
            try:
                if args.load_nice:
                    renice(cams.procs(), args.load_nice)
                for repeat in range(args.repeats):
                    for name in names:
                        point = measure(name, n, cams, args, Path(tmp) / f"{name}-{n}-{repeat}", gave_out)
                        point["repeat"] = repeat
                        print(json.dumps({k: v for k, v in point.items() if k != "viewers"}), flush=True)
                        points.append(point)
            finally:
                cams.stop()
            for name in names:  # past its limit over the repeats' median: no larger point for it
                ran = [p for p in points if p["system"] == name and p["cameras"] == n and "not_run" not in p]
                if ran and statistics.median(p.get("fps_median", 0.0) for p in ran) < FPS_GAVE_OUT * args.fps:
                    gave_out.add(name)
    meta = {
        **run_facts("python -m benchmarks.cameras " + " ".join(argv)),
        "setup": (
            f"N looped cameras at {args.size} {args.fps:g} fps {args.bitrate}bit/s (H.264 High, no B-frames,"
            f" {GOP:g} s GOP) plus one live camera at {args.live_size or args.size}; per camera"
            f" {VIEWERS_PER_CAMERA} WebRTC viewers and one RTSP reader; {args.duration:g} s per point,"
            f" {args.repeats} repeat(s), medians. Per camera = over the N + 1 cameras relayed."
        ),
        "systems": names,
        "relay_has_modes": relay_modes(),
        "load_average": {"before": load_before, "after": os.getloadavg()},  # other work on the machine
        "args": vars(args),
    }
    print()
    print(report(points, meta, Path(args.out)))
    return 0


def measure(name: str, n: int, cams: CameraSet, args: argparse.Namespace, workdir: Path, gave_out: set[str]) -> dict:
    """One point of one system, or why it was not run."""
    if name in gave_out:
        return not_run(name, n, "gave out at fewer cameras")
    if name == "camrelay-transcode" and n > args.transcode_max:
        return not_run(name, n, f"above --transcode-max {args.transcode_max}")
    workdir.mkdir(parents=True)
    served = start_system(name, cams, args, workdir)
    if isinstance(served, str):
        return not_run(name, n, served)
    try:
        return run_point(served, cams, args.duration, args.fps, args.light_nice, args.load_nice)
    finally:
        served.close()


if __name__ == "__main__":
    sys.exit(main())
