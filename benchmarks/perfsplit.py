"""What one more viewer-packet costs the relay, part by part: two ``perf`` profiles of its process, one point with
the sound and one without, each sample put in one part by its call chain, their difference per packet.

    perf record --call-graph dwarf,32768 -p <relay> -o audio.data -- sleep 8   # during a --audio point
    perf record --call-graph dwarf,32768 -p <relay> -o video.data -- sleep 8   # the same point without
    perf script -i audio.data -F period,ip,sym,dso > audio.txt   # and video.txt
    python -m benchmarks.perfsplit audio.txt video.txt --seconds 8 --packets 3000

``--packets``: the viewer-packets a second the sound adds (60 viewers at 50 Opus packets a second: 3000). The
parts (``part``) are the C call's (``_fastsend.send_batch``: the lane checks, libsrtp's ``srtp_protect``, the
kernel's UDP send, the loopback delivery to the reader's socket and the reader's wake-up, the call's own work)
and the rest of the process (the Python interpreter: the hub's loop and ``push_batch``; RTCP written from Python
and its SRTCP; the event loop's ``epoll_wait``). Python's own frames are not named (CPython 3.11 has no perf map),
so the interpreter is one part. The loopback delivery is the receiver's half of a datagram, charged to the sender
on loopback (a real network's is the NIC's). Read the difference between the arms, per packet, not the arms.
"""

from __future__ import annotations

import argparse
import collections
import re
from collections.abc import Iterable

FRAME = re.compile(r"[0-9a-f]+ (.*) \((.*)\)$")
WAKING = ("sock_def_readable", "try_to_wake_up", "__wake_up_sync_key")
SOFTIRQ = ("handle_softirqs", "net_rx_action")
SENDMSG = ("__libc_sendmsg", "sendmsg")
SENDTO = ("__libc_sendto", "sendto", "__sys_sendto", "__sys_sendmsg", "__libc_sendmsg")


def samples(text: str) -> Iterable[tuple[int, list[tuple[str, str]]]]:
    """Each sample of ``perf script -F period,ip,sym,dso`` output: its period and its frames (symbol, object), leaf
    first; an inlined frame takes the object of the frame it was inlined into (the next one perf prints)."""
    for block in text.split("\n\n"):
        lines = [line.strip() for line in block.strip().splitlines() if line.strip()]
        if not lines or not lines[0].split()[0].isdigit():
            continue
        frames: list[tuple[str, str]] = []
        for line in lines[1:]:
            m = FRAME.match(line)
            if m:
                frames.append((m.group(1).split("+")[0], m.group(2).rsplit("/", 1)[-1]))
        dso = "inlined"
        for i in reversed(range(len(frames))):
            if frames[i][1] == "inlined":
                frames[i] = (frames[i][0], dso)
            else:
                dso = frames[i][1]
        yield int(lines[0].split()[0]), frames


def part(frames: list[tuple[str, str]]) -> str:
    """The part a sample's time goes to, by its call chain (leaf first)."""
    syms = [s for s, _ in frames]
    held = set(syms)
    softirq = any(s in held for s in SOFTIRQ)
    if "send_batch" in held:
        for s in reversed(syms[: syms.index("send_batch")]):  # from the C call down
            if s in ("lane_ready_", "lane_check_"):
                return "C call: the lane checks"
            if s.startswith("srtp_protect") or s == "_cffi_d_srtp_protect":
                return "C call: srtp_protect"
            if s in SENDMSG:
                if softirq and any(w in held for w in WAKING):
                    return "C call: sendmsg, waking the reader"
                return "C call: sendmsg, loopback delivery" if softirq else "C call: sendmsg, UDP send"
            if s.startswith("lane_remember"):
                return "C call: the NACK history"
        return "C call: its own work (C-API included)"
    if any(s in held for s in SENDTO):
        return "Python's writes (RTCP, STUN)"
    if any(s.startswith("srtp_") for s in syms):
        return "libsrtp outside the C call (SRTCP)"
    if "do_epoll_wait" in held:
        return "the event loop's epoll_wait"
    if frames and frames[0][1].startswith("[kernel"):
        return "the kernel, other" + (" (softirq)" if softirq else "")
    if frames and "libpython" in frames[0][1]:
        return "the Python interpreter (the hub's loop, push_batch, the rest)"
    return "native, other"


def split(text: str) -> collections.Counter[str]:
    """Nanoseconds of CPU a part, over the profile."""
    out: collections.Counter[str] = collections.Counter()
    for period, frames in samples(text):
        out[part(frames)] += period
    return out


def table(
    with_sound: collections.Counter[str], without: collections.Counter[str], seconds: float, packets: float
) -> str:
    """Markdown: each part's ms of CPU a second in each arm, and the difference per added viewer-packet (us)."""
    rows = ["| part | with sound (ms/s) | without (ms/s) | difference (ms/s) | per viewer-packet (us) |"]
    rows.append("| --- | ---: | ---: | ---: | ---: |")
    parts = sorted(set(with_sound) | set(without), key=lambda k: -(with_sound[k] - without[k]))
    for name in [*parts, "total"]:
        a = sum(with_sound.values()) if name == "total" else with_sound[name]
        b = sum(without.values()) if name == "total" else without[name]
        d = (a - b) / 1e6 / seconds
        rows.append(
            f"| {name} | {a / 1e6 / seconds:.2f} | {b / 1e6 / seconds:.2f} | {d:.2f} | {d * 1000 / packets:.2f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("with_sound", help="perf script output of the point with the sound")
    ap.add_argument("without", help="perf script output of the same point without it")
    ap.add_argument("--seconds", type=float, required=True, help="seconds each profile recorded")
    ap.add_argument("--packets", type=float, required=True, help="viewer-packets a second the sound adds")
    args = ap.parse_args(argv)
    with open(args.with_sound) as a, open(args.without) as b:
        print(table(split(a.read()), split(b.read()), args.seconds, args.packets))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
