"""Beside a benchmark: every few seconds, the running relay's capture-to-hub delay (its worker: the test pattern's
draw and JPEG, the decode, x264, the pipe) from its API, one JSON line each.

    .venv/bin/python docs/results/issue16-sixty/pipeline_poll.py --every 5 --until 18:20 --cwd /work/main > x.jsonl

Finds the relay by its command line (``relay serve ... --http-port N``, as ``benchmarks.rtsp_latency.start_relay``
starts it) and reads ``pipeline_delay_ms`` (p50/p95/p99 of its recent frames) and the stream's fps from
``/api/v1/status``. Which checkout's relay it was is told by its working directory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
import urllib.request

import psutil


def relays() -> list[tuple[int, str]]:
    out = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        cmd = p.info["cmdline"] or []
        if "relay" in cmd and "serve" in cmd and "--http-port" in cmd:
            out.append((int(cmd[cmd.index("--http-port") + 1]), p.info["cwd"] or ""))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--every", type=float, default=5.0)
    ap.add_argument("--until", required=True, help="HH:MM UTC")
    ap.add_argument("--cwd", action="append", default=[], help="only relays started in this directory (repeatable)")
    args = ap.parse_args()
    hour, minute = map(int, args.until.split(":"))
    while True:
        now = datetime.datetime.now(datetime.UTC)
        if (now.hour, now.minute) >= (hour, minute):
            return
        for port, cwd in relays():
            if args.cwd and cwd not in args.cwd:
                continue
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/status", timeout=2) as r:
                    stream = json.load(r)["streams"][0]
            except (OSError, ValueError, KeyError, IndexError):
                continue
            line = {"t": now.strftime("%H:%M:%S"), "cwd": cwd, "pipeline_delay_ms": stream.get("pipeline_delay_ms")}
            print(json.dumps(line), flush=True)
        time.sleep(args.every)


if __name__ == "__main__":
    main()
