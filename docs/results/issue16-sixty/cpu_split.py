"""Where the machine's CPU goes while Chromium plays camrelay at 60 fps (issue 16): per process, per thread.

    PYTHONPATH=. .venv/bin/python docs/results/issue16-sixty/cpu_split.py --fps 60 --duration 20 [--relay-dir DIR]

Runs ``python -m benchmarks.browser_latency --systems camrelay --repeats 1`` (this checkout's, or with
``--relay-dir`` another checkout's relay and page) and samples the CPU time of every process under it (the
relay, its camera worker and shards, the two mediamtx, Playwright's driver, Chromium's processes) and of the
worker's threads. It prints each one's share of a core over the measured window (the last ``--duration`` s
before the page closes) and the benchmark's own result line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import psutil


def kind(p: psutil.Process) -> str:
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return "?"
    if "relay.camera.worker" in cmd:
        return "camera worker"
    if "multiprocessing" in cmd or "relay.shard" in cmd:
        return "relay shard"
    if "relay serve" in cmd or "relay.cli" in cmd:
        return "relay"
    if "mediamtx" in cmd:
        return "mediamtx (reference)" if "mediamtx-whep.yml" in cmd else "mediamtx (relay's own)"
    if "chrom" in cmd:
        for t in ("renderer", "gpu-process", "utility"):
            if f"--type={t}" in cmd:
                sub = (
                    cmd.split("--utility-sub-type=")[1].split()[0]
                    if t == "utility" and "--utility-sub-type=" in cmd
                    else ""
                )
                return f"chromium {t} {sub}".strip()
        return "chromium browser"
    if "node" in cmd or "playwright" in cmd:
        return "playwright driver"
    if "benchmarks.browser_latency" in cmd:
        return "benchmark"
    return p.name()


def tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return [root]


def cpu(procs: list[psutil.Process]) -> dict[int, tuple[str, float, dict[int, float]]]:
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            threads = {th.id: th.user_time + th.system_time for th in p.threads()} if kind(p) == "camera worker" else {}
            out[p.pid] = (kind(p), t.user + t.system, threads)
        except psutil.Error:
            pass
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fps", default="60")
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--relay-dir", default="")
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "benchmarks.browser_latency", "--systems", "camrelay", "--repeats", "1",
           "--duration", str(args.duration), "--fps", args.fps]  # fmt: skip
    if args.relay_dir:
        cmd += ["--relay-dir", args.relay_dir]
    bench = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    root = psutil.Process(bench.pid)
    samples: list[tuple[float, dict]] = []
    while bench.poll() is None:
        samples.append((time.monotonic(), cpu(tree(root))))
        time.sleep(1.0)
    out = bench.stdout.read() if bench.stdout else ""
    # The page is measured for the last `duration` s before it closes; the relay stops right after it.
    live = [s for s in samples if any(k == "camera worker" for k, _, _ in s[1].values())]
    end = live[-2]
    start = min(live, key=lambda s: abs(s[0] - (end[0] - args.duration)))
    span = end[0] - start[0]
    shares: dict[str, float] = {}
    threads: dict[int, float] = {}
    for pid, (name, total, ths) in end[1].items():
        before = start[1].get(pid, (name, 0.0, {}))
        shares[name] = shares.get(name, 0.0) + (total - before[1]) / span
        for tid, t in ths.items():
            threads[tid] = (t - before[2].get(tid, 0.0)) / span
    print(f"window {span:.1f} s, load average at the end {psutil.getloadavg()}")
    for name, share in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"{100 * share:6.1f} %  {name}")
    print(f"{100 * sum(shares.values()):6.1f} %  all of the benchmark's processes (200 % is both cores)")
    print(
        "camera worker threads:",
        ", ".join(f"{100 * v:.1f} %" for v in sorted(threads.values(), reverse=True) if v > 0.005),
    )
    for line in out.splitlines():
        if line.startswith("{") and '"samples"' in line:
            r = json.loads(line)
            print("page:", {k: r[k] for k in ("latency_ms", "presented_fps", "frames_received", "frames_dropped")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
