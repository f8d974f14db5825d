"""WebRTC fan-out sharded over processes: camrelay with 1 shard against N, the same viewers, one run.

    python -m benchmarks.shards --shards 1,2 --peers 1,60,120,180 --duration 10 --out docs/results/shards/run

For each shard count, camrelay is started (``--shards N``; 1 is the relay's
own process, as before shards) with the 720p30 2 Mbit/s test pattern, and
each point of ``--peers`` is run as ``benchmarks.load`` runs it: light peers
that count RTP headers without decrypting (benchmarks/lightpeer.py), niced
(``--light-nice``), then ``--probes`` decoding peers for latency. Per point
it reports the viewers' median fps, frames lost, p95 latency, and the CPU of
each process of the system: the relay, every shard, the camera's worker.

Where the system runs (``--system-cores``, default every CPU): on a 2-core
machine, pinning the system to one core leaves no core for a second shard,
so by default the system and the generator share both cores, the generator
niced below it; the report says so. On a machine with more cores, give the
system its own (``--system-cores 0-1 --generator-cores 2-3``).

Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import psutil

from benchmarks.load import run_point, start_system
from benchmarks.options import add_stream_options, benchmark_parser, run_facts
from benchmarks.pinning import Split, parse_cores, thread_on
from benchmarks.resources import process_tree

SHARD_MODULE = "relay.webrtc.shard"
WORKER_MODULE = "relay.camera.worker"


class Recorded:
    """A process whose CPU share, as the load benchmark reads it (``cpu_percent``), is kept for the report."""

    def __init__(self, proc: psutil.Process, label: str) -> None:
        self.proc = proc
        self.label = label
        self.last: float | None = None

    def cpu_percent(self, interval=None) -> float:
        self.last = self.proc.cpu_percent(interval)
        return self.last

    def __getattr__(self, attr):
        return getattr(self.proc, attr)


def role(proc: psutil.Process) -> str:
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return "gone"
    if SHARD_MODULE in cmdline:
        return "shard"
    if WORKER_MODULE in cmdline:
        return "worker"
    return "other"


def measure_shards(n: int, args, split: Split) -> list[dict]:
    with thread_on(split.system):
        system = start_system("camrelay", args.size, args.fps, args.bitrate, extra=("--shards", str(n)))
    main = psutil.Process(system.serving()[0].pid)
    tree = process_tree(main)[1:]
    shards = sorted((p for p in tree if role(p) == "shard"), key=lambda p: p.pid)
    workers = [p for p in tree if role(p) == "worker"]
    serving = [Recorded(main, "relay"), *(Recorded(p, f"shard-{i}") for i, p in enumerate(shards))]
    source = [Recorded(p, "worker") for p in workers]
    system.serving, system.source = (lambda: serving), (lambda: source)
    points = []
    try:
        for peers in args.peers:
            point = run_point(system, peers, args.probes, args.duration, args.fps, args.light_nice, split)
            point["shards"] = n
            point["cpu_by_process"] = {r.label: r.last for r in (*serving, *source)}
            print(json.dumps(point), flush=True)
            points.append(point)
            if point["gave_out"]:
                print(f"shards={n}: gave out at {peers} viewers; larger points skipped", flush=True)
                break
    finally:
        system.close()
    return points


def markdown(points: list[dict], meta: dict) -> str:
    lines = [
        f"{meta['date']}, {meta['machine']}; `{meta['command']}`",
        f"system on CPUs {meta['system_cores']}, generator on CPUs {meta['generator_cores']}"
        f" (light peers at nice {meta['light_nice']})",
        "",
        "| shards | viewers | fps median | lost % | p95 ms | relay CPU % | shards' CPU % (each) | worker CPU %"
        " | generator CPU % |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for p in points:
        if "fps" not in p:  # its peers never all connected
            lines.append(f"| {p['shards']} | {p['peers']} | {'; '.join(p['errors'])} | | | | | | |")
            continue
        cpu = p["cpu_by_process"]
        each = [round(v or 0) for k, v in sorted(cpu.items()) if k.startswith("shard-")]
        p95 = p["latency_ms"]["p95"]
        lines.append(
            f"| {p['shards']} | {p['peers']} | {p['fps']['median']:.1f} | {p['lost_pct']:.2f} |"
            f" {'—' if p95 is None else round(p95)} | {round(cpu.get('relay') or 0)} |"
            f" {' + '.join(map(str, each)) or '—'} | {round(cpu.get('worker') or 0)} |"
            f" {round(p['generator_cpu_pct'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = benchmark_parser("python -m benchmarks.shards", __doc__)
    ap.add_argument("--shards", default="1,2", help="comma-separated shard counts to compare (default 1,2)")
    ap.add_argument("--peers", default="1,60,120,180", help="comma-separated viewer counts (default 1,60,120,180)")
    ap.add_argument("--probes", type=int, default=2, help="decoding peers that read the pixel clock, per point")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds measured per point")
    ap.add_argument("--light-nice", type=int, default=19, metavar="N", help="niceness of the light peers")
    ap.add_argument("--system-cores", default="", metavar="CPUS", help="default: every CPU this process may use")
    ap.add_argument("--generator-cores", default="", metavar="CPUS", help="default: the same as the system's")
    add_stream_options(ap)
    ap.add_argument("--out", default="shards", help="path prefix for the .json and .md outputs")
    ap.add_argument("--from-json", metavar="PATH", help="measure nothing: redo the table of an earlier run")
    args = ap.parse_args(argv)
    if args.from_json:
        earlier = json.loads(Path(args.from_json).read_text())
        print(markdown(earlier["points"], earlier["meta"]), end="")
        return 0
    try:
        counts = [int(x) for x in args.shards.split(",")]
        args.peers = [int(x) for x in args.peers.split(",")]
        every = tuple(sorted(os.sched_getaffinity(0)))
        system = parse_cores(args.system_cores, "--system-cores") if args.system_cores else every
        generator = parse_cores(args.generator_cores, "--generator-cores") if args.generator_cores else system
    except ValueError as exc:
        ap.error(str(exc))
    split = Split(system, generator)  # may overlap (the default on 2 cores): the report says so
    os.sched_setaffinity(0, split.generator)
    points: list[dict] = []
    for n in counts:
        points += measure_shards(n, args, split)
    meta = {
        **run_facts("python -m benchmarks.shards " + " ".join(argv)),
        "size": args.size, "fps": args.fps, "bitrate": args.bitrate, "duration": args.duration,
        "light_nice": args.light_nice, "system_cores": list(split.system), "generator_cores": list(split.generator),
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "points": points}, indent=1) + "\n")
    text = markdown(points, meta)
    out.with_suffix(".md").write_text(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
