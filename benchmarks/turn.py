"""What TURN costs in latency: the pixel clock through aiortc viewers, direct and forced through coturn.

    python -m benchmarks.turn --duration 20 --size 1280x720 --fps 30 --bitrate 2M

Starts Debian's coturn on loopback (use-auth-secret, as docs/remote.md sets it
up on a VPS), a relay with the test pattern, and three aiortc viewers at once:
one direct (host candidates, as on a LAN or through a port forward), one
forced through TURN over UDP and one over TCP (iceTransportPolicy "relay",
with credentials minted as the relay mints them). Each decodes every frame
and reads the pixel clock. On loopback this is what coturn itself adds (its
relaying, and TCP's framing and in-order delivery); across the internet the
detour through the TURN server's location comes on top (docs/remote.md).

``Coturn`` is also what tests/test_remote.py runs, in a network namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from benchmarks.options import add_stream_options
from benchmarks.peers import percentile
from benchmarks.ports import free_port
from relay.webrtc import borrowed
from relay.webrtc.borrowed import restrict_host_addresses
from relay.webrtc.ice import rest_credential
from relay.webrtc.whepclient import WhepViewer

TURNSERVER = "/usr/bin/turnserver"  # Debian's coturn (scripts/setup installs it with the test tools)
REALM = "camrelay.test"
STOP_TIMEOUT = 10.0  # seconds coturn or the relay get to exit on SIGTERM before SIGKILL
READY_TIMEOUT = 30.0  # seconds for coturn to listen, the relay to stream
SETTLE = 1.0  # seconds of each viewer's output that are not counted (connecting, the first keyframe)
CREDENTIAL_LIFETIME = 600  # seconds, as the relay's default webrtc.turn_credential_lifetime


class Coturn:
    """coturn with ``use-auth-secret`` on ``address``:``port`` (TCP and UDP), in network namespace ``netns`` if
    given; its log in ``workdir``/turnserver.log. A context manager: stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(
        self,
        address: str,
        port: int,
        secret: str,
        workdir: Path,
        netns: str = "",
        loopback_peers: bool = False,
        denied_peers: tuple[str, ...] = (),
    ) -> None:
        self.address, self.port, self.secret = address, port, secret
        self.workdir = workdir
        self.netns = netns
        self.loopback_peers = loopback_peers  # a relay on loopback is a loopback peer, which coturn refuses by default
        self.denied_peers = denied_peers  # denied-peer-ip ranges ("192.168.0.0-192.168.255.255"), as docs/remote.md
        self.log = workdir / "turnserver.log"
        self.proc: subprocess.Popen | None = None

    def url(self, transport: str) -> str:
        return f"turn:{self.address}:{self.port}?transport={transport}"

    def config(self) -> str:
        lines = [
            f"listening-ip={self.address}",
            f"listening-port={self.port}",
            f"relay-ip={self.address}",
            f"realm={REALM}",
            "use-auth-secret",
            f"static-auth-secret={self.secret}",
            "fingerprint",
            "no-tls",
            "no-dtls",
            "no-cli",
            "no-multicast-peers",
            "log-file=stdout",
            "simple-log",
            f"pidfile={self.workdir / 'turnserver.pid'}",
            f"userdb={self.workdir / 'turndb'}",  # not /var/lib/turn: nothing of the system's coturn is touched
        ]
        if self.loopback_peers:
            lines.append("allow-loopback-peers")
        lines += [f"denied-peer-ip={peers}" for peers in self.denied_peers]
        return "\n".join(lines) + "\n"

    def __enter__(self) -> Coturn:
        conf = self.workdir / "turnserver.conf"
        conf.write_text(self.config())
        conf.chmod(0o600)  # it holds the secret
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([*prefix, TURNSERVER, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        return self

    def __exit__(self, *exc) -> None:
        stop(self.proc)

    async def wait_ready(self) -> None:
        """Until coturn takes TCP connections (asked from the caller's network namespace)."""
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            assert self.proc is not None and self.proc.poll() is None, f"coturn exited: {self.log.read_text()[-2000:]}"
            try:
                _, writer = await asyncio.open_connection(self.address, self.port)
                writer.close()
                await writer.wait_closed()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"coturn not listening on {self.address}:{self.port}") from None
                await asyncio.sleep(0.1)


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_relay(size: str, fps: float, bitrate: str, port: int, state_dir: str) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "relay", "serve", "--source", f"cam0=test:{size}@{fps:g}", "--bitrate", bitrate,
        "--http-host", "127.0.0.1", "--http-port", str(port), "--ice-address", "127.0.0.1",
        "--encoder", "libx264", "--log-level", "warning", "--auth", "none", "--no-rtsp", "--state-dir", state_dir,
    ]  # fmt: skip
    return subprocess.Popen(cmd)


async def wait_streaming(http: aiohttp.ClientSession, base: str, relay: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        assert relay.poll() is None, "the relay exited"
        try:
            async with http.get(base + "/api/v1/streams") as resp:
                if (await resp.json())["streams"][0]["frames_encoded"] > 0:
                    return
        except (aiohttp.ClientError, KeyError, IndexError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the relay did not start streaming")
        await asyncio.sleep(0.2)


async def watch(viewer: WhepViewer, duration: float) -> dict:
    await viewer.connect()
    await viewer.recv(timeout=20)
    latencies: list[float] = []
    frames = 0
    start = time.monotonic()
    while time.monotonic() - start < SETTLE + duration:
        (s,) = await viewer.read_frames(1)
        if time.monotonic() - start > SETTLE:
            frames += 1
            if s.latency_ms is not None:
                latencies.append(s.latency_ms)
    pair = borrowed.nominated_pair(viewer.pc.getTransceivers()[0].receiver.transport)
    return {
        "pair": f"{pair.local_candidate.type} -> {pair.remote_candidate.type}",
        "fps": round(frames / duration, 1),
        "latency_ms": {"samples": len(latencies), **{f"p{p}": percentile(latencies, p) for p in (50, 95, 99)}},
    }


async def measure(base: str, turn: Coturn, duration: float) -> dict:
    username, credential = rest_credential(turn.secret, "benchmark", int(time.time()) + CREDENTIAL_LIFETIME)
    from aiortc import RTCIceServer

    async with aiohttp.ClientSession() as http:
        viewers = {
            "direct": WhepViewer(base + "/whep/cam0", http),
            **{
                f"turn_{t}": WhepViewer(
                    base + "/whep/cam0", http, ice_servers=[RTCIceServer(turn.url(t), username, credential)],
                    relay_only=True,
                )
                for t in ("udp", "tcp")
            },
        }  # fmt: skip
        try:
            results = await asyncio.gather(*(watch(v, duration) for v in viewers.values()))
        finally:
            await asyncio.gather(*(v.close() for v in viewers.values()))
    return dict(zip(viewers, results, strict=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=20.0)
    add_stream_options(ap)
    args = ap.parse_args(argv)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        with Coturn("127.0.0.1", free_port(), secrets.token_urlsafe(24), workdir, loopback_peers=True) as turn:
            relay = start_relay(args.size, args.fps, args.bitrate, port, str(workdir / "state"))
            try:

                async def run() -> dict:
                    await turn.wait_ready()
                    async with aiohttp.ClientSession() as http:
                        await wait_streaming(http, base, relay)
                    return await measure(base, turn, args.duration)

                restrict_host_addresses(["127.0.0.1"])
                report = asyncio.run(run())
            finally:
                stop(relay)
    report["frame_interval_ms"] = 1000 / args.fps
    report["host"] = socket.gethostname()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
