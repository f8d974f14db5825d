"""aiortc's and aioice's internals are borrowed in one module (relay.webrtc.borrowed): the versions it was written
for are the declared bounds, other versions are refused by name, no other module touches a private name,
and its process-wide patches stay while any relay in the process runs."""

from __future__ import annotations

import ast
import dataclasses
import re
import tomllib
from pathlib import Path

import aiohttp
import aioice
import aioice.ice
import aiortc
import aiortc.rtcrtpreceiver
import pytest

from relay.config import Config, ConfigError, load
from relay.webrtc import borrowed, udpbatch

from .conftest import make_config, start_relay

ROOT = Path(__file__).resolve().parent.parent
BORROWER = ROOT / "relay" / "webrtc" / "borrowed.py"
BENCH_BORROWER = ROOT / "benchmarks" / "borrowed.py"  # the benchmarks' light peer's own (tests/test_lightpeer.py)
MANGLED = re.compile(r"_[A-Z]\w*__")  # a class-private field as Python mangles it: _RTCRtpSender__encoder


def test_the_versions_it_was_written_for_are_the_declared_bounds():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name, (lowest, unsupported) in borrowed.WRITTEN_FOR.items():
        assert f"{name}>={lowest},<{unsupported}" in declared, name
        assert (
            borrowed._version(lowest) <= borrowed._version(borrowed.TESTED_WITH[name]) < borrowed._version(unsupported)
        )
    borrowed.check_versions({"aiortc": aiortc.__version__, "aioice": aioice.__version__})  # what runs here


@pytest.mark.parametrize(
    ("found", "wrong"),
    [
        ({"aiortc": "1.17.0", "aioice": "0.13.0"}, "aiortc 1.17.0"),
        ({"aiortc": "1.16.0", "aioice": "0.11"}, "aioice 0.11"),
    ],
)
def test_other_versions_are_refused_naming_the_versions_it_was_written_for(found, wrong):
    with pytest.raises(ImportError) as refused:
        borrowed.check_versions(found)
    message = str(refused.value)
    assert "aiortc>=1.14,<1.17 and aioice>=0.12,<0.14" in message and "tested with aiortc 1.16" in message
    assert f"found {wrong}." in message


