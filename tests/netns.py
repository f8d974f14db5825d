"""Network namespaces for tests that need a network loopback cannot be: a shaped link, a NAT, a blocked port.

``run`` a command (it must succeed); ``inside`` a namespace, this thread's new sockets live there.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def run(*args: str, input: str | None = None) -> None:
    result = subprocess.run(args, input=input, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)}: {result.stderr}"


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


@contextmanager
def inside(netns: str) -> Iterator[None]:
    """This thread in network namespace ``netns``: the sockets (and processes) it makes meanwhile live there."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


@contextmanager
def loopback_namespace(prefix: str, *root_qdisc: str) -> Iterator[str]:
    """A new network namespace named ``prefix`` and a random tail, its loopback up (with ``root_qdisc``, the
    arguments of ``tc qdisc add dev lo root``, if given), this thread inside it; deleted afterwards."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    run("ip", "netns", "add", name)
    try:
        run("ip", "-n", name, "link", "set", "lo", "up")
        if root_qdisc:
            run("tc", "-n", name, "qdisc", "add", "dev", "lo", "root", *root_qdisc)
        with inside(name):
            yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
