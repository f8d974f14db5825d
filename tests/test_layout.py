"""The tree as a newcomer reads it: every package installs from a fresh clone, and the README's Layout names
every module."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE = ("relay", "signalling")


def test_every_package_is_installed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts) for top in CODE for init in (ROOT / top).rglob("__init__.py")
    }
    assert found <= listed, f"packages pip install -e . would leave out: {sorted(found - listed)}"
    assert all((ROOT / p.replace(".", "/")).is_dir() for p in listed)


def test_the_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([a-z_][a-z0-9_]*)`", layout))
    modules = {p.stem for top in CODE for p in (ROOT / top).rglob("*.py") if not p.stem.startswith("__")}
    assert not modules - named, f"modules the README's Layout does not name: {sorted(modules - named)}"
