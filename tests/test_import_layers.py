"""The import layers of DESIGN.md, checked statically: every ``.py`` file of the core and of the modality
packages is parsed with :mod:`ast` (nothing is imported or run) and every import in it, function-level ones
included, becomes an edge between project modules.

Rules:

1. the core (``mm_align.*`` outside the modality packages, except the recipe layer ``mm_align.recipes`` and
   ``mm_align.cli``, which sits above the modalities by design) never imports a modality;
2. a modality never imports the recipe layer (``mm_align.cli``, ``mm_align.recipes``);
3. there is no import cycle among project modules;
4. no module imports another module's private (``_name``) attribute: a helper two modules share gets a
   public name in the module that owns it.

Files map to module names through the package-dir mapping of ``pyproject.toml`` (``image/`` is
``mm_align.image`` ...). ``from pkg import name`` is an import of the module ``pkg.name`` when there is one,
else of ``pkg``; relative imports are resolved against the importing module's package. An import of
``a.b.c`` is an edge to ``a.b.c`` only: that Python also runs ``a/__init__`` and ``a/b/__init__`` first is
left out, so a package ``__init__`` that re-exports its submodules is not in a cycle with them.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PACKAGE_DIRS: dict[str, str] = {
    "mm_align": "mm_align",
    "mm_align.image": "image",
    "mm_align.video": "video",
    "mm_align.audio": "audio",
    "mm_align.vlm": "vlm",
}
"""Top-level package name -> directory (relative to the repository root); the pyproject mapping."""

MODALITIES = ("mm_align.image", "mm_align.video", "mm_align.audio", "mm_align.vlm")
RECIPE_LAYER = ("mm_align.cli", "mm_align.recipes")


@dataclass(frozen=True)
class ModuleFile:
    """One project module: its dotted name, its file, and whether it is a package ``__init__``."""

    name: str
    path: Path
    is_package: bool


@dataclass(frozen=True)
class Import:
    """One import edge: ``source`` imports ``target`` (``raw`` is the absolute dotted name as written)."""

    source: str
    target: str
    raw: str
    path: Path
    line: int
    statement: str

    def where(self) -> str:
        return f"{self.path}:{self.line}: {self.statement}"


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def discover_modules(root: Path, package_dirs: dict[str, str]) -> dict[str, ModuleFile]:
    """Every ``.py`` file under the mapped directories, named as the installed package names it.

    A file under several mapped directories belongs to the deepest one (``image/`` inside a mapped
    ``mm_align/`` would still be ``mm_align.image``).
    """
    dirs = {pkg: (root / d).resolve() for pkg, d in package_dirs.items()}
    modules: dict[str, ModuleFile] = {}
    for pkg, base in dirs.items():
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            owners = [(len(d.parts), p) for p, d in dirs.items() if path.is_relative_to(d)]
            if max(owners)[1] != pkg:
                continue
            parts = list(path.relative_to(base).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            name = ".".join([pkg, *parts])
            modules[name] = ModuleFile(name, path, is_package)
    return modules


def _longest_known(name: str, modules: dict[str, ModuleFile]) -> str | None:
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        candidate = ".".join(parts[:k])
        if candidate in modules:
            return candidate
    return None


def _resolve_relative(module: ModuleFile, level: int, name: str | None) -> str:
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    parts = package.split(".")
    if level - 1 > len(parts) - 1:
        raise ValueError(f"{module.path}: relative import beyond the top-level package")
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _statement(node: ast.AST) -> str:
    return ast.unparse(node).splitlines()[0]


def find_imports(modules: dict[str, ModuleFile], project: tuple[str, ...] = ("mm_align",)) -> list[Import]:
    """Every import of a project module by a project module, from the whole AST of each file.

    Imports under ``project`` that name no file (a module that does not exist yet) keep their raw name
    and point at the nearest existing package, so the layer rules still see them.
    """
    found: list[Import] = []
    for module in modules.values():
        tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
        for node in ast.walk(tree):
            raws: list[str] = []
            if isinstance(node, ast.Import):
                raws = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_relative(module, node.level, node.module) if node.level else (node.module or "")
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    raws.append(sub if alias.name != "*" and sub in modules else base)
            for raw in dict.fromkeys(raws):
                if not _within(raw, project):
                    continue
                target = _longest_known(raw, modules)
                if target is None or target == module.name:
                    continue
                found.append(Import(module.name, target, raw, module.path, node.lineno, _statement(node)))
    return found


def layer_violations(imports: list[Import]) -> list[str]:
    """Rules 1 and 2: a core module importing a modality, a modality importing the recipe layer."""
    problems = []
    for imp in imports:
        core = not _within(imp.source, MODALITIES) and not _within(imp.source, RECIPE_LAYER)
        if core and _within(imp.raw, MODALITIES):
            problems.append(f"{imp.where()}  (core module {imp.source} imports the modality module {imp.raw})")
        if _within(imp.source, MODALITIES) and _within(imp.raw, RECIPE_LAYER):
            problems.append(f"{imp.where()}  (modality module {imp.source} imports the recipe layer {imp.raw})")
    return problems


def private_imports(modules: dict[str, ModuleFile]) -> list[str]:
    """Rule 4: ``from project.module import _name`` in another module (``_name`` not itself a module)."""
    problems = []
    for module in modules.values():
        tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = _resolve_relative(module, node.level, node.module) if node.level else (node.module or "")
            if base not in modules or base == module.name:
                continue
            for alias in node.names:
                name = alias.name
                if name.startswith("_") and not name.startswith("__") and f"{base}.{name}" not in modules:
                    problems.append(f"{module.path}:{node.lineno}: {_statement(node)}  ({module.name} imports "
                                    f"the private {base}.{name})")
    return problems


def find_cycles(imports: list[Import]) -> list[list[Import]]:
    """Rule 3: one cycle (as its edges, in order) per strongly connected component of the import graph."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        edges.setdefault(imp.source, {}).setdefault(imp.target, imp)  # the first import of each pair
    nodes = sorted(set(edges) | {t for out in edges.values() for t in out})

    # Tarjan's strongly connected components, iteratively (no recursion limit on long chains)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, {}))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

    cycles = []
    for component in components:
        members = set(component)
        first = component[0]
        # the shortest way back to `first` inside the component (breadth first)
        parent: dict[str, str] = {}
        frontier = [first]
        done = False
        while frontier and not done:
            nxt = []
            for node in frontier:
                for child in sorted(edges.get(node, {})):
                    if child not in members:
                        continue
                    if child == first:
                        parent[first] = node
                        done = True
                        break
                    if child not in parent:
                        parent[child] = node
                        nxt.append(child)
                if done:
                    break
            frontier = nxt
        path = [first]
        node = parent[first]
        while node != first:
            path.append(node)
            node = parent[node]
        path.append(first)
        path.reverse()  # first -> ... -> first
        cycles.append([edges[a][b] for a, b in zip(path, path[1:])])
    return cycles


