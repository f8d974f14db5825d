"""Reference system: mediamtx's own WebRTC (WHEP) server, fed by camrelay's RTSP.

camrelay runs as usual (test pattern, one H.264 encoder, RTSP published to its
own mediamtx over UDP); a second mediamtx, the one measured, pulls that stream
over RTSP/UDP and serves it to WHEP viewers at ``/cam0/whep``. Its WebRTC side
is configured for loopback only, like camrelay's ``--ice-address 127.0.0.1``:
one UDP port, host candidates on 127.0.0.1, no STUN.

    python -m benchmarks.baselines.mediamtx_whep --port 8090 --size 1280x720 --fps 30 --bitrate 2M

prints the WHEP URL and runs until interrupted. The load benchmark uses
``start()`` directly.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from benchmarks.baselines import arguments
from benchmarks.load import stop_processes
from benchmarks.ports import free_port, free_udp_port
from benchmarks.rtsp_latency import start_relay as start_camrelay
from relay.rtsp import find_mediamtx

START_TIMEOUT = 30.0  # seconds for camrelay and mediamtx to come up and the stream to be ready


def render_config(
    http_port: int, udp_port: int, api_port: int, rtsp_port: int, sources: dict[str, str], transport: str = "udp"
) -> str:
    """mediamtx with WebRTC on, each path of ``sources`` (path: URL) pulling its URL over RTSP/``transport``, and
    RTSP (TCP) to read them. JSON is YAML."""
    config = {
        "logLevel": "warn",
        "logDestinations": ["stdout"],
        "authMethod": "internal",
        "authInternalUsers": [
            {"user": "any", "pass": "", "ips": [], "permissions": [{"action": "read"}, {"action": "api"}]}
        ],
        "api": True,
        "apiAddress": f"127.0.0.1:{api_port}",
        "metrics": False,
        "pprof": False,
        "playback": False,
        # RTSP must stay on for an RTSP source to be pulled; it listens on loopback only.
        "rtsp": True,
        "rtspTransports": ["tcp"],
        "rtspAddress": f"127.0.0.1:{rtsp_port}",
        "rtmp": False,
        "hls": False,
        "srt": False,
        "moq": False,
        **webrtc_on_loopback(http_port, udp_port),
        "paths": {
            path: {"source": url, "rtspTransport": transport, "sourceOnDemand": False} for path, url in sources.items()
        },
    }
    return json.dumps(config, indent=2) + "\n"


def webrtc_on_loopback(http_port: int, udp_port: int) -> dict:
    """mediamtx's WebRTC (WHIP/WHEP) server on loopback: one UDP port, host candidates on 127.0.0.1, no STUN."""
    return {
        "webrtc": True,
        "webrtcAddress": f"127.0.0.1:{http_port}",
        "webrtcEncryption": False,
        "webrtcAllowOrigins": ["*"],
        "webrtcLocalUDPAddress": f"127.0.0.1:{udp_port}",
        "webrtcLocalTCPAddress": "",
        "webrtcIPsFromInterfaces": False,
        "webrtcAdditionalHosts": ["127.0.0.1"],
        "webrtcICEServers2": [],
    }


@dataclass
class Reference:
    """camrelay (the source) and the mediamtx that serves WHEP; ``close()`` stops both."""

    camrelay: subprocess.Popen
    mediamtx: subprocess.Popen
    whep_url: str
    workdir: tempfile.TemporaryDirectory
    camrelay_port: int = 0  # camrelay's own HTTP port (its viewer page, its API)

    def close(self) -> None:
        stop_processes(self.mediamtx, self.camrelay)
        self.workdir.cleanup()


def start(
    size: str,
    fps: float,
    bitrate: str,
    http_port: int | None = None,
    env: dict[str, str] | None = None,
    relay_dir: str = "",
) -> Reference:
    """``env``: more settings for camrelay (``CAMRELAY_*``); ``relay_dir``: camrelay from that checkout."""
    workdir = tempfile.TemporaryDirectory(prefix="camrelay-bench-mediamtx-")
    rtsp_port, camrelay_port = free_port(), free_port()
    try:
        camrelay = start_camrelay(size, fps, bitrate, camrelay_port, rtsp_port, workdir.name, env, relay_dir)
    except BaseException:
        workdir.cleanup()
        raise
    http_port = http_port or free_port()
    config = Path(workdir.name) / "mediamtx-whep.yml"
    config.write_text(
        render_config(
            http_port, free_udp_port(), free_port(), free_port(), {"cam0": f"rtsp://127.0.0.1:{rtsp_port}/cam0"}
        )
    )
    mediamtx = subprocess.Popen([find_mediamtx(""), str(config)], stdin=subprocess.DEVNULL)
    ref = Reference(camrelay, mediamtx, f"http://127.0.0.1:{http_port}/cam0/whep", workdir, camrelay_port)
    try:
        _wait_ready(ref)
    except BaseException:
        ref.close()
        raise
    return ref


def _wait_ready(ref: Reference) -> None:
    """Until mediamtx reports cam0 ready (its RTSP pull is receiving)."""
    api = json.loads(Path(ref.workdir.name, "mediamtx-whep.yml").read_text())["apiAddress"]
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        for proc in (ref.camrelay, ref.mediamtx):
            if proc.poll() is not None:
                raise SystemExit(f"{proc.args[0]} exited with {proc.returncode} during start-up")
        try:
            with urllib.request.urlopen(f"http://{api}/v3/paths/get/cam0", timeout=2) as r:
                if json.load(r).get("ready"):
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit("mediamtx did not get the stream from camrelay in time")


def main() -> int:
    ap = arguments(__doc__, port_required=False)
    args = ap.parse_args()
    ref = start(args.size, args.fps, args.bitrate, args.port)
    print(ref.whep_url, flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        ref.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
