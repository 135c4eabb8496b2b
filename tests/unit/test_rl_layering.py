"""Layering of the trainer (rl/), read from the source: only the store talks to the database, the trainer never
imports the proxy, building samples does not load torch or verl, and importing rl/ activates nothing (verl's
CPU platform is switched on by PolicyEngine, right before verl.workers' engines are first imported)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"trainwire.rl": ROOT / "rl", "trainwire.store": ROOT / "store", "trainwire": ROOT / "trainwire"}
RL_FILES = sorted((ROOT / "rl").rglob("*.py"))


def module_path(name: str) -> Path | None:
    for prefix in sorted(PACKAGES, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            rest = name[len(prefix) :].lstrip(".").split(".") if name != prefix else []
            base = PACKAGES[prefix].joinpath(*rest)
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    return candidate
    return None


def imports(path: Path, *, top_level_only: bool) -> set[str]:
    """Modules ``path`` imports (``from a import b`` gives ``a`` and ``a.b``), at module level or anywhere."""
    tree = ast.parse(path.read_text())
    if top_level_only:  # also imports under a module-level `if`/`try`, but not inside functions or classes
        nodes = [n for stmt in tree.body for n in _walk_outside_defs(stmt)]
    else:
        nodes = list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def _walk_outside_defs(node):
    """Nodes that run when the module is imported (type-checking-only imports do not)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return
    if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
        return
    yield node
    for child in ast.iter_child_nodes(node):
        yield from _walk_outside_defs(child)


def loaded_on_import(path: Path) -> set[str]:
    """Every module importing ``path`` loads, following the project's own modules."""
    seen_files, found, todo = set(), set(), [path]
    while todo:
        f = todo.pop()
        if f in seen_files:
            continue
        seen_files.add(f)
        for name in imports(f, top_level_only=True):
            found.add(name)
            target = module_path(name)
            if target is not None:
                todo.append(target)
    return found


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", RL_FILES, ids=rel)
def test_rl_talks_to_neither_the_database_nor_the_proxy(path):
    bad = {
        m
        for m in imports(path, top_level_only=False)
        if m.split(".")[0] in ("sqlalchemy", "asyncpg", "aiosqlite") or m.startswith("trainwire.proxy")
    }
    assert not bad, f"{rel(path)} imports {sorted(bad)}: database access belongs in trainwire.store"


@pytest.mark.parametrize("name", ["transitions", "samples", "credit", "collective"])
def test_building_samples_loads_no_torch_or_verl(name):
    heavy = {m for m in loaded_on_import(ROOT / "rl" / f"{name}.py") if m.split(".")[0] in ("torch", "verl")}
    assert not heavy, f"importing rl/{name}.py loads {sorted(heavy)}"


@pytest.mark.parametrize("path", RL_FILES, ids=rel)
def test_importing_rl_activates_nothing(path):
    tree = ast.parse(path.read_text())
    calls = [n for stmt in tree.body for n in _walk_outside_defs(stmt) if isinstance(n, ast.Call)]
    names = {c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", "") for c in calls}
    assert not names & {"activate", "init_single_process_group", "set_platform"}, rel(path)
    if path.parent.name == "engine":
        eager = {m for m in imports(path, top_level_only=True) if m.startswith("verl.workers")}
        assert not eager, f"{rel(path)} imports {sorted(eager)} before the CPU platform is activated"


def test_the_checks_see_what_they_look_for():
    """Guard against a scan that finds nothing: the engine does import verl.workers (lazily), the worker does
    reach the store, and rl/engine loads torch."""
    engine_imports = set().union(*(imports(p, top_level_only=False) for p in (ROOT / "rl" / "engine").glob("*.py")))
    assert "verl.workers.engine_workers" in engine_imports
    assert "trainwire.store.claims" in loaded_on_import(ROOT / "rl" / "worker.py")
    assert "torch" in loaded_on_import(ROOT / "rl" / "engine" / "__init__.py")
    assert "sqlalchemy" in loaded_on_import(ROOT / "store" / "claims.py")
