import pytest

from relay.config import ConfigError, IceServer, load
from relay.source import SourceSpec, audio_source, parse_source_spec

FULL = """
log_level = "debug"
[http]
host = "127.0.0.1"
port = 9000
[video]
size = "1920x1080"
fps = 25
bitrate = "4M"
keyframe_interval = "2s"
encoder = "libx264"
[webrtc]
ice_servers = ["stun:stun.example.org:3478"]
ice_addresses = ["192.168.1.10"]
connect_timeout = "10s"
max_viewers = 30
[streams]
front = "v4l2:/dev/v4l/by-id/usb-cam-video-index0"
pattern = "test:640x360@15"
"""


def test_file_values_are_typed():
    c = load(FULL)
    assert (c.http.host, c.http.port) == ("127.0.0.1", 9000)
    assert (c.video.width, c.video.height, c.video.fps) == (1920, 1080, 25.0)
    assert c.video.bitrate == 4_000_000 and c.video.keyframe_interval == 2.0
    assert c.webrtc.ice_servers == (IceServer(("stun:stun.example.org:3478",)),)
    assert c.webrtc.connect_timeout == 10.0 and c.webrtc.max_viewers == 30
    assert [s.name for s in c.streams] == ["front", "pattern"]
    assert c.streams[1].source == SourceSpec("test", "", 640, 360, 15.0)
    assert c.log_level == "debug"


def test_defaults():
    c = load()
    assert (c.http.port, c.video.width, c.video.height, c.video.fps, c.video.bitrate) == (
        8080,
        1280,
        720,
        30.0,
        2_000_000,
    )
    assert c.streams == () and c.webrtc.ice_servers == ()


def test_environment_overrides_file_and_flags_override_environment():
    env = {"CAMRELAY_HTTP_PORT": "9100", "CAMRELAY_VIDEO_FPS": "15", "PATH": "/bin"}
    c = load(FULL, env, {"video.fps": "10"})
    assert c.http.port == 9100
    assert c.video.fps == 10.0


def test_streams_from_environment_and_flags():
    c = load(None, {"CAMRELAY_STREAMS": "a=test: b=v4l2:/dev/video2"})
    assert [(s.name, str(s.source)) for s in c.streams] == [("a", "test:"), ("b", "v4l2:/dev/video2")]
    c = load(FULL, {}, {}, ["cam9=test:320x240@5", "rtsp://u:p@cam.local/s"])
    assert [s.name for s in c.streams] == ["cam9", "cam1"]
    assert c.streams[1].source.kind == "rtsp"


