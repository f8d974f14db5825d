"""Where a many-cameras point's CPU goes: camrelay's processes one kind at a time (the relay, its mediamtx,
its camera workers), measured over one point of ``benchmarks.cameras`` (its cameras, viewers and readers).

    python -m benchmarks.breakdown --cameras 4 --duration 30 --repeats 3 [--py-spy relay-profile.txt]
        [--systems camrelay-passthrough-solo,camrelay-passthrough]

Each repeat starts the cameras and each system in turn afresh (``camrelay-passthrough``: RTSP cameras
sharing worker processes, ``[video] cameras_per_worker``; ``camrelay-passthrough-solo``: a process per
camera), runs the point as ``benchmarks.cameras`` does, and reads each process's CPU (psutil, % of one
core) and USS over the middle of the measurement. ``--py-spy`` also records the relay process (``py-spy
record --gil``, raw stacks) during the last repeat. Prints one JSON line per repeat, then the medians per
system; the workers' CPU is also given per camera (over the N + 1 cameras), whatever the processes.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from benchmarks import cameras
from benchmarks.rtspcams import default_clip_dir

SETTLE = 8.0  # seconds into the measurement before the CPU is read: every viewer and reader is steady
KINDS = ("relay", "mediamtx", "workers")


def kind_of(proc: psutil.Process) -> str:
    cmd = " ".join(proc.cmdline())
    if "relay.camera.worker" in cmd:
        return "workers"
    return "mediamtx" if "mediamtx" in cmd else "relay"


def sample(served: cameras.Served, seconds: float, spy: str, out: dict) -> None:
    """CPU and USS per kind of process over ``seconds``, after ``SETTLE`` (from a thread, beside the point)."""
    time.sleep(cameras.WARMUP + SETTLE)
    procs = served.procs()
    for p in procs:
        p.cpu_percent(None)
    recorder = None
    if spy:
        py_spy = str(Path(sys.executable).with_name("py-spy"))
        recorder = subprocess.Popen(
            [py_spy, "record", "--gil", "--nonblocking", "-r", "200", "-f", "raw", "-d", str(int(seconds)),
             "-o", spy, "-p", str(procs[0].pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    time.sleep(seconds)
    cpu: collections.Counter[str] = collections.Counter()
    uss: collections.Counter[str] = collections.Counter()
    for p in procs:
        try:
            kind = kind_of(p)
            cpu[kind] += p.cpu_percent(None)
            uss[kind] += p.memory_full_info().uss / 2**20
        except psutil.Error:
            continue
    out.update(cpu_pct=dict(cpu), uss_mib=dict(uss), workers=sum(kind_of(p) == "workers" for p in procs))
    if recorder is not None:
        recorder.wait()


def one(system: str, n: int, duration: float, spy: str) -> dict:
    args = argparse.Namespace(size="1920x1080", fps=30.0, bitrate="4M")
    cams = cameras.CameraSet(n, args.size, args.size, args.fps, args.bitrate, default_clip_dir()).start()
    try:
        with tempfile.TemporaryDirectory(prefix="camrelay-bench-breakdown-") as tmp:
            served = cameras.start_system(system, cams, args, Path(tmp))
            if isinstance(served, str):
                return {"error": served}
            measured: dict = {}
            thread = threading.Thread(target=sample, args=(served, duration - SETTLE - 2, spy, measured))
            thread.start()
            try:
                point = cameras.run_point(served, cams, duration, args.fps, light_nice=10)
            finally:
                thread.join()
                served.close()
    finally:
        cams.stop()
    return {
        **measured, "system": system, "cameras": n, "system_cpu_pct": point.get("cpu_pct"),
        "frames_lost": point.get("frames_lost"), "load_average": os.getloadavg()[0],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.breakdown", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cameras", type=int, default=4, help="looped cameras (the live one comes on top)")
    ap.add_argument("--duration", type=float, default=30.0, help=f"seconds measured (more than {SETTLE + 2:g})")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--py-spy", default="", help="record the relay process to this file in the last repeat")
    ap.add_argument(
        "--systems", default="camrelay-passthrough", help="comma-separated camrelay systems, alternated in each repeat"
    )
    args = ap.parse_args(argv)
    if args.duration <= SETTLE + 2:
        ap.error(f"--duration must be over {SETTLE + 2:g} s")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for system in systems:
        if cameras.MODES.get(system) != "passthrough":
            ap.error(f"--systems: {system!r} is not a camrelay passthrough system")
    runs = []
    for i in range(args.repeats):
        for system in systems:
            run = one(system, args.cameras, args.duration, args.py_spy if i == args.repeats - 1 else "")
            print(json.dumps(run), flush=True)
            runs.append(run)
    for system in systems:
        ok = [r for r in runs if "cpu_pct" in r and r["system"] == system]
        if ok:
            medians = {k: statistics.median(r["cpu_pct"].get(k, 0.0) for r in ok) for k in KINDS}
            per_worker = statistics.median(r["cpu_pct"].get("workers", 0.0) / max(1, r["workers"]) for r in ok)
            per_camera = statistics.median(r["cpu_pct"].get("workers", 0.0) / (r["cameras"] + 1) for r in ok)
            total = statistics.median(sum(r["cpu_pct"].values()) for r in ok)
            print(json.dumps({
                "system": system, "median_cpu_pct": medians, "median_cpu_pct_total": total,
                "median_cpu_pct_per_worker_process": per_worker, "median_workers_cpu_pct_per_camera": per_camera,
            }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
