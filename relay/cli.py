"""``camrelay``: the command line."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__, sched
from .config import AUTH_MODES, Config, ConfigError, load, secret_values, secrets_in_file
from .logsafe import SECRET_FILTER, SHOWS_SECRET, url_passwords
from .rtsp import RtspError

if TYPE_CHECKING:
    from signalling.access import Access

    from .service import Relay

log = logging.getLogger("relay")

# Everything the relay and its children create (state, recordings, mediamtx's files) is for its own user
# and group only; the token and mediamtx's config are 0600 whatever the umask.
PROCESS_UMASK = 0o027


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="camrelay", description="Low-latency camera relay: WebRTC (WHEP) for many viewers, encode once."
    )
    p.add_argument("--version", action="version", version=f"camrelay {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the relay")
    s.add_argument("--config", type=Path, help="TOML config file (default: $CAMRELAY_CONFIG)")
    s.add_argument(
        "--source",
        action="append",
        metavar="NAME=SPEC",
        help="a stream: test:, test:1280x720@30, v4l2:/dev/video0, rtsp://..., file:PATH, each may end in"
        " #mode=passthrough, #audio=off (repeatable)",
    )
    s.add_argument("--http-host", dest="http.host", help="address to listen on (default 0.0.0.0)")
    s.add_argument("--http-port", dest="http.port", help="port to listen on (default 8080)")
    s.add_argument("--size", dest="video.size", metavar="WxH", help="capture size (default 1280x720)")
    s.add_argument("--fps", dest="video.fps", help="frame rate (default 30)")
    s.add_argument("--bitrate", dest="video.bitrate", help="H.264 bit rate, e.g. 2M (default 2M)")
    s.add_argument("--keyframe-interval", dest="video.keyframe_interval", help="seconds between keyframes (default 1s)")
    s.add_argument("--encoder", dest="video.encoder", help="auto, libx264 or h264_v4l2m2m (default auto)")
    s.add_argument(
        "--mode",
        dest="video.mode",
        help="auto (pass H.264 through when browsers take it), passthrough or transcode (default auto)",
    )
    s.add_argument("--no-audio", dest="audio.enabled", action="store_const", const=False, help="no sound on any stream")
    s.add_argument(
        "--ice-address",
        dest="webrtc.ice_addresses",
        action="append",
        help="offer ICE host candidates only on this address (repeatable)",
    )
    s.add_argument(
        "--shards",
        dest="webrtc.shards",
        metavar="N",
        help="fan-out processes serving the WebRTC viewers: a number, or auto (default: from the cores)",
    )
    s.add_argument("--rtsp-port", dest="rtsp.port", help="RTSP port for NVR software (default 8554)")
    s.add_argument(
        "--rtsp-publish-url",
        dest="rtsp.publish_url",
        metavar="URL",
        help="publish to this RTSP server (rtsp://host:port) instead of running mediamtx",
    )
    s.add_argument("--no-rtsp", dest="rtsp.enabled", action="store_const", const=False, help="no RTSP at all")
    s.add_argument(
        "--whip",
        action="append",
        metavar="NAME=URL",
        help="push stream NAME to this WHIP endpoint (repeatable; replaces the config's [[whip]] entries). Its"
        " bearer token: the config's [[whip]] bearer_token for the same URL, else $CAMRELAY_WHIP_BEARER_TOKEN;"
        " never give it here",
    )
    s.add_argument(
        "--auth",
        dest="auth.mode",
        choices=AUTH_MODES,
        help="token (default: a viewer token, printed with the URL at start), password (HTTP Basic), none (open)",
    )
    s.add_argument(
        "--allowed-host",
        dest="http.allowed_hosts",
        action="append",
        metavar="NAME",
        help="a host name the relay is reached by, besides its own names and addresses (repeatable; * for any)",
    )
    s.add_argument("--state-dir", dest="state_dir", help="where camrelay keeps generated files (and the viewer token)")
    s.add_argument("--log-level", dest="log_level", help="debug, info, warning or error")

    sub.add_parser("devices", help="list V4L2 capture devices and their MJPEG modes")
    sub.add_parser(
        "hash-password",
        help="read a password (from the terminal, or stdin's first line) and print its hash for auth.password_hash",
    )

    i = sub.add_parser("install-service", help="write a systemd unit that runs camrelay from boot")
    i.add_argument(
        "--config",
        type=Path,
        default=Path("/etc/camrelay/camrelay.toml"),
        help="config file the service reads (written from the example if missing)",
    )
    i.add_argument("--user", default="camrelay", help="system user the service runs as (default camrelay)")
    i.add_argument("--unit-dir", type=Path, default=Path("/etc/systemd/system"), help="where to write camrelay.service")
    i.add_argument("--print", action="store_true", help="print the unit instead of writing it")
    return p


def load_config(args: argparse.Namespace, env: dict[str, str]) -> Config:
    path = args.config or (Path(env["CAMRELAY_CONFIG"]) if env.get("CAMRELAY_CONFIG") else None)
    text = read_config_file(path) if path is not None else None
    flags = {
        k: v
        for k, v in vars(args).items()
        if k.startswith(("http.", "video.", "audio.", "webrtc.", "rtsp.", "auth.")) or k in ("log_level", "state_dir")
    }
    config = load(text, env, flags, args.source, args.whip)
    args.config_file = (path, text)
    return config


# A config file is a few KiB; reading more is reading the wrong file (or /dev/zero).
MAX_CONFIG_BYTES = 1 << 20


def read_config_file(path: Path) -> str:
    """The config file's text; ``ConfigError`` for one that cannot be read, is too large or is not UTF-8."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path}: larger than {MAX_CONFIG_BYTES} bytes; is it the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {exc.start})") from None