@pytest.mark.parametrize(
    ("toml", "env", "flags", "message"),
    [
        ("[http]\nport = 70000", {}, {}, "http.port: must be in 1..65535, got 70000"),
        ('[http]\nport = "x"', {}, {}, "http.port: expected a whole number, got 'x'"),
        ("[http]\nprot = 1", {}, {}, "http.prot: unknown key"),
        ("colour = 1", {}, {}, "colour: unknown key"),
        ('[video]\nsize = "1280*720"', {}, {}, "video.size: size '1280*720' is not WIDTHxHEIGHT, e.g. 1280x720"),
        ('[video]\nsize = "1281x720"', {}, {}, "video.size: size '1281x720' must have even width and height"),
        ('[video]\nsize = "160x120"', {}, {}, "video.size: width 160 is below 320, the smallest the relay serves"),
        ("[video]\nfps = 500", {}, {}, "video.fps: frame rate '500' is outside 1..120"),
        ('[video]\nbitrate = "2Q"', {}, {}, "video.bitrate: expected a bit rate like 2M or 800k, got '2Q'"),
        ("[video]\nbitrate = 50", {}, {}, "video.bitrate: must be in 100000..50000000 bit/s, got 50"),
        (
            '[video]\nkeyframe_interval = "soon"',
            {},
            {},
            "video.keyframe_interval: expected a duration like 1.5s or 500ms, got 'soon'",
        ),
        (
            '[video]\nencoder = "nvenc"',
            {},
            {},
            "video.encoder: must be one of auto, libx264, h264_v4l2m2m, got 'nvenc'",
        ),
        (
            '[webrtc]\nice_servers = ["http://x"]',
            {},
            {},
            "webrtc.ice_servers: ICE server 'http://x' is not a stun:, stuns:, turn: or turns: URL",
        ),
        (
            '[http]\ncors_origins = ["example.org"]',
            {},
            {},
            "http.cors_origins: origin 'example.org' is not scheme://host[:port] (no path) or *",
        ),
        ("[webrtc]\nmax_viewers = 0", {}, {}, "webrtc.max_viewers: must be in 1..10000, got 0"),
        ('[video]\nmax_lag = "20s"', {}, {}, "video.max_lag: must be in 0.1s..10s, got '20s'"),
        ("[video]\nmax_lag = 0", {}, {}, "video.max_lag: must be positive, got 0"),
        ("[video]\ncameras_per_worker = 0", {}, {}, "video.cameras_per_worker: must be in 1..255, got 0"),
        ('[video]\ncpu_slice = "0.05ms"', {}, {}, "video.cpu_slice: must be in 0.0001s..0.1s, got '0.05ms'"),
        ('[video]\ncpu_slice = "1s"', {}, {}, "video.cpu_slice: must be in 0.0001s..0.1s, got '1s'"),
        ("[video]\ncpu_slice = false", {}, {}, "video.cpu_slice: expected a duration like 1.5s or 500ms, got False"),
        ("[video]\ncameras_per_worker = 1.5", {}, {}, "video.cameras_per_worker: expected a whole number, got 1.5"),
        (
            '[streams]\n"bad name" = "test:"',
            {},
            {},
            "streams.bad name: name must be letters, digits, - or _ (at most 64), not live, all, all_others",
        ),
        ('[streams]\n"cam\\n" = "test:"', {}, {}, "streams.cam\\n: name must be letters"),  # $ matched before it
        ('[streams]\nlive = "test:"', {}, {}, "streams.live: name must be letters"),  # camrelay's alias in mediamtx
        ('[streams]\nall = "test:"', {}, {}, "streams.all: name must be letters"),  # mediamtx refused its config
        ('[streams]\nall_others = "test:"', {}, {}, "streams.all_others: name must be letters"),
        ('[[whip]]\nstream = "live"\nurl = "https://x/whip"', {}, {}, "whip[0].stream: 'live' is not a stream name"),
        (
            '[streams]\ncam0 = "usb:0"',
            {},
            {},
            "streams.cam0: source 'usb:0' has unknown kind 'usb'; expected test, v4l2, rtsp or file",
        ),
        ("[streams]\ncam0 = 5", {}, {}, "streams.cam0: expected a source spec string, got 5"),
        ("[http\n", {}, {}, "config file: "),
        ('[rtsp]\nuser = "nvr"', {}, {}, "rtsp.password: set both rtsp.user and rtsp.password, or neither"),
        ('[rtsp]\npassword = "x"', {}, {}, "rtsp.user: set both rtsp.user and rtsp.password, or neither"),
        ('[rtsp]\nuser = "a b"', {}, {}, "rtsp.user: may hold only letters, digits, '.', '_' and '-'"),
        ('[rtsp]\npassword = "two words"', {}, {}, "rtsp.password: may hold only printable ASCII without spaces"),
        (
            "[rtsp]\nrtp_port = 8001",
            {},
            {},
            "rtsp.rtp_port: must be even, with rtsp.rtcp_port the next port (RTP/RTCP pairs)",
        ),
        ('[rtsp]\nenabled = "maybe"', {}, {}, "rtsp.enabled: expected true or false, got 'maybe'"),
        ("[rtsp]\nmediamtx_threads = -1", {}, {}, "rtsp.mediamtx_threads: must be in 0..256, got -1"),
        (
            '[rtsp]\npublish_url = "http://x"',
            {},
            {},
            "rtsp.publish_url: expected rtsp://host:port (no path), got 'http://x'",
        ),
        ('[auth]\nmode = "open"', {}, {}, "auth.mode: must be one of token, password, none, got 'open'"),
        ("[auth]\nsecret = 1", {}, {}, "auth.secret: unknown key"),
        (
            '[auth]\nmode = "password"',
            {},
            {},
            'auth.user: mode = "password" needs auth.user and auth.password_hash'
            " (make one with `camrelay hash-password`)",
        ),
        (
            '[auth]\nmode = "password"\nuser = "viewer"',
            {},
            {},
            'auth.password_hash: mode = "password" needs auth.user and auth.password_hash'
            " (make one with `camrelay hash-password`)",
        ),
        ('[auth]\nuser = "a:b"', {}, {}, "auth.user: may hold only letters, digits, '.', '_' and '-'"),
        ('[auth]\nprotect_metrics = "maybe"', {}, {}, "auth.protect_metrics: expected true or false, got 'maybe'"),
        (
            '[http]\nallowed_hosts = ["http://cam.local"]',
            {},
            {},
            "http.allowed_hosts: host 'http://cam.local' is not a host name or address (no scheme, no port) or *",
        ),
        (
            '[http]\nallowed_hosts = ["cafe.ad:8080"]',
            {},
            {},
            "http.allowed_hosts: host 'cafe.ad:8080' is not a host name or address (no scheme, no port) or *",
        ),
        (None, {"CAMRELAY_AUTH_MODE": "basic"}, {}, "auth.mode: must be one of token, password, none, got 'basic'"),
        (None, {}, {"auth.mode": "off"}, "auth.mode: must be one of token, password, none, got 'off'"),
        (None, {"CAMRELAY_HTTP_PROT": "1"}, {}, "CAMRELAY_HTTP_PROT: unknown setting"),
        (None, {"CAMRELAY_VIDEO_FPS": "fast"}, {}, "video.fps: frame rate 'fast' is not a number"),
        (None, {}, {"http.port": "0"}, "http.port: must be in 1..65535, got 0"),
        # nan, inf and values past sane bounds (TOML has nan and inf literals)
        ("[webrtc]\nsession_rate = nan", {}, {}, "webrtc.session_rate: must be a finite number, got nan"),
        ("[webrtc]\nsession_rate = inf", {}, {}, "webrtc.session_rate: must be a finite number, got inf"),
        ("[webrtc]\nsession_rate = 0", {}, {}, "webrtc.session_rate: must be in 0.001..1000, got 0"),
        ("[webrtc]\nsession_rate = true", {}, {}, "webrtc.session_rate: expected a number, got True"),
        (None, {"CAMRELAY_WEBRTC_SESSION_RATE": "nan"}, {}, "webrtc.session_rate: must be a finite number, got 'nan'"),
        ("[webrtc]\nconnect_timeout = inf", {}, {}, "webrtc.connect_timeout: must be a finite duration, got inf"),
        ("[webrtc]\nconnect_timeout = nan", {}, {}, "webrtc.connect_timeout: must be a finite duration, got nan"),
        ('[webrtc]\nconnect_timeout = "2h"', {}, {}, "webrtc.connect_timeout: must be in 1s..300s, got '2h'"),
        ("[webrtc]\nmax_pending = inf", {}, {}, "webrtc.max_pending: expected a whole number, got inf"),
        ("[webrtc]\nmax_viewers = 2.5", {}, {}, "webrtc.max_viewers: expected a whole number, got 2.5"),
        (
            "[video]\nkeyframe_interval = 1e12",
            {},
            {},
            "video.keyframe_interval: must be in 0.1s..60s, got 1000000000000.0",
        ),
        ('[video]\nkeyframe_interval = "1ms"', {}, {}, "video.keyframe_interval: must be in 0.1s..60s, got '1ms'"),
        ('[record]\nsegment = "2d"', {}, {}, "record.segment: must be in 1s..3600s, got '2d'"),
        ("[record]\nmax_age = inf", {}, {}, "record.max_age: must be a finite duration, got inf"),
        ('[record]\nmax_age = "1s"', {}, {}, "record.max_age: must be in 60s..36500d, got '1s'"),
        ("[record]\nsnapshot_interval = nan", {}, {}, "record.snapshot_interval: must be a finite duration, got nan"),
        (
            '[record]\nmax_size = "' + "9" * 400 + 'G"',
            {},
            {},
            "record.max_size: must be at most 1152921504606846976 bytes, got '" + "9" * 400 + "G'",
        ),
        ('[telemetry]\nlog_interval = "0.01s"', {}, {}, "telemetry.log_interval: must be in 1s..1d, got '0.01s'"),
        ("[devices]\ndiscover_interval = -1", {}, {}, "devices.discover_interval: must be positive, got -1"),
        ('[video]\nmode = "copy"', {}, {}, "video.mode: must be one of auto, passthrough, transcode, got 'copy'"),
        ("", {"CAMRELAY_VIDEO_MODE": "fast"}, {}, "video.mode: must be one of auto, passthrough, transcode"),
        (
            '[streams]\ndoor = "rtsp://u:secret@cam/s#mode=fast"',
            {},
            {},
            "streams.door: source option #mode=fast is not one of auto, passthrough, transcode",
        ),
        ('[streams]\ndoor = "rtsp://cam/s#quality=best"', {}, {}, "streams.door: source option #quality=best is not"),
        (
            '[streams]\ndoor = "file:/v.mp4#transport=udp"',
            {},
            {},
            "streams.door: source option #transport= is for rtsp",
        ),
        (
            '[streams]\npattern = "test:#mode=passthrough"',
            {},
            {},
            "streams.pattern: #mode=passthrough: the test pattern is drawn here, it has no H.264",
        ),
        ("[audio]\nenabled = 2", {}, {}, "audio.enabled: expected true or false, got 2"),
        ("", {"CAMRELAY_AUDIO_ENABLED": "loud"}, {}, "audio.enabled: expected true or false, got 'loud'"),
        ("[audio]\nbitrate = 64000", {}, {}, "audio.bitrate: unknown key"),
        (
            '[streams]\npattern = "test:#audio=mute"',
            {},
            {},
            "streams.pattern: source option #audio=mute is not one of on, off",
        ),
    ],
)
def test_bad_values_name_the_key(toml, env, flags, message):
    with pytest.raises(ConfigError) as info:
        load(toml, env, flags)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("webcam", "source 'webcam' has no kind; expected test:, v4l2:/dev/videoN, rtsp://... or file:PATH"),
        ("v4l2:", "source 'v4l2:' needs a path after v4l2:"),
        ("test:640x360@0", "frame rate '0' is outside 1..120"),
        ("v4l2:/dev/video0#fps=0", "frame rate '0' is outside 1..120"),
        ("v4l2:/dev/video0#fps=", "source option #fps= has no value"),
        ("v4l2:/dev/video0#size=720p", "size '720p' is not WIDTHxHEIGHT, e.g. 1280x720"),
        (
            "test:#fps=60",
            "source options #size= and #fps= are for v4l2: cameras, not test: (the test pattern takes test:WxH@FPS)",
        ),
        ("rtsp://cam/s#size=1280x720", "source options #size= and #fps= are for v4l2: cameras, not rtsp:"),
    ],
)
def test_bad_source_specs(spec, message):
    with pytest.raises(ValueError) as info:
        parse_source_spec(spec)
    assert str(info.value) == message