def format_cycle(cycle: list[Import]) -> str:
    names = " -> ".join([cycle[0].source] + [imp.target for imp in cycle])
    return "import cycle " + names + "\n" + "\n".join(f"    {imp.where()}" for imp in cycle)


# ---- the project -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project() -> tuple[dict[str, ModuleFile], list[Import]]:
    modules = discover_modules(ROOT, PACKAGE_DIRS)
    return modules, find_imports(modules)


def test_package_dirs_match_pyproject():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib is 3.11+")
    import tomllib

    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert set(PACKAGE_DIRS) <= set(mapping), f"pyproject maps {sorted(mapping)}"
    for pkg, directory in mapping.items():
        if pkg in PACKAGE_DIRS:
            assert directory == PACKAGE_DIRS[pkg], f"pyproject maps {pkg} to {directory}, here {PACKAGE_DIRS[pkg]}"
            continue
        parent = max((p for p in PACKAGE_DIRS if pkg.startswith(p + ".")), key=len)  # nested: under the parent's dir
        expected = PACKAGE_DIRS[parent] + "/" + pkg[len(parent) + 1 :].replace(".", "/")
        assert directory == expected, f"pyproject maps {pkg} to {directory}, not {expected}"


def test_the_checker_sees_the_project(project):
    modules, imports = project
    assert {"mm_align.trainer", "mm_align.losses", "mm_align.image.diffusion_adapter"} <= set(modules)
    assert any(i.source == "mm_align.losses.registry" and i.target == "mm_align.losses.diffusion" for i in imports)


