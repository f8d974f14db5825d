"""``camrelay install-service``: a systemd unit that runs the relay from boot, for months.

``render_unit`` is pure; ``install`` writes the unit (and a config from the
example when there is none) and says how to enable it.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "camrelay.example.toml"
README = Path(__file__).resolve().parent.parent / "README.md"
MEMORY_MAX = "768M"  # a runaway leak restarts the service instead of starving the Pi
RESTART_SEC = 2  # with Restart=always: a crash costs viewers a couple of seconds
# Open files: the 512 HTTP connections (http.max_connections), each WebRTC viewer's UDP sockets, the
# workers' pipes and mediamtx's many times over; a leak still hits it long before the system's limit.
# (systemd's default soft limit, 1024, is what an idle-socket flood exhausted.)
LIMIT_NOFILE = 8192


@dataclass(frozen=True, slots=True)
class UnitSettings:
    executable: str  # the camrelay console script
    config: str  # TOML file
    user: str = "camrelay"
    state_dir: str = "camrelay"  # under /var/lib, owned by the user (StateDirectory=)


def render_unit(s: UnitSettings) -> str:
    exec_start = shlex.join([s.executable, "serve", "--config", s.config])
    return f"""[Unit]
Description=camrelay: low-latency camera relay (WebRTC, RTSP)
Documentation=file://{README}
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={s.user}
Group={s.user}
# Cameras and capture cards are /dev/video*, group video.
SupplementaryGroups=video
ExecStart={exec_start}
Environment=PYTHONUNBUFFERED=1
Environment=CAMRELAY_STATE_DIR=/var/lib/{s.state_dir}
StateDirectory={s.state_dir}
WorkingDirectory=/var/lib/{s.state_dir}
Restart=always
RestartSec={RESTART_SEC}
# camrelay stops its workers and mediamtx itself; anything left is killed with the cgroup.
KillMode=control-group
TimeoutStopSec=20
MemoryMax={MEMORY_MAX}
LimitNOFILE={LIMIT_NOFILE}
# Recordings, snapshots and state are for the service and its group only (camrelay sets the same umask).
UMask=0027
StateDirectoryMode=0750
NoNewPrivileges=yes
CapabilityBoundingSet=
RestrictSUIDSGID=yes
# The whole file system is read-only but the state directory: recordings kept elsewhere ([record] root on a USB
# disk) need a line of their own, e.g. ReadWritePaths=/media/usb/camrelay
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
# Other users' processes are hidden from the relay (it reads its own children's, and /proc/stat for the CPU load).
ProtectProc=invisible
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
LockPersonality=yes
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
"""


def install(unit_dir: Path, config: Path, user: str, print_only: bool) -> int:
    executable = shutil.which("camrelay") or str(Path(sys.executable).with_name("camrelay"))
    unit = render_unit(UnitSettings(executable=executable, config=str(config), user=user))
    if print_only:
        print(unit, end="")
        return 0
    target = unit_dir / "camrelay.service"
    try:
        unit_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(unit)
        tmp.replace(target)
        if not config.exists():
            config.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(EXAMPLE_CONFIG, config)
            config.chmod(0o640)
            print(f"wrote {config} (from camrelay.example.toml; edit it to name your cameras)")
    except OSError as exc:
        print(f"camrelay: cannot write {exc.filename}: {exc.strerror} (run as root?)", file=sys.stderr)
        return 1
    print(f"wrote {target}")
    print("next, as root:")
    print(f"  useradd --system --home-dir /var/lib/camrelay --shell /usr/sbin/nologin --groups video {user}")
    print(f"  chgrp {user} {config}")
    print("  systemctl daemon-reload && systemctl enable --now camrelay")
    print("  journalctl -u camrelay -f        # the log, with a status line every 30 s")
    return 0
