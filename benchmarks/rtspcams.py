"""Test RTSP cameras: a private mediamtx on loopback and ffmpeg publishers that behave like IP cameras.

For the tests (fixtures in ``tests/cameras.py``) and the benchmarks
(``benchmarks/cameras.py``). Everything listens on 127.0.0.1 only, on free
ports, with its configuration and logs in a temporary directory.

- ``CameraServer``: a mediamtx where cameras publish (RTSP over TCP) and
  anything reads ``rtsp://127.0.0.1:<port>/<path>``. No credentials unless
  given ``credentials=(user, password)``: then publishing and reading take
  them, as an IP camera with a password does, and ``url`` carries them.
- ``LiveCamera``: the project's test pattern (``relay.camera.testpattern``)
  rendered live in a small Python process, each frame stamped with the wall
  clock when it is drawn (the pixel clock, ``shared/spec/test-pattern.md``),
  raw frames piped to ffmpeg, which encodes them as a camera does (``Encoding``:
  H.264 with libx264 or H.265 with libx265; profile, GOP, B-frames, parameter
  sets out of band only or repeated) and publishes them.
- ``ResolutionChangeCamera``: one RTSP session whose size changes: every
  ``every`` seconds (or at each ``change()`` with ``every=0``) the camera's
  encoder restarts at the next size and sends
  the new SPS and PPS in band before its IDR, as cameras whose RTSP server
  outlives an encoder restart do (a reader's SDP keeps the size it joined at).
  Cameras that drop their sessions on a settings change instead are a
  ``LiveCamera`` stopped and started again at another size.
- ``LoopedCamera``: a clip encoded once (``make_clip``) and looped with
  ``-stream_loop -1 -re -c copy``: no encoder, so many of them cost little.

Every camera has ``url``, ``start()``, ``stop()`` (ffmpeg ends its session) and
``kill()`` (it vanishes: SIGKILL, no TEARDOWN).

    python -m benchmarks.rtspcams serve --live 1 --looped 4 --size 1920x1080

runs a server with cameras and prints their URLs until interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from benchmarks.load import stop_processes
from benchmarks.ports import free_port
from relay.rtsp import PUBLISH_PACKET_SIZE, find_mediamtx
from relay.source import parse_size

READY_TIMEOUT = 20.0  # seconds for mediamtx, or a camera's first publish, to come up
POLL = 0.1  # seconds between looks while waiting
LOG_TAIL = 2000  # characters of a process's log quoted when it fails
FFMPEG = "ffmpeg"
FFMPEG_QUIET = ["-hide_banner", "-nostdin", "-loglevel", "warning"]
# Each encoder's cheapest preset that still honours the profile: x264's ultrafast turns CABAC and the 8x8
# transform off, so whatever profile is asked for the stream comes out Constrained Baseline; superfast keeps
# them, so High is High. x265's ultrafast is already close to a core at 720p30 here.
PRESETS = {"h264": "superfast", "h265": "ultrafast"}
CLIP_PRESET = "veryfast"  # a clip is encoded once: better quality for the same bit rate
CLIP_SECONDS = 10  # long enough that the loop point is rare, short enough to encode in seconds
PROFILES = ("baseline", "main", "high")
CHANGE_SIGNAL = signal.SIGUSR1  # to a ResolutionChangeCamera's pattern process: the next size now
PROBE_BYTES = 4096  # what ffmpeg reads of piped H.264 before it starts: the SPS, PPS and x264's SEI, with room


# -- the server -----------------------------------------------------------------------------------------------


def server_config(rtsp_port: int, api_port: int, credentials: tuple[str, str] | None = None) -> str:
    """mediamtx with RTSP (TCP) on loopback and its API there (for readiness); any path takes a publisher.
    With ``credentials`` (user, password), publishing and reading take them; the API never does. JSON is YAML."""
    media = ("publish", "read")
    users = [{"user": "any", "pass": "", "actions": ("api",) if credentials else (*media, "api")}]
    if credentials:
        users.append({"user": credentials[0], "pass": credentials[1], "actions": media})
    config = {
        "logLevel": "warn",
        "logDestinations": ["stdout"],
        "authMethod": "internal",
        "authInternalUsers": [
            {
                "user": u["user"],
                "pass": u["pass"],
                "ips": ["127.0.0.1/32"],
                "permissions": [{"action": a} for a in u["actions"]],
            }
            for u in users
        ],
        "api": True,
        "apiAddress": f"127.0.0.1:{api_port}",
        "rtsp": True,
        "rtspTransports": ["tcp"],
        "rtspEncryption": "no",
        "rtspAddress": f"127.0.0.1:{rtsp_port}",
        **dict.fromkeys(("metrics", "pprof", "playback", "rtmp", "hls", "webrtc", "srt", "moq"), False),
        "paths": {"all_others": {}},
    }
    return json.dumps(config, indent=2) + "\n"


class CameraServer:
    """A private mediamtx on 127.0.0.1 that cameras publish into; a context manager (``start`` / ``stop``).

    With ``credentials`` (user, password) its cameras take a password, and their ``url`` has it."""

    def __init__(self, workdir: Path | None = None, credentials: tuple[str, str] | None = None) -> None:
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="camrelay-cams-")
        self.workdir = Path(workdir or self._tmp.name)
        self.credentials = credentials
        self.rtsp_port = free_port()
        self.api_port = free_port()
        self.proc: subprocess.Popen | None = None

    def url(self, path: str) -> str:
        login = f"{self.credentials[0]}:{self.credentials[1]}@" if self.credentials else ""
        return f"rtsp://{login}127.0.0.1:{self.rtsp_port}/{path}"

    def start(self) -> CameraServer:
        config = self.workdir / "cameras-mediamtx.yml"
        config.write_text(server_config(self.rtsp_port, self.api_port, self.credentials))
        config.chmod(0o600)  # it may hold a password
        self.proc = spawn([find_mediamtx(""), str(config)], self.workdir / "cameras-mediamtx.log")
        deadline = time.monotonic() + READY_TIMEOUT
        while self._api("/v3/paths/list") is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"camera server did not start: {tail(self.workdir / 'cameras-mediamtx.log')}")
            time.sleep(POLL)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_processes(self.proc)
            self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> CameraServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _api(self, what: str) -> dict | None:
        return mediamtx_api(self.api_port, what)

    def ready(self, path: str) -> bool:
        """Whether a camera is publishing on ``path`` now."""
        return path_ready(self.api_port, path)

    def wait(self, path: str, ready: bool = True, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while self.ready(path) != ready:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} still {'not ' if ready else ''}publishing after {timeout:g} s")
            time.sleep(POLL)


def mediamtx_api(api_port: int, what: str) -> dict | None:
    """GET ``what`` from a mediamtx API on loopback: its JSON, {} for an HTTP error, None when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}{what}", timeout=2) as r:
            return json.load(r)
    except urllib.error.HTTPError:
        return {}  # it answered: e.g. the path is not there
    except OSError:
        return None


