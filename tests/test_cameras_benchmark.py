"""The many-cameras benchmark runs end to end (one camera, a few seconds), so it cannot silently rot."""

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.cameras import SYSTEMS, markdown, median_of_repeats, not_run
from benchmarks.peers import frames_missing

ROOT = Path(__file__).resolve().parent.parent


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


def test_frames_missing_counts_gaps_in_rtp_time_not_jumps_to_a_new_timeline():
    step = 90_000 // 30  # one frame at 30 fps
    assert frames_missing(0, step, 30) == 0 and frames_missing(0, 3 * step, 30) == 2
    assert frames_missing(2**32 - step, step, 30) == 1  # across the 32-bit wrap: one frame missing
    assert frames_missing(10 * step, step, 30) == 0  # back in time: a restarted source
    assert frames_missing(0, 2**31, 30) == 0  # far ahead: a new timeline, not hours of loss
