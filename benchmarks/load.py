"""The load benchmark: N synthetic viewers, camrelay side by side with the approaches people use today.

    python -m benchmarks.load --peers 1,5,10,20,30,50,100 --duration 15 --size 1280x720 --fps 30 --bitrate 2M \\
        --systems camrelay,mediamtx,mediarelay,seed_mjpeg --out docs/results/load

Systems, each started in turn on loopback with the same test pattern, size,
rate and bitrate (``--spawn``, the default), or an already running relay
(``--target URL``, e.g. on a Pi, with ``--target-pid`` when it runs here):

- ``camrelay``: this project, encode once (``relay serve --no-rtsp``);
  ``camrelay_pysend`` (named in ``--systems`` only) the same with its send
  path in Python (``[webrtc] c_send = false``), and ``camrelay_cviewer``
  with one C call a viewer-frame instead of one a frame for every viewer
  (``[webrtc] c_batch = false``), for the C send path's A/B/C; and
  ``camrelay_base``, the relay of another checkout (``--base-tree``, e.g.
  main's beside a branch's) with this one's interpreter and packages: two
  trees' A/B in one run.
- ``mediamtx``: mediamtx's own WebRTC (WHEP) server fed by camrelay's RTSP
  publish, the best-in-class reference (benchmarks/baselines/mediamtx_whep.py).
- ``mediarelay``: the aiortc tutorial approach, one decoded track shared with
  ``MediaRelay`` and one encoder per viewer (benchmarks/baselines/mediarelay.py).
- ``seed_mjpeg``: MJPEG over a threaded ``http.server`` with one condition
  variable, like the seed system (benchmarks/baselines/seed_mjpeg.py).

For every sweep point, viewers connect from worker processes (see
benchmarks/peers.py): light peers that receive and reassemble every frame
without decoding, and ``--probes`` peers that decode and read the pixel
clock for latency: last (``--probes-at last``, at the end of camrelay's
fan-out), or spread through the join order (``spread``: ``join_order`` says
why), each frame's latency split at its packets' arrivals (``probe_trace``). A system
whose viewers stop getting the picture (median fps under half the source's)
is not pushed to larger points. A point where the load generator and the
system together use more than 85 % of all cores is flagged: its numbers
describe the machine, not the relay.

``--pin`` runs each system on its own cores and the load generator on the
others (``os.sched_setaffinity``; by default the first half of the CPUs for
the system, on 2 cores CPU 0, and the rest for the generator): the system's
every process and thread (camrelay's relay, camera worker and mediamtx;
mediamtx's own process and the camrelay feeding it) and the peers' worker
processes. Its light peers count RTP headers without decrypting
(benchmarks/lightpeer.py), so one core of generator holds hundreds; the
probes still decode. Without ``--peers`` it searches for each system's
viewers per core (benchmarks/capacity.py): the most viewers with the median
viewer at 29 of 30 fps, under 0.5 % of frames lost and p95 latency at most
1.15 times the system's 1-viewer p95, doubling from ``--search-start`` then
bisecting. With ``--peers`` it sweeps those points pinned. The report says
which mode every figure came from.

Writes ``<out>.json``, ``<out>.md`` and ``<out>-latency.png`` / ``<out>-cpu.png``.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from benchmarks import capacity
from benchmarks.options import add_stream_options, benchmark_parser, run_facts
from benchmarks.peers import PEERS_PER_WORKER, PeerPlan, percentile, run_worker
from benchmarks.pinning import Split, add_core_options, pin_tree, split_or_exit, thread_on
from benchmarks.ports import free_port
from benchmarks.resources import cpu_of, process_tree, rss_sum, udp_drops
from relay.webrtc.rtpsend import C_BATCH_ENV, C_SEND_ENV

SYSTEMS = ("camrelay", "mediamtx", "mediarelay", "seed_mjpeg")
# Named in --systems only: camrelay with its send path in Python ([webrtc] c_send off), and with one C call a
# viewer-frame ([webrtc] c_batch off), the C send path's A/B/C in one run (relay/webrtc/rtpsend.py).
EXTRA_SYSTEMS = ("camrelay_pysend", "camrelay_cviewer", "camrelay_base")
# Each camrelay variant's environment beside the load benchmark's own
CAMRELAY_VARIANTS = {
    "camrelay": {},
    "camrelay_pysend": {C_SEND_ENV: "false"},
    "camrelay_cviewer": {C_BATCH_ENV: "false"},
    "camrelay_base": {},  # the relay of --base-tree (``start_system``'s ``tree``)
}
LABELS = {
    "camrelay": "camrelay (encode once)",
    "camrelay_pysend": "camrelay, Python send path",
    "camrelay_cviewer": "camrelay, one C call a viewer-frame",
    "camrelay_base": "camrelay of the base tree",
    "mediamtx": "mediamtx WebRTC (reference)",
    "mediarelay": "aiortc MediaRelay (encode per viewer)",
    "seed_mjpeg": "MJPEG, threaded http.server (seed)",
    "target": "target relay",
}
WARMUP = 3.0  # seconds after every peer has a frame before measuring
GENERATOR_SATURATED = 0.85  # generator + system CPU above this share of all cores: the machine is the limit
LIGHT_BEHIND = 0.9  # light peers' median fps under this share of the source's, while ...
PROBES_KEEP_UP = 0.95  # ... the probes get at least this share: the generator, not the system, fell behind
FPS_GAVE_OUT = 0.5  # median fps under this share of the source's: the system is past its limit
START_TIMEOUT = 30.0  # seconds for a system to come up with frames flowing
READY_TIMEOUT = 120.0  # seconds for one worker's peers to connect
# Header-counting light peers per worker process (--pin): a few thousand datagrams a second each on one event
# loop; fewer processes keep the generator's cores for the peers rather than for interpreters.
LIGHT_PEERS_PER_WORKER = 50
UNPINNED, PINNED = "unpinned", "pinned"  # each point's and run's mode
LAST, SPREAD = "last", "spread"  # where the probes join: after every light peer, or spread through the order
PROBES_AT = (LAST, SPREAD)


@dataclass
class System:
    """A running system under test: where viewers connect and which processes to measure."""

    name: str
    url: str
    port: int  # where url listens
    kind: str  # "webrtc" or "mjpeg"
    serving: Callable[[], list[psutil.Process]]  # the process(es) doing the per-viewer work
    source: Callable[[], list[psutil.Process]]  # capture and encode, when separate
    close: Callable[[], None]


def _wait_frames(proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[2]} exited with {proc.returncode} during start-up")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/streams", timeout=2) as r:
                if json.load(r)["streams"][0]["frames_encoded"] > 0:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{proc.args[2]} did not start")


def stop_processes(*procs: subprocess.Popen) -> None:
    """SIGTERM to all, then wait for each; SIGKILL any still there after 15 s."""
    for p in procs:
        p.terminate()  # a no-op for one that already exited
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _stopper(*procs: subprocess.Popen) -> Callable[[], None]:
    return lambda: stop_processes(*procs)


def camrelay_command(
    size: str,
    fps: float,
    bitrate: str,
    port: int,
    source: str = "",
    sources: dict[str, str] | None = None,
    rtsp: bool = False,
) -> list[str]:
    """``relay serve`` on loopback, open, RTSP off unless ``rtsp``: ``cam0`` from ``source`` (the test pattern
    if ""), or ``sources`` (name: spec)."""
    sources = sources or {"cam0": source or f"test:{size}@{fps:g}"}
    specs = [arg for name, spec in sources.items() for arg in ("--source", f"{name}={spec}")]
    return [
        sys.executable, "-m", "relay", "serve", *specs, "--bitrate", bitrate,
        "--http-host", "127.0.0.1", "--http-port", str(port), "--ice-address", "127.0.0.1",
        "--encoder", "libx264", "--log-level", "warning", "--auth", "none", *([] if rtsp else ["--no-rtsp"]),
    ]  # fmt: skip


# One process each: the command (after the interpreter) and the path viewers read.
SINGLE_PROCESS = {
    "mediarelay": (["-m", "benchmarks.baselines.mediarelay"], "/whep/cam0", "webrtc"),
    "seed_mjpeg": (["-m", "benchmarks.baselines.seed_mjpeg"], "/mjpeg/cam0", "mjpeg"),
}


# The load generator is one address opening many sessions at once: lift the
# per-address limits that protect a real relay from that.
CAMRELAY_LOAD_ENV = {
    "CAMRELAY_WEBRTC_SESSION_BURST": "1000",
    "CAMRELAY_WEBRTC_SESSION_RATE": "1000",
    "CAMRELAY_WEBRTC_MAX_PENDING": "1000",
    "CAMRELAY_WEBRTC_MAX_PENDING_PER_ADDRESS": "1000",
    "CAMRELAY_HTTP_MAX_CONNECTIONS_PER_ADDRESS": "1000",
    "CAMRELAY_WEBRTC_MAX_VIEWERS": "1000",
    "CAMRELAY_WEBRTC_MAX_VIEWERS_TOTAL": "1000",
}


def start_system(
    name: str,
    size: str,
    fps: float,
    bitrate: str,
    source: str = "",
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    tree: str | None = None,
) -> System:
    """Start one system on loopback; ``source`` (camrelay only) replaces the plain test pattern, ``extra`` flags
    and ``env`` variables (camrelay only) are added to its command and environment; ``tree`` (camrelay only): the
    checkout whose ``relay`` package runs (started there, writing no bytecode into it), else this one's."""
    port = free_port()
    if name in CAMRELAY_VARIANTS:
        cmd = [*camrelay_command(size, fps, bitrate, port, source), *extra]
        send = {**CAMRELAY_VARIANTS[name], **({"PYTHONDONTWRITEBYTECODE": "1"} if tree else {})}
        proc = subprocess.Popen(cmd, env={**os.environ, **CAMRELAY_LOAD_ENV, **send, **(env or {})}, cwd=tree)
        _wait_frames(proc, port)
        main = psutil.Process(proc.pid)
        return System(
            name, f"http://127.0.0.1:{port}/whep/cam0", port, "webrtc",
            serving=lambda: [main], source=lambda: process_tree(main)[1:], close=_stopper(proc),
        )  # fmt: skip
    if name in SINGLE_PROCESS:
        module, path, kind = SINGLE_PROCESS[name]
        args = ["--port", str(port), "--size", size, "--fps", f"{fps:g}", "--bitrate", bitrate]
        proc = subprocess.Popen([sys.executable, *module, *args])
        _wait_frames(proc, port)
        main = psutil.Process(proc.pid)
        return System(
            name, f"http://127.0.0.1:{port}{path}", port, kind,
            serving=lambda: [main], source=lambda: [], close=_stopper(proc),
        )  # fmt: skip
    if name == "mediamtx":
        from benchmarks.baselines import mediamtx_whep

        ref = mediamtx_whep.start(size, fps, bitrate)
        mtx, relay = psutil.Process(ref.mediamtx.pid), psutil.Process(ref.camrelay.pid)
        port = int(ref.whep_url.split(":")[2].split("/")[0])
        return System(
            name, ref.whep_url, port, "webrtc",
            serving=lambda: [mtx], source=lambda: process_tree(relay), close=ref.close,
        )  # fmt: skip
    raise ValueError(f"unknown system {name!r}")