def path_ready(api_port: int, path: str) -> bool:
    """Whether the mediamtx whose API is at ``api_port`` has a stream on ``path`` now."""
    return bool((mediamtx_api(api_port, f"/v3/paths/get/{path}") or {}).get("ready"))


def spawn(cmd: list[str], log: Path, **kw) -> subprocess.Popen:
    """``cmd`` with its output appended to ``log`` (stdout too, unless ``kw`` routes it)."""
    with open(log, "ab") as out:
        kw.setdefault("stdout", out)
        return subprocess.Popen(cmd, stdin=kw.pop("stdin", subprocess.DEVNULL), stderr=out, **kw)


def tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-LOG_TAIL:]
    except OSError:
        return ""


# -- cameras --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoding:
    """How a camera encodes: what a passthrough relay has to cope with."""

    codec: str = "h264"  # "h264" (libx264) or "h265" (libx265)
    profile: str = "high"  # H.264: baseline (x264 makes it Constrained Baseline), main or high
    gop: float = 1.0  # seconds from one keyframe to the next, fixed (no scene-cut keyframes)
    bframes: int = 0  # 0: none, and -tune zerolatency (no lookahead); else this many between references
    repeat_headers: bool = False  # SPS/PPS (and VPS) in band before every IDR too; else in the SDP only
    bitrate: str = "2M"
    preset: str = ""  # the encoder's preset; "" for PRESETS[codec]

    def __post_init__(self) -> None:
        if self.codec not in PRESETS:
            raise ValueError(f"codec {self.codec!r} is not one of {', '.join(PRESETS)}")
        if self.codec == "h264" and self.profile not in PROFILES:
            raise ValueError(f"profile {self.profile!r} is not one of {', '.join(PROFILES)}")
        if self.bframes and self.codec == "h264" and self.profile == "baseline":
            raise ValueError("baseline has no B-frames")

    def ffmpeg_args(self, fps: float) -> list[str]:
        """ffmpeg's output options for this encoding at ``fps``."""
        gop = max(1, round(self.gop * fps))
        preset = self.preset or PRESETS[self.codec]
        rate = ["-b:v", self.bitrate, "-maxrate", self.bitrate, "-bufsize", self.bitrate]  # at most a second queued
        tune = [] if self.bframes else ["-tune", "zerolatency"]
        if self.codec == "h264":
            # The RTSP muxer asks for global headers: x264 then puts SPS/PPS in the SDP only, unless told to repeat.
            params = ["-x264-params", "repeat-headers=1"] if self.repeat_headers else []
            return [
                "-c:v", "libx264", "-preset", preset, "-profile:v", self.profile, *tune, "-pix_fmt", "yuv420p",
                "-g", str(gop), "-keyint_min", str(gop), "-sc_threshold", "0", "-bf", str(self.bframes),
                *rate, *params,
            ]  # fmt: skip
        x265 = f"keyint={gop}:min-keyint={gop}:scenecut=0:open-gop=0:bframes={self.bframes}"
        x265 += f":repeat-headers={int(self.repeat_headers)}:log-level=error"
        return ["-c:v", "libx265", "-preset", preset, *tune, "-pix_fmt", "yuv420p", *rate, "-x265-params", x265]


