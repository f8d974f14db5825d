"""``camrelay install-service``: the unit passes systemd-analyze verify, with no warning."""

import shutil
import subprocess
import sys

import pytest

from relay.service_unit import UnitSettings, render_unit

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def verify(path) -> subprocess.CompletedProcess:
    assert SYSTEMD_ANALYZE, "systemd-analyze is missing (Debian package systemd)"
    return subprocess.run([SYSTEMD_ANALYZE, "verify", str(path)], capture_output=True, text=True, timeout=60)


def test_install_service_writes_a_unit_that_verifies_cleanly(tmp_path):
    config = tmp_path / "etc" / "camrelay.toml"
    result = subprocess.run(
        [sys.executable, "-m", "relay", "install-service", "--unit-dir", str(tmp_path), "--config", str(config)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    unit = tmp_path / "camrelay.service"
    assert (
        f"wrote {unit}" in result.stdout
        and "systemctl daemon-reload && systemctl enable --now camrelay" in result.stdout
    )
    assert config.read_text().startswith("# camrelay configuration")  # the example, as a starting point
    checked = verify(unit)
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr
    text = unit.read_text()
    for line in (
        "After=network-online.target",
        "Restart=always",
        "User=camrelay",
        "SupplementaryGroups=video",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "ProtectSystem=strict",
        "ProtectProc=invisible",
        "MemoryMax=768M",
        "LimitNOFILE=8192",
        "KillMode=control-group",
        "UMask=0027",
        "StateDirectoryMode=0750",
    ):
        assert line in text.splitlines(), line
    assert f"--config {config}" in text


def test_a_broken_unit_would_be_caught(tmp_path):
    """The check above can fail: systemd-analyze reports a bad setting."""
    unit = tmp_path / "camrelay.service"
    unit.write_text(
        render_unit(UnitSettings(sys.executable, "/etc/camrelay.toml")).replace("Restart=always", "Restart=sometimes")
    )
    assert "Failed to parse service restart specifier" in verify(unit).stderr


@pytest.mark.parametrize("user", ["camrelay", "pi"])
def test_print_only_writes_nothing(tmp_path, user):
    result = subprocess.run(
        [sys.executable, "-m", "relay", "install-service", "--print", "--user", user, "--unit-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0 and f"User={user}\n" in result.stdout
    assert not (tmp_path / "camrelay.service").exists()