def test_core_never_imports_a_modality_and_modalities_never_import_the_recipe_layer(project):
    _, imports = project
    problems = layer_violations(imports)
    assert not problems, "imports across the layers of DESIGN.md:\n" + "\n".join(problems)


def test_no_import_cycles(project):
    _, imports = project
    cycles = find_cycles(imports)
    assert not cycles, "\n".join(format_cycle(c) for c in cycles)


def test_no_private_names_imported_across_modules(project):
    modules, _ = project
    problems = private_imports(modules)
    assert not problems, "private names imported from another module:\n" + "\n".join(problems)


# ---- the checker itself, on a tiny tree -------------------------------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> dict[str, ModuleFile]:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return discover_modules(root, PACKAGE_DIRS)


def test_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    modules = _tree(tmp_path, {
        "mm_align/__init__.py": "",
        "mm_align/a.py": "from mm_align.b import helper\n",
        "mm_align/b.py": "def helper():\n    from .c import thing\n    return thing\n",
        "mm_align/c.py": "import os\n\n\ndef thing():\n    from mm_align import a\n    return a\n",
        "mm_align/pkg/__init__.py": "from mm_align.pkg.sub import x\n\n__all__ = ['x']\n",
        "mm_align/pkg/sub.py": "from mm_align.pkg.other import y\nx = y\n",
        "mm_align/pkg/other.py": "y = 1\n",
    })
    assert modules["mm_align.pkg"].is_package and modules["mm_align.pkg.sub"].path.name == "sub.py"
    cycles = find_cycles(find_imports(modules))
    assert len(cycles) == 1  # the package __init__ re-exporting its submodule is not a cycle
    text = format_cycle(cycles[0])
    assert "mm_align.a -> mm_align.b -> mm_align.c -> mm_align.a" in text
    assert f"{tmp_path / 'mm_align' / 'b.py'}:2: from .c import thing" in text
    assert f"{tmp_path / 'mm_align' / 'c.py'}:5: from mm_align import a" in text


def test_checker_finds_layer_violations_and_private_imports(tmp_path):
    modules = _tree(tmp_path, {
        "mm_align/__init__.py": "",
        "mm_align/core.py": "def f():\n    from mm_align.image.x import g\n    return g\n\n\n"
                            "def _private():\n    pass\n",
        "mm_align/cli.py": "import mm_align.image.x\n",  # the recipe layer may
        "mm_align/recipes.py": "",
        "image/__init__.py": "",
        "image/x.py": "import torch\nfrom mm_align.core import _private\n\n\ndef g():\n    pass\n",
        "image/y.py": "from mm_align import recipes\nfrom .x import g\n",
    })
    assert modules["mm_align.image.x"].path == tmp_path / "image" / "x.py"
    imports = find_imports(modules)
    assert any(i.source == "mm_align.image.y" and i.target == "mm_align.image.x" for i in imports)  # relative
    assert not any(i.raw == "torch" for i in imports)
    problems = layer_violations(imports)
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"{tmp_path / 'mm_align' / 'core.py'}:2: from mm_align.image.x import g")
    assert "core module mm_align.core imports the modality module mm_align.image.x" in problems[0]
    assert problems[1].startswith(f"{tmp_path / 'image' / 'y.py'}:1: from mm_align import recipes")
    private = private_imports(modules)
    assert len(private) == 1 and "mm_align.core._private" in private[0] and "x.py:2" in private[0]
