"""Scale-out: camrelay's cost with N viewers on an engine it publishes to (WHIP), against N viewers on itself.

    python -m benchmarks.scale_out --peers 1,10,30 --duration 10 --size 640x360 --fps 30 --bitrate 1M \\
        --out docs/results/scale-out

Two set-ups, one after the other, each fed the same test pattern:

- ``camrelay``: viewers connect to camrelay itself (``relay serve --no-rtsp``).
- ``engine``: camrelay publishes over WHIP (``--whip cam0=...``) to a mediamtx
  on loopback with only its WebRTC server on (``Engine``), and the viewers
  connect to that mediamtx.

Viewers are the load benchmark's (benchmarks/peers.py: light peers in worker
processes, then one probe that decodes and reads the pixel clock). For each
point: camrelay's CPU (all its processes), camrelay's egress (``engine``:
the RTP payload bytes its WHIP publisher sent, from ``/api/v1/streams``;
``camrelay``: the payload bytes its viewers received), the engine's CPU, and
the viewers' frame rate and latency.

``Engine`` is also what tests/test_whip.py runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from benchmarks.baselines.mediamtx_whep import webrtc_on_loopback
from benchmarks.load import LABELS, System, camrelay_command, run_point, start_system, stop_processes
from benchmarks.options import add_stream_options
from benchmarks.ports import free_port, free_udp_port
from relay.rtsp import find_mediamtx

START_TIMEOUT = 30.0  # seconds for mediamtx, or camrelay's first WHIP session, to come up
POLL = 0.2  # seconds between looks while waiting


def engine_config(http_port: int, udp_port: int, publisher: tuple[str, str] | None = None) -> str:
    """mediamtx as a WHIP/WHEP engine on loopback: WebRTC on, RTSP and everything else off. Anyone reads;
    anyone publishes, or only ``publisher`` (user, password), which a WHIP client sends as
    ``Authorization: Bearer user:password`` (mediamtx's internal auth takes that form). JSON is YAML."""
    if publisher:
        users = [
            {"user": publisher[0], "pass": publisher[1], "ips": [], "permissions": [{"action": "publish"}]},
            {"user": "any", "pass": "", "ips": [], "permissions": [{"action": "read"}]},
        ]
    else:
        users = [{"user": "any", "pass": "", "ips": [], "permissions": [{"action": "publish"}, {"action": "read"}]}]
    config = {
        "logLevel": "warn",
        "logDestinations": ["stdout"],
        "authMethod": "internal",
        "authInternalUsers": users,
        **dict.fromkeys(("api", "metrics", "pprof", "playback", "rtsp", "rtmp", "hls", "srt", "moq"), False),
        **webrtc_on_loopback(http_port, udp_port),
        "paths": {"all_others": {}},
    }
    return json.dumps(config, indent=2) + "\n"


class Engine:
    """A mediamtx serving WHIP (in) and WHEP (out) on loopback ports of its own; ``start()`` again after
    ``kill()`` brings it back on the same ports."""

    def __init__(self, workdir: Path, publisher: tuple[str, str] | None = None) -> None:
        self.http_port = free_port()
        self.udp_port = free_udp_port()
        self.config = workdir / f"engine-{self.http_port}.yml"
        self.config.write_text(engine_config(self.http_port, self.udp_port, publisher))
        self.proc: subprocess.Popen | None = None

    def url(self, path: str, kind: str = "whip") -> str:
        return f"http://127.0.0.1:{self.http_port}/{path}/{kind}"

    def start(self) -> None:
        """Start mediamtx and wait until its WebRTC server answers HTTP (blocking)."""
        self.proc = subprocess.Popen([find_mediamtx(""), str(self.config)], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mediamtx exited with {self.proc.returncode} during start-up")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/", timeout=2):
                    return
            except urllib.error.HTTPError:  # any HTTP answer: it is up
                return
            except OSError:
                time.sleep(POLL)
        self.kill()
        raise RuntimeError("mediamtx did not answer in time")

    def freeze(self) -> None:
        """Stop it without closing anything: a server that hangs, or a link that dies silently."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def kill(self) -> None:
        """What a crash or the OOM killer does (blocking until it is reaped)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        if self.proc is not None:
            stop_processes(self.proc)


def _api(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/streams", timeout=2) as r:
        return json.load(r)["streams"][0]


def _whip_state(port: int) -> dict:
    return _api(port)["whip"][0]


def start_publishing(size: str, fps: float, bitrate: str, engine: Engine) -> tuple[subprocess.Popen, int]:
    """camrelay publishing cam0 to ``engine`` over WHIP; returns it and its HTTP port once publishing."""
    port = free_port()
    cmd = [*camrelay_command(size, fps, bitrate, port), "--whip", f"cam0={engine.url('cam0')}"]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"camrelay exited with {proc.returncode} during start-up")
        try:
            if _whip_state(port)["state"] == "publishing":
                return proc, port
        except (OSError, KeyError, IndexError):
            pass
        time.sleep(POLL)
    stop_processes(proc)
    raise SystemExit("camrelay did not start publishing over WHIP")


def _tree(pid: int) -> list[psutil.Process]:
    main = psutil.Process(pid)
    return [main, *main.children(recursive=True)]


def measure(mode: str, sweep: list[int], args: argparse.Namespace) -> list[dict]:
    points = []
    if mode == "camrelay":
        system = start_system("camrelay", args.size, args.fps, args.bitrate)
        try:
            for n in sweep:
                point = run_point(system, n, args.probes, args.duration, args.fps, args.light_nice)
                point.update(mode=mode, camrelay_egress_mbps=point.get("egress_mbps"), engine_cpu_pct=None)
                points.append(point)
                print(json.dumps(point), flush=True)
        finally:
            system.close()
        return points
    with tempfile.TemporaryDirectory(prefix="camrelay-scale-out-") as workdir:
        engine = Engine(Path(workdir))
        engine.start()
        camrelay = None
        try:
            camrelay, port = start_publishing(args.size, args.fps, args.bitrate, engine)
            engine_proc = psutil.Process(engine.proc.pid)
            system = System(
                "engine", engine.url("cam0", "whep"), engine.http_port, "webrtc",
                serving=lambda: _tree(camrelay.pid)[:1], source=lambda: _tree(camrelay.pid)[1:], close=lambda: None,
            )  # fmt: skip
            for n in sweep:
                sent0, t0 = _whip_state(port)["bytes_sent"], time.monotonic()
                engine_proc.cpu_percent(None)
                point = run_point(system, n, args.probes, args.duration, args.fps, args.light_nice)
                engine_cpu = engine_proc.cpu_percent(None)
                whip = _whip_state(port)
                point.update(
                    mode=mode,
                    camrelay_egress_mbps=(whip["bytes_sent"] - sent0) * 8 / (time.monotonic() - t0) / 1e6,
                    engine_cpu_pct=engine_cpu,  # averaged over the whole point, connecting included
                    camrelay_whep_sessions=_api(port)["viewers"],
                    whip_sessions=whip["sessions"],
                )
                points.append(point)
                print(json.dumps(point), flush=True)
        finally:
            if camrelay is not None:
                stop_processes(camrelay)
            engine.close()
    return points


def _f(v, d=0) -> str:
    return "—" if v is None else f"{v:.{d}f}"


def markdown(points: list[dict]) -> str:
    head = [
        "viewers on", "viewers", "camrelay CPU, all processes (% core)", "camrelay egress (Mbit/s)",
        "engine CPU (% core)", "viewers' fps min / median", "latency p50 / p95 (ms)", "lost (%)",
        "generator CPU (% core)",
    ]  # fmt: skip
    rows = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for p in points:
        if "fps" not in p:
            rows.append(f"| {p['mode']} | {p['peers']} | not connected: {p['errors'][0]} |" + " |" * (len(head) - 3))
            continue
        sat = " (saturated)" if p["generator_saturated"] else ""
        where = "camrelay" if p["mode"] == "camrelay" else "mediamtx (camrelay publishes over WHIP)"
        rows.append(
            "| "
            + " | ".join(
                [
                    where,
                    str(p["peers"]),
                    _f(p["relay_cpu_pct"]),
                    _f(p["camrelay_egress_mbps"], 1),
                    _f(p["engine_cpu_pct"]),
                    f"{_f(p['fps']['min'], 1)} / {_f(p['fps']['median'], 1)}",
                    f"{_f(p['latency_ms']['p50'])} / {_f(p['latency_ms']['p95'])}",
                    _f(p["lost_pct"], 2),
                    _f(p["generator_cpu_pct"]) + sat,
                ]
            )  # fmt: skip
            + " |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scale_out", description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", default="1,10,30", help="comma-separated sweep of viewer counts")
    ap.add_argument("--probes", type=int, default=1, help="decoding peers that read the pixel clock, per point")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds measured per point")
    add_stream_options(ap, size="640x360")
    ap.add_argument("--light-nice", type=int, default=10, metavar="N", help="niceness of the light peers")
    ap.add_argument("--modes", default="camrelay,engine", help="camrelay (viewers on it), engine (on mediamtx)")
    ap.add_argument("--out", default="scale-out", help="path prefix for the .json and .md outputs")
    args = ap.parse_args(argv)
    sweep = [int(x) for x in args.peers.split(",")]
    points = [p for mode in args.modes.split(",") for p in measure(mode.strip(), sweep, args)]
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores,"
        f" {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.platform()}",
        "command": "python -m benchmarks.scale_out " + " ".join(argv),
        "labels": {"camrelay": LABELS["camrelay"], "engine": "mediamtx fed by camrelay's WHIP publish"},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "points": points}, indent=2))
    table = markdown(points)
    out.with_suffix(".md").write_text(f"{meta['command']}\n\n{meta['date']}, {meta['machine']}\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
