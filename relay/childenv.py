"""The environment a child process (camera worker, mediamtx) is started with.

Only what it needs to run: never camrelay's own ``CAMRELAY_*`` settings (the
viewer token, camera URLs with passwords, the RTSP password may be among
them) and nothing else the relay happened to inherit. Pure: the parent's
environment in, the child's out.
"""

from __future__ import annotations

from collections.abc import Mapping

# Variables a child may need: finding programs and libraries, locale and time
# zone, where to put temporary files, and how Python itself runs.
PASSED = frozenset(
    {
        "PATH",
        "HOME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "LD_LIBRARY_PATH",
        "SYSTEMROOT",  # Windows: sockets do not work without it
        "VIRTUAL_ENV",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONUNBUFFERED",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONWARNINGS",
        "PYTHONFAULTHANDLER",
    }
)
PASSED_PREFIXES = ("LC_",)  # LC_ALL, LC_CTYPE, ...


def child_env(parent: Mapping[str, str], **extra: str) -> dict[str, str]:
    """``parent`` cut down to ``PASSED`` (and ``LC_*``), plus ``extra``."""
    env = {k: v for k, v in parent.items() if k in PASSED or k.startswith(PASSED_PREFIXES)}
    env.update(extra)
    return env