def warn_if_exposed(path: Path | None, text: str | None) -> None:
    """A warning line when the config file holds secrets and every user can read it, and one when users other
    than its owner can change it (a config names programs the relay runs: ``[rtsp] mediamtx``). Read by the
    owner's group is how ``install-service`` leaves it (root:camrelay 0640), and not warned about."""
    if path is None or not text:
        return
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & 0o022:
        log.warning(
            "config file %s can be changed by users other than its owner, who could then run programs as this"
            " relay's user; chmod go-w %s",
            path,
            path,
        )
    keys = secrets_in_file(text)
    if keys and mode & 0o004:
        log.warning(
            "config file %s holds secrets (%s) and every user can read it; chmod o-r %s", path, ", ".join(keys), path
        )


def hash_password_command(stdin=None) -> int:
    """``camrelay hash-password``: the password from the terminal (asked twice) or stdin's first line."""
    import getpass

    from .auth import hash_password

    stdin = stdin or sys.stdin
    if stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("camrelay: the passwords differ", file=sys.stderr)
            return 2
    else:
        password = stdin.readline().rstrip("\r\n")
    if not password:
        print("camrelay: empty password", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


async def serve(config: Config) -> None:
    from relay.service import Relay
    from signalling.access import ACCESS
    from signalling.app import make_app
    from signalling.common import RELAY
    from signalling.server import make_runner, raise_fd_limit, start_site, throttle_loop_errors

    raise_fd_limit()
    # Before any camera worker, shard or mediamtx starts: they inherit it (relay.sched)
    log.info("%s", sched.apply(config.video.cpu_slice))
    throttle_loop_errors(asyncio.get_running_loop())
    # Bind first: a taken port is one clear error before any camera is opened.
    try:
        sock = socket.create_server((config.http.host, config.http.port))
    except OSError as exc:
        raise ConfigError(
            f"http.port: cannot listen on {config.http.host}:{config.http.port}: {os.strerror(exc.errno or 0)}"
            " (is another camrelay running? pick another port with --http-port)"
        ) from None
    try:
        app = make_app(Relay(config))
    except ConfigError:
        sock.close()
        raise
    runner = make_runner(app, config.http)
    try:
        await runner.setup()  # starts the relay: cameras, mediamtx
    except RtspError:
        sock.close()
        await runner.cleanup()
        raise
    await start_site(runner, sock)
    announce(app[RELAY], app[ACCESS])
    # What the relay made to start (modules, classes, its streams) lives as long as it does: out of the garbage
    # collector's full collections, which otherwise rescan all of it, 30-70 ms of the event loop that feeds
    # every viewer, each time sessions coming and going set one off (docs/benchmarks.md, "Thirty viewers
    # joining at once"). Objects made later are collected as before.
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except NotImplementedError:  # Windows: Ctrl+C arrives as KeyboardInterrupt instead
            pass
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()


def announce(relay: Relay, access: Access) -> None:
    """The start-up lines: where to watch. With a token, the viewer URL carries it: the one log line that may."""
    config = relay.config
    for host in public_hosts(config.http.host):
        url = f"http://{host}:{config.http.port}/"
        if access.token:
            log.info("viewer page: %s?token=%s", url, access.token, extra=SHOWS_SECRET)
        else:
            log.info("viewer page: %s", url)
        for name in relay.streams:
            if rtsp := relay.rtsp_url(name, host):
                log.info("stream=%s rtsp: %s", name, rtsp)
    if access.mode == "none":
        log.warning(
            "auth.mode = none: the relay is open; anyone who can reach port %d can watch every stream",
            config.http.port,
        )
    elif config.rtsp.enabled and not config.rtsp.publish_url and not config.rtsp.user:
        log.warning(
            "rtsp: no [rtsp] user and password set; anyone who can reach port %d can read the streams over RTSP",
            config.rtsp.port,
        )


def public_hosts(bind: str) -> list[str]:
    """Addresses a person can open the page at: the bound one, or every IPv4 address for 0.0.0.0."""
    if bind not in ("0.0.0.0", "::", ""):
        return [bind]
    from .service import lan_addresses

    return [*lan_addresses(), "127.0.0.1"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "devices":
        from .alsa import list_cards, sound_names
        from .devices import describe, list_devices

        devices = list_devices()
        print("\n".join(describe(devices, *sound_names(devices, list_cards()))))
        return 0
    if args.command == "hash-password":
        return hash_password_command()
    if args.command == "install-service":
        from .service_unit import install

        return install(args.unit_dir, args.config, args.user, args.print)
    env = dict(os.environ)
    try:
        config = load_config(args, env)
    except ConfigError as exc:
        print(f"camrelay: configuration error: {exc}", file=sys.stderr)
        return 2
    os.umask(PROCESS_UMASK)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(SECRET_FILTER)
    SECRET_FILTER.secrets.update(secret_values(config))
    warn_if_exposed(*args.config_file)
    for stream in config.streams:
        if args.source and url_passwords(stream.source.target):  # --source replaces every other stream
            log.warning(
                "stream=%s: a password given with --source is visible to every local user (ps); give the source"
                " in the config file's [streams] table (chmod 600) or in CAMRELAY_STREAMS instead",
                stream.name,
            )
    logging.getLogger("aioice").setLevel(logging.WARNING)
    logging.getLogger("aiortc").setLevel(logging.WARNING)
    try:
        asyncio.run(serve(config))
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return 2
    except RtspError as exc:
        log.error("cannot start: %s", exc)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
