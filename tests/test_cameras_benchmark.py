"""The many-cameras benchmark runs end to end (one camera, a few seconds), so it cannot silently rot; its
latency readers decode every access unit at its marker bit, holding none."""

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.cameras import SYSTEMS, markdown, median_of_repeats, not_run, paired_added
from benchmarks.markerprobe import read_marked, run_marker_probe
from benchmarks.peers import frames_missing
from benchmarks.rtspcams import Encoding
from relay.config import StreamConfig
from relay.source import parse_source_spec

from .conftest import end_workers, make_config, start_relay

ROOT = Path(__file__).resolve().parent.parent
FPS = 15  # the test camera's, and the relay's: a light load
MEASURED = 3.0  # seconds each marker-bit reader counts
DEADLINE = 60.0  # seconds for what the test waits for (two worker processes start): a deadline, not a measurement


def test_cameras_benchmark_smoke_every_system(tmp_path):
    out = tmp_path / "cameras"
    cmd = [sys.executable, "-m", "benchmarks.cameras", "--cameras", "1", "--duration", "3", "--size", "640x360",
           "--bitrate", "1M", "--clip-dir", str(tmp_path), "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    points = {p["system"]: p for p in data["points"]}
    assert list(points) == list(SYSTEMS)
    if not data["meta"]["relay_has_modes"]:  # before passthrough is merged it is reported, not run
        assert "passthrough" in points.pop("camrelay-passthrough")["not_run"]
    for name, p in points.items():
        # Every figure is there; what they are is for a full run on a quiet machine to say.
        assert "not_run" not in p and p["errors"] == [], (name, p)
        assert p["cameras"] == 1 and p["cpu_pct"] > 0 and p["rss_mb"] > 0, (name, p)
        assert p["latency_ms"]["samples"] > 0 and p["direct_latency_ms"]["samples"] > 0, (name, p)
        assert p["added_latency_ms"]["p95"] is not None, (name, p)
        assert len(p["viewers"]) == 2 * 2 and all(v["frames"] > 0 for v in p["viewers"]), (name, p)  # 2 per camera
        assert set(p["rtsp_frames"]) == {"cam0", "clock"} and p["rtsp_looped_min"] > 0, (name, p)  # one per camera
        assert p["rtsp_live"] > 0 and p["direct_frames"] > 0, (name, p)
        assert p["paired_added_ms"]["samples"] > 0, (name, p)  # pictures both latency readers decoded
        for reader in ("probe", "direct"):  # the latency readers decoded every unit at its marker bit
            counts = p[reader]
            assert counts["units"] == counts["frames"] > 0 and counts["held"] == counts["unread"] == 0, (name, p)
        # camrelay says what it dropped itself over the window (its API's frames_dropped), mediamtx does not
        if name.startswith("camrelay"):
            assert isinstance(p["system_dropped"], dict) and all(n >= 0 for n in p["system_dropped"].values()), p
        else:
            assert "system_dropped" not in p, (name, p)
    table = out.with_suffix(".md").read_text()
    for name in SYSTEMS:
        assert f"| {name} | 1 |" in table


def _point(system="mediamtx", cpu=10.0, p95=50.0, lost=0, saturated=False):
    return {
        "system": system, "cameras": 4, "cpu_pct": cpu, "cpu_per_camera_pct": cpu / 5, "rss_mb": 100.0,
        "rss_per_camera_mb": 20.0, "latency_ms": {"p50": 40.0, "p95": p95}, "direct_latency_ms": {"p50": 38.0,
        "p95": 45.0}, "added_latency_ms": {"p50": 2.0, "p95": p95 - 45.0}, "frames_lost": lost,
        "lost_worst_viewer": lost, "fps_median": 30.0, "generator_cpu_pct": 80.0, "other_cpu_pct": 5.0,
        "rtsp_looped_min": 449,
        "rtsp_expected": 450, "rtsp_live": 440, "direct_frames": 441, "saturated": saturated, "gave_out": False,
        "errors": [],
    }  # fmt: skip


def test_repeats_give_medians_and_a_system_not_run_says_why():
    row = median_of_repeats([_point(cpu=10), _point(cpu=30, p95=70, lost=3, saturated=True), _point(cpu=12)])
    assert row["repeats"] == 3 and row["cpu_pct"] == 12 and row["latency_p95"] == 50 and row["added_p95"] == 5
    assert row["frames_lost"] == 0 and row["rtsp_looped_min"] == 449 and row["saturated"] == 1
    skipped = median_of_repeats([not_run("camrelay-passthrough", 4, "no --mode")])
    table = markdown([row, skipped])
    assert "| mediamtx | 4 | 12 / 2.4 |" in table and "(saturated in 1 of 3)" in table
    assert "| camrelay-passthrough | 4 | not run: no --mode |" in table


def test_added_frame_by_frame_pairs_the_readers_pictures_by_their_pixel_clock():
    probe = {"clocks": [1000, 1033, 1066], "latencies_ms": [40.0, 50.0, 45.0]}
    direct = {"clocks": [1033, 1066, 1100], "latencies_ms": [30.0, 44.0, 31.0]}  # 1000 came before it read
    assert paired_added(probe, direct) == [20.0, 1.0]


def test_frames_missing_counts_gaps_in_rtp_time_not_jumps_to_a_new_timeline():
    step = 90_000 // 30  # one frame at 30 fps
    assert frames_missing(0, step, 30) == 0 and frames_missing(0, 3 * step, 30) == 2
    assert frames_missing(2**32 - step, step, 30) == 1  # across the 32-bit wrap: one frame missing
    assert frames_missing(10 * step, step, 30) == 0  # back in time: a restarted source
    assert frames_missing(0, 2**31, 30) == 0  # far ahead: a new timeline, not hours of loss


async def _passing_through(relay, name: str) -> None:
    stream = relay.relay.streams[name]
    deadline = time.monotonic() + DEADLINE
    while not (stream.passthrough and stream.stats.frames_passed_through):
        assert time.monotonic() < deadline, f"not passed through: {stream.state} {stream.mode_reason}"
        await asyncio.sleep(0.05)


async def test_marker_bit_readers_decode_each_unit_at_its_marker_through_a_passthrough_relay(start_camera, spawn):
    """The marker-bit WebRTC probe through a passthrough camrelay and the marker-bit reader of the camera's own
    RTSP, as benchmarks.cameras runs them (worker processes, ready, start, results): every access unit is decoded
    when its marker bit arrives and gives its picture there and then, none held for the next, each picture's pixel
    clock reads, and nothing is lost or dropped (on loopback nothing should be; were it, the counts say so)."""
    camera = start_camera("cam", width=640, height=360, fps=FPS, encoding=Encoding(profile="high", gop=1.0))
    config = make_config((StreamConfig("cam", parse_source_spec(f"{camera.url}#mode=passthrough")),), fps=FPS)
    runner, relay = await start_relay(config, wait=False)
    ready, start = spawn.Queue(), spawn.Event()
    jobs = [(run_marker_probe, relay.whep("cam")), (read_marked, camera.url)]
    procs, results = [], []
    try:
        await _passing_through(relay, "cam")
        for target, url in jobs:
            out = spawn.Queue()
            proc = spawn.Process(target=target, args=(url, MEASURED, FPS, ready, start, out), daemon=True)
            proc.start()
            procs.append(proc)
            results.append(out)
            assert await asyncio.to_thread(ready.get, timeout=DEADLINE) == ("ready", 1)
        start.set()
        probe, direct = [await asyncio.to_thread(out.get, timeout=DEADLINE) for out in results]
    finally:
        start.set()
        await end_workers(procs, DEADLINE)
        await runner.cleanup()
    for reading in (probe, direct):
        assert reading["error"] == "", reading
        # One picture out of each unit's own decode: none held for the next unit, none handed on late.
        assert reading["units"] == reading["frames"] > 0, reading
        assert (reading["held"], reading["late"], reading["undecodable"]) == (0, 0, 0), reading
        # Every picture's pixel clock read, and none is later than the moment it was decoded.
        assert reading["unread"] == 0 and len(reading["latencies_ms"]) == reading["frames"], reading
        assert min(reading["latencies_ms"]) > 0, reading
        assert (reading["lost"], reading["packets_lost"], reading["units_dropped"]) == (0, 0, 0), reading
    # Through WebRTC: each unit was whole at the packet with the marker bit, one unit per marker.
    assert probe["kind"] == "webrtc" and probe["marked"] == probe["units"], probe
    assert direct["kind"] == "rtsp", direct
    # The clocks are the camera's: pictures both decoded in their windows read the same clock in each.
    assert len(probe["clocks"]) == probe["frames"] and paired_added(probe, direct), (probe["clocks"], direct["clocks"])


def test_renice_reaches_every_thread_of_the_load():
    """``--load-nice``: a camera's encoder runs threads it started before it was reniced; each of them, not only its
    main thread (Linux's niceness is a thread's), ends at the niceness asked for."""
    import psutil

    from benchmarks.cameras import renice

    code = "import threading, time\nfor _ in range(3): threading.Thread(target=time.sleep, args=(60,)).start()\n"
    code += "print('up', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "up"
        proc = psutil.Process(child.pid)
        tids = [t.id for t in proc.threads()]
        assert len(tids) == 4
        renice([proc], 7)
        for tid in tids:
            stat = Path(f"/proc/{child.pid}/task/{tid}/stat").read_text()
            assert int(stat.rsplit(")", 1)[1].split()[16]) == 7, tid  # field 19, nice
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
