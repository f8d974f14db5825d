"""benchmarks.perfsplit: a relay's perf samples, each in one part by its call chain, and what the sound adds per
viewer-packet, from two profiles' ``perf script`` text."""

from __future__ import annotations

from benchmarks import perfsplit

K = "([kernel.kallsyms])"
FAST = "(/w/relay/webrtc/_fastsend.cpython-311-x86_64-linux-gnu.so)"
PY = "(/usr/lib/libpython3.11.so.1.0)"


def _sample(period: int, *frames: str) -> str:
    return f"{period:>10} \n" + "".join(f"\t{i:x} {f}\n" for i, f in enumerate(frames, 1)) + "\n"


# leaf first, as perf script prints a call chain
SEND = ["udp_sendmsg+0x10 " + K, "__libc_sendmsg+0x4 (/lib/libc.so.6)", "send_once (inlined)", "send_batch " + FAST,
        "_PyEval_EvalFrameDefault " + PY]  # fmt: skip
DELIVERY = ["udp_queue_rcv_one_skb " + K, "net_rx_action " + K, "handle_softirqs " + K, *SEND]
WAKE = ["_raw_spin_unlock_irqrestore " + K, "sock_def_readable " + K, *DELIVERY]
PROTECT = ["ossl_aes_gcm_encrypt_avx512 (/p/_binding.abi3.so)", "srtp_protect_mki (/p/_binding.abi3.so)",
           "srtp_protect (/p/_binding.abi3.so)", "send_packets.constprop.0 " + FAST, "send_batch " + FAST]  # fmt: skip
CHECKS = ["_Py_dict_lookup " + PY, "PyDict_GetItemWithError " + PY, "lane_check_ (inlined)", "lane_ready_ " + FAST,
          "send_batch " + FAST]  # fmt: skip
RTCP = ["udp_sendmsg " + K, "__libc_sendto (/lib/libc.so.6)", "sock_sendto (/p/_socket.so)", "_PyEval " + PY]


def test_each_sample_goes_to_the_part_its_call_chain_names_from_the_c_call_down():
    text = (_sample(250, *SEND) + _sample(250, *DELIVERY) + _sample(250, *WAKE) + _sample(250, *PROTECT)
            + _sample(250, *CHECKS) + _sample(250, *RTCP) + _sample(250, "_PyEval_EvalFrameDefault " + PY)
            + _sample(250, "send_batch " + FAST))  # fmt: skip
    parts = [perfsplit.part(frames) for _, frames in perfsplit.samples(text)]
    assert parts == [
        "C call: sendmsg, UDP send", "C call: sendmsg, loopback delivery", "C call: sendmsg, waking the reader",
        "C call: srtp_protect", "C call: the lane checks", "Python's writes (RTCP, STUN)",
        "the Python interpreter (the hub's loop, push_batch, the rest)", "C call: its own work (C-API included)",
    ]  # fmt: skip
    frames = next(iter(perfsplit.samples(_sample(250, *SEND))))[1]
    assert frames[2] == ("send_once", FAST[1:-1].rsplit("/", 1)[-1])  # inlined: the object of the frame it is in


def test_the_table_gives_what_the_sound_adds_per_viewer_packet():
    # with the sound: 3 ms of srtp_protect and 1 ms of Python in 1 s; without: 1 ms of srtp_protect
    with_sound = _sample(3_000_000, *PROTECT) + _sample(1_000_000, "_PyEval_EvalFrameDefault " + PY)
    without = _sample(1_000_000, *PROTECT)
    rows = perfsplit.table(perfsplit.split(with_sound), perfsplit.split(without), 1.0, 1000).split("\n")
    assert rows[2] == "| C call: srtp_protect | 3.00 | 1.00 | 2.00 | 2.00 |"  # 2 ms a second over 1,000 packets
    assert rows[-1] == "| total | 4.00 | 1.00 | 3.00 | 3.00 |"
