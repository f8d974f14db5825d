"""A short CPU slice for camrelay's processes: picked sooner when they wake on a busy machine.

Linux's scheduler (EEVDF, kernel 6.6 and later) gives every runnable thread a slice of CPU time and runs first the
one whose slice would end soonest. From 6.12 a thread may ask for a shorter slice than the kernel's (0.7-3 ms, by
the number of cores) with ``sched_setattr``'s ``sched_runtime``, for an ordinary thread, without privilege: it is
then picked sooner when it wakes, and preempted sooner if it runs on; its share of the CPU (its weight, that is its
niceness) does not change. That is what a frame's path wants: a camera's capture thread and the relay's event loop
wake at every frame and work well under a slice each time. On a machine whose cores are busy with other work they
otherwise wait in the run queue behind it: the relay's loop measured 551 ms a second waiting against 215 ms
running, at 16 cameras with the benchmark's own load on the same 2 cores (docs/benchmarks.md, "Many cameras with
the load niced", with the slice's A/B).

Threads and child processes inherit it, so ``apply`` once in the relay's main thread, before its camera workers,
shards and mediamtx start, covers them all. On kernels before 6.12 an ordinary thread's runtime is ignored
(nothing changes, nothing fails); where the system call does not exist (not Linux, an architecture not listed, a
seccomp filter) ``apply`` says why and the relay runs as before.

Sans-io core: ``pack_attr`` and ``slice_of`` (the kernel's ``struct sched_attr``, its first version's 48 bytes and
the utilisation clamps' 8, as the kernel reads it); the calls themselves in ``set_slice`` and ``get_slice``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

# struct sched_attr: size, policy, flags, nice, priority, runtime, deadline, period, util_min, util_max
ATTR = struct.Struct("=IIQiIQQQII")
SCHED_OTHER = 0
SCHED_FLAG_KEEP_POLICY = 0x08  # a process started at SCHED_BATCH (by its service) stays there
SCHED_RESET_ON_FORK = 0x40000000  # in a policy read back: children start at the defaults
# The kernel's bounds for a requested slice (it clamps to them): 0.1 ms to 100 ms.
MIN_SLICE, MAX_SLICE = 0.0001, 0.1
# The default: a frame's work in a capture thread or the relay's loop (measured well under it at a time: the relay
# 0.17 ms a wake-up on average at 16 cameras) fits in it, so the thread is picked when it wakes and done before its
# slice ends; shorter makes more preemptions of any longer step, for nothing (docs/benchmarks.md).
DEFAULT_SLICE = 0.0002
# (sched_setattr, sched_getattr) by the kernel's machine and the interpreter's word size (a 32-bit userland on a
# 64-bit kernel, as 32-bit Raspberry Pi OS boots on a Pi 4 or 5, calls through the 32-bit table); others: not tried
SYSCALLS = {
    ("x86_64", 64): (314, 315),
    ("x86_64", 32): (351, 352),  # i386's
    ("aarch64", 64): (274, 275),  # Raspberry Pi OS 64-bit (Pi 4, Pi 5)
    ("aarch64", 32): (380, 381),  # 32-bit ARM's
    ("armv7l", 32): (380, 381),
    ("armv6l", 32): (380, 381),
}
POLICIES = {0: "SCHED_OTHER", 1: "SCHED_FIFO", 2: "SCHED_RR", 3: "SCHED_BATCH", 5: "SCHED_IDLE", 6: "SCHED_DEADLINE"}
SLICED = ("SCHED_OTHER", "SCHED_BATCH")  # the policies a slice is asked for: the idle and real-time ones keep theirs


class SchedError(Exception):
    """The slice could not be set or read; the message says why, for one log line."""


def pack_attr(nice: int, slice_seconds: float) -> bytes:
    """The ``struct sched_attr`` asking for a thread at ``nice``, its policy kept, with a slice of ``slice_seconds``
    (``0``: the kernel's default)."""
    if slice_seconds and not MIN_SLICE <= slice_seconds <= MAX_SLICE:
        raise ValueError(
            f"a slice must be 0 or within {MIN_SLICE * 1000:g}..{MAX_SLICE * 1000:g} ms, got {slice_seconds!r}"
        )
    if not -20 <= nice <= 19:
        raise ValueError(f"niceness must be within -20..19, got {nice!r}")
    return ATTR.pack(ATTR.size, SCHED_OTHER, SCHED_FLAG_KEEP_POLICY, nice, 0, round(slice_seconds * 1e9), 0, 0, 0, 0)


def slice_of(attr: bytes) -> float:
    """The slice (seconds) in a ``struct sched_attr`` the kernel filled: on 6.12 and later the thread's slice, its
    own or the kernel's default; 0 before."""
    if len(attr) < ATTR.size:
        raise ValueError(f"a sched_attr is {ATTR.size} bytes, got {len(attr)}")
    return ATTR.unpack_from(attr)[5] / 1e9


def syscalls_for(system: str, machine: str, bits: int) -> tuple[int, int] | None:
    """(sched_setattr, sched_getattr)'s numbers for a kernel's ``system`` and ``machine`` (``os.uname()``) and an
    interpreter of ``bits`` (its pointers'); None where not known."""
    return SYSCALLS.get((machine, bits)) if system == "Linux" else None


def _syscalls() -> tuple[int, int]:
    uname = os.uname()
    bits = struct.calcsize("P") * 8
    numbers = syscalls_for(uname.sysname, uname.machine, bits)
    if numbers is None:
        raise SchedError(f"no sched_setattr known on {uname.sysname} {uname.machine} ({bits}-bit)")
    return numbers


def _call(number: int, *args) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.syscall(ctypes.c_long(number), *args) != 0:
        err = ctypes.get_errno()
        raise SchedError(f"{os.strerror(err)} ({errno.errorcode.get(err, err)})")


def set_slice(slice_seconds: float, tid: int = 0) -> None:
    """Thread ``tid`` (0: the calling thread; threads and processes it starts later inherit it) asks for a slice of
    ``slice_seconds`` (0: the kernel's default), keeping its niceness and policy. Raises ``SchedError``."""
    setattr_, _ = _syscalls()
    try:
        nice = os.getpriority(os.PRIO_PROCESS, tid)  # Linux: a thread's own
    except OSError as exc:
        raise SchedError(os.strerror(exc.errno or 0)) from None
    attr = ctypes.create_string_buffer(pack_attr(nice, slice_seconds), ATTR.size)
    _call(setattr_, ctypes.c_int(tid), attr, ctypes.c_uint(0))


def get_slice(tid: int = 0) -> float:
    """Thread ``tid``'s slice in seconds (0: the calling thread); 0.0 on kernels before 6.12. Raises ``SchedError``."""
    _, getattr_ = _syscalls()
    attr = ctypes.create_string_buffer(ATTR.size)
    _call(getattr_, ctypes.c_int(tid), attr, ctypes.c_uint(ATTR.size), ctypes.c_uint(0))
    return slice_of(attr.raw)


def apply(slice_seconds: float) -> str:
    """The calling thread (the relay's main thread, at start) asks for ``slice_seconds``; 0: leave the kernel's. A
    line for the log either way: what was set, or why not (the relay runs on without it)."""
    if not slice_seconds:
        return "cpu slice: the kernel's default ([video] cpu_slice = 0)"
    scheduler = os.sched_getscheduler(0) if hasattr(os, "sched_getscheduler") else None  # with its reset-on-fork bit
    policy = "" if scheduler is None else POLICIES.get(scheduler & 0xFF, "an unknown policy")
    if policy and policy not in SLICED:
        return f"cpu slice: not asked: the relay runs at {policy} (its service's choice), which keeps its own"
    try:
        set_slice(slice_seconds)
        got = get_slice()
    except SchedError as exc:
        return f"cpu slice: not set ({exc}); the kernel's default applies"
    if not got:
        return f"cpu slice: asked {slice_seconds * 1000:g} ms; this kernel has no per-thread slice (6.12 and later)"
    if round(got * 1e9) != round(slice_seconds * 1e9):
        return f"cpu slice: asked {slice_seconds * 1000:g} ms, the kernel keeps {got * 1000:g} ms"
    if scheduler is not None and scheduler & SCHED_RESET_ON_FORK:
        return f"cpu slice: {got * 1000:g} ms for camrelay's threads (its service resets it in child processes)"
    return f"cpu slice: {got * 1000:g} ms for camrelay's threads and processes"
