"""The tree as a newcomer reads it: every package installs from a fresh clone, and the README's Layout names
every module."""

from __future__ import annotations

import ast
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


def _module_imports() -> dict[str, set[str]]:
    """Each module of relay/ and signalling/ and the project modules it imports at module level (what runs on
    import; imports inside functions are deferred on purpose)."""
    files = {}
    for top in CODE:
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                prefix = ".".join(base + ([node.module] if node.module else []))
                targets = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target not in files and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in files and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_imports_read_plainly_no_cycle_the_hub_at_the_bottom_the_service_on_top():
    graph = _module_imports()
    assert not _cycles(graph), f"import cycles: {_cycles(graph)}"
    # The bottom: the fan-out point and the plain values every layer shares import no other module of the project,
    # but the hub its own lag policy (sans-io, importing nothing either).
    for bottom in ("relay.lag", "relay.ipc", "relay.status", "relay.logsafe", "relay.backoff"):
        assert graph[bottom] == set(), (bottom, graph[bottom])
    assert graph["relay.hub"] == {"relay.lag"}, graph["relay.hub"]
    # The top: only the CLI and the HTTP side assemble the relay; no edge reaches up to it or to the HTTP side.
    for name, deps in graph.items():
        if not name.startswith(("relay.cli", "relay.__main__", "signalling")):
            assert "relay.service" not in deps, f"{name} imports the service it is part of"
        if name.startswith("relay"):
            assert not any(d.startswith("signalling") for d in deps), f"{name} imports the HTTP side"