def _commit_of(tree: str) -> str:
    """The commit ``tree`` has checked out ("" if git cannot tell), for the record of a two-tree run."""
    try:
        done = subprocess.run(["git", "-C", tree, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def target_system(url: str, pid: int | None) -> System:
    proc = psutil.Process(pid) if pid else None
    kind = "mjpeg" if "/mjpeg/" in url else "webrtc"
    return System(
        "target", url, urlsplit(url).port or 80, kind, serving=lambda: [proc] if proc else [],
        source=lambda: process_tree(proc)[1:], close=lambda: None,
    )  # fmt: skip


def run_point(
    system: System,
    peers: int,
    probes: int,
    duration: float,
    fps: float,
    light_nice: int = 0,
    split: Split | None = None,
    source_apart: bool = False,
    audio: bool = False,
    probes_at: str = LAST,
    light_idle: bool = False,
) -> dict:
    """One sweep point, the probes joining where ``probes_at`` says (``join_order``); with ``split``, the system
    re-pinned to its cores (and read back) and the peers' workers on the generator's, its light peers counting RTP
    headers (and, ``audio``, offering audio and counting its packets too); with ``source_apart`` too, the system's
    source (its camera worker and encoder; for mediamtx, the camrelay that feeds it) on the generator's cores, so
    the system's cores do the fan-out alone."""
    ctx = mp.get_context("spawn")
    ready, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    probes = min(probes, peers)
    light = peers - probes
    kind, per_worker = system.kind, PEERS_PER_WORKER if system.kind == "webrtc" else 2 * PEERS_PER_WORKER
    cores: tuple[int, ...] = ()
    if split is not None:
        cores = split.generator
        if system.kind == "webrtc":
            kind, per_worker = "webrtc-rtp", LIGHT_PEERS_PER_WORKER
    order = join_order(light, probes, per_worker, probes_at)
    plans = [
        PeerPlan(
            kind if not probe else system.kind,
            system.url,
            count,
            probe,
            duration,
            fps,
            light_nice if not probe else 0,
            light_idle=light_idle and not probe,
            cores=cores,
            audio=audio and kind == "webrtc-rtp" and not probe,
            joined_after=sum(c for _, c in order[:i]),
        )  # fmt: skip
        for i, (probe, count) in enumerate(order)
    ]
    procs, errors = [], []
    for plan in plans:
        p = ctx.Process(target=run_worker, args=(plan, ready, start, results), daemon=True)
        p.start()
        procs.append(p)
        try:
            msg = ready.get(timeout=READY_TIMEOUT)  # one worker at a time: probes really do join last
        except Exception:
            msg = ("error", f"peers not connected after {READY_TIMEOUT:g} s")
        if msg[0] == "error":
            errors.append(msg[1])
            break
    if errors:
        start.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        return {"peers": peers, "errors": errors, "gave_out": True}
    time.sleep(WARMUP)
    workers = [psutil.Process(p.pid) for p in procs]
    serving, source = system.serving(), system.source()
    everything = serving + source
    placed = None
    if split is not None:
        placed = pin_tree(serving, split.system) + pin_tree(source, split.generator if source_apart else split.system)
    for proc in [*everything, *workers]:
        proc.cpu_percent(None)
    counters_before, udp_before = relay_stream(system.url), udp_drops()
    t0, wall0 = time.monotonic(), time.time()
    start.set()
    rss = []
    while time.monotonic() - t0 < duration:
        rss.append(rss_sum(everything))
        time.sleep(0.5)
    serving_cpu, source_cpu = cpu_of(serving), cpu_of(source)
    wall1 = time.time()
    gen_cpu = cpu_of(workers)
    counters_after, udp_after = relay_stream(system.url), udp_drops()
    inside = relay_send_delay(counters_after)
    peer_results = [r for _ in procs for r in results.get(timeout=60)]
    for p in procs:
        p.join(30)
    point = summarise(
        peers, probes, peer_results, serving_cpu, source_cpu, gen_cpu, rss, duration, fps, split, source_apart
    )
    if audio:
        point["audio"] = audio_counts(peer_results, duration)
    point["relay_send_delay_ms"] = inside
    # the measured window (wall clock) and the serving processes: benchmarks.loopcost reads a relay's timed callbacks
    point["window"], point["serving_pids"] = [wall0, wall1], [p.pid for p in serving]
    point["relay_overload"] = overload_counts(counters_before, counters_after, peers)
    if udp_before is not None and udp_after is not None:  # the whole machine's: other work's drops count too
        point["udp_dropped"] = {k: udp_after[k] - udp_before[k] for k in udp_after}
        if light_peers_overflowed(point["udp_dropped"], peer_results):
            point["generator_saturated"] = point["light_peers_overflowed"] = True
    if placed is not None:
        point["system_processes"] = placed  # each with its CPUs as read back
        point["generator_workers_cores"] = sorted({c for r in peer_results for c in r.get("cores", [])})
    return point


def light_peers_overflowed(udp_dropped: dict[str, int], peer_results: list[dict]) -> bool:
    """Datagrams dropped at full receive buffers while every probe got every frame: the light peers' sockets
    overflowed (below the probes in priority, at SCHED_IDLE run only when nothing else wants their core), not what
    the system sent. The generator, not the system, is the limit at such a point."""
    probes = [r for r in peer_results if r["probe"]]
    return udp_dropped.get("rcvbuf", 0) > 0 and bool(probes) and not any(r["lost"] for r in probes)


def join_order(light: int, probes: int, per_worker: int, probes_at: str = LAST) -> list[tuple[bool, int]]:
    """The worker processes of a point in the order they join, each (probes?, peers): light peers ``per_worker``
    a process; the probes all together after them (``LAST``), or (``SPREAD``) one a process, the i-th of ``probes``
    after (i + 1/2) / probes of the viewers, so they sample the fan-out's order evenly.

    camrelay sends to its viewers in the order they joined, each frame the same: probes joining last measure its
    last viewer. mediamtx hands each frame to its readers in the order of a Go map's iteration, a new random one
    each frame: its probes measure a viewer anywhere in the order. ``SPREAD`` measures both systems' viewers
    alike."""
    if probes_at not in PROBES_AT:
        raise ValueError(f"probes_at: {probes_at!r}; one of {', '.join(PROBES_AT)}")
    order: list[tuple[bool, int]] = []

    def add_light(count: int) -> None:
        order.extend((False, min(per_worker, count - i)) for i in range(0, count, per_worker))

    if probes_at == LAST or not probes:
        add_light(light)
        return order + ([(True, probes)] if probes else [])
    total, placed = light + probes, 0
    for i in range(probes):
        before = min(light, max(0, round((i + 0.5) * total / probes) - i) - placed)  # light peers ahead of it
        add_light(before)
        placed += before
        order.append((True, 1))
    add_light(light - placed)
    return order


def audio_counts(peer_results: list[dict], duration: float) -> dict:
    """What the light peers offering audio received of it: Opus packets a second per viewer, and the share lost."""
    light = [r for r in peer_results if not r["probe"]]
    packets = sum(r.get("audio_packets", 0) for r in light)
    lost = sum(r.get("audio_packets_lost", 0) for r in light)
    return {
        "viewers": len(light),
        "packets_per_viewer_s": packets / duration / len(light) if light else 0.0,
        "lost_pct": 100 * lost / (packets + lost) if packets + lost else 0.0,
    }


def relay_stream(url: str) -> dict | None:
    """camrelay's ``/api/v1/streams`` entry of the stream ``url`` (a WHEP URL) watches; None for other systems."""
    u = urlsplit(url)
    if not u.path.startswith("/whep/"):
        return None
    try:
        with urllib.request.urlopen(f"{u.scheme}://{u.netloc}/api/v1/streams", timeout=5) as r:
            streams = {s["name"]: s for s in json.load(r)["streams"]}
        return streams[u.path.rsplit("/", 1)[1]]
    except (OSError, KeyError, ValueError):
        return None


def relay_send_delay(stream: dict | None) -> dict | None:
    """camrelay's own delay percentiles, capture to hub and hub to sender (None for other systems)."""
    try:
        return {"pipeline": stream["pipeline_delay_ms"], "fanout": stream["fanout_delay_ms"]}
    except (KeyError, TypeError):  # not camrelay (a baseline that serves WHEP at the same path), or none
        return None


# camrelay's own counters of how it met the point's load (``/api/v1/streams``), read before and after the window.
OVERLOAD_COUNTERS = {
    "frames_encoded": lambda s: s["frames_encoded"],  # what the source delivered to the hub
    "frames_delivered": lambda s: s["fanout"]["delivered"],  # handed to viewers' senders, once per viewer
    "frames_batched": lambda s: s["fanout"]["batched"],  # of them, in the stream's one call a frame (the rest alone)
    "resyncs": lambda s: s["fanout"]["resyncs"],  # a viewer fell behind and went back to a keyframe
    "lag_keyframe_requests": lambda s: s["fanout"]["keyframe_requests"],  # keyframes asked of the encoder for them
    "lag_keyframe_requests_coalesced": lambda s: s["fanout"]["keyframe_requests_coalesced"],  # served by those
    "keyframes": lambda s: s["keyframes"],
    "keyframes_forced": lambda s: s["keyframes_forced"],
    "frames_dropped": lambda s: s["frames_dropped"]["viewer_lag"],  # frames the hub threw away for laggards
    "encoder_busy": lambda s: s["frames_dropped"]["encoder_busy"],  # camera frames the encoder had no time for
    "retransmits": lambda s: s["fanout"]["retransmits"],  # packets sent again for viewers' NACKs
    "retransmits_refused": lambda s: s["fanout"]["retransmits_refused"],  # NACKed past a viewer's budget
}


def overload_counts(before: dict | None, after: dict | None, viewers: int) -> dict | None:
    """What camrelay counted over the window (``after`` less ``before``, two stream entries), and per viewer;
    counters an older camrelay lacks are left out. None for other systems."""
    if before is None or after is None or "pipeline_delay_ms" not in after:  # a baseline serving WHEP
        return None
    counts: dict = {}
    for name, read in OVERLOAD_COUNTERS.items():
        try:
            counts[name] = read(after) - read(before)
        except (KeyError, TypeError):
            continue
    counts["per_viewer"] = {k: v / viewers for k, v in counts.items()} if viewers else {}
    return counts


def summarise(
    peers: int,
    probes: int,
    peer_results: list[dict],
    serving_cpu: float,
    source_cpu: float,
    gen_cpu: float,
    rss: list[int],
    duration: float,
    fps: float,
    split: Split | None = None,
    source_apart: bool = False,
) -> dict:
    """One sweep point from every peer's result; ``split``: pinned, each side judged against its own cores (with
    ``source_apart``, the source's CPU counted on the generator's side, where it ran)."""
    got = [r["fps"] for r in peer_results]
    light_fps = [r["fps"] for r in peer_results if not r["probe"]]
    probe_fps = [r["fps"] for r in peer_results if r["probe"]]
    lat = [x for r in peer_results if r["probe"] for x in r["latencies_ms"]]
    ttff = [r["first_frame_ms"] for r in peer_results if r["first_frame_ms"] is not None]
    frames = sum(r["frames"] for r in peer_results)
    lost = sum(r["lost"] for r in peer_results)
    relay_cpu = serving_cpu + source_cpu
    cores = psutil.cpu_count()
    fps_median = statistics.median(got) if got else 0.0
    if split is None:
        machine_full = gen_cpu + relay_cpu > GENERATOR_SATURATED * 100 * cores
    else:
        machine_full = gen_cpu + (source_cpu if source_apart else 0.0) > GENERATOR_SATURATED * 100 * len(
            split.generator
        )
    return {
        "peers": peers,
        "probes": probes,
        "mode": UNPINNED if split is None else PINNED,
        **({} if split is None else {"system_cores": list(split.system), "generator_cores": list(split.generator)}),
        "latency_ms": {
            "p50": percentile(lat, 50),
            "p95": percentile(lat, 95),
            "p99": percentile(lat, 99),
            "samples": len(lat),
        },
        "fps": {"min": min(got) if got else 0.0, "median": fps_median},
        "frames": frames,
        "frames_lost": lost,
        "packets_lost": sum(r.get("packets_lost", 0) for r in peer_results),
        "lost_pct": 100 * lost / (frames + lost) if frames + lost else 0.0,
        "first_frame_ms": {"p50": percentile(ttff, 50), "max": max(ttff) if ttff else None},
        "relay_cpu_pct": relay_cpu,  # every process of the system, % of one core
        "serving_cpu_pct": serving_cpu,  # the process doing per-viewer work
        "relay_rss_mb": max(rss) / 2**20 if rss else None,
        "egress_mbps": sum(r["bytes"] for r in peer_results) * 8 / duration / 1e6,
        "generator_cpu_pct": gen_cpu,
        # The machine is the limit: busy cores (pinned: the generator's), or light peers (lower
        # priority) falling behind while the probes (the measurement) still get every frame.
        "generator_saturated": machine_full
        or (
            bool(light_fps)
            and statistics.median(light_fps) < LIGHT_BEHIND * fps
            and bool(probe_fps)
            and min(probe_fps) >= PROBES_KEEP_UP * fps
        ),
        "gave_out": fps_median < FPS_GAVE_OUT * fps,
        # Pinned: the system's own cores full (it, not the generator, is the limit there).
        **(
            {}
            if split is None
            else {
                "system_saturated": (serving_cpu if source_apart else relay_cpu)
                > GENERATOR_SATURATED * 100 * len(split.system),
                "source_apart": source_apart,
            }
        ),
        "errors": sorted({r["error"] for r in peer_results if r["error"]}),
        "probe_trace": probe_trace(peer_results),
    }


def probe_trace(peer_results: list[dict]) -> dict | None:
    """The probes' decoded frames, split (``peers.ArrivalTrace``): p50 and p95 of each arrival, ms after capture,
    and the median packets and bytes a frame; None without traces (not WebRTC, or an older peer)."""
    joined: dict[str, list[float]] = {}
    for r in peer_results:
        for name, values in (r.get("trace") or {}).items():
            joined.setdefault(name, []).extend(values)
    if not joined.get("decoded"):
        return None
    out: dict = {
        name: {"p50": percentile(v, 50), "p95": percentile(v, 95)}
        for name, v in joined.items()
        if name not in ("packets", "bytes")
    }
    out["packets_per_frame"] = statistics.median(joined["packets"])
    out["bytes_per_frame"] = statistics.median(joined["bytes"])
    # Each probe apart, by where its worker joined: in camrelay's fan-out, the order viewers joined in
    out["by_probe"] = sorted(
        (
            {
                "joined_after": r.get("joined_after", 0),
                **{k: percentile(r["trace"][k], 50) for k in ("first_packet", "decoded")},
                "decoded_p95": percentile(r["trace"]["decoded"], 95),
            }
            for r in peer_results
            if (r.get("trace") or {}).get("decoded")
        ),
        key=lambda p: p["joined_after"],
    )
    return out


# -- reports ----------------------------------------------------------------


def _f(v, d=0) -> str:
    return "—" if v is None else f"{v:.{d}f}"


def markdown(runs: dict[str, list[dict]]) -> str:
    head = [
        "system", "viewers", "latency p50 / p95 / p99 (ms)", "fps min / median", "lost (%)",
        "first frame p50 / max (ms)", "in relay: pipeline / fan-out p95 (ms)",
        "relay CPU, all / serving (% core)", "RSS (MiB)", "egress (Mbit/s)",
        "generator CPU (% core)",
    ]  # fmt: skip
    rows = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for name, points in runs.items():
        for p in points:
            if p.get("errors") and "fps" not in p:
                rows.append(f"| {name} | {p['peers']} | not connected: {p['errors'][0]} |" + " |" * (len(head) - 3))
                continue
            lat, fps, ff = p["latency_ms"], p["fps"], p["first_frame_ms"]
            flags = (" (saturated)" if p["generator_saturated"] else "") + (" (gave out)" if p["gave_out"] else "")
            cells = [
                name,
                str(p["peers"]),
                f"{_f(lat['p50'])} / {_f(lat['p95'])} / {_f(lat['p99'])}",
                f"{_f(fps['min'], 1)} / {_f(fps['median'], 1)}",
                _f(p["lost_pct"], 2),
                f"{_f(ff['p50'])} / {_f(ff['max'])}",
                _inside(p.get("relay_send_delay_ms")),
                f"{_f(p['relay_cpu_pct'])} / {_f(p['serving_cpu_pct'])}",
                _f(p["relay_rss_mb"]),
                _f(p["egress_mbps"], 1),
                _f(p["generator_cpu_pct"]) + flags,
            ]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def trace_markdown(runs: dict[str, list[dict]]) -> str:
    """Each point's ``probe_trace`` as a table; "" when no point has one."""
    rows = [
        "| system | viewers | first packet | last packet | next frame's first | decoded | packets / bytes a frame"
        " | each probe: viewers joined before it, first packet / decoded p50 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, points in runs.items():
        for p in points:
            t = p.get("probe_trace")
            if not t:
                continue
            cells = [f"{_f(t[k]['p50'])} / {_f(t[k]['p95'])}" for k in ("first_packet", "last_packet", "next_frame")]
            probes = ", ".join(
                f"{b['joined_after']}: {_f(b['first_packet'])} / {_f(b['decoded'])}" for b in t.get("by_probe", [])
            )
            rows.append(
                f"| {name} | {p['peers']} | {' | '.join(cells)} | {_f(t['decoded']['p50'])} / {_f(t['decoded']['p95'])}"
                f" | {_f(t['packets_per_frame'])} / {_f(t['bytes_per_frame'])} | {probes} |"
            )
    return "\n".join(rows) if len(rows) > 2 else ""


def overload_markdown(runs: dict[str, list[dict]]) -> str:
    """Where each point's frames went (``relay_overload``, ``udp_dropped``); "" when no point has the counts."""
    rows = [
        "| system | viewers | frames encoded | handed to each viewer | dropped for lag, per viewer | resyncs"
        " (per viewer) | keyframes asked for laggards | keyframes, forced | UDP datagrams dropped, machine-wide"
        " (receive buffers full) | viewers' fps median / lost (%) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, points in runs.items():
        for p in points:
            c = p.get("relay_overload")
            if not c or "fps" not in p:
                continue
            per = c["per_viewer"]
            udp = p.get("udp_dropped") or {}
            rows.append(
                f"| {name} | {p['peers']} | {c.get('frames_encoded', '—')} | {_f(per.get('frames_delivered'), 1)} |"
                f" {_f(per.get('frames_dropped'), 1)} | {c.get('resyncs', '—')} ({_f(per.get('resyncs'), 2)}) |"
                f" {c.get('lag_keyframe_requests', '—')} |"
                f" {c.get('keyframes', '—')}, {c.get('keyframes_forced', '—')} | {udp.get('rcvbuf', '—')} |"
                f" {_f(p['fps']['median'], 1)} / {_f(p['lost_pct'], 2)} |"
            )
    return "\n".join(rows) if len(rows) > 2 else ""


def _inside(d: dict | None) -> str:
    return "—" if not d else f"{_f(d['pipeline']['p95'])} / {_f(d['fanout']['p95'], 1)}"


def per_viewer_cpu(points: list[dict], key: str = "relay_cpu_pct") -> float | None:
    """Least-squares slope of CPU (``key``) against viewers, in % of a core per added viewer.

    Points where the system gave out or the machine was saturated are left out: their CPU is capped.
    """
    pts = [(p["peers"], p[key]) for p in points if key in p and not p["gave_out"] and not p.get("generator_saturated")]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den else None


def plot(runs: dict[str, list[dict]], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    made = []
    for what, key, ylabel in (
        ("latency", "latency", "glass-to-glass latency (ms), p95 solid, p50 dashed"),
        ("cpu", "relay_cpu_pct", "relay CPU (% of one core), all its processes"),
    ):
        fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
        for i, (name, points) in enumerate(runs.items()):
            ok = [p for p in points if "fps" in p]
            color = f"C{i}"
            xs = [p["peers"] for p in ok]
            if key == "latency":
                ax.plot(xs, [p["latency_ms"]["p95"] for p in ok], "o-", color=color, label=LABELS.get(name, name))
                ax.plot(xs, [p["latency_ms"]["p50"] for p in ok], "o--", color=color, alpha=0.5)
            else:
                ax.plot(xs, [p[key] for p in ok], "o-", color=color, label=LABELS.get(name, name))
            for p in ok:
                note = "gave out" if p["gave_out"] else "machine saturated" if p["generator_saturated"] else ""
                y = p["latency_ms"]["p95"] if key == "latency" else p[key]
                if note and y is not None:
                    ax.annotate(note, (p["peers"], y), textcoords="offset points", xytext=(4, 4), fontsize=7, c=color)
        ax.set_xlabel("viewers")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if key == "latency":
            # A system past its limit reaches seconds; a log scale keeps the working range readable.
            ax.set_yscale("log")
            ax.set_yticks([10, 20, 50, 100, 200, 500, 1000, 2000, 5000])
            ax.get_yaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        else:
            ax.set_ylim(bottom=0)
        ax.legend(loc="upper right")
        fig.tight_layout()
        path = out.with_name(f"{out.name}-{what}.png")
        fig.savefig(path)
        plt.close(fig)
        made.append(path)
    return made


# -- main ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = benchmark_parser("python -m benchmarks.load", __doc__)
    ap.add_argument(
        "--peers", help="comma-separated sweep of viewer counts (default 1,5,10,20,30,50,100; with --pin: search)"
    )
    ap.add_argument("--probes", type=int, default=2, help="decoding peers that read the pixel clock, per point")
    ap.add_argument(
        "--probes-at",
        choices=PROBES_AT,
        default=LAST,
        help="where the probes join: last (camrelay's last viewer in its fan-out), or spread through the join order"
        " (join_order says why)",
    )
    ap.add_argument("--duration", type=float, default=15.0, help="seconds measured per point")
    add_stream_options(ap)
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"which of {', '.join(SYSTEMS)}, in order")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--spawn", action="store_true", default=True, help="start each system on loopback (default)")
    where.add_argument("--target", help="WHEP or MJPEG URL of a relay already running")
    ap.add_argument("--target-pid", type=int, help="the target's process id, when it runs here: its CPU is measured")
    ap.add_argument(
        "--light-nice", type=int, default=10, metavar="N",
        help="niceness of the light peers' processes (default 10): probes, which measure, get the CPU first",
    )  # fmt: skip
    ap.add_argument(
        "--light-idle", action="store_true",
        help="the light peers at SCHED_IDLE: the probes and the system's source take their core at once when they"
        " wake (niceness only weighs the share); the light peers get what nobody else wants",
    )  # fmt: skip
    pin = ap.add_argument_group("pinned (--pin)")
    pin.add_argument("--pin", action="store_true", help="the system on its cores, the load generator on the others")
    pin.add_argument(
        "--audio", action="store_true", help="light peers offer audio too and count its packets (the test pattern's)"
    )
    add_core_options(pin)
    pin.add_argument("--search-start", type=int, default=capacity.START, metavar="N", help="first point after 1 viewer")
    pin.add_argument("--search-max", type=int, default=capacity.CEILING, metavar="N", help="the search goes no higher")
    pin.add_argument(
        "--search-points", type=int, default=capacity.MAX_POINTS, metavar="N", help="points after 1 viewer"
    )
    pin.add_argument(
        "--point-repeats", type=int, default=1, metavar="R",
        help="measure each point of the search R times (the 1-viewer baseline too), judged by their medians",
    )  # fmt: skip
    pin.add_argument(
        "--source-apart", action="store_true",
        help="the system's source (camera worker and its encoder; for mediamtx, the camrelay feeding it) on the"
        " generator's cores: the system's cores do the fan-out alone",
    )  # fmt: skip
    ap.add_argument(
        "--base-tree", metavar="PATH", help="the checkout camrelay_base runs its relay from (e.g. main's worktree)"
    )
    ap.add_argument("--out", default="load", help="path prefix for the .json, .md and .png outputs")
    ap.add_argument("--no-plots", dest="plots", action="store_false")
    ap.add_argument("--from-json", metavar="PATH", help="measure nothing: redo the table and plots of an earlier run")
    args = ap.parse_args(argv)
    if args.from_json:
        earlier = json.loads(Path(args.from_json).read_text())
        report(earlier["runs"], earlier["meta"], Path(args.out), args.plots, earlier.get("capacity"))
        return 0

    names = ["target"] if args.target else [s.strip() for s in args.systems.split(",") if s.strip()]
    for n in names:
        if n not in (*SYSTEMS, *EXTRA_SYSTEMS, "target"):
            ap.error(f"--systems: unknown system {n!r}; choose from {', '.join(SYSTEMS + EXTRA_SYSTEMS)}")
    if ("camrelay_base" in names) != bool(args.base_tree):
        ap.error("camrelay_base and --base-tree go together")
    if args.base_tree and not (Path(args.base_tree) / "relay" / "__main__.py").is_file():
        ap.error(f"--base-tree: {args.base_tree} holds no relay package")
    split = None
    if args.pin:
        split = split_or_exit(ap, args)
        for what, n in (
            ("--search-start", args.search_start), ("--search-max", args.search_max),
            ("--search-points", args.search_points), ("--point-repeats", args.point_repeats),
        ):  # fmt: skip
            if n < 1:
                ap.error(f"{what}: {n}; at least 1")
        if args.target and not args.target_pid:
            ap.error("--pin with --target needs --target-pid: the target's processes are pinned by it")
        os.sched_setaffinity(0, split.generator)  # this process (no thread yet) and the peers' workers it spawns
        print(f"pinned: the {_placement(split.system, split.generator, args.source_apart)}", flush=True)
    elif args.audio:
        ap.error("--audio needs --pin: only the light peers (pinned) count audio")
    elif args.source_apart or args.point_repeats != 1:
        ap.error("--source-apart and --point-repeats go with --pin")
    search = args.pin and args.peers is None
    sweep = [int(x) for x in (args.peers or "1,5,10,20,30,50,100").split(",")]
    runs: dict[str, list[dict]] = {}
    found: dict[str, dict] = {}
    for name in names:
        system = target_system(args.target, args.target_pid) if args.target else None
        if system is None:
            with thread_on(split.system) if split else contextlib.nullcontext():
                tree = args.base_tree if name == "camrelay_base" else None
                system = start_system(name, args.size, args.fps, args.bitrate, tree=tree)
        runs[name] = []

        def measure(n: int, name: str = name, system: System = system) -> dict:
            point = run_point(
                system, n, args.probes, args.duration, args.fps, args.light_nice, split, args.source_apart, args.audio,
                args.probes_at, args.light_idle,
            )  # fmt: skip
            point["system"] = name
            print(json.dumps(point), flush=True)
            runs[name].append(point)
            return point

        try:
            if search:
                found[name] = search_capacity(name, measure, args, split)
                runs[name].sort(key=lambda p: p["peers"])
                continue
            for n in sweep:
                if measure(n)["gave_out"]:
                    print(f"{name}: gave out at {n} viewers; larger points skipped", flush=True)
                    break
        finally:
            system.close()

    meta = {
        **run_facts("python -m benchmarks.load " + " ".join(argv)),
        "size": args.size, "fps": args.fps, "bitrate": args.bitrate, "probes": args.probes,
        "probes_at": args.probes_at,
        "duration": args.duration, "cpu_count": os.cpu_count(),
        "light_nice": args.light_nice, "light_idle": args.light_idle, "audio": args.audio,
        "mode": UNPINNED if split is None else PINNED,
        **({} if split is None else {"system_cores": list(split.system), "generator_cores": list(split.generator),
                                     "source_apart": args.source_apart, "point_repeats": args.point_repeats}),
        **({"base_tree": args.base_tree, "base_commit": _commit_of(args.base_tree)} if args.base_tree else {}),
    }  # fmt: skip
    report(runs, meta, Path(args.out), args.plots, found or None)
    return 0


def _cpus(cores) -> str:
    return ",".join(str(c) for c in cores)


def search_capacity(name: str, measure: Callable[[int], dict], args, split: Split) -> dict:
    """Viewers per core for one system (benchmarks/capacity.py): its 1-viewer point, then the search; each point
    measured ``--point-repeats`` times and judged by the medians (``capacity.median_point``)."""

    def measured(n: int) -> dict:
        return capacity.median_point([measure(n) for _ in range(args.point_repeats)])

    base = measured(1)
    base_p95 = base.get("latency_ms", {}).get("p95")
    base["search"] = "1-viewer baseline"
    tried: dict[int, capacity.Verdict] = {}
    points: dict[int, dict] = {}
    while True:
        n = capacity.next_viewers(
            {k: v.carried for k, v in tried.items()}, args.search_start, args.search_max, args.search_points
        )
        if n is None:
            break
        point = points[n] = base if n == 1 else measured(n)  # the baseline is the 1-viewer point
        v = tried[n] = capacity.verdict(point, base_p95, args.fps)
        point["search"] = ("1-viewer baseline, " if n == 1 else "") + (
            "carried" if v.carried else "not carried: " + "; ".join(v.reasons)
        )
        print(f"{name}: {n} viewers {point['search']}", flush=True)
    r = capacity.result(tried, len(split.system))
    best = points.get(r.viewers)
    summary = {
        "viewers_per_core": r.per_core,
        "viewers": r.viewers,
        "at_least": r.at_least,
        "first_not_carried": r.first_failure,
        "why": list(r.why),
        "base_p95_ms": base_p95,
        "at_best": None if best is None else _headline(best),
        "at_first_failure": None if r.first_failure is None else _headline(points[r.first_failure]),
        "system_cores": list(split.system),
        "generator_cores": list(split.generator),
        "criteria": {
            "min_median_fps": args.fps - capacity.FPS_SLACK,
            "max_lost_pct": capacity.MAX_LOST_PCT,
            "max_p95_ratio": capacity.MAX_P95_RATIO,
        },
        "points": sorted(tried),
    }
    more = "at least " if r.at_least else ""
    print(f"{name}: {more}{r.per_core:g} viewers per core ({r.viewers} on CPUs {_cpus(split.system)})", flush=True)
    return summary


def _headline(p: dict) -> dict:
    """A point's figures the viewers-per-core summary quotes."""
    if "fps" not in p:
        return {"peers": p["peers"], "errors": p.get("errors", [])}
    return {
        "peers": p["peers"], "fps_median": p["fps"]["median"], "lost_pct": p["lost_pct"],
        "p95_ms": p["latency_ms"]["p95"], "relay_cpu_pct": p["relay_cpu_pct"],
        "generator_cpu_pct": p["generator_cpu_pct"],
    }  # fmt: skip


def capacity_markdown(found: dict[str, dict]) -> str:
    """The viewers-per-core table of a pinned search."""
    rows = [
        "| system | viewers per core | on CPUs (generator on) | 1-viewer p95 (ms) | at the most carried:"
        " fps median / lost (%) / p95 (ms) / system CPU (% core) | first not carried, why |",
        "| --- | ---: | --- | ---: | --- | --- |",
    ]
    for name, c in found.items():
        best = c["at_best"]
        at = (
            "—"
            if best is None
            else f"{best['peers']}: {_f(best['fps_median'], 1)} / {_f(best['lost_pct'], 2)} / {_f(best['p95_ms'])}"
            f" / {_f(best['relay_cpu_pct'])}"
        )
        first = "none up to the search's end" if c["first_not_carried"] is None else str(c["first_not_carried"])
        why = f"{first}: {'; '.join(c['why'])}" if c["why"] else first
        failed = c.get("at_first_failure") or {}
        if "relay_cpu_pct" in failed:
            why += (
                f" (CPU % of a core: system {_f(failed['relay_cpu_pct'])}, generator {_f(failed['generator_cpu_pct'])})"
            )
        rows.append(
            f"| {name} | {'≥ ' if c['at_least'] else ''}{c['viewers_per_core']:g} |"
            f" {_cpus(c['system_cores'])} ({_cpus(c['generator_cores'])}) | {_f(c['base_p95_ms'])} | {at} | {why} |"
        )
    return "\n".join(rows)


def _placement(system, generator, source_apart: bool) -> str:
    """Where a pinned run put what: "system under test (...) on CPUs 0, the load generator (...) on CPUs 1"."""
    where = "its fan-out" if source_apart else "all its processes"
    source = ", with the system's source" if source_apart else ""
    return (
        f"system under test ({where}) on CPUs {_cpus(system)},"
        f" the load generator (peer workers{source}) on CPUs {_cpus(generator)}"
    )


def mode_line(meta: dict) -> str:
    """Which mode the report's figures came from."""
    if meta.get("mode") == PINNED:
        apart = meta.get("source_apart", False)
        repeats = meta.get("point_repeats", 1)
        return (
            f"Mode: pinned. The {_placement(meta['system_cores'], meta['generator_cores'], apart)};"
            " light peers count RTP headers (benchmarks/lightpeer.py), probes decode."
            + (f" Each point of the search measured {repeats} times, judged by the medians." if repeats > 1 else "")
        )
    return "Mode: unpinned sweep. The system and the load generator share every core."


def report(
    runs: dict[str, list[dict]], meta: dict, out: Path, plots: bool = True, found: dict[str, dict] | None = None
) -> None:
    """Write ``<out>.json``, ``<out>.md`` and the plots, and print the table (``found``: viewers per core)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    slopes = {
        name: {
            "all": per_viewer_cpu(points),
            "serving": per_viewer_cpu(points, "serving_cpu_pct"),
            "generator": per_viewer_cpu(points, "generator_cpu_pct"),
        }
        for name, points in runs.items()
    }
    data = {"meta": meta, "per_viewer_cpu_pct": slopes, "runs": runs, **({"capacity": found} if found else {})}
    _write(out.with_suffix(".json"), json.dumps(data, indent=2))
    table = markdown(runs)
    overload = overload_markdown(runs)
    if overload:
        table += f"\n\ncamrelay's own counts over each point's window (/api/v1/streams):\n\n{overload}"
    traced = trace_markdown(runs)
    if traced:
        table += f"\n\nWhere the probes' latency went (ms after capture, p50 / p95; peers.ArrivalTrace):\n\n{traced}"
    slope_lines = "\n".join(
        f"- {n}: {_f(s['serving'], 2)} % of a core per added viewer in the serving process,"
        f" {_f(s['all'], 2)} % in all its processes (points before saturation); the load generator"
        f" {_f(s['generator'], 2)} % per viewer it added"
        for n, s in slopes.items()
    )
    head = f"{meta['command']}\n\n{meta['date']}, {meta['machine']}\n\n{mode_line(meta)}"
    per_core = f"Viewers per core:\n\n{capacity_markdown(found)}\n\n" if found else ""
    _write(out.with_suffix(".md"), f"{head}\n\n{per_core}{table}\n\n{slope_lines}\n")
    if plots:
        title = f"{meta['size']} {meta['fps']:g} fps {meta['bitrate']}bit/s, {meta['cpu_count']} cores, {meta['date']}"
        if meta.get("mode") == PINNED:
            title += f", pinned {_cpus(meta['system_cores'])} | {_cpus(meta['generator_cores'])}"
        for path in plot(runs, out, title):
            print(f"plot: {path}")
    print()
    print(mode_line(meta))
    if found:
        print(capacity_markdown(found))
    print(table)
    print(slope_lines)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
