"""docs/security.md points at tests for its claims: every test it names exists."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
REFERENCE = re.compile(r"`(?:(test_\w+\.py))?(?:::(\w+))?`")


def test_every_test_security_md_names_exists():
    text = (ROOT / "docs" / "security.md").read_text()
    named, file = [], None
    for module, test in REFERENCE.findall(text):
        if not (module or test):
            continue
        file = module or file  # "`::name`" continues the file named before it
        assert file, f"`::{test}` names no file before it"
        named.append((file, test))
    assert len(named) > 40
    for module, test in named:
        path = ROOT / "tests" / module
        assert path.is_file(), f"docs/security.md names {module}, which does not exist"
        if test:
            assert re.search(rf"^(async )?def {test}\(", path.read_text(), re.M), f"{module}::{test} does not exist"
