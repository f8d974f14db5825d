"""The load benchmark runs end to end for every system (2 peers, a few seconds), so it cannot silently rot."""

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.load import SYSTEMS, markdown, per_viewer_cpu, summarise

ROOT = Path(__file__).resolve().parent.parent


def test_load_benchmark_smoke_every_system(tmp_path):
    out = tmp_path / "load"
    cmd = [sys.executable, "-m", "benchmarks.load", "--peers", "2", "--probes", "1", "--duration", "2",
           "--size", "640x360", "--fps", "15", "--bitrate", "500k", "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert list(data["runs"]) == list(SYSTEMS)
    for name, (point,) in data["runs"].items():
        # Every figure is there for every system; what they are is for a full run on a quiet machine to say.
        assert point["peers"] == 2 and point["errors"] == [], (name, point)
        assert point["latency_ms"]["samples"] > 0 and point["latency_ms"]["p50"] is not None, (name, point)
        assert point["frames"] > 0 and point["fps"]["min"] > 0, (name, point)  # every peer got frames
        assert point["egress_mbps"] > 0 and point["relay_cpu_pct"] > 0, (name, point)
    table = out.with_suffix(".md").read_text()
    for name in SYSTEMS:
        assert f"| {name} | 2 |" in table
    for what in ("latency", "cpu"):
        png = tmp_path / f"load-{what}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _peer(frames=300, lost=0, probe=False, lat=(), first=50.0, fps=30.0, error=""):
    return {"probe": probe, "frames": frames, "bytes": 1000 * frames, "lost": lost, "fps": fps,
            "first_frame_ms": first, "latencies_ms": list(lat), "error": error}  # fmt: skip


def test_summary_flags_a_saturated_generator_and_a_system_that_gave_out():
    peers = [_peer(), _peer(fps=12.0, lost=150), _peer(probe=True, lat=[40, 50, 60], fps=13.0)]
    p = summarise(3, 1, peers, serving_cpu=50.0, source_cpu=40.0, gen_cpu=150.0, rss=[2**20], duration=10, fps=30)
    assert p["gave_out"]  # median fps 13 < half of 30
    assert p["generator_saturated"] == (150 + 90 > 0.85 * 100 * __import__("psutil").cpu_count())
    assert p["frames_lost"] == 150 and round(p["lost_pct"], 1) == round(100 * 150 / 1050, 1)
    assert p["latency_ms"]["p50"] == 50 and p["egress_mbps"] == 900 * 1000 * 8 / 10 / 1e6
    assert "(gave out)" in markdown({"x": [p]})


def test_per_viewer_cpu_is_the_slope_and_ignores_points_past_the_limit():
    pts = [{"peers": n, "relay_cpu_pct": 40 + 0.5 * n, "gave_out": False} for n in (1, 10, 20)]
    pts.append({"peers": 30, "relay_cpu_pct": 200.0, "gave_out": True})
    assert per_viewer_cpu(pts) == 0.5
    assert per_viewer_cpu(pts[:1]) is None


def test_light_peers_behind_while_probes_keep_up_is_the_generators_limit():
    peers = [_peer(fps=20.0), _peer(fps=21.0), _peer(probe=True, lat=[50], fps=30.0)]
    p = summarise(3, 1, peers, serving_cpu=5.0, source_cpu=40.0, gen_cpu=30.0, rss=[2**20], duration=10, fps=30)
    assert p["generator_saturated"] and not p["gave_out"]
    assert "(saturated)" in markdown({"x": [p]})