def test_max_lag_from_the_file_and_the_environment():
    assert load().video.max_lag == 1.0
    assert load('[video]\nmax_lag = "250ms"').video.max_lag == 0.25
    assert load("", {"CAMRELAY_VIDEO_MAX_LAG": "2s"}).video.max_lag == 2.0


def test_cpu_slice_from_the_file_and_the_environment():
    assert load().video.cpu_slice == 0.0002
    assert load('[video]\ncpu_slice = "1ms"').video.cpu_slice == 0.001
    assert load("[video]\ncpu_slice = 0").video.cpu_slice == 0.0  # the kernel's own
    assert load('[video]\ncpu_slice = "0ms"').video.cpu_slice == 0.0
    assert load("", {"CAMRELAY_VIDEO_CPU_SLICE": "0.5ms"}).video.cpu_slice == 0.0005


def test_example_config_is_valid():
    from pathlib import Path

    text = (Path(__file__).parent.parent / "camrelay.example.toml").read_text()
    c = load(text)
    assert c.http.port == 8080


def test_the_mode_comes_from_the_file_the_environment_a_flag_and_a_streams_own_spec():
    assert load().video.mode == "auto"
    assert load('[video]\nmode = "transcode"').video.mode == "transcode"
    assert load('[video]\nmode = "transcode"', {"CAMRELAY_VIDEO_MODE": "passthrough"}).video.mode == "passthrough"
    assert load("", {"CAMRELAY_VIDEO_MODE": "passthrough"}, {"video.mode": "auto"}).video.mode == "auto"
    (door,) = load('[streams]\ndoor = "rtsp://u:pw@cam/s#mode=passthrough&transport=udp"').streams
    assert (door.source.target, door.source.mode, door.source.transport) == ("rtsp://u:pw@cam/s", "passthrough", "udp")
    assert str(door.source) == "rtsp://u:***@cam/s#mode=passthrough&transport=udp"  # for logs and the API
    assert door.source.unredacted() == "rtsp://u:pw@cam/s#mode=passthrough&transport=udp"  # for its worker only
    assert parse_source_spec(door.source.unredacted()) == door.source
    assert parse_source_spec("file:/clips/a#1.mp4").target == "/clips/a#1.mp4"  # a # without = is the path's


