"""The viewer benchmark runs end to end (2 peers, a few seconds), so it cannot silently rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_viewer_benchmark_smoke(tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "benchmarks.viewers", "--peers", "2", "--probes", "1", "--duration", "2",
           "--size", "640x360", "--fps", "15", "--bitrate", "500k", "--json", str(out)]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    (point,) = data["points"]
    assert point["peers"] == 2 and point["errors"] == []
    assert point["latency_ms"]["samples"] > 0 and 0 < point["latency_ms"]["p50"] < 2000
    assert point["fps"]["min"] > 0
    assert point["relay_cpu_pct"] > 0
    assert "| 2 |" in result.stdout
