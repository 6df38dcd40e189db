"""The structure stays one a reader can hold in their head (DESIGN.md, "Layout"): no import
circle inside a package, no module over MAX_LINES lines, no private name imported from
another module, and ``sparse_kernels`` never imports ``sparse_diffusion``.

Imports are read from the source (every ``import`` statement, at the top of a module or inside
a function: an import deferred to call time is still an arrow between two modules)."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sparse_kernels", "sparse_diffusion")
# Every Python file of the project is held to the size rule, tests and benchmarks included.
SIZED = PACKAGES + ("benchmarks", "tests")
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def python_files(folders=PACKAGES) -> Iterator[Path]:
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def imported(path: Path, modules: Set[str]) -> Iterator[Tuple[str, str, int]]:
    """``(module, name, line)`` for each name imported by ``path`` from a module of the project
    (``name`` is ``""`` for ``import module``); relative imports resolved."""
    yield from imports_in(path.read_text(), module_name(path), path.name == "__init__.py", modules)


def imports_in(source: str, name: str, is_package: bool, modules: Set[str]) -> Iterator[Tuple[str, str, int]]:
    """:func:`imported` of the source text of module ``name``."""
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield alias.name, "", node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                yield (submodule, "", node.lineno) if submodule in modules else (source, alias.name, node.lineno)


def import_graph() -> Dict[str, Set[str]]:
    """module -> the project's modules it imports (a submodule import also imports its packages)."""
    paths = {module_name(p): p for p in python_files()}
    graph: Dict[str, Set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        for source, _, _ in imported(path, set(paths)):
            parts = source.split(".")
            if source in paths and source != name:
                graph[name].add(source)
            # Importing a.b.c runs a/__init__ and a/b/__init__ first: arrows to them too, but for the
            # packages holding the importer (Python has started those before the importer itself).
            for i in range(1, len(parts)):
                package = ".".join(parts[:i])
                if package in paths and not name.startswith(package + "."):
                    graph[name].add(package)
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_sparse_kernels_knows_nothing_of_sparse_diffusion():
    graph = import_graph()
    offending = [f"{name} -> {target}" for name, targets in graph.items() if name.startswith("sparse_kernels")
                 for target in targets if target.startswith("sparse_diffusion")]
    assert offending == []


def test_no_private_name_is_imported_from_another_module():
    modules = {module_name(p) for p in python_files()}
    offending = [
        f"{path.relative_to(ROOT)}:{line}: {name} from {source}"
        for path in python_files(SIZED)
        for source, name, line in imported(path, modules)
        if name.startswith("_") and not name.startswith("__")
    ]
    assert offending == []


@pytest.mark.parametrize("path", list(python_files(SIZED)), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_too_long_to_hold_in_one_head(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (over {MAX_LINES}): split it by meaning"


def test_the_checks_can_fail():
    """A made-up circle is found, and so is a private name imported from another module (but not
    a dunder, nor a public name)."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    modules = {"sparse_kernels", "sparse_kernels.layout", "sparse_kernels.linear", "sparse_kernels.linear.op"}
    source = "from ..layout import _private, public, __version__\nfrom . import op\nimport sparse_kernels.layout\n"
    found = list(imports_in(source, "sparse_kernels.linear.op", False, modules))
    assert ("sparse_kernels.layout", "_private", 1) in found
    assert ("sparse_kernels.layout", "public", 1) in found
    assert ("sparse_kernels.linear.op", "", 2) in found  # a submodule: an arrow to it, not a name
    assert ("sparse_kernels.layout", "", 3) in found