@dataclass
class Camera:
    """A camera publishing on ``server`` at ``path``: a pipeline of processes, the last one ffmpeg."""

    server: CameraServer
    path: str
    procs: list[subprocess.Popen] = field(default_factory=list, init=False, repr=False)

    @property
    def url(self) -> str:
        return self.server.url(self.path)

    @property
    def log(self) -> Path:
        return self.server.workdir / f"{self.path}.log"

    @property
    def running(self) -> bool:
        return bool(self.procs) and all(p.poll() is None for p in self.procs)

    def commands(self) -> list[list[str]]:
        """The pipeline: each command's stdout feeds the next one's stdin."""
        raise NotImplementedError

    def publish(self) -> list[str]:
        """ffmpeg's output: RTSP over TCP to the server."""
        return ["-f", "rtsp", "-rtsp_transport", "tcp", "-pkt_size", str(PUBLISH_PACKET_SIZE), self.url]

    def start(self, wait: bool = True) -> None:
        """Start publishing; with ``wait``, return once the server has the stream."""
        if self.procs:
            self.kill()
        feed = subprocess.DEVNULL
        commands = self.commands()
        for i, cmd in enumerate(commands):
            last = i == len(commands) - 1
            proc = spawn(cmd, self.log, stdin=feed, **({} if last else {"stdout": subprocess.PIPE}))
            if proc.stdout is not None:
                feed = proc.stdout
            if i:
                self.procs[-1].stdout.close()  # the next one holds it now: the writer sees it go
            self.procs.append(proc)
        if wait:
            self.wait_publishing()

    def wait_publishing(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.server.ready(self.path):
            if not self.running or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"camera {self.path} did not start publishing: {tail(self.log)}")
            time.sleep(POLL)

    def stop(self) -> None:
        """As when a camera is told to stop: ffmpeg ends its RTSP session (SIGTERM, then SIGKILL if stuck)."""
        stop_processes(*reversed(self.procs))
        self.procs = []

    def kill(self) -> None:
        """The camera vanishes: every process of it killed at once, its session never closed."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            p.wait()
        self.procs = []


def frames_command(width: int, height: int, fps: float, frames: int = 0, paced: bool = True) -> list[str]:
    """The pattern process: raw yuv420p frames of the test pattern on stdout."""
    cmd = [sys.executable, "-m", "benchmarks.rtspcams", "frames", "--size", f"{width}x{height}", "--fps", f"{fps:g}"]
    return cmd + (["--frames", str(frames)] if frames else []) + ([] if paced else ["--unpaced"])


def raw_input(width: int, height: int, fps: float) -> list[str]:
    return ["-f", "rawvideo", "-pix_fmt", "yuv420p", "-video_size", f"{width}x{height}", "-framerate", f"{fps:g}"]


@dataclass
class LiveCamera(Camera):
    """The test pattern, drawn live with the pixel clock, encoded by ffmpeg as ``encoding`` says."""

    width: int = 640
    height: int = 360
    fps: float = 30.0
    encoding: Encoding = field(default_factory=Encoding)
    sound: str = ""  # a sound track beside the video: one of SOUND_CODECS ("" none)

    def commands(self) -> list[list[str]]:
        encode = [FFMPEG, *FFMPEG_QUIET, *raw_input(self.width, self.height, self.fps), "-i", "pipe:0"]
        audio = ["-an"]
        if self.sound:
            wav = make_sound(self.server.workdir / "sound.wav")
            encode += ["-re", "-stream_loop", "-1", "-i", str(wav)]
            audio = ["-map", "0:v", "-map", "1:a", *SOUND_CODECS[self.sound]]
        encode += self.encoding.ffmpeg_args(self.fps) + [*audio, *self.publish()]
        return [frames_command(self.width, self.height, self.fps), encode]


# A camera's sound, as ffmpeg encodes it: what IP cameras send (AAC-LC, G.711 at 8 kHz, Opus).
SOUND_CODECS = {
    "aac": ["-c:a", "aac", "-b:a", "64k"],
    "opus": ["-c:a", "libopus", "-b:a", "48k", "-frame_duration", "40"],  # 40 ms: not WebRTC's usual 20
    "latm": ["-c:a", "aac", "-b:a", "64k", "-rtpflags", "latm"],  # AAC in MP4A-LATM, as some cameras send it
    "pcmu": ["-c:a", "pcm_mulaw", "-ar", "8000", "-ac", "1"],
    "pcma": ["-c:a", "pcm_alaw", "-ar", "8000", "-ac", "1"],
}
SOUND_SECONDS = 10  # the test sound's bursts, 2 kHz at the first: looped, a tenth burst every 10 s


def make_sound(path: Path, seconds: int = SOUND_SECONDS) -> Path:
    """The test pattern's sound (``relay.camera.testsound``) for ``seconds`` as a 48 kHz mono WAV, made once."""
    import wave

    from relay.camera import testsound

    if not path.exists():
        with wave.open(str(path), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(testsound.RATE)
            out.writeframes(testsound.render(0, seconds * testsound.RATE).tobytes())
    return path


@dataclass
class ResolutionChangeCamera(Camera):
    """One RTSP session whose picture size changes every ``every`` seconds, cycling through ``sizes``; with
    ``every=0``, at each ``change()`` only (a camera whose settings someone changes while it streams).

    The pattern process encodes (PyAV, libx264, High, no B-frames, SPS and PPS in band before every IDR) and
    restarts its encoder at each change, so the first IDR at the new size comes with the new SPS and PPS; ffmpeg
    passes the H.264 through to the server (``-c copy``). A reader's SDP names the size when it joined (mediamtx
    keeps the latest parameter sets it saw).
    """

    sizes: tuple[tuple[int, int], ...] = ((640, 360), (960, 540))
    every: float = 3.0
    fps: float = 30.0
    gop: float = 1.0
    bitrate: str = "1M"

    def commands(self) -> list[list[str]]:
        sizes = ",".join(f"{w}x{h}" for w, h in self.sizes)
        pattern = [
            sys.executable, "-m", "benchmarks.rtspcams", "h264", "--sizes", sizes, "--every", f"{self.every:g}",
            "--fps", f"{self.fps:g}", "--gop", f"{self.gop:g}", "--bitrate", self.bitrate,
        ]  # fmt: skip
        # Little probing delay: the parameter sets at the start tell the demuxer what it needs.
        probe = ["-probesize", str(PROBE_BYTES), "-analyzeduration", "0"]
        copy = [FFMPEG, *FFMPEG_QUIET, "-fflags", "+nobuffer+genpts", *probe]
        copy += ["-f", "h264", "-framerate", f"{self.fps:g}", "-i", "pipe:0", "-c", "copy", *self.publish()]
        return [pattern, copy]

    def change(self) -> None:
        """The next size, from the next frame on (the pattern process takes SIGUSR1 as the order)."""
        if not self.running:
            raise RuntimeError(f"camera {self.path} is not running")
        self.procs[0].send_signal(CHANGE_SIGNAL)


@dataclass
class LoopedCamera(Camera):
    """``clip`` looped forever at its own rate with stream copy: a camera that costs no encoder."""

    clip: Path = Path()

    def commands(self) -> list[list[str]]:
        loop = ["-re", "-stream_loop", "-1", "-i", str(self.clip), "-c", "copy", "-an"]
        return [[FFMPEG, *FFMPEG_QUIET, *loop, *self.publish()]]


def make_clip(
    directory: Path, width: int, height: int, fps: float, bitrate: str, gop: float = 1.0, seconds: int = CLIP_SECONDS
) -> Path:
    """The test pattern encoded once (H.264 High, no B-frames, fixed GOP), kept in ``directory`` for reuse.

    Its pixel clock starts when it is made and advances one frame interval a frame, as if captured live.
    """
    name = f"pattern-{width}x{height}-{fps:g}fps-{bitrate}-gop{gop:g}-{seconds}s.mp4"
    clip = directory / name
    if clip.exists():
        return clip
    directory.mkdir(parents=True, exist_ok=True)
    part = clip.with_name(clip.name + ".part.mp4")
    encoding = Encoding(gop=gop, bitrate=bitrate, preset=CLIP_PRESET)
    encode = [FFMPEG, *FFMPEG_QUIET, *raw_input(width, height, fps), "-i", "pipe:0", *encoding.ffmpeg_args(fps)]
    frames = subprocess.Popen(
        frames_command(width, height, fps, round(seconds * fps), paced=False), stdout=subprocess.PIPE
    )
    try:
        subprocess.run([*encode, "-an", "-y", str(part)], stdin=frames.stdout, check=True, capture_output=True)
    finally:
        frames.stdout.close()
        stop_processes(frames)
    part.replace(clip)
    return clip


# -- what a reader gets ---------------------------------------------------------------------------------------

# Parameter-set NAL unit types: H.264 SPS, PPS; H.265 VPS, SPS, PPS.
PARAMETER_SETS = {"h264": frozenset({7, 8}), "hevc": frozenset({32, 33, 34})}
# Lowest-latency options for FFmpeg's RTSP client: no probing delay, no reorder queue (as a relay reads).
READER_OPTIONS = {
    "rtsp_transport": "tcp", "fflags": "nobuffer", "flags": "low_delay", "max_delay": "0", "reorder_queue_size": "0",
}  # fmt: skip
READ_TIMEOUT = 10.0  # seconds an RTSP read may block


def nal_types(data: bytes, codec: str = "h264") -> list[int]:
    """The NAL unit types of an Annex B access unit, in order."""
    out, i = [], 0
    while (i := data.find(b"\x00\x00\x01", i)) >= 0 and i + 3 < len(data):
        head = data[i + 3]
        out.append(head & 0x1F if codec == "h264" else (head >> 1) & 0x3F)
        i += 3
    return out


@dataclass
class Unit:
    """One access unit as a reader demuxed it."""

    pts: int | None
    keyframe: bool
    nals: list[int]


@dataclass
class Picture:
    """One decoded picture."""

    unit: int  # the index of the access unit whose decoding gave it out
    width: int
    height: int
    kind: str  # "I", "P" or "B"
    clock: int | None  # the pixel clock: capture time in ms since the epoch, None when it does not read
    received: float  # wall clock (time.time()) when it came out of the decoder

    @property
    def latency_ms(self) -> float | None:
        """Capture to decoded picture, on this host's clock."""
        return None if self.clock is None else self.received * 1000 - self.clock


@dataclass
class Watched:
    """What an RTSP reader got: the stream as the SDP describes it, then every access unit and picture."""

    codec: str  # "h264" or "hevc"
    profile: str | None
    width: int
    height: int
    sdp_nals: list[int]  # parameter sets in the SDP (FFmpeg's extradata)
    units: list[Unit] = field(default_factory=list)
    pictures: list[Picture] = field(default_factory=list)

    @property
    def keyframe_intervals(self) -> list[int]:
        """Access units from each keyframe to the next."""
        keys = [i for i, u in enumerate(self.units) if u.keyframe]
        return [b - a for a, b in zip(keys, keys[1:], strict=False)]

    @property
    def reordered(self) -> bool:
        """Whether presentation order differs from decode order (B-frames)."""
        pts = [u.pts for u in self.units if u.pts is not None]
        return any(b < a for a, b in zip(pts, pts[1:], strict=False))

    @property
    def in_band_parameter_sets(self) -> list[int]:
        """Indexes of the access units that carry a parameter set."""
        sets = PARAMETER_SETS[self.codec]
        return [i for i, u in enumerate(self.units) if sets & set(u.nals)]


def watch(
    url: str,
    *,
    units: int = 0,
    keyframes: int = 0,
    until: Callable[[Watched], bool] | None = None,
    decode: bool = True,
) -> Watched:
    """Read ``url`` over RTSP/TCP with PyAV until ``units`` access units, or ``keyframes`` keyframes, arrived, or
    ``until`` (asked after each access unit) says so.

    Blocking (run it in a thread from async code); raises ``av.FFmpegError`` or ``OSError`` when the stream ends
    or stalls for ``READ_TIMEOUT``, keeping what arrived in the exception's ``watched`` attribute.
    """
    import av
    from av.video.frame import PictureType

    from relay.camera import pixelclock
    from relay.webrtc.whepclient import luma

    with av.open(url, options=READER_OPTIONS, timeout=READ_TIMEOUT) as container:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        codec = ctx.name
        seen = Watched(codec, ctx.profile, ctx.width, ctx.height, nal_types(bytes(ctx.extradata or b""), codec))
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                seen.units.append(Unit(packet.pts, packet.is_keyframe, nal_types(bytes(packet), codec)))
                for frame in packet.decode() if decode else ():
                    now = time.time()
                    kind = PictureType(frame.pict_type).name
                    clock = pixelclock.read(luma(frame, frame.width // pixelclock.CELLS))
                    seen.pictures.append(Picture(len(seen.units) - 1, frame.width, frame.height, kind, clock, now))
                if (
                    (units and len(seen.units) >= units)
                    or (keyframes and sum(u.keyframe for u in seen.units) >= keyframes)
                    or (until is not None and until(seen))
                ):
                    break
        except (av.FFmpegError, OSError) as exc:
            exc.watched = seen
            raise
    return seen


# -- the pattern processes --------------------------------------------------------------------------------------


def _paced(fps: float, paced: bool, frames: int):
    """Frame indexes with their capture time (ms): on the wall clock when paced, else one interval apart."""
    from relay.camera.testpattern import now_ms

    start, interval = time.monotonic(), 1.0 / fps
    t0 = now_ms()
    due = start
    i = 0
    while not frames or i < frames:
        if paced:
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            due = max(due + interval, time.monotonic())  # late: carry on from now, never a burst
            yield i, now_ms()
        else:
            yield i, t0 + round(i * 1000 * interval)
        i += 1


def _frames_main(args: argparse.Namespace) -> None:
    from relay.camera.testpattern import PatternRenderer

    width, height = parse_size(args.size)
    renderer = PatternRenderer(width, height)
    out = sys.stdout.buffer
    for _, t_ms in _paced(args.fps, not args.unpaced, args.frames):
        out.write(renderer.planes(t_ms).data)
    out.flush()


def _h264_main(args: argparse.Namespace) -> None:
    import av

    from relay.camera.testpattern import PatternRenderer

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    out = sys.stdout.buffer
    per_size = max(1, round(args.every * args.fps)) if args.every > 0 else 0  # 0: on CHANGE_SIGNAL only
    ordered: list[int] = []  # CHANGE_SIGNALs not acted on yet
    signal.signal(CHANGE_SIGNAL, lambda *_: ordered.append(1))  # before the first frame: before anyone can send it
    encoder = renderer = None
    at = -1  # the index in sizes of the size now
    for i, t_ms in _paced(args.fps, True, 0):
        if i == 0 or (per_size and i % per_size == 0) or ordered:
            # a new size: a new encoder, whose first IDR carries the new SPS and PPS
            ordered.clear()
            at = (at + 1) % len(sizes)
            width, height = sizes[at]
            renderer = PatternRenderer(width, height)
            encoder = av.CodecContext.create("libx264", "w")
            encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
            encoder.framerate = round(args.fps)
            encoder.time_base = Fraction(1, round(args.fps))
            encoder.bit_rate = int(parse_rate(args.bitrate))
            encoder.gop_size = max(1, round(args.gop * args.fps))
            encoder.max_b_frames = 0
            encoder.options = {"preset": PRESETS["h264"], "tune": "zerolatency", "profile": "high", "sc_threshold": "0"}
        frame = av.VideoFrame.from_ndarray(renderer.planes(t_ms), format="yuv420p")
        frame.pts = i
        for packet in encoder.encode(frame):
            out.write(bytes(packet))
        out.flush()


def parse_rate(text: str) -> float:
    """``4M``, ``500k`` or ``2000000`` in bits per second."""
    scale = {"k": 1e3, "m": 1e6}.get(text[-1:].lower(), 1)
    return float(text[:-1] if scale != 1 else text) * scale


def _serve_main(args: argparse.Namespace) -> None:
    width, height = parse_size(args.size)
    with CameraServer() as server:
        cams: list[Camera] = []
        try:
            clip = make_clip(Path(args.clip_dir), width, height, args.fps, args.bitrate) if args.looped else None
            for i in range(args.live):
                cams.append(LiveCamera(server, f"live{i}", width, height, args.fps, Encoding(bitrate=args.bitrate)))
            cams += [LoopedCamera(server, f"cam{i}", clip) for i in range(args.looped)]
            for cam in cams:
                cam.start()
                print(cam.url, flush=True)
            stop = {signal.SIGINT, signal.SIGTERM}
            signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # after the cameras started: theirs stay as they were
            signal.sigwait(stop)
        finally:
            for cam in cams:
                cam.stop()


def default_clip_dir() -> Path:
    return Path(tempfile.gettempdir()) / "camrelay-bench-clips"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.rtspcams", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    frames = sub.add_parser("frames", help="raw yuv420p test pattern frames on stdout (a camera's sensor)")
    frames.add_argument("--size", default="640x360")
    frames.add_argument("--fps", type=float, default=30.0)
    frames.add_argument("--frames", type=int, default=0, help="stop after this many (default: never)")
    frames.add_argument("--unpaced", action="store_true", help="as fast as they are taken, clocks a frame apart")
    h264 = sub.add_parser("h264", help="H.264 on stdout whose picture size changes (in-band SPS/PPS)")
    h264.add_argument("--sizes", default="640x360,960x540")
    h264.add_argument("--every", type=float, default=3.0, help="seconds at each size; 0: the next at each SIGUSR1")
    h264.add_argument("--fps", type=float, default=30.0)
    h264.add_argument("--gop", type=float, default=1.0, help="seconds between keyframes")
    h264.add_argument("--bitrate", default="1M")
    serve = sub.add_parser("serve", help="a camera server with cameras; prints their URLs")
    serve.add_argument("--live", type=int, default=1, help="live pixel-clock cameras (live0, live1, ...)")
    serve.add_argument("--looped", type=int, default=0, help="looped-clip cameras (cam0, cam1, ...)")
    serve.add_argument("--size", default="1280x720")
    serve.add_argument("--fps", type=float, default=30.0)
    serve.add_argument("--bitrate", default="2M")
    serve.add_argument("--clip-dir", default=str(default_clip_dir()))
    args = ap.parse_args(argv)
    try:
        {"frames": _frames_main, "h264": _h264_main, "serve": _serve_main}[args.command](args)
    except (BrokenPipeError, KeyboardInterrupt):
        # The reader went away (the camera was stopped): leave quietly, without a second EPIPE at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