def test_sound_comes_from_the_file_the_environment_a_flag_and_a_streams_own_spec():
    assert load().audio.enabled is True  # the test pattern carries its sound by default
    assert load("[audio]\nenabled = false").audio.enabled is False
    assert load("[audio]\nenabled = false", {"CAMRELAY_AUDIO_ENABLED": "true"}).audio.enabled is True
    assert load("", {"CAMRELAY_AUDIO_ENABLED": "true"}, {"audio.enabled": False}).audio.enabled is False  # --no-audio
    quiet, loud, plain, camera = (
        s.source
        for s in load(
            '[audio]\nenabled = false\n[streams]\nquiet = "test:#audio=off"'
            '\nloud = "test:640x360@15#mode=transcode&audio=on"\nplain = "test:"\ncamera = "v4l2:/dev/video0#audio=on"'
        ).streams
    )
    assert (quiet.audio, loud.audio, plain.audio) == ("off", "on", "")
    assert str(loud) == "test:640x360@15#mode=transcode&audio=on" and parse_source_spec(str(loud)) == loud
    # What each stream's worker captures its sound from: the spec's word, else [audio] enabled; a source that has
    # no sound of its own (yet: a USB camera's ALSA device is for later) has none either way.
    assert [audio_source(s, enabled=False) for s in (quiet, loud, plain, camera)] == ["", "test", "", ""]
    assert [audio_source(s, enabled=True) for s in (quiet, loud, plain, camera)] == ["", "test", "test", ""]


def test_a_v4l2_cameras_spec_selects_its_mode():
    spec = parse_source_spec("v4l2:/dev/v4l/by-id/usb-cam-video-index0#size=1280x720&fps=60")
    assert (spec.kind, spec.width, spec.height, spec.fps) == ("v4l2", 1280, 720, 60.0)
    assert str(spec) == "v4l2:/dev/v4l/by-id/usb-cam-video-index0#size=1280x720&fps=60"
    assert parse_source_spec(spec.unredacted()) == spec  # as its worker gets it
    only_rate = parse_source_spec("v4l2:/dev/video0#fps=50&mode=transcode")
    assert (only_rate.width, only_rate.fps, only_rate.mode) == (None, 50.0, "transcode")
    assert parse_source_spec(str(only_rate)) == only_rate
    # The camera's worker opens it in that mode, whatever [video] says.
    from relay.camera.capture import V4L2Source, open_source

    source = open_source(spec, 640, 360, 30.0, "cam0")
    assert isinstance(source, V4L2Source) and (source.width, source.height, source.fps) == (1280, 720, 60.0)
