"""Throwaway A/B for issue 14's worker: the worker's real passthrough pipelines, main's code and the branch's in two
processes at once, reading the same looped cameras off one private mediamtx; each process's CPU over the same window.

    python pipes_ab.py ab CAMERAS SECONDS NAME:PYTHONPATH:PYTHON ...   # from a tree with benchmarks/ on PYTHONPATH

Each process runs CAMERAS ``worker.Pipeline``s (``make_pipeline(..., shared=True)``, ``#mode=passthrough``: camrelay's
RTSP client, the depacketizer, the parameter sets, the GOP keeper, ``ipc.pack`` and the ``PipeWriter``), writing to
/dev/null instead of the relay's pipe, as a shared worker's capture threads do. CPU is the process's user + system
time (getrusage) over SECONDS after 4 s of warm-up; both read the same packets at the same moments, so the machine's
load weighs on both alike. One JSON line a process.
"""

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CLIP = Path("/tmp/camrelay-bench-clips/pattern-1920x1080-30fps-4M-gop1-10s.mp4")
WARMUP = 4.0


def pipes(urls: list[str], seconds: float, label: str) -> None:
    from relay import ipc
    from relay.camera import worker

    emit = worker.PipeWriter(os.open("/dev/null", os.O_WRONLY), lambda: None)
    running = []
    for i, url in enumerate(urls):
        cfg = ipc.WorkerConfig(
            f"cam{i}", url + "#mode=passthrough", 1920, 1080, 30.0, 4_000_000, 1.0, "libx264", mode="passthrough"
        )
        pipeline = worker.make_pipeline(cfg, i, emit, shared=True)
        pipeline.start()
        running.append(pipeline)
    time.sleep(WARMUP)
    u0, r0 = sum(p.stats.frames_captured for p in running), resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(seconds)
    u1, r1 = sum(p.stats.frames_captured for p in running), resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    units = u1 - u0
    print(
        json.dumps(
            {
                "code": label,
                "cameras": len(urls),
                "units": units,
                "cpu_s": round(cpu, 3),
                "system_s": round(r1.ru_stime - r0.ru_stime, 3),
                "us_unit": round(cpu / max(units, 1) * 1e6, 1),
                "pct_core_per_camera": round(100 * cpu / seconds / len(urls), 3),
            }
        ),
        flush=True,
    )
    os._exit(0)  # the capture threads block in their reads: not joined


def ab(cameras: int, seconds: str, variants: list[str]) -> None:
    from benchmarks.rtspcams import CameraServer, LoopedCamera

    with CameraServer() as server:
        cams = [LoopedCamera(server, f"cam{i}", clip=CLIP) for i in range(cameras)]
        for cam in cams:
            cam.start()
        try:
            urls = ",".join(cam.url for cam in cams)
            procs = []
            for variant in variants:
                name, path, python = variant.split(":")
                env = {"PYTHONPATH": path, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
                cmd = [python, os.path.abspath(__file__), "pipes", urls, seconds, name]
                procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
            for proc in procs:
                print(proc.communicate()[0].strip(), flush=True)
        finally:
            for cam in cams:
                cam.stop()


if __name__ == "__main__":
    if sys.argv[1] == "pipes":
        pipes(sys.argv[2].split(","), float(sys.argv[3]), sys.argv[4])
    else:
        ab(int(sys.argv[2]), sys.argv[3], sys.argv[4:])
