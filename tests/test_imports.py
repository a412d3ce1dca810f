"""The import structure of the repository, read from the source with ``ast`` (nothing is imported).

Three layers, each importing only the ones below it: the scripts in ``recipes/`` (and the benchmarks in
``recipes/bench/``) -> their support package ``recipes/common`` -> the library ``gsoft`` (with ``kernels/``, shipped
as ``gsoft.kernels``). The contracts:

- no import cycles among the project's modules (imports inside functions count);
- ``gsoft`` never imports the recipes, their support or the benchmarks;
- ``common`` never imports a script or a benchmark;
- the recipes import only ``gsoft``, their own modules, the standard library and declared dependencies;
- nothing in ``recipes/`` or ``tests/`` edits ``sys.path`` (pytest's ``pythonpath`` setting puts ``recipes/`` there).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


@dataclass(frozen=True)
class Module:
    name: str  # dotted name as imported: gsoft.tuner.layer, gsoft.kernels.ops, common.run, bench.adapters, dreambooth
    path: Path
    layer: str  # library | support | bench | script

    @property
    def package(self) -> str:
        """The package that relative imports start from."""
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]


def _dotted(path: Path, base: Path, prefix: str) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([prefix, *parts] if prefix else parts)


def project_modules() -> dict[str, Module]:
    mods: list[Module] = []
    mods += [Module(_dotted(p, ROOT / "gsoft", "gsoft"), p, "library") for p in (ROOT / "gsoft").rglob("*.py")]
    mods += [Module(_dotted(p, ROOT / "kernels", "gsoft.kernels"), p, "library") for p in (ROOT / "kernels").glob("*.py")]
    mods += [Module(_dotted(p, RECIPES, ""), p, "support") for p in (RECIPES / "common").rglob("*.py")]
    mods += [Module(_dotted(p, RECIPES, ""), p, "bench") for p in (RECIPES / "bench").rglob("*.py")]
    mods += [Module(p.stem, p, "script") for p in RECIPES.glob("*.py")]
    return {m.name: m for m in mods}


MODULES = project_modules()
FIRST_PARTY_ROOTS = {name.split(".")[0] for name in MODULES} | {"kernels", "recipes", "tests", "conftest"}


def imported_names(module: Module) -> set[str]:
    """Every module name the file imports, anywhere in it (relative imports resolved; ``from a import b`` gives
    ``a.b`` when that is a module of the project, else ``a``)."""
    tree = ast.parse(module.path.read_text(), filename=str(module.path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                names.add(candidate if candidate in MODULES else source)
    return names


def project_edges(module: Module) -> set[str]:
    """The project modules this file imports (an import of ``a.b.c`` also runs ``a`` and ``a.b``: only the named
    module counts as the edge, as import-linter counts it)."""
    return {name for name in imported_names(module) if name in MODULES and name != module.name}


GRAPH = {name: project_edges(m) for name, m in MODULES.items()}


def test_the_walk_sees_the_project() -> None:
    """Guards the test itself: the modules and some known edges are found."""
    for name in ("gsoft", "gsoft.gs", "gsoft.tuner.layer", "gsoft.kernels.ops", "gsoft.distributed.hooks", "common",
                 "common.run", "bench.adapters", "roberta_glue", "dreambooth", "benchmark"):
        assert name in MODULES, name
    assert "gsoft.gs" in GRAPH["gsoft.tuner.layer"] or any("gsoft.gs" in GRAPH[m] for m in GRAPH if m.startswith("gsoft.tuner"))
    assert any(dst.startswith("common") for dst in GRAPH["roberta_glue"])
    assert any(dst.startswith("gsoft") for dst in GRAPH["common"] | set().union(*(GRAPH[m] for m in MODULES if m.startswith("common."))))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    cycles = _cycles(GRAPH)
    detail = "; ".join(
        " <-> ".join(c) + " (" + ", ".join(f"{a} -> {b}" for a in c for b in sorted(GRAPH[a]) if b in c) + ")"
        for c in cycles
    )
    assert not cycles, f"import cycles: {detail}"


@pytest.mark.parametrize("layer,forbidden", [
    ("library", ("support", "bench", "script")),
    ("support", ("bench", "script")),
])
def test_layers_import_downwards(layer: str, forbidden: tuple[str, ...]) -> None:
    bad = sorted(f"{name} -> {dst}" for name, m in MODULES.items() if m.layer == layer
                 for dst in GRAPH[name] if MODULES[dst].layer in forbidden)
    assert not bad, f"{layer} modules import a layer above them: {bad}"


def test_library_does_not_name_recipe_modules() -> None:
    """``gsoft`` imports no top-level ``common`` / ``bench`` / recipe script, even ones that are not on the path."""
    recipe_roots = {m.name.split(".")[0] for m in MODULES.values() if m.layer != "library"}
    bad = sorted(f"{name} -> {imp}" for name, m in MODULES.items() if m.layer == "library"
                 for imp in imported_names(m) if imp.split(".")[0] in recipe_roots | {"recipes", "kernels"})
    assert not bad, bad


def _declared_distributions() -> set[str]:
    """pyproject's dependencies and extras, with what those require in turn (numpy comes through torch, ...)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"]) + [s for extra in project["optional-dependencies"].values() for s in extra]
    todo = [re.split(r"[\s<>=!~\[;]", s, maxsplit=1)[0] for s in specs]
    seen: set[str] = set()
    while todo:
        dist = todo.pop().lower().replace("_", "-")
        if dist in seen or dist == "gsoft":
            continue
        seen.add(dist)
        try:
            requires = importlib.metadata.requires(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [re.split(r"[\s<>=!~\[;(]", r, maxsplit=1)[0] for r in requires if "extra ==" not in r]
    return seen


def test_recipes_import_only_gsoft_their_own_modules_and_declared_packages() -> None:
    declared = _declared_distributions()
    providers = importlib.metadata.packages_distributions()
    bad = []
    for name, m in MODULES.items():
        if m.layer == "library":
            continue
        for imp in imported_names(m):
            root = imp.split(".")[0]
            if not root or imp in MODULES or root == "gsoft" or root in sys.stdlib_module_names:
                continue
            if root in FIRST_PARTY_ROOTS:
                bad.append(f"{name} -> {imp} (not gsoft nor a recipe module)")
                continue
            dists = {d.lower().replace("_", "-") for d in providers.get(root, [])}
            if not dists & declared:
                bad.append(f"{name} -> {imp} (from {sorted(dists) or 'no installed distribution'}, not declared in "
                           "pyproject.toml)")
    assert not bad, bad


def _sys_path_edits(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), filename=str(path))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
                and node.value.id == "sys":
            lines.append(node.lineno)
    return lines


def test_no_sys_path_edits_in_recipes_or_tests() -> None:
    files = sorted(RECIPES.rglob("*.py")) + sorted((ROOT / "tests").glob("*.py"))
    bad = {str(p.relative_to(ROOT)): lines for p in files if p != Path(__file__) and (lines := _sys_path_edits(p))}
    assert not bad, f"sys.path is touched in {bad}; recipes/ is on the path when a script runs and through pytest's " \
                    "pythonpath setting in the tests"

