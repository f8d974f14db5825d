"""Throwaway: the table rows of issue 14's worker runs (s<N>-<main|branch>.json and runs.log here), and medians."""

import json
import re
import statistics
import sys
from pathlib import Path

here = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
starts = {}
for line in (here / "runs.log").read_text().splitlines():
    m = re.match(r"(s\d+-\w+) start (\S+) load (\S+)", line)
    if m:
        starts[m.group(1)] = (m.group(2), m.group(3))
rows, by = [], {"main": [], "branch": []}
for path in sorted(here.glob("s*-*.json"), key=lambda p: int(re.match(r"s(\d+)", p.name).group(1))):
    run = path.stem
    side = run.split("-")[1]
    points = {p["system"]: p for p in json.loads(path.read_text())["points"]}
    cam, mtx = points.get("camrelay-passthrough"), points.get("mediamtx")
    if cam is None or mtx is None:
        continue
    start, load = starts.get(run, ("?", "?"))
    for name, p in ((f"camrelay {side}", cam), ("mediamtx", mtx)):
        a, f = p["added_latency_ms"], p["paired_added_ms"]
        rows.append(
            f"| {run} | {name} | {start} | {load} | {p['cpu_pct']:.1f} / {p['cpu_per_camera_pct']:.2f} | "
            f"{a['p50']:.1f} / {a['p95']:.1f} | {f['p50']:.1f} / {f['p95']:.1f} | {p['frames_lost']} | "
            f"{p['generator_cpu_pct']:.0f} / {p['other_cpu_pct']:.0f} |"
        )
    by[side].append(
        (
            cam["cpu_pct"],
            mtx["cpu_pct"],
            cam["cpu_per_camera_pct"] / mtx["cpu_per_camera_pct"],
            cam["added_latency_ms"]["p95"],
            cam["frames_lost"],
        )
    )
print("\n".join(rows))
for side, runs in by.items():
    if not runs:
        continue
    ratios = [round(r[2], 2) for r in runs]
    print(
        f"{side}: runs {len(runs)}; camrelay CPU median {statistics.median(r[0] for r in runs):.1f}, "
        f"mediamtx {statistics.median(r[1] for r in runs):.1f}; ratios {ratios} "
        f"median {statistics.median(ratios):.2f}; "
        f"added p95 median {statistics.median(r[3] for r in runs):.1f}; runs losing frames "
        f"{sum(1 for r in runs if r[4])} ({[r[4] for r in runs if r[4]]})"
    )
