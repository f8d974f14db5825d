"""relay.sched: the CPU slice camrelay's threads ask for. The struct the kernel reads, one bad value a case; and the
real system call, in a child process (so this one keeps its own), read back by the kernel for the thread that set
it, a thread it starts and a process it starts."""

import json
import subprocess
import sys

import pytest

from relay import sched


def test_the_struct_carries_the_slice_and_the_niceness():
    attr = sched.pack_attr(5, 0.0002)
    assert len(attr) == sched.ATTR.size == 56
    size, policy, flags, nice, _prio, runtime, *_ = sched.ATTR.unpack(attr)
    assert (size, policy, nice, runtime) == (56, sched.SCHED_OTHER, 5, 200_000)
    assert flags == sched.SCHED_FLAG_KEEP_POLICY  # a user's SCHED_IDLE or SCHED_BATCH is kept
    assert sched.slice_of(attr) == 0.0002
    assert sched.slice_of(sched.pack_attr(0, 0)) == 0.0  # 0: the kernel's default


@pytest.mark.parametrize(
    "nice, seconds, message",
    [
        (0, 0.00005, "a slice must be 0 or within 0.1..100 ms, got 5e-05"),
        (0, 0.5, "a slice must be 0 or within 0.1..100 ms, got 0.5"),
        (0, -0.001, "a slice must be 0 or within 0.1..100 ms, got -0.001"),
        (20, 0.0002, "niceness must be within -20..19, got 20"),
    ],
)
def test_bad_values_are_refused(nice, seconds, message):
    with pytest.raises(ValueError) as err:
        sched.pack_attr(nice, seconds)
    assert str(err.value) == message


def test_a_short_struct_is_refused():
    with pytest.raises(ValueError, match="a sched_attr is 56 bytes, got 48"):
        sched.slice_of(bytes(48))


@pytest.mark.parametrize(
    "system, machine, bits, numbers",
    [
        ("Linux", "x86_64", 64, (314, 315)),
        ("Linux", "aarch64", 64, (274, 275)),  # 64-bit Raspberry Pi OS
        ("Linux", "aarch64", 32, (380, 381)),  # 32-bit Raspberry Pi OS on a Pi 4 or 5's 64-bit kernel
        ("Linux", "armv7l", 32, (380, 381)),
        ("Linux", "x86_64", 32, (351, 352)),
        ("Linux", "riscv64", 64, None),
        ("Darwin", "arm64", 64, None),
    ],
)
def test_the_system_calls_by_kernel_and_interpreter(system, machine, bits, numbers):
    assert sched.syscalls_for(system, machine, bits) == numbers


def kernel_slice() -> float:
    """This process's slice as the kernel reports it, asked without setting anything: 0.0 before Linux 6.12."""
    try:
        return sched.get_slice()
    except sched.SchedError as exc:
        pytest.skip(f"no sched_getattr here: {exc}")


CHILD = """
import json, os, subprocess, sys, threading
from relay import sched
os.nice(3)
line = sched.apply(0.0003)
seen = []
t = threading.Thread(target=lambda: seen.append(sched.get_slice())); t.start(); t.join()
child = subprocess.run([sys.executable, "-c", "from relay import sched; print(sched.get_slice())"],
                       capture_output=True, text=True, check=True).stdout
print(json.dumps({"line": line, "own": sched.get_slice(), "thread": seen[0], "child": float(child),
                  "nice": os.getpriority(os.PRIO_PROCESS, 0)}))
"""


def test_the_slice_is_set_kept_by_threads_and_children_and_the_niceness_stays():
    if not kernel_slice():
        pytest.skip("this kernel has no per-thread slice (Linux 6.12 and later)")
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=30, check=True)
    got = json.loads(out.stdout)
    assert got["line"] == "cpu slice: 0.3 ms for camrelay's threads and processes"
    assert got["own"] == got["thread"] == got["child"] == 0.0003
    assert got["nice"] == 3  # the slice alone changed: not the share of the CPU


def test_zero_leaves_the_kernel_its_default():
    assert sched.apply(0) == "cpu slice: the kernel's default ([video] cpu_slice = 0)"


POLICY_CHILD = """
import os, sys
from relay import sched
os.sched_setscheduler(0, getattr(os, sys.argv[1]), os.sched_param(0))
print(sched.apply(0.0002)); print(sched.get_slice())
"""


@pytest.mark.parametrize(
    "policy, line, kept",
    [
        ("SCHED_BATCH", "cpu slice: 0.2 ms for camrelay's threads and processes", 0.0002),
        (
            "SCHED_IDLE",
            "cpu slice: not asked: the relay runs at SCHED_IDLE (its service's choice), which keeps its own",
            None,
        ),
    ],
)
def test_a_policy_the_service_chose_is_kept(policy, line, kept):
    default = kernel_slice()
    if not default:
        pytest.skip("this kernel has no per-thread slice (Linux 6.12 and later)")
    out = subprocess.run([sys.executable, "-c", POLICY_CHILD, policy], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    said, got = out.stdout.splitlines()
    assert said == line
    assert float(got) == (kept if kept is not None else default)