def _private_names_of(package) -> set[str]:
    """Every _name aiortc or aioice defines: functions and methods, class attributes, fields set on self."""
    names = set()
    for path in Path(package.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return {n for n in names if re.match(r"_[A-Za-z]", n) and not n.endswith("__")}


def _methods_self(tree: ast.Module) -> set[ast.AST]:
    """The ``self``/``cls`` names of methods of classes defined here: what such a method reads of ``self``
    is its own class's. (A module-level function taking ``self`` is a patch for someone else's class.)"""
    own = set()
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        for method in (n for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
            own |= {n for n in ast.walk(method) if isinstance(n, ast.Name) and n.id in ("self", "cls")}
    return own


def test_private_aiortc_and_aioice_names_appear_in_borrowed_only():
    """In the relay, its HTTP side and the benchmarks alike; benchmarks/baselines/ rebuild other projects'
    approaches (aiortc's per-viewer encoder) and may reach into aiortc as they do."""
    private = _private_names_of(aiortc) | _private_names_of(aioice)
    found = []
    for path in sorted(p for top in ("relay", "signalling", "benchmarks") for p in (ROOT / top).rglob("*.py")):
        if "baselines" in path.parts:
            continue
        if path in (BORROWER, BENCH_BORROWER):
            continue
        where = path.relative_to(ROOT)
        tree = ast.parse(path.read_text())
        own = _methods_self(tree)
        for node in ast.walk(tree):
            line = getattr(node, "lineno", 0)
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("aiortc", "aioice"):
                found += [f"{where}:{line} imports {a.name}" for a in node.names if a.name.startswith("_")]
                if node.module == "aioice.ice":
                    found.append(f"{where}:{line} imports aioice.ice, where the process-wide patches go")
            elif isinstance(node, ast.Import):
                found += [f"{where}:{line} imports {a.name}" for a in node.names if a.name.startswith("aioice.ice")]
            elif isinstance(node, ast.ClassDef) and node.bases:  # overriding a private method of a base
                found += [
                    f"{where}:{f.lineno} overrides {node.name}.{f.name}"
                    for f in node.body
                    if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) and f.name in private
                ]
            elif isinstance(node, ast.Attribute) and node.attr in private and node.value not in own:
                found.append(f"{where}:{line} reads .{node.attr}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                if MANGLED.search(node.value) or node.value in private:
                    found.append(f"{where}:{line} names {node.value!r}")
    assert not found, "private aiortc/aioice names outside the two borrowed.py:\n" + "\n".join(found)


def test_the_batcher_switch_is_a_validated_setting():
    assert Config().webrtc.batch_sends is True
    assert load("[webrtc]\nbatch_sends = false\n").webrtc.batch_sends is False
    assert load(None, {"CAMRELAY_WEBRTC_BATCH_SENDS": "off"}).webrtc.batch_sends is False
    with pytest.raises(ConfigError, match="webrtc.batch_sends: expected true or false"):
        load('[webrtc]\nbatch_sends = "sometimes"\n')


def _patched() -> dict[str, bool]:
    return {
        "host addresses": aioice.ice.get_host_addresses is borrowed.HOST_ADDRESSES.replacement,
        "ice watch": aioice.ice.StunProtocol.datagram_received is borrowed.WATCH_ICE.replacement,
        "batched sends": aioice.ice.StunProtocol.send_data is udpbatch.PATCH.replacement,
        "lazy estimator": aiortc.rtcrtpreceiver.RemoteBitrateEstimator is borrowed.LAZY_BITRATE_ESTIMATOR.replacement,
        "gather in turn": borrowed.GATHER_IN_TURN.installed,
        "candidates in turn": borrowed.CANDIDATES_IN_TURN.installed,
        "prompt ice": borrowed.PROMPT_ICE.installed,
        "sockets closed with their connection": borrowed.CLOSE_ALL_BOUND.installed,
    }


async def _plays(base: str) -> None:
    from relay.webrtc.whepclient import WhepViewer

    async with aiohttp.ClientSession() as http:
        viewer = WhepViewer(f"{base}/whep/cam0", http)
        try:
            await viewer.connect()
            await viewer.read_frames(3, clock=False)
        finally:
            await viewer.close()


async def test_two_relays_share_the_process_wide_patches_until_the_last_closes():
    assert not any(_patched().values())
    first_runner, first = await start_relay(make_config())
    try:
        second_runner, second = await start_relay(make_config())
        try:
            assert all(_patched().values())
            assert borrowed.WATCH_ICE.holders == 2 and udpbatch.PATCH.holders == 2
        finally:
            await second_runner.cleanup()
        assert all(_patched().values()), "closing one relay took the other's patches away"
        assert aioice.ice.get_host_addresses(True, True) == ["127.0.0.1"]
        await _plays(first.base)
    finally:
        await first_runner.cleanup()
    assert not any(_patched().values()) and borrowed.WATCH_ICE.holders == 0


async def test_with_batching_off_a_viewer_plays_and_nothing_is_batched():
    config = make_config()
    config = dataclasses.replace(config, webrtc=dataclasses.replace(config.webrtc, batch_sends=False))
    runner, running = await start_relay(config)
    try:
        assert _patched() == {
            "host addresses": True, "ice watch": True, "batched sends": False, "lazy estimator": True,
            "gather in turn": True, "candidates in turn": True, "prompt ice": True,
            "sockets closed with their connection": True,
        }  # fmt: skip
        before = udpbatch.Batcher.flush
        flushes = 0

        def counting(self):
            nonlocal flushes
            flushes += 1
            return before(self)

        udpbatch.Batcher.flush = counting
        try:
            await _plays(running.base)
        finally:
            udpbatch.Batcher.flush = before
        assert flushes == 0, "a relay with batch_sends = false batched"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("extra", [1, 2, 1000, 2 * 1198, 2 * 1198 + 1, 17_000])
def test_a_large_nal_unit_is_cut_into_fu_a_fragments_all_full_size_but_the_last(extra):
    """RFC 6184 5.8: the first fragment has the start bit, the last the end bit, those between neither; every one
    carries the NAL unit's F, NRI and type; their bodies joined are the NAL unit's; all full-size but the last."""
    from aiortc.codecs import h264 as aiortc_h264

    nal = bytes([0x65]) + bytes(i % 251 for i in range(aiortc_h264.PACKET_MAX + extra))
    fragments = borrowed._EqualFragments._packetize_fu_a(nal)
    assert all(f[0] == 0x60 | aiortc_h264.NAL_TYPE_FU_A and f[1] & 0x1F == 5 for f in fragments)
    flags = [f[1] & 0xC0 for f in fragments]
    assert flags == ([0xC0] if len(fragments) == 1 else [0x80, *[0] * (len(fragments) - 2), 0x40])
    assert b"".join(f[2:] for f in fragments) == nal[1:]
    assert {len(f) for f in fragments[:-1]} <= {aiortc_h264.PACKET_MAX} and len(fragments[-1]) <= aiortc_h264.PACKET_MAX
