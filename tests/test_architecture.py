"""The layer rules of docs/ARCHITECTURE.md, enforced: the table there is the contract.

Every import of the package is read from the source (module level and inside functions, since a lazy
import is still a dependency), mapped to its top-level folder, and checked against the folders that
row allows. No import cycle between modules, and no module over 400 lines without a stated reason.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = "mllm_deploy"
OUTSIDE = {"tests", "benchmarks", "scripts", "docs", ".venv", ".git", "build", "dist"}
LINE_LIMIT = 400
LONG_REASON = re.compile(r"longer than 400 lines because", re.I)


def layer_table() -> dict[str, set[str]]:
    """folder -> the project folders it may import, from the Layers table of docs/ARCHITECTURE.md."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    table = {}
    for row in re.findall(r"^\| `(\w+)/` \|(.*)$", section, flags=re.M):
        folder, cells = row[0], [c.strip() for c in row[1].split("|")]
        allowed = cells[1]
        table[folder] = ({"*"} if allowed == "every folder" else
                         {a.strip() for a in allowed.split(",") if a.strip() not in ("", "–")})
    return table


def package_sources(root: Path = REPO) -> dict[str, str]:
    """module name -> source text, for every module of the package."""
    sources = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in OUTSIDE or any(p.startswith(".") for p in parts):
            continue
        name = ".".join((PACKAGE, *parts)).removesuffix(".py").removesuffix(".__init__")
        sources[name] = path.read_text()
    return sources


def imports_of(name: str, source: str, modules: set[str]) -> set[str]:
    """The package modules a module imports (``from mllm_deploy.x import y`` counts y when y is a module)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for target in targets:
            if target.startswith(PACKAGE + ".") or target == PACKAGE:
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != name:
                    found.add(target)
    return found


def folder_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations(sources: dict[str, str], table: dict[str, set[str]]) -> list[str]:
    modules = set(sources)
    found = []
    for name, source in sources.items():
        here = folder_of(name)
        for target in sorted(imports_of(name, source, modules)):
            there = folder_of(target)
            if there == here or there == "":  # the package root holds only the version
                continue
            allowed = table.get(here)
            if allowed is None:
                found.append(f"{name}: folder {here or '(package root)'!r} is not in docs/ARCHITECTURE.md")
            elif "*" not in allowed and there not in allowed:
                found.append(f"{name} imports {target}: {here}/ may not import {there}/")
    return found


def cycles(sources: dict[str, str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    modules = set(sources)
    graph = {name: sorted(imports_of(name, source, modules) - {name}) for name, source in sources.items()}
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    return package_sources()


def test_every_top_level_folder_is_in_the_architecture_page(sources):
    table = layer_table()
    folders = {folder_of(m) for m in sources} - {""}
    assert folders == set(table), f"folders without a row: {folders - set(table)}; rows without a folder: " \
                                  f"{set(table) - folders}"
    for folder, allowed in table.items():
        assert allowed <= set(table) | {"*"}, (folder, allowed)


def test_imports_follow_the_layers(sources):
    assert violations(sources, layer_table()) == []


def test_a_forbidden_import_is_caught(sources):
    """The contract bites: the runtime importing calib (the kind of import that used to creep in) fails."""
    changed = dict(sources)
    changed["mllm_deploy.runtime.generator"] += "\n\ndef _late():\n    from mllm_deploy.calib.reference import RecipeReference\n"
    assert violations(changed, layer_table()) == [
        "mllm_deploy.runtime.generator imports mllm_deploy.calib.reference: runtime/ may not import calib/"]
    changed = dict(sources)
    changed["mllm_deploy.formats.recipe"] += "\nimport mllm_deploy.export.routing\n"
    assert violations(changed, layer_table()) == [
        "mllm_deploy.formats.recipe imports mllm_deploy.export.routing: formats/ may not import export/"]


def test_no_import_cycles(sources):
    assert cycles(sources) == []
    looped = dict(sources)
    looped["mllm_deploy.core.errors"] += "\nfrom mllm_deploy.core.cli import main\n"
    assert ["mllm_deploy.core.cli", "mllm_deploy.core.errors"] in cycles(looped)


def test_formats_and_runtime_import_no_heavy_framework(sources):
    heavy = re.compile(r"^\s*(?:import|from)\s+(torch|transformers|onnx)\b", re.M)
    offenders = [name for name, source in sources.items()
                 if folder_of(name) in ("formats", "runtime", "core") and heavy.search(source)]
    assert offenders == []


def test_long_modules_say_why(sources):
    long_without_reason = [f"{name} ({source.count(chr(10))} lines)" for name, source in sources.items()
                           if source.count("\n") > LINE_LIMIT and not LONG_REASON.search("\n".join(
                               source.splitlines()[:20]))]
    assert long_without_reason == []
